//! The wire format shared by every source (Unix socket, MQTT): request objects, control messages, replies, and
//! the one place where errors become stable wire codes. Documented for clients in `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::engine::{EngineError, FinishReason, Message};

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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: Id,
    /// Plain text to continue. Exactly one of `prompt` and `messages`.
    pub prompt: Option<String>,
    /// Chat messages, rendered by the model's chat template.
    pub messages: Option<Vec<Message>>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// One string or a list.
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
    pub deadline_ms: Option<u64>,
    /// May be answered later (store-and-forward while the cloud is unreachable).
    #[serde(default)]
    pub defer: bool,
    /// When the local model cannot finish `max_tokens` within the deadline at its measured speed (and the
    /// request stays local): generate what fits (`shorten`, the default; `finish_reason: "budget"`) or refuse
    /// at once (`refuse`: error `deadline`).
    #[serde(default)]
    pub on_deadline: OnDeadline,
}

/// See [`Request::on_deadline`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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

/// Parses one message (a line of the socket protocol, an MQTT payload). A failure carries the id when the
/// message had a usable one, so that the error reply can be matched to the request.
pub fn parse(bytes: &[u8]) -> Result<Incoming, WireError> {
    parse_value(parse_json(bytes)?)
}

/// Reads bytes as JSON (any value).
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, WireError> {
    serde_json::from_slice(bytes)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("malformed JSON: {e}")))
}

/// Like [`parse`], for a value already read as JSON.
pub fn parse_value(value: serde_json::Value) -> Result<Incoming, WireError> {
    let obj = value
        .as_object()
        .ok_or_else(|| WireError::new(ErrorCode::BadRequest, "expected a JSON object"))?;
    // An unusable id fails here, with no id in the error (there is none to match it to).
    let id = match obj.get("id") {
        Some(raw) => Some(check_id(raw).map(|()| raw.clone())?),
        None => None,
    };
    let with_id = |e: WireError| WireError {
        id: id.clone(),
        ..e
    };
    let bad = |e: serde_json::Error| with_id(WireError::new(ErrorCode::BadRequest, e.to_string()));
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
            return Err(with_id(WireError::new(
                ErrorCode::BadRequest,
                "`cancel` must be true",
            )));
        }
        return Ok(Incoming::Cancel { id: m.id });
    }
    if id.is_none() {
        return Err(WireError::new(ErrorCode::BadRequest, "missing field `id`"));
    }
    let req: Request = serde_json::from_value(value).map_err(bad)?;
    match (&req.prompt, &req.messages) {
        (Some(_), Some(_)) => Err(with_id(WireError::new(
            ErrorCode::BadRequest,
            "give either `prompt` or `messages`, not both",
        ))),
        (None, None) => Err(with_id(WireError::new(
            ErrorCode::BadRequest,
            "missing field `prompt` (or `messages`)",
        ))),
        _ => Ok(Incoming::Request(Box::new(req))),
    }
}

fn check_id(id: &Id) -> Result<(), WireError> {
    let ok = match id {
        serde_json::Value::String(s) => !s.is_empty() && s.len() <= MAX_ID_LEN,
        serde_json::Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::BadRequest,
            format!("`id` must be a non-empty string of at most {MAX_ID_LEN} bytes or an integer"),
        ))
    }
}

/// Stable error codes. Clients may switch on them; they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, an unknown field, a wrong type, a missing field, an invalid value.
    BadRequest,
    /// A message over the size limit.
    TooLarge,
    /// The prompt does not fit the model's context.
    TooLong,
    /// The queue (or the connection's share of it) is full; retry later.
    Busy,
    /// The request does not fit the resource budget.
    OverBudget,
    /// The deadline passed before the request could run.
    Deadline,
    /// The message expired (MQTT Message Expiry) before the request could run.
    Expired,
    /// The request must go to the cloud, which is off or unreachable.
    CloudUnavailable,
    /// The cloud failed; `cause` says why (`rate_limited`, `quota_exceeded`, `unauthorized`, `timeout`,
    /// `cut`, ...) and `retry_after_ms` when waiting helps.
    CloudError,
    /// `{"cmd":"result"}` for an id that is not deferred (or whose result passed its retention).
    NotFound,
    /// The daemon is stopping and takes no new work.
    ShuttingDown,
    /// A fault of the daemon; the message says more.
    Internal,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// The request's id, when known.
    pub id: Option<Id>,
    pub code: ErrorCode,
    pub message: String,
    /// When retrying may succeed, a hint of how long to wait.
    pub retry_after_ms: Option<u64>,
    /// For `cloud_error`: the cause, one word (see [`crate::cloud::Cause`]).
    pub cause: Option<&'static str>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            id: None,
            code,
            message: message.into(),
            retry_after_ms: None,
            cause: None,
        }
    }

    /// A `cloud_error` reply for a failed cloud request.
    pub fn cloud(e: &crate::cloud::CloudError) -> WireError {
        let code = match e.cause {
            crate::cloud::Cause::Deadline => ErrorCode::Deadline,
            _ => ErrorCode::CloudError,
        };
        WireError {
            id: None,
            code,
            message: e.message.clone(),
            retry_after_ms: e
                .retry_after
                .filter(|_| e.cause.retryable() || e.cause == crate::cloud::Cause::CircuitOpen)
                .map(|d| d.as_millis() as u64),
            cause: Some(e.cause.as_str()),
        }
    }

    pub fn with_id(mut self, id: &Id) -> WireError {
        self.id = Some(id.clone());
        self
    }
}

