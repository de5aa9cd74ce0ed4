//! Talking to systemd: readiness, status, watchdog, and stop notifications (`sd_notify`). Without
//! `$NOTIFY_SOCKET` every call does nothing, so the daemon runs the same outside systemd.

use std::time::Duration;

use sd_notify::NotifyState;

/// How much each `EXTEND_TIMEOUT_USEC` during a slow start asks for.
pub const START_EXTENSION: Duration = Duration::from_secs(30);

/// Sends service state to systemd.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier;

impl Notifier {
    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("notifying systemd: {e}");
        }
    }

    /// `READY=1` with a status line: the model is loaded and the sockets are bound.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=`: a one-line description shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// `EXTEND_TIMEOUT_USEC=`: asks for `by` more time to start or stop (a large model on an SD card).
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// `WATCHDOG=1`: the engine is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

/// How often to ping the watchdog: half of `WatchdogSec=`, or `None` when the watchdog is off.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
