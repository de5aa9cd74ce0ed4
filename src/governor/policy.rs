//! The governor's policy: a pure state machine over telemetry readings. It decides the thermal level (with
//! hysteresis), notices under-voltage and memory pressure, takes a cgroup limit below the configured budget as
//! the real budget, and turns all of it into a [`Directive`] for the scheduler and the router. No I/O; every
//! transition is unit-tested by name.

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

/// What `state` asks of the scheduler and router.
pub fn directive(state: &State, l: &Limits) -> Directive {
    let constrained = state.thermal >= Thermal::Warm || state.under_voltage;
    let threads = if constrained {
        (l.max_threads * usize::from(l.warm_threads_percent.min(100)) / 100).max(1)
    } else {
        l.max_threads
    };
    let local_paused = state.thermal == Thermal::Hot;
    let admit_local = !local_paused && !state.memory_pressure;
    Directive {
        threads,
        local_paused,
        admit_local,
        retry_after_ms: (!admit_local).then_some(if local_paused { 30_000 } else { 5_000 }),
        prefill_chunk: if constrained {
            WARM_PREFILL_CHUNK
        } else {
            crate::engine::PREFILL_CHUNK
        },
        max_new_tokens: state.memory_pressure.then_some(l.pressure_max_tokens),
        free_caches: state.memory_pressure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governor::telemetry::{CgroupMemory, Throttle};

    fn at(temp: f32) -> Reading {
        Reading {
            temperature_c: Some(temp),
            ..Default::default()
        }
    }

    fn run(temps: &[f32]) -> Vec<Thermal> {
        let l = Limits::default();
        let mut s = State::default();
        temps
            .iter()
            .map(|&t| {
                s = step(&s, &at(t), &l);
                s.thermal
            })
            .collect()
    }

    #[test]
    fn normal_to_warm_to_hot_and_back_to_normal_with_hysteresis() {
        use Thermal::*;
        assert_eq!(
            run(&[60.0, 75.0, 82.0, 78.0, 76.9, 74.0, 70.1, 69.9]),
            [Normal, Warm, Hot, Hot, Warm, Warm, Warm, Normal]
        );
    }

    #[test]
    fn warm_does_not_flap_around_the_soft_limit() {
        use Thermal::*;
        assert_eq!(
            run(&[75.1, 74.9, 75.1, 74.0, 71.0]),
            [Warm, Warm, Warm, Warm, Warm]
        );
    }

    #[test]
    fn straight_to_hot_from_normal() {
        assert_eq!(run(&[50.0, 90.0]), [Thermal::Normal, Thermal::Hot]);
    }

    #[test]
    fn a_missing_temperature_keeps_the_level() {
        let l = Limits::default();
        let hot = step(&State::default(), &at(85.0), &l);
        assert_eq!(step(&hot, &Reading::default(), &l).thermal, Thermal::Hot);
    }

    #[test]
    fn warm_halves_the_threads_and_hot_pauses_local_inference() {
        let l = Limits::default();
        let d = |t| directive(&step(&State::default(), &at(t), &l), &l);
        assert_eq!(
            d(60.0),
            Directive {
                threads: 4,
                local_paused: false,
                admit_local: true,
                retry_after_ms: None,
                prefill_chunk: crate::engine::PREFILL_CHUNK,
                max_new_tokens: None,
                free_caches: false,
            }
        );
        assert_eq!(d(76.0).threads, 2);
        assert_eq!(
            d(76.0).prefill_chunk,
            WARM_PREFILL_CHUNK,
            "smaller batches when warm"
        );
        assert!(d(76.0).admit_local);
        let hot = d(83.0);
        assert!(hot.local_paused && !hot.admit_local);
        assert_eq!(hot.retry_after_ms, Some(30_000));
    }

    #[test]
    fn under_voltage_means_fewer_threads() {
        let l = Limits::default();
        let r = Reading {
            temperature_c: Some(50.0),
            throttle: Some(Throttle(1)),
            ..Default::default()
        };
        let s = step(&State::default(), &r, &l);
        assert!(s.under_voltage);
        assert_eq!(directive(&s, &l).threads, 2);
        let only_occurred = Reading {
            throttle: Some(Throttle(1 << 16)),
            ..Default::default()
        };
        assert!(
            !step(&s, &only_occurred, &l).under_voltage,
            "past under-voltage is not now"
        );
        let alarm = Reading {
            under_voltage_alarm: Some(true),
            ..Default::default()
        };
        assert!(step(&State::default(), &alarm, &l).under_voltage);
    }

    #[test]
    fn memory_pressure_stops_new_local_work() {
        let l = Limits::default();
        for r in [
            Reading {
                memory_pressure_some_avg10: Some(15.0),
                ..Default::default()
            },
            Reading {
                mem_available_bytes: Some(64 << 20),
                ..Default::default()
            },
            Reading {
                cgroup: CgroupMemory {
                    max: Some(1 << 30),
                    high: None,
                    current: Some(950 << 20),
                },
                ..Default::default()
            },
        ] {
            let s = step(&State::default(), &r, &l);
            assert!(s.memory_pressure, "{r:?}");
            let d = directive(&s, &l);
            assert!(!d.admit_local && !d.local_paused);
            assert_eq!(d.retry_after_ms, Some(5_000));
        }
        let calm = Reading {
            memory_pressure_some_avg10: Some(0.5),
            mem_available_bytes: Some(2 << 30),
            ..Default::default()
        };
        assert!(!step(&State::default(), &calm, &l).memory_pressure);
    }

    #[test]
    fn a_cgroup_limit_below_the_budget_becomes_the_budget() {
        let l = Limits::default();
        let r = Reading {
            cgroup: CgroupMemory {
                max: Some(3 << 30),
                high: Some(2 << 30),
                current: Some(0),
            },
            ..Default::default()
        };
        let s = step(&State::default(), &r, &l);
        assert_eq!(s.memory_budget, 2 << 30);
        assert!(s.cgroup_limited);
        let roomy = Reading {
            cgroup: CgroupMemory {
                max: Some(8 << 30),
                high: None,
                current: Some(0),
            },
            ..Default::default()
        };
        let s = step(&State::default(), &roomy, &l);
        assert_eq!(s.memory_budget, 4 << 30);
        assert!(!s.cgroup_limited);
    }

    #[test]
    fn memory_pressure_shortens_running_generations_and_frees_caches() {
        let l = Limits::default();
        let calm = directive(&State::default(), &l);
        assert_eq!((calm.max_new_tokens, calm.free_caches), (None, false));
        let pressed = State {
            memory_pressure: true,
            ..State::default()
        };
        let d = directive(&pressed, &l);
        assert_eq!((d.max_new_tokens, d.free_caches), (Some(32), true));
    }

    #[test]
    fn the_warm_thread_share_is_configurable_and_never_zero() {
        let warm = State {
            thermal: Thermal::Warm,
            ..State::default()
        };
        let l = Limits {
            max_threads: 4,
            warm_threads_percent: 25,
            ..Limits::default()
        };
        assert_eq!(directive(&warm, &l).threads, 1);
        let l = Limits {
            max_threads: 4,
            warm_threads_percent: 0,
            ..Limits::default()
        };
        assert_eq!(directive(&warm, &l).threads, 1);
        let l = Limits {
            max_threads: 8,
            warm_threads_percent: 75,
            ..Limits::default()
        };
        assert_eq!(directive(&warm, &l).threads, 6);
    }
}
