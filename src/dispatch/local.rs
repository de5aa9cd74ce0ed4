//! The local route: admission ([`crate::admission`], under the ledger's reservation lock), the engine job, and
//! the pump that moves the job's events to the request's replies. Used for requests routed to the board and for
//! cloud requests that fall back to it.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::ledger::{ms, Completion, Ledger, Outcome};
use crate::admission::{self, Board, Limits, LocalAsk};
use crate::budget::KvModel;
use crate::cloud::Cause;
use crate::config::HotAction;
use crate::engine::{
    Backend, CancelToken, FinishReason, Generation, JobEvent, JobHandle, JobOptions,
    ValidatedRequest,
};
use crate::errors::Refusal;
use crate::governor::Budget;
use crate::protocol::{Done, OnDeadline, Reply, Served, Timing, Usage, WireError};

/// Runs admitted requests on the backend. Shared by the dispatcher and the cloud jobs that fall back.
pub(super) struct LocalRunner {
    pub backend: Arc<dyn Backend>,
    pub ledger: Arc<Ledger>,
    /// How much KV cache a request reserves; `None` reserves nothing.
    pub kv: Option<KvModel>,
    /// The governor's view; `None` runs ungoverned.
    pub budget: Option<watch::Receiver<Budget>>,
    /// The configured memory budget, used when ungoverned.
    pub memory_budget: u64,
    pub hot_action: HotAction,
}

/// How a local run answers and what bounds it.
#[derive(Debug, Clone, Copy)]
pub(super) struct LocalRun {
    pub stream: bool,
    pub received: Instant,
    pub route_reason: &'static str,
    /// The cloud's failure cause, when this run is a fallback.
    pub fallback: Option<Cause>,
    pub on_deadline: OnDeadline,
    /// `task: "validate"`: the answer's JSON object goes into `done.result` when the text holds one.
    pub validate: bool,
    pub opts: JobOptions,
}

/// A run admitted and queued on the engine.
pub(super) struct Queued {
    job: JobHandle,
    prompt_tokens: usize,
    /// `max_tokens` as lowered to meet the deadline; reaching it ends with `budget`, not `length`.
    shortened: Option<usize>,
}

impl Queued {
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}

impl LocalRunner {
    /// The governor's current view, as admission reads it.
    pub fn board(&self) -> Option<Board> {
        self.budget.as_ref().map(|b| Board::from(&*b.borrow()))
    }

    /// Admits `v` for request `seq`, reserves its KV cache and queues it on the engine with `cancel`. On a
    /// refusal nothing stays reserved.
    pub fn queue(
        &self,
        seq: u64,
        run: &LocalRun,
        mut v: ValidatedRequest,
        cancel: &CancelToken,
    ) -> Result<Queued, WireError> {
        let prompt_tokens = v.prompt_ids().len();
        let ask = LocalAsk {
            prompt_tokens,
            max_new_tokens: v.max_new_tokens(),
            // Deadline fitting is for requests that stay local (`on_deadline`); a fallback runs as it can, and
            // the engine still stops it at the deadline.
            time_left: run
                .opts
                .deadline
                .filter(|_| run.fallback.is_none())
                .map(|d| d.saturating_duration_since(Instant::now())),
            on_deadline: run.on_deadline,
        };
        let (board, speed) = (self.board(), self.ledger.local_speed());
        let admitted = self.ledger.reserve(seq, |reserved| {
            admission::admit(
                &ask,
                &Limits {
                    board,
                    hot_action: self.hot_action,
                    speed,
                    kv: self.kv,
                    memory_budget: self.memory_budget,
                    reserved,
                },
            )
        });
        let admitted = admitted.map_err(|r| WireError::from(&r))?;
        if admitted.shortened {
            v.shorten_to(admitted.max_new_tokens);
            log::info!(seq, max_tokens = ask.max_new_tokens, shortened_to = admitted.max_new_tokens,
                left_ms = ask.time_left.unwrap_or_default().as_millis() as u64; "shortened to meet the deadline");
        }
        match self.backend.submit(v, run.opts, cancel.clone()) {
            Ok(job) => Ok(Queued {
                job,
                prompt_tokens,
                shortened: admitted.shortened.then_some(admitted.max_new_tokens),
            }),
            Err(e) => {
                self.ledger.release(seq);
                Err(WireError::from(&e))
            }
        }
    }

