//! OpenAI request bodies as bitnetd requests: a pure translation, field by field, so that every refusal names
//! the parameter at fault (`param` of the OpenAI error object). What the result means is then decided by
//! [`crate::protocol::parse_value`] and the dispatcher, as for every other source.
//!
//! Accepted: the parameters bitnetd honours (`max_tokens`/`max_completion_tokens`, `temperature`, `top_p`,
//! `stop`, `seed`, `n = 1`, `stream`, `stream_options.include_usage`), bitnetd's own fields (`route`,
//! `private`, `deadline_ms`, `defer`, `thinking`, `top_k`, `repetition_penalty`, `context`), parameters that do
//! not change an answer (`model`, `user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`), and
//! features bitnetd lacks when they are off (`frequency_penalty: 0`, `logprobs: false`, `tools: []`, ...).
//! Anything else is refused, as OpenAI refuses an argument it does not know.

use serde_json::{Map, Value};

/// Which endpoint a body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
}

impl Kind {
    /// The prefix of the ids bitnetd gives requests of this kind.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
        }
    }
}

/// A body that cannot be served: OpenAI's `invalid_request_error`, with the parameter when one is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadParam {
    pub param: Option<String>,
    pub message: String,
}

fn bad(param: &str, message: impl Into<String>) -> BadParam {
    BadParam {
        param: Some(param.to_string()),
        message: message.into(),
    }
}

/// A body, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// The bitnetd request object (for [`crate::protocol::parse_value`]), with `id` and `stream` set.
    pub request: Value,
    /// The client asked for server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// Parameters that do not change an answer: accepted and ignored.
const IGNORED: [&str; 7] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

/// The models a request may name (`model`), as `/v1/models` lists them.
#[derive(Debug, Clone, Default)]
pub struct Models {
    /// The local model's name: naming it keeps the request on the board (`route: "local"`).
    pub local: String,
    /// The cloud model, when the cloud route is on: naming it sends the request there (`route: "cloud"`).
    pub cloud: Option<String>,
}

/// bitnetd's own fields, passed through unchanged (the request parser checks them).
const OWN: [&str; 8] = [
    "route",
    "private",
    "deadline_ms",
    "defer",
    "thinking",
    "top_k",
    "repetition_penalty",
    "context",
];

