//! Reading the board's health without root tools: temperatures, CPU frequency, the Raspberry Pi firmware's
//! throttle flags and under-voltage alarm, memory (process, cgroup v2, system, pressure), power (`super::supply`).
//! Every path is under a configurable root, so tests use fake trees; a file that is missing (a non-Pi board, no
//! PSI, no cgroup v2) gives `None`, never an error. With the root at `/`, the system-wide figures that `sysinfo`
//! covers (memory, CPU load, component temperatures where there are no thermal zones) come from it
//! (`super::system`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::supply::{self, PowerReading};
use super::system::LiveSystem;

/// Raspberry Pi firmware throttle flags (`get_throttled`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle(pub u32);

impl Throttle {
    pub fn under_voltage_now(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn frequency_capped_now(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn throttled_now(self) -> bool {
        self.0 & 4 != 0
    }
    pub fn soft_temp_limit_now(self) -> bool {
        self.0 & 8 != 0
    }
    /// Bits 16–19: the same conditions have occurred since boot.
    pub fn under_voltage_occurred(self) -> bool {
        self.0 & (1 << 16) != 0
    }
}

/// cgroup v2 memory limits and use of this process's cgroup (`None`: not set, or no cgroup v2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupMemory {
    pub max: Option<u64>,
    pub high: Option<u64>,
    pub current: Option<u64>,
}

impl CgroupMemory {
    /// The tighter of `memory.max` and `memory.high`.
    pub fn limit(&self) -> Option<u64> {
        match (self.max, self.high) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One reading of everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// The hottest thermal zone, in °C.
    pub temperature_c: Option<f32>,
    /// The lowest `scaling_cur_freq / cpuinfo_max_freq` over the CPUs.
    pub cpu_freq_ratio: Option<f32>,
    pub throttle: Option<Throttle>,
    /// hwmon `rpi_volt` `in0_lcrit_alarm`.
    pub under_voltage_alarm: Option<bool>,
    pub rss_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    /// Busy share of all CPUs since the previous reading (live system only).
    pub cpu_percent: Option<f32>,
    /// `/proc/pressure/memory`, `some avg10` (percent of time stalled).
    pub memory_pressure_some_avg10: Option<f32>,
    pub cgroup: CgroupMemory,
    /// The supplies and power sensors.
    pub power: PowerReading,
}

impl Reading {
    /// Under-voltage now, by either source.
    pub fn under_voltage(&self) -> bool {
        self.throttle.is_some_and(Throttle::under_voltage_now)
            || self.under_voltage_alarm == Some(true)
    }
}

/// Reads under a root directory (`/` on a real board).
#[derive(Debug, Clone)]
pub struct Telemetry {
    root: PathBuf,
    /// sysinfo's view, with the root at `/` (created at the first full reading).
    live: Option<Arc<Mutex<Option<LiveSystem>>>>,
}

impl Telemetry {
    pub fn new(root: impl Into<PathBuf>) -> Telemetry {
        let root = root.into();
        let live = (root == Path::new("/")).then(Default::default);
        Telemetry { root, live }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// Reads `rel` (relative to the root).
    fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        std::fs::read_to_string(self.root.join(rel)).ok()
    }

    /// Reads everything once.
    pub fn read_all(&self) -> Reading {
        let zones = self.temperature_c();
        let live = self.live.as_ref().and_then(|l| {
            let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
            if l.is_none() {
                *l = LiveSystem::new();
            }
            l.as_mut().map(|s| s.sample(zones.is_none()))
        });
        let (mem_total_bytes, mem_available_bytes) = match live {
            Some(f) if f.mem_total_bytes.is_some() => (f.mem_total_bytes, f.mem_available_bytes),
            _ => (self.mem_total_bytes(), self.mem_available_bytes()),
        };
        Reading {
            temperature_c: zones.or(live.and_then(|f| f.hottest_component_c)),
            cpu_freq_ratio: self.cpu_freq_ratio(),
            throttle: self.throttle(),
            under_voltage_alarm: self.under_voltage_alarm(),
            rss_bytes: self.rss_bytes(),
            mem_total_bytes,
            mem_available_bytes,
            cpu_percent: live.and_then(|f| f.cpu_percent),
            memory_pressure_some_avg10: self.memory_pressure(),
            cgroup: self.cgroup(),
            power: supply::read(&self.root),
        }
    }

