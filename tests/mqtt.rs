//! The MQTT interface against real brokers: rumqttd embedded (always) and Mosquitto from Debian (when
//! installed; `.ci/run` installs it). Each scenario runs on every broker available.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::broker::{Broker, V5};
use common::{set_temperature, wait_for_budget, Daemon};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn brokers() -> Vec<Broker> {
    let mut b = vec![Broker::rumqttd()];
    b.extend(Broker::mosquitto());
    b
}

/// A daemon on `broker` with node `node` (topic prefix `bitnetd/<node>`), once its status is online.
fn daemon(broker: &Broker, node: &str, extra: &str) -> (Daemon, V5) {
    let d = Daemon::start(&broker.daemon_config(node, extra));
    let watcher = V5::connect(broker.port, &format!("watch-{node}"));
    watcher.subscribe(&format!("bitnetd/{node}/status"));
    watcher.wait_status(&format!("bitnetd/{node}"), "online", WAIT);
    (d, watcher)
}

fn v5_request(reply: &str, correlation: &'static [u8]) -> PublishProperties {
    PublishProperties {
        response_topic: Some(reply.into()),
        correlation_data: Some(Bytes::from_static(correlation)),
        ..Default::default()
    }
}

/// v5 properties with a Response Topic and no Correlation Data (requests told apart by id).
fn v5_reply(reply: &str) -> PublishProperties {
    PublishProperties {
        response_topic: Some(reply.into()),
        ..Default::default()
    }
}

fn long(id: &str, max_tokens: usize) -> Value {
    json!({"id": id, "prompt": "The", "max_tokens": max_tokens, "temperature": 20.0, "seed": 1,
           "repetition_penalty": 1.0})
}

#[test]
fn v5_round_trip_streams_in_order_with_correlation_data_and_content_type() {
    for broker in brokers() {
        let (_d, _w) = daemon(&broker, "v5rt", "");
        let dev = V5::connect(broker.port, "dev-v5");
        dev.subscribe("dev/v5/answers");
        let q = json!({"id": "a", "prompt": "A dog is", "max_tokens": 20});
        dev.publish(
            "bitnetd/v5rt/request",
            q.to_string().as_bytes(),
            v5_request("dev/v5/answers", b"\x00corr-1"),
        );
        let (tokens, done) = dev.answer("dev/v5/answers", &json!("a"), WAIT);
        let v = done.json();
        assert_eq!(v["type"], "done", "{}: {v}", broker.kind);
        let props = done.props.clone().expect("v5 properties");
        assert_eq!(
            props.correlation_data.as_deref(),
            Some(&b"\x00corr-1"[..]),
            "{}",
            broker.kind
        );
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            done.qos,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            "terminal reply at QoS 1"
        );
        // Streaming order: the same request without streaming gives the concatenated tokens in one message.
        let mut q2 = q.clone();
        q2["id"] = json!("b");
        q2["stream"] = json!(false);
        dev.publish(
            "bitnetd/v5rt/request",
            q2.to_string().as_bytes(),
            v5_request("dev/v5/answers", b"corr-2"),
        );
        let (none, done2) = dev.answer("dev/v5/answers", &json!("b"), WAIT);
        assert!(none.is_empty());
        assert_eq!(
            done2.json()["text"].as_str().unwrap(),
            tokens.concat(),
            "{}",
            broker.kind
        );
        assert!(!tokens.is_empty());
    }
}

/// Sends the two 3.1.1-style requests (addressing in the payload only) and checks where the answers land.
fn check_payload_addressing(
    publish: &dyn Fn(&str),
    recv: &dyn Fn() -> (String, Value),
    kind: &str,
) {
    publish(
        &json!({"id": "c3", "prompt": "A cat is", "max_tokens": 6, "stream": false,
                    "reply_to": "dev/v3/inbox"})
        .to_string(),
    );
    publish(&json!({"id": 77, "prompt": "A cat is", "max_tokens": 4, "stream": false}).to_string());
    let mut got = HashMap::new();
    while got.len() < 2 {
        let (topic, v) = recv();
        got.insert(topic, v);
    }
    assert_eq!(got["dev/v3/inbox"]["id"], "c3", "{kind}");
    assert_eq!(got["dev/v3/inbox"]["type"], "done");
    assert_eq!(got["bitnetd/v3rt/response/77"]["id"], 77, "{kind}");
}

