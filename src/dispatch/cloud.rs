//! The cloud route: streams one request through the [`KimiClient`], relays its text, and on an early failure
//! hands the request to the local engine (the fallback), within well under a second of the failure.
//!
//! "Early" means nothing reached the requester yet: the cloud failed before its first token, or the request
//! does not stream (its partial cloud text is thrown away). A streamed answer cut mid-way ends with a
//! `cloud_error` (cause `cut`, `timeout`, ...) after the text already sent; it is not continued locally,
//! since a different model picking up mid-sentence would read as one garbled answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::local::ms;
use super::Dispatcher;
use crate::cloud::{Cause, CloudError, CloudRequest, Connectivity, KimiClient};
use crate::config::RouterConfig;
use crate::deferred::forwarder::finish_reason;
use crate::deferred::DeferredQueue;
use crate::engine::{CancelToken, JobOptions, ValidatedRequest};
use crate::protocol::{Done, Id, Reply, Served, Timing, Usage, WireError};

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

/// What a fallback needs to start locally.
pub(super) struct Fallback {
    pub validated: ValidatedRequest,
    pub opts: JobOptions,
}

/// One cloud request in flight.
pub(super) struct CloudJob {
    pub dispatcher: Arc<Dispatcher>,
    pub client: Arc<KimiClient>,
    pub seq: u64,
    pub id: Id,
    pub stream: bool,
    pub received: Instant,
    pub route_reason: &'static str,
    pub req: CloudRequest,
    pub fallback: Option<Fallback>,
    pub cancel: CancelToken,
    pub tx: UnboundedSender<Reply>,
}

impl CloudJob {
    pub async fn run(self) {
        let (ttx, mut trx) = unbounded_channel::<String>();
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
                    _ = poll.tick() => if self.cancel.is_cancelled() || self.tx.is_closed() {
                        break Err((CloudError::new(Cause::Cancelled, "cancelled"), relayed));
                    },
                }
            }
        };
        while let Ok(t) = trx.try_recv() {
            relayed |= self.relay(t);
        }
        match result {
            Ok(a) => {
                let total = self.received.elapsed();
                let usage = a.usage.unwrap_or_default();
                let offset = call_started - self.received;
                let ttft = a.ttft.map_or(total, |t| offset + t);
                log::info!(id:% = self.id, route = "cloud", route_reason = self.route_reason, cached = a.cached,
                    attempts = a.attempts, finish_reason = a.finish_reason.as_str(),
                    completion_tokens = usage.completion_tokens, total_ms = ms(total); "request done");
                let timing = Timing::measured(ttft, total, usage.completion_tokens);
                self.dispatcher.cloud_finished(
                    self.seq,
                    None,
                    usage.completion_tokens,
                    (!a.cached).then_some(&timing),
                );
                let _ = self.tx.send(Reply::Done(Done {
                    id: self.id.clone(),
                    text: (!self.stream).then_some(a.text),
                    route: Served::Cloud,
                    route_reason: self.route_reason.to_string(),
                    fallback: None,
                    cached: a.cached,
                    deferred: false,
                    model: self.client.model().to_string(),
                    finish_reason: finish_reason(&a.finish_reason),
                    usage: Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                    },
                    timing,
                }));
            }
            Err((error, relayed_any)) => self.failed(error, relayed_any || relayed),
        }
    }

    /// Sends a piece of text when streaming; true if it went out.
    fn relay(&self, text: String) -> bool {
        if !self.stream || text.is_empty() {
            return false;
        }
        self.tx
            .send(Reply::Token {
                id: self.id.clone(),
                text,
            })
            .is_ok()
    }

    fn failed(self, error: CloudError, relayed: bool) {
        let cause = error.cause;
        let early = !(relayed && self.stream);
        if cause != Cause::Cancelled && early {
            if let Some(fb) = self.fallback {
                let started = Instant::now();
                let run = super::LocalRun {
                    seq: self.seq,
                    id: self.id.clone(),
                    stream: self.stream,
                    received: self.received,
                    route_reason: self.route_reason,
                    fallback: Some(cause),
                    shortened: None,
                };
                let r = self.dispatcher.fallback(run, cause, fb, self.tx.clone());
                match r {
                    Ok(()) => {
                        log::warn!(id:% = self.id, cause = cause.as_str(), switch_ms = ms(started.elapsed());
                            "cloud failed before answering; running locally: {}", error.message);
                        return;
                    }
                    Err(e) => {
                        let _ = self.tx.send(e.with_id(&self.id).into());
                        self.dispatcher
                            .cloud_finished(self.seq, Some(cause), 0, None);
                        return;
                    }
                }
            }
        }
        let mut e = WireError::cloud(&error);
        if relayed && self.stream {
            e.message = format!(
                "the cloud answer broke off after it had started: {}",
                e.message
            );
        }
        log::warn!(id:% = self.id, cause = cause.as_str(), relayed; "cloud request failed: {}", error.message);
        let _ = self.tx.send(e.with_id(&self.id).into());
        self.dispatcher
            .cloud_finished(self.seq, Some(cause), 0, None);
    }
}
