//! The cloud route: streams one request through the [`KimiClient`], relays its text, and on an early failure
//! hands the request to the local engine (the fallback), within well under a second of the failure.
//!
//! "Early" means nothing reached the requester yet: the cloud failed before its first token, or the request
//! does not stream (its partial cloud text is thrown away). A streamed answer cut mid-way ends with a
//! `cloud_error` (cause `cut`, `timeout`, ...) after the text already sent; it is not continued locally,
//! since a different model picking up mid-sentence would read as one garbled answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::unbounded_channel;

use super::ledger::{ms, Completion, Outcome};
use super::local::{LocalRun, LocalRunner};
use crate::cloud::{Cause, CloudAnswer, CloudError, CloudRequest, Connectivity, KimiClient, Piece};
use crate::config::RouterConfig;
use crate::deferred::DeferredQueue;
use crate::engine::{CancelToken, ValidatedRequest};
use crate::protocol::{Reply, Timing, WireError};

/// How often a running cloud request checks for cancellation.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Everything the dispatcher needs for the cloud route.
#[derive(Clone)]
pub struct CloudRoute {
    pub client: Arc<KimiClient>,
    pub link: Arc<Connectivity>,
    pub queue: Arc<DeferredQueue>,
    pub router: RouterConfig,
}

impl std::fmt::Debug for CloudRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudRoute")
            .field("model", &self.client.model())
            .field("link", &self.link.state())
            .finish_non_exhaustive()
    }
}

/// One cloud request in flight. It owns the request's [`Completion`]; a fallback takes it over.
pub(super) struct CloudJob {
    pub client: Arc<KimiClient>,
    pub req: CloudRequest,
    /// How the request answers; also what a fallback runs with.
    pub run: LocalRun,
    /// The request validated for the board, when a failure may fall back to it.
    pub fallback: Option<(Arc<LocalRunner>, ValidatedRequest)>,
    /// The request's token: it stops the cloud call and, after a fallback, the local run.
    pub cancel: CancelToken,
    pub completion: Completion,
}

impl CloudJob {
    pub async fn run(self) {
        let (ttx, mut trx) = unbounded_channel::<Piece>();
        let mut relayed = false;
        let call_started = Instant::now();
        let result = {
            let call = self.client.chat(&self.req, &ttx);
            tokio::pin!(call);
            let mut poll = tokio::time::interval(CANCEL_POLL);
            loop {
                tokio::select! {
                    r = &mut call => break r.map_err(|f| (f.error, f.relayed)),
                    Some(t) = trx.recv() => relayed |= self.relay(t),
                    _ = poll.tick() => if self.cancel.is_cancelled() || self.completion.is_closed() {
                        break Err((CloudError::new(Cause::Cancelled, "cancelled"), relayed));
                    },
                }
            }
        };
        while let Ok(t) = trx.try_recv() {
            relayed |= self.relay(t);
        }
        match result {
            Ok(a) => self.answered(a, call_started),
            Err((error, relayed_any)) => self.failed(error, relayed_any || relayed),
        }
    }

    /// Sends a piece of the answer or of the reasoning when streaming; true if it went out.
    fn relay(&self, piece: Piece) -> bool {
        let id = self.completion.id().clone();
        let reply = match piece {
            Piece::Text(text) if !text.is_empty() => Reply::Token { id, text },
            Piece::Reasoning(text) if !text.is_empty() => Reply::Reasoning { id, text },
            _ => return false,
        };
        self.run.stream && self.completion.send(reply)
    }

    fn answered(self, a: CloudAnswer, call_started: Instant) {
        let received = self.run.received;
        let total = received.elapsed();
        let usage = a.usage.unwrap_or_default();
        let ttft = a.ttft.map_or(total, |t| (call_started - received) + t);
        log::info!(id:% = self.completion.id(), route = "cloud", route_reason = self.run.route_reason,
            cached = a.cached, attempts = a.attempts, finish_reason = a.finish_reason.as_str(),
            completion_tokens = usage.completion_tokens, total_ms = ms(total); "request done");
        let timing = Timing::measured(ttft, total, usage.completion_tokens);
        let (cached, stream) = (a.cached, self.run.stream);
        let id = self.completion.id().clone();
        let mut done = match a.into_done(id, self.run.route_reason, timing, self.req.json) {
            Ok(d) => d,
            Err(e) => {
                log::warn!(id:% = self.completion.id(), cause = e.cause.as_str(); "cloud answer unusable: {}", e.message);
                return self.completion.fail(WireError::from(&e), Some(e.cause));
            }
        };
        if stream {
            done.text = None;
            done.reasoning = None;
        }
        let outcome = Outcome::Cloud {
            tokens: usage.completion_tokens,
            timing: (!cached).then_some(timing),
        };
        self.completion.finish(Reply::Done(done), outcome);
    }

    fn failed(self, error: CloudError, relayed: bool) {
        let cause = error.cause;
        let cut = relayed && self.run.stream;
        let CloudJob {
            fallback,
            run,
            cancel,
            completion,
            ..
        } = self;
        match fallback {
            Some((local, validated)) if cause != Cause::Cancelled && !cut => {
                let started = Instant::now();
                let run = LocalRun {
                    fallback: Some(cause),
                    ..run
                };
                match local.queue(completion.seq(), &run, validated, &cancel) {
                    Ok(queued) => {
                        log::warn!(id:% = completion.id(), cause = cause.as_str(),
                            switch_ms = ms(started.elapsed());
                            "cloud failed before answering; running locally: {}", error.message);
                        local.ledger.fell_back(cause);
                        local.spawn(run, queued, completion);
                    }
                    Err(e) => completion.fail(e, Some(cause)),
                }
            }
            _ => {
                let mut e = WireError::from(&error);
                if cut {
                    e.message = format!(
                        "the cloud answer broke off after it had started: {}",
                        e.message
                    );
                }
                log::warn!(id:% = completion.id(), cause = cause.as_str(), relayed;
                    "cloud request failed: {}", error.message);
                completion.fail(e, Some(cause));
            }
        }
    }
}
