//! The wire format shared by every source (Unix socket, MQTT, and any later one), documented for clients in
//! `docs/protocol.md`. A leaf: it knows the shapes of messages, not who makes or handles them, so the clients
//! (`bitnetd ask`, `status`, `result`) read the same typed replies the daemon writes.
//!
//! - this file: request objects and control messages, and [`parse`];
//! - [`reply`]: replies, error codes and error replies;
//! - [`status`]: what `{"cmd":"status"}` reports.
//!
//! Which internal error becomes which code is decided in [`crate::errors`], not here.

mod reply;
pub mod status;

use serde::{Deserialize, Serialize};

use crate::engine::Message;

pub use reply::{
    Done, ErrorCode, ErrorReply, Reply, Served, StoredReply, Timing, Usage, WireError,
};
pub use status::Status;

/// A request id as the client sent it: a string or an integer, echoed back unchanged.
pub type Id = serde_json::Value;

/// Longest accepted string id, in bytes.
const MAX_ID_LEN: usize = 256;

/// Where a request may run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// bitnetd decides (see [`crate::router`]).
    #[default]
    Auto,
    /// On the board, always.
    Local,
    /// On the cloud model.
    Cloud,
}

/// A generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: Id,
    /// Plain text to continue. Exactly one of `prompt` and `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chat messages, rendered by the model's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// One string or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopStrings>,
    /// Stream `token` replies (default); `false` sends only the terminal reply, with the text.
    #[serde(default = "yes")]
    pub stream: bool,
    #[serde(default)]
    pub route: Route,
    /// Must never leave the board.
    #[serde(default)]
    pub private: bool,
    /// Milliseconds from acceptance until the request must be done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// May be answered later (store-and-forward while the cloud is unreachable).
    #[serde(default)]
    pub defer: bool,
    /// When the local model cannot finish `max_tokens` within the deadline at its measured speed (and the
    /// request stays local): generate what fits (`shorten`, the default; `finish_reason: "budget"`) or refuse
    /// at once (`refuse`: error `deadline`).
    #[serde(default)]
    pub on_deadline: OnDeadline,
    /// A document that goes with the question (logs, a report), placed in the prompt by a documented template
    /// (`crate::tasks`). Longer than `[router] long_context_chars`, it sends `auto` work to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// One of the integration plan's request types; absent: plain generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// `task: "validate"`: the hypothesis to check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypothesis: Option<String>,
    /// `task: "validate"`: the evidence, one item per string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Vec<String>>,
    /// `false` asks a thinking cloud model not to think (where the model can turn it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<bool>,
}

/// The integration plan's request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Scientific validation of `hypothesis` against `evidence`, answered with a parsed `result` object.
    Validate,
    /// Advanced reasoning over the prompt (and `context`), with the plan's system prompt and a low temperature.
    Reason,
}

/// See [`Request::on_deadline`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    #[default]
    Shorten,
    Refuse,
}

fn yes() -> bool {
    true
}

/// `stop` as a single string or a list of strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopStrings {
    One(String),
    Many(Vec<String>),
}

impl StopStrings {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopStrings::One(s) => vec![s],
            StopStrings::Many(v) => v,
        }
    }
}

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Reply with a [`Reply::Status`].
    Status,
    /// `{"cmd":"result","id":...}`: the result of a deferred request (its `done` or `error`), a `deferred`
    /// reply while it waits, or `not_found`.
    Result,
}

