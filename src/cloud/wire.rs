//! The OpenAI-compatible wire format as Moonshot speaks it: the request body, stream chunks (with usage in
//! either of its two places), error bodies, and the mapping of HTTP failures to [`Cause`]s. Pure; no I/O.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Cause, CloudError};
use crate::engine::Message;

/// `POST /chat/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatBody<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub stop: &'a [String],
    /// `{"type": "enabled" | "disabled"}`, for models that take it (see `models::Traits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Switch>,
    /// `{"type": "json_object"}`: JSON mode, for answers that must parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Format>,
    /// Asks for usage in a final chunk (Moonshot may put it in `choices[0]` instead; both are read).
    pub stream_options: StreamOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// `{"type": "enabled"}` or `{"type": "disabled"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Switch {
    Enabled,
    Disabled,
}

/// `{"type": "json_object"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Format {
    JsonObject,
}

/// Token counts as the API reports them. `completion_tokens` includes the reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(from = "RawUsage")]
pub struct ApiUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Tokens of reasoning (`completion_tokens_details.reasoning_tokens`, or `reasoning_tokens`), when reported.
    pub reasoning_tokens: Option<usize>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    completion_tokens: usize,
    #[serde(default)]
    reasoning_tokens: Option<usize>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    reasoning_tokens: Option<usize>,
}

impl From<RawUsage> for ApiUsage {
    fn from(u: RawUsage) -> ApiUsage {
        ApiUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            reasoning_tokens: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .or(u.reasoning_tokens),
        }
    }
}

/// One `data:` payload of the stream.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<ApiUsage>,
    /// Some proxies report a failure inside the stream.
    pub error: Option<ApiErrorDetail>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub delta: Delta,
    pub finish_reason: Option<String>,
    /// Moonshot's placement of usage on the last chunk.
    pub usage: Option<ApiUsage>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Delta {
    pub content: Option<String>,
    /// A thinking model's reasoning, streamed before its answer.
    pub reasoning_content: Option<String>,
}

/// What one stream line means.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// Text to relay (may be empty).
    Text(String),
    /// Reasoning to relay apart from the answer (may be empty).
    Reasoning(String),
    /// End of the answer with a finish reason, and usage when this chunk carries it.
    Finish {
        reason: String,
        usage: Option<ApiUsage>,
    },
    /// Usage alone (the final chunk with empty `choices`).
    Usage(ApiUsage),
    /// `data: [DONE]`.
    Done,
}

/// Reads one event's data. A chunk can hold text and a finish (and usage) at once, hence the list.
pub fn parse_event(data: &str) -> Result<Vec<StreamItem>, CloudError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(vec![StreamItem::Done]);
    }
    let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
        CloudError::new(
            Cause::Protocol,
            format!("unreadable stream chunk ({e}) at {:?}", clip(data, 80)),
        )
    })?;
    if let Some(err) = chunk.error {
        return Err(CloudError::new(
            classify_type(err.kind.as_deref()).unwrap_or(Cause::ServerError),
            format!("error inside the stream: {}", err.describe()),
        ));
    }
    let mut items = Vec::new();
    let mut usage = chunk.usage;
    for c in chunk.choices.into_iter().take(1) {
        if let Some(t) = c.delta.reasoning_content {
            items.push(StreamItem::Reasoning(t));
        }
        if let Some(t) = c.delta.content {
            items.push(StreamItem::Text(t));
        }
        usage = usage.or(c.usage);
        if let Some(reason) = c.finish_reason {
            items.push(StreamItem::Finish {
                reason,
                usage: usage.take(),
            });
        }
    }
    if let Some(u) = usage {
        items.push(StreamItem::Usage(u));
    }
    Ok(items)
}

/// `{"error": {"type", "message"}}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiErrorDetail,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ApiErrorDetail {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: String,
}

impl ApiErrorDetail {
    fn describe(&self) -> String {
        match &self.kind {
            Some(k) => format!("{k}: {}", clip(&self.message, 300)),
            None => clip(&self.message, 300).to_string(),
        }
    }
}

fn classify_type(kind: Option<&str>) -> Option<Cause> {
    Some(match kind? {
        "exceeded_current_quota_error" => Cause::QuotaExceeded,
        "rate_limit_reached_error" => Cause::RateLimited,
        "engine_overloaded_error" => Cause::Overloaded,
        "content_filter" | "invalid_request_error" => Cause::BadRequest,
        "invalid_authentication_error" => Cause::Unauthorized,
        "permission_denied_error" => Cause::Forbidden,
        "resource_not_found_error" => Cause::NotFound,
        _ => return None,
    })
}

/// Maps a failed HTTP response (status, body, `Retry-After`) to an error. A 429 is read by its `error.type`:
/// quota exhaustion is never retried, overload and rate limits are.
pub fn http_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> CloudError {
    let detail = serde_json::from_slice::<ApiErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| ApiErrorDetail {
            kind: None,
            message: clip(&String::from_utf8_lossy(body), 200).to_string(),
        });
    let by_status = match status {
        400 => Cause::BadRequest,
        401 => Cause::Unauthorized,
        403 => Cause::Forbidden,
        404 => Cause::NotFound,
        429 => Cause::RateLimited,
        500..=599 => Cause::ServerError,
        _ => Cause::Http,
    };
    let cause = match (status, classify_type(detail.kind.as_deref())) {
        // The type refines a 429; other statuses keep their meaning whatever the type says.
        (429, Some(c @ (Cause::QuotaExceeded | Cause::RateLimited | Cause::Overloaded))) => c,
        _ => by_status,
    };
    let what = match cause {
        Cause::QuotaExceeded => "the Kimi account is out of quota (top it up; not retried)",
        Cause::Unauthorized => "the Kimi API key was refused (check the key; not retried)",
        Cause::Forbidden => "the Kimi API key may not do this (not retried)",
        Cause::NotFound => "not found at Kimi: check [cloud] model and base_url (not retried)",
        Cause::BadRequest => "Kimi refused the request as invalid (not retried)",
        Cause::RateLimited => "Kimi's rate limit was reached",
        Cause::Overloaded => "Kimi is overloaded",
        Cause::ServerError => "Kimi had a server error",
        _ => "Kimi answered with an error",
    };
    CloudError {
        cause,
        message: format!("{what}: HTTP {status}, {}", detail.describe()),
        retry_after,
    }
}