/// Translates a body of `kind` into a request with `id`. `model` picks the route when it names one of
/// `models` (and `route` does not say otherwise); any other name leaves the choice to bitnetd's router.
pub fn translate(
    kind: Kind,
    body: &[u8],
    id: &str,
    models: &Models,
) -> Result<Translated, BadParam> {
    let value: Value = serde_json::from_slice(body).map_err(|e| BadParam {
        param: None,
        message: format!("the body is not valid JSON: {e}"),
    })?;
    let Value::Object(body) = value else {
        return Err(BadParam {
            param: None,
            message: "the body must be a JSON object".into(),
        });
    };
    let mut out = Map::new();
    out.insert("id".into(), Value::from(id));
    let (mut stream, mut include_usage) = (false, false);
    let mut max_tokens: Option<(&str, u64)> = None;
    for (key, v) in &body {
        let k = key.as_str();
        match k {
            // A field sent as null means its default, whatever it is.
            _ if v.is_null() => {}
            "model" => {
                let named = v
                    .as_str()
                    .ok_or_else(|| bad(k, "`model` must be a string"))?;
                let route = if named == models.local {
                    Some("local")
                } else if models.cloud.as_deref() == Some(named) {
                    Some("cloud")
                } else {
                    None
                };
                if let (Some(r), false) = (route, body.contains_key("route")) {
                    out.insert("route".into(), Value::from(r));
                }
            }
            "reasoning_effort" => {
                let effort = v
                    .as_str()
                    .ok_or_else(|| bad(k, "`reasoning_effort` must be a string"))?;
                if matches!(effort, "none" | "minimal") && !body.contains_key("thinking") {
                    out.insert("thinking".into(), Value::Bool(false));
                }
            }
            "modalities" => {
                if v.as_array()
                    .is_none_or(|m| m.iter().any(|x| x.as_str() != Some("text")))
                {
                    return Err(bad(k, "only `[\"text\"]` is supported"));
                }
            }
            "messages" if kind == Kind::Chat => {
                out.insert("messages".into(), messages(v)?);
            }
            "prompt" if kind == Kind::Completion => {
                out.insert("prompt".into(), Value::from(prompt(v)?));
            }
            "max_tokens" | "max_completion_tokens" => {
                if v.is_null() {
                    continue;
                }
                let n = v
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad(k, format!("`{k}` must be an integer of at least 1")))?;
                if let Some((other, m)) = max_tokens.filter(|(_, m)| *m != n) {
                    return Err(bad(
                        k,
                        format!("`{k}` ({n}) and `{other}` ({m}) disagree; give one"),
                    ));
                }
                max_tokens = Some((k, n));
            }
            // Above OpenAI's 2 is allowed: a higher temperature is still a temperature.
            "temperature" => number(&mut out, k, v, 0.0, f64::INFINITY)?,
            "top_p" => number(&mut out, k, v, 0.0, 1.0)?,
            "seed" => {
                let seed = v
                    .as_u64()
                    .ok_or_else(|| bad(k, "`seed` must be an integer of at least 0"))?;
                out.insert("seed".into(), Value::from(seed));
            }
            "stop" => {
                if let Some(s) = stop(v)? {
                    out.insert("stop".into(), s);
                }
            }
            "n" | "best_of" => {
                if !(v.is_null() || v.as_u64() == Some(1)) {
                    return Err(bad(
                        k,
                        format!("`{k}` must be 1: bitnetd generates one choice"),
                    ));
                }
            }
            "stream" => {
                stream = match v {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    _ => return Err(bad(k, "`stream` must be true or false")),
                }
            }
            "stream_options" => include_usage = stream_options(v)?,
            "frequency_penalty" | "presence_penalty" => {
                if !(v.is_null() || v.as_f64() == Some(0.0)) {
                    return Err(bad(
                        k,
                        format!("`{k}` is not supported (only 0); use `repetition_penalty`"),
                    ));
                }
            }
            "logprobs" | "top_logprobs" | "echo" | "suffix" => {
                let off = matches!(v, Value::Null | Value::Bool(false)) || v.as_u64() == Some(0);
                let off = off || (k == "suffix" && v.as_str() == Some(""));
                if !off {
                    return Err(bad(k, format!("`{k}` is not supported")));
                }
            }
            "logit_bias" | "tools" | "functions" => {
                let empty = match v {
                    Value::Null => true,
                    Value::Object(m) => m.is_empty(),
                    Value::Array(a) => a.is_empty(),
                    _ => false,
                };
                if !empty {
                    return Err(bad(k, format!("`{k}` is not supported")));
                }
            }
            "tool_choice" | "function_call" => {
                if !matches!(v, Value::Null)
                    && v.as_str() != Some("none")
                    && v.as_str() != Some("auto")
                {
                    return Err(bad(k, format!("`{k}` is not supported (no tools)")));
                }
            }
            "response_format" => {
                let kind = v.get("type").and_then(Value::as_str);
                if !(v.is_null() || kind == Some("text")) {
                    return Err(bad(k, "only `{\"type\": \"text\"}` is supported"));
                }
            }
            k if IGNORED.contains(&k) => {}
            k if OWN.contains(&k) => {
                if !v.is_null() {
                    out.insert(k.into(), v.clone());
                }
            }
            other => {
                return Err(bad(
                    other,
                    format!("Unrecognized request argument supplied: {other}"),
                ))
            }
        }
    }
    match kind {
        Kind::Chat if !out.contains_key("messages") => {
            return Err(bad("messages", "`messages` is required"))
        }
        Kind::Completion if !out.contains_key("prompt") => {
            return Err(bad("prompt", "`prompt` is required"))
        }
        _ => {}
    }
    if let Some((_, n)) = max_tokens {
        out.insert("max_tokens".into(), Value::from(n));
    }
    out.insert("stream".into(), Value::Bool(stream));
    Ok(Translated {
        request: Value::Object(out),
        stream,
        include_usage,
    })
}

fn number(
    out: &mut Map<String, Value>,
    k: &str,
    v: &Value,
    lo: f64,
    hi: f64,
) -> Result<(), BadParam> {
    if v.is_null() {
        return Ok(());
    }
    match v.as_f64() {
        Some(x) if (lo..=hi).contains(&x) => {
            out.insert(k.into(), v.clone());
            Ok(())
        }
        _ if hi.is_infinite() => Err(bad(k, format!("`{k}` must be a number of at least {lo}"))),
        _ => Err(bad(k, format!("`{k}` must be a number from {lo} to {hi}"))),
    }
}