/// One parsed incoming message.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Request(Box<Request>),
    /// `{"id", "cancel": true}`: cancel the request with this id (no effect when it is not in flight).
    Cancel {
        id: Id,
    },
    /// `{"cmd": "status", "id"?}`.
    Command {
        id: Option<Id>,
        cmd: Command,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelMsg {
    id: Id,
    cancel: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandMsg {
    #[serde(default)]
    id: Option<Id>,
    cmd: Command,
}

/// A message that could not be read as a request or control message. Always the client's fault (the code is
/// `bad_request`, see [`crate::errors`]); `id` is set when the message had a usable one, so that the error
/// reply can be matched to the request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub id: Option<Id>,
    pub message: String,
}

impl ParseError {
    pub fn new(message: impl Into<String>) -> ParseError {
        ParseError {
            id: None,
            message: message.into(),
        }
    }
}

/// Parses one message (a line of the socket protocol, an MQTT payload).
pub fn parse(bytes: &[u8]) -> Result<Incoming, ParseError> {
    parse_value(parse_json(bytes)?)
}

/// Reads bytes as JSON (any value).
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ParseError> {
    serde_json::from_slice(bytes).map_err(|e| ParseError::new(format!("malformed JSON: {e}")))
}

/// Like [`parse`], for a value already read as JSON.
pub fn parse_value(value: serde_json::Value) -> Result<Incoming, ParseError> {
    let obj = value
        .as_object()
        .ok_or_else(|| ParseError::new("expected a JSON object"))?;
    // An unusable id fails here, with no id in the error (there is none to match it to).
    let id = match obj.get("id") {
        Some(raw) => Some(check_id(raw).map(|()| raw.clone())?),
        None => None,
    };
    let fail = |message: String| ParseError {
        id: id.clone(),
        message,
    };
    let bad = |e: serde_json::Error| fail(e.to_string());
    if obj.contains_key("cmd") {
        let m: CommandMsg = serde_json::from_value(value).map_err(bad)?;
        return Ok(Incoming::Command {
            id: m.id,
            cmd: m.cmd,
        });
    }
    if obj.contains_key("cancel") {
        let m: CancelMsg = serde_json::from_value(value).map_err(bad)?;
        if !m.cancel {
            return Err(fail("`cancel` must be true".into()));
        }
        return Ok(Incoming::Cancel { id: m.id });
    }
    if id.is_none() {
        return Err(ParseError::new("missing field `id`"));
    }
    let req: Request = serde_json::from_value(value).map_err(bad)?;
    check_task(&req).map_err(fail)?;
    Ok(Incoming::Request(Box::new(req)))
}

/// The fields a request's task needs, and no others: `validate` takes `hypothesis` and `evidence` instead of a
/// prompt; every other request takes exactly one of `prompt` and `messages`.
fn check_task(req: &Request) -> Result<(), String> {
    let validate = req.task == Some(Task::Validate);
    if validate {
        match (&req.hypothesis, &req.evidence) {
            (Some(h), Some(_)) if !h.trim().is_empty() => {}
            (None, _) | (Some(_), Some(_)) => {
                return Err("`task: \"validate\"` needs a non-empty `hypothesis`".into())
            }
            (_, None) => {
                return Err("`task: \"validate\"` needs `evidence` (a list of strings)".into())
            }
        }
        if req.prompt.is_some() || req.messages.is_some() {
            return Err(
                "`task: \"validate\"` takes `hypothesis` and `evidence`, not `prompt` or `messages`"
                    .into(),
            );
        }
        return Ok(());
    }
    if req.hypothesis.is_some() || req.evidence.is_some() {
        return Err("`hypothesis` and `evidence` go with `task: \"validate\"`".into());
    }
    match (&req.prompt, &req.messages) {
        (Some(_), Some(_)) => Err("give either `prompt` or `messages`, not both".into()),
        (None, None) => Err("missing field `prompt` (or `messages`)".into()),
        _ => Ok(()),
    }
}

fn check_id(id: &Id) -> Result<(), ParseError> {
    let ok = match id {
        serde_json::Value::String(s) => !s.is_empty() && s.len() <= MAX_ID_LEN,
        serde_json::Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ParseError::new(format!(
            "`id` must be a non-empty string of at most {MAX_ID_LEN} bytes or an integer"
        )))
    }
}

