//! The dispatcher's books: the requests in flight, the KV bytes each local run reserved, the counters `status`
//! reports, and the [`Completion`] guard that closes an accepted request's entry exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::admission::Admitted;
use crate::cloud::Cause;
use crate::engine::{CancelToken, Generation};
use crate::errors::Refusal;
use crate::inflight::InFlight;
use crate::metrics::{Metrics, RequestOrigin};
use crate::protocol::{ErrorCode, Id, Reply, Served, Timing, WireError};
use crate::router::LocalSpeed;

/// Counters kept for `status`.
#[derive(Debug, Default, Clone)]
pub(super) struct Counters {
    pub accepted: u64,
    pub done: u64,
    pub failed: u64,
    pub rejected: u64,
    pub deferred: u64,
    pub tokens_out: u64,
    /// Moving averages over recent local requests.
    pub tokens_per_s: Option<f64>,
    pub ttft_ms: Option<f64>,
    /// Moving averages over recent cloud requests (time to first token from acceptance).
    pub cloud_tokens_per_s: Option<f64>,
    pub cloud_ttft_ms: Option<f64>,
    /// Accepted requests by route (`local`, `cloud`, `deferred`) and reason.
    pub routes: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Cloud requests that ran locally instead, by the cloud's failure cause.
    pub fallbacks: BTreeMap<&'static str, u64>,
    /// Cloud failures by cause (whether or not a fallback followed).
    pub cloud_errors: BTreeMap<&'static str, u64>,
}

/// Weight of the newest request in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| o + EWMA_ALPHA * (new - o)))
}

/// Milliseconds with microsecond resolution, as replies and logs give them.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// How an accepted request ended, for the counters.
pub(super) enum Outcome<'a> {
    /// A local run finished.
    Local(&'a Generation),
    /// A cloud answer; `timing` of a fresh (not cached) one feeds the cloud latency estimate.
    Cloud {
        tokens: usize,
        timing: Option<Timing>,
    },
    /// Ended with an error; `cloud` is the cloud's failure cause when it was a cloud request.
    Failed { cloud: Option<Cause> },
}

/// See the module documentation. Lock order: `reservations` may be held while nothing else is taken. A lock
/// poisoned by a panic elsewhere is still taken: the books are plain numbers, and a completion must never
/// panic on its way to the terminal reply.
#[derive(Default)]
pub(super) struct Ledger {
    counters: Mutex<Counters>,
    in_flight: InFlight<u64>,
    /// KV bytes reserved by each local run, by sequence number.
    reservations: Mutex<HashMap<u64, u64>>,
    next_seq: AtomicU64,
    metrics: Metrics,
}

