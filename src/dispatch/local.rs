//! The local route: moves one engine job's events to the request's replies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::Dispatcher;
use crate::engine::{FinishReason, Generation, JobEvent, JobHandle};
use crate::protocol::{Done, ErrorCode, Id, Reply, Served, Timing, Usage, WireError};

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Moves one job's engine events to its replies.
pub(super) struct Pump {
    pub dispatcher: Arc<Dispatcher>,
    pub seq: u64,
    pub id: Id,
    pub stream: bool,
    pub received: Instant,
    pub prompt_tokens: usize,
    pub route_reason: &'static str,
    /// The cloud failure that sent it here, when it is a fallback.
    pub fallback: Option<&'static str>,
    /// `max_tokens` as lowered to meet the deadline; reaching it ends with `budget`, not `length`.
    pub shortened: Option<usize>,
    pub tx: UnboundedSender<Reply>,
}

impl Pump {
    pub async fn run(self, mut job: JobHandle) {
        let submitted = Instant::now();
        while let Some(ev) = job.events.recv().await {
            match ev {
                JobEvent::Token(t) => {
                    if self.stream && !t.text.is_empty() {
                        self.send(
                            Reply::Token {
                                id: self.id.clone(),
                                text: t.text,
                            },
                            &job,
                        );
                    }
                }
                JobEvent::Done(g) => {
                    self.done(&g, submitted, &job);
                    self.dispatcher.finished(self.seq, Ok(&g));
                    return;
                }
                JobEvent::Error(e) => {
                    log::warn!(id:% = self.id, code:? = WireError::from(&e).code; "request failed: {e}");
                    self.send(WireError::from(&e).with_id(&self.id).into(), &job);
                    self.dispatcher.finished(self.seq, Err(()));
                    return;
                }
            }
        }
        // The engine dropped the job without a terminal event: only if its thread died.
        self.send(
            WireError::new(ErrorCode::Internal, "the engine stopped")
                .with_id(&self.id)
                .into(),
            &job,
        );
        self.dispatcher.finished(self.seq, Err(()));
    }

    fn send(&self, reply: Reply, job: &JobHandle) {
        if self.tx.send(reply).is_err() {
            job.cancel.cancel();
        }
    }

    fn done(&self, g: &Generation, submitted: Instant, job: &JobHandle) {
        if self.stream && !g.trailing_text.is_empty() {
            self.send(
                Reply::Token {
                    id: self.id.clone(),
                    text: g.trailing_text.clone(),
                },
                job,
            );
        }
        let queue = (submitted - self.received) + g.queue_time;
        let timing = Timing {
            queue_ms: ms(queue),
            ttft_ms: ms(queue + g.ttft),
            total_ms: ms(queue + g.total),
            tokens_per_s: (g.decode_tokens_per_second() * 10.0).round() / 10.0,
        };
        log::info!(
            id:% = self.id, route = "local", route_reason = self.route_reason, fallback:? = self.fallback,
            finish_reason:? = g.finish_reason, prompt_tokens = self.prompt_tokens,
            completion_tokens = g.completion_tokens(), queue_ms = timing.queue_ms, ttft_ms = timing.ttft_ms,
            total_ms = timing.total_ms;
            "request done"
        );
        log::trace!(id:% = self.id; "answer: {:?}", g.text);
        self.send(
            Reply::Done(Done {
                id: self.id.clone(),
                text: (!self.stream).then(|| g.text.clone()),
                route: Served::Local,
                route_reason: self.route_reason.to_string(),
                fallback: self.fallback.map(str::to_string),
                cached: false,
                deferred: false,
                model: self.dispatcher.model_name().to_string(),
                finish_reason: match (g.finish_reason, self.shortened) {
                    (FinishReason::Length, Some(n)) if g.completion_tokens() >= n => {
                        FinishReason::Budget
                    }
                    (r, _) => r,
                },
                usage: Usage {
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.completion_tokens(),
                },
                timing,
            }),
            job,
        );
    }
}
