//! The complexity score of a task, in [0, 1]: a documented heuristic that stands in for "would a 2B model
//! get this wrong?". It adds up, each part capped:
//!
//! | signal | weight |
//! |---|---|
//! | length: characters / `long_prompt_chars`, at most 1 | × 0.3 |
//! | reasoning keywords (`[router] keywords`, whole words or phrases), per distinct word | 0.35, at most 0.6 |
//! | a why/how/explain question, or "step by step" | 0.15 |
//! | code: fences, `fn`/`def`/`class`/`#include`, or words such as *implement*, *refactor*, *debug* | 0.25 |
//! | mathematics: an equation-like `3x + 4 = 10`, or words such as *integral*, *derivative*, *probability* | 0.2 |
//! | more than one question mark | 0.1 |
//!
//! With the default threshold 0.6, one keyword plus one other signal (or two keywords) escalates, a plain
//! factual question ("What is a dog?") scores 0.
//!
//! The integration plan's keyword levels are floors under the sum: one of its expert words ([`EXPERT_WORDS`]:
//! hypothesis, theorem, scientific, peer-review) makes the score 1 and marks the request expert; one of its
//! complex words ([`COMPLEX_WORDS`]: validate, prove, research, synthesize, evaluate) makes it at least 0.8.

/// The built-in reasoning keywords (the seed plan's, and their near relatives).
pub const DEFAULT_KEYWORDS: &[&str] = &[
    "analyze",
    "analyse",
    "analysis",
    "prove",
    "proof",
    "validate",
    "verify",
    "hypothesis",
    "derive",
    "derivation",
    "evaluate",
    "compare",
    "contrast",
    "justify",
    "critique",
    "assess",
    "diagnose",
    "optimize",
    "optimise",
    "design",
    "plan",
    "infer",
    "synthesize",
    "trade-off",
    "tradeoff",
    "root cause",
];

/// The plan's expert words: a request naming one is expert work (score 1, `expert`).
pub const EXPERT_WORDS: &[&str] = &[
    "hypothesis",
    "hypotheses",
    "theorem",
    "scientific",
    "peer-review",
    "peer review",
];

/// The plan's complex words: a request naming one scores at least [`COMPLEX_FLOOR`].
pub const COMPLEX_WORDS: &[&str] = &["validate", "prove", "research", "synthesize", "evaluate"];

/// The score of a request with one of the plan's complex words, at least.
pub const COMPLEX_FLOOR: f32 = 0.8;

const CODE_WORDS: &[&str] = &[
    "implement",
    "refactor",
    "debug",
    "compile",
    "function",
    "algorithm",
    "regex",
    "sql",
    "python",
    "rust",
    "javascript",
    "code",
];
const CODE_MARKS: &[&str] = &[
    "```", "fn ", "def ", "class ", "#include", "=>", "();", "};",
];
const MATH_WORDS: &[&str] = &[
    "integral",
    "derivative",
    "equation",
    "probability",
    "matrix",
    "theorem",
    "lemma",
    "calculate",
    "solve",
];
const WHY_MARKS: &[&str] = &[
    " why ",
    " how does ",
    " how do ",
    " how can ",
    " explain ",
    " step by step ",
];

/// A score and the signals that made it, for the route reason and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Complexity {
    pub score: f32,
    /// One of the plan's expert words is present.
    pub expert: bool,
    /// Short names of the signals present, e.g. `["keywords: prove", "math"]`.
    pub signals: Vec<String>,
}

/// Scores `text` (a prompt, or the messages' contents joined). Pure and cheap: one pass to lower-case and
/// split into words, then substring checks.
pub fn score(text: &str, keywords: &[String], long_prompt_chars: usize) -> Complexity {
    let lower = text.to_lowercase();
    // " word word ... " with single spaces, so that " kw " finds whole words and phrases.
    let mut words = String::with_capacity(lower.len() + 2);
    words.push(' ');
    for w in lower.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\'')) {
        if !w.is_empty() {
            words.push_str(w);
            words.push(' ');
        }
    }
    let has_word = |w: &str| words.contains(&format!(" {w} "));
    let mut score = 0.0f32;
    let mut signals = Vec::new();

    let len = text.chars().count() as f32 / long_prompt_chars.max(1) as f32;
    if len >= 0.1 {
        score += 0.3 * len.min(1.0);
        signals.push(format!("length {:.0}%", len.min(1.0) * 100.0));
    }
    let hits: Vec<&str> = keywords
        .iter()
        .map(String::as_str)
        .filter(|k| has_word(k))
        .collect();
    if !hits.is_empty() {
        score += (0.35 * hits.len() as f32).min(0.6);
        signals.push(format!("keywords: {}", hits.join(", ")));
    }
    if WHY_MARKS.iter().any(|m| words.contains(m)) {
        score += 0.15;
        signals.push("why/how".into());
    }
    if CODE_MARKS.iter().any(|m| lower.contains(m)) || CODE_WORDS.iter().any(|w| has_word(w)) {
        score += 0.25;
        signals.push("code".into());
    }
    if MATH_WORDS.iter().any(|w| has_word(w)) || has_equation(&lower) {
        score += 0.2;
        signals.push("math".into());
    }
    if text.matches('?').count() > 1 {
        score += 0.1;
        signals.push("several questions".into());
    }
    let level = |list: &[&'static str]| list.iter().copied().find(|w| has_word(w));
    let expert = level(EXPERT_WORDS);
    if let Some(w) = expert {
        score = 1.0;
        signals.push(format!("expert: {w}"));
    } else if let Some(w) = level(COMPLEX_WORDS) {
        score = score.max(COMPLEX_FLOOR);
        signals.push(format!("complex: {w}"));
    }
    Complexity {
        score: score.min(1.0),
        expert: expert.is_some(),
        signals,
    }
}

