//! Daemon overhead benchmark: starts `bitnetd run` (release build) on the default model and measures what the
//! daemon adds around inference, printing one line of JSON and human lines:
//! - the round trip of `{"cmd":"status"}` and of a request refused at validation (no inference at all);
//! - for a one-token request, the client's round trip minus the daemon's own `timing.total_ms` (socket, JSON,
//!   dispatch and queue hand-off);
//! - idle resident size before the model is loaded and after, as the daemon reports it;
//! - with Mosquitto installed, the same over MQTT: a one-token request's round trip through the broker minus
//!   the daemon's `timing.total_ms`, and the round trip of a status request;
//! - over HTTP (a keep-alive connection on loopback): a one-token `/v1/completions` request's round trip minus
//!   the daemon's `timing.total_ms`, and the round trip of `GET /health`.
//!
//!   cargo bench --bench daemon -- [--model DIR] [--runs 2000]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn ask(&mut self, v: &Value) -> Value {
        writeln!(self.w, "{v}").unwrap();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply["type"] != "token" {
                return reply;
            }
        }
    }
}

fn percentiles(mut us: Vec<f64>) -> (f64, f64) {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut model, mut runs) = (None, 2000usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next(),
            "--runs" => runs = args.next().unwrap().parse().unwrap(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bench.sock");
    let broker = mosquitto(dir.path());
    let config = dir.path().join("bitnetd.toml");
    let mqtt_section = broker
        .as_ref()
        .map(|(_, port)| {
            format!("[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nnode = \"bench\"\nclient_requests_per_minute = 0\n")
        })
        .unwrap_or_default();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http_section = format!("[http]\nenabled = true\nlisten = [\"127.0.0.1:{http_port}\"]\n");
    std::fs::write(&config, format!("{mqtt_section}{http_section}")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnetd"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("BITNETD_SOCKET", &socket)
        .env("BITNETD_LOG", "warn")
        .env_remove("BITNETD_CONFIG")
        .stderr(Stdio::inherit());
    if let Some(m) = &model {
        cmd.env("BITNETD_MODEL", m);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut c = Conn {
        r: BufReader::new(stream.try_clone().unwrap()),
        w: stream,
    };
    let idle = c.ask(&json!({"cmd": "status"}));

    let time = |c: &mut Conn, v: &Value| {
        let t = Instant::now();
        let r = c.ask(v);
        (t.elapsed().as_secs_f64() * 1e6, r)
    };
    let status_us: Vec<f64> = (0..runs)
        .map(|_| time(&mut c, &json!({"cmd": "status"})).0)
        .collect();
    let refused_us: Vec<f64> = (0..runs)
        .map(|i| time(&mut c, &json!({"id": i, "prompt": "x", "top_p": 0})).0)
        .collect();
    let one_token = runs.min(500);
    let mut wrapper_us = vec![];
    for i in 0..one_token {
        let q = json!({"id": i, "prompt": "A dog is", "max_tokens": 1, "stream": false});
        let (rtt, r) = time(&mut c, &q);
        assert_eq!(r["type"], "done", "{r}");
        wrapper_us.push(rtt - r["timing"]["total_ms"].as_f64().unwrap() * 1e3);
    }
    let mqtt = broker
        .as_ref()
        .map(|(_, port)| mqtt_overhead(*port, runs.min(500)));
    let http = http_overhead(http_port, runs.min(500));
    let busy = c.ask(&json!({"cmd": "status"}));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    if let Some((mut b, _)) = broker {
        let _ = b.kill();
    }

    let (s50, s99) = percentiles(status_us);
    let (r50, r99) = percentiles(refused_us);
    let (w50, w99) = percentiles(wrapper_us);
    let mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64;
    let out = json!({
        "model": idle["model"],
        "status_rtt_us": {"p50": s50, "p99": s99},
        "refused_rtt_us": {"p50": r50, "p99": r99},
        "one_token_overhead_us": {"p50": w50, "p99": w99},
        "rss_before_model_mib": mib(&idle["memory"]["rss_before_model_bytes"]),
        "rss_idle_with_model_mib": mib(&idle["memory"]["rss_bytes"]),
        "rss_after_requests_mib": mib(&busy["memory"]["rss_bytes"]),
        "runs": runs,
        "http": {
            "one_token_overhead_us": {"p50": http.0 .0, "p99": http.0 .1},
            "health_rtt_us": {"p50": http.1 .0, "p99": http.1 .1},
        },
        "mqtt": mqtt.map(|((m50, m99), (q50, q99))| json!({
            "one_token_overhead_us": {"p50": m50, "p99": m99},
            "status_rtt_us": {"p50": q50, "p99": q99},
        })),
    });
    println!("{out}");
    println!(
        "status round trip p50 {s50:.0} us (p99 {s99:.0}); refused request p50 {r50:.0} us (p99 {r99:.0}); \
         daemon overhead around a 1-token request p50 {w50:.0} us (p99 {w99:.0})"
    );
    println!(
        "HTTP (loopback, keep-alive): overhead around a 1-token request p50 {:.0} us (p99 {:.0}); /health round \
         trip p50 {:.0} us (p99 {:.0})",
        http.0 .0, http.0 .1, http.1 .0, http.1 .1
    );
    if let Some(m) = &out["mqtt"].as_object() {
        println!(
            "MQTT (Mosquitto on loopback): overhead around a 1-token request p50 {:.0} us (p99 {:.0}); status \
             round trip p50 {:.0} us (p99 {:.0})",
            m["one_token_overhead_us"]["p50"].as_f64().unwrap(),
            m["one_token_overhead_us"]["p99"].as_f64().unwrap(),
            m["status_rtt_us"]["p50"].as_f64().unwrap(),
            m["status_rtt_us"]["p99"].as_f64().unwrap()
        );
    }
    println!(
        "RSS: {:.1} MiB before the model, {:.1} MiB idle with it, {:.1} MiB after {} requests",
        mib(&idle["memory"]["rss_before_model_bytes"]),
        mib(&idle["memory"]["rss_bytes"]),
        mib(&busy["memory"]["rss_bytes"]),
        2 * runs + one_token
    );
}

/// Mosquitto on a free loopback port, if installed.
fn mosquitto(dir: &std::path::Path) -> Option<(std::process::Child, u16)> {
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let conf = dir.join("mosquitto.conf");
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    // Mosquitto's default leaves Nagle's algorithm on; a Pi's broker should set this too (docs/mqtt.md).
    let text =
        format!("{user}allow_anonymous true\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n");
    std::fs::write(&conf, text).ok()?;
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((child, port))
}

/// (one-token request round trip minus the daemon's own time, status round trip), p50/p99 in microseconds.
fn mqtt_overhead(port: u16, runs: usize) -> ((f64, f64), (f64, f64)) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Client, Event, MqttOptions};
    let mut opts = MqttOptions::new("bench-dev", "127.0.0.1", port);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    let (client, mut conn) = Client::new(opts, 100);
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = tx.send(json!({"connected": true}));
                }
                _ => {}
            }
        }
    });
    rx.recv().unwrap();
    client.subscribe("bench/answers", QoS::AtLeastOnce).unwrap();
    client
        .subscribe("bitnetd/bench/status", QoS::AtLeastOnce)
        .unwrap();
    // Wait until the daemon is subscribed (its retained status says online).
    while rx.recv().unwrap()["state"] != "online" {}
    let props = || PublishProperties {
        response_topic: Some("bench/answers".into()),
        ..Default::default()
    };
    let ask = |q: Value| {
        let t = Instant::now();
        client
            .publish_with_properties(
                "bitnetd/bench/request",
                QoS::AtMostOnce,
                false,
                q.to_string(),
                props(),
            )
            .unwrap();
        loop {
            let r = rx.recv().unwrap();
            if r["id"] == q["id"] && r["type"] != "token" {
                return (t.elapsed().as_secs_f64() * 1e6, r);
            }
        }
    };
    let mut one = vec![];
    let mut status = vec![];
    for i in 0..runs {
        let (rtt, r) =
            ask(json!({"id": i, "prompt": "A dog is", "max_tokens": 1, "stream": false}));
        one.push(rtt - r["timing"]["total_ms"].as_f64().unwrap() * 1e3);
        let (rtt, _) = ask(json!({"id": format!("s{i}"), "cmd": "status"}));
        status.push(rtt);
    }
    (percentiles(one), percentiles(status))
}

