//! A session: one sequence with its own KV cache (held in the attention ops' state), prefilled in chunks and
//! decoded one token at a time, each forward pass on the model's worker team, with as many threads as the
//! model allows unless its `ThreadTuner` (`engine::tuner`) measured fewer to be faster.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

use super::request::ValidatedRequest;
use super::sampler::Sampler;
use super::text::TextStream;
use super::{EngineError, Model};

/// Prompt tokens fed to the model per step during prefill (bounds activation memory); the most
/// [`crate::engine::Model::set_prefill_chunk`] allows.
pub const PREFILL_CHUNK: usize = 128;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
    /// The caller cancelled (or went away).
    Cancelled,
    /// A budget ended it early: the request's deadline passed while it ran.
    Budget,
    /// The cloud model's content filter ended it.
    ContentFilter,
}

impl FinishReason {
    /// The wire name (`stop`, `length`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Budget => "budget",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// One generated token, as streamed.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty, e.g. mid-character or a held-back stop prefix).
    pub text: String,
}

/// Watches a generation: `check` runs before every forward pass (prefill chunks and decode steps), `token` after
/// every generated token. Either returning `Break(reason)` ends the generation with that reason; a token refused
/// by `token` is not part of the result.
pub trait Observer {
    fn check(&mut self) -> ControlFlow<FinishReason> {
        ControlFlow::Continue(())
    }
    fn token(&mut self, t: &TokenEvent) -> ControlFlow<FinishReason>;
}

impl<F: FnMut(&TokenEvent) -> ControlFlow<FinishReason>> Observer for F {
    fn token(&mut self, t: &TokenEvent) -> ControlFlow<FinishReason> {
        self(t)
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub token_ids: Vec<u32>,
    /// The whole answer (stop strings excluded).
    pub text: String,
    /// Text held back while streaming (a prefix of a stop string that never completed): a streaming consumer
    /// appends it after the last token event.
    pub trailing_text: String,
    pub finish_reason: FinishReason,
    /// Time spent waiting in the engine queue (set by the engine thread; zero for a bare session).
    pub queue_time: Duration,
    /// Time to the first generated token (prefill + one sampling step), from the start of the run.
    pub ttft: Duration,
    /// Time of the run, from its start (queue time excluded).
    pub total: Duration,
}

impl Generation {
    /// The result of a request that ended before its first forward pass (e.g. cancelled while queued).
    pub fn ended_before_start(req: &ValidatedRequest, reason: FinishReason) -> Self {
        Generation {
            prompt_tokens: req.prompt_ids().len(),
            token_ids: vec![],
            text: String::new(),
            trailing_text: String::new(),
            finish_reason: reason,
            queue_time: Duration::ZERO,
            ttft: Duration::ZERO,
            total: Duration::ZERO,
        }
    }

    pub fn completion_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Decode speed: tokens after the first, per second of decoding.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1) as f64;
        let t = (self.total - self.ttft).as_secs_f64();
        if n > 0.0 && t > 0.0 {
            n / t
        } else {
            0.0
        }
    }
}

/// One sequence over a shared model.
pub struct Session {
    model: Arc<Model>,
    state: TypedSimpleState,
    /// Tokens already in the KV cache.
    past: usize,
}

impl Session {
    pub(crate) fn new(model: Arc<Model>) -> Result<Self, EngineError> {
        let state = model.plan.spawn().map_err(EngineError::inference)?;
        model
            .tuner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .new_sequence();
        Ok(Session {
            model,
            state,
            past: 0,
        })
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) -> Result<(), EngineError> {
        self.model
            .tuner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .new_sequence();
        self.state = self.model.plan.spawn().map_err(EngineError::inference)?;
        self.past = 0;
        Ok(())
    }

    /// Tokens in the KV cache.
    pub fn len(&self) -> usize {
        self.past
    }

    pub fn is_empty(&self) -> bool {
        self.past == 0
    }

