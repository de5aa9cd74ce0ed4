//! The engine's contracts on a small exported fixture: chunked prefill through the KV cache, request
//! validation, the engine thread's queue, streaming, cancellation, and the `generate` command's JSON.

mod common;

use std::path::Path;
use std::sync::Arc;

use bitnetd::engine::{
    Backend, CancelToken, Engine, EngineError, EngineOptions, FinishReason, GenerateParams,
    JobEvent, JobOptions, LoadOptions, Message, Model, Prompt, SamplingParams,
};

fn fixture_model() -> (tempfile::TempDir, Arc<Model>) {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/gqa-autobitlinear");
    let out = tempfile::tempdir().unwrap();
    bitnetd::export::export(&src, out.path(), &Default::default(), &mut |_| {}).unwrap();
    let model = Model::load(
        out.path(),
        &LoadOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    (out, model)
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37) % 300).collect()
}

#[test]
fn prefill_in_pieces_equals_prefill_at_once() {
    let (_d, model) = fixture_model();
    let p = ids(40);
    let all = model.session().unwrap().forward(&p).unwrap();
    let mut s = model.session().unwrap();
    s.forward(&p[..17]).unwrap();
    s.forward(&p[17..18]).unwrap();
    let pieces = s.forward(&p[18..]).unwrap();
    assert_eq!(s.len(), 40);
    let scale = all.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = all
        .iter()
        .zip(&pieces)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= 1e-4 * scale, "KV cache continuation differs by {d}");
}

#[test]
fn sampling_is_reproducible_by_seed_and_varies_across_seeds() {
    let (_d, model) = fixture_model();
    let run = |seed| {
        let sampling = SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            seed,
            ..Default::default()
        };
        let params = GenerateParams {
            max_tokens: 12,
            sampling,
            ..Default::default()
        };
        let req = model.prepare(&Prompt::Ids(ids(5)), params).unwrap();
        model
            .session()
            .unwrap()
            .generate(&req, &mut |_: &bitnetd::engine::TokenEvent| {
                std::ops::ControlFlow::<FinishReason>::Continue(())
            })
            .unwrap()
            .token_ids
    };
    assert_eq!(run(7), run(7));
    assert!(
        (0..5)
            .map(run)
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
    );
}

#[test]
fn bad_requests_get_typed_errors() {
    let (_d, model) = fixture_model();
    let ctx = model.meta.context_length;
    let e = model
        .prepare(&Prompt::Ids(ids(ctx)), GenerateParams::default())
        .unwrap_err();
    assert!(
        matches!(e, EngineError::PromptTooLong { tokens, context } if tokens == ctx && context == ctx),
        "{e}"
    );
    let e = model
        .prepare(&Prompt::Ids(vec![]), GenerateParams::default())
        .unwrap_err();
    assert!(matches!(e, EngineError::EmptyPrompt));
    let e = model
        .prepare(&Prompt::Ids(vec![100_000]), GenerateParams::default())
        .unwrap_err();
    assert!(e.is_request_error(), "{e}");
    let e = model.prepare(
        &Prompt::Chat(vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }]),
        GenerateParams::default(),
    );
    assert!(
        matches!(e, Err(EngineError::ChatTemplate(_))),
        "this fixture has no chat template"
    );
    let r = model
        .prepare(
            &Prompt::Ids(ids(ctx - 3)),
            GenerateParams {
                max_tokens: 50,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        r.max_new_tokens(),
        3,
        "max_tokens is clipped to the context"
    );
}

