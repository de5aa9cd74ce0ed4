//! The Kimi client against a fake Kimi server on loopback that speaks the real wire format: streaming, both
//! usage placements, retries (429 with Retry-After, 503), errors that are never retried (quota, 401), a
//! stalled connection, a stream cut mid-way, a malformed SSE line, the circuit breaker, the rate limiter,
//! the answer cache and the model check. Nothing here reaches the internet.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitnetd::cloud::{Cause, CloudRequest, Connectivity, KimiClient, Piece};
use bitnetd::config::CloudConfig;
use bitnetd::engine::Message;
use bitnetd::router::CloudState;
use common::kimi::{Behavior, FakeKimi, UsageAt};
use tokio::sync::mpsc::unbounded_channel;

fn cfg(kimi: &FakeKimi) -> CloudConfig {
    CloudConfig {
        enabled: true,
        base_url: kimi.base_url(),
        model: "kimi-test".into(),
        api_key_file: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(10),
        requests_per_minute: 600,
        max_concurrency: 2,
        max_retries: 3,
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        breaker_failures: 3,
        breaker_open: Duration::from_millis(400),
        cache_entries: 8,
        probe_every: Duration::from_secs(60),
        probe_timeout: Duration::from_secs(1),
        min_answer_tokens: 256,
        reasoning_budget_tokens: 4096,
    }
}

fn key(text: &str) -> bitnetd::cloud::ApiKey {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    std::fs::write(&p, text).unwrap();
    bitnetd::cloud::key::find(None, Some(&p), &|_| None)
        .unwrap()
        .unwrap()
        .0
}

fn client_with(c: &CloudConfig, key_text: &str) -> (KimiClient, Arc<Connectivity>) {
    let link = Arc::new(Connectivity::new());
    (
        KimiClient::new(c, key(key_text), link.clone()).unwrap(),
        link,
    )
}

fn client(kimi: &FakeKimi) -> KimiClient {
    client_with(&cfg(kimi), "sk-test").0
}

fn ask(text: &str) -> CloudRequest {
    CloudRequest {
        messages: vec![Message {
            role: "user".into(),
            content: text.into(),
        }],
        max_tokens: Some(16),
        temperature: Some(0.3),
        top_p: None,
        stop: vec![],
        thinking: None,
        json: false,
        deadline: None,
        retry: true,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

type Outcome = Result<bitnetd::cloud::CloudAnswer, bitnetd::cloud::CloudFailure>;

/// Runs one request; returns the pieces of answer text relayed and the outcome.
fn run(c: &KimiClient, req: &CloudRequest) -> (Vec<String>, Outcome) {
    let (pieces, r) = run_pieces(c, req);
    let texts = pieces
        .into_iter()
        .filter_map(|p| match p {
            Piece::Text(t) => Some(t),
            Piece::Reasoning(_) => None,
        })
        .collect();
    (texts, r)
}

/// Runs one request; returns every piece relayed (text and reasoning) and the outcome.
fn run_pieces(c: &KimiClient, req: &CloudRequest) -> (Vec<Piece>, Outcome) {
    rt().block_on(async {
        let (tx, mut rx) = unbounded_channel();
        let r = c.chat(req, &tx).await;
        drop(tx);
        let mut pieces = vec![];
        while let Some(p) = rx.recv().await {
            pieces.push(p);
        }
        (pieces, r)
    })
}

#[test]
fn streams_text_as_it_arrives_with_usage_inside_the_last_choice() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::Stream {
        texts: vec!["Hel".into(), "lo".into(), " there".into()],
        usage: UsageAt::InChoice,
        gap: Duration::from_millis(20),
    }]);
    let (pieces, r) = run(&client(&kimi), &ask("hi"));
    let a = r.unwrap();
    assert_eq!(pieces, ["Hel", "lo", " there"]);
    assert_eq!(a.text, "Hello there");
    assert_eq!(a.finish_reason, "stop");
    assert_eq!(
        a.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((11, 3))
    );
    assert_eq!(a.attempts, 1);
    let sent = &kimi.chats()[0];
    assert_eq!(sent.authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(sent.body["model"], "kimi-test");
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["messages"][0]["content"], "hi");
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
}

#[test]
fn reads_usage_from_a_final_chunk_without_choices() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::Stream {
        texts: vec!["ok".into()],
        usage: UsageAt::FinalChunk,
        gap: Duration::ZERO,
    }]);
    let a = run(&client(&kimi), &ask("hi")).1.unwrap();
    assert_eq!(a.usage.map(|u| u.completion_tokens), Some(3));
    kimi.script([Behavior::Stream {
        texts: vec!["ok".into()],
        usage: UsageAt::None,
        gap: Duration::ZERO,
    }]);
    assert_eq!(run(&client(&kimi), &ask("hi")).1.unwrap().usage, None);
}

