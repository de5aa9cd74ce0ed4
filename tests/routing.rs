//! The daemon with a cloud: routing of real requests over the socket, the private-never-leaves invariant
//! (proved with a recording fake Kimi), the local fallback and its timing, and store-and-forward across a
//! SIGKILL. Nothing here reaches the internet: the only cloud is the fake one on loopback.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::kimi::{Behavior, FakeKimi};
use common::{Client, Daemon};
use serde_json::{json, Value};

fn config(kimi: &FakeKimi, extra: &str) -> String {
    format!(
        "[cloud]\nbase_url = \"{}\"\nmodel = \"kimi-test\"\nfirst_byte_timeout_ms = 3000\nstall_timeout_ms = 1000\n\
         retry_min_ms = 50\nretry_max_ms = 200\nprobe_interval_secs = 1\nprobe_timeout_ms = 500\n{extra}",
        kimi.base_url()
    )
}

fn with_key(cmd: &mut Command) {
    cmd.env("KIMI_API_KEY", "sk-test");
}

/// Waits until `status` shows the cloud link in `state`.
fn wait_link(c: &mut Client, state: &str) {
    let start = Instant::now();
    loop {
        let s = c.status();
        if s["cloud"]["link"]["state"] == state {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "link never {state}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ask(c: &mut Client, req: Value) -> (Vec<String>, Value) {
    let id = req["id"].clone();
    c.send(&req);
    c.finish(&id)
}

/// Two reasoning keywords and a step-by-step ask: complex (0.75), not expert.
const COMPLEX: &str = "Analyze the pump log and compare the bearing wear step by step";

#[test]
fn auto_routes_simple_work_locally_and_complex_work_to_the_cloud() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let (_, done) = ask(
        &mut c,
        json!({"id": 1, "prompt": "A dog is", "max_tokens": 4}),
    );
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("local"), Some("simple")),
        "{done}"
    );
    let (tokens, done) = ask(
        &mut c,
        json!({"id": 2, "prompt": COMPLEX, "max_tokens": 20}),
    );
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("cloud"), Some("complex")),
        "{done}"
    );
    assert_eq!(tokens.concat(), "Hello from Kimi");
    assert_eq!(done["model"], "kimi-test");
    assert_eq!(done["usage"]["completion_tokens"], 3);
    let (_, done) = ask(
        &mut c,
        json!({"id": 3, "prompt": "hi", "route": "cloud", "stream": false}),
    );
    assert_eq!(
        (done["route"].as_str(), done["text"].as_str()),
        (Some("cloud"), Some("Hello from Kimi"))
    );
    assert_eq!(kimi.chats().len(), 2);
    let s = c.status();
    assert_eq!(s["requests"]["routes"]["cloud"]["complex"], 1, "{s}");
    assert_eq!(s["requests"]["routes"]["local"]["simple"], 1, "{s}");
    assert_eq!(s["cloud"]["model"], "kimi-test");
    assert!(!d.log().contains("sk-test"), "the key is never logged");
    assert!(
        !d.log().contains("bearing"),
        "prompts are not logged at debug"
    );
}