#[test]
fn mqtt_3_clients_use_reply_to_and_the_default_response_topic() {
    // rumqttd 0.20 panics when it routes a v5 message (with properties) to a 3.1.1 subscriber, so there a v5
    // client sends 3.1.1-style requests (no properties); Mosquitto gets a real 3.1.1 client.
    for broker in brokers() {
        let (_d, _w) = daemon(&broker, "v3rt", "");
        if broker.kind == "rumqttd" {
            let dev = V5::connect(broker.port, "dev-v3-style");
            dev.subscribe("dev/v3/#");
            dev.subscribe("bitnetd/v3rt/response/#");
            check_payload_addressing(
                &|p| {
                    dev.publish(
                        "bitnetd/v3rt/request",
                        p.as_bytes(),
                        PublishProperties::default(),
                    )
                },
                &|| {
                    let m = dev.next(WAIT).expect("a reply");
                    (m.topic.clone(), m.json())
                },
                broker.kind,
            );
            continue;
        }
        let mut o = rumqttc::MqttOptions::new("dev-v3", "127.0.0.1", broker.port_v4);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = rumqttc::Client::new(o, 100);
        let (tx, rx) = std::sync::mpsc::channel();
        let (suback_tx, subacks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    _ => {}
                }
            }
        });
        client
            .subscribe("dev/v3/#", rumqttc::QoS::AtLeastOnce)
            .unwrap();
        client
            .subscribe("bitnetd/v3rt/response/#", rumqttc::QoS::AtLeastOnce)
            .unwrap();
        for _ in 0..2 {
            subacks.recv_timeout(WAIT).expect("a SubAck");
        }
        check_payload_addressing(
            &|p| {
                client
                    .publish(
                        "bitnetd/v3rt/request",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        p.to_string(),
                    )
                    .unwrap()
            },
            &|| {
                let (topic, payload) = rx.recv_timeout(WAIT).expect("a reply");
                (topic, serde_json::from_slice(&payload).unwrap())
            },
            broker.kind,
        );
    }
}

#[test]
fn an_expired_request_is_not_run() {
    // rumqttd 0.20 does not forward Message Expiry; Mosquitto does, as the MQTT 5 spec requires.
    if let Some(broker) = Broker::mosquitto() {
        // A hot board holds accepted local work ("queue"): the request waits there until it expires.
        let (d, _w) = daemon(
            &broker,
            "exp",
            "[budget]\nsample_ms = 50\nhot_action = \"queue\"\n",
        );
        set_temperature(&d.board(), 90.0);
        wait_for_budget(&mut d.connect(), |b| b["thermal"] == "hot");
        let dev = V5::connect(broker.port, "dev-exp");
        dev.subscribe("dev/exp/#");
        let mut props = v5_request("dev/exp/short", b"2");
        props.message_expiry_interval = Some(1);
        dev.publish(
            "bitnetd/exp/request",
            json!({"id": "short", "prompt": "A dog is"})
                .to_string()
                .as_bytes(),
            props,
        );
        let (_, done) = dev.answer("dev/exp/short", &json!("short"), WAIT);
        let v = done.json();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("expired")),
            "{}: {v}",
            broker.kind
        );
    }
}

