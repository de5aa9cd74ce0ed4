//! Prometheus metrics (`GET /metrics` of [`crate::http`]): counters and histograms the dispatcher's books feed
//! as requests end, and gauges read from [`Status`] at each scrape, so that `/metrics` and `status` cannot
//! disagree. Names and labels are listed in `docs/http.md`; a label value is always one of a fixed set (a
//! source, a route, a reason, an outcome, an error code), never a request's text or id.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::{ErrorCode, Reply, Served, Status};

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One request's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `socket`, `mqtt`, `http`.
    source: String,
    /// `local`, `cloud`, `deferred`, or `none` for a request refused before it had a route.
    route: String,
    /// The router's reason (`simple`, `private`, ...), or the error code of a refusal.
    reason: String,
    /// `ok`, `cancelled`, `error`, `deferred`, `rejected`.
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// Where and why an accepted request ran, kept until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestOrigin {
    pub source: &'static str,
    pub route: &'static str,
    pub reason: &'static str,
}

impl RequestOrigin {
    /// Where the request was sent, as its ticket tells the source.
    pub fn routed(&self) -> crate::dispatch::Routed {
        crate::dispatch::Routed {
            route: self.route,
            reason: self.reason,
        }
    }
}

/// The counters and histograms (cheap to clone: the families are shared).
#[derive(Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    tokens: Family<RouteLabel, Counter>,
    errors: Family<CodeLabel, Counter>,
    ttft: Family<RouteLabel, Histogram>,
    decode: Family<RouteLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            tokens: Family::default(),
            errors: Family::default(),
            // 50 ms to about 100 s.
            ttft: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 12))
            }),
            // 0.5 to 256 tokens/s.
            decode: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.5, 2.0, 10))
            }),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    fn request(&self, source: &str, route: &str, reason: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                source: source.into(),
                route: route.into(),
                reason: reason.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str().into(),
            })
            .inc();
    }

    /// A message from `source` refused before it was accepted, with `code`.
    pub fn rejected(&self, source: &str, code: ErrorCode) {
        self.request(source, "none", code.as_str(), "rejected");
        self.error(code);
    }

    /// A request accepted into the deferred queue (its later result is not counted again).
    pub fn deferred(&self, source: &str, reason: &str) {
        self.request(source, "deferred", reason, "deferred");
    }

    /// An accepted request ended with `reply` (its terminal reply). The route is where it ran (a cloud request
    /// that fell back counts as local).
    pub fn finished(&self, origin: RequestOrigin, reply: &Reply) {
        match reply {
            Reply::Done(d) => {
                let outcome = match d.finish_reason {
                    crate::engine::FinishReason::Cancelled => "cancelled",
                    _ => "ok",
                };
                self.request(origin.source, d.route.as_str(), origin.reason, outcome);
            }
            // A cloud request whose client left ends with a `cancelled` cause: a cancellation, not a failure.
            Reply::Error(e) if e.cause.as_deref() == Some("cancelled") => {
                self.request(origin.source, origin.route, origin.reason, "cancelled");
            }
            Reply::Error(e) => {
                self.request(origin.source, origin.route, origin.reason, "error");
                self.error(e.code);
            }
            _ => self.request(origin.source, origin.route, origin.reason, "deferred"),
        }
    }

    /// A generation that produced `tokens`, its time to first token (from acceptance) and its decode speed
    /// (`None` with fewer than two tokens).
    pub fn generation(
        &self,
        route: Served,
        tokens: usize,
        ttft_s: Option<f64>,
        tokens_per_s: Option<f64>,
    ) {
        let label = RouteLabel {
            route: route.as_str().into(),
        };
        self.tokens.get_or_create(&label).inc_by(tokens as u64);
        if let Some(t) = ttft_s {
            self.ttft.get_or_create(&label).observe(t);
        }
        if let Some(s) = tokens_per_s.filter(|s| *s > 0.0) {
            self.decode.get_or_create(&label).observe(s);
        }
    }

    /// Everything, in the OpenMetrics text format, with the gauges taken from `status`.
    pub fn render(&self, status: &Status) -> String {
        let mut r = Registry::with_prefix("bitnetd");
        r.register(
            "requests",
            "Requests by source, route, reason and outcome",
            self.requests.clone(),
        );
        r.register(
            "tokens_generated",
            "Tokens generated, by where they were generated",
            self.tokens.clone(),
        );
        r.register("errors", "Error replies by code", self.errors.clone());
        r.register(
            "time_to_first_token_seconds",
            "Time from acceptance to the first token, by route",
            self.ttft.clone(),
        );
        r.register(
            "decode_tokens_per_second",
            "Decode speed after the first token, by route",
            self.decode.clone(),
        );
        gauges(&mut r, status);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// The wire name of a serde enum (`"warm"`).
fn wire<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: impl Into<f64>) {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(v.into());
    r.register(name, help, g);
}