/// Something like `3x + 4 = 10` or `2^8`: a digit, an operator, then a digit or a variable.
fn has_equation(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| {
        b[i].is_ascii_digit() && {
            let rest = &b[i + 1..];
            let skip = rest
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b' ')
                .count();
            let rest = &rest[skip.min(rest.len())..];
            matches!(rest.first(), Some(b'+' | b'*' | b'/' | b'^' | b'='))
                && rest[1..]
                    .iter()
                    .find(|c| **c != b' ')
                    .is_some_and(|c| c.is_ascii_alphanumeric())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kw() -> Vec<String> {
        DEFAULT_KEYWORDS.iter().map(|s| s.to_string()).collect()
    }

    fn s(text: &str) -> f32 {
        score(text, &kw(), 1500).score
    }

    #[test]
    fn a_plain_question_scores_zero() {
        assert_eq!(s("What is a dog?"), 0.0);
        assert_eq!(s("Turn on the kitchen light"), 0.0);
    }

    #[test]
    fn the_seed_keywords_escalate_together() {
        let c = score(
            "Analyze the pump log and validate the hypothesis that the bearing fails",
            &kw(),
            1500,
        );
        assert!(c.score >= 0.6, "{c:?}");
        assert!(
            c.signals[0].contains("analyze, validate, hypothesis"),
            "{c:?}"
        );
    }

    #[test]
    fn one_keyword_alone_stays_below_the_default_threshold() {
        assert!(s("Please compare these") < 0.6);
        assert!(s("Prove why the sum of two even numbers is even") >= 0.5);
    }

    #[test]
    fn keywords_match_whole_words_only() {
        assert_eq!(
            s("The planet is improved"),
            0.0,
            "plan in planet, prove in improved"
        );
        assert!(s("Find the root cause") > 0.0, "phrases match");
    }

    #[test]
    fn code_and_math_are_signals() {
        let c = score(
            "Implement a function in Rust: ```fn main() {}```",
            &kw(),
            1500,
        );
        assert!(c.signals.contains(&"code".to_string()), "{c:?}");
        let m = score("Solve 3x + 4 = 10", &kw(), 1500);
        assert!(m.signals.contains(&"math".to_string()), "{m:?}");
        assert!(!score("I have 3 cats", &kw(), 1500)
            .signals
            .contains(&"math".to_string()));
    }

    #[test]
    fn length_counts_up_to_its_share() {
        let long = "word ".repeat(1000);
        let c = score(&long, &kw(), 1500);
        assert!((c.score - 0.3).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn configured_keywords_replace_the_built_in_ones() {
        let mine = vec!["forecast".to_string()];
        assert!(score("Forecast tomorrow", &mine, 1500).score > 0.0);
        assert_eq!(score("Analyze this", &mine, 1500).score, 0.0);
        assert_eq!(score("Compare this", &mine, 1500).score, 0.0);
    }

    #[test]
    fn the_plans_expert_words_mark_a_request_expert() {
        for t in [
            "Is this hypothesis sound?",
            "State the theorem",
            "A scientific question",
            "Peer-review my note",
        ] {
            let c = score(t, &kw(), 1500);
            assert!(c.expert && c.score == 1.0, "{t}: {c:?}");
        }
        assert!(
            !score("A science fair", &kw(), 1500).expert,
            "whole words only"
        );
    }

    #[test]
    fn the_plans_complex_words_score_at_least_the_complex_floor() {
        for t in [
            "Validate this",
            "Prove it",
            "Research the market",
            "Synthesize these notes",
            "Evaluate the plan",
        ] {
            let c = score(t, &kw(), 1500);
            assert!(!c.expert && c.score >= COMPLEX_FLOOR, "{t}: {c:?}");
        }
        // A floor, not an addition: the additive score still counts above it.
        let c = score(
            "Prove why 3x + 4 = 10 step by step in Python? And how?",
            &kw(),
            1500,
        );
        assert!(c.score > COMPLEX_FLOOR, "{c:?}");
        // Configured keywords do not remove the plan's levels.
        assert!(score("Evaluate it", &["forecast".to_string()], 1500).score >= COMPLEX_FLOOR);
    }

    #[test]
    fn the_score_is_capped_at_one() {
        let t = "Why? How? Analyze, prove, validate, derive the integral of 2x + 1 = y in ```python``` ".repeat(50);
        assert_eq!(s(&t), 1.0);
    }
}