/// Chat messages as bitnetd's `{role, content}`: text content (a string or text parts), the roles a chat
/// template knows (`developer` is a system message).
fn messages(v: &Value) -> Result<Value, BadParam> {
    let list = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("messages", "`messages` must be a non-empty list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}]{f}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&at(".role"), "each message needs a `role`"))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(bad(
                    &at(".role"),
                    format!("role {other:?} is not supported (system, developer, user, assistant)"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => {
                            // Parts are separate pieces of text: a newline keeps their words apart.
                            if j > 0 {
                                text.push('\n');
                            }
                            text.push_str(t)
                        }
                        _ => {
                            return Err(bad(
                                &at(&format!(".content[{j}]")),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
            // An assistant message may have no content (it had tool calls, which bitnetd has none of).
            Some(Value::Null) | None if role == "assistant" => String::new(),
            _ => {
                return Err(bad(
                    &at(".content"),
                    "`content` must be a string or a list of text parts",
                ))
            }
        };
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            if !calls.is_empty() {
                return Err(bad(&at(".tool_calls"), "tool calls are not supported"));
            }
        }
        out.push(serde_json::json!({"role": role, "content": content}));
    }
    Ok(Value::Array(out))
}

/// A completion prompt: a string, or a list of one string.
fn prompt(v: &Value) -> Result<String, BadParam> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().into())
        }
        Value::Array(a) if a.len() > 1 && a.iter().all(Value::is_string) => Err(bad(
            "prompt",
            "one prompt per request (a list of several would need several choices)",
        )),
        _ => Err(bad(
            "prompt",
            "`prompt` must be a string (token ids are not accepted)",
        )),
    }
}

