//! The governor's power policy, as pure functions of readings and limits: the battery level (with hysteresis,
//! like the thermal levels) and the thread cap that holds the board under `[budget] power_watts`. No I/O; each
//! rule is tested by name. `policy` folds both into the governor's state and directive.

use serde::{Deserialize, Serialize};

use super::supply::PowerReading;

/// A level is left only this many percentage points above the threshold that raised it.
pub const BATTERY_HYSTERESIS_PERCENT: f32 = 5.0;

/// Power thresholds, from `[budget]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerLimits {
    /// On battery at or below this charge (percent): economy.
    pub battery_low_percent: f32,
    /// On battery at or below this charge (percent), or when the kernel says the level is critical: local work
    /// is refused.
    pub battery_critical_percent: f32,
    /// The board's draw to hold (watts); `None`: no limit.
    pub power_watts: Option<f32>,
    /// Threads come back only once the draw is this far (watts) below the limit.
    pub power_hysteresis_watts: f32,
}

impl Default for PowerLimits {
    fn default() -> Self {
        PowerLimits {
            battery_low_percent: 20.0,
            battery_critical_percent: 5.0,
            power_watts: None,
            power_hysteresis_watts: 0.5,
        }
    }
}

/// How the board's supply constrains local work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerLevel {
    /// On mains, or a battery above its low mark.
    #[default]
    Normal,
    /// On battery at or below `battery_low_percent`: fewer threads, the cloud preferred for `auto` requests,
    /// shorter generations.
    Economy,
    /// On battery at or below `battery_critical_percent`: no local work.
    Critical,
}

/// The next battery level from `prev` and a reading. Off battery (or with no supply information) the level is
/// normal; on battery without a charge reading the level stays (a gauge that vanishes does not charge the
/// battery); a level is left only [`BATTERY_HYSTERESIS_PERCENT`] above its threshold.
pub fn battery_level(prev: PowerLevel, r: &PowerReading, l: &PowerLimits) -> PowerLevel {
    if r.on_battery != Some(true) {
        return PowerLevel::Normal;
    }
    if r.battery_critical {
        return PowerLevel::Critical;
    }
    let Some(pct) = r.battery_percent else {
        return prev;
    };
    let h = BATTERY_HYSTERESIS_PERCENT;
    if pct <= l.battery_critical_percent
        || (prev == PowerLevel::Critical && pct <= l.battery_critical_percent + h)
    {
        PowerLevel::Critical
    } else if pct <= l.battery_low_percent
        || (prev >= PowerLevel::Economy && pct <= l.battery_low_percent + h)
    {
        PowerLevel::Economy
    } else {
        PowerLevel::Normal
    }
}

/// The threads the power limit allows after a reading of `watts`, from the previous cap `prev` (0: not set
/// yet, taken as `max_threads`): one fewer while the draw is over the limit (never below one), one more once
/// it is `power_hysteresis_watts` below it, unchanged in between or without a reading. Without a limit, every
/// thread.
pub fn power_cap(prev: usize, watts: Option<f32>, max_threads: usize, l: &PowerLimits) -> usize {
    let max = max_threads.max(1);
    let Some(limit) = l.power_watts else {
        return max;
    };
    let prev = if prev == 0 { max } else { prev.min(max) };
    match watts {
        Some(w) if w > limit => prev.saturating_sub(1).max(1),
        Some(w) if w < limit - l.power_hysteresis_watts => (prev + 1).min(max),
        _ => prev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_battery(pct: f32) -> PowerReading {
        PowerReading {
            on_battery: Some(true),
            battery_percent: Some(pct),
            ..Default::default()
        }
    }

    fn levels(pcts: &[f32]) -> Vec<PowerLevel> {
        let l = PowerLimits::default();
        let mut level = PowerLevel::Normal;
        pcts.iter()
            .map(|&p| {
                level = battery_level(level, &on_battery(p), &l);
                level
            })
            .collect()
    }

    #[test]
    fn a_draining_battery_goes_to_economy_then_critical() {
        use PowerLevel::*;
        assert_eq!(
            levels(&[80.0, 21.0, 20.0, 12.0, 5.0, 2.0]),
            [Normal, Normal, Economy, Economy, Critical, Critical]
        );
    }

    #[test]
    fn charging_back_leaves_each_level_only_past_its_hysteresis() {
        use PowerLevel::*;
        assert_eq!(
            levels(&[4.0, 8.0, 10.5, 24.0, 25.5]),
            [Critical, Critical, Economy, Economy, Normal]
        );
    }

    #[test]
    fn mains_power_is_normal_whatever_the_charge() {
        let l = PowerLimits::default();
        let mains = PowerReading {
            on_battery: Some(false),
            battery_percent: Some(3.0),
            battery_critical: true,
            ..Default::default()
        };
        assert_eq!(
            battery_level(PowerLevel::Critical, &mains, &l),
            PowerLevel::Normal
        );
        assert_eq!(
            battery_level(PowerLevel::Economy, &PowerReading::default(), &l),
            PowerLevel::Normal,
            "no supply information at all"
        );
    }

    #[test]
    fn the_kernels_critical_level_is_critical() {
        let r = PowerReading {
            battery_critical: true,
            ..on_battery(40.0)
        };
        assert_eq!(
            battery_level(PowerLevel::Normal, &r, &PowerLimits::default()),
            PowerLevel::Critical
        );
    }

    #[test]
    fn a_vanished_gauge_keeps_the_level() {
        let r = PowerReading {
            on_battery: Some(true),
            ..Default::default()
        };
        assert_eq!(
            battery_level(PowerLevel::Economy, &r, &PowerLimits::default()),
            PowerLevel::Economy
        );
    }

    #[test]
    fn over_the_power_limit_threads_step_down_to_one_and_come_back_below_the_hysteresis() {
        let l = PowerLimits {
            power_watts: Some(6.0),
            ..Default::default()
        };
        let mut cap = 0;
        let mut caps = vec![];
        for w in [7.0, 7.0, 6.5, 6.2, 5.8, 5.4, 5.4, 5.4, 5.4] {
            cap = power_cap(cap, Some(w), 4, &l);
            caps.push(cap);
        }
        assert_eq!(caps, [3, 2, 1, 1, 1, 2, 3, 4, 4]);
    }

    #[test]
    fn without_a_limit_or_a_reading_the_cap_does_not_move() {
        let none = PowerLimits::default();
        assert_eq!(power_cap(2, Some(100.0), 4, &none), 4);
        let l = PowerLimits {
            power_watts: Some(5.0),
            ..Default::default()
        };
        assert_eq!(power_cap(2, None, 4, &l), 2);
        assert_eq!(power_cap(0, None, 4, &l), 4, "unset starts at every thread");
        assert_eq!(
            power_cap(6, Some(4.0), 4, &l),
            4,
            "never above the threads there are"
        );
    }
}
