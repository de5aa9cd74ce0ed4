//! Stage one of the configuration: what the TOML file says, field for field. Defaults here equal the commented
//! template `defaults.toml` (a test keeps them equal); what each option means is documented there and below.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole file. Every section and key is optional; unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub model: RawModel,
    pub engine: RawEngine,
    pub socket: RawSocket,
    pub budget: RawBudget,
    pub logging: RawLogging,
    /// Present (even empty) turns MQTT on.
    pub mqtt: Option<RawMqtt>,
    pub http: super::http::RawHttp,
    pub cloud: super::cloud::RawCloud,
    pub router: super::cloud::RawRouter,
    pub defer: super::cloud::RawDefer,
}

/// `[model]`: which model, and how many threads run it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModel {
    /// Model directory; `None` means `$BITNETD_MODEL`, else the shipped default model.
    pub path: Option<PathBuf>,
    /// Threads of a forward pass; `None` means every core. 0 is an error.
    pub threads: Option<usize>,
    /// How the KV cache stores keys and values.
    pub kv_cache: crate::engine::KvFormat,
    /// How the products' weights are held: read into memory, or mapped from the data file.
    pub weights: crate::engine::WeightResidency,
    /// How the int8 output layer runs: screened by its high 4 bits with exact candidates, or every row exactly.
    pub output_layer: crate::engine::OutputLayer,
}

/// `[engine]`: slots, queue and request defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawEngine {
    /// Requests running at once (each holds a KV cache).
    pub slots: usize,
    /// Requests waiting for a slot before `busy`.
    pub queue: usize,
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Grace time for in-flight work on shutdown.
    pub drain_timeout_secs: u64,
    /// No progress for this long on a running slot fails the watchdog.
    pub stall_limit_secs: u64,
}

impl Default for RawEngine {
    fn default() -> Self {
        RawEngine {
            slots: 1,
            queue: 8,
            default_max_tokens: 256,
            drain_timeout_secs: 20,
            stall_limit_secs: 120,
        }
    }
}

/// `[socket]`: the Unix socket API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSocket {
    pub enabled: bool,
    /// `None`: `bitnetd.sock` under `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR`, or the current directory.
    pub path: Option<PathBuf>,
    /// File mode of a socket bitnetd creates.
    pub mode: u32,
    /// Group of a socket bitnetd creates.
    pub group: Option<String>,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    pub max_requests_per_connection: usize,
    /// Status-only connections beyond `max_connections`.
    pub status_connections: usize,
    pub max_connections_per_process: usize,
    /// 0: never.
    pub idle_timeout_secs: u64,
}

impl Default for RawSocket {
    fn default() -> Self {
        RawSocket {
            enabled: true,
            path: None,
            mode: 0o660,
            group: None,
            max_line_bytes: 1 << 20,
            max_connections: 64,
            max_requests_per_connection: 16,
            status_connections: 2,
            max_connections_per_process: 16,
            idle_timeout_secs: 300,
        }
    }
}

/// `[budget]`: resource limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBudget {
    /// Bytes, as an integer or a string with a K/M/G/T suffix (powers of 1024).
    pub memory_bytes: ByteSize,
    /// Milliseconds; 0 means no deadline.
    pub default_deadline_ms: u64,
    /// °C: above it, fewer threads.
    pub soft_temp_c: f32,
    /// °C: above it, local inference pauses.
    pub hard_temp_c: f32,
    /// °C below a limit before its level is left.
    pub hysteresis_c: f32,
    /// How often the governor reads the board.
    pub sample_ms: u64,
    /// Where `/sys` and `/proc` are read from (tests and containers point it elsewhere).
    pub telemetry_root: PathBuf,
    /// Warm or under-voltage: this share of the threads.
    pub warm_threads_percent: u8,
    /// Hot, for requests that cannot go to the cloud: `refuse` or `queue`.
    pub hot_action: String,
    /// Memory pressure: running generations stop after this many tokens.
    pub pressure_max_tokens: usize,
    /// On battery at or below this charge (percent): economy (fewer threads, the cloud preferred, shorter
    /// generations).
    pub battery_low_percent: f32,
    /// On battery at or below this charge (percent): local work is refused with `over_budget`.
    pub battery_critical_percent: f32,
    /// Economy: generations stop after this many tokens.
    pub economy_max_tokens: usize,
    /// The board's draw to hold, in watts, by lowering threads; `None`: no limit.
    pub power_watts: Option<f32>,
    /// Watts below `power_watts` before threads come back.
    pub power_hysteresis_watts: f32,
}

