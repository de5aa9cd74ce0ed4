//! The MQTT interface (`docs/mqtt.md`): devices publish requests to `<prefix>/request` and get the same replies
//! as on the Unix socket, on the v5 Response Topic (with Correlation Data), the payload's `reply_to`, or
//! `<prefix>/response/<id>`. The network loop ([`service`]) is kept apart from the pure decisions
//! ([`addressing`]); the loop never waits on inference.

pub mod addressing;
pub mod clients;
mod options;
mod service;
mod status;

use std::path::PathBuf;

pub use service::Mqtt;

/// Content type of every message bitnetd publishes.
pub const CONTENT_TYPE: &str = "application/json";

/// Why MQTT could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT password from {}: {message}", path.display())]
    Credentials { path: PathBuf, message: String },
    #[error("MQTT TLS: {0}")]
    Tls(String),
}