/// A gauge with one series per possible state, 1 for the current one.
fn state_set(r: &mut Registry, name: &str, help: &str, states: &[&str], current: &str) {
    let f = Family::<StateLabel, Gauge>::default();
    for s in states {
        f.get_or_create(&StateLabel { state: (*s).into() })
            .set((*s == current) as i64);
    }
    r.register(name, help, f);
}

/// The gauges of one scrape; a reading the board does not have (no thermal sensor, no battery) is left out
/// rather than reported as zero.
fn gauges(r: &mut Registry, s: &Status) {
    let e = &s.engine;
    gauge(
        r,
        "engine_alive",
        "1 while every engine slot lives",
        e.alive as u8,
    );
    gauge(
        r,
        "engine_slots",
        "Engine slots (requests that run at once)",
        e.slots as f64,
    );
    gauge(
        r,
        "engine_running",
        "Requests running on the engine",
        e.running as f64,
    );
    gauge(
        r,
        "queue_depth",
        "Requests waiting for an engine slot",
        e.queue_depth as f64,
    );
    gauge(
        r,
        "inference_threads",
        "Threads of a forward pass now",
        e.threads as f64,
    );
    gauge(
        r,
        "in_flight",
        "Requests accepted and not yet answered",
        s.requests.in_flight as f64,
    );
    gauge(
        r,
        "kv_reserved_bytes",
        "KV cache bytes reserved by the requests in flight",
        s.memory.kv_reserved_bytes as f64,
    );
    if let Some(rss) = s.memory.rss_bytes {
        gauge(
            r,
            "resident_memory_bytes",
            "The daemon's resident size",
            rss as f64,
        );
    }
    gauge(
        r,
        "memory_budget_bytes",
        "The memory budget ([budget] memory_bytes)",
        s.memory.budget_bytes as f64,
    );
    gauge(
        r,
        "uptime_seconds",
        "Seconds since the daemon started",
        s.uptime_s,
    );
    if let Some(b) = &s.budget {
        if let Some(t) = b.temperature_c {
            gauge(r, "temperature_celsius", "The hottest thermal zone", t);
        }
        state_set(
            r,
            "thermal_level",
            "The governor's thermal level",
            &["normal", "warm", "hot"],
            &wire(&b.state.thermal),
        );
        gauge(
            r,
            "under_voltage",
            "1 while the board reports under-voltage",
            b.state.under_voltage as u8,
        );
        gauge(
            r,
            "memory_pressure",
            "1 while the governor sees memory pressure",
            b.state.memory_pressure as u8,
        );
        state_set(
            r,
            "power_level",
            "The governor's power level",
            &["normal", "economy", "critical"],
            &wire(&b.state.power_level),
        );
        let p = &b.power;
        if let Some(on) = p.on_battery {
            gauge(
                r,
                "on_battery",
                "1 while the board runs on battery",
                on as u8,
            );
        }
        if let Some(pct) = p.battery_percent {
            gauge(r, "battery_percent", "Battery capacity left", pct);
        }
        if let Some(w) = p.watts {
            gauge(r, "power_watts", "The board's power draw", w);
        }
    }
    if let Some(c) = &s.cloud {
        state_set(
            r,
            "cloud_link",
            "The cloud link's state",
            &["online", "offline"],
            c.link.state.as_str(),
        );
        gauge(
            r,
            "cloud_circuit_open",
            "1 while the cloud circuit breaker is open",
            c.circuit_open as u8,
        );
        gauge(
            r,
            "deferred_tasks",
            "Deferred tasks waiting for the cloud",
            c.deferred_pending as f64,
        );
        gauge(
            r,
            "deferred_results",
            "Results of deferred tasks kept for pickup",
            c.deferred_results as f64,
        );
    }
}
