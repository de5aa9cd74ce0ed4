//! bitnetd's replies as OpenAI response bodies and stream chunks (pure functions of the replies).

use serde_json::{json, Value};

use super::openai::Kind;
use crate::engine::FinishReason;
use crate::protocol::{Done, Usage};

/// What every body and chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct Head {
    pub kind: Kind,
    pub id: String,
    /// Unix seconds at acceptance.
    pub created: u64,
    /// The model the request was sent to (a `done` names the one that answered).
    pub model: String,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, model: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": model,
            "choices": choices,
        })
    }
}

/// OpenAI's `finish_reason` for bitnetd's: an answer cut short (by a deadline, or cancelled at shutdown) is
/// `length`, as one cut by `max_tokens`. bitnetd's own reason is in the `bitnetd` object.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Budget | FinishReason::Cancelled => "length",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// OpenAI's usage object.
pub fn usage(u: &Usage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
    if let Some(r) = u.reasoning_tokens {
        v["completion_tokens_details"] = json!({ "reasoning_tokens": r });
    }
    v
}

/// Where and how the request ran: the `bitnetd` object of a body or of a stream's last chunk.
pub fn routing(d: &Done) -> Value {
    let mut v = json!({
        "route": d.route.as_str(),
        "route_reason": d.route_reason,
        "finish_reason": d.finish_reason.as_str(),
        "timing": d.timing,
    });
    if let Some(f) = &d.fallback {
        v["fallback"] = json!(f);
    }
    if d.cached {
        v["cached"] = json!(true);
    }
    if let Some(r) = &d.result {
        v["result"] = r.clone();
    }
    v
}

/// The one body of a request that did not stream: `text` and `reasoning` collected from its replies.
pub fn body(head: &Head, d: &Done, text: &str, reasoning: &str) -> Value {
    let choice = match head.kind {
        Kind::Chat => {
            let mut message = json!({ "role": "assistant", "content": text });
            if !reasoning.is_empty() {
                message["reasoning_content"] = json!(reasoning);
            }
            json!({ "index": 0, "message": message, "finish_reason": finish_reason(d.finish_reason), "logprobs": null })
        }
        Kind::Completion => {
            json!({ "index": 0, "text": text, "finish_reason": finish_reason(d.finish_reason), "logprobs": null })
        }
    };
    let mut v = head.wrap(false, &d.model, json!([choice]));
    v["usage"] = usage(&d.usage);
    v["bitnetd"] = routing(d);
    v
}

/// What one stream chunk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// The first chunk of a chat stream: the assistant's role.
    Role,
    Text(&'a str),
    /// A thinking model's reasoning (`delta.reasoning_content`, as Kimi and DeepSeek stream it).
    Reasoning(&'a str),
}

/// A stream chunk with `piece`.
pub fn chunk(head: &Head, piece: Piece<'_>) -> Value {
    let choice = match (head.kind, piece) {
        (Kind::Chat, Piece::Role) => json!({ "role": "assistant", "content": "" }),
        (Kind::Chat, Piece::Text(t)) => json!({ "content": t }),
        (Kind::Chat, Piece::Reasoning(t)) => json!({ "reasoning_content": t }),
        (Kind::Completion, Piece::Text(t)) => {
            return head.wrap(
                true,
                &head.model,
                json!([{ "index": 0, "text": t, "finish_reason": null, "logprobs": null }]),
            )
        }
        // A completion stream has no role, and no place for reasoning.
        (Kind::Completion, _) => json!(null),
    };
    head.wrap(
        true,
        &head.model,
        json!([{ "index": 0, "delta": choice, "finish_reason": null, "logprobs": null }]),
    )
}

/// The chunk that ends a stream: its finish reason and the `bitnetd` object (and `usage` when asked for, in a
/// chunk of its own with no choices, as OpenAI sends it).
pub fn last_chunks(head: &Head, d: &Done, include_usage: bool) -> Vec<Value> {
    let choice = match head.kind {
        Kind::Chat => {
            json!({ "index": 0, "delta": {}, "finish_reason": finish_reason(d.finish_reason), "logprobs": null })
        }
        Kind::Completion => {
            json!({ "index": 0, "text": "", "finish_reason": finish_reason(d.finish_reason), "logprobs": null })
        }
    };
    let mut last = head.wrap(true, &d.model, json!([choice]));
    last["bitnetd"] = routing(d);
    let mut out = vec![last];
    if include_usage {
        let mut u = head.wrap(true, &d.model, json!([]));
        u["usage"] = usage(&d.usage);
        out.push(u);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Served, Timing};
    use std::time::Duration;

    fn done() -> Done {
        Done {
            id: json!("chatcmpl-1"),
            text: None,
            reasoning: None,
            result: None,
            route: Served::Cloud,
            route_reason: "complex".into(),
            fallback: None,
            cached: false,
            deferred: false,
            model: "kimi-k2.6".into(),
            finish_reason: FinishReason::Budget,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                reasoning_tokens: Some(2),
            },
            timing: Timing::measured(Duration::from_millis(10), Duration::from_millis(50), 5),
        }
    }

    fn head(kind: Kind) -> Head {
        Head {
            kind,
            id: "chatcmpl-1".into(),
            created: 7,
            model: "bitnet".into(),
        }
    }

    #[test]
    fn a_chat_body_has_openais_shape_and_bitnetds_routing() {
        let v = body(&head(Kind::Chat), &done(), "Hi", "hmm");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "kimi-k2.6");
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "Hi", "reasoning_content": "hmm"})
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                   "completion_tokens_details": {"reasoning_tokens": 2}})
        );
        assert_eq!(v["bitnetd"]["route"], "cloud");
        assert_eq!(v["bitnetd"]["route_reason"], "complex");
        assert_eq!(v["bitnetd"]["finish_reason"], "budget");
        let c = body(&head(Kind::Completion), &done(), "Hi", "");
        assert_eq!(
            (c["object"].as_str(), c["choices"][0]["text"].as_str()),
            (Some("text_completion"), Some("Hi"))
        );
    }

    #[test]
    fn chunks_stream_deltas_then_the_finish_then_usage() {
        let h = head(Kind::Chat);
        assert_eq!(
            chunk(&h, Piece::Role)["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(
            chunk(&h, Piece::Text("a"))["choices"][0]["delta"],
            json!({"content": "a"})
        );
        assert_eq!(
            chunk(&h, Piece::Reasoning("r"))["choices"][0]["delta"],
            json!({"reasoning_content": "r"})
        );
        let last = last_chunks(&h, &done(), true);
        assert_eq!(last.len(), 2);
        assert_eq!(last[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(last[0]["bitnetd"]["route"], "cloud");
        assert_eq!(last[1]["choices"], json!([]));
        assert_eq!(last[1]["usage"]["total_tokens"], 8);
        assert_eq!(last_chunks(&h, &done(), false).len(), 1);
        let t = chunk(&head(Kind::Completion), Piece::Text("x"));
        assert_eq!(
            (t["object"].as_str(), t["choices"][0]["text"].as_str()),
            (Some("text_completion"), Some("x"))
        );
    }
}
