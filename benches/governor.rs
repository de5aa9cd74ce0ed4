//! The governor's sampling cost on this machine: one `Telemetry::read_all` of the live system (`/`), as the
//! daemon does every `[budget] sample_ms`, timed in CPU time of the sampling thread, and its share of one core
//! at the default interval (the goal: under 1%).
//!
//!   cargo bench --bench governor -- [--samples 200] [--interval-ms 1000]

use std::time::{Duration, Instant};

use bitnetd::governor::policy::{directive, step, Limits, State};
use bitnetd::governor::telemetry::Telemetry;

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut samples, mut interval_ms) = (200usize, 1000u64);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--samples" => samples = val().parse().unwrap(),
            "--interval-ms" => interval_ms = val().parse().unwrap(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let telemetry = Telemetry::new("/");
    let limits = Limits::default();
    let mut state = State::default();
    // The first reading lists the sensors and starts sysinfo: a one-off, reported apart.
    let (c0, w0) = (thread_cpu(), Instant::now());
    let first = telemetry.read_all();
    let (first_cpu, first_wall) = (thread_cpu() - c0, w0.elapsed());
    let mut cpu = Vec::with_capacity(samples);
    let mut wall = Vec::with_capacity(samples);
    for _ in 0..samples {
        // sysinfo's CPU load needs time between samples; 20 ms keeps the run short and the work the same.
        std::thread::sleep(Duration::from_millis(20));
        let (c, w) = (thread_cpu(), Instant::now());
        let r = telemetry.read_all();
        state = step(&state, &r, &limits);
        std::hint::black_box(directive(&state, &limits));
        cpu.push(thread_cpu() - c);
        wall.push(w.elapsed());
    }
    cpu.sort();
    wall.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    let share = mean(&cpu).as_secs_f64() / (interval_ms as f64 / 1e3) * 100.0;
    println!(
        "{}",
        serde_json::json!({
            "samples": samples, "interval_ms": interval_ms,
            "first_sample_cpu_us": first_cpu.as_micros(), "first_sample_wall_us": first_wall.as_micros(),
            "sample_cpu_us_median": median(&cpu).as_micros(), "sample_cpu_us_mean": mean(&cpu).as_micros(),
            "sample_wall_us_median": median(&wall).as_micros(),
            "share_of_one_core_percent": share,
            "temperature_c": first.temperature_c, "cpu_percent_seen": state_cpu(&telemetry),
            "power_sensors": first.power.sensors.len(),
        })
    );
    eprintln!(
        "governor sample: {} µs CPU (median; mean {} µs, first {} µs), {:.3}% of one core at sample_ms = {interval_ms}",
        median(&cpu).as_micros(),
        mean(&cpu).as_micros(),
        first_cpu.as_micros(),
        share
    );
}

/// One more reading's CPU load, to show that sysinfo's figure is live.
fn state_cpu(t: &Telemetry) -> Option<f32> {
    std::thread::sleep(Duration::from_millis(250));
    t.read_all().cpu_percent
}