    /// Moves the queued job's events to `completion`'s replies, on a task of its own.
    pub fn spawn(&self, run: LocalRun, queued: Queued, completion: Completion) {
        let pump = Pump {
            run,
            model: self.backend.name().to_string(),
            submitted: Instant::now(),
            prompt_tokens: queued.prompt_tokens,
            shortened: queued.shortened,
            completion,
        };
        tokio::spawn(pump.run(queued.job));
    }
}

/// Moves one job's engine events to its replies.
struct Pump {
    run: LocalRun,
    model: String,
    submitted: Instant,
    prompt_tokens: usize,
    shortened: Option<usize>,
    completion: Completion,
}

impl Pump {
    async fn run(self, mut job: JobHandle) {
        while let Some(ev) = job.events.recv().await {
            match ev {
                JobEvent::Token(t) => self.token(t.text, &job),
                JobEvent::Done(g) => {
                    self.token(g.trailing_text.clone(), &job);
                    return self.done(&g);
                }
                JobEvent::Error(e) => {
                    let w = WireError::from(&e);
                    log::warn!(id:% = self.completion.id(), code = w.code.as_str(); "request failed: {e}");
                    return self.completion.fail(w, None);
                }
            }
        }
        // The engine dropped the job without a terminal event: only if its thread died.
        self.completion.fail(Refusal::EngineStopped.into(), None);
    }

    /// Streams `text`; a requester that went away cancels the job.
    fn token(&self, text: String, job: &JobHandle) {
        if self.run.stream && !text.is_empty() {
            let id = self.completion.id().clone();
            if !self.completion.send(Reply::Token { id, text }) {
                job.cancel.cancel();
            }
        }
    }

    fn done(self, g: &Generation) {
        let queue = (self.submitted - self.run.received) + g.queue_time;
        let timing = Timing {
            queue_ms: ms(queue),
            ttft_ms: ms(queue + g.ttft),
            total_ms: ms(queue + g.total),
            tokens_per_s: (g.decode_tokens_per_second() * 10.0).round() / 10.0,
        };
        let fallback = self.run.fallback.map(Cause::as_str);
        log::info!(
            id:% = self.completion.id(), route = "local", route_reason = self.run.route_reason,
            fallback:? = fallback, finish_reason:? = g.finish_reason, prompt_tokens = self.prompt_tokens,
            completion_tokens = g.completion_tokens(), queue_ms = timing.queue_ms, ttft_ms = timing.ttft_ms,
            total_ms = timing.total_ms;
            "request done"
        );
        log::trace!(id:% = self.completion.id(); "answer: {:?}", g.text);
        let finish_reason = match (g.finish_reason, self.shortened) {
            (FinishReason::Length, Some(n)) if g.completion_tokens() >= n => FinishReason::Budget,
            (r, _) => r,
        };
        // A small local model may not manage the object: then `done` has the text and no `result`.
        let result = self
            .run
            .validate
            .then(|| crate::tasks::parse_result(&g.text))
            .and_then(|r| {
                r.map_err(
                    |why| log::info!(id:% = self.completion.id(); "no validation result: {why}"),
                )
                .ok()
            });
        let done = Done {
            id: self.completion.id().clone(),
            text: (!self.run.stream).then(|| g.text.clone()),
            reasoning: None,
            result,
            route: Served::Local,
            route_reason: self.run.route_reason.to_string(),
            fallback: fallback.map(str::to_string),
            cached: false,
            deferred: false,
            model: self.model,
            finish_reason,
            usage: Usage {
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens(),
                reasoning_tokens: None,
            },
            timing,
        };
        self.completion.finish(Reply::Done(done), Outcome::Local(g));
    }
}