/// `stop`: a string or up to four strings, none empty.
fn stop(v: &Value) -> Result<Option<Value>, BadParam> {
    let list: Vec<&str> = match v {
        Value::Null => return Ok(None),
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .ok_or_else(|| bad("stop", "`stop` must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("stop", "`stop` must be a string or a list of strings")),
    };
    if list.len() > 4 || list.iter().any(|s| s.is_empty()) {
        return Err(bad("stop", "`stop` takes up to 4 non-empty strings"));
    }
    Ok((!list.is_empty()).then(|| Value::from(list)))
}

fn stream_options(v: &Value) -> Result<bool, BadParam> {
    match v {
        Value::Null => Ok(false),
        Value::Object(m) => {
            for (k, x) in m {
                if k == "include_obfuscation" {
                    continue;
                }
                if k != "include_usage" {
                    return Err(bad(
                        &format!("stream_options.{k}"),
                        format!("unknown stream option `{k}`"),
                    ));
                }
                if !x.is_boolean() {
                    return Err(bad("stream_options.include_usage", "must be true or false"));
                }
            }
            Ok(m.get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false))
        }
        _ => Err(bad("stream_options", "`stream_options` must be an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn models() -> Models {
        Models {
            local: "bitnet-local".into(),
            cloud: Some("kimi-x".into()),
        }
    }

    fn chat(body: Value) -> Result<Translated, BadParam> {
        translate(
            Kind::Chat,
            body.to_string().as_bytes(),
            "chatcmpl-1",
            &models(),
        )
    }

    fn param(r: Result<Translated, BadParam>) -> Option<String> {
        r.unwrap_err().param
    }

    #[test]
    fn a_chat_body_becomes_a_streamed_bitnetd_request() {
        let t = chat(json!({
            "model": "anything", "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}
            ],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 3, "n": 1,
            "stream": true, "stream_options": {"include_usage": true},
            "route": "local", "private": true, "deadline_ms": 900, "defer": false,
            "frequency_penalty": 0, "logprobs": false, "tools": [], "user": "u1"
        }))
        .unwrap();
        assert!(t.stream && t.include_usage);
        assert_eq!(
            t.request,
            json!({
                "id": "chatcmpl-1", "stream": true,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n!"}],
                "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 3,
                "route": "local", "private": true, "deadline_ms": 900, "defer": false
            })
        );
        // And bitnetd's parser takes it.
        assert!(crate::protocol::parse_value(t.request).is_ok());
    }

    #[test]
    fn a_completion_body_takes_one_prompt() {
        let t = translate(
            Kind::Completion,
            br#"{"prompt": ["Once"], "max_tokens": 4}"#,
            "cmpl-1",
            &models(),
        )
        .unwrap();
        assert_eq!(t.request["prompt"], json!("Once"));
        assert!(!t.stream);
        let c = |b: &str| {
            translate(Kind::Completion, b.as_bytes(), "cmpl-2", &models())
                .unwrap_err()
                .param
        };
        assert_eq!(c(r#"{"prompt": [1, 2]}"#).as_deref(), Some("prompt"));
        assert_eq!(c(r#"{"prompt": ["a", "b"]}"#).as_deref(), Some("prompt"));
        assert_eq!(c(r#"{"max_tokens": 4}"#).as_deref(), Some("prompt"));
        assert_eq!(
            c(r#"{"prompt": "a", "echo": true}"#).as_deref(),
            Some("echo")
        );
        assert_eq!(
            c(r#"{"prompt": "a", "messages": []}"#).as_deref(),
            Some("messages")
        );
    }

    #[test]
    fn refusals_name_the_parameter() {
        let m = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            param(chat(json!({"messages": m, "n": 2}))).as_deref(),
            Some("n")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "temperature": -1}))).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "top_p": "x"}))).as_deref(),
            Some("top_p")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "max_tokens": 0}))).as_deref(),
            Some("max_tokens")
        );
        let both = chat(json!({"messages": m, "max_tokens": 3, "max_completion_tokens": 4}));
        assert!(matches!(
            param(both).as_deref(),
            Some("max_tokens" | "max_completion_tokens")
        ));
        assert_eq!(
            param(chat(
                json!({"messages": m, "stop": ["a", "b", "c", "d", "e"]})
            ))
            .as_deref(),
            Some("stop")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "presence_penalty": 1}))).as_deref(),
            Some("presence_penalty")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "logprobs": true}))).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param(chat(
                json!({"messages": m, "tools": [{"type": "function"}]})
            ))
            .as_deref(),
            Some("tools")
        );
        assert_eq!(
            param(chat(
                json!({"messages": m, "response_format": {"type": "json_schema"}})
            ))
            .as_deref(),
            Some("response_format")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "stream_options": {"x": 1}}))).as_deref(),
            Some("stream_options.x")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "bogus": 1}))).as_deref(),
            Some("bogus")
        );
        assert_eq!(
            param(chat(json!({"messages": []}))).as_deref(),
            Some("messages")
        );
        assert_eq!(
            param(chat(
                json!({"messages": [{"role": "tool", "content": "x"}]})
            ))
            .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param(chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
            ))
            .as_deref(),
            Some("messages[0].content[0]")
        );
        assert_eq!(
            param(chat(json!({"model": "x"}))).as_deref(),
            Some("messages")
        );
        let e = translate(Kind::Chat, b"{nope", "c", &models()).unwrap_err();
        assert!(e.param.is_none() && e.message.contains("JSON"), "{e:?}");
    }

    #[test]
    fn naming_a_model_picks_its_route_unless_route_says_otherwise() {
        let m = json!([{"role": "user", "content": "x"}]);
        let route = |body: Value| chat(body).unwrap().request.get("route").cloned();
        assert_eq!(
            route(json!({"messages": m, "model": "bitnet-local"})),
            Some(json!("local"))
        );
        assert_eq!(
            route(json!({"messages": m, "model": "kimi-x"})),
            Some(json!("cloud"))
        );
        assert_eq!(route(json!({"messages": m, "model": "gpt-4o"})), None);
        assert_eq!(
            route(json!({"messages": m, "model": "kimi-x", "route": "auto"})),
            Some(json!("auto"))
        );
        let t = chat(
            json!({"messages": m, "reasoning_effort": "minimal", "modalities": ["text"],
            "prompt_cache_key": "k", "stream_options": {"include_obfuscation": false}}),
        )
        .unwrap();
        assert_eq!(t.request["thinking"], json!(false));
        assert_eq!(
            param(chat(json!({"messages": m, "modalities": ["audio"]}))).as_deref(),
            Some("modalities")
        );
        assert_eq!(
            param(chat(json!({"messages": m, "seed": -1}))).as_deref(),
            Some("seed")
        );
        assert!(chat(json!({"messages": m, "some_future_field": null})).is_ok());
    }

    #[test]
    fn nulls_mean_the_default() {
        let t = chat(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": null, "stop": null,
            "temperature": null, "seed": null, "stream": null, "stream_options": null, "route": null}))
        .unwrap();
        assert_eq!(
            t.request,
            json!({"id": "chatcmpl-1", "stream": false, "messages": [{"role": "user", "content": "x"}]})
        );
    }
}
