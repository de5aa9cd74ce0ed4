//! The `[cloud]`, `[router]` and `[defer]` sections: raw (what the file says, with its defaults) and
//! validated. What each option means is documented in `defaults.toml`, next to its default.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::raw::ByteSize;
use super::{ConfigError, Env};

/// `[cloud]`: the Kimi client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCloud {
    /// Off: nothing ever leaves the board, whatever key is around.
    pub enabled: bool,
    pub base_url: String,
    pub model: String,
    pub api_key_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for a proxy that intercepts TLS.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub stall_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub requests_per_minute: u32,
    pub max_concurrency: usize,
    pub max_retries: u32,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    pub breaker_failures: u32,
    pub breaker_open_secs: u64,
    pub cache_entries: usize,
    pub probe_interval_secs: u64,
    pub probe_timeout_ms: u64,
    pub min_answer_tokens: usize,
    pub reasoning_budget_tokens: usize,
}

impl Default for RawCloud {
    fn default() -> Self {
        RawCloud {
            enabled: true,
            base_url: "https://api.moonshot.ai/v1".into(),
            model: "auto".into(),
            api_key_file: None,
            ca_file: None,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 30_000,
            stall_timeout_ms: 30_000,
            request_timeout_ms: 300_000,
            requests_per_minute: 20,
            max_concurrency: 2,
            max_retries: 3,
            retry_min_ms: 500,
            retry_max_ms: 20_000,
            breaker_failures: 5,
            breaker_open_secs: 30,
            cache_entries: 256,
            probe_interval_secs: 60,
            probe_timeout_ms: 5_000,
            min_answer_tokens: 256,
            reasoning_budget_tokens: 4096,
        }
    }
}

/// `[router]`: what `route: "auto"` sends to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouter {
    pub complexity_threshold: f32,
    /// `None`: the built-in list (see `router::complexity::DEFAULT_KEYWORDS`).
    pub keywords: Option<Vec<String>>,
    pub long_prompt_chars: usize,
    pub long_context_chars: usize,
    pub fallback_to_local: bool,
}

impl Default for RawRouter {
    fn default() -> Self {
        RawRouter {
            complexity_threshold: 0.6,
            keywords: None,
            long_prompt_chars: 1500,
            long_context_chars: 10_000,
            fallback_to_local: true,
        }
    }
}

/// `[defer]`: store-and-forward of cloud requests while offline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDefer {
    /// `None`: `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/bitnetd`, else `./bitnetd-state`.
    pub state_dir: Option<PathBuf>,
    pub max_tasks: usize,
    pub max_bytes: ByteSize,
    pub max_age_secs: u64,
    pub result_retention_secs: u64,
    pub max_results: usize,
}

impl Default for RawDefer {
    fn default() -> Self {
        RawDefer {
            state_dir: None,
            max_tasks: 256,
            max_bytes: ByteSize::Text("16M".into()),
            max_age_secs: 86_400,
            result_retention_secs: 86_400,
            max_results: 1024,
        }
    }
}

/// The validated `[cloud]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudConfig {
    pub enabled: bool,
    /// `http://` or `https://`, without a trailing `/`.
    pub base_url: String,
    /// `auto` or a model id (see `cloud::models`).
    pub model: String,
    pub api_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Until the response headers, and then until the first stream event.
    pub first_byte_timeout: Duration,
    /// Longest silence inside a stream.
    pub stall_timeout: Duration,
    /// One attempt, whole.
    pub request_timeout: Duration,
    /// At least 1.
    pub requests_per_minute: u32,
    /// At least 1.
    pub max_concurrency: usize,
    pub max_retries: u32,
    pub retry_min: Duration,
    /// At least `retry_min`.
    pub retry_max: Duration,
    /// At least 1.
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    pub cache_entries: usize,
    pub probe_every: Duration,
    pub probe_timeout: Duration,
    /// At least 1: the smallest answer a thinking model is given room for (`cloud::models::max_tokens`).
    pub min_answer_tokens: usize,
    /// Tokens a thinking model may reason for, on top of its answer.
    pub reasoning_budget_tokens: usize,
}

/// The validated `[router]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// In [0, 1]; above 1 never escalates on complexity.
    pub complexity_threshold: f32,
    /// Lower-case.
    pub keywords: Vec<String>,
    /// At least 1.
    pub long_prompt_chars: usize,
    /// At least 1: a request's `context` longer than this (characters) goes to the cloud.
    pub long_context_chars: usize,
    pub fallback_to_local: bool,
}

/// The validated `[defer]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DeferConfig {
    pub state_dir: PathBuf,
    /// At least 1.
    pub max_tasks: usize,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub result_retention: Duration,
    /// At least 1.
    pub max_results: usize,
}

type Invalid<'a> = &'a dyn Fn(&str, String) -> ConfigError;

