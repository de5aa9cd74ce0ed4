//! Reading newline-delimited messages with a size limit. A line over the limit is reported once and skipped up
//! to its newline; the stream stays usable.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};

/// One read result.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline (a final line without newline counts at end of stream).
    Text(String),
    /// A line longer than the limit (its rest is skipped).
    TooLong,
    /// A line that is not UTF-8.
    NotUtf8,
}

/// Reads lines of at most `max` bytes from `inner`.
pub struct LineReader<R> {
    inner: R,
    codec: LinesCodec,
    buf: BytesMut,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            codec: LinesCodec::new_with_max_length(max),
            buf: BytesMut::with_capacity(4096),
            eof: false,
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The next line; `Ok(None)` at end of stream. Cancel-safe: no data is lost if the future is dropped.
    pub async fn next(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let decoded = if self.eof {
                self.codec.decode_eof(&mut self.buf)
            } else {
                self.codec.decode(&mut self.buf)
            };
            match decoded {
                Ok(Some(line)) => return Ok(Some(Line::Text(line))),
                Ok(None) if self.eof => return Ok(None),
                Ok(None) => {}
                Err(LinesCodecError::MaxLineLengthExceeded) => return Ok(Some(Line::TooLong)),
                Err(LinesCodecError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Ok(Some(Line::NotUtf8))
                }
                Err(LinesCodecError::Io(e)) => return Err(e),
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn all(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = LineReader::new(input, max);
        let mut out = vec![];
        while let Some(l) = r.next().await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_a_final_unterminated_one() {
        let got = all(b"a\nbb\r\n\nlast", 100).await;
        let t = |s: &str| Line::Text(s.into());
        assert_eq!(got, vec![t("a"), t("bb"), t(""), t("last")]);
    }

    #[tokio::test]
    async fn an_overlong_line_is_reported_once_and_skipped() {
        let mut input = b"ok\n".to_vec();
        input.extend(vec![b'x'; 10_000]);
        input.extend(b"\nafter\n");
        let got = all(&input, 64).await;
        assert_eq!(
            got,
            vec![
                Line::Text("ok".into()),
                Line::TooLong,
                Line::Text("after".into())
            ]
        );
    }

    #[tokio::test]
    async fn invalid_utf8_is_reported_and_skipped() {
        let got = all(b"\xff\xfe\nfine\n", 64).await;
        assert_eq!(got, vec![Line::NotUtf8, Line::Text("fine".into())]);
    }
}