    /// Feeds `ids` after what the cache holds and returns the logits of the last position.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, EngineError> {
        let n = ids.len();
        let total = self.past + n;
        let slots = &self.model.slots;
        let mut inputs: TVec<TValue> = tvec![TValue::from(Tensor::default()); 3];
        let t = |shape: &[usize], v: Vec<i64>| {
            Tensor::from_shape(shape, &v).map_err(EngineError::inference)
        };
        inputs[slots.input_ids] = t(&[1, n], ids.iter().map(|&i| i as i64).collect())?.into();
        inputs[slots.attention_mask] = t(&[1, total], vec![1; total])?.into();
        inputs[slots.position_ids] = t(&[1, n], (self.past as i64..total as i64).collect())?.into();
        let state = &mut self.state;
        let allowed = self.model.threads();
        let tuner = || self.model.tuner.lock().unwrap_or_else(|e| e.into_inner());
        let threads = if n == 1 {
            tuner().threads(allowed)
        } else {
            tuner().chosen(allowed)
        };
        let started = Instant::now();
        let out = crate::team::scope(&self.model.team, threads - 1, || state.run(inputs))
            .map_err(EngineError::inference)?;
        if n == 1 {
            tuner().record(threads, started.elapsed());
        }
        self.past = total;
        let logits = out[0]
            .to_plain_array_view::<f32>()
            .map_err(EngineError::inference)?;
        Ok(logits.iter().copied().collect())
    }

    /// Runs a request from an empty cache under `observer` (see [`Observer`]).
    pub fn generate(
        &mut self,
        req: &ValidatedRequest,
        observer: &mut dyn Observer,
    ) -> Result<Generation, EngineError> {
        let start = Instant::now();
        self.reset()?;
        let prompt = req.prompt_ids();
        let mut logits = vec![];
        for chunk in prompt.chunks(self.model.prefill_chunk()) {
            if let ControlFlow::Break(reason) = observer.check() {
                let mut g = Generation::ended_before_start(req, reason);
                g.total = start.elapsed();
                g.ttft = g.total;
                return Ok(g);
            }
            logits = self.forward(chunk)?;
        }
        let mut sampler = Sampler::new(req.params().sampling.clone());
        let mut history = prompt.to_vec();
        let mut text = TextStream::new(req.params().stop.clone());
        let mut generated = vec![];
        let mut ttft = None;
        let mut finish = FinishReason::Length;
        // Bytes of text delivered before a token the observer refused: the answer ends there.
        let mut refused_at = None;
        while generated.len() < req.max_new_tokens() {
            let id = sampler.sample(&mut logits, &history);
            ttft.get_or_insert_with(|| start.elapsed());
            if req.stop_ids().contains(&id) {
                finish = FinishReason::Stop;
                break;
            }
            generated.push(id);
            history.push(id);
            let delivered = text.emitted().len();
            let pushed = text.push(id, |ids| self.model.decode(ids));
            if let ControlFlow::Break(reason) = observer.token(&TokenEvent {
                id,
                text: pushed.delta,
            }) {
                generated.pop();
                refused_at = Some(delivered);
                finish = reason;
                break;
            }
            if pushed.stopped {
                finish = FinishReason::Stop;
                break;
            }
            if generated.len() < req.max_new_tokens() {
                if let ControlFlow::Break(reason) = observer.check() {
                    finish = reason;
                    break;
                }
                logits = self.forward(&[id])?;
            }
        }
        let (answer, trailing_text) = match refused_at {
            Some(n) => (text.text()[..n].to_string(), String::new()),
            None => {
                let trailing = text.finish();
                (text.text().to_string(), trailing)
            }
        };
        Ok(Generation {
            trailing_text,
            prompt_tokens: prompt.len(),
            token_ids: generated,
            text: answer,
            finish_reason: finish,
            queue_time: Duration::ZERO,
            ttft: ttft.unwrap_or_else(|| start.elapsed()),
            total: start.elapsed(),
        })
    }
}