#[test]
fn private_requests_never_reach_the_network() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let secret = "private-sensor-reading-4711";
    for (i, extra) in [
        json!({}),
        json!({"route": "cloud"}),
        json!({"route": "cloud", "defer": true}),
        json!({"deadline_ms": 1}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = json!({"id": i, "private": true, "max_tokens": 3,
            "prompt": format!("{COMPLEX} {secret} and prove it step by step")});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let (_, done) = ask(&mut c, req);
        assert_ne!(done["route"], "cloud", "{done}");
        if done["type"] == "done" {
            assert_eq!(done["route_reason"], "private");
        }
    }
    // Even when the local run fails (a prompt too long for the local model), there is no cloud fallback.
    let long = format!("{secret} {}", "word ".repeat(3000));
    let (_, r) = ask(
        &mut c,
        json!({"id": "long", "private": true, "prompt": long}),
    );
    assert_eq!(r["code"], "too_long", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    for r in kimi.recorded() {
        assert!(
            !r.body.to_string().contains(secret),
            "a private prompt reached the cloud: {:?}",
            r.path
        );
        assert!(
            r.path.ends_with("/models"),
            "only probes went out: {}",
            r.path
        );
    }
}

#[test]
fn an_early_cloud_failure_falls_back_to_local_within_a_second() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    kimi.script([Behavior::error(503, "server_error")]);
    let id = json!("fb");
    c.send(&json!({"id": "fb", "prompt": COMPLEX, "max_tokens": 8}));
    let mut first_token = None;
    let done = loop {
        let r = c.recv();
        if r["id"] != id {
            continue;
        }
        if r["type"] == "token" && first_token.is_none() {
            first_token = Some(Instant::now());
        }
        if r["type"] == "done" || r["type"] == "error" {
            break r;
        }
    };
    assert_eq!(
        (done["route"].as_str(), done["fallback"].as_str()),
        (Some("local"), Some("server_error")),
        "{done}"
    );
    assert_eq!(done["route_reason"], "complex");
    let failed_at = kimi.chats()[0].answered;
    let switch = first_token
        .expect("local tokens streamed")
        .duration_since(failed_at);
    eprintln!("fallback switch, 503 sent to first local token received: {switch:?}");
    assert!(
        switch < Duration::from_secs(1),
        "from the cloud's 503 to the first local token: {switch:?}"
    );
    assert_eq!(
        kimi.chats().len(),
        1,
        "auto requests with a fallback are not retried"
    );
    let s = c.status();
    assert_eq!(s["requests"]["fallbacks"]["server_error"], 1, "{s}");
    assert_eq!(s["cloud"]["errors"]["server_error"], 1, "{s}");
}

#[test]
fn a_cut_mid_stream_ends_with_a_clear_error_and_cloud_errors_name_the_cause() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    kimi.script([Behavior::CutAfter(vec!["Half ".into(), "an answer".into()])]);
    let (tokens, r) = ask(&mut c, json!({"id": "cut", "prompt": COMPLEX}));
    assert_eq!(tokens.concat(), "Half an answer");
    assert_eq!(
        (r["code"].as_str(), r["cause"].as_str()),
        (Some("cloud_error"), Some("cut")),
        "{r}"
    );
    kimi.script([Behavior::error(429, "exceeded_current_quota_error")]);
    let (_, r) = ask(
        &mut c,
        json!({"id": "quota", "prompt": "x", "route": "cloud"}),
    );
    assert_eq!(
        (r["code"].as_str(), r["cause"].as_str()),
        (Some("cloud_error"), Some("quota_exceeded")),
        "{r}"
    );
    // Not streamed, the cut answer was never shown: it falls back.
    kimi.script([Behavior::CutAfter(vec!["Half".into()])]);
    let (_, done) = ask(
        &mut c,
        json!({"id": "quiet", "prompt": COMPLEX, "stream": false, "max_tokens": 4}),
    );
    assert_eq!(
        (done["route"].as_str(), done["fallback"].as_str()),
        (Some("local"), Some("cut")),
        "{done}"
    );
}

#[test]
fn cloud_requests_while_offline_are_refused_or_deferred() {
    let kimi = FakeKimi::start();
    kimi.set_online(false);
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "offline");
    let (_, r) = ask(&mut c, json!({"id": 1, "prompt": "x", "route": "cloud"}));
    assert_eq!(r["code"], "cloud_unavailable", "{r}");
    let (_, done) = ask(&mut c, json!({"id": 2, "prompt": COMPLEX, "max_tokens": 3}));
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("local"), Some("cloud_offline"))
    );
    let (_, r) = ask(
        &mut c,
        json!({"id": 3, "prompt": "x", "route": "cloud", "defer": true}),
    );
    assert_eq!(
        (r["type"].as_str(), r["position"].as_u64()),
        (Some("deferred"), Some(1)),
        "{r}"
    );
    c.send(&json!({"cmd": "result", "id": 3}));
    assert_eq!(c.recv()["type"], "deferred");
    c.send(&json!({"cmd": "result", "id": "nope"}));
    assert_eq!(c.recv()["code"], "not_found");
}

