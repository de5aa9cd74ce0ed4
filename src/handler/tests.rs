//! The shared handler over the fake backend, with a source that collects its replies.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::*;
use crate::dispatch::fake::{ask, generation, options, Fake};
use crate::engine::JobEvent;
use crate::protocol::{id_text, parse, ErrorCode};

/// A source that keys requests by id and collects every reply.
#[derive(Clone)]
struct Collect(UnboundedSender<Reply>);

impl Replies for Collect {
    type Key = String;

    fn key(&self, id: &Id) -> String {
        id_text(id)
    }

    async fn answer(&self, reply: Reply) {
        let _ = self.0.send(reply);
    }

    async fn forward(&self, reply: Reply) -> bool {
        self.0.send(reply).is_ok()
    }
}

fn setup(
    limit: usize,
) -> (
    Arc<Fake>,
    Handler<String>,
    Collect,
    UnboundedReceiver<Reply>,
) {
    let fake = Fake::new(8);
    let d = Dispatcher::new(fake.clone(), options());
    let (tx, rx) = unbounded_channel();
    (
        fake,
        Handler::new(d, limit, Scope::Connection),
        Collect(tx),
        rx,
    )
}

fn msg(v: serde_json::Value) -> Result<Incoming, WireError> {
    parse(v.to_string().as_bytes()).map_err(WireError::from)
}

fn request(id: u64) -> Result<Incoming, WireError> {
    Ok(Incoming::Request(Box::new(ask(id, 4))))
}

fn origin() -> Origin {
    Origin::now("test")
}

fn error(r: Reply) -> (Option<Id>, ErrorCode, Option<u64>) {
    match r {
        Reply::Error(e) => (e.id, e.code, e.retry_after_ms),
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn control_messages_are_answered_on_the_same_channel() {
    let (_fake, h, to, mut rx) = setup(4);
    let r = h.handle(
        msg(json!({"cmd": "status", "id": "s"})),
        origin(),
        to.clone(),
    );
    assert_eq!(r.await, Handled::Answered);
    assert!(matches!(rx.recv().await, Some(Reply::Status(s)) if s.id == Some(json!("s"))));
    let r = h.handle(
        msg(json!({"cmd": "result", "id": "d"})),
        origin(),
        to.clone(),
    );
    assert_eq!(r.await, Handled::Answered);
    assert_eq!(error(rx.recv().await.unwrap()).1, ErrorCode::NotFound);
    let r = h.handle(msg(json!({"cmd": "result"})), origin(), to.clone());
    assert_eq!(r.await, Handled::Refused);
    assert_eq!(error(rx.recv().await.unwrap()).1, ErrorCode::BadRequest);
    let r = h.handle(
        msg(json!({"id": 1, "prompt": "x", "bogus": 1})),
        origin(),
        to,
    );
    assert_eq!(r.await, Handled::Refused);
    assert_eq!(
        error(rx.recv().await.unwrap()),
        (Some(json!(1)), ErrorCode::BadRequest, None)
    );
}

#[tokio::test]
async fn a_duplicate_id_and_the_client_limit_are_refused_and_the_id_is_free_after_its_answer() {
    let (fake, h, to, mut rx) = setup(2);
    assert_eq!(
        h.handle(request(1), origin(), to.clone()).await,
        Handled::Accepted
    );
    assert_eq!(
        h.handle(request(1), origin(), to.clone()).await,
        Handled::Refused
    );
    assert_eq!(
        error(rx.recv().await.unwrap()),
        (Some(json!(1)), ErrorCode::BadRequest, None)
    );
    assert_eq!(
        h.handle(request(2), origin(), to.clone()).await,
        Handled::Accepted
    );
    assert_eq!(
        h.handle(request(3), origin(), to.clone()).await,
        Handled::Refused
    );
    assert_eq!(
        error(rx.recv().await.unwrap()),
        (Some(json!(3)), ErrorCode::Busy, Some(1000))
    );
    assert_eq!(h.in_flight(), 2);
    let first = fake.take();
    first.events.send(JobEvent::Done(generation(1))).unwrap();
    assert!(matches!(rx.recv().await, Some(Reply::Done(d)) if d.id == json!(1)));
    assert_eq!(h.in_flight(), 1, "the id is free once its answer is out");
    assert_eq!(h.handle(request(1), origin(), to).await, Handled::Accepted);
}

#[tokio::test]
async fn cancel_stops_the_request_with_that_id() {
    let (fake, h, to, _rx) = setup(4);
    h.handle(request(1), origin(), to.clone()).await;
    h.handle(request(2), origin(), to.clone()).await;
    let (one, two) = (fake.take(), fake.take());
    let r = h.handle(msg(json!({"id": 2, "cancel": true})), origin(), to);
    assert_eq!(r.await, Handled::Cancelled);
    assert!(two.cancel.is_cancelled() && !one.cancel.is_cancelled());
    h.cancel_all();
    assert!(one.cancel.is_cancelled());
}

#[tokio::test]
async fn finished_waits_until_every_terminal_reply_is_handed_over() {
    let (fake, h, to, mut rx) = setup(4);
    h.handle(request(1), origin(), to).await;
    let job = fake.take();
    let finished = h.finished();
    tokio::pin!(finished);
    // Nothing answers the request, so this can only time out.
    let early = tokio::time::timeout(Duration::from_millis(50), &mut finished).await;
    assert!(early.is_err(), "finished with a request in flight");
    job.events.send(JobEvent::Done(generation(1))).unwrap();
    tokio::time::timeout(Duration::from_secs(10), finished)
        .await
        .expect("finished once the terminal reply is handed over");
    assert!(matches!(rx.try_recv(), Ok(Reply::Done(_))));
    h.idle().await;
}

#[tokio::test]
async fn a_requester_that_is_gone_cancels_its_request() {
    let (fake, h, to, rx) = setup(4);
    h.handle(request(1), origin(), to).await;
    let job = fake.take();
    drop(rx);
    job.events.send(crate::dispatch::fake::token("a")).unwrap();
    job.events.send(crate::dispatch::fake::token("b")).unwrap();
    job.events.send(JobEvent::Done(generation(2))).unwrap();
    h.finished().await;
    assert!(job.cancel.is_cancelled());
}