#[test]
fn a_redelivered_request_is_not_run_twice() {
    for broker in brokers() {
        let (d, _w) = daemon(&broker, "dup", "");
        let dev = V5::connect(broker.port, "dev-dup");
        dev.subscribe("dev/dup/answers");
        let q = json!({"id": "once", "prompt": "A dog is", "max_tokens": 5, "stream": false});
        for _ in 0..3 {
            dev.publish(
                "bitnetd/dup/request",
                q.to_string().as_bytes(),
                v5_request("dev/dup/answers", b"same"),
            );
        }
        let (_, first) = dev.answer("dev/dup/answers", &json!("once"), WAIT);
        assert_eq!(first.json()["type"], "done");
        assert!(
            dev.next(Duration::from_millis(700)).is_none(),
            "{}: answered more than once",
            broker.kind
        );
        let status = d.connect().status();
        assert_eq!(status["requests"]["accepted"], 1, "{}", broker.kind);
    }
}

#[test]
fn retained_status_is_online_then_the_last_will_says_offline_after_sigkill() {
    for broker in brokers() {
        let (d, watcher) = daemon(&broker, "will", "");
        // A late subscriber gets the retained status.
        let late = V5::connect(broker.port, "late");
        late.subscribe("bitnetd/will/status");
        let s = late.wait_status("bitnetd/will", "online", WAIT);
        assert_eq!(s["model"], "bitnet-b1.58-wordnet-5m");
        assert_eq!(s["node"], "will");
        d.signal(libc::SIGKILL);
        // The broker notices the dead connection (socket closed) and publishes the will.
        let off = watcher.wait_status("bitnetd/will", "offline", WAIT);
        assert_eq!(off["node"], "will", "{}", broker.kind);
    }
}

#[test]
fn a_clean_shutdown_answers_in_flight_work_and_leaves_offline_retained() {
    for broker in brokers() {
        let (mut d, watcher) = daemon(&broker, "bye", "");
        let dev = V5::connect(broker.port, "dev-bye");
        dev.subscribe("dev/bye/answers");
        dev.publish(
            "bitnetd/bye/request",
            long("x", 1000).to_string().as_bytes(),
            v5_request("dev/bye/answers", b"x"),
        );
        dev.expect_on("dev/bye/answers", WAIT);
        d.signal(libc::SIGTERM);
        let (_, done) = dev.answer("dev/bye/answers", &json!("x"), WAIT);
        assert_eq!(done.json()["type"], "done", "{}", broker.kind);
        assert!(d.wait().success());
        watcher.wait_status("bitnetd/bye", "offline", WAIT);
        let late = V5::connect(broker.port, "late-bye");
        late.subscribe("bitnetd/bye/status");
        let m = late.expect_on("bitnetd/bye/status", WAIT);
        assert!(
            m.retain && m.json()["state"] == "offline",
            "{}: {:?}",
            broker.kind,
            m.json()
        );
    }
}

