//! The integration plan's request types as prompts: where a request's `context` goes, the `reason` and
//! `validate` templates, and the reading of a validation's answer. Pure; the same prompt runs on the board and
//! in the cloud (documented in `docs/protocol.md`).
//!
//! - `context` with a plain request: `"Context:\n{context}\n\n"` before the prompt, or before the content of the
//!   last user message.
//! - `task: "reason"`: the system prompt [`SYSTEM_PROMPT`], then one user message
//!   `"Context: {context}\n\nQuery: {query}\n\nProvide detailed reasoning with scientific validation."` (without
//!   the context line when there is none); the query is the prompt, or the last user message (earlier messages
//!   are kept). Temperature [`TASK_TEMPERATURE`] unless the request sets one.
//! - `task: "validate"`: the system prompt, then the hypothesis, the numbered evidence, the context, and the
//!   plan's five points, asking for one JSON object ([`validation_prompt`]); read back by [`parse_result`].

use crate::engine::{Message, Prompt};
use crate::protocol::{Request, Task};

/// The plan's system prompt for reasoning and validation.
pub const SYSTEM_PROMPT: &str =
    "You are a scientific AI assistant specializing in advanced reasoning and validation.";

/// The plan's temperature for reasoning and validation (where the model lets it be set).
pub const TASK_TEMPERATURE: f32 = 0.3;

/// A request as the model sees it.
#[derive(Debug, Clone)]
pub struct Shaped {
    pub prompt: Prompt,
    /// The request's temperature, else the task's.
    pub temperature: Option<f32>,
    /// The answer must be a JSON object (`validate`): JSON mode in the cloud, [`parse_result`] on the answer.
    pub json: bool,
}

/// Shapes `req` (already checked by `protocol::parse`: a validation has its hypothesis and evidence, anything
/// else its prompt or messages).
pub fn shape(req: &Request) -> Shaped {
    let context = req.context.as_deref().filter(|c| !c.trim().is_empty());
    let (prompt, task_temperature) = match req.task {
        None => (with_context(base_prompt(req), context), None),
        Some(Task::Reason) => (
            reason_prompt(base_prompt(req), context),
            Some(TASK_TEMPERATURE),
        ),
        Some(Task::Validate) => (
            Prompt::Chat(vec![
                message("system", SYSTEM_PROMPT),
                message(
                    "user",
                    &validation_prompt(
                        req.hypothesis.as_deref().unwrap_or_default(),
                        req.evidence.as_deref().unwrap_or_default(),
                        context,
                    ),
                ),
            ]),
            Some(TASK_TEMPERATURE),
        ),
    };
    Shaped {
        prompt,
        temperature: req.temperature.or(task_temperature),
        json: req.task == Some(Task::Validate),
    }
}

/// The text the complexity score reads: the question, without the context (whose length has its own rule).
pub fn query_text(req: &Request) -> String {
    match (&req.prompt, &req.messages) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => m
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        (None, None) => {
            let mut t = req.hypothesis.clone().unwrap_or_default();
            for e in req.evidence.iter().flatten() {
                t.push('\n');
                t.push_str(e);
            }
            t
        }
    }
}

/// Characters of the request's context.
pub fn context_chars(req: &Request) -> usize {
    req.context.as_deref().map_or(0, |c| c.chars().count())
}

/// The user message of a validation.
pub fn validation_prompt(hypothesis: &str, evidence: &[String], context: Option<&str>) -> String {
    let mut t = format!(
        "Validate the following hypothesis against the evidence.\n\nHypothesis: {}\n\nEvidence:\n",
        hypothesis.trim()
    );
    if evidence.is_empty() {
        t.push_str("(none given)\n");
    }
    for (i, e) in evidence.iter().enumerate() {
        t.push_str(&format!("{}. {}\n", i + 1, e.trim()));
    }
    if let Some(c) = context {
        t.push_str(&format!("\nContext: {c}\n"));
    }
    t.push_str(
        "\nProvide:\n1. An assessment of each piece of evidence\n2. A check of logical consistency\n\
         3. Alternative explanations\n4. A confidence score from 0 to 1\n\
         5. Recommendations for further validation\n\n\
         Answer with one JSON object with the keys \"evidence_assessment\" (string), \
         \"logical_consistency\" (string), \"alternative_explanations\" (list of strings), \
         \"confidence\" (number from 0 to 1) and \"recommendations\" (list of strings).",
    );
    t
}

/// Reads a validation's answer: the JSON object in `text` (a bare object, or one inside a code fence or prose),
/// whose `confidence` is a number in [0, 1]. The error says what is wrong, for the `protocol` cause.
pub fn parse_result(text: &str) -> Result<serde_json::Value, String> {
    let (start, end) = match (text.find('{'), text.rfind('}')) {
        (Some(s), Some(e)) if s < e => (s, e),
        _ => return Err("the validation answer holds no JSON object".into()),
    };
    let v: serde_json::Value = serde_json::from_str(&text[start..=end])
        .map_err(|e| format!("the validation answer is not valid JSON: {e}"))?;
    match v.get("confidence").and_then(serde_json::Value::as_f64) {
        Some(c) if (0.0..=1.0).contains(&c) => Ok(v),
        Some(c) => Err(format!("the validation's confidence {c} is outside [0, 1]")),
        None => Err("the validation answer has no numeric `confidence`".into()),
    }
}