#[test]
fn deferred_tasks_survive_sigkill_and_are_forwarded_once_when_online() {
    let kimi = FakeKimi::start();
    kimi.set_online(false);
    let state = tempfile::tempdir().unwrap();
    let cfg = config(
        &kimi,
        &format!("[defer]\nstate_dir = \"{}\"\n", state.path().display()),
    );
    let mut d = Daemon::start_with(&cfg, with_key);
    let mut c = d.connect();
    wait_link(&mut c, "offline");
    for i in 0..3 {
        let (_, r) = ask(
            &mut c,
            json!({"id": format!("t{i}"), "prompt": format!("task {i}"), "route": "cloud", "defer": true}),
        );
        assert_eq!(r["type"], "deferred", "{r}");
    }
    d.signal(libc::SIGKILL);
    d.wait();
    kimi.set_online(true);
    let d2 = Daemon::start_with(&cfg, with_key);
    let mut c = d2.connect();
    let chats = kimi.wait_for_chats(3, Duration::from_secs(30));
    for i in 0..3 {
        let start = Instant::now();
        let r = loop {
            c.send(&json!({"cmd": "result", "id": format!("t{i}")}));
            let r = c.recv();
            if r["type"] != "deferred" {
                break r;
            }
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            (r["type"].as_str(), r["route"].as_str()),
            (Some("done"), Some("cloud")),
            "{r}"
        );
        assert_eq!(
            (r["text"].as_str(), r["deferred"].as_bool()),
            (Some("Hello from Kimi"), Some(true))
        );
    }
    let contents: Vec<String> = chats
        .iter()
        .map(|r| r.body["messages"][0]["content"].to_string())
        .collect();
    assert_eq!(
        contents,
        ["\"task 0\"", "\"task 1\"", "\"task 2\""],
        "in order"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(kimi.chats().len(), 3, "each sent once");
    let s = c.status();
    assert_eq!(
        (
            s["cloud"]["deferred_pending"].as_u64(),
            s["cloud"]["deferred_results"].as_u64()
        ),
        (Some(0), Some(3))
    );
}

#[test]
fn a_full_deferred_queue_answers_busy() {
    let kimi = FakeKimi::start();
    kimi.set_online(false);
    let d = Daemon::start_with(&config(&kimi, "[defer]\nmax_tasks = 1\n"), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "offline");
    let (_, r) = ask(
        &mut c,
        json!({"id": 1, "prompt": "x", "route": "cloud", "defer": true}),
    );
    assert_eq!(r["type"], "deferred");
    let (_, r) = ask(
        &mut c,
        json!({"id": 2, "prompt": "x", "route": "cloud", "defer": true}),
    );
    assert_eq!(r["code"], "busy", "{r}");
}

#[test]
fn without_a_key_the_cloud_is_off_and_nothing_is_sent() {
    let kimi = FakeKimi::start();
    let d = Daemon::start(&config(&kimi, ""));
    let mut c = d.connect();
    let (_, r) = ask(&mut c, json!({"id": 1, "prompt": "x", "route": "cloud"}));
    assert_eq!(r["code"], "cloud_unavailable");
    let (_, done) = ask(&mut c, json!({"id": 2, "prompt": COMPLEX, "max_tokens": 2}));
    assert_eq!(done["route"], "local");
    assert!(c.status()["cloud"].is_null());
    assert!(kimi.recorded().is_empty());
}

#[test]
fn a_deferred_mqtt_request_gets_its_answer_published_when_the_cloud_is_back() {
    use bytes::Bytes;
    use common::broker::{Broker, V5};
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let kimi = FakeKimi::start();
    kimi.set_online(false);
    let broker = Broker::rumqttd();
    let d = Daemon::start_with(&broker.daemon_config("defer", &config(&kimi, "")), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "offline");
    let dev = V5::connect(broker.port, "dev-defer");
    dev.subscribe("dev/defer/answers");
    // The daemon says `online` after its subscription: from then on the broker routes requests to it.
    dev.subscribe("bitnetd/defer/status");
    dev.wait_status("bitnetd/defer", "online", Duration::from_secs(30));
    let props = PublishProperties {
        response_topic: Some("dev/defer/answers".into()),
        correlation_data: Some(Bytes::from_static(b"\x01corr")),
        ..Default::default()
    };
    let q = json!({"id": "m1", "prompt": COMPLEX, "defer": true});
    dev.publish("bitnetd/defer/request", q.to_string().as_bytes(), props);
    let wait = Duration::from_secs(30);
    let (_, ack) = dev.answer("dev/defer/answers", &json!("m1"), wait);
    assert_eq!(ack.json()["type"], "deferred", "{}", ack.json());
    kimi.set_online(true);
    let (_, m) = dev.answer("dev/defer/answers", &json!("m1"), wait);
    let v = m.json();
    assert_eq!(
        (v["type"].as_str(), v["route"].as_str()),
        (Some("done"), Some("cloud")),
        "{v}"
    );
    assert_eq!(v["text"], "Hello from Kimi");
    assert_eq!(
        m.props.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"\x01corr"[..]),
        "the correlation data is kept with the task"
    );
}