#[test]
fn two_daemons_in_one_pool_share_the_requests_and_keep_their_own_status() {
    for broker in brokers() {
        let shared = "topic_prefix = \"fleet/ai\"\nshared_group = \"pool\"\n";
        let dev = V5::connect(broker.port, "dev-share");
        dev.subscribe("fleet/ai/status/+");
        dev.subscribe("dev/share/#");
        let mut a = Daemon::start(&broker.daemon_config("share-a", shared));
        let b = Daemon::start(&broker.daemon_config("share-b", shared));
        // A daemon publishes `online` after its subscription, on the same connection: once both said it, the
        // broker shares the request topic between them. Each board has its own status topic.
        let mut online = HashSet::new();
        while online.len() < 2 {
            let m = dev.next(WAIT).expect("a status");
            let v = m.json();
            if v["state"] == "online" {
                assert_eq!(
                    m.topic,
                    format!("fleet/ai/status/{}", v["node"].as_str().unwrap())
                );
                online.insert(v["node"].to_string());
            }
        }
        let ask_all = |from: usize, n: usize| {
            for i in from..from + n {
                let q = json!({"id": i, "prompt": "A dog is", "max_tokens": 30, "stream": false});
                dev.publish(
                    "fleet/ai/request",
                    q.to_string().as_bytes(),
                    v5_reply("dev/share/answers"),
                );
            }
            let mut ids = HashSet::new();
            while ids.len() < n {
                let v = dev.expect_on("dev/share/answers", WAIT).json();
                assert_eq!(v["type"], "done", "{v}");
                assert!(
                    ids.insert(v["id"].to_string()),
                    "{}: answered twice: {v}",
                    broker.kind
                );
            }
        };
        let n = 12;
        ask_all(0, n);
        let served = |d: &Daemon| d.connect().status()["requests"]["served"].as_u64().unwrap();
        let (sa, sb) = (served(&a), served(&b));
        assert_eq!(sa + sb, n as u64, "{}", broker.kind);
        assert!(
            sa > 0 && sb > 0,
            "{}: both boards serve ({sa} + {sb})",
            broker.kind
        );
        // One board dies: its Will marks it offline, and only it.
        let _ = a.child.kill();
        let _ = a.child.wait();
        let v = dev.expect_on("fleet/ai/status/share-a", WAIT).json();
        assert_eq!(v["state"], "offline", "{}: {v}", broker.kind);
        let late = V5::connect(broker.port, "late-share");
        late.subscribe("fleet/ai/status/share-b");
        let v = late.expect_on("fleet/ai/status/share-b", WAIT).json();
        assert_eq!(
            v["state"], "online",
            "{}: the other board stays online: {v}",
            broker.kind
        );
        // The pool keeps answering every request exactly once.
        ask_all(n, 4);
        assert_eq!(served(&b), sb + 4, "{}", broker.kind);
    }
}

#[test]
fn bad_input_gets_an_error_reply_when_it_can_and_nothing_crashes() {
    for broker in brokers() {
        let (d, _w) = daemon(&broker, "bad", "max_payload_bytes = 65536\n");
        let dev = V5::connect(broker.port, "dev-bad");
        dev.subscribe("dev/bad/#");
        let send = |payload: &[u8], topic: &str| {
            dev.publish("bitnetd/bad/request", payload, v5_request(topic, b"c"));
            let m = dev.expect_on(topic, WAIT);
            m.json()
        };
        let v = send(b"not json", "dev/bad/1");
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some("bad_request"))
        );
        let v = send(&vec![b' '; 70_000], "dev/bad/2");
        assert_eq!(v["code"], "too_large", "{}: {v}", broker.kind);
        let v = send(br#"{"id":"m"}"#, "dev/bad/3");
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("bad_request"), Some("m"))
        );
        let v = send(br#"{"id":"r","prompt":"x","route":"moon"}"#, "dev/bad/4");
        assert_eq!(v["code"], "bad_request");
        assert!(v["message"].as_str().unwrap().contains("moon"));
        let v = send(br#"{"id":"t","prompt":"x","reply_to":5}"#, "dev/bad/5");
        assert_eq!(v["code"], "bad_request");
        // A large request within the limit gets through (rumqttc's 10 KiB default is raised), and is judged
        // on its content: this prompt is longer than the model's context.
        let big = json!({"id": "big", "prompt": "word ".repeat(3000)}).to_string();
        assert!(big.len() > 10 << 10 && big.len() < 65536);
        let v = send(big.as_bytes(), "dev/bad/7");
        assert_eq!(v["code"], "too_long", "{}: {v}", broker.kind);
        // Without any reply address: only a log line, and the daemon goes on.
        dev.publish(
            "bitnetd/bad/request",
            b"[1,2]",
            PublishProperties::default(),
        );
        let v = send(
            br#"{"id":"ok","prompt":"A dog is","max_tokens":2,"stream":false}"#,
            "dev/bad/6",
        );
        assert_eq!(v["type"], "done", "{}: {v}", broker.kind);
        assert!(
            d.connect().status()["requests"]["rejected"]
                .as_u64()
                .unwrap()
                >= 6
        );
    }
}

