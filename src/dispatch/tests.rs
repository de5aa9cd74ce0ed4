//! The dispatcher against the fake backend ([`super::fake`]): each test drives the fake's jobs by hand and
//! reads the replies a source would forward.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use super::fake::*;
use super::*;
use crate::engine::{FinishReason, JobEvent};
use crate::protocol::{ErrorCode, Served};

/// Every reply of a ticket until its channel closes (10 s at most: a lost terminal reply fails, not hangs).
async fn replies(mut t: Ticket) -> Vec<Reply> {
    let all = async {
        let mut all = vec![];
        while let Some(r) = t.replies.recv().await {
            all.push(r);
        }
        all
    };
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("the reply channel closed")
}

fn error_code(r: &Reply) -> ErrorCode {
    match r {
        Reply::Error(e) => e.code,
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn a_local_request_streams_its_tokens_then_exactly_one_done() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), options());
    let ticket = d.submit(ask(1, 4), Origin::now("test")).unwrap();
    let job = fake.take();
    assert_eq!(job.max_new_tokens, 4);
    for t in ["a", "b"] {
        job.events.send(token(t)).unwrap();
    }
    job.events.send(JobEvent::Done(generation(2))).unwrap();
    drop(job);
    let all = replies(ticket).await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(matches!(&all[0], Reply::Token { text, .. } if text == "a"));
    let Reply::Done(done) = &all[2] else {
        panic!("{all:?}")
    };
    assert_eq!(
        (done.id.clone(), done.route, done.model.as_str()),
        (json!(1), Served::Local, "fake")
    );
    assert_eq!(
        done.text, None,
        "a streamed answer is not repeated in `done`"
    );
    let s = d.status(None);
    assert_eq!(
        (s.requests.accepted, s.requests.served, s.requests.in_flight),
        (1, 1, 0)
    );
    assert_eq!(s.requests.tokens_generated, 2);
    assert_eq!(s.requests.routes["local"]["simple"], 1);
}

#[tokio::test]
async fn an_engine_queue_full_is_busy_with_a_retry_hint_and_reserves_nothing() {
    let fake = Fake::new(0);
    let d = Dispatcher::new(fake, with_kv());
    let Err(e) = d.submit(ask(1, 7), Origin::now("test")) else {
        panic!("accepted")
    };
    assert_eq!(
        (e.code, e.retry_after_ms, e.id),
        (ErrorCode::Busy, Some(1000), Some(json!(1)))
    );
    assert_eq!(d.ledger.reserved_bytes(), 0);
    let s = d.status(None);
    assert_eq!(
        (
            s.requests.rejected,
            s.requests.accepted,
            s.requests.in_flight
        ),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn a_job_the_engine_drops_ends_with_internal() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), with_kv());
    let ticket = d.submit(ask(1, 7), Origin::now("test")).unwrap();
    drop(fake.take());
    let all = replies(ticket).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(error_code(&all[0]), ErrorCode::Internal);
    assert_eq!(d.ledger.reserved_bytes(), 0, "the reservation is freed");
    assert_eq!(d.status(None).requests.failed, 1);
}

#[tokio::test]
async fn a_completion_dropped_without_a_reply_still_answers_and_frees_everything() {
    let d = Dispatcher::new(Fake::new(4), options());
    let (tx, mut rx) = unbounded_channel();
    let seq = d.ledger.next_seq();
    d.ledger
        .reserve(seq, |_| {
            Ok::<_, ()>(crate::admission::Admitted {
                max_new_tokens: 1,
                shortened: false,
                kv_bytes: MIB,
            })
        })
        .unwrap();
    let completion = d.ledger.open(
        seq,
        json!("lost"),
        crate::metrics::RequestOrigin {
            source: "test",
            route: "local",
            reason: "requested",
        },
        tx,
        CancelToken::default(),
    );
    assert_eq!(d.in_flight(), 1);
    // A task that panics drops its completion while unwinding.
    let task = tokio::spawn(async move {
        let _held = completion;
        panic!("a fault in the task running the request");
    });
    assert!(task.await.is_err());
    let reply = rx.recv().await.unwrap();
    assert_eq!(error_code(&reply), ErrorCode::Internal);
    assert!(rx.recv().await.is_none(), "exactly one terminal reply");
    assert_eq!((d.in_flight(), d.ledger.reserved_bytes()), (0, 0));
    assert_eq!(d.status(None).requests.failed, 1);
}

