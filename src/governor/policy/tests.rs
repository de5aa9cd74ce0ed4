//! The governor policy's rules, by name.

use super::*;
use crate::governor::power::{PowerLevel, PowerLimits};
use crate::governor::supply::PowerReading;
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
            prefer_cloud: false,
            battery_critical: false,
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

fn battery(pct: f32) -> Reading {
    Reading {
        temperature_c: Some(50.0),
        power: PowerReading {
            on_battery: Some(true),
            battery_percent: Some(pct),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn a_low_battery_means_economy_fewer_threads_shorter_generations_and_the_cloud_preferred() {
    let l = Limits::default();
    let s = step(&State::default(), &battery(15.0), &l);
    assert_eq!(s.power_level, PowerLevel::Economy);
    let d = directive(&s, &l);
    assert_eq!(d.threads, 2);
    assert_eq!(d.max_new_tokens, Some(64));
    assert!(d.prefer_cloud && d.admit_local && !d.battery_critical);
    assert_eq!(d.prefill_chunk, WARM_PREFILL_CHUNK);
    let pressed = State {
        memory_pressure: true,
        ..s
    };
    assert_eq!(
        directive(&pressed, &l).max_new_tokens,
        Some(32),
        "the smaller cap wins"
    );
    let full = step(&s, &battery(90.0), &l);
    assert_eq!(full.power_level, PowerLevel::Normal);
    assert!(!directive(&full, &l).prefer_cloud);
}

#[test]
fn a_critical_battery_refuses_local_work_with_a_long_retry() {
    let l = Limits::default();
    let s = step(&State::default(), &battery(4.0), &l);
    assert_eq!(s.power_level, PowerLevel::Critical);
    let d = directive(&s, &l);
    assert!(!d.admit_local && !d.local_paused && d.battery_critical && d.prefer_cloud);
    assert_eq!(d.retry_after_ms, Some(BATTERY_RETRY_MS));
}

#[test]
fn the_power_limit_lowers_threads_below_any_other_rule() {
    let l = Limits {
        power: PowerLimits {
            power_watts: Some(5.0),
            ..Default::default()
        },
        ..Limits::default()
    };
    let over = Reading {
        temperature_c: Some(50.0),
        power: PowerReading {
            watts: Some(6.5),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut s = State::default();
    let mut threads = vec![];
    for _ in 0..4 {
        s = step(&s, &over, &l);
        threads.push(directive(&s, &l).threads);
    }
    assert_eq!(threads, [3, 2, 1, 1]);
    let warm = State {
        thermal: Thermal::Warm,
        power_threads: 3,
        ..s
    };
    assert_eq!(directive(&warm, &l).threads, 2, "the warm share is lower");
}