#[test]
fn a_flood_gets_busy_not_an_unbounded_queue() {
    for broker in brokers() {
        let (_d, _w) = daemon(&broker, "flood", "max_in_flight = 3\n");
        let dev = V5::connect(broker.port, "dev-flood");
        dev.subscribe("dev/flood/#");
        let n = 20;
        for i in 0..n {
            let q = long(&format!("f{i}"), 40);
            dev.publish(
                "bitnetd/flood/request",
                q.to_string().as_bytes(),
                v5_reply("dev/flood/answers"),
            );
        }
        let (mut busy, mut done) = (0, 0);
        let mut seen = HashSet::new();
        while seen.len() < n {
            let v = dev.expect_on("dev/flood/answers", WAIT).json();
            match v["type"].as_str().unwrap() {
                "token" => continue,
                "done" => done += 1,
                _ => {
                    assert_eq!(v["code"], "busy", "{v}");
                    busy += 1;
                }
            }
            assert!(seen.insert(v["id"].to_string()), "{v}");
        }
        assert!(
            busy > 0 && done >= 3,
            "{}: busy {busy}, done {done}",
            broker.kind
        );
    }
}

#[test]
fn a_broker_restart_mid_stream_ends_in_an_answer_not_a_hang() {
    let Some(mut broker) = Broker::mosquitto() else {
        return;
    };
    let (d, _w) = daemon(&broker, "restart", "");
    let port = broker.port;
    let dev = V5::connect(port, "dev-restart");
    dev.subscribe("dev/restart/answers");
    let mut q = long("r", 1000);
    q["stream"] = json!(true);
    dev.publish(
        "bitnetd/restart/request",
        q.to_string().as_bytes(),
        v5_request("dev/restart/answers", b"r"),
    );
    dev.expect_on("dev/restart/answers", WAIT);
    broker.kill();
    d.wait_for_log("MQTT connection: ", 1);
    let broker = Broker::mosquitto_on(port).unwrap();
    // The device reconnects and subscribes again (a clean session); the daemon reconnects by itself.
    let dev = V5::connect(broker.port, "dev-restart-2");
    dev.subscribe("dev/restart/answers");
    dev.subscribe("bitnetd/restart/status");
    dev.wait_status("bitnetd/restart", "online", WAIT);
    // The daemon serves new requests, and the one that was running when the broker died ends.
    let q2 = json!({"id": "after", "prompt": "A dog is", "max_tokens": 3, "stream": false});
    dev.publish(
        "bitnetd/restart/request",
        q2.to_string().as_bytes(),
        v5_request("dev/restart/answers", b"a"),
    );
    let (_, after) = dev.answer("dev/restart/answers", &json!("after"), WAIT);
    assert_eq!(after.json()["type"], "done");
    let mut c = d.connect();
    let start = std::time::Instant::now();
    loop {
        let s = c.status();
        if s["requests"]["in_flight"] == 0 {
            assert_eq!(s["requests"]["served"], 2, "{s}");
            break;
        }
        assert!(start.elapsed() < WAIT, "the first request never ended: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    common::run_ok(
        std::process::Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(dir),
    );
}

#[test]
fn mutual_tls_to_the_broker() {
    if !common::have_tool("openssl", &["version"]) {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(d, "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bitnetd-test-ca");
    for name in ["server", "client"] {
        openssl(
            d,
            &format!(
                "req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}"
            ),
        );
        openssl(
            d,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem -days 2 \
                 -extfile san.ext"
            ),
        );
    }
    let tls_port = common::broker::free_port();
    let p = |f: &str| d.join(f).display().to_string();
    let listener = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        p("ca.pem"),
        p("server.pem"),
        p("server.key")
    );
    let Some(broker) = Broker::mosquitto_with(common::broker::free_port(), &listener) else {
        return;
    };
    let tls = format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {tls_port}\nnode = \"tls\"\ntls = true\nca_file = \"{}\"\n\
         client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    let _daemon = Daemon::start(&tls);
    let dev = V5::connect(broker.port, "dev-tls");
    dev.subscribe("bitnetd/tls/status");
    dev.wait_status("bitnetd/tls", "online", WAIT);
    dev.subscribe("dev/tls/answers");
    let q = json!({"id": "t", "prompt": "A dog is", "max_tokens": 3, "stream": false});
    dev.publish(
        "bitnetd/tls/request",
        q.to_string().as_bytes(),
        v5_reply("dev/tls/answers"),
    );
    let (_, done) = dev.answer("dev/tls/answers", &json!("t"), WAIT);
    assert_eq!(done.json()["type"], "done");

    // Without the client certificate the broker refuses the daemon; the daemon keeps retrying and stays up.
    let no_cert = format!("[mqtt]\nhost = \"127.0.0.1\"\nport = {tls_port}\nnode = \"tls2\"\ntls = true\nca_file = \"{}\"\n", p("ca.pem"));
    let d2 = Daemon::start(&no_cert);
    d2.wait_for_log("MQTT reconnecting", 2);
    assert_eq!(d2.connect().status()["state"], "ready");
    // A CA file that is not a certificate stops the start with a clear error.
    let bad = format!("[mqtt]\ntls = true\nca_file = \"{}\"\n", p("san.ext"));
    let mut d3 = Daemon::spawn(&bad, |_| {});
    assert!(!d3.wait().success());
    assert!(d3.log().contains("MQTT TLS"), "{}", d3.log());
}

