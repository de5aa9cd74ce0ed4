//! `{"cmd":"status"}`: a snapshot of the engine, the counters, memory, latency, the governor and the cloud.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::Dispatcher;
use crate::protocol::status::{
    CloudStatus, EngineStatus, LatencyStatus, MemoryStatus, RequestCounts, RouteLatency,
};
use crate::protocol::{Id, Status};

fn owned(m: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

impl Dispatcher {
    /// A snapshot for `{"cmd":"status"}`, answering the message with `id`.
    pub fn status(&self, id: Option<Id>) -> Status {
        let backend = &self.local.backend;
        let h = backend.health();
        let c = self.ledger.counters();
        let latency = LatencyStatus {
            local: RouteLatency::rounded(c.ttft_ms, c.tokens_per_s),
            cloud: RouteLatency::rounded(c.cloud_ttft_ms, c.cloud_tokens_per_s),
        };
        Status {
            id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            model: backend.name().to_string(),
            state: if self.draining.load(Ordering::SeqCst) {
                "draining"
            } else {
                "ready"
            }
            .to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            engine: EngineStatus {
                alive: h.is_alive(self.opts.stall_limit),
                slots: h.slots,
                running: h.running,
                queue_depth: h.waiting,
                threads: backend.threads(),
                kernel: backend.kernel().to_string(),
            },
            requests: RequestCounts {
                accepted: c.accepted,
                served: c.done,
                failed: c.failed,
                rejected: c.rejected,
                deferred: c.deferred,
                in_flight: self.in_flight(),
                tokens_generated: c.tokens_out,
                routes: c
                    .routes
                    .iter()
                    .map(|(route, reasons)| (route.to_string(), owned(reasons)))
                    .collect(),
                fallbacks: owned(&c.fallbacks),
            },
            tokens_per_s: latency.local.tokens_per_s,
            ttft_ms: latency.local.ttft_ms,
            memory: MemoryStatus {
                rss_bytes: crate::budget::process_rss_bytes(),
                rss_before_model_bytes: self.opts.rss_before_model,
                budget_bytes: self.opts.memory_budget,
                kv_reserved_bytes: self.ledger.reserved_bytes(),
            },
            latency,
            budget: self.opts.budget.as_ref().map(|b| b.borrow().clone()),
            cloud: self.opts.cloud.as_ref().map(|r| CloudStatus {
                model: r.client.model().to_string(),
                link: r.link.status(),
                circuit_open: r.client.circuit_open(),
                cached_answers: r.client.cached_answers(),
                errors: owned(&c.cloud_errors),
                deferred_pending: r.queue.pending(),
                deferred_results: r.queue.results(),
            }),
        }
    }
}