#[tokio::test]
async fn a_kv_cache_over_budget_is_refused_until_the_work_in_flight_ends() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), with_kv());
    let first = d.submit(ask(1, 7), Origin::now("test")).unwrap();
    assert_eq!(d.ledger.reserved_bytes(), 10 * MIB);
    let Err(e) = d.submit(ask(2, 7), Origin::now("test")) else {
        panic!("two 10 MiB caches fit a 15 MiB budget")
    };
    assert_eq!(
        (e.code, e.retry_after_ms),
        (ErrorCode::OverBudget, Some(1000))
    );
    fake.take()
        .events
        .send(JobEvent::Done(generation(7)))
        .unwrap();
    assert!(replies(first).await.last().unwrap().is_terminal());
    assert_eq!(d.ledger.reserved_bytes(), 0);
    d.submit(ask(3, 7), Origin::now("test")).unwrap();
    let Err(e) = d.submit(ask(4, 13), Origin::now("test")) else {
        panic!("16 tokens never fit 15 MiB")
    };
    assert_eq!((e.code, e.retry_after_ms), (ErrorCode::OverBudget, None));
}

#[tokio::test]
async fn cancelling_the_ticket_or_all_reaches_the_engine_job() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), options());
    let one = d.submit(ask(1, 4), Origin::now("test")).unwrap();
    let _two = d.submit(ask(2, 4), Origin::now("test")).unwrap();
    let (job1, job2) = (fake.take(), fake.take());
    one.cancel();
    assert!(job1.cancel.is_cancelled() && !job2.cancel.is_cancelled());
    d.cancel_all();
    assert!(job2.cancel.is_cancelled());
}

#[tokio::test]
async fn a_deadline_the_measured_speed_cannot_meet_is_refused_or_shortened() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), options());
    let warm = d.submit(ask(1, 4), Origin::now("test")).unwrap();
    fake.take()
        .events
        .send(JobEvent::Done(generation(4)))
        .unwrap();
    replies(warm).await;
    // Measured: first token 100 ms, 10 tokens/s; 8 tokens need 800 ms.
    let tight = |id, on_deadline| {
        request(
            json!({"id": id, "prompt": "a b c", "max_tokens": 8, "deadline_ms": 350,
            "on_deadline": on_deadline}),
        )
    };
    let Err(e) = d.submit(tight(2, "refuse"), Origin::now("test")) else {
        panic!("accepted")
    };
    assert_eq!(e.code, ErrorCode::Deadline);
    let t = d.submit(tight(3, "shorten"), Origin::now("test")).unwrap();
    let job = fake.take();
    assert!(
        (1..8).contains(&job.max_new_tokens),
        "{}",
        job.max_new_tokens
    );
    job.events
        .send(JobEvent::Done(generation(job.max_new_tokens)))
        .unwrap();
    let Some(Reply::Done(done)) = replies(t).await.pop() else {
        panic!()
    };
    assert_eq!(done.finish_reason, FinishReason::Budget);
}

#[tokio::test]
async fn draining_refuses_new_requests_and_lets_accepted_ones_finish() {
    let fake = Fake::new(4);
    let d = Dispatcher::new(fake.clone(), options());
    let ticket = d.submit(ask(1, 4), Origin::now("test")).unwrap();
    d.begin_drain();
    let Err(e) = d.submit(ask(2, 4), Origin::now("test")) else {
        panic!("accepted while draining")
    };
    assert_eq!(e.code, ErrorCode::ShuttingDown);
    assert_eq!(d.status(None).state, "draining");
    fake.take()
        .events
        .send(JobEvent::Done(generation(1)))
        .unwrap();
    assert!(matches!(replies(ticket).await.pop(), Some(Reply::Done(_))));
    tokio::time::timeout(Duration::from_secs(10), d.idle())
        .await
        .expect("idle once the last request is answered");
}

#[tokio::test]
async fn a_prompt_over_the_context_is_too_long_and_bad_values_are_bad_requests() {
    let d = Dispatcher::new(Fake::new(4), options());
    let long = "w ".repeat(CONTEXT);
    let r = request(json!({"id": 1, "prompt": long}));
    assert_eq!(
        d.submit(r, Origin::now("test")).err().unwrap().code,
        ErrorCode::TooLong
    );
    let r = request(json!({"id": 2, "prompt": "a", "deadline_ms": 0}));
    assert_eq!(
        d.submit(r, Origin::now("test")).err().unwrap().code,
        ErrorCode::BadRequest
    );
    let r = request(json!({"id": 3, "route": "cloud", "prompt": "a"}));
    let e = d.submit(r, Origin::now("test")).err().unwrap();
    assert_eq!(e.code, ErrorCode::CloudUnavailable);
    assert_eq!(d.status(None).requests.rejected, 3);
}

#[tokio::test]
async fn status_reports_the_backend() {
    let d = Dispatcher::new(Fake::new(4), options());
    let s = d.status(Some(json!("s")));
    assert_eq!(
        (s.model.as_str(), s.engine.threads, s.engine.kernel.as_str()),
        ("fake", 3, "none")
    );
    assert_eq!((s.engine.queue_depth, s.memory.budget_bytes), (0, 15 * MIB));
    assert_eq!(s.id, Some(json!("s")));
    assert!(d.engine_alive());
}
