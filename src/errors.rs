//! The one place where an internal error becomes a wire error: its code (`docs/protocol.md`), its message and
//! its retry hint. Every error that reaches a client passes through a `From` here: engine errors, cloud errors,
//! the deferred queue's, the router's and admission's refusals, parse errors, and the refusals of the daemon
//! itself ([`Refusal`]: a source's limits, shutdown, a request left unanswered). The table test at the end
//! lists each with the code it gets, and checks that it covers every code the protocol documents.

use std::time::Duration;

use crate::admission;
use crate::cloud::{Cause, CloudError};
use crate::deferred::QueueError;
use crate::engine::EngineError;
use crate::protocol::{ErrorCode, ParseError, WireError};
use crate::router::{self, CloudState};

/// Retry hint when a queue or a client's share of it is full.
pub const BUSY_RETRY: Duration = Duration::from_millis(1000);
/// Retry hint when the deferred queue is full: it empties only as fast as the cloud answers.
pub const DEFERRED_FULL_RETRY: Duration = Duration::from_secs(60);
/// Retry hint when a request's KV cache does not fit next to the work in flight.
pub const OVER_BUDGET_RETRY: Duration = Duration::from_millis(1000);

/// Refusals of the daemon itself, outside the engine, the cloud, the router and admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A socket line over `[socket] max_line_bytes`.
    LineTooLong {
        limit: usize,
    },
    /// An MQTT payload over `[mqtt] max_payload_bytes`.
    PayloadTooLarge {
        size: usize,
        limit: usize,
    },
    NotUtf8,
    /// `{"cmd":"result"}` without the id of the deferred request.
    ResultNeedsId,
    /// A request whose id (on its connection, or with its MQTT reply address) is in flight.
    DuplicateId,
    /// A client's share of the work in flight is full.
    ClientLimit {
        limit: usize,
        scope: Scope,
    },
    /// `deadline_ms: 0`.
    InvalidDeadline,
    ShuttingDown,
    /// `{"cmd":"result"}` for an id that is not deferred (or whose result passed its retention).
    NotDeferred,
    /// The engine dropped a job without its terminal event (its thread died).
    EngineStopped,
    /// An accepted request ended without a terminal reply (a panic or a dropped task).
    Unanswered,
    /// A deferred task waited longer than `[defer] max_age_secs`.
    DeferredExpired,
    /// A socket connection with nothing in flight sent nothing for `[socket] idle_timeout_secs`.
    IdleTimeout {
        secs: u64,
    },
    /// The client process already holds `[socket] max_connections_per_process` connections.
    ProcessLimit {
        limit: usize,
    },
    /// An MQTT client sent more than `[mqtt] client_requests_per_minute`; the next token comes in `wait`.
    ClientRate {
        per_minute: u32,
        wait: Duration,
    },
}

/// Whose share of the work a [`Refusal::ClientLimit`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One socket connection (`[socket] max_requests_per_connection`).
    Connection,
    /// All MQTT clients together (`[mqtt] max_in_flight`).
    Mqtt,
    /// A socket connection opened while every full one was taken: control messages only.
    StatusOnly,
    /// All HTTP clients together (`[http] max_in_flight`).
    Http,
}