fn base_prompt(req: &Request) -> Prompt {
    match (&req.prompt, &req.messages) {
        (Some(p), _) => Prompt::Text(p.clone()),
        (None, Some(m)) => Prompt::Chat(m.clone()),
        (None, None) => Prompt::Text(String::new()),
    }
}

fn message(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn with_context(prompt: Prompt, context: Option<&str>) -> Prompt {
    let Some(c) = context else { return prompt };
    let prefix = |t: &str| format!("Context:\n{c}\n\n{t}");
    match prompt {
        Prompt::Text(t) => Prompt::Text(prefix(&t)),
        Prompt::Chat(mut m) => {
            match m.iter_mut().rev().find(|m| m.role == "user") {
                Some(last) => last.content = prefix(&last.content),
                None => m.push(message("user", &format!("Context:\n{c}"))),
            }
            Prompt::Chat(m)
        }
        // Token ids come only from the library, never from a request with a context.
        ids @ Prompt::Ids(_) => ids,
    }
}

fn reason_prompt(prompt: Prompt, context: Option<&str>) -> Prompt {
    let wrap = |query: &str| {
        let c = context.map_or(String::new(), |c| format!("Context: {c}\n\n"));
        format!("{c}Query: {query}\n\nProvide detailed reasoning with scientific validation.")
    };
    let mut messages = match prompt {
        Prompt::Text(t) => vec![message("user", &wrap(&t))],
        ids @ Prompt::Ids(_) => return ids,
        Prompt::Chat(mut m) => {
            match m.iter_mut().rev().find(|m| m.role == "user") {
                Some(last) => last.content = wrap(&last.content),
                None => m.push(message("user", &wrap(""))),
            }
            m
        }
    };
    if !messages.iter().any(|m| m.role == "system") {
        messages.insert(0, message("system", SYSTEM_PROMPT));
    }
    Prompt::Chat(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Request {
        match crate::protocol::parse(json.as_bytes()).unwrap() {
            crate::protocol::Incoming::Request(r) => *r,
            other => panic!("{other:?}"),
        }
    }

    fn chat(p: &Prompt) -> &[Message] {
        match p {
            Prompt::Chat(m) => m,
            _ => panic!("not a chat prompt"),
        }
    }

    #[test]
    fn context_goes_before_the_prompt_or_the_last_user_message() {
        let s = shape(&req(
            r#"{"id":1,"prompt":"What failed?","context":"pump log"}"#,
        ));
        assert!(matches!(&s.prompt, Prompt::Text(t) if t == "Context:\npump log\n\nWhat failed?"));
        assert_eq!((s.temperature, s.json), (None, false));
        let s = shape(&req(
            r#"{"id":1,"context":"doc","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":"c"}]}"#,
        ));
        let m = chat(&s.prompt);
        assert_eq!(
            (m[0].content.as_str(), m[2].content.as_str()),
            ("a", "Context:\ndoc\n\nc")
        );
    }

    #[test]
    fn reason_uses_the_plans_system_prompt_template_and_low_temperature() {
        let s = shape(&req(
            r#"{"id":1,"task":"reason","prompt":"Is it the bearing?","context":"vibration up"}"#,
        ));
        let m = chat(&s.prompt);
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", SYSTEM_PROMPT)
        );
        assert_eq!(
            m[1].content,
            "Context: vibration up\n\nQuery: Is it the bearing?\n\nProvide detailed reasoning with scientific validation."
        );
        assert_eq!(s.temperature, Some(TASK_TEMPERATURE));
        let own = shape(&req(
            r#"{"id":1,"task":"reason","prompt":"q","temperature":0.9}"#,
        ));
        assert_eq!(own.temperature, Some(0.9), "the request's temperature wins");
        assert!(chat(&own.prompt)[1].content.starts_with("Query: q"));
    }

    #[test]
    fn validate_lists_the_evidence_and_asks_for_the_five_points_as_json() {
        let s = shape(&req(
            r#"{"id":1,"task":"validate","hypothesis":"The bearing fails","evidence":["vibration rose 40%","temperature +12 C"]}"#,
        ));
        assert!(s.json);
        let u = &chat(&s.prompt)[1].content;
        for needle in [
            "Hypothesis: The bearing fails",
            "1. vibration rose 40%",
            "2. temperature +12 C",
            "Alternative explanations",
            "confidence score from 0 to 1",
            "\"confidence\" (number from 0 to 1)",
        ] {
            assert!(u.contains(needle), "{needle} in {u}");
        }
        assert_eq!(
            query_text(&req(
                r#"{"id":1,"task":"validate","hypothesis":"h","evidence":["e"]}"#
            )),
            "h\ne"
        );
    }

    #[test]
    fn a_validation_answer_parses_when_its_confidence_is_in_range() {
        let v =
            parse_result("```json\n{\"confidence\": 0.7, \"recommendations\": []}\n```").unwrap();
        assert_eq!(v["confidence"], 0.7);
        assert!(parse_result("{\"confidence\": 1.5}")
            .unwrap_err()
            .contains("outside"));
        assert!(parse_result("{\"confidence\": \"high\"}")
            .unwrap_err()
            .contains("numeric"));
        assert!(parse_result("I think it is true")
            .unwrap_err()
            .contains("no JSON"));
        assert!(parse_result("{\"confidence\": 0.5")
            .unwrap_err()
            .contains("no JSON"));
        assert!(parse_result("{oops}")
            .unwrap_err()
            .contains("not valid JSON"));
    }
}
