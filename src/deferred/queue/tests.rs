//! The durable queue, including what a crash at each step leaves behind.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::*;
use crate::protocol::{ErrorCode, ErrorReply};

fn cfg(dir: &Path) -> DeferConfig {
    DeferConfig {
        state_dir: dir.to_path_buf(),
        max_tasks: 3,
        max_bytes: 1 << 20,
        max_age: Duration::from_secs(60),
        result_retention: Duration::from_secs(60),
        max_results: 2,
    }
}

fn request(text: &str) -> TaskRequest {
    TaskRequest {
        messages: vec![Message {
            role: "user".into(),
            content: text.into(),
        }],
        max_tokens: Some(5),
        temperature: None,
        top_p: None,
        stop: vec![],
        thinking: None,
        json: false,
    }
}

fn error_reply(id: &Id) -> StoredReply {
    StoredReply::Error(ErrorReply {
        id: Some(id.clone()),
        code: ErrorCode::Expired,
        message: "old".into(),
        retry_after_ms: None,
        cause: None,
    })
}

#[test]
fn tasks_survive_a_reopen_in_order() {
    let d = tempfile::tempdir().unwrap();
    {
        let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
        q.push(json!("a"), ReplyTo::Socket, request("one")).unwrap();
        q.push(json!(2), ReplyTo::Socket, request("two")).unwrap();
    }
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!(rec.tasks, 2);
    let t = q.next_pending().unwrap();
    assert_eq!(
        (t.id, t.request.messages[0].content.as_str()),
        (json!("a"), "one")
    );
    assert_eq!(q.lookup(&json!(2)), Lookup::Pending { position: 2 });
    let t2 = q
        .push(json!("c"), ReplyTo::Socket, request("three"))
        .unwrap();
    assert_eq!(t2.seq, 2, "sequence numbers continue after a restart");
}

#[test]
fn the_limits_refuse_with_full_and_duplicates_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
    for i in 0..3 {
        q.push(json!(i), ReplyTo::Socket, request("x")).unwrap();
    }
    assert!(matches!(
        q.push(json!(9), ReplyTo::Socket, request("x")),
        Err(QueueError::Full { tasks: 3, .. })
    ));
    let (q2, _) = DeferredQueue::open(&DeferConfig {
        state_dir: d.path().join("other"),
        ..cfg(d.path())
    })
    .unwrap();
    q2.push(json!("same"), ReplyTo::Socket, request("x"))
        .unwrap();
    assert!(matches!(
        q2.push(json!("same"), ReplyTo::Socket, request("y")),
        Err(QueueError::Duplicate)
    ));
    let mut small = cfg(&d.path().join("small"));
    small.max_bytes = 200;
    let (q3, _) = DeferredQueue::open(&small).unwrap();
    assert!(matches!(
        q3.push(json!(1), ReplyTo::Socket, request(&"long ".repeat(100))),
        Err(QueueError::Full { .. })
    ));
}

#[test]
fn a_task_being_sent_at_a_crash_is_sent_again() {
    let d = tempfile::tempdir().unwrap();
    {
        let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
        let t = q.push(json!("a"), ReplyTo::Socket, request("x")).unwrap();
        q.mark_sending(t.seq).unwrap();
        assert!(
            q.next_pending().is_none(),
            "not handed out twice in one run"
        );
    }
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!(rec.unknown_outcome, 1);
    assert_eq!(q.next_pending().unwrap().id, json!("a"));
}

#[test]
fn a_failed_send_puts_the_task_back() {
    let d = tempfile::tempdir().unwrap();
    let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
    let t = q.push(json!("a"), ReplyTo::Socket, request("x")).unwrap();
    q.mark_sending(t.seq).unwrap();
    q.unmark_sending(t.seq);
    drop(q);
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!(rec.unknown_outcome, 0, "its outcome was known");
    assert!(q.next_pending().is_some());
}

#[test]
fn a_result_written_before_the_crash_is_not_sent_again() {
    let d = tempfile::tempdir().unwrap();
    let t = {
        let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
        let t = q.push(json!("a"), ReplyTo::Socket, request("x")).unwrap();
        q.mark_sending(t.seq).unwrap();
        t
    };
    // Simulate dying between writing the result and removing the task: write the result file by hand.
    let r = StoredResult {
        seq: t.seq,
        id: t.id.clone(),
        finished_ms: now_ms(),
        reply_to: ReplyTo::Socket,
        reply: error_reply(&t.id),
        delivered: false,
    };
    std::fs::write(
        d.path().join(format!("deferred/results/{}.json", t.seq)),
        serde_json::to_vec(&r).unwrap(),
    )
    .unwrap();
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!((rec.finished, rec.tasks, rec.unknown_outcome), (1, 0, 0));
    assert!(q.next_pending().is_none());
    assert!(matches!(q.lookup(&json!("a")), Lookup::Done(_)));
}

#[test]
fn results_are_kept_delivered_and_pruned() {
    let d = tempfile::tempdir().unwrap();
    let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
    let mqtt = ReplyTo::Mqtt {
        topic: "r/1".into(),
        correlation: Some("00ff".into()),
    };
    for i in 0..3 {
        let t = q.push(json!(i), mqtt.clone(), request("x")).unwrap();
        let r = q.complete(&t, error_reply(&t.id)).unwrap();
        assert_eq!(r.seq, t.seq);
    }
    assert_eq!(q.results(), 2, "max_results keeps the newest");
    assert_eq!(q.lookup(&json!(0)), Lookup::Unknown);
    assert_eq!(q.undelivered().len(), 2);
    q.mark_delivered(2).unwrap();
    drop(q);
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!(rec.results, 2);
    assert_eq!(
        q.undelivered().len(),
        1,
        "delivery is remembered across restarts"
    );
    q.prune(SystemTime::now() + Duration::from_secs(120));
    assert_eq!(q.results(), 0, "retention");
    assert_eq!(q.lookup(&json!(2)), Lookup::Unknown);
}

#[test]
fn old_tasks_are_reported_expired() {
    let d = tempfile::tempdir().unwrap();
    let (q, _) = DeferredQueue::open(&cfg(d.path())).unwrap();
    q.push(json!(1), ReplyTo::Socket, request("x")).unwrap();
    assert!(q.expired(SystemTime::now()).is_empty());
    assert_eq!(
        q.expired(SystemTime::now() + Duration::from_secs(61)).len(),
        1
    );
}

#[test]
fn corrupt_files_are_set_aside_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    {
        DeferredQueue::open(&cfg(d.path())).unwrap();
    }
    std::fs::write(d.path().join("deferred/tasks/7.json"), b"{half").unwrap();
    std::fs::write(d.path().join("deferred/tasks/.8.json.tmp"), b"partial").unwrap();
    let (q, rec) = DeferredQueue::open(&cfg(d.path())).unwrap();
    assert_eq!((rec.corrupt, rec.tasks), (1, 0));
    assert!(d.path().join("deferred/tasks/7.corrupt").exists());
    assert!(!d.path().join("deferred/tasks/.8.json.tmp").exists());
    assert_eq!(
        q.push(json!(1), ReplyTo::Socket, request("x")).unwrap().seq,
        8
    );
}