/// One HTTP/1.1 exchange on a keep-alive connection: the status and the body.
fn http_exchange(
    w: &mut std::net::TcpStream,
    r: &mut BufReader<std::net::TcpStream>,
    request: &str,
) -> (u16, Vec<u8>) {
    use std::io::Read;
    w.write_all(request.as_bytes()).unwrap();
    let mut status = 0;
    let mut length = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
            status = rest[..3].parse().unwrap();
        } else if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).unwrap();
    (status, body)
}

/// Over HTTP: the overhead around one-token completions (round trip minus the daemon's own time) and the
/// round trip of `GET /health`, p50 and p99 in microseconds.
fn http_overhead(port: u16, runs: usize) -> ((f64, f64), (f64, f64)) {
    let w = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    w.set_nodelay(true).unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    let mut w = w;
    let body = r#"{"prompt": "A dog is", "max_tokens": 1}"#;
    let completion = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut overhead = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        let (status, reply) = http_exchange(&mut w, &mut r, &completion);
        let rtt = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        let v: Value = serde_json::from_slice(&reply).unwrap();
        overhead.push(rtt - v["bitnetd"]["timing"]["total_ms"].as_f64().unwrap() * 1e3);
    }
    let health = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let health_us: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(http_exchange(&mut w, &mut r, health).0, 200);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    (percentiles(overhead), percentiles(health_us))
}