impl From<&EngineError> for WireError {
    fn from(e: &EngineError) -> WireError {
        let code = match e {
            EngineError::EmptyPrompt
            | EngineError::InvalidParam { .. }
            | EngineError::ChatTemplate(_)
            | EngineError::Tokenizer(_) => ErrorCode::BadRequest,
            EngineError::PromptTooLong { .. } => ErrorCode::TooLong,
            EngineError::Busy { .. } => ErrorCode::Busy,
            EngineError::DeadlineExceeded { .. } => ErrorCode::Deadline,
            EngineError::Expired { .. } => ErrorCode::Expired,
            EngineError::ShutDown => ErrorCode::ShuttingDown,
            EngineError::Load { .. } | EngineError::Inference(_) => ErrorCode::Internal,
        };
        let mut w = WireError::new(code, e.to_string());
        if code == ErrorCode::Busy {
            w.retry_after_ms = Some(1000);
        }
        w
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Timings of a finished request, in milliseconds from its acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Waiting for a slot.
    pub queue_ms: f64,
    /// Until the first token (queue included).
    pub ttft_ms: f64,
    /// Until the end.
    pub total_ms: f64,
    /// Decode speed after the first token.
    pub tokens_per_s: f64,
}

impl Timing {
    /// The timing of a request that did not queue (a cloud request): `ttft` and `total` from acceptance, the
    /// decode rate over the tokens after the first.
    pub fn measured(
        ttft: std::time::Duration,
        total: std::time::Duration,
        completion_tokens: usize,
    ) -> Timing {
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let decode = total.saturating_sub(ttft);
        let tokens_per_s = if completion_tokens < 2 || decode.is_zero() {
            0.0
        } else {
            ((completion_tokens - 1) as f64 / decode.as_secs_f64() * 10.0).round() / 10.0
        };
        Timing {
            queue_ms: 0.0,
            ttft_ms: ms(ttft),
            total_ms: ms(total),
            tokens_per_s,
        }
    }
}

/// Where a request ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Served {
    Local,
    Cloud,
}

/// The terminal reply of a successful request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub id: Id,
    /// The whole answer; only when the request did not stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub route: Served,
    /// Why it went there (`simple`, `complex`, `too_long_for_local`, `deadline`, `board_busy`, `private`,
    /// `requested`, `cloud_offline`).
    pub route_reason: String,
    /// Set when it was meant for the cloud and ran locally instead: the cloud's failure cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// A cloud answer served from the cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// Set when it was deferred and forwarded later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deferred: bool,
    pub model: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
}

/// The terminal reply of a failed request (or a reply to a message that could not be read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub id: Option<Id>,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl From<WireError> for ErrorReply {
    fn from(e: WireError) -> ErrorReply {
        ErrorReply {
            id: e.id,
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            cause: e.cause.map(str::to_string),
        }
    }
}

/// Everything bitnetd sends back, one JSON object each.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    Token {
        id: Id,
        text: String,
    },
    Done(Done),
    Error(ErrorReply),
    /// The request is stored and will be forwarded to the cloud when it is reachable (terminal for the
    /// request; its result comes later, see [`Command::Result`]). Also the answer to `{"cmd":"result"}` while
    /// it waits.
    Deferred {
        id: Id,
        /// Its place in the queue, 1 = next.
        position: usize,
    },
    Status(Box<crate::dispatch::Status>),
}

/// A terminal reply as stored for a deferred request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StoredReply {
    Done(Done),
    Error(ErrorReply),
}

impl From<StoredReply> for Reply {
    fn from(r: StoredReply) -> Reply {
        match r {
            StoredReply::Done(d) => Reply::Done(d),
            StoredReply::Error(e) => Reply::Error(e),
        }
    }
}

impl Reply {
    /// True for `done`, `error` and `deferred`: the last reply a request gets.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Reply::Done(_) | Reply::Error(_) | Reply::Deferred { .. }
        )
    }

    /// The reply as one line of JSON, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","id":null,"code":"internal","message":"encoding a reply: {e}"}}"#)
                .into_bytes()
        });
        v.push(b'\n');
        v
    }
}

impl From<WireError> for Reply {
    fn from(e: WireError) -> Reply {
        Reply::Error(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_str(s: &str) -> Result<Incoming, WireError> {
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
            assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(e.id, id, "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
    }

    #[test]
    fn engine_errors_map_to_stable_codes() {
        let code = |e: EngineError| WireError::from(&e).code;
        assert_eq!(
            code(EngineError::PromptTooLong {
                tokens: 9,
                context: 8
            }),
            ErrorCode::TooLong
        );
        assert_eq!(code(EngineError::Busy { capacity: 1 }), ErrorCode::Busy);
        assert_eq!(code(EngineError::EmptyPrompt), ErrorCode::BadRequest);
        assert_eq!(
            code(EngineError::DeadlineExceeded {
                waited: std::time::Duration::ZERO
            }),
            ErrorCode::Deadline
        );
        assert_eq!(
            code(EngineError::Inference("x".into())),
            ErrorCode::Internal
        );
        let s = serde_json::to_string(&ErrorCode::CloudUnavailable).unwrap();
        assert_eq!(s, "\"cloud_unavailable\"");
    }

    #[test]
    fn replies_serialize_to_the_documented_shape() {
        let t = Reply::Token {
            id: json!("a"),
            text: "hi".into(),
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"type":"token","id":"a","text":"hi"})
        );
        let e: Reply = WireError::new(ErrorCode::Busy, "full")
            .with_id(&json!(3))
            .into();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type":"error","id":3,"code":"busy","message":"full"})
        );
        assert!(e.is_terminal() && !t.is_terminal());
        assert!(t.to_line().ends_with(b"\n"));
    }
}