#[test]
fn engine_thread_streams_then_ends_with_exactly_one_done() {
    let (_d, model) = fixture_model();
    let engine = Engine::spawn(model.clone(), EngineOptions { slots: 1, queue: 4 }).unwrap();
    let req = model
        .prepare(
            &Prompt::Ids(ids(6)),
            GenerateParams {
                max_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap();
    let mut job = engine
        .submit(req, JobOptions::default(), CancelToken::default())
        .unwrap();
    let (mut tokens, mut done) = (vec![], None);
    while let Some(ev) = job.events.blocking_recv() {
        match ev {
            JobEvent::Token(t) => tokens.push(t.id),
            JobEvent::Done(g) => done = Some(g),
            JobEvent::Error(e) => panic!("{e}"),
        }
    }
    let g = done.expect("a Done event");
    assert_eq!(tokens, g.token_ids);
    assert!(matches!(
        g.finish_reason,
        FinishReason::Length | FinishReason::Stop
    ));
}

#[test]
fn full_queue_is_busy_and_cancel_stops_generation() {
    let (_d, model) = fixture_model();
    let engine = Engine::spawn(model.clone(), EngineOptions { slots: 1, queue: 1 }).unwrap();
    let long = || {
        let p = GenerateParams {
            max_tokens: 100,
            ..Default::default()
        };
        model.prepare(&Prompt::Ids(ids(4)), p).unwrap()
    };
    let first = engine
        .submit(long(), JobOptions::default(), CancelToken::default())
        .unwrap();
    first.cancel.cancel();
    let mut jobs = vec![first];
    let mut busy = false;
    for _ in 0..50 {
        match engine.submit(long(), JobOptions::default(), CancelToken::default()) {
            Ok(j) => {
                j.cancel.cancel();
                jobs.push(j);
            }
            Err(EngineError::Busy { capacity: 1 }) => {
                busy = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy, "a full queue answers Busy at once");
    for mut j in jobs {
        let mut terminal = 0;
        let mut last = None;
        while let Some(ev) = j.events.blocking_recv() {
            if !matches!(ev, JobEvent::Token(_)) {
                terminal += 1;
                last = Some(ev);
            }
        }
        assert_eq!(terminal, 1, "exactly one terminal event per job");
        match last.unwrap() {
            JobEvent::Done(g) => {
                assert!(g.finish_reason == FinishReason::Cancelled && g.token_ids.len() < 100)
            }
            JobEvent::Error(e) => panic!("{e}"),
            JobEvent::Token(_) => unreachable!(),
        }
    }
}

#[test]
fn generate_command_prints_the_json_contract() {
    let (dir, _model) = fixture_model();
    let v = common::run_json(
        common::bitnetd()
            .args(["generate", "--model"])
            .arg(dir.path())
            .args([
                "--prompt",
                "Hello world",
                "--max-tokens",
                "5",
                "--temperature",
                "0",
            ])
            .args(["--threads", "1", "--json"]),
    );
    for key in [
        "prompt_ids",
        "token_ids",
        "text",
        "prompt_tokens",
        "completion_tokens",
        "ttft_ms",
        "tokens_per_second",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(
        v["prompt_ids"].as_array().unwrap().len() as u64,
        v["prompt_tokens"].as_u64().unwrap()
    );
}

#[test]
fn generate_command_reports_a_too_long_prompt() {
    let (dir, model) = fixture_model();
    let prompt = "a ".repeat(model.meta.context_length * 2);
    let out = common::bitnetd()
        .args(["generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", &prompt])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit the context"));
}

/// Collects a job's events: the token count and the terminal event.
fn drain(mut job: bitnetd::engine::JobHandle) -> (usize, JobEvent) {
    let mut tokens = 0;
    loop {
        match job.events.blocking_recv().expect("a terminal event") {
            JobEvent::Token(_) => tokens += 1,
            other => return (tokens, other),
        }
    }
}

#[test]
fn a_paused_engine_holds_jobs_until_it_resumes_and_deadlines_still_count() {
    let (_d, model) = fixture_model();
    let engine = Engine::spawn(model.clone(), EngineOptions { slots: 1, queue: 4 }).unwrap();
    let req = |n| {
        let p = GenerateParams {
            max_tokens: n,
            ..Default::default()
        };
        model.prepare(&Prompt::Ids(ids(4)), p).unwrap()
    };
    engine.set_paused(true);
    let mut held = engine
        .submit(req(4), JobOptions::default(), CancelToken::default())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(held.events.try_recv().is_err(), "nothing runs while paused");
    let late = JobOptions {
        deadline: Some(std::time::Instant::now() + std::time::Duration::from_millis(100)),
        ..Default::default()
    };
    let expired = engine.submit(req(4), late, CancelToken::default()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    engine.set_paused(false);
    let (_, end) = drain(held);
    assert!(matches!(end, JobEvent::Done(_)), "it runs once resumed");
    let (_, end) = drain(expired);
    assert!(
        matches!(end, JobEvent::Error(EngineError::DeadlineExceeded { .. })),
        "the deadline passed during the pause: {end:?}"
    );
}

#[test]
fn the_token_cap_ends_generations_with_budget() {
    let (_d, model) = fixture_model();
    let engine = Engine::spawn(model.clone(), EngineOptions { slots: 1, queue: 4 }).unwrap();
    engine.set_token_cap(Some(3));
    engine.set_free_idle(true);
    let p = GenerateParams {
        max_tokens: 50,
        sampling: SamplingParams {
            temperature: 20.0,
            seed: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let job = engine
        .submit(
            model.prepare(&Prompt::Ids(ids(4)), p.clone()).unwrap(),
            JobOptions::default(),
            CancelToken::default(),
        )
        .unwrap();
    let (tokens, end) = drain(job);
    let JobEvent::Done(g) = end else {
        panic!("{end:?}")
    };
    assert_eq!(
        (g.finish_reason, g.token_ids.len(), tokens),
        (FinishReason::Budget, 3, 3)
    );
    engine.set_token_cap(None);
    let job = engine
        .submit(
            model.prepare(&Prompt::Ids(ids(4)), p).unwrap(),
            JobOptions::default(),
            CancelToken::default(),
        )
        .unwrap();
    let JobEvent::Done(g) = drain(job).1 else {
        panic!()
    };
    assert!(g.token_ids.len() > 3, "the cap is lifted");
}
