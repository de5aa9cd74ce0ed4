//! The OpenAI-compatible HTTP API against the real `openai` Python package (tests/http_client.py), over TCP
//! loopback with an API key and over a Unix socket, and `/metrics` read by `prometheus_client`'s parser.
//!
//! The package comes from the venv `.ci/run` makes (`BITNETD_TEST_PYTHON`, by default
//! `/var/tmp/bitnetd-test-venv/bin/python`); without it the tests fail under `CI=true` and skip elsewhere.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;

use common::Daemon;
use serde_json::{json, Value};

const KEY: &str = "sk-bitnetd-test-key";

/// The Python that has `openai` and `prometheus_client`, if there is one.
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("BITNETD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/bitnetd-test-venv/bin/python".into());
    let ok = Command::new(&p)
        .args(["-c", "import openai, prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} has no openai/prometheus_client, and under CI=true no test may skip (.ci/run makes the venv)",
        p.display()
    );
    eprintln!("SKIPPED: no Python with openai and prometheus_client (.ci/run makes it)");
    None
}

/// A daemon serving HTTP on a free loopback port (with [`KEY`]) and on a Unix socket; returns it, the URL
/// and the Unix socket's path.
fn start(extra: &str) -> (Daemon, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let uds = dir.path().join("http.sock");
    let config = format!(
        "{extra}\n[http]\nenabled = true\nlisten = [\"127.0.0.1:0\", \"unix:{}\"]\napi_key_file = \"{}\"\n",
        uds.display(),
        key.display()
    );
    let d = Daemon::start(&config);
    let url = format!("http://{}", d.http_addr());
    // The key file can go: it was read at startup. The directory must outlive the socket, so it is kept.
    std::mem::forget(dir);
    (d, url, uds)
}