/// Reads `Retry-After`: seconds, or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `GET /models` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelList {
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    pub id: String,
}

/// At most `n` bytes of `s`, cut at a character boundary.
pub fn clip(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_and_done() {
        let items = parse_event(r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#).unwrap();
        assert_eq!(items, vec![StreamItem::Text("Hel".into())]);
        assert_eq!(parse_event(" [DONE]").unwrap(), vec![StreamItem::Done]);
        // The role-only first chunk carries nothing to relay.
        assert!(
            parse_event(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn usage_inside_the_last_choice_is_read() {
        let items = parse_event(
            r#"{"choices":[{"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}]}"#,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![StreamItem::Finish {
                reason: "stop".into(),
                usage: Some(ApiUsage {
                    prompt_tokens: 9,
                    completion_tokens: 4,
                    reasoning_tokens: None,
                })
            }]
        );
    }

    #[test]
    fn usage_in_a_final_chunk_without_choices_is_read() {
        let items =
            parse_event(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#)
                .unwrap();
        assert_eq!(
            items,
            vec![StreamItem::Usage(ApiUsage {
                prompt_tokens: 3,
                completion_tokens: 2,
                reasoning_tokens: None,
            })]
        );
    }

    #[test]
    fn a_malformed_chunk_is_a_protocol_error() {
        let e = parse_event(r#"{"choices":[{"delta":"#).unwrap_err();
        assert_eq!(e.cause, Cause::Protocol);
    }

    #[test]
    fn an_error_inside_the_stream_is_classified() {
        let e = parse_event(r#"{"error":{"type":"engine_overloaded_error","message":"busy"}}"#)
            .unwrap_err();
        assert_eq!(e.cause, Cause::Overloaded);
    }

    #[test]
    fn a_429_is_read_by_its_type() {
        let body = |t: &str| format!(r#"{{"error":{{"type":"{t}","message":"m"}}}}"#);
        let c = |t: &str| http_error(429, body(t).as_bytes(), None).cause;
        assert_eq!(c("exceeded_current_quota_error"), Cause::QuotaExceeded);
        assert_eq!(c("rate_limit_reached_error"), Cause::RateLimited);
        assert_eq!(c("engine_overloaded_error"), Cause::Overloaded);
        assert_eq!(c("something_new"), Cause::RateLimited);
        assert!(!Cause::QuotaExceeded.retryable());
        assert!(Cause::RateLimited.retryable() && Cause::Overloaded.retryable());
    }

    #[test]
    fn statuses_map_to_causes_that_say_what_to_do() {
        for (status, cause, retry) in [
            (400, Cause::BadRequest, false),
            (401, Cause::Unauthorized, false),
            (403, Cause::Forbidden, false),
            (404, Cause::NotFound, false),
            (500, Cause::ServerError, true),
            (502, Cause::ServerError, true),
            (503, Cause::ServerError, true),
            (504, Cause::ServerError, true),
        ] {
            let e = http_error(status, b"<html>oops</html>", None);
            assert_eq!(e.cause, cause, "{status}");
            assert_eq!(e.cause.retryable(), retry, "{status}");
            assert!(e.message.contains(&status.to_string()));
        }
        let e = http_error(
            401,
            br#"{"error":{"type":"invalid_authentication_error","message":"Invalid Authentication"}}"#,
            None,
        );
        assert!(e.message.contains("API key was refused"), "{}", e.message);
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn the_body_omits_what_is_not_set() {
        let msgs = vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        let b = ChatBody {
            model: "kimi-k2",
            messages: &msgs,
            stream: true,
            max_tokens: Some(5),
            temperature: None,
            top_p: None,
            stop: &[],
            thinking: None,
            response_format: None,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model":"kimi-k2","messages":[{"role":"user","content":"hi"}],"stream":true,
                "max_tokens":5,"stream_options":{"include_usage":true}})
        );
        let b = ChatBody {
            thinking: Some(Switch::Disabled),
            response_format: Some(Format::JsonObject),
            ..b
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["thinking"], serde_json::json!({"type": "disabled"}));
        assert_eq!(
            v["response_format"],
            serde_json::json!({"type": "json_object"})
        );
    }

    #[test]
    fn reasoning_deltas_are_their_own_items() {
        let items = parse_event(
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"Let me think."}}]}"#,
        )
        .unwrap();
        assert_eq!(items, vec![StreamItem::Reasoning("Let me think.".into())]);
    }

    #[test]
    fn reasoning_tokens_are_read_from_either_place() {
        let u: ApiUsage = serde_json::from_str(
            r#"{"prompt_tokens":5,"completion_tokens":40,"completion_tokens_details":{"reasoning_tokens":31}}"#,
        )
        .unwrap();
        assert_eq!(u.reasoning_tokens, Some(31));
        let u: ApiUsage = serde_json::from_str(
            r#"{"prompt_tokens":5,"completion_tokens":40,"reasoning_tokens":7}"#,
        )
        .unwrap();
        assert_eq!(u.reasoning_tokens, Some(7));
        let u: ApiUsage = serde_json::from_str(r#"{"prompt_tokens":5}"#).unwrap();
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (0, None));
    }
}
