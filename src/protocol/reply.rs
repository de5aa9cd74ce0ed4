//! Replies: what bitnetd sends back, the stable error codes, and error replies.

use serde::{Deserialize, Serialize};

use super::{Id, Status};
use crate::engine::FinishReason;

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
    /// A socket connection stayed silent with nothing in flight for `[socket] idle_timeout_secs`; it is closed
    /// after this reply.
    IdleTimeout,
}

impl ErrorCode {
    /// Every code, in the order of `docs/protocol.md`'s table.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::TooLong,
        ErrorCode::Busy,
        ErrorCode::OverBudget,
        ErrorCode::Deadline,
        ErrorCode::Expired,
        ErrorCode::CloudUnavailable,
        ErrorCode::CloudError,
        ErrorCode::NotFound,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::IdleTimeout,
    ];

    /// The wire name (`bad_request`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooLong => "too_long",
            ErrorCode::Busy => "busy",
            ErrorCode::OverBudget => "over_budget",
            ErrorCode::Deadline => "deadline",
            ErrorCode::Expired => "expired",
            ErrorCode::CloudUnavailable => "cloud_unavailable",
            ErrorCode::CloudError => "cloud_error",
            ErrorCode::NotFound => "not_found",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::IdleTimeout => "idle_timeout",
        }
    }
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
    /// For `cloud_error`: the cause, one word (`rate_limited`, `timeout`, ...).
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

    /// With the retry hint `ms`.
    pub fn retry_after(mut self, ms: u64) -> WireError {
        self.retry_after_ms = Some(ms);
        self
    }

    /// With the cause (for `cloud_error`).
    pub fn with_cause(mut self, cause: &'static str) -> WireError {
        self.cause = Some(cause);
        self
    }

    pub fn with_id(mut self, id: &Id) -> WireError {
        self.id = Some(id.clone());
        self
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Every generated token, reasoning included.
    pub completion_tokens: usize,
    /// Of `completion_tokens`, those a thinking model spent reasoning (when it reports them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<usize>,
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

impl Served {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Local => "local",
            Served::Cloud => "cloud",
        }
    }
}

/// The terminal reply of a successful request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub id: Id,
    /// The whole answer; only when the request did not stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A thinking model's whole reasoning; only when the request did not stream (streamed, it came as
    /// `reasoning` replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// `task: "validate"`: the answer's JSON object (`confidence` in [0, 1], ...), see `crate::tasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    Token {
        id: Id,
        text: String,
    },
    /// A piece of a thinking model's reasoning, streamed before the answer's tokens and never part of them.
    Reasoning {
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
    Status(Box<Status>),
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
        for code in ErrorCode::ALL {
            let s = serde_json::to_string(&code).unwrap();
            assert_eq!(s, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn all_lists_every_code_once_in_order() {
        use ErrorCode as C;
        // Exhaustive: a new code does not compile until it gets its place here (and then in `ALL`).
        let place = |c: ErrorCode| match c {
            C::BadRequest => 0,
            C::TooLarge => 1,
            C::TooLong => 2,
            C::Busy => 3,
            C::OverBudget => 4,
            C::Deadline => 5,
            C::Expired => 6,
            C::CloudUnavailable => 7,
            C::CloudError => 8,
            C::NotFound => 9,
            C::ShuttingDown => 10,
            C::Internal => 11,
            C::IdleTimeout => 12,
        };
        let places = 13;
        assert_eq!(ErrorCode::ALL.len(), places);
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(place(*c), i, "{c:?}");
        }
    }

    #[test]
    fn replies_read_back_as_the_same_typed_reply() {
        let done = Reply::Done(Done {
            id: json!(7),
            text: Some("hi".into()),
            reasoning: Some("think".into()),
            result: Some(json!({"confidence": 0.5})),
            route: Served::Local,
            route_reason: "simple".into(),
            fallback: None,
            cached: false,
            deferred: false,
            model: "m".into(),
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 2,
                completion_tokens: 1,
                reasoning_tokens: Some(0),
            },
            timing: Timing::measured(
                std::time::Duration::from_millis(5),
                std::time::Duration::from_millis(9),
                1,
            ),
        });
        let error: Reply = WireError::new(ErrorCode::CloudError, "x")
            .with_cause("timeout")
            .retry_after(5)
            .into();
        let deferred = Reply::Deferred {
            id: json!("d"),
            position: 2,
        };
        let reasoning = Reply::Reasoning {
            id: json!("r"),
            text: "so".into(),
        };
        assert_eq!(
            serde_json::to_value(&reasoning).unwrap(),
            json!({"type":"reasoning","id":"r","text":"so"})
        );
        for r in [done, error, deferred, reasoning] {
            let back: Reply = serde_json::from_slice(&r.to_line()).unwrap();
            assert_eq!(back, r);
        }
    }
}