/// The id as text, as MQTT keys and logs use it: a string as it is, an integer in decimal.
pub fn id_text(id: &Id) -> String {
    match id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_str(s: &str) -> Result<Incoming, ParseError> {
        parse(s.as_bytes())
    }

    #[test]
    fn a_full_request_parses() {
        let r = parse_str(
            r#"{"id":"a1","prompt":"hi","max_tokens":5,"temperature":0.5,"top_p":0.9,"top_k":4,"seed":3,
                "stop":["x","y"],"stream":false,"route":"local","private":true,"deadline_ms":100,"defer":true}"#,
        )
        .unwrap();
        let Incoming::Request(r) = r else { panic!() };
        assert_eq!(r.id, json!("a1"));
        assert_eq!(r.stop.clone().unwrap().into_vec(), vec!["x", "y"]);
        assert!(!r.stream && r.private && r.defer);
        assert_eq!(r.route, Route::Local);
    }

    #[test]
    fn defaults_stream_auto_and_not_private() {
        let Incoming::Request(r) =
            parse_str(r#"{"id":7,"messages":[{"role":"user","content":"hi"}]}"#).unwrap()
        else {
            panic!()
        };
        assert!(r.stream && !r.private && !r.defer);
        assert_eq!(r.route, Route::Auto);
        assert_eq!(r.id, json!(7));
    }

    #[test]
    fn control_messages_parse() {
        assert_eq!(
            parse_str(r#"{"id":"a","cancel":true}"#).unwrap(),
            Incoming::Cancel { id: json!("a") }
        );
        assert_eq!(
            parse_str(r#"{"cmd":"status"}"#).unwrap(),
            Incoming::Command {
                id: None,
                cmd: Command::Status
            }
        );
    }

    #[test]
    fn bad_input_is_a_bad_request_that_keeps_the_id_when_it_can() {
        for (text, id, needle) in [
            ("{not json", None, "malformed JSON"),
            ("[1,2]", None, "expected a JSON object"),
            (r#"{"prompt":"x"}"#, None, "missing field `id`"),
            (
                r#"{"id":"q","prompt":"x","colour":1}"#,
                Some(json!("q")),
                "unknown field `colour`",
            ),
            (r#"{"id":"q","prompt":5}"#, Some(json!("q")), "invalid type"),
            (r#"{"id":"q"}"#, Some(json!("q")), "missing field `prompt`"),
            (
                r#"{"id":"q","prompt":"a","messages":[]}"#,
                Some(json!("q")),
                "not both",
            ),
            (
                r#"{"id":"q","prompt":"a","route":"moon"}"#,
                Some(json!("q")),
                "unknown variant",
            ),
            (r#"{"id":[1],"prompt":"a"}"#, None, "`id` must be"),
            (r#"{"id":1.5,"prompt":"a"}"#, None, "`id` must be"),
            (r#"{"cmd":"reboot"}"#, None, "unknown variant"),
            (
                r#"{"id":"q","cancel":false}"#,
                Some(json!("q")),
                "must be true",
            ),
        ] {
            let e = parse_str(text).unwrap_err();
            assert_eq!(e.id, id, "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn the_plans_request_types_parse_with_their_fields() {
        let Incoming::Request(r) = parse_str(
            r#"{"id":1,"task":"validate","hypothesis":"h","evidence":["a","b"],"context":"log","thinking":false}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.task, Some(Task::Validate));
        assert_eq!(
            r.evidence.as_deref(),
            Some(&["a".to_string(), "b".into()][..])
        );
        assert_eq!(
            (r.context.as_deref(), r.thinking),
            (Some("log"), Some(false))
        );
        let Incoming::Request(r) =
            parse_str(r#"{"id":2,"task":"reason","prompt":"why?","context":"doc"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.task, Some(Task::Reason));
    }

    #[test]
    fn a_task_without_its_fields_is_a_bad_request() {
        for (text, needle) in [
            (
                r#"{"id":1,"task":"validate","evidence":[]}"#,
                "needs a non-empty `hypothesis`",
            ),
            (
                r#"{"id":1,"task":"validate","hypothesis":" ","evidence":[]}"#,
                "non-empty",
            ),
            (
                r#"{"id":1,"task":"validate","hypothesis":"h"}"#,
                "needs `evidence`",
            ),
            (
                r#"{"id":1,"task":"validate","hypothesis":"h","evidence":[],"prompt":"x"}"#,
                "not `prompt`",
            ),
            (r#"{"id":1,"prompt":"x","hypothesis":"h"}"#, "go with"),
            (r#"{"id":1,"task":"reason"}"#, "missing field `prompt`"),
            (r#"{"id":1,"task":"guess","prompt":"x"}"#, "unknown variant"),
            (
                r#"{"id":1,"task":"validate","hypothesis":"h","evidence":"e"}"#,
                "invalid type",
            ),
        ] {
            let e = parse_str(text).unwrap_err();
            assert_eq!(e.id, Some(json!(1)), "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn a_request_survives_a_round_trip_through_its_json() {
        let text = r#"{"id":"a","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"stop":"x","on_deadline":"refuse"}"#;
        let Incoming::Request(r) = parse_str(text).unwrap() else {
            panic!()
        };
        let again = parse(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, Incoming::Request(r));
    }
}
