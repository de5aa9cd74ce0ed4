//! The cloud route: a client for Kimi (Moonshot AI's OpenAI-compatible Chat Completions API) and what keeps it
//! honest on a board with a flaky uplink.
//!
//! - [`key`]: where the API key comes from; it never appears in logs, errors or config dumps.
//! - [`models`]: which model requests go to (`[cloud] model = "auto"`), and what each model accepts (pure).
//! - [`wire`]: the request body, stream chunks and error bodies, and their classification (pure).
//! - [`breaker`], [`limiter`]: the circuit breaker and the requests-per-minute limiter (pure, clock passed in).
//! - [`cache`]: answers to identical deterministic requests.
//! - [`client`]: [`KimiClient`], streaming with retries, backoff, limits and timeouts.
//! - [`check`]: `bitnetd check-config`'s probe of the key and the model.
//! - [`connectivity`]: whether the cloud is reachable, from probes and from the client's own results.

pub mod breaker;
pub mod cache;
pub mod check;
pub mod client;
pub mod connectivity;
pub mod key;
pub mod limiter;
pub mod models;
pub mod wire;

use std::time::Duration;

use serde::Serialize;

pub use client::{CloudAnswer, CloudFailure, CloudRequest, KimiClient, Piece};
pub use connectivity::Connectivity;
pub use key::ApiKey;

/// Why a cloud request failed, in one stable word (the `cause` of a `cloud_error` reply, and a status
/// counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// HTTP 429 `rate_limit_reached_error`, or our own requests-per-minute limit.
    RateLimited,
    /// HTTP 429 `engine_overloaded_error`.
    Overloaded,
    /// HTTP 429 `exceeded_current_quota_error`: the account is out of credit.
    QuotaExceeded,
    /// HTTP 400 (including `content_filter`).
    BadRequest,
    /// HTTP 401: the API key is wrong.
    Unauthorized,
    /// HTTP 403.
    Forbidden,
    /// HTTP 404, usually an unknown model id.
    NotFound,
    /// HTTP 5xx.
    ServerError,
    /// Another HTTP status.
    Http,
    /// No connection (DNS, TCP, TLS).
    Connect,
    /// No answer, or no bytes for too long.
    Timeout,
    /// The stream ended before `data: [DONE]`.
    Cut,
    /// A stream line or body that is not what the API sends.
    Protocol,
    /// The circuit breaker is open after repeated failures.
    CircuitOpen,
    /// The request's deadline passed.
    Deadline,
    /// The requester went away.
    Cancelled,
}

impl Cause {
    /// The wire name (`rate_limited`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::RateLimited => "rate_limited",
            Cause::Overloaded => "overloaded",
            Cause::QuotaExceeded => "quota_exceeded",
            Cause::BadRequest => "bad_request",
            Cause::Unauthorized => "unauthorized",
            Cause::Forbidden => "forbidden",
            Cause::NotFound => "not_found",
            Cause::ServerError => "server_error",
            Cause::Http => "http",
            Cause::Connect => "connect",
            Cause::Timeout => "timeout",
            Cause::Cut => "cut",
            Cause::Protocol => "protocol",
            Cause::CircuitOpen => "circuit_open",
            Cause::Deadline => "deadline",
            Cause::Cancelled => "cancelled",
        }
    }

    /// Worth another attempt: the same request may succeed later (429 overload or rate limit, 5xx, network).
    /// Quota, 4xx and protocol errors are never retried.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Cause::RateLimited
                | Cause::Overloaded
                | Cause::ServerError
                | Cause::Connect
                | Cause::Timeout
                | Cause::Cut
        )
    }

    /// Says the cloud (or the way to it) is unwell, as opposed to this request or this account: these count
    /// towards the circuit breaker and the connectivity monitor.
    pub fn is_outage(self) -> bool {
        matches!(
            self,
            Cause::Overloaded | Cause::ServerError | Cause::Connect | Cause::Timeout | Cause::Cut
        )
    }
}

/// A failed cloud request. The message never contains the API key or the prompt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct CloudError {
    pub cause: Cause,
    pub message: String,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl CloudError {
    pub fn new(cause: Cause, message: impl Into<String>) -> CloudError {
        CloudError {
            cause,
            message: message.into(),
            retry_after: None,
        }
    }
}