#[test]
fn a_429_with_retry_after_is_retried_after_the_wait() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::Error {
        status: 429,
        kind: "engine_overloaded_error".into(),
        retry_after: Some("1".into()),
    }]);
    let started = Instant::now();
    let a = run(&client(&kimi), &ask("hi")).1.unwrap();
    let chats = kimi.chats();
    assert_eq!((a.attempts, chats.len()), (2, 2));
    let gap = chats[1].answered.duration_since(chats[0].answered);
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After honoured: {gap:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_503_then_success_succeeds() {
    let kimi = FakeKimi::start();
    kimi.script([
        Behavior::error(503, "server_error"),
        Behavior::error(502, ""),
    ]);
    let a = run(&client(&kimi), &ask("hi")).1.unwrap();
    assert_eq!(a.text, "Hello from Kimi");
    assert_eq!(a.attempts, 3);
}

#[test]
fn retries_stop_at_the_limit_and_at_the_deadline() {
    let kimi = FakeKimi::start();
    kimi.set_default(Behavior::error(500, "server_error"));
    let mut c = cfg(&kimi);
    c.breaker_failures = 100;
    let (cl, _) = client_with(&c, "sk-test");
    let f = run(&cl, &ask("hi")).1.unwrap_err();
    assert_eq!(
        (f.error.cause, f.attempts),
        (Cause::ServerError, 4),
        "1 + max_retries"
    );
    // The shortest first wait is half of retry_min (25 ms, full jitter): a 20 ms deadline rules every retry out.
    let mut req = ask("hi");
    req.deadline = Some(Instant::now() + Duration::from_millis(20));
    let f = run(&cl, &req).1.unwrap_err();
    assert_eq!(f.attempts, 1, "no retry whose wait passes the deadline");
}

#[test]
fn quota_exceeded_is_not_retried_and_says_so() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::error(429, "exceeded_current_quota_error")]);
    let f = run(&client(&kimi), &ask("hi")).1.unwrap_err();
    assert_eq!((f.error.cause, f.attempts), (Cause::QuotaExceeded, 1));
    assert!(
        f.error.message.contains("out of quota"),
        "{}",
        f.error.message
    );
    assert_eq!(kimi.chats().len(), 1);
}

#[test]
fn a_401_is_not_retried_and_never_shows_the_key() {
    let kimi = FakeKimi::start();
    let (c, _) = client_with(&cfg(&kimi), "sk-wrong-secret");
    let f = run(&c, &ask("hi")).1.unwrap_err();
    assert_eq!((f.error.cause, f.attempts), (Cause::Unauthorized, 1));
    assert!(f.error.message.contains("API key was refused"));
    assert!(!format!("{f:?}").contains("sk-wrong-secret"));
}

#[test]
fn a_stalled_connection_times_out() {
    let kimi = FakeKimi::start();
    kimi.set_default(Behavior::Stall);
    let mut c = cfg(&kimi);
    c.first_byte_timeout = Duration::from_millis(300);
    c.max_retries = 0;
    let (cl, _) = client_with(&c, "sk-test");
    let started = Instant::now();
    let f = run(&cl, &ask("hi")).1.unwrap_err();
    assert_eq!(f.error.cause, Cause::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_stream_that_stalls_mid_way_times_out_after_the_text_it_relayed() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::StallAfter(vec!["part".into()])]);
    let (pieces, r) = run(&client(&kimi), &ask("hi"));
    let f = r.unwrap_err();
    assert_eq!(
        (f.error.cause, f.relayed, f.attempts),
        (Cause::Timeout, true, 1),
        "no retry once text went out"
    );
    assert_eq!(pieces, ["part"]);
}

#[test]
fn a_cut_mid_stream_is_reported_as_cut() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::CutAfter(vec!["half ".into(), "an".into()])]);
    let (pieces, r) = run(&client(&kimi), &ask("hi"));
    let f = r.unwrap_err();
    assert_eq!((f.error.cause, f.relayed), (Cause::Cut, true));
    assert_eq!(pieces.concat(), "half an");
}

#[test]
fn a_cut_before_any_text_is_retried() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::CutAfter(vec![])]);
    let a = run(&client(&kimi), &ask("hi")).1.unwrap();
    assert_eq!(a.attempts, 2);
}

#[test]
fn a_malformed_sse_line_is_a_protocol_error() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::MalformedAfter(vec!["fine".into()])]);
    let f = run(&client(&kimi), &ask("hi")).1.unwrap_err();
    assert_eq!((f.error.cause, f.relayed), (Cause::Protocol, true));
    assert!(!Cause::Protocol.retryable());
}

#[test]
fn without_retries_the_first_failure_ends_it() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::error(503, "server_error")]);
    let mut req = ask("hi");
    req.retry = false;
    let f = run(&client(&kimi), &req).1.unwrap_err();
    assert_eq!((f.error.cause, f.attempts), (Cause::ServerError, 1));
}