impl Default for RawBudget {
    fn default() -> Self {
        RawBudget {
            memory_bytes: ByteSize::Text("4G".into()),
            default_deadline_ms: 0,
            soft_temp_c: 75.0,
            hard_temp_c: 82.0,
            hysteresis_c: 5.0,
            sample_ms: 1000,
            telemetry_root: PathBuf::from("/"),
            warm_threads_percent: 50,
            hot_action: "refuse".into(),
            pressure_max_tokens: 32,
            battery_low_percent: 20.0,
            battery_critical_percent: 5.0,
            economy_max_tokens: 64,
            power_watts: None,
            power_hysteresis_watts: 0.5,
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogging {
    /// A level or an env_logger filter.
    pub level: String,
    /// `auto`, `journald` or `stderr`.
    pub target: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            level: "info".into(),
            target: "auto".into(),
        }
    }
}

/// `[mqtt]`: requests from devices through a broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    pub host: String,
    /// `None`: 1883, or 8883 with TLS.
    pub port: Option<u16>,
    /// `None`: `bitnetd-<node>`.
    pub client_id: Option<String>,
    /// `None`: the host name.
    pub node: Option<String>,
    /// `None`: `bitnetd/<node>`.
    pub topic_prefix: Option<String>,
    pub keep_alive_secs: u64,
    pub username: Option<String>,
    /// Read at start; `$CREDENTIALS_DIRECTORY/mqtt-password` wins when present.
    pub password_file: Option<PathBuf>,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub shared_group: Option<String>,
    pub max_payload_bytes: usize,
    pub max_packet_bytes: usize,
    pub max_in_flight: usize,
    /// Requests one client may send per minute (burst included); 0: no limit.
    pub client_requests_per_minute: u32,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Publish Home Assistant MQTT discovery configs.
    pub home_assistant: bool,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            host: "localhost".into(),
            port: None,
            client_id: None,
            node: None,
            topic_prefix: None,
            keep_alive_secs: 30,
            username: None,
            password_file: None,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            shared_group: None,
            max_payload_bytes: 256 << 10,
            max_packet_bytes: 1 << 20,
            max_in_flight: 32,
            client_requests_per_minute: 120,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
            home_assistant: false,
        }
    }
}

/// A byte count as written in the file: `4294967296` or `"4G"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    /// The number of bytes. Suffixes K, M, G, T (optionally followed by `iB` or `B`) are powers of 1024, as in
    /// systemd's `MemoryMax=`.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(b) => Ok(*b),
            ByteSize::Text(t) => parse_bytes(t),
        }
    }
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let shift = match unit
        .trim_end_matches("iB")
        .trim_end_matches('B')
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G or T)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4G or 512M"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_use_systemd_units() {
        let b = |s: &str| ByteSize::Text(s.into()).bytes();
        assert_eq!(b("4G"), Ok(4 << 30));
        assert_eq!(b("512M"), Ok(512 << 20));
        assert_eq!(b("1.5GiB"), Ok(3 << 29));
        assert_eq!(b("2048"), Ok(2048));
        assert_eq!(b(" 64 KB "), Ok(64 << 10));
        assert!(b("4X").is_err());
        assert!(b("lots").is_err());
        assert!(b("").is_err());
        assert_eq!(ByteSize::Bytes(7).bytes(), Ok(7));
    }
}
