//! Reading the board's power: its supplies (`/sys/class/power_supply`: mains, USB, a UPS HAT's or a
//! battery-powered board's battery) and its power, current and voltage sensors (`/sys/class/hwmon`: INA219,
//! INA3221 and other monitors, the Raspberry Pi 5's RP1 ADC and PMIC rails where the kernel exposes them). Under
//! the telemetry root like every other reading, so tests use fake trees; what is missing or unreadable is `None`.
//!
//! Units as the kernel gives them: power in µW, current in mA (hwmon) or µA (power_supply), voltage in mV
//! (hwmon) or µV (power_supply); a [`PowerReading`] holds watts, amperes and volts.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a sensor measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    /// Watts (`power*_input`).
    Power,
    /// Amperes (`curr*_input`).
    Current,
    /// Volts (`in*_input`).
    Voltage,
}

/// One hwmon reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensor {
    /// The chip's `name` (`ina219`, `ina3221`, `rp1_adc`, ...).
    pub chip: String,
    /// The channel's `*_label`, else its file name without `_input` (`power1`, `curr2`, `in0`).
    pub label: String,
    pub kind: SensorKind,
    /// In watts, amperes or volts.
    pub value: f32,
}

/// The board's supply and power sensors, read once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerReading {
    /// `Some(true)` when a battery is discharging and no mains or USB supply is online; `Some(false)` when a
    /// mains or USB supply is online or no battery discharges; `None` when the board reports no supply at all.
    pub on_battery: Option<bool>,
    /// The battery's `capacity` (percent), when there is a battery.
    pub battery_percent: Option<f32>,
    /// The battery's `status`: `Charging`, `Discharging`, `Full`, `Not charging`, `Unknown`.
    pub battery_status: Option<String>,
    /// The kernel's own judgement (`capacity_level` = `Critical`).
    pub battery_critical: bool,
    /// The board's draw in watts: the sum of hwmon power channels, else of voltage × current pairs on the same
    /// channel, else the battery's `power_now` (or `voltage_now` × `current_now`) while it discharges.
    pub watts: Option<f32>,
    pub sensors: Vec<Sensor>,
}

/// Reads the supplies and sensors under `root`.
pub fn read(root: &Path) -> PowerReading {
    let mut r = PowerReading::default();
    let supplies = sorted_entries(&root.join("sys/class/power_supply"));
    let mut external_online = false;
    let mut discharging = false;
    let mut battery_watts = None;
    let mut any_supply = false;
    for dir in &supplies {
        let Some(kind) = text(&dir.join("type")) else {
            continue;
        };
        any_supply = true;
        match kind.as_str() {
            "Battery" => {
                let status = text(&dir.join("status"));
                let is_discharging = status.as_deref() == Some("Discharging");
                discharging |= is_discharging;
                if r.battery_percent.is_none() {
                    r.battery_percent = number(&dir.join("capacity")).map(|c| c as f32);
                    r.battery_status = status;
                }
                r.battery_critical |=
                    text(&dir.join("capacity_level")).as_deref() == Some("Critical");
                if is_discharging && battery_watts.is_none() {
                    battery_watts = number(&dir.join("power_now"))
                        .map(|uw| uw.abs() / 1e6)
                        .or_else(|| {
                            let v = number(&dir.join("voltage_now"))?;
                            let a = number(&dir.join("current_now"))?;
                            Some((v / 1e6) * (a.abs() / 1e6))
                        })
                        .map(|w| w as f32);
                }
            }
            // Mains, USB and its variants, wireless chargers: an external source when online.
            _ => external_online |= number(&dir.join("online")).is_some_and(|o| o > 0.0),
        }
    }
    if any_supply {
        r.on_battery = Some(discharging && !external_online);
    }
    let (sensors, watts) = hwmon(root);
    r.sensors = sensors;
    r.watts = watts.or(battery_watts.filter(|_| discharging));
    r
}

/// Every power, current and voltage channel of every hwmon chip, and the board's watts from them.
fn hwmon(root: &Path) -> (Vec<Sensor>, Option<f32>) {
    let mut sensors = Vec::new();
    let mut total: Option<f32> = None;
    for chip in sorted_entries(&root.join("sys/class/hwmon")) {
        let name = text(&chip.join("name")).unwrap_or_else(|| "unknown".into());
        let mut volts = Vec::new();
        let mut amps = Vec::new();
        let mut chip_power: Option<f32> = None;
        for file in sorted_entries(&chip) {
            let Some(fname) = file.file_name().and_then(|f| f.to_str()).map(str::to_owned) else {
                continue;
            };
            let Some(channel) = fname.strip_suffix("_input") else {
                continue;
            };
            let (kind, scale, index) = if let Some(i) = channel.strip_prefix("power") {
                (SensorKind::Power, 1e-6, i)
            } else if let Some(i) = channel.strip_prefix("curr") {
                (SensorKind::Current, 1e-3, i)
            } else if let Some(i) = channel.strip_prefix("in") {
                (SensorKind::Voltage, 1e-3, i)
            } else {
                continue;
            };
            let (Ok(index), Some(raw)) = (index.parse::<u32>(), number(&file)) else {
                continue;
            };
            let value = (raw * scale) as f32;
            let label = text(&chip.join(format!("{channel}_label"))).unwrap_or(channel.to_string());
            match kind {
                SensorKind::Power => *chip_power.get_or_insert(0.0) += value,
                SensorKind::Current => amps.push((index, value)),
                SensorKind::Voltage => volts.push((index, value)),
            }
            sensors.push(Sensor {
                chip: name.clone(),
                label,
                kind,
                value,
            });
        }
        // A chip without power channels: bus voltage × current of the same channel (ina2xx, ina3221).
        let from_pairs = amps
            .iter()
            .filter_map(|&(i, a)| {
                volts
                    .iter()
                    .find(|&&(j, _)| j == i)
                    .map(|&(_, v)| v * a.abs())
            })
            .reduce(|a, b| a + b);
        if let Some(w) = chip_power.or(from_pairs) {
            *total.get_or_insert(0.0) += w;
        }
    }
    (sensors, total)
}