pub(super) fn validate_cloud(c: &RawCloud, invalid: Invalid) -> Result<CloudConfig, ConfigError> {
    let url = c.base_url.trim_end_matches('/');
    if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 10 {
        return Err(invalid(
            "cloud.base_url",
            format!("{:?} is not an http(s) URL", c.base_url),
        ));
    }
    if c.model.trim().is_empty() {
        return Err(invalid("cloud.model", "must not be empty".into()));
    }
    let positive = |key: &str, v: u64| {
        if v == 0 {
            Err(invalid(key, "must be at least 1".into()))
        } else {
            Ok(v)
        }
    };
    let ms = |key: &str, v: u64| positive(key, v).map(Duration::from_millis);
    positive("cloud.requests_per_minute", c.requests_per_minute.into())?;
    positive("cloud.max_concurrency", c.max_concurrency as u64)?;
    positive("cloud.breaker_failures", c.breaker_failures.into())?;
    if c.retry_max_ms < c.retry_min_ms {
        return Err(invalid(
            "cloud.retry_max_ms",
            "must be at least retry_min_ms".into(),
        ));
    }
    Ok(CloudConfig {
        enabled: c.enabled,
        base_url: url.to_string(),
        model: c.model.trim().to_string(),
        api_key_file: c.api_key_file.clone(),
        ca_file: c.ca_file.clone(),
        connect_timeout: ms("cloud.connect_timeout_ms", c.connect_timeout_ms)?,
        first_byte_timeout: ms("cloud.first_byte_timeout_ms", c.first_byte_timeout_ms)?,
        stall_timeout: ms("cloud.stall_timeout_ms", c.stall_timeout_ms)?,
        request_timeout: ms("cloud.request_timeout_ms", c.request_timeout_ms)?,
        requests_per_minute: c.requests_per_minute,
        max_concurrency: c.max_concurrency,
        max_retries: c.max_retries,
        retry_min: ms("cloud.retry_min_ms", c.retry_min_ms)?,
        retry_max: Duration::from_millis(c.retry_max_ms),
        breaker_failures: c.breaker_failures,
        breaker_open: Duration::from_secs(positive(
            "cloud.breaker_open_secs",
            c.breaker_open_secs,
        )?),
        cache_entries: c.cache_entries,
        probe_every: Duration::from_secs(positive(
            "cloud.probe_interval_secs",
            c.probe_interval_secs,
        )?),
        probe_timeout: ms("cloud.probe_timeout_ms", c.probe_timeout_ms)?,
        min_answer_tokens: positive("cloud.min_answer_tokens", c.min_answer_tokens as u64)?
            as usize,
        reasoning_budget_tokens: c.reasoning_budget_tokens,
    })
}

pub(super) fn validate_router(
    r: &RawRouter,
    invalid: Invalid,
) -> Result<RouterConfig, ConfigError> {
    if !(r.complexity_threshold.is_finite() && r.complexity_threshold >= 0.0) {
        return Err(invalid(
            "router.complexity_threshold",
            "must be 0 or more (above 1 turns complexity routing off)".into(),
        ));
    }
    if r.long_prompt_chars == 0 {
        return Err(invalid(
            "router.long_prompt_chars",
            "must be at least 1".into(),
        ));
    }
    if r.long_context_chars == 0 {
        return Err(invalid(
            "router.long_context_chars",
            "must be at least 1".into(),
        ));
    }
    let keywords = match &r.keywords {
        Some(k) => {
            if k.iter().any(|w| w.trim().is_empty()) {
                return Err(invalid("router.keywords", "an empty keyword".into()));
            }
            k.iter().map(|w| w.trim().to_lowercase()).collect()
        }
        None => crate::router::complexity::DEFAULT_KEYWORDS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    Ok(RouterConfig {
        complexity_threshold: r.complexity_threshold,
        keywords,
        long_prompt_chars: r.long_prompt_chars,
        long_context_chars: r.long_context_chars,
        fallback_to_local: r.fallback_to_local,
    })
}

pub(super) fn validate_defer(
    d: &RawDefer,
    env: &Env,
    invalid: Invalid,
) -> Result<DeferConfig, ConfigError> {
    let max_bytes = d
        .max_bytes
        .bytes()
        .map_err(|m| invalid("defer.max_bytes", m))?;
    if max_bytes < 4096 {
        return Err(invalid("defer.max_bytes", "must be at least 4K".into()));
    }
    if d.max_tasks == 0 {
        return Err(invalid("defer.max_tasks", "must be at least 1".into()));
    }
    if d.max_results == 0 {
        return Err(invalid("defer.max_results", "must be at least 1".into()));
    }
    if d.max_age_secs == 0 || d.result_retention_secs == 0 {
        let key = if d.max_age_secs == 0 {
            "defer.max_age_secs"
        } else {
            "defer.result_retention_secs"
        };
        return Err(invalid(key, "must be at least 1".into()));
    }
    Ok(DeferConfig {
        state_dir: d
            .state_dir
            .clone()
            .unwrap_or_else(|| env.default_state_dir()),
        max_tasks: d.max_tasks,
        max_bytes,
        max_age: Duration::from_secs(d.max_age_secs),
        result_retention: Duration::from_secs(d.result_retention_secs),
        max_results: d.max_results,
    })
}
