//! System-wide figures through the `sysinfo` crate: memory, CPU load, and component temperatures (hwmon) for
//! boards without thermal zones. The Raspberry Pi's own reads (firmware throttle flags, `rpi_volt`, thermal
//! zones, PSI, the cgroup) stay in `super::telemetry`, which sysinfo does not cover.
//!
//! sysinfo reads the live system only, so it serves a telemetry root of `/`; tests and containers that point the
//! root at another tree read the same figures from files under it (`super::telemetry`).

use std::time::Instant;

/// What one sample of the live system gives.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SystemFigures {
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    /// Busy share of all CPUs since the previous sample, in percent (`None` at the first).
    pub cpu_percent: Option<f32>,
    /// The hottest component sensor (°C), when asked for.
    pub hottest_component_c: Option<f32>,
}

/// The live system, sampled by the governor.
pub struct LiveSystem {
    sys: sysinfo::System,
    /// Listed on first use: only boards without thermal zones need them.
    components: Option<sysinfo::Components>,
    sampled: Option<Instant>,
}

impl std::fmt::Debug for LiveSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveSystem")
    }
}

impl LiveSystem {
    /// `None` when sysinfo does not support this system.
    pub fn new() -> Option<LiveSystem> {
        Some(LiveSystem {
            sys: sysinfo::System::new().ok()?,
            components: None,
            sampled: None,
        })
    }

    /// Refreshes memory and CPU usage, and the component temperatures when `components` is set.
    pub fn sample(&mut self, components: bool) -> SystemFigures {
        self.sys.refresh_memory();
        self.sys.refresh_cpu_usage();
        // sysinfo's usage is the change since the previous refresh: meaningless without one.
        let cpu_percent = self
            .sampled
            .is_some_and(|t| t.elapsed() >= sysinfo::MINIMUM_CPU_UPDATE_INTERVAL)
            .then(|| self.sys.global_cpu_usage())
            .filter(|p| p.is_finite());
        self.sampled = Some(Instant::now());
        let hottest_component_c = if components {
            if self.components.is_none() {
                self.components = sysinfo::Components::new_with_refreshed_list().ok();
            } else if let Some(c) = &mut self.components {
                c.refresh(false);
            }
            self.components.as_ref().and_then(|c| {
                c.iter()
                    .filter_map(|c| c.temperature())
                    .filter(|t| t.is_finite())
                    .reduce(f32::max)
            })
        } else {
            None
        };
        let total = self.sys.total_memory();
        SystemFigures {
            mem_total_bytes: (total > 0).then_some(total),
            mem_available_bytes: (total > 0).then(|| self.sys.available_memory()),
            cpu_percent,
            hottest_component_c,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_reports_memory_and_then_cpu_load() {
        let mut live = LiveSystem::new().expect("sysinfo supports Linux");
        let first = live.sample(false);
        assert!(first.mem_total_bytes.unwrap() > 0);
        assert!(first.mem_available_bytes.unwrap() <= first.mem_total_bytes.unwrap());
        assert_eq!(first.cpu_percent, None, "no load before a second sample");
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = live.sample(true);
        let cpu = second.cpu_percent.expect("a load after the interval");
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    }
}