fn sorted_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    v.sort();
    v
}

fn text(p: &Path) -> Option<String> {
    let t = std::fs::read_to_string(p).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn number(p: &Path) -> Option<f64> {
    text(p)?.parse().ok().filter(|v: &f64| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, t) in files {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, t).unwrap();
        }
        d
    }

    #[test]
    fn a_ups_hat_on_battery_reads_capacity_and_draw() {
        let d = tree(&[
            ("sys/class/power_supply/AC/type", "Mains\n"),
            ("sys/class/power_supply/AC/online", "0\n"),
            ("sys/class/power_supply/BAT0/type", "Battery\n"),
            ("sys/class/power_supply/BAT0/status", "Discharging\n"),
            ("sys/class/power_supply/BAT0/capacity", "17\n"),
            ("sys/class/power_supply/BAT0/capacity_level", "Low\n"),
            ("sys/class/power_supply/BAT0/voltage_now", "3700000\n"),
            ("sys/class/power_supply/BAT0/current_now", "-1000000\n"),
        ]);
        let r = read(d.path());
        assert_eq!(r.on_battery, Some(true));
        assert_eq!(r.battery_percent, Some(17.0));
        assert_eq!(r.battery_status.as_deref(), Some("Discharging"));
        assert!(!r.battery_critical);
        assert!((r.watts.unwrap() - 3.7).abs() < 1e-4, "{:?}", r.watts);
    }

    #[test]
    fn mains_online_is_not_on_battery_even_with_a_battery() {
        let d = tree(&[
            ("sys/class/power_supply/usb/type", "USB\n"),
            ("sys/class/power_supply/usb/online", "1\n"),
            ("sys/class/power_supply/battery/type", "Battery\n"),
            ("sys/class/power_supply/battery/status", "Charging\n"),
            ("sys/class/power_supply/battery/capacity", "55\n"),
            (
                "sys/class/power_supply/battery/capacity_level",
                "Critical\n",
            ),
        ]);
        let r = read(d.path());
        assert_eq!(r.on_battery, Some(false));
        assert_eq!(r.battery_percent, Some(55.0));
        assert!(r.battery_critical);
        assert_eq!(
            r.watts, None,
            "a charging battery's draw is not the board's"
        );
    }

    #[test]
    fn hwmon_power_channels_are_summed_and_pairs_stand_in_for_missing_ones() {
        let d = tree(&[
            ("sys/class/hwmon/hwmon0/name", "cpu_thermal\n"),
            ("sys/class/hwmon/hwmon0/temp1_input", "51000\n"),
            ("sys/class/hwmon/hwmon1/name", "ina219\n"),
            ("sys/class/hwmon/hwmon1/in0_input", "12\n"),
            ("sys/class/hwmon/hwmon1/in1_input", "5100\n"),
            ("sys/class/hwmon/hwmon1/curr1_input", "1200\n"),
            ("sys/class/hwmon/hwmon1/power1_input", "6120000\n"),
            ("sys/class/hwmon/hwmon2/name", "ina3221\n"),
            ("sys/class/hwmon/hwmon2/in1_input", "5000\n"),
            ("sys/class/hwmon/hwmon2/curr1_input", "400\n"),
            ("sys/class/hwmon/hwmon2/in1_label", "fan\n"),
            ("sys/class/hwmon/hwmon2/in2_input", "3300\n"),
            ("sys/class/hwmon/hwmon2/curr2_input", "-100\n"),
            ("sys/class/hwmon/hwmon3/name", "rp1_adc\n"),
            ("sys/class/hwmon/hwmon3/in1_input", "1480\n"),
        ]);
        let r = read(d.path());
        // ina219's own power channel (6.12 W), ina3221's pairs (2.0 + 0.33 W); rp1_adc has voltages only.
        assert!((r.watts.unwrap() - 8.45).abs() < 1e-3, "{:?}", r.watts);
        assert_eq!(r.on_battery, None);
        let power = r
            .sensors
            .iter()
            .filter(|s| s.kind == SensorKind::Power)
            .count();
        assert_eq!(power, 1);
        assert!(r
            .sensors
            .iter()
            .any(|s| s.chip == "ina3221" && s.label == "fan" && s.kind == SensorKind::Voltage));
        assert!(r
            .sensors
            .iter()
            .any(|s| s.chip == "rp1_adc" && s.label == "in1"));
        assert_eq!(r.sensors.len(), 9);
    }

    #[test]
    fn a_board_without_supplies_or_sensors_reads_nothing() {
        let d = tree(&[("sys/class/power_supply/x/capacity", "garbage\n")]);
        assert_eq!(read(d.path()), PowerReading::default());
    }
}
