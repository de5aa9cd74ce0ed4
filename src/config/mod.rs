//! Configuration in two stages, as ripgrep does: [`raw::RawConfig`] is what the TOML file says, [`Config`] is
//! the validated result with defaults and environment overrides applied. Every error names the key and, when
//! the file has it, the line.

mod cloud;
mod env;
mod error;
mod http;
mod mqtt;
pub mod raw;
mod spans;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cloud::{CloudConfig, DeferConfig, RawCloud, RawDefer, RawRouter, RouterConfig};
pub use env::Env;
pub use http::{HttpAddress, HttpConfig, RawHttp};
pub use mqtt::{MqttConfig, MqttTls};

use crate::budget::MemoryEstimate;
use crate::meta::ModelMeta;
pub use error::ConfigError;
use raw::RawConfig;

/// The commented default configuration printed by `bitnetd print-config`.
pub const DEFAULTS_TOML: &str = include_str!("defaults.toml");

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, if any.
    pub source: Option<PathBuf>,
    pub model: ModelConfig,
    pub engine: EngineConfig,
    pub socket: SocketConfig,
    pub budget: BudgetConfig,
    pub logging: LoggingConfig,
    /// `None` when MQTT is off.
    pub mqtt: Option<MqttConfig>,
    /// The OpenAI-compatible HTTP API (off unless `enabled`).
    pub http: HttpConfig,
    /// The Kimi client; it runs only when `enabled` and a key is found.
    pub cloud: CloudConfig,
    pub router: RouterConfig,
    pub defer: DeferConfig,
    /// The file's text, to name lines in later checks.
    text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// At least 1.
    pub threads: usize,
    pub kv_cache: crate::engine::KvFormat,
    pub weights: crate::engine::WeightResidency,
    pub output_layer: crate::engine::OutputLayer,
}

impl ModelConfig {
    /// How the engine should load the model.
    pub fn load_options(&self) -> crate::engine::LoadOptions {
        crate::engine::LoadOptions {
            threads: self.threads,
            kv_format: self.kv_cache,
            residency: self.weights,
            output_layer: self.output_layer,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// At least 1.
    pub slots: usize,
    /// At least 1.
    pub queue: usize,
    /// At least 1.
    pub default_max_tokens: usize,
    pub drain_timeout: Duration,
    pub stall_limit: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketConfig {
    pub enabled: bool,
    pub path: PathBuf,
    /// Where `path` came from, for the startup log.
    pub path_origin: &'static str,
    /// Permission bits (at most 0o777).
    pub mode: u32,
    pub group: Option<String>,
    /// At least 64.
    pub max_line_bytes: usize,
    pub max_connections: usize,
    pub max_requests_per_connection: usize,
    /// Status-only connections accepted beyond `max_connections`.
    pub status_connections: usize,
    /// At least 1.
    pub max_connections_per_process: usize,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    pub memory_bytes: u64,
    pub default_deadline: Option<Duration>,
    /// 0 < soft < hard.
    pub soft_temp_c: f32,
    pub hard_temp_c: f32,
    /// >= 0.
    pub hysteresis_c: f32,
    /// At least 50 ms.
    pub sample_every: Duration,
    pub telemetry_root: PathBuf,
    /// 1..=100.
    pub warm_threads_percent: u8,
    pub hot_action: HotAction,
    /// At least 1.
    pub pressure_max_tokens: usize,
    /// The battery and power limits (0 <= critical < low <= 100; a power limit above its hysteresis).
    pub power: crate::governor::power::PowerLimits,
    /// At least 1.
    pub economy_max_tokens: usize,
}

/// What happens to a local request while the board is hot (local inference paused) and the cloud cannot take
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotAction {
    /// `over_budget` at once, with `retry_after_ms`.
    Refuse,
    /// Accepted and held in the queue until the board cools (its deadline and expiry still apply).
    Queue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    /// An env_logger filter (a bare level is one).
    pub filter: String,
    pub target: LogTarget,
}

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// journald when stderr is connected to the journal (`$JOURNAL_STREAM`), else stderr.
    Auto,
    Journald,
    Stderr,
}

/// Smallest memory budget accepted at all; the model check at startup is the real bound.
const MIN_MEMORY_BYTES: u64 = 64 << 20;

impl Config {
    /// The configuration for `--config PATH` (or `$BITNETD_CONFIG`), else the defaults; `env` overrides.
    pub fn load(path: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| env.path(Env::CONFIG));
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| ConfigError::Read {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
                Config::from_toml(&text, Some(&p), env)
            }
            None => Config::from_toml("", None, env),
        }
    }