/// Runs a scenario of tests/http_client.py and returns its JSON.
fn scenario(
    py: &PathBuf,
    name: &str,
    url: Option<&str>,
    uds: Option<&PathBuf>,
    key: Option<&str>,
) -> Value {
    let mut cmd = Command::new(py);
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/http_client.py"))
        .arg(name)
        .env("NO_PROXY", "127.0.0.1,localhost");
    if let Some(u) = url {
        cmd.args(["--url", u]);
    }
    if let Some(p) = uds {
        cmd.arg("--uds").arg(p);
    }
    if let Some(k) = key {
        cmd.args(["--key", k]);
    }
    let out = common::run_ok(&mut cmd);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The value of the sample `name` with `labels` (0 when absent).
fn sample(metrics: &Value, name: &str, labels: Value) -> f64 {
    let want = labels.as_object().unwrap();
    metrics["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| want.iter().all(|(k, v)| &s["labels"][k] == v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[test]
fn the_openai_package_chats_streams_and_completes_over_tcp_and_a_unix_socket() {
    let Some(py) = python() else { return };
    let (d, url, uds) = start("");
    let tcp = scenario(&py, "suite", Some(&url), None, Some(KEY));
    let unix = scenario(&py, "suite", None, Some(&uds), None);
    for r in [&tcp, &unix] {
        assert_eq!(r["chat"]["route_header"], "local", "{r}");
        assert_eq!(r["chat"]["bitnetd"]["route"], "local");
        assert_eq!(r["chat"]["bitnetd"]["route_reason"], "simple");
        assert_eq!(r["chat"]["finish_reason"], "length");
        assert_eq!(r["chat"]["usage"]["completion_tokens"], 8);
        assert_eq!(r["stream"]["content_type"], "text/event-stream");
        assert_eq!(r["stream"]["bitnetd"]["route"], "local");
        let (cut, full) = (
            r["stop"]["text"].as_str().unwrap(),
            r["stop"]["full"].as_str().unwrap(),
        );
        assert!(cut.len() < full.len() && full.starts_with(cut), "{r}");
        assert_eq!(r["models"], json!(["bitnet-b1.58-wordnet-5m"]));
        assert_eq!(
            r["bad"],
            json!({"status": 400, "param": "n", "code": "bad_request"})
        );
    }
    // Greedy answers are the same whichever way they come.
    assert_eq!(tcp["chat"]["text"], unix["chat"]["text"]);
    let auth = scenario(&py, "unauthorized", Some(&url), None, None);
    assert_eq!(auth, json!({"wrong_key": 401, "no_key": 401}));

    // The counters match the replies: six answers and one 400 per suite; a 401 never reaches the dispatcher.
    let m = scenario(&py, "metrics", None, Some(&uds), None);
    assert!(m["content_type"]
        .as_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let ok = json!({"source": "http", "route": "local", "outcome": "ok"});
    assert_eq!(sample(&m, "bitnetd_requests_total", ok), 12.0, "{m}");
    let rejected =
        json!({"source": "http", "route": "none", "reason": "bad_request", "outcome": "rejected"});
    assert_eq!(sample(&m, "bitnetd_requests_total", rejected), 2.0);
    assert_eq!(
        sample(&m, "bitnetd_errors_total", json!({"code": "bad_request"})),
        2.0
    );
    let tokens: u64 = [&tcp, &unix]
        .iter()
        .map(|r| {
            ["chat", "completion"]
                .iter()
                .map(|k| r[k]["usage"]["completion_tokens"].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    // Streamed twins of the chat and the completion, and the stop pair, add their own tokens.
    assert!(
        sample(
            &m,
            "bitnetd_tokens_generated_total",
            json!({"route": "local"})
        ) >= 2.0 * tokens as f64
    );
    assert_eq!(
        sample(
            &m,
            "bitnetd_time_to_first_token_seconds_count",
            json!({"route": "local"})
        ),
        12.0
    );
    assert_eq!(sample(&m, "bitnetd_in_flight", json!({})), 0.0);
    assert_eq!(
        sample(&m, "bitnetd_memory_budget_bytes", json!({})),
        4.0 * 1024.0 * 1024.0 * 1024.0
    );
    assert_eq!(
        sample(&m, "bitnetd_thermal_level", json!({"state": "normal"})),
        1.0
    );
    drop(d);
}

#[test]
fn a_full_queue_gets_429_and_a_client_that_leaves_cancels_its_generation() {
    let Some(py) = python() else { return };
    let (d, url, uds) = start("[engine]\nslots = 1\nqueue = 1\n");
    // One request runs, one waits: the queue is full.
    let mut c = d.connect();
    let long = |id: &str| json!({"id": id, "prompt": "The", "max_tokens": 2000, "temperature": 20.0, "seed": 1, "repetition_penalty": 1.0});
    c.send(&long("r0"));
    assert_eq!(c.recv()["type"], "token");
    c.send(&long("r1"));
    common::wait_for_status(&mut c, |s| s["engine"]["queue_depth"] == 1);
    let busy = scenario(&py, "busy", Some(&url), None, Some(KEY));
    assert_eq!(busy["status"], 429, "{busy}");
    assert_eq!(busy["code"], "busy");
    assert!(
        busy["retry_after"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    for id in ["r0", "r1"] {
        c.send(&json!({"id": id, "cancel": true}));
    }
    let mut ended = 0;
    while ended < 2 {
        if c.recv()["type"] == "done" {
            ended += 1;
        }
    }

    // A streamed request whose client closes after three tokens is cancelled, not run to max_tokens.
    let closed = scenario(&py, "cancel", None, Some(&uds), None);
    assert_eq!(closed["tokens_before_close"], 3);
    d.wait_for_log("HTTP client gone: cancelling its request", 1);
    let s = common::wait_for_status(&mut c, |s| s["requests"]["in_flight"] == 0);
    assert_eq!(s["requests"]["rejected"], 1, "{s}");
    let m = scenario(&py, "metrics", None, Some(&uds), None);
    let cancelled = json!({"source": "http", "route": "local", "outcome": "cancelled"});
    assert_eq!(sample(&m, "bitnetd_requests_total", cancelled), 1.0, "{m}");
    let busy = json!({"source": "http", "route": "none", "reason": "busy", "outcome": "rejected"});
    assert_eq!(sample(&m, "bitnetd_requests_total", busy), 1.0);
    assert_eq!(
        sample(&m, "bitnetd_errors_total", json!({"code": "busy"})),
        1.0
    );
    assert!(
        sample(
            &m,
            "bitnetd_tokens_generated_total",
            json!({"route": "local"})
        ) < 2000.0
    );
}

#[test]
fn a_body_over_the_limit_gets_413_before_it_is_sent_and_unknown_paths_404() {
    let d = Daemon::start(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\nmax_body_bytes = 4096\n",
    );
    let addr = d.http_addr();
    // Headers only: the 413 comes without the body ever being sent.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(common::PATIENCE)).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // A body that says nothing of its length is cut at the limit too.
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000));
    let (status, body) = common::http(&addr, "POST", "/v1/completions", "", &big);
    assert_eq!(status, 413, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "too_large");
    let (status, body) = common::http(&addr, "GET", "/v2/nothing", "", "");
    assert_eq!(status, 404, "{body}");
    // Without a key, TCP serves this machine only: no web page may drive it, directly or by DNS rebinding.
    let ask = r#"{"prompt": "A dog", "max_tokens": 2}"#;
    let (status, body) = common::http(
        &addr,
        "POST",
        "/v1/completions",
        "Origin: https://evil.example\r\n",
        ask,
    );
    assert_eq!(status, 403, "{body}");
    let (status, _) = common::http(
        &addr,
        "POST",
        "/v1/completions",
        "Origin: http://localhost:3000\r\n",
        ask,
    );
    assert_eq!(status, 200);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: rebound.example\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // A form or text/plain body (what a page may send without asking) is not JSON: 415.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(
        format!("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{ask}", ask.len())
            .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
    let (status, body) = common::http(&addr, "GET", "/health", "", "");
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap()["status"].clone()
        ),
        (200, json!("ready"))
    );
    // The daemon still answers.
    let (status, _) = common::http(
        &addr,
        "POST",
        "/v1/completions",
        "",
        r#"{"prompt": "A dog", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200);
}

#[test]
fn while_draining_health_says_so_and_new_requests_get_503() {
    let mut d = Daemon::start(
        "[http]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\n[engine]\ndrain_timeout_secs = 30\n",
    );
    let addr = d.http_addr();
    let mut c = d.connect();
    c.send(
        &json!({"id": "last", "prompt": "The", "max_tokens": 2000, "temperature": 20.0, "seed": 1}),
    );
    assert_eq!(c.recv()["type"], "token");
    d.signal(libc::SIGTERM);
    d.wait_for_log("shutting down", 1);
    let (status, body) = common::http(&addr, "GET", "/health", "", "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "draining"
    );
    let (status, body) = common::http(&addr, "POST", "/v1/completions", "", r#"{"prompt": "A"}"#);
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "shutting_down"
    );
    // The request in flight still ends with its answer, and then the daemon exits.
    c.send(&json!({"id": "last", "cancel": true}));
    let (_, done) = c.finish(&json!("last"));
    assert_eq!(done["type"], "done");
    assert!(d.wait().success());
}

#[test]
fn an_address_beyond_loopback_without_a_key_stops_the_start_with_a_clear_error() {
    let mut d = Daemon::spawn("[http]\nenabled = true\nlisten = [\"0.0.0.0:0\"]\n", |_| {});
    let status = d.wait();
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains("reachable from the network, and no API key is set"),
        "{log}"
    );
}