    /// Entries of a directory whose names start with `prefix`.
    fn entries(&self, dir: &str, prefix: &str) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.path(dir)) else {
            return vec![];
        };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    pub fn temperature_c(&self) -> Option<f32> {
        self.entries("sys/class/thermal", "thermal_zone")
            .iter()
            .filter_map(|z| std::fs::read_to_string(z.join("temp")).ok())
            .filter_map(|t| t.trim().parse::<i64>().ok())
            .map(|milli| milli as f32 / 1000.0)
            .reduce(f32::max)
    }

    pub fn cpu_freq_ratio(&self) -> Option<f32> {
        let num =
            |p: PathBuf| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
        self.entries("sys/devices/system/cpu", "cpu")
            .iter()
            .filter_map(|c| {
                let cur = num(c.join("cpufreq/scaling_cur_freq"))?;
                let max = num(c.join("cpufreq/cpuinfo_max_freq"))?;
                (max > 0.0).then(|| (cur / max) as f32)
            })
            .reduce(f32::min)
    }

    pub fn throttle(&self) -> Option<Throttle> {
        let t = self.read("sys/devices/platform/soc/soc:firmware/get_throttled")?;
        let t = t.trim();
        let hex = t.strip_prefix("0x").unwrap_or(t);
        u32::from_str_radix(hex, 16).ok().map(Throttle)
    }

    pub fn under_voltage_alarm(&self) -> Option<bool> {
        self.entries("sys/class/hwmon", "hwmon")
            .iter()
            .find_map(|h| {
                let name = std::fs::read_to_string(h.join("name")).ok()?;
                if name.trim() != "rpi_volt" {
                    return None;
                }
                let v = std::fs::read_to_string(h.join("in0_lcrit_alarm")).ok()?;
                Some(v.trim() != "0")
            })
    }

    pub fn rss_bytes(&self) -> Option<u64> {
        kib_field(&self.read("proc/self/status")?, "VmRSS:")
    }

    pub fn mem_available_bytes(&self) -> Option<u64> {
        kib_field(&self.read("proc/meminfo")?, "MemAvailable:")
    }

    pub fn mem_total_bytes(&self) -> Option<u64> {
        kib_field(&self.read("proc/meminfo")?, "MemTotal:")
    }

    pub fn memory_pressure(&self) -> Option<f32> {
        let text = self.read("proc/pressure/memory")?;
        let some = text.lines().find(|l| l.starts_with("some "))?;
        some.split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse()
            .ok()
    }