impl Ledger {
    /// A fresh sequence number: the key of one accepted request.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn in_flight(&self) -> &InFlight<u64> {
        &self.in_flight
    }

    /// The metrics these books feed.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts a message from `source` refused before acceptance with `code`.
    pub fn rejected(&self, source: &str, code: ErrorCode) {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rejected += 1;
        self.metrics.rejected(source, code);
    }

    /// Counts an accepted request by its route and reason (a deferred one is done with here).
    pub fn accepted(&self, source: &str, route: &'static str, reason: &'static str) {
        if route == "deferred" {
            self.metrics.deferred(source, reason);
        }
        let mut c = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        c.accepted += 1;
        *c.routes
            .entry(route)
            .or_default()
            .entry(reason)
            .or_default() += 1;
        if route == "deferred" {
            c.deferred += 1;
        }
    }

    /// Counts a cloud request that failed with `cause` and runs locally instead.
    pub fn fell_back(&self, cause: Cause) {
        let mut c = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        *c.fallbacks.entry(cause.as_str()).or_default() += 1;
        *c.cloud_errors.entry(cause.as_str()).or_default() += 1;
    }

    /// The measured local speed (moving averages), once there is one.
    pub fn local_speed(&self) -> Option<LocalSpeed> {
        let c = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        c.ttft_ms.zip(c.tokens_per_s).map(|(ttft, tps)| LocalSpeed {
            ttft: Duration::from_secs_f64(ttft / 1e3),
            tokens_per_s: tps,
        })
    }

    /// Runs `admit` on the bytes reserved by the work in flight and, when it admits, reserves its `kv_bytes`
    /// under `seq`, both under one lock: two requests cannot both take the last room.
    pub fn reserve<E>(
        &self,
        seq: u64,
        admit: impl FnOnce(&[u64]) -> Result<Admitted, E>,
    ) -> Result<Admitted, E> {
        let mut reservations = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let reserved: Vec<u64> = reservations.values().copied().collect();
        let admitted = admit(&reserved)?;
        if admitted.kv_bytes > 0 {
            reservations.insert(seq, admitted.kv_bytes);
        }
        Ok(admitted)
    }

    /// Frees what `seq` reserved (nothing if it reserved nothing).
    pub fn release(&self, seq: u64) {
        self.reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq);
    }

    /// Bytes reserved by the work in flight.
    pub fn reserved_bytes(&self) -> u64 {
        self.reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }

    /// Counts an accepted request (see [`Ledger::accepted`]) and tracks it until its [`Completion`] closes:
    /// `cancel` stops it, replies go to `tx`.
    pub fn open(
        self: &Arc<Self>,
        seq: u64,
        id: Id,
        origin: RequestOrigin,
        tx: UnboundedSender<Reply>,
        cancel: CancelToken,
    ) -> Completion {
        self.accepted(origin.source, origin.route, origin.reason);
        self.in_flight.insert(seq, cancel);
        Completion {
            ledger: self.clone(),
            seq,
            id,
            origin,
            tx,
            open: true,
        }
    }

    fn record(&self, origin: RequestOrigin, reply: &Reply, outcome: Outcome) {
        self.metrics.finished(origin, reply);
        match &outcome {
            Outcome::Local(g) => {
                let n = g.completion_tokens();
                let ttft = (n > 0).then(|| (g.queue_time + g.ttft).as_secs_f64());
                let tps = (n > 1).then(|| g.decode_tokens_per_second());
                self.metrics.generation(Served::Local, n, ttft, tps);
            }
            Outcome::Cloud { tokens, timing } => {
                let ttft = timing.filter(|_| *tokens > 0).map(|t| t.ttft_ms / 1e3);
                let tps = timing.map(|t| t.tokens_per_s);
                self.metrics.generation(Served::Cloud, *tokens, ttft, tps);
            }
            Outcome::Failed { .. } => {}
        }
        let mut c = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Outcome::Local(g) => {
                c.done += 1;
                c.tokens_out += g.completion_tokens() as u64;
                if g.completion_tokens() > 1 {
                    c.tokens_per_s = ewma(c.tokens_per_s, g.decode_tokens_per_second());
                }
                if g.completion_tokens() > 0 {
                    c.ttft_ms = ewma(c.ttft_ms, ms(g.queue_time + g.ttft));
                }
            }
            Outcome::Cloud { tokens, timing } => {
                c.done += 1;
                c.tokens_out += tokens as u64;
                if let Some(t) = timing {
                    c.cloud_ttft_ms = ewma(c.cloud_ttft_ms, t.ttft_ms);
                    if t.tokens_per_s > 0.0 {
                        c.cloud_tokens_per_s = ewma(c.cloud_tokens_per_s, t.tokens_per_s);
                    }
                }
            }
            Outcome::Failed { cloud } => {
                c.failed += 1;
                if let Some(cause) = cloud {
                    *c.cloud_errors.entry(cause.as_str()).or_default() += 1;
                }
            }
        }
    }

    fn close(&self, seq: u64) {
        self.release(seq);
        self.in_flight.remove(&seq);
    }
}

/// The promise of exactly one terminal reply for an accepted request. [`Completion::finish`] sends it; a
/// completion dropped without one (a panic, a dropped task) sends an `internal` error instead. Either way the
/// request's counters are updated, its KV reservation is freed and it leaves the in-flight set, before the
/// terminal reply goes out (a client that reads it and asks for `status` sees the request gone).
pub(super) struct Completion {
    ledger: Arc<Ledger>,
    seq: u64,
    id: Id,
    origin: RequestOrigin,
    tx: UnboundedSender<Reply>,
    open: bool,
}

impl Completion {
    pub fn id(&self) -> &Id {
        &self.id
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sends a reply that is not the last; false when the requester is gone.
    pub fn send(&self, reply: Reply) -> bool {
        debug_assert!(!reply.is_terminal());
        self.tx.send(reply).is_ok()
    }

    /// True when the requester is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ends the request with `reply`, counted as `outcome`.
    pub fn finish(mut self, reply: Reply, outcome: Outcome) {
        debug_assert!(reply.is_terminal());
        self.open = false;
        self.ledger.record(self.origin, &reply, outcome);
        self.ledger.close(self.seq);
        let _ = self.tx.send(reply);
    }

    /// Ends the request with `error`.
    pub fn fail(self, error: WireError, cloud: Option<Cause>) {
        let reply = error.with_id(&self.id).into();
        self.finish(reply, Outcome::Failed { cloud });
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        log::error!(id:% = self.id, seq = self.seq; "an accepted request ended without a terminal reply");
        let reply: Reply = WireError::from(Refusal::Unanswered)
            .with_id(&self.id)
            .into();
        self.ledger
            .record(self.origin, &reply, Outcome::Failed { cloud: None });
        self.ledger.close(self.seq);
        let _ = self.tx.send(reply);
    }
}
