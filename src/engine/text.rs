//! Turning generated token ids into streamed text: incremental detokenization that never emits half a UTF-8
//! character, and stop strings that are never emitted, even partially.

/// Streams the text of a growing token sequence.
pub struct TextStream {
    ids: Vec<u32>,
    /// Text of every token so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    /// The latest decode, which may end in an incomplete character.
    latest: String,
    stops: Vec<String>,
}

/// The outcome of pushing one token.
#[derive(Debug, PartialEq)]
pub struct Pushed {
    /// New text that is safe to emit (may be empty).
    pub delta: String,
    /// True when a stop string was completed: generation ends, the stop string is not part of the text.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            ids: vec![],
            text: String::new(),
            emitted: 0,
            latest: String::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// Adds a token; `decode` turns the whole id sequence into text.
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> String) -> Pushed {
        self.ids.push(id);
        let full = decode(&self.ids);
        self.latest.clone_from(&full);
        // A trailing replacement character is an incomplete multi-byte sequence: wait for more tokens.
        if full.ends_with('\u{FFFD}') || !full.starts_with(&self.text[..self.emitted]) {
            return Pushed {
                delta: String::new(),
                stopped: false,
            };
        }
        self.text = full;
        let search_from =
            floor_boundary(&self.text, self.emitted.saturating_sub(self.max_stop_len()));
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| i + search_from)
            })
            .min()
        {
            self.text.truncate(at);
            // The stop string is gone for good: `finish` must not bring it back from the latest decode.
            self.latest.clone_from(&self.text);
            let delta = self.text[self.emitted.min(at)..].to_string();
            self.emitted = self.text.len();
            return Pushed {
                delta,
                stopped: true,
            };
        }
        let hold = self.partial_stop_suffix();
        let upto = self.text.len() - hold;
        let delta = if upto > self.emitted {
            self.text[self.emitted..upto].to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(upto);
        Pushed {
            delta,
            stopped: false,
        }
    }

    /// Emits whatever was held back (a partial stop string that never completed, an incomplete character);
    /// call once at the end, unless a stop string ended the stream.
    pub fn finish(&mut self) -> String {
        // Text that never became complete (invalid UTF-8 at the very end) is released as the decoder renders it.
        if self.latest.len() > self.text.len()
            && self.latest.starts_with(&self.text[..self.emitted])
        {
            self.text = std::mem::take(&mut self.latest);
        }
        let delta = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        delta
    }

    /// The text handed out so far.
    pub fn emitted(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// The whole text so far (without a completed stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn max_stop_len(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn partial_stop_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.text.ends_with(&s[..i]) {
                    best = best.max(i);
                }
            }
        }
        best
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str], stops: &[&str]) -> (Vec<String>, bool, String) {
        let vocab: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
        let dec = |ids: &[u32]| {
            ids.iter()
                .map(|&i| vocab[i as usize].as_str())
                .collect::<String>()
        };
        let mut ts = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = vec![];
        for i in 0..pieces.len() {
            let p = ts.push(i as u32, dec);
            out.push(p.delta);
            if p.stopped {
                return (out, true, ts.text().to_string());
            }
        }
        out.push(ts.finish());
        (out, false, ts.text().to_string())
    }

    #[test]
    fn streams_pieces() {
        let (d, stopped, text) = run(&["Hel", "lo", " world"], &[]);
        assert_eq!(d.concat(), "Hello world");
        assert!(!stopped);
        assert_eq!(text, "Hello world");
    }

    #[test]
    fn stop_string_across_tokens_is_never_emitted() {
        let (d, stopped, text) = run(&["Hi", " the", "re\n", "User", ":", " more"], &["\nUser:"]);
        assert!(stopped);
        assert_eq!(text, "Hi there");
        assert_eq!(d.concat(), "Hi there");
        assert!(d.iter().all(|s| !s.contains('\n')));
    }

    #[test]
    fn a_stop_string_inside_one_token_is_cut_and_finish_adds_nothing() {
        let vocab = [" small", " tree", "."];
        let dec = |ids: &[u32]| ids.iter().map(|&i| vocab[i as usize]).collect::<String>();
        let mut ts = TextStream::new(vec!["tree".into()]);
        assert_eq!(ts.push(0, dec).delta, " small");
        let p = ts.push(1, dec);
        assert_eq!((p.delta.as_str(), p.stopped), (" ", true));
        assert_eq!(ts.finish(), "");
        assert_eq!(ts.text(), " small ");
    }

    #[test]
    fn held_back_prefix_is_released_when_no_stop_follows() {
        let (d, stopped, _) = run(&["a", "\nU", "b"], &["\nUser:"]);
        assert!(!stopped);
        assert_eq!(d[1], "");
        assert_eq!(d.concat(), "a\nUb");
    }

    #[test]
    fn incomplete_utf8_waits_for_the_next_token() {
        let pieces = ["caf", "\u{FFFD}", "é!"];
        // a decoder whose text for [0,1] ends in U+FFFD and for [0,1,2] is complete
        let dec = |ids: &[u32]| match ids.len() {
            1 => "caf".to_string(),
            2 => "caf\u{FFFD}".to_string(),
            _ => "café!".to_string(),
        };
        let mut ts = TextStream::new(vec![]);
        let d: Vec<String> = (0..pieces.len())
            .map(|i| ts.push(i as u32, dec).delta)
            .collect();
        assert_eq!(d, vec!["caf", "", "é!"]);
    }
}