    pub fn cgroup(&self) -> CgroupMemory {
        let Some(rel) = self.read("proc/self/cgroup").and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("0::")
                    .map(|p| p.trim().trim_start_matches('/').to_string())
            })
        }) else {
            return CgroupMemory::default();
        };
        let dir = Path::new("sys/fs/cgroup").join(rel);
        let value = |f: &str| -> Option<u64> {
            let t = self.read(dir.join(f))?;
            let t = t.trim();
            if t == "max" {
                None
            } else {
                t.parse().ok()
            }
        };
        CgroupMemory {
            max: value("memory.max"),
            high: value("memory.high"),
            current: value("memory.current"),
        }
    }
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake root with `files` (path, contents).
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let path = d.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        d
    }

    const COMMON: &[(&str, &str)] = &[
        ("proc/self/status", "Name:\tbitnetd\nVmHWM:\t  90000 kB\nVmRSS:\t  81920 kB\n"),
        ("proc/meminfo", "MemTotal:        3884128 kB\nMemFree:          200000 kB\nMemAvailable:    1048576 kB\n"),
        (
            "proc/pressure/memory",
            "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=2.00 avg60=0.50 avg300=0.10 total=45\n",
        ),
        ("proc/self/cgroup", "0::/system.slice/bitnetd.service\n"),
        ("sys/fs/cgroup/system.slice/bitnetd.service/memory.max", "4831838208\n"),
        ("sys/fs/cgroup/system.slice/bitnetd.service/memory.high", "4294967296\n"),
        ("sys/fs/cgroup/system.slice/bitnetd.service/memory.current", "104857600\n"),
    ];

    #[test]
    fn a_pi_4_tree_reads_temperature_throttling_and_memory() {
        let mut files = COMMON.to_vec();
        files.extend([
            ("sys/class/thermal/thermal_zone0/type", "cpu-thermal\n"),
            ("sys/class/thermal/thermal_zone0/temp", "81234\n"),
            (
                "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq",
                "1000000\n",
            ),
            (
                "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
                "1500000\n",
            ),
            (
                "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq",
                "1500000\n",
            ),
            (
                "sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq",
                "1500000\n",
            ),
            (
                "sys/devices/platform/soc/soc:firmware/get_throttled",
                "50005\n",
            ),
            ("sys/class/hwmon/hwmon0/name", "cpu_thermal\n"),
            ("sys/class/hwmon/hwmon1/name", "rpi_volt\n"),
            ("sys/class/hwmon/hwmon1/in0_lcrit_alarm", "1\n"),
        ]);
        let d = tree(&files);
        let r = Telemetry::new(d.path()).read_all();
        assert_eq!(r.temperature_c, Some(81.234));
        assert!((r.cpu_freq_ratio.unwrap() - 2.0 / 3.0).abs() < 1e-6);
        let t = r.throttle.unwrap();
        assert!(t.under_voltage_now() && t.throttled_now() && !t.frequency_capped_now());
        assert!(t.under_voltage_occurred());
        assert_eq!(r.under_voltage_alarm, Some(true));
        assert!(r.under_voltage());
        assert_eq!(r.rss_bytes, Some(80 << 20));
        assert_eq!(r.mem_available_bytes, Some(1 << 30));
        assert_eq!(r.mem_total_bytes, Some(3_884_128 * 1024));
        assert_eq!(r.cpu_percent, None, "a fake root has no live CPU load");
        assert_eq!(r.memory_pressure_some_avg10, Some(12.5));
        assert_eq!(r.cgroup.limit(), Some(4 << 30));
        assert_eq!(r.cgroup.current, Some(100 << 20));
    }

    #[test]
    fn a_pi_5_tree_with_several_zones_takes_the_hottest() {
        let mut files = COMMON.to_vec();
        files.extend([
            ("sys/class/thermal/thermal_zone0/temp", "62000\n"),
            ("sys/class/thermal/thermal_zone1/temp", "70500\n"),
            (
                "sys/devices/platform/soc/soc:firmware/get_throttled",
                "0x0\n",
            ),
            ("sys/class/hwmon/hwmon2/name", "rpi_volt\n"),
            ("sys/class/hwmon/hwmon2/in0_lcrit_alarm", "0\n"),
            (
                "sys/fs/cgroup/system.slice/bitnetd.service/memory.max",
                "max\n",
            ),
        ]);
        let d = tree(&files);
        let r = Telemetry::new(d.path()).read_all();
        assert_eq!(r.temperature_c, Some(70.5));
        assert_eq!(r.throttle, Some(Throttle(0)));
        assert!(!r.under_voltage());
        assert_eq!(r.cgroup.max, None, "\"max\" is no limit");
        assert_eq!(r.cgroup.limit(), Some(4 << 30));
    }

    #[test]
    fn a_board_without_pi_files_reads_what_it_has() {
        let d = tree(&[("proc/meminfo", "MemAvailable:  2048 kB\n")]);
        let r = Telemetry::new(d.path()).read_all();
        assert_eq!(r.mem_available_bytes, Some(2 << 20));
        assert_eq!(
            (
                r.temperature_c,
                r.throttle,
                r.under_voltage_alarm,
                r.memory_pressure_some_avg10
            ),
            (None, None, None, None)
        );
        assert_eq!(r.cgroup, CgroupMemory::default());
        assert!(!r.under_voltage());
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(Telemetry::new(empty.path()).read_all(), Reading::default());
    }

    #[test]
    fn garbage_in_files_is_treated_as_missing() {
        let d = tree(&[
            ("sys/class/thermal/thermal_zone0/temp", "hot\n"),
            (
                "sys/devices/platform/soc/soc:firmware/get_throttled",
                "zz\n",
            ),
            ("proc/pressure/memory", "nonsense\n"),
        ]);
        let r = Telemetry::new(d.path()).read_all();
        assert_eq!(
            (r.temperature_c, r.throttle, r.memory_pressure_some_avg10),
            (None, None, None)
        );
    }
}