    /// Parses and validates `text` (the contents of `source`).
    pub fn from_toml(text: &str, source: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
        let file = source.map(Path::to_path_buf);
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| spans::line_col(text, s.start))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                file: file.clone(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: file.clone(),
            line: spans::line_of_key(text, key),
            key: key.to_string(),
            message,
        };
        validate(raw, env, &invalid).map(|mut c| {
            c.source = file.clone();
            c.text = text.to_string();
            c
        })
    }

    /// An [`ConfigError::Invalid`] for `key`, with its line when the file sets it.
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.clone(),
            line: spans::line_of_key(&self.text, key),
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Checks the configuration against its model: the directory holds an exported model, and the model fits
    /// the memory budget with the configured slots.
    pub fn check_model(&self) -> Result<(ModelMeta, MemoryEstimate), ConfigError> {
        let dir = &self.model.path;
        let meta = ModelMeta::read(dir)
            .map_err(|e| self.invalid("model.path", format!("{}: {e}", dir.display())))?;
        let estimate = MemoryEstimate::for_model(
            dir,
            &meta,
            self.engine.slots,
            self.model.kv_cache,
            self.model.output_layer,
        )
        .map_err(|e| self.invalid("model.path", format!("{}: {e}", dir.display())))?;
        estimate
            .check(self.budget.memory_bytes)
            .map_err(|m| self.invalid("budget.memory_bytes", m))?;
        Ok((meta, estimate))
    }
}

