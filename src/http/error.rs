//! bitnetd's wire errors as HTTP: one table from error code to status, OpenAI's error object as the body, and
//! `Retry-After` wherever waiting helps.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::openai::BadParam;
use crate::protocol::{ErrorCode, ErrorReply};

/// The HTTP status and OpenAI error `type` of a bitnetd error code.
pub fn status_of(code: ErrorCode) -> (StatusCode, &'static str) {
    use ErrorCode as C;
    match code {
        C::BadRequest | C::TooLong => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        C::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
        C::Busy => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        C::OverBudget | C::CloudUnavailable | C::ShuttingDown => {
            (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
        }
        C::Deadline | C::Expired => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        C::CloudError => (StatusCode::BAD_GATEWAY, "upstream_error"),
        C::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
        C::IdleTimeout => (StatusCode::REQUEST_TIMEOUT, "timeout"),
        C::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

/// An error response: status, body `{"error": {message, type, param, code}}` and, for 429 and 503 (and any
/// error with a retry hint), `Retry-After` in whole seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    pub status: StatusCode,
    pub kind: &'static str,
    /// bitnetd's code (`busy`, ...) or an HTTP-only one (`unauthorized`).
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// bitnetd's `cause` of a cloud error.
    pub cause: Option<String>,
    pub retry_after_ms: Option<u64>,
}

impl HttpError {
    /// The HTTP form of an error reply.
    pub fn from_reply(e: &ErrorReply) -> Box<HttpError> {
        let (status, kind) = status_of(e.code);
        let retry = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Some(e.retry_after_ms.unwrap_or(1000))
            }
            _ => e.retry_after_ms,
        };
        Box::new(HttpError {
            status,
            kind,
            code: e.code.as_str().into(),
            message: e.message.clone(),
            param: None,
            cause: e.cause.clone(),
            retry_after_ms: retry,
        })
    }

    /// 400 for a parameter the translation refused.
    pub fn bad_param(e: BadParam) -> Box<HttpError> {
        Box::new(HttpError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: ErrorCode::BadRequest.as_str().into(),
            message: e.message,
            param: e.param,
            cause: None,
            retry_after_ms: None,
        })
    }

    /// An error only HTTP has (401, 404 for a path, 405, 413 before reading, 415).
    pub fn http(status: StatusCode, code: &str, message: impl Into<String>) -> Box<HttpError> {
        Box::new(HttpError {
            status,
            kind: if status == StatusCode::UNAUTHORIZED {
                "authentication_error"
            } else {
                "invalid_request_error"
            },
            code: code.into(),
            message: message.into(),
            param: None,
            cause: None,
            retry_after_ms: None,
        })
    }

    /// The body's JSON (also what a stream sends when it fails after its first event).
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if let Some(c) = &self.cause {
            error["cause"] = json!(c);
        }
        if let Some(ms) = self.retry_after_ms {
            error["retry_after_ms"] = json!(ms);
        }
        json!({ "error": error })
    }
}

/// What handlers return: boxed, since an error is the rare path and the box keeps `Result` small.
pub type HttpResult<T> = Result<T, Box<HttpError>>;

impl IntoResponse for Box<HttpError> {
    fn into_response(self) -> Response {
        (*self).into_response()
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (self.status, super::json_body(&self.body())).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::WireError;

    #[test]
    fn every_code_has_its_status() {
        let want = |c: ErrorCode| match c {
            ErrorCode::BadRequest | ErrorCode::TooLong => 400,
            ErrorCode::TooLarge => 413,
            ErrorCode::Busy => 429,
            ErrorCode::OverBudget | ErrorCode::CloudUnavailable | ErrorCode::ShuttingDown => 503,
            ErrorCode::Deadline | ErrorCode::Expired => 504,
            ErrorCode::CloudError => 502,
            ErrorCode::NotFound => 404,
            ErrorCode::IdleTimeout => 408,
            ErrorCode::Internal => 500,
        };
        for c in ErrorCode::ALL {
            assert_eq!(status_of(c).0.as_u16(), want(c), "{c:?}");
        }
    }

    #[test]
    fn busy_and_unavailable_carry_retry_after() {
        let busy: ErrorReply = WireError::new(ErrorCode::Busy, "full")
            .retry_after(1500)
            .into();
        let r = HttpError::from_reply(&busy).into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let down: ErrorReply = WireError::new(ErrorCode::ShuttingDown, "bye").into();
        let r = HttpError::from_reply(&down).into_response();
        assert_eq!(
            (r.status().as_u16(), &r.headers()[header::RETRY_AFTER]),
            (503, &HeaderValue::from_static("1"))
        );
        let cloud: ErrorReply = WireError::new(ErrorCode::CloudError, "429 from Kimi")
            .with_cause("rate_limited")
            .retry_after(30_000)
            .into();
        let e = HttpError::from_reply(&cloud);
        assert_eq!(e.status, 502);
        assert_eq!(e.body()["error"]["cause"], "rate_limited");
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "30");
        let bad: ErrorReply = WireError::new(ErrorCode::BadRequest, "x").into();
        assert!(HttpError::from_reply(&bad)
            .into_response()
            .headers()
            .get(header::RETRY_AFTER)
            .is_none());
    }
}
