//! The `[mqtt]` section, validated: broker, TLS files, topics, limits, reconnection.

use std::path::PathBuf;
use std::time::Duration;

use super::{raw, ConfigError};

/// The validated `[mqtt]` section (see `defaults.toml` for each option).
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub node: String,
    /// Without wildcards or a trailing `/`.
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `Some` when TLS is on.
    pub tls: Option<MqttTls>,
    pub shared_group: Option<String>,
    pub max_payload_bytes: usize,
    /// At least `max_payload_bytes` plus room for the topic and properties.
    pub max_packet_bytes: usize,
    pub max_in_flight: usize,
    /// Requests one client may send per minute; `None`: no limit.
    pub client_requests_per_minute: Option<u32>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Publish Home Assistant MQTT discovery configs.
    pub home_assistant: bool,
}

/// TLS files for the broker connection.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttTls {
    /// `None`: the system's root certificates.
    pub ca_file: Option<PathBuf>,
    /// Both or neither.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

impl MqttConfig {
    /// The topic requests arrive on.
    pub fn request_topic(&self) -> String {
        format!("{}/request", self.topic_prefix)
    }

    /// The filter to subscribe: the request topic, through `$share/<group>/` when a group is set.
    pub fn request_filter(&self) -> String {
        match &self.shared_group {
            Some(g) => format!("$share/{g}/{}", self.request_topic()),
            None => self.request_topic(),
        }
    }

    /// The retained status topic (and the Last Will's): `<prefix>/status`, or `<prefix>/status/<node>` in a
    /// shared pool, so that each board of the pool has its own status and one board's Will marks only it
    /// offline.
    pub fn status_topic(&self) -> String {
        match &self.shared_group {
            Some(_) => format!("{}/status/{}", self.topic_prefix, self.node),
            None => format!("{}/status", self.topic_prefix),
        }
    }

    /// Where a request without a reply address is answered.
    pub fn default_response_topic(&self, id: &str) -> String {
        format!("{}/response/{id}", self.topic_prefix)
    }
}

/// The host name, made safe for a topic level.
fn node_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "bitnetd".into());
    host.replace(['/', '+', '#'], "_")
}

pub(super) fn validate_mqtt(
    m: &raw::RawMqtt,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<MqttConfig, ConfigError> {
    let bad_level = |s: &str| s.is_empty() || s.contains(['+', '#']);
    let node = m.node.clone().unwrap_or_else(node_name);
    if bad_level(&node) || node.contains('/') {
        return Err(invalid(
            "mqtt.node",
            format!("{node:?} is not a single topic level"),
        ));
    }
    let topic_prefix = m
        .topic_prefix
        .clone()
        .unwrap_or_else(|| format!("bitnetd/{node}"));
    if bad_level(&topic_prefix) || topic_prefix.ends_with('/') || topic_prefix.starts_with('$') {
        return Err(invalid(
            "mqtt.topic_prefix",
            format!("{topic_prefix:?}: no wildcards, no leading `$`, no trailing `/`"),
        ));
    }
    if let Some(g) = &m.shared_group {
        if bad_level(g) || g.contains('/') {
            return Err(invalid(
                "mqtt.shared_group",
                format!("{g:?} is not a single topic level"),
            ));
        }
    }
    if m.port == Some(0) {
        return Err(invalid("mqtt.port", "0 is not a port".into()));
    }
    if m.client_cert_file.is_some() != m.client_key_file.is_some() {
        let key = if m.client_cert_file.is_some() {
            "mqtt.client_cert_file"
        } else {
            "mqtt.client_key_file"
        };
        return Err(invalid(
            key,
            "client_cert_file and client_key_file go together".into(),
        ));
    }
    if m.max_packet_bytes > (256 << 20) - 1 || m.max_packet_bytes < 4096 {
        return Err(invalid(
            "mqtt.max_packet_bytes",
            "must be between 4096 and 268435455".into(),
        ));
    }
    if m.max_payload_bytes < 64 || m.max_payload_bytes + 2048 > m.max_packet_bytes {
        return Err(invalid(
            "mqtt.max_payload_bytes",
            format!(
                "must be at least 64 and 2048 below max_packet_bytes ({})",
                m.max_packet_bytes
            ),
        ));
    }
    if m.max_in_flight == 0 {
        return Err(invalid("mqtt.max_in_flight", "must be at least 1".into()));
    }
    if m.keep_alive_secs < 5 || m.keep_alive_secs > 65535 {
        return Err(invalid(
            "mqtt.keep_alive_secs",
            "must be between 5 and 65535".into(),
        ));
    }
    if m.reconnect_min_ms == 0 || m.reconnect_max_ms < m.reconnect_min_ms {
        return Err(invalid(
            "mqtt.reconnect_max_ms",
            "need 0 < reconnect_min_ms <= reconnect_max_ms".into(),
        ));
    }
    let tls = m.tls.then(|| MqttTls {
        ca_file: m.ca_file.clone(),
        client_auth: m.client_cert_file.clone().zip(m.client_key_file.clone()),
    });
    Ok(MqttConfig {
        host: m.host.clone(),
        port: m.port.unwrap_or(if m.tls { 8883 } else { 1883 }),
        client_id: m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("bitnetd-{node}")),
        node,
        topic_prefix,
        keep_alive: Duration::from_secs(m.keep_alive_secs),
        username: m.username.clone(),
        password_file: m.password_file.clone(),
        tls,
        shared_group: m.shared_group.clone(),
        max_payload_bytes: m.max_payload_bytes,
        max_packet_bytes: m.max_packet_bytes,
        max_in_flight: m.max_in_flight,
        client_requests_per_minute: (m.client_requests_per_minute > 0)
            .then_some(m.client_requests_per_minute),
        reconnect_min: Duration::from_millis(m.reconnect_min_ms),
        reconnect_max: Duration::from_millis(m.reconnect_max_ms),
        home_assistant: m.home_assistant,
    })
}
