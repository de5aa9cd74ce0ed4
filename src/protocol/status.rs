//! What `{"cmd":"status"}` reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Id;
use crate::governor::Budget;

/// What `{"cmd":"status"}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    pub version: String,
    pub model: String,
    /// `ready` or `draining`.
    pub state: String,
    pub uptime_s: f64,
    pub engine: EngineStatus,
    pub requests: RequestCounts,
    /// Moving average of local decode speed (absent before the first request).
    pub tokens_per_s: Option<f64>,
    /// Moving average of local time to first token, queue included.
    pub ttft_ms: Option<f64>,
    pub memory: MemoryStatus,
    /// Moving estimates of time to first token and decode speed, per route (null before a measurement).
    pub latency: LatencyStatus,
    /// The governor's view (absent when ungoverned).
    pub budget: Option<Budget>,
    /// The cloud route (absent when no cloud is configured).
    pub cloud: Option<CloudStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub alive: bool,
    pub slots: usize,
    pub running: usize,
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    pub threads: usize,
    /// The kernel running the packed ternary products (`none` for int8 exports).
    pub kernel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Accepted (each gets exactly one terminal reply).
    pub accepted: u64,
    /// Ended with `done`.
    pub served: u64,
    /// Accepted, then ended with `error`.
    pub failed: u64,
    /// Refused before acceptance (bad input, busy, ...).
    pub rejected: u64,
    /// Accepted and stored for the cloud (terminal reply `deferred`); their results come later.
    pub deferred: u64,
    pub in_flight: usize,
    pub tokens_generated: u64,
    /// Accepted requests by route (`local`, `cloud`, `deferred`), then by reason.
    pub routes: BTreeMap<String, BTreeMap<String, u64>>,
    /// Requests meant for the cloud that ran locally, by the cloud's failure cause.
    pub fallbacks: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyStatus {
    pub local: RouteLatency,
    pub cloud: RouteLatency,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RouteLatency {
    pub ttft_ms: Option<f64>,
    pub tokens_per_s: Option<f64>,
}

impl RouteLatency {
    /// Rounded to one decimal.
    pub fn rounded(ttft_ms: Option<f64>, tokens_per_s: Option<f64>) -> RouteLatency {
        let r = |v: f64| (v * 10.0).round() / 10.0;
        RouteLatency {
            ttft_ms: ttft_ms.map(r),
            tokens_per_s: tokens_per_s.map(r),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    pub rss_bytes: Option<u64>,
    /// Resident size just before the model was loaded: the daemon's own baseline.
    pub rss_before_model_bytes: Option<u64>,
    pub budget_bytes: u64,
    /// KV cache bytes reserved by the local requests in flight (admission counts them against the budget).
    #[serde(default)]
    pub kv_reserved_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudStatus {
    pub model: String,
    pub link: LinkStatus,
    pub circuit_open: bool,
    pub cached_answers: usize,
    /// Cloud failures by cause.
    pub errors: BTreeMap<String, u64>,
    /// Deferred tasks waiting, and results kept.
    pub deferred_pending: usize,
    pub deferred_results: usize,
}

/// What `status` shows about the link to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// `online` or `offline`.
    pub state: String,
    pub reason: String,
    /// Seconds since the last change.
    pub since_s: f64,
    /// Whether `GET /models` listed a model for `[cloud] model` (absent before a successful probe).
    pub model_listed: Option<bool>,
    /// When it did not: why the cloud stays off (the configured id, and what the account lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_problem: Option<String>,
}
