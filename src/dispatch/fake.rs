//! A backend for tests: no model, no engine threads. Its "tokenizer" makes one token per word; the test plays
//! the engine thread, taking queued jobs and sending their events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::DispatchOptions;
use crate::budget::KvModel;
use crate::config::HotAction;
use crate::engine::{
    Backend, CancelToken, EngineError, EngineHealth, FinishReason, GenerateParams, Generation,
    JobEvent, JobHandle, JobOptions, Prompt, TokenEvent, ValidatedRequest,
};
use crate::meta::GenerationDefaults;
use crate::protocol::{Incoming, Request};

pub const CONTEXT: usize = 16;
pub const MIB: u64 = 1 << 20;

/// A job the fake accepted: the test sends its events.
pub struct FakeJob {
    pub events: UnboundedSender<JobEvent>,
    pub cancel: CancelToken,
    pub max_new_tokens: usize,
}

/// A backend whose "tokenizer" makes one token per word and whose queue holds `capacity` jobs.
pub struct Fake {
    capacity: usize,
    defaults: GenerationDefaults,
    queued: Mutex<VecDeque<FakeJob>>,
}

impl Fake {
    pub fn new(capacity: usize) -> Arc<Fake> {
        Arc::new(Fake {
            capacity,
            defaults: GenerationDefaults::default(),
            queued: Mutex::default(),
        })
    }

    /// The oldest job queued (the test plays the engine thread that takes it).
    pub fn take(&self) -> FakeJob {
        self.queued
            .lock()
            .unwrap()
            .pop_front()
            .expect("a queued job")
    }
}

impl Backend for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    fn generation_defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    fn threads(&self) -> usize {
        3
    }

    fn kernel(&self) -> &'static str {
        "none"
    }

    fn prepare(
        &self,
        prompt: &Prompt,
        params: GenerateParams,
    ) -> Result<ValidatedRequest, EngineError> {
        let words = match prompt {
            Prompt::Text(t) => t.split_whitespace().count(),
            Prompt::Chat(m) => m.iter().map(|m| m.content.split_whitespace().count()).sum(),
            Prompt::Ids(ids) => ids.len(),
        };
        ValidatedRequest::new((0..words as u32).collect(), params, CONTEXT, &[])
    }

    fn submit(
        &self,
        req: ValidatedRequest,
        _opts: JobOptions,
        cancel: CancelToken,
    ) -> Result<JobHandle, EngineError> {
        let mut queued = self.queued.lock().unwrap();
        if queued.len() >= self.capacity {
            return Err(EngineError::Busy {
                capacity: self.capacity,
            });
        }
        let (tx, events) = unbounded_channel();
        queued.push_back(FakeJob {
            events: tx,
            cancel: cancel.clone(),
            max_new_tokens: req.max_new_tokens(),
        });
        Ok(JobHandle { events, cancel })
    }

    fn health(&self) -> EngineHealth {
        EngineHealth {
            slots: 1,
            slots_alive: 1,
            running: 0,
            waiting: self.queued.lock().unwrap().len(),
            longest_stall: Duration::ZERO,
        }
    }
}

pub fn options() -> DispatchOptions {
    DispatchOptions {
        default_max_tokens: 8,
        default_deadline: None,
        stall_limit: Duration::from_secs(60),
        memory_budget: 15 * MIB,
        rss_before_model: None,
        budget: None,
        kv: None,
        cloud: None,
        hot_action: HotAction::Refuse,
    }
}

/// With a KV cache of 1 MiB per token and two slots: a 10-token request (3 prompt + 7 generated) fits the
/// 15 MiB budget alone, not next to another.
pub fn with_kv() -> DispatchOptions {
    DispatchOptions {
        kv: Some(KvModel {
            base: 0,
            per_token: MIB,
            slots: 2,
        }),
        ..options()
    }
}

pub fn request(v: serde_json::Value) -> Request {
    match crate::protocol::parse(v.to_string().as_bytes()).unwrap() {
        Incoming::Request(r) => *r,
        other => panic!("{other:?}"),
    }
}

pub fn ask(id: u64, max_tokens: usize) -> Request {
    request(json!({"id": id, "prompt": "one two three", "max_tokens": max_tokens, "stream": true}))
}

/// A finished generation of `n` tokens: first token after 100 ms, then 10 tokens/s.
pub fn generation(n: usize) -> Generation {
    Generation {
        prompt_tokens: 3,
        token_ids: (0..n as u32).collect(),
        text: "x".repeat(n),
        trailing_text: String::new(),
        finish_reason: FinishReason::Length,
        queue_time: Duration::ZERO,
        ttft: Duration::from_millis(100),
        total: Duration::from_millis(100 + 100 * n.saturating_sub(1) as u64),
    }
}

pub fn token(text: &str) -> JobEvent {
    JobEvent::Token(TokenEvent {
        id: 0,
        text: text.into(),
    })
}