#[test]
fn home_assistant_discovery_announces_the_board() {
    for broker in brokers() {
        let (_d, _w) = daemon(&broker, "ha", "home_assistant = true\n");
        let ha = V5::connect(broker.port, "home-assistant");
        ha.subscribe("homeassistant/sensor/ha/+/config");
        let mut objects = HashSet::new();
        while objects.len() < 3 {
            let m = ha.next(WAIT).expect("discovery configs");
            assert!(m.retain, "{}: discovery configs are retained", broker.kind);
            let v = m.json();
            assert_eq!(v["state_topic"], "bitnetd/ha/status");
            assert_eq!(v["device"]["identifiers"][0], "bitnetd_ha");
            assert!(v["value_template"].as_str().unwrap().contains("value_json"));
            objects.insert(m.topic.clone());
        }
    }
}

#[test]
fn a_device_over_its_request_rate_gets_busy_and_the_others_are_served() {
    let broker = Broker::rumqttd();
    let (_d, _w) = daemon(&broker, "rate", "client_requests_per_minute = 2\n");
    let dev = V5::connect(broker.port, "dev-rate");
    dev.subscribe("dev/rate/#");
    let ask = |id: u64, reply: &str| {
        let q = json!({"id": id, "prompt": "A dog is", "max_tokens": 2, "stream": false});
        dev.publish(
            "bitnetd/rate/request",
            q.to_string().as_bytes(),
            v5_reply(reply),
        );
    };
    for id in 0..3 {
        ask(id, "dev/rate/a");
    }
    let (mut done, mut busy) = (0, 0);
    while done + busy < 3 {
        let v = dev.expect_on("dev/rate/a", WAIT).json();
        match v["type"].as_str() {
            Some("done") => done += 1,
            Some("error") => {
                assert_eq!(v["code"], "busy", "{v}");
                assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
                busy += 1;
            }
            _ => panic!("{v}"),
        }
    }
    assert_eq!((done, busy), (2, 1), "a burst of two, then busy");
    // Another device has its own share.
    ask(9, "dev/rate/b");
    let v = dev.expect_on("dev/rate/b", WAIT).json();
    assert_eq!(
        (v["type"].clone(), v["id"].clone()),
        (json!("done"), json!(9)),
        "{v}"
    );
}
