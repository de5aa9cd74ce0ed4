//! The governor's power rules end to end: `bitnetd run` on a fake board whose battery drains and whose power
//! sensor reads over the limit, and what requests get. (Routing to the cloud on a low battery is in
//! `routing.rs`, against the fake Kimi.)

mod common;

use common::{put_file, set_battery, wait_for_budget, wait_for_status, Daemon};
use serde_json::{json, Value};

/// Sampling that runs to `max_tokens` on the default model.
fn long(id: &str, max_tokens: usize) -> Value {
    json!({"id": id, "prompt": "The", "max_tokens": max_tokens, "temperature": 20.0, "seed": 1,
           "repetition_penalty": 1.0, "stream": false})
}

#[test]
fn a_draining_battery_means_economy_then_refusal_until_mains_is_back() {
    let d =
        Daemon::start("[model]\nthreads = 2\n[budget]\nsample_ms = 50\neconomy_max_tokens = 5\n");
    let board = d.board();
    let mut c = d.connect();
    set_battery(&board, 80, false);
    let s = wait_for_budget(&mut c, |b| b["power"]["on_battery"] == true);
    assert_eq!(s["budget"]["power_level"], "normal", "{s}");
    assert_eq!(s["budget"]["power"]["battery_percent"], 80.0);
    c.send(&long("full", 20));
    let (_, done) = c.finish(&json!("full"));
    assert_eq!(
        (
            done["finish_reason"].as_str(),
            done["usage"]["completion_tokens"].as_u64()
        ),
        (Some("length"), Some(20)),
        "{done}"
    );

    set_battery(&board, 15, false);
    // The engine takes the directive's threads from its own task, a moment after the governor decides.
    let s = wait_for_status(&mut c, |s| {
        s["budget"]["power_level"] == "economy" && s["engine"]["threads"] == 1
    });
    assert_eq!(s["budget"]["directive"]["threads"], 1, "{s}");
    assert_eq!(s["budget"]["directive"]["prefer_cloud"], true);
    assert_eq!(s["engine"]["threads"], 1);
    c.send(&long("eco", 20));
    let (_, done) = c.finish(&json!("eco"));
    assert_eq!(
        (
            done["finish_reason"].as_str(),
            done["usage"]["completion_tokens"].as_u64()
        ),
        (Some("budget"), Some(5)),
        "economy stops generations at economy_max_tokens: {done}"
    );
    assert_eq!(
        done["route_reason"], "cloud_offline",
        "no cloud: local anyway"
    );

    set_battery(&board, 3, false);
    wait_for_budget(&mut c, |b| b["power_level"] == "critical");
    c.send(&long("refused", 5));
    let (_, r) = c.finish(&json!("refused"));
    assert_eq!(
        (r["code"].as_str(), r["retry_after_ms"].as_u64()),
        (Some("over_budget"), Some(60_000)),
        "{r}"
    );
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("critical battery (3%)"),
        "{r}"
    );

    set_battery(&board, 3, true);
    wait_for_budget(&mut c, |b| b["power_level"] == "normal");
    c.send(&long("back", 5));
    let (_, done) = c.finish(&json!("back"));
    assert_eq!(done["type"], "done", "mains is back: {done}");
    assert!(d.log().contains("governor:"), "transitions are logged");
}

#[test]
fn a_power_sensor_over_the_limit_takes_threads_away_until_the_draw_falls() {
    let d = Daemon::start(
        "[model]\nthreads = 2\n[budget]\nsample_ms = 50\npower_watts = 5.0\npower_hysteresis_watts = 0.5\n",
    );
    let board = d.board();
    let mut c = d.connect();
    put_file(&board, "sys/class/hwmon/hwmon3/name", "ina219\n");
    put_file(&board, "sys/class/hwmon/hwmon3/power1_input", "7200000\n");
    let s = wait_for_status(&mut c, |s| s["engine"]["threads"] == 1);
    assert_eq!(s["budget"]["power"]["watts"], 7.2, "{s}");
    assert_eq!(s["budget"]["power_threads"], 1);
    assert!(s["budget"]["power"]["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["chip"] == "ina219" && x["kind"] == "power"));
    // Work still runs on the one thread left.
    c.send(&long("capped", 5));
    let (_, done) = c.finish(&json!("capped"));
    assert_eq!(done["type"], "done", "{done}");
    // Inside the hysteresis band nothing moves; below it the threads come back.
    put_file(&board, "sys/class/hwmon/hwmon3/power1_input", "4800000\n");
    let s = wait_for_budget(&mut c, |b| b["power"]["watts"] == 4.8);
    assert_eq!(s["engine"]["threads"], 1, "{s}");
    put_file(&board, "sys/class/hwmon/hwmon3/power1_input", "3000000\n");
    wait_for_status(&mut c, |s| s["engine"]["threads"] == 2);
}

#[test]
fn metrics_report_the_battery_and_the_power_draw() {
    let d = Daemon::start(
        "[budget]\nsample_ms = 50\n[http]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\n",
    );
    let board = d.board();
    let mut c = d.connect();
    set_battery(&board, 50, false);
    put_file(&board, "sys/class/hwmon/hwmon3/name", "ina219\n");
    put_file(&board, "sys/class/hwmon/hwmon3/power1_input", "7200000\n");
    wait_for_budget(&mut c, |b| {
        b["power"]["watts"] == 7.2 && b["power"]["battery_percent"] == 50.0
    });
    let (status, text) = common::http(&d.http_addr(), "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    assert_eq!(
        common::metric(&text, "bitnetd_battery_percent"),
        Some(50.0),
        "{text}"
    );
    assert_eq!(common::metric(&text, "bitnetd_on_battery"), Some(1.0));
    let watts = common::metric(&text, "bitnetd_power_watts").unwrap();
    assert!((watts - 7.2).abs() < 1e-4, "{watts}");
    assert!(
        text.contains(r#"bitnetd_power_level{state="normal"} 1"#),
        "{text}"
    );
}
