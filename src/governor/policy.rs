//! The governor's policy: a pure state machine over telemetry readings. It decides the thermal level (with
//! hysteresis), notices under-voltage and memory pressure, takes a cgroup limit below the configured budget as
//! the real budget, follows the battery and the power limit (`super::power`), and turns all of it into a
//! [`Directive`] for the scheduler and the router. No I/O; every transition is unit-tested by name.

use super::power::{battery_level, power_cap, PowerLevel, PowerLimits};
use super::telemetry::Reading;

/// Thresholds, from `[budget]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Above this (°C): warm, fewer threads.
    pub soft_temp_c: f32,
    /// Above this (°C): hot, local inference pauses.
    pub hard_temp_c: f32,
    /// A level is left only this far (°C) below the threshold that raised it.
    pub hysteresis_c: f32,
    /// The configured memory budget.
    pub memory_bytes: u64,
    /// Memory pressure: PSI `some avg10` at or above this percentage.
    pub psi_some_avg10: f32,
    /// Memory pressure: system `MemAvailable` below this.
    pub min_available_bytes: u64,
    /// The inference threads when all is well.
    pub max_threads: usize,
    /// Warm or under-voltage: this percentage of `max_threads` (at least one thread).
    pub warm_threads_percent: u8,
    /// Under memory pressure, running generations stop after this many tokens (`finish_reason: "budget"`).
    pub pressure_max_tokens: usize,
    /// The battery and the board's draw.
    pub power: PowerLimits,
    /// On a low battery (economy), generations stop after this many tokens.
    pub economy_max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            soft_temp_c: 75.0,
            hard_temp_c: 82.0,
            hysteresis_c: 5.0,
            memory_bytes: 4 << 30,
            psi_some_avg10: 10.0,
            min_available_bytes: 128 << 20,
            max_threads: 4,
            warm_threads_percent: 50,
            pressure_max_tokens: 32,
            power: PowerLimits::default(),
            economy_max_tokens: 64,
        }
    }
}

/// How hot the board runs.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Thermal {
    #[default]
    Normal,
    Warm,
    Hot,
}

/// The governor's state after a reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub thermal: Thermal,
    pub under_voltage: bool,
    pub memory_pressure: bool,
    /// The configured budget, or a tighter cgroup limit.
    pub memory_budget: u64,
    /// True when a cgroup limit is below the configured budget.
    pub cgroup_limited: bool,
    /// The battery's level (normal off battery).
    #[serde(default)]
    pub power_level: PowerLevel,
    /// Threads the power limit allows (every thread without one; 0 before the first reading).
    #[serde(default)]
    pub power_threads: usize,
}

/// What the scheduler and router should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Directive {
    /// Inference threads to use.
    pub threads: usize,
    /// Local inference is paused (too hot): route to the cloud if allowed, else wait or refuse.
    pub local_paused: bool,
    /// New local work may be admitted (false under memory pressure).
    pub admit_local: bool,
    /// Hint for refused or waiting requests, in milliseconds.
    pub retry_after_ms: Option<u64>,
    /// Prompt tokens per prefill step: smaller batches when warm or under-voltage.
    pub prefill_chunk: usize,
    /// Memory pressure: running generations stop after this many tokens.
    pub max_new_tokens: Option<usize>,
    /// Memory pressure: release what can be rebuilt (idle KV caches, the cloud answer cache).
    pub free_caches: bool,
    /// Low battery: `auto` requests go to the cloud when it is online.
    #[serde(default)]
    pub prefer_cloud: bool,
    /// Critical battery: local work is refused (`over_budget`).
    #[serde(default)]
    pub battery_critical: bool,
}

/// The next state from `prev` and a new reading. Missing readings keep the previous level (a sensor that
/// vanishes does not cool the board).
pub fn step(prev: &State, r: &Reading, l: &Limits) -> State {
    let thermal = match r.temperature_c {
        None => prev.thermal,
        Some(t) => thermal_level(prev.thermal, t, l),
    };
    let cgroup = r.cgroup.limit();
    let memory_budget = cgroup.map_or(l.memory_bytes, |c| c.min(l.memory_bytes));
    let cgroup_near_limit = match (r.cgroup.current, cgroup) {
        (Some(cur), Some(lim)) => cur.saturating_mul(10) >= lim.saturating_mul(9),
        _ => false,
    };
    let memory_pressure = r
        .memory_pressure_some_avg10
        .is_some_and(|p| p >= l.psi_some_avg10)
        || r.mem_available_bytes
            .is_some_and(|a| a < l.min_available_bytes)
        || cgroup_near_limit;
    State {
        thermal,
        under_voltage: r.under_voltage(),
        memory_pressure,
        memory_budget,
        cgroup_limited: cgroup.is_some_and(|c| c < l.memory_bytes),
        power_level: battery_level(prev.power_level, &r.power, &l.power),
        power_threads: power_cap(prev.power_threads, r.power.watts, l.max_threads, &l.power),
    }
}

fn thermal_level(prev: Thermal, t: f32, l: &Limits) -> Thermal {
    if t >= l.hard_temp_c {
        return Thermal::Hot;
    }
    match prev {
        Thermal::Hot if t >= l.hard_temp_c - l.hysteresis_c => Thermal::Hot,
        _ if t >= l.soft_temp_c => Thermal::Warm,
        Thermal::Hot | Thermal::Warm if t >= l.soft_temp_c - l.hysteresis_c => Thermal::Warm,
        _ => Thermal::Normal,
    }
}

/// Prompt tokens per prefill step when warm or under-voltage (a quarter of the normal step).
pub const WARM_PREFILL_CHUNK: usize = crate::engine::PREFILL_CHUNK / 4;

/// Retry hint while the battery is critical: it takes minutes of charging to leave the level.
pub const BATTERY_RETRY_MS: u64 = 60_000;

/// What `state` asks of the scheduler and router.
pub fn directive(state: &State, l: &Limits) -> Directive {
    let economy = state.power_level >= PowerLevel::Economy;
    let constrained = state.thermal >= Thermal::Warm || state.under_voltage || economy;
    let threads = if constrained {
        (l.max_threads * usize::from(l.warm_threads_percent.min(100)) / 100).max(1)
    } else {
        l.max_threads
    };
    let threads = match state.power_threads {
        0 => threads,
        cap => threads.min(cap),
    };
    let local_paused = state.thermal == Thermal::Hot;
    let battery_critical = state.power_level == PowerLevel::Critical;
    let admit_local = !local_paused && !state.memory_pressure && !battery_critical;
    let caps = [
        state.memory_pressure.then_some(l.pressure_max_tokens),
        economy.then_some(l.economy_max_tokens),
    ];
    Directive {
        threads,
        local_paused,
        admit_local,
        retry_after_ms: (!admit_local).then_some(if local_paused {
            30_000
        } else if battery_critical {
            BATTERY_RETRY_MS
        } else {
            5_000
        }),
        prefill_chunk: if constrained {
            WARM_PREFILL_CHUNK
        } else {
            crate::engine::PREFILL_CHUNK
        },
        max_new_tokens: caps.into_iter().flatten().min(),
        free_caches: state.memory_pressure,
        prefer_cloud: economy,
        battery_critical,
    }
}

#[cfg(test)]
mod tests;