#[test]
fn the_cli_defers_and_fetches_the_result() {
    let kimi = FakeKimi::start();
    kimi.set_online(false);
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "offline");
    let out = common::run_ok(
        common::bitnetd()
            .args([
                "ask",
                "--route",
                "cloud",
                "--defer",
                "--id",
                "cli-1",
                "Summarize the logs",
            ])
            .arg("--socket")
            .arg(&d.socket),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("bitnetd result cli-1"));
    kimi.set_online(true);
    let start = Instant::now();
    loop {
        let out = common::run_ok(
            common::bitnetd()
                .args(["result", "cli-1", "--socket"])
                .arg(&d.socket),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["type"] == "done" {
            assert_eq!(v["text"], "Hello from Kimi");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_low_battery_sends_auto_work_to_the_cloud_and_keeps_private_work_local() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, "[budget]\nsample_ms = 50\n"), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    common::set_battery(&d.board(), 12, false);
    common::wait_for_budget(&mut c, |b| b["power_level"] == "economy");
    let (_, done) = ask(&mut c, json!({"id": 1, "prompt": "A dog is"}));
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("cloud"), Some("low_battery")),
        "{done}"
    );
    let secret = "battery-private-0815";
    let (_, done) = ask(
        &mut c,
        json!({"id": 2, "prompt": format!("A dog is {secret}"), "private": true, "max_tokens": 3}),
    );
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("local"), Some("private")),
        "{done}"
    );
    assert_eq!(kimi.chats().len(), 1, "only the auto request went out");
    assert!(kimi
        .recorded()
        .iter()
        .all(|r| !r.body.to_string().contains(secret)));
}

#[test]
fn a_hot_board_sends_auto_work_to_the_cloud_and_refuses_what_must_stay() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(&config(&kimi, "[budget]\nsample_ms = 50\n"), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let zone = d.board().join("sys/class/thermal/thermal_zone0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("temp"), "90000\n").unwrap();
    let start = Instant::now();
    while c.status()["budget"]["thermal"] != "hot" {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, done) = ask(&mut c, json!({"id": 1, "prompt": "A dog is"}));
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("cloud"), Some("board_busy")),
        "{done}"
    );
    let (_, r) = ask(
        &mut c,
        json!({"id": 2, "prompt": "A dog is", "private": true}),
    );
    assert_eq!(
        (r["code"].as_str(), r["retry_after_ms"].as_u64()),
        (Some("over_budget"), Some(30000)),
        "{r}"
    );
    let s = c.status();
    assert!(
        s["latency"]["cloud"]["ttft_ms"].as_f64().is_some(),
        "cloud latency is measured: {s}"
    );
}