#[test]
fn the_breaker_opens_after_repeated_failures_and_closes_after_a_good_trial() {
    let kimi = FakeKimi::start();
    kimi.set_default(Behavior::error(503, "server_error"));
    let mut c = cfg(&kimi);
    c.max_retries = 0;
    let (cl, link) = client_with(&c, "sk-test");
    let rt = rt();
    let once = |req: &CloudRequest| {
        rt.block_on(async {
            let (tx, _rx) = unbounded_channel();
            cl.chat(req, &tx).await
        })
    };
    for _ in 0..3 {
        assert_eq!(once(&ask("x")).unwrap_err().error.cause, Cause::ServerError);
    }
    assert!(cl.circuit_open());
    assert_eq!(
        link.state(),
        CloudState::Offline,
        "an open breaker counts as offline"
    );
    let f = once(&ask("x")).unwrap_err();
    assert_eq!(f.error.cause, Cause::CircuitOpen);
    assert!(f.error.retry_after.is_some());
    assert_eq!(kimi.chats().len(), 3, "nothing sent while open");
    std::thread::sleep(Duration::from_millis(450));
    kimi.set_default(Behavior::answer("back"));
    assert_eq!(once(&ask("x")).unwrap().text, "back");
    assert!(!cl.circuit_open());
    assert_eq!(link.state(), CloudState::Online);
}

#[test]
fn the_rate_limiter_refuses_without_retry_and_waits_with_it() {
    let kimi = FakeKimi::start();
    let mut c = cfg(&kimi);
    c.requests_per_minute = 1;
    let (cl, _) = client_with(&c, "sk-test");
    run(&cl, &ask("a")).1.unwrap();
    let mut now_only = ask("b");
    now_only.retry = false;
    let f = run(&cl, &now_only).1.unwrap_err();
    assert_eq!(f.error.cause, Cause::RateLimited);
    assert!(f.error.retry_after.unwrap() > Duration::from_secs(50));
    let mut short = ask("c");
    short.deadline = Some(Instant::now() + Duration::from_secs(1));
    assert_eq!(
        run(&cl, &short).1.unwrap_err().error.cause,
        Cause::RateLimited
    );
    assert_eq!(kimi.chats().len(), 1);
}

#[test]
fn deterministic_answers_are_cached() {
    let kimi = FakeKimi::start();
    let c = client(&kimi);
    let mut req = ask("same question");
    req.temperature = Some(0.0);
    let first = run(&c, &req).1.unwrap();
    let (pieces, second) = run(&c, &req);
    let second = second.unwrap();
    assert!(!first.cached && second.cached);
    assert_eq!(second.text, first.text);
    assert_eq!(pieces, vec![first.text.clone()]);
    assert_eq!(kimi.chats().len(), 1);
    run(&c, &ask("same question")).1.unwrap();
    assert_eq!(kimi.chats().len(), 2, "temperature > 0 is never cached");
}

/// Polls `link`'s status (the probe loop's observable output) until `f` holds.
async fn status_until(
    link: &Connectivity,
    f: impl Fn(&bitnetd::protocol::status::LinkStatus) -> bool,
) {
    while !f(&link.status()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn probes_report_reachability_and_keep_the_cloud_off_while_the_model_is_not_offered() {
    let kimi = FakeKimi::start();
    kimi.set_models(&["kimi-other"]);
    let (cl, link) = client_with(&cfg(&kimi), "sk-test");
    let rt = rt();
    let models = rt.block_on(cl.list_models(Duration::from_secs(1))).unwrap();
    assert_eq!(models, ["kimi-other"]);
    let stop = tokio_util::sync::CancellationToken::new();
    rt.block_on(async {
        let probe = link.run_probes(
            &cl,
            Duration::from_millis(100),
            Duration::from_millis(500),
            stop.clone(),
        );
        let watch = async {
            status_until(&link, |s| s.model_listed == Some(false)).await;
            let s = link.status();
            assert_eq!(link.state(), CloudState::Offline, "reachable, but no model");
            assert!(
                s.model_problem
                    .as_deref()
                    .unwrap()
                    .contains("\"kimi-test\" is not offered")
                    && s.reason.contains("kimi-other"),
                "{s:?}"
            );
            kimi.set_models(&["kimi-other", "kimi-test"]);
            let mut rx = link.subscribe();
            rx.wait_for(|s| *s == CloudState::Online).await.unwrap();
            assert_eq!(link.status().model_listed, Some(true));
            assert_eq!(link.status().model_problem, None);
            kimi.set_online(false);
            rx.wait_for(|s| *s == CloudState::Offline).await.unwrap();
            kimi.set_online(true);
            rx.wait_for(|s| *s == CloudState::Online).await.unwrap();
            stop.cancel();
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(probe, watch)
        })
        .await
        .expect("offline without a model, then online, offline and online again");
    });
}

#[test]
fn auto_takes_the_newest_k2_model_listed_and_follows_the_list() {
    let kimi = FakeKimi::start();
    let mut c = cfg(&kimi);
    c.model = "auto".into();
    let (cl, link) = client_with(&c, "sk-test");
    let rt = rt();
    let stop = tokio_util::sync::CancellationToken::new();
    rt.block_on(async {
        let probe = link.run_probes(
            &cl,
            Duration::from_millis(50),
            Duration::from_millis(500),
            stop.clone(),
        );
        let watch = async {
            link.subscribe()
                .wait_for(|s| *s == CloudState::Online)
                .await
                .unwrap();
            assert_eq!(
                cl.model(),
                "kimi-k2.6",
                "the newest of kimi-k2.6 and kimi-k2.5"
            );
            kimi.set_models(&["kimi-k2.5", "moonshot-v1-8k"]);
            while cl.model() != "kimi-k2.5" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.cancel();
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(probe, watch)
        })
        .await
        .expect("kimi-k2.6, then kimi-k2.5");
    });
    // K2.5 takes no temperature of its own: it is left out, and the request succeeds.
    let (_, r) = run(&cl, &ask("hi"));
    assert_eq!(r.unwrap().model, "kimi-k2.5");
    let body = &kimi.chats()[0].body;
    assert_eq!(body["model"], "kimi-k2.5");
    assert!(
        body.get("temperature").is_none() && body.get("top_p").is_none(),
        "{body}"
    );
}