fn wire(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl From<&Refusal> for WireError {
    fn from(r: &Refusal) -> WireError {
        use ErrorCode as C;
        match r {
            Refusal::LineTooLong { limit } => {
                wire(C::TooLarge, format!("line longer than {limit} bytes"))
            }
            Refusal::PayloadTooLarge { size, limit } => wire(
                C::TooLarge,
                format!("payload of {size} bytes is over the limit of {limit}"),
            ),
            Refusal::NotUtf8 => wire(C::BadRequest, "line is not UTF-8"),
            Refusal::ResultNeedsId => wire(
                C::BadRequest,
                "`{\"cmd\":\"result\"}` needs the `id` of the deferred request",
            ),
            Refusal::DuplicateId => wire(C::BadRequest, "a request with this id is in flight"),
            Refusal::ClientLimit { limit, scope } => wire(
                C::Busy,
                match scope {
                    Scope::Connection => {
                        format!("at most {limit} requests in flight per connection")
                    }
                    Scope::Mqtt => format!("at most {limit} MQTT requests in flight"),
                    Scope::Http => format!("at most {limit} HTTP requests in flight"),
                    Scope::StatusOnly => "every socket connection is taken ([socket] max_connections): this one \
                                          answers only status and result; retry on a new connection later"
                        .to_string(),
                },
            )
            .retry_after(ms(BUSY_RETRY)),
            Refusal::InvalidDeadline => {
                wire(C::BadRequest, "invalid deadline_ms: must be at least 1")
            }
            Refusal::ShuttingDown => wire(C::ShuttingDown, "bitnetd is shutting down"),
            Refusal::NotDeferred => wire(
                C::NotFound,
                "no deferred request with this id (or its result passed the retention limit)",
            ),
            Refusal::EngineStopped => wire(C::Internal, "the engine stopped"),
            Refusal::Unanswered => wire(
                C::Internal,
                "the request ended without an answer (a fault of bitnetd; the journal says more)",
            ),
            Refusal::IdleTimeout { secs } => wire(
                C::IdleTimeout,
                format!("nothing sent and nothing in flight for {secs} s: the connection is closed"),
            ),
            Refusal::ProcessLimit { limit } => wire(
                C::Busy,
                format!(
                    "this process already has {limit} connections open, the most one process may have \
                     ([socket] max_connections_per_process)"
                ),
            )
            .retry_after(ms(BUSY_RETRY)),
            Refusal::ClientRate { per_minute, wait } => wire(
                C::Busy,
                format!("at most {per_minute} requests per minute from one client ([mqtt] client_requests_per_minute)"),
            )
            .retry_after(ms(*wait).max(1)),
            Refusal::DeferredExpired => wire(
                C::Expired,
                "the cloud stayed unreachable for longer than [defer] max_age_secs",
            ),
        }
    }
}

impl From<Refusal> for WireError {
    fn from(r: Refusal) -> WireError {
        WireError::from(&r)
    }
}

impl From<ParseError> for WireError {
    fn from(e: ParseError) -> WireError {
        WireError {
            id: e.id,
            ..wire(ErrorCode::BadRequest, e.message)
        }
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
        let w = wire(code, e.to_string());
        match code {
            ErrorCode::Busy => w.retry_after(ms(BUSY_RETRY)),
            _ => w,
        }
    }
}

/// A failed cloud request: `cloud_error` with its cause (`deadline` when the request's deadline passed), and
/// the server's or the breaker's retry hint when waiting helps.
impl From<&CloudError> for WireError {
    fn from(e: &CloudError) -> WireError {
        let code = match e.cause {
            Cause::Deadline => ErrorCode::Deadline,
            _ => ErrorCode::CloudError,
        };
        let w = wire(code, e.message.clone()).with_cause(e.cause.as_str());
        match e
            .retry_after
            .filter(|_| e.cause.retryable() || e.cause == Cause::CircuitOpen)
        {
            Some(d) => w.retry_after(ms(d)),
            None => w,
        }
    }
}

impl From<&QueueError> for WireError {
    fn from(e: &QueueError) -> WireError {
        match e {
            QueueError::Full { .. } => {
                wire(ErrorCode::Busy, e.to_string()).retry_after(ms(DEFERRED_FULL_RETRY))
            }
            QueueError::Duplicate => wire(ErrorCode::BadRequest, e.to_string()),
            // The path and the OS error are for the journal (the caller logs them), not for clients.
            QueueError::Io { .. } => wire(
                ErrorCode::Internal,
                "the deferred queue could not be written",
            ),
        }
    }
}

impl From<&router::Refusal> for WireError {
    fn from(r: &router::Refusal) -> WireError {
        match r {
            router::Refusal::CloudOffline => wire(
                ErrorCode::CloudUnavailable,
                "the cloud is unreachable; send `defer: true` to have it forwarded later",
            ),
            router::Refusal::NoCloud => wire(
                ErrorCode::CloudUnavailable,
                "no cloud is configured on this board (no [cloud] API key)",
            ),
            router::Refusal::TooLongForBoard {
                prompt_tokens,
                context,
                cloud,
            } => wire(
                ErrorCode::TooLong,
                format!(
                    "the prompt is {prompt_tokens} tokens and the local model's context is {context}; the cloud, \
                     which could take it, is {}",
                    if *cloud == CloudState::Disabled { "not configured" } else { "offline" }
                ),
            ),
        }
    }
}

impl From<&admission::Refusal> for WireError {
    fn from(r: &admission::Refusal) -> WireError {
        let mib = |b: u64| b >> 20;
        let (w, retry) = match *r {
            admission::Refusal::TooHot {
                temperature_c,
                retry_after_ms,
            } => {
                let t = temperature_c.map_or(String::new(), |t| format!(" ({t:.1} °C)"));
                let msg = format!("the board is too hot{t}: local inference is paused");
                (wire(ErrorCode::OverBudget, msg), retry_after_ms)
            }
            admission::Refusal::BatteryCritical {
                battery_percent,
                retry_after_ms,
            } => {
                let p = battery_percent.map_or(String::new(), |p| format!(" ({p:.0}%)"));
                let msg = format!("the board runs on a critical battery{p}: no local work until it charges");
                (wire(ErrorCode::OverBudget, msg), retry_after_ms)
            }
            admission::Refusal::ShortOfMemory { retry_after_ms } => (
                wire(
                    ErrorCode::OverBudget,
                    "the board is short of memory: no new local work for now",
                ),
                retry_after_ms,
            ),
            admission::Refusal::DeadlineTooShort {
                tokens,
                needed,
                speed,
                left,
            } => (
                wire(
                    ErrorCode::Deadline,
                    format!(
                        "{tokens} tokens need about {} ms here (first token {} ms, {:.1} tokens/s) and the deadline \
                         leaves {} ms: lower max_tokens, allow more time, or send on_deadline \"shorten\"",
                        needed.as_millis(),
                        speed.ttft.as_millis(),
                        speed.tokens_per_s,
                        left.as_millis()
                    ),
                ),
                None,
            ),
            admission::Refusal::KvOverBudget {
                tokens,
                bytes,
                needed,
                budget,
                retryable,
            } => (
                wire(
                    ErrorCode::OverBudget,
                    format!(
                        "{tokens} tokens need {} MiB of KV cache; with the work in flight that is {} MiB of a {} MiB \
                         memory budget: lower max_tokens or retry later",
                        mib(bytes).max(1),
                        mib(needed),
                        mib(budget)
                    ),
                ),
                retryable.then_some(ms(OVER_BUDGET_RETRY)),
            ),
        };
        match retry {
            Some(ms) => w.retry_after(ms),
            None => w,
        }
    }
}

#[cfg(test)]
mod tests;