/// The plan's validation: expert work, sent to the cloud with the plan's system prompt in JSON mode, and
/// answered with the text and the parsed result; an answer that does not parse is a `cloud_error` (`protocol`).
#[test]
fn a_validation_is_expert_work_answered_with_its_parsed_result() {
    let kimi = FakeKimi::start();
    let verdict = r#"{"evidence_assessment": "consistent", "logical_consistency": "sound", "alternative_explanations": ["sensor drift"], "confidence": 0.82, "recommendations": ["inspect"]}"#;
    kimi.script([
        Behavior::answer(verdict),
        Behavior::answer("Probably true."),
    ]);
    let d = Daemon::start_with(&config(&kimi, ""), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let validate = |id: &str| {
        json!({"id": id, "task": "validate", "hypothesis": "The bearing fails",
            "evidence": ["vibration rose 40%", "temperature up 12 C"], "context": "pump P-7 log", "stream": false})
    };
    let (_, done) = ask(&mut c, validate("v1"));
    assert_eq!(
        (done["route"].as_str(), done["route_reason"].as_str()),
        (Some("cloud"), Some("expert")),
        "{done}"
    );
    assert_eq!(done["result"]["confidence"], 0.82, "{done}");
    assert_eq!(done["text"], verdict);
    let body = &kimi.chats()[0].body;
    assert_eq!(body["response_format"]["type"], "json_object");
    assert_eq!(
        body["messages"][0]["content"],
        bitnetd::tasks::SYSTEM_PROMPT
    );
    let user = body["messages"][1]["content"].as_str().unwrap();
    assert!(
        user.contains("Hypothesis: The bearing fails")
            && user.contains("2. temperature up 12 C")
            && user.contains("Context: pump P-7 log"),
        "{user}"
    );
    assert_eq!(
        body["temperature"], 0.3,
        "the plan's temperature, where the model takes one"
    );
    let (_, r) = ask(&mut c, validate("v2"));
    assert_eq!(
        (r["code"].as_str(), r["cause"].as_str()),
        (Some("cloud_error"), Some("protocol")),
        "{r}"
    );
}

/// Privacy holds for the plan's request types: a private validation, reasoning task or long context never
/// reaches the network, and runs on the board saying why.
#[test]
fn private_tasks_and_their_context_never_leave_the_board() {
    let kimi = FakeKimi::start();
    let d = Daemon::start_with(
        &config(&kimi, "[router]\nlong_context_chars = 100\n"),
        with_key,
    );
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let secret = "private-context-2718";
    let context = format!("{secret} {}", "log line ".repeat(20));
    for (i, req) in [
        json!({"task": "validate", "hypothesis": format!("h {secret}"), "evidence": [secret]}),
        json!({"task": "reason", "prompt": "Why did it fail?", "context": context}),
        json!({"prompt": "Summarize", "context": context, "defer": true}),
        json!({"task": "validate", "hypothesis": "h", "evidence": ["e"], "context": context, "route": "cloud"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = req;
        req["id"] = json!(i);
        req["private"] = json!(true);
        req["max_tokens"] = json!(3);
        let (_, done) = ask(&mut c, req);
        assert_eq!(
            (done["route"].as_str(), done["route_reason"].as_str()),
            (Some("local"), Some("private")),
            "{done}"
        );
    }
    // Not private, the same long context goes to the cloud.
    let (_, done) = ask(
        &mut c,
        json!({"id": "pub", "prompt": "Summarize", "context": "x ".repeat(60), "max_tokens": 3}),
    );
    assert_eq!(done["route_reason"], "long_context", "{done}");
    assert_eq!(kimi.chats().len(), 1);
    assert!(
        kimi.recorded()
            .iter()
            .all(|r| !r.body.to_string().contains(secret)),
        "a private task reached the cloud"
    );
}

/// Today's Kimi: `auto` takes kimi-k2.6 from the account's list, its reasoning streams as `reasoning`
/// replies before the answer's tokens, `usage` counts it apart, and `max_tokens` leaves room for an answer.
#[test]
fn a_thinking_model_streams_its_reasoning_apart_from_the_answer() {
    let kimi = FakeKimi::start();
    kimi.set_default(Behavior::think(
        "The user asks about pumps. ",
        "Check the bearing.",
    ));
    let cfg = config(&kimi, "").replace("model = \"kimi-test\"", "model = \"auto\"");
    let d = Daemon::start_with(&cfg, with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    assert_eq!(c.status()["cloud"]["model"], "kimi-k2.6");
    c.send(&json!({"id": "t", "prompt": COMPLEX, "max_tokens": 8}));
    let (reasoning, tokens, done) = c.finish_thinking(&json!("t"));
    assert_eq!(reasoning.concat(), "The user asks about pumps. ");
    assert_eq!(tokens.concat(), "Check the bearing.");
    assert_eq!(done["model"], "kimi-k2.6");
    assert_eq!(
        (
            done["usage"]["completion_tokens"].as_u64(),
            done["usage"]["reasoning_tokens"].as_u64()
        ),
        (Some(8), Some(5)),
        "{done}"
    );
    let body = &kimi.chats()[0].body;
    assert_eq!(body["max_tokens"], 256 + 4096);
    let (_, done) = ask(
        &mut c,
        json!({"id": "q", "prompt": COMPLEX, "max_tokens": 8, "stream": false, "thinking": false}),
    );
    assert_eq!(
        (done["text"].as_str(), done["reasoning"].as_str()),
        (
            Some("Check the bearing."),
            Some("The user asks about pumps. ")
        ),
        "not streamed: both whole in `done` (the fake thinks whatever it is told)"
    );
    assert_eq!(kimi.chats()[1].body["thinking"]["type"], "disabled");
}

/// An explicit model the account does not offer keeps the cloud off from the start, says why in `status`, and
/// fails `check-config`; nothing is sent to it.
#[test]
fn an_explicit_model_the_account_does_not_offer_keeps_the_cloud_off() {
    let kimi = FakeKimi::start();
    let cfg =
        config(&kimi, "").replace("model = \"kimi-test\"", "model = \"kimi-k2-turbo-preview\"");
    let d = Daemon::start_with(&cfg, with_key);
    let mut c = d.connect();
    let s = common::wait_for_status(&mut c, |s| s["cloud"]["link"]["model_listed"] == false);
    let link = &s["cloud"]["link"];
    assert_eq!(link["state"], "offline", "{s}");
    assert!(
        link["model_problem"]
            .as_str()
            .unwrap()
            .contains("\"kimi-k2-turbo-preview\" is not offered"),
        "{s}"
    );
    let (_, r) = ask(&mut c, json!({"id": 1, "prompt": "hi", "route": "cloud"}));
    assert_eq!(r["code"], "cloud_unavailable", "{r}");
    assert!(d.log().contains("is not offered by this account"));
    assert!(kimi.chats().is_empty());
    let out = common::bitnetd()
        .arg("check-config")
        .arg(d.dir.path().join("bitnetd.toml"))
        .env("KIMI_API_KEY", "sk-test")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not offered"));
    let ok = cfg.replace("kimi-k2-turbo-preview", "auto");
    std::fs::write(d.dir.path().join("ok.toml"), ok).unwrap();
    let out = common::bitnetd()
        .arg("check-config")
        .arg(d.dir.path().join("ok.toml"))
        .env("KIMI_API_KEY", "sk-test")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cloud: model kimi-k2.6"));
}

/// On MQTT too, a thinking model's reasoning arrives as `reasoning` messages on the reply address, all before
/// the answer's tokens, and the terminal `done` counts it apart.
#[test]
fn mqtt_requests_get_the_reasoning_as_its_own_messages() {
    use bytes::Bytes;
    use common::broker::{Broker, V5};
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let kimi = FakeKimi::start();
    kimi.set_default(Behavior::think("Pumps wear. ", "Check the bearing."));
    let cfg = config(&kimi, "").replace("model = \"kimi-test\"", "model = \"auto\"");
    let broker = Broker::rumqttd();
    let d = Daemon::start_with(&broker.daemon_config("think", &cfg), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let dev = V5::connect(broker.port, "dev-think");
    dev.subscribe("dev/think/answers");
    dev.subscribe("bitnetd/think/status");
    dev.wait_status("bitnetd/think", "online", Duration::from_secs(30));
    let props = PublishProperties {
        response_topic: Some("dev/think/answers".into()),
        correlation_data: Some(Bytes::from_static(b"t")),
        ..Default::default()
    };
    let q = json!({"id": "m1", "prompt": COMPLEX, "max_tokens": 8});
    dev.publish("bitnetd/think/request", q.to_string().as_bytes(), props);
    let (mut kinds, mut reasoning, mut tokens) = (vec![], String::new(), String::new());
    let done = loop {
        let v = dev
            .expect_on("dev/think/answers", Duration::from_secs(30))
            .json();
        match v["type"].as_str() {
            Some("reasoning") => reasoning.push_str(v["text"].as_str().unwrap()),
            Some("token") => tokens.push_str(v["text"].as_str().unwrap()),
            _ => break v,
        }
        kinds.push(v["type"].as_str().unwrap().to_string());
    };
    assert_eq!(done["type"], "done", "{done}");
    let first_token = kinds
        .iter()
        .position(|k| k == "token")
        .unwrap_or(kinds.len());
    assert!(
        kinds[first_token..].iter().all(|k| k == "token"),
        "reasoning after the answer began: {kinds:?}"
    );
    assert_eq!(
        (reasoning.as_str(), tokens.as_str()),
        ("Pumps wear. ", "Check the bearing.")
    );
    assert_eq!(done["usage"]["reasoning_tokens"], 2, "{done}");
    assert_eq!(done["model"], "kimi-k2.6");
}

#[test]
fn over_http_cloud_work_reaches_kimi_private_work_never_does_and_cloud_errors_are_502() {
    let kimi = FakeKimi::start();
    let http = "[http]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\n";
    let d = Daemon::start_with(&config(&kimi, http), with_key);
    let mut c = d.connect();
    wait_link(&mut c, "online");
    let addr = d.http_addr();
    let chat = |content: &str, extra: &str| {
        let body = format!(
            r#"{{"messages": [{{"role": "user", "content": "{content}"}}], "max_tokens": 8{extra}}}"#
        );
        let (status, body) = common::http(&addr, "POST", "/v1/chat/completions", "", &body);
        (status, serde_json::from_str::<Value>(&body).unwrap())
    };
    let (status, v) = chat("hi", r#", "route": "cloud""#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from Kimi");
    assert_eq!(v["model"], "kimi-test");
    assert_eq!(
        (
            v["bitnetd"]["route"].as_str(),
            v["bitnetd"]["route_reason"].as_str()
        ),
        (Some("cloud"), Some("requested"))
    );
    let (_, models) = common::http(&addr, "GET", "/v1/models", "", "");
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bitnet-b1.58-wordnet-5m", "kimi-test"]);
    // Private work stays on the board, even when its text looks like cloud work.
    let (status, v) = chat(COMPLEX, r#", "private": true"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["bitnetd"]["route"], "local");
    assert_eq!(kimi.chats().len(), 1, "only the cloud request reached Kimi");
    // A cloud failure with no fallback (route: cloud) is a 502 with its cause.
    kimi.script([Behavior::error(401, "invalid_authentication_error")]);
    let (status, v) = chat("hi", r#", "route": "cloud""#);
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "cloud_error");
    assert_eq!(v["error"]["cause"], "unauthorized");
}