#[test]
fn reasoning_streams_apart_from_the_answer_and_is_counted_apart() {
    let kimi = FakeKimi::start();
    kimi.script([Behavior::think("The user greets. ", "Hello there")]);
    let mut c = cfg(&kimi);
    c.model = "kimi-k2.6".into();
    let (cl, _) = client_with(&c, "sk-test");
    let (pieces, r) = run_pieces(&cl, &ask("hi"));
    let a = r.unwrap();
    let first_text = pieces
        .iter()
        .position(|p| matches!(p, Piece::Text(_)))
        .unwrap();
    assert!(pieces[..first_text]
        .iter()
        .all(|p| matches!(p, Piece::Reasoning(_))));
    assert_eq!(
        (a.text.as_str(), a.reasoning.as_str()),
        ("Hello there", "The user greets. ")
    );
    let u = a.usage.unwrap();
    assert_eq!((u.completion_tokens, u.reasoning_tokens), (5, Some(3)));
    let body = &kimi.chats()[0].body;
    assert_eq!(
        body["max_tokens"],
        256 + 4096,
        "max(16, min_answer_tokens) + reasoning_budget_tokens"
    );
    assert!(body.get("thinking").is_none(), "the model's default: on");
}

#[test]
fn thinking_off_is_asked_of_models_that_can_turn_it_off() {
    let kimi = FakeKimi::start();
    let mut c = cfg(&kimi);
    c.model = "kimi-k2.6".into();
    let (cl, _) = client_with(&c, "sk-test");
    let mut req = ask("hi");
    req.thinking = Some(false);
    run(&cl, &req).1.unwrap();
    let body = &kimi.chats()[0].body;
    assert_eq!(body["thinking"], serde_json::json!({"type": "disabled"}));
    assert_eq!(body["max_tokens"], 16, "no reasoning to make room for");
    // A model without the switch is not sent it.
    run(&client(&kimi), &req).1.unwrap();
    assert!(kimi.chats()[1].body.get("thinking").is_none());
}

#[test]
fn a_validation_asks_for_json_and_an_unreadable_answer_is_a_protocol_error() {
    let kimi = FakeKimi::start();
    kimi.script([
        Behavior::answer(
            r#"{"evidence_assessment": "strong", "confidence": 0.82, "recommendations": []}"#,
        ),
        Behavior::answer("I am fairly sure it holds."),
    ]);
    let cl = client(&kimi);
    let mut req = ask("validate");
    req.json = true;
    let timing = bitnetd::protocol::Timing::measured(Duration::ZERO, Duration::ZERO, 0);
    let a = run(&cl, &req).1.unwrap();
    let done = a.into_done(1.into(), "expert", timing, true).unwrap();
    assert_eq!(done.result.unwrap()["confidence"], 0.82);
    assert_eq!(
        kimi.chats()[0].body["response_format"],
        serde_json::json!({"type": "json_object"})
    );
    let a = run(&cl, &req).1.unwrap();
    let e = a.into_done(2.into(), "expert", timing, true).unwrap_err();
    assert_eq!(e.cause, Cause::Protocol);
    assert!(e.message.contains("no JSON object"), "{}", e.message);
}