fn validate(
    raw: RawConfig,
    env: &Env,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Config, ConfigError> {
    let at_least = |key: &str, v: usize, min: usize| {
        if v < min {
            Err(invalid(key, format!("{v} is below the minimum of {min}")))
        } else {
            Ok(v)
        }
    };
    let model_path = match env.path(Env::MODEL) {
        Some(p) => p,
        None => raw
            .model
            .path
            .clone()
            .unwrap_or_else(crate::default_model::default_model_dir),
    };
    let threads = match env.get(Env::THREADS) {
        Some(t) => t.parse::<usize>().map_err(|_| ConfigError::Env {
            var: Env::THREADS,
            message: format!("{t:?} is not a number"),
        })?,
        None => raw.model.threads.unwrap_or_else(default_threads),
    };
    if threads == 0 {
        return Err(match env.get(Env::THREADS) {
            Some(_) => ConfigError::Env {
                var: Env::THREADS,
                message: "must be at least 1".into(),
            },
            None => invalid(
                "model.threads",
                "must be at least 1 (omit it to use every core)".into(),
            ),
        });
    }
    let e = &raw.engine;
    let engine = EngineConfig {
        slots: at_least("engine.slots", e.slots, 1)?,
        queue: at_least("engine.queue", e.queue, 1)?,
        default_max_tokens: at_least("engine.default_max_tokens", e.default_max_tokens, 1)?,
        drain_timeout: Duration::from_secs(e.drain_timeout_secs),
        stall_limit: Duration::from_secs(at_least(
            "engine.stall_limit_secs",
            e.stall_limit_secs as usize,
            5,
        )? as u64),
    };
    let s = &raw.socket;
    if s.mode > 0o777 {
        return Err(invalid(
            "socket.mode",
            format!("{:#o} is not a permission mode (at most 0o777)", s.mode),
        ));
    }
    if s.group.as_deref() == Some("") {
        return Err(invalid(
            "socket.group",
            "must not be empty (omit it)".into(),
        ));
    }
    let (path, path_origin) = match (env.path(Env::SOCKET), &s.path) {
        (Some(p), _) => (p, "BITNETD_SOCKET"),
        (None, Some(p)) => (p.clone(), "config"),
        (None, None) => env.default_socket_path(),
    };
    let socket = SocketConfig {
        enabled: s.enabled,
        path,
        path_origin,
        mode: s.mode,
        group: s.group.clone(),
        max_line_bytes: at_least("socket.max_line_bytes", s.max_line_bytes, 64)?,
        max_connections: at_least("socket.max_connections", s.max_connections, 1)?,
        max_requests_per_connection: at_least(
            "socket.max_requests_per_connection",
            s.max_requests_per_connection,
            1,
        )?,
        status_connections: s.status_connections,
        max_connections_per_process: at_least(
            "socket.max_connections_per_process",
            s.max_connections_per_process,
            1,
        )?,
        idle_timeout: (s.idle_timeout_secs > 0).then(|| Duration::from_secs(s.idle_timeout_secs)),
    };
    let memory_bytes = raw
        .budget
        .memory_bytes
        .bytes()
        .map_err(|m| invalid("budget.memory_bytes", m))?;
    if memory_bytes < MIN_MEMORY_BYTES {
        return Err(invalid(
            "budget.memory_bytes",
            format!("{memory_bytes} bytes is below the minimum of 64M"),
        ));
    }
    let b = &raw.budget;
    if !(b.soft_temp_c.is_finite() && b.soft_temp_c > 0.0) {
        return Err(invalid(
            "budget.soft_temp_c",
            format!("{} is not a temperature above 0", b.soft_temp_c),
        ));
    }
    if !(b.hard_temp_c.is_finite() && b.hard_temp_c > b.soft_temp_c) {
        return Err(invalid(
            "budget.hard_temp_c",
            format!(
                "{} must be above soft_temp_c ({})",
                b.hard_temp_c, b.soft_temp_c
            ),
        ));
    }
    if !(b.hysteresis_c.is_finite() && b.hysteresis_c >= 0.0) {
        return Err(invalid("budget.hysteresis_c", "must be 0 or more".into()));
    }
    if b.sample_ms < 50 {
        return Err(invalid("budget.sample_ms", "must be at least 50".into()));
    }
    if b.warm_threads_percent == 0 || b.warm_threads_percent > 100 {
        return Err(invalid(
            "budget.warm_threads_percent",
            "must be between 1 and 100".into(),
        ));
    }
    if b.pressure_max_tokens == 0 {
        return Err(invalid(
            "budget.pressure_max_tokens",
            "must be at least 1".into(),
        ));
    }
    let percent = |v: f32| v.is_finite() && (0.0..=100.0).contains(&v);
    if !(percent(b.battery_low_percent) && percent(b.battery_critical_percent))
        || b.battery_critical_percent >= b.battery_low_percent
    {
        return Err(invalid(
            "budget.battery_critical_percent",
            format!(
                "{} and battery_low_percent {} must be percentages with critical below low",
                b.battery_critical_percent, b.battery_low_percent
            ),
        ));
    }
    if b.economy_max_tokens == 0 {
        return Err(invalid(
            "budget.economy_max_tokens",
            "must be at least 1".into(),
        ));
    }
    if !(b.power_hysteresis_watts.is_finite() && b.power_hysteresis_watts >= 0.0) {
        return Err(invalid(
            "budget.power_hysteresis_watts",
            "must be 0 or more".into(),
        ));
    }
    if let Some(w) = b.power_watts {
        if !(w.is_finite() && w > b.power_hysteresis_watts) {
            return Err(invalid(
                "budget.power_watts",
                format!(
                    "{w} must be a power in watts above power_hysteresis_watts ({})",
                    b.power_hysteresis_watts
                ),
            ));
        }
    }
    let hot_action = match b.hot_action.as_str() {
        "refuse" => HotAction::Refuse,
        "queue" => HotAction::Queue,
        other => {
            return Err(invalid(
                "budget.hot_action",
                format!("{other:?} is not one of \"refuse\", \"queue\""),
            ))
        }
    };
    let budget = BudgetConfig {
        memory_bytes,
        default_deadline: (b.default_deadline_ms > 0)
            .then(|| Duration::from_millis(b.default_deadline_ms)),
        soft_temp_c: b.soft_temp_c,
        hard_temp_c: b.hard_temp_c,
        hysteresis_c: b.hysteresis_c,
        sample_every: Duration::from_millis(b.sample_ms),
        telemetry_root: b.telemetry_root.clone(),
        warm_threads_percent: b.warm_threads_percent,
        hot_action,
        pressure_max_tokens: b.pressure_max_tokens,
        power: crate::governor::power::PowerLimits {
            battery_low_percent: b.battery_low_percent,
            battery_critical_percent: b.battery_critical_percent,
            power_watts: b.power_watts,
            power_hysteresis_watts: b.power_hysteresis_watts,
        },
        economy_max_tokens: b.economy_max_tokens,
    };
    let filter = env.get(Env::LOG).unwrap_or(raw.logging.level.clone());
    if let Err(m) = check_filter(&filter) {
        return Err(match env.get(Env::LOG) {
            Some(_) => ConfigError::Env {
                var: Env::LOG,
                message: m,
            },
            None => invalid("logging.level", m),
        });
    }
    let target = match raw.logging.target.as_str() {
        "auto" => LogTarget::Auto,
        "journald" => LogTarget::Journald,
        "stderr" => LogTarget::Stderr,
        other => {
            return Err(invalid(
                "logging.target",
                format!("{other:?} is not one of \"auto\", \"journald\", \"stderr\""),
            ))
        }
    };
    let mqtt = match &raw.mqtt {
        Some(m) => Some(mqtt::validate_mqtt(m, invalid)?),
        None => None,
    };
    let http = http::validate_http(&raw.http, invalid)?;
    let cloud = cloud::validate_cloud(&raw.cloud, invalid)?;
    let router = cloud::validate_router(&raw.router, invalid)?;
    let defer = cloud::validate_defer(&raw.defer, env, invalid)?;
    Ok(Config {
        source: None,
        mqtt,
        http,
        cloud,
        router,
        defer,
        model: ModelConfig {
            path: model_path,
            threads,
            kv_cache: raw.model.kv_cache,
            weights: raw.model.weights,
            output_layer: raw.model.output_layer,
        },
        engine,
        socket,
        budget,
        logging: LoggingConfig { filter, target },
        text: String::new(),
    })
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Accepts a level, or an env_logger filter whose every directive names a valid level.
fn check_filter(filter: &str) -> Result<(), String> {
    let levels = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit('=').next().unwrap_or(directive);
        let bare_module =
            !directive.contains('=') && !levels.contains(&level.to_ascii_lowercase().as_str());
        if bare_module && !directive.contains("::") {
            return Err(format!(
                "{directive:?} is not a level (one of {})",
                levels.join(", ")
            ));
        }
        if directive.contains('=') && !levels.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("{directive:?}: {level:?} is not a level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
