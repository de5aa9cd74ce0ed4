//! The governor loop: samples the board every `[budget] sample_ms`, runs the policy, logs every transition,
//! and publishes the result on a `watch` channel that the dispatcher, `status` and systemd's `STATUS=` line
//! (`daemon::status`) read. It never sits in their code.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::policy::{directive, step, Directive, Limits, State};
use super::power::PowerLevel;
use super::supply::PowerReading;
use super::telemetry::{Reading, Telemetry};

/// The governor's view, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Budget {
    #[serde(flatten)]
    pub state: State,
    pub directive: Directive,
    pub temperature_c: Option<f32>,
    pub rss_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    /// Busy share of all CPUs (live system only).
    #[serde(default)]
    pub cpu_percent: Option<f32>,
    /// The supplies, the board's draw and every power, current and voltage sensor.
    #[serde(default)]
    pub power: PowerReading,
}

impl Budget {
    fn new(state: State, reading: &Reading, limits: &Limits) -> Budget {
        Budget {
            directive: directive(&state, limits),
            state,
            temperature_c: reading.temperature_c,
            rss_bytes: reading.rss_bytes,
            mem_available_bytes: reading.mem_available_bytes,
            cpu_percent: reading.cpu_percent,
            power: reading.power.clone(),
        }
    }

    /// One line for logs and systemd's `STATUS=`.
    pub fn summary(&self) -> String {
        let temp = self
            .temperature_c
            .map_or("no sensor".into(), |t| format!("{t:.1} °C"));
        let mut power = String::new();
        if self.power.on_battery == Some(true) {
            power += &match self.power.battery_percent {
                Some(p) => format!(", on battery {p:.0}%"),
                None => ", on battery".into(),
            };
        }
        if self.state.power_level != PowerLevel::Normal {
            power += &format!(" ({:?})", self.state.power_level).to_lowercase();
        }
        if let Some(w) = self.power.watts {
            power += &format!(", {w:.1} W");
        }
        format!(
            "thermal {:?} ({temp}), under-voltage {}, memory pressure {}{power}, threads {}{}",
            self.state.thermal,
            self.state.under_voltage,
            self.state.memory_pressure,
            self.directive.threads,
            if self.directive.local_paused {
                ", local inference paused"
            } else if self.directive.battery_critical {
                ", local inference refused (battery critical)"
            } else {
                ""
            }
        )
    }
}

/// Takes a first reading, then samples every `every` until `shutdown`.
pub fn spawn(
    limits: Limits,
    telemetry: Telemetry,
    every: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Budget> {
    let reading = telemetry.read_all();
    let state = step(&State::default(), &reading, &limits);
    let first = Budget::new(state, &reading, &limits);
    log::info!(thermal:? = first.state.thermal; "governor: {}", first.summary());
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let reading = telemetry.read_all();
            let prev = tx.borrow().state;
            let next = Budget::new(step(&prev, &reading, &limits), &reading, &limits);
            let changed = next.state.thermal != prev.thermal
                || next.state.under_voltage != prev.under_voltage
                || next.state.memory_pressure != prev.memory_pressure
                || next.state.memory_budget != prev.memory_budget
                || next.state.power_level != prev.power_level
                || next.state.power_threads != prev.power_threads;
            if changed {
                log::warn!(
                    thermal:? = next.state.thermal, under_voltage = next.state.under_voltage,
                    memory_pressure = next.state.memory_pressure, power:? = next.state.power_level,
                    watts:? = next.power.watts, threads = next.directive.threads;
                    "governor: {}", next.summary()
                );
            }
            tx.send_replace(next);
        }
    });
    rx
}
