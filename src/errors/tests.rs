//! The error table: every internal error with the wire code and retry hint it gets, and a check that the table
//! covers every code `docs/protocol.md` documents.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::router::LocalSpeed;

/// One row: the error as a client receives it, the code it must have, the retry hint it must carry.
struct Row {
    what: &'static str,
    got: WireError,
    code: ErrorCode,
    retry_ms: Option<u64>,
}

fn row(what: &'static str, got: WireError, code: ErrorCode, retry_ms: Option<u64>) -> Row {
    Row {
        what,
        got,
        code,
        retry_ms,
    }
}

fn cloud(cause: Cause, retry_after: Option<Duration>) -> WireError {
    let mut e = CloudError::new(cause, "x");
    e.retry_after = retry_after;
    WireError::from(&e)
}

fn table() -> Vec<Row> {
    use ErrorCode as C;
    let speed = LocalSpeed {
        ttft: Duration::from_millis(200),
        tokens_per_s: 10.0,
    };
    let s = Duration::from_secs(1);
    let kv = |retryable| admission::Refusal::KvOverBudget {
        tokens: 100,
        bytes: 10 << 20,
        needed: 20 << 20,
        budget: 15 << 20,
        retryable,
    };
    let io = QueueError::Io {
        path: PathBuf::from("/q"),
        source: std::io::Error::other("disk full"),
    };
    let full = QueueError::Full {
        tasks: 1,
        bytes: 2,
        max_tasks: 1,
        max_bytes: 2,
    };
    let e = |e: EngineError| WireError::from(&e);
    let r = |r: Refusal| WireError::from(&r);
    let limit = |scope| Refusal::ClientLimit { limit: 4, scope };
    vec![
        row(
            "parse",
            ParseError::new("malformed JSON").into(),
            C::BadRequest,
            None,
        ),
        row("not utf-8", r(Refusal::NotUtf8), C::BadRequest, None),
        row(
            "result without id",
            r(Refusal::ResultNeedsId),
            C::BadRequest,
            None,
        ),
        row("duplicate id", r(Refusal::DuplicateId), C::BadRequest, None),
        row(
            "deadline_ms 0",
            r(Refusal::InvalidDeadline),
            C::BadRequest,
            None,
        ),
        row(
            "empty prompt",
            e(EngineError::EmptyPrompt),
            C::BadRequest,
            None,
        ),
        row(
            "invalid param",
            e(EngineError::InvalidParam {
                name: "top_p",
                message: "x".into(),
            }),
            C::BadRequest,
            None,
        ),
        row(
            "chat template",
            e(EngineError::ChatTemplate("x".into())),
            C::BadRequest,
            None,
        ),
        row(
            "tokenizer",
            e(EngineError::Tokenizer("x".into())),
            C::BadRequest,
            None,
        ),
        row(
            "deferred duplicate",
            WireError::from(&QueueError::Duplicate),
            C::BadRequest,
            None,
        ),
        row(
            "line too long",
            r(Refusal::LineTooLong { limit: 9 }),
            C::TooLarge,
            None,
        ),
        row(
            "payload too large",
            r(Refusal::PayloadTooLarge { size: 10, limit: 9 }),
            C::TooLarge,
            None,
        ),
        row(
            "prompt over the context",
            e(EngineError::PromptTooLong {
                tokens: 9,
                context: 8,
            }),
            C::TooLong,
            None,
        ),
        row(
            "too long for the board, cloud offline",
            WireError::from(&router::Refusal::TooLongForBoard {
                prompt_tokens: 9,
                context: 8,
                cloud: CloudState::Offline,
            }),
            C::TooLong,
            None,
        ),
        row(
            "engine queue full",
            e(EngineError::Busy { capacity: 4 }),
            C::Busy,
            Some(1000),
        ),
        row(
            "connection share full",
            r(limit(Scope::Connection)),
            C::Busy,
            Some(1000),
        ),
        row(
            "mqtt share full",
            r(limit(Scope::Mqtt)),
            C::Busy,
            Some(1000),
        ),
        row(
            "mqtt client over its rate",
            r(Refusal::ClientRate {
                per_minute: 60,
                wait: Duration::from_millis(700),
            }),
            C::Busy,
            Some(700),
        ),
        row(
            "deferred queue full",
            WireError::from(&full),
            C::Busy,
            Some(60_000),
        ),
        row(
            "too hot",
            WireError::from(&admission::Refusal::TooHot {
                temperature_c: Some(85.0),
                retry_after_ms: Some(30_000),
            }),
            C::OverBudget,
            Some(30_000),
        ),
        row(
            "battery critical",
            WireError::from(&admission::Refusal::BatteryCritical {
                battery_percent: Some(4.0),
                retry_after_ms: Some(60_000),
            }),
            C::OverBudget,
            Some(60_000),
        ),
        row(
            "short of memory",
            WireError::from(&admission::Refusal::ShortOfMemory {
                retry_after_ms: Some(5000),
            }),
            C::OverBudget,
            Some(5000),
        ),
        row(
            "kv over budget, fits when idle",
            WireError::from(&kv(true)),
            C::OverBudget,
            Some(1000),
        ),
        row(
            "kv over budget, never fits",
            WireError::from(&kv(false)),
            C::OverBudget,
            None,
        ),
        row(
            "deadline too short",
            WireError::from(&admission::Refusal::DeadlineTooShort {
                tokens: 50,
                needed: 5 * s,
                speed,
                left: s,
            }),
            C::Deadline,
            None,
        ),
        row(
            "engine deadline passed",
            e(EngineError::DeadlineExceeded { waited: s }),
            C::Deadline,
            None,
        ),
        row(
            "cloud deadline passed",
            cloud(Cause::Deadline, None),
            C::Deadline,
            None,
        ),
        row(
            "mqtt expiry passed",
            e(EngineError::Expired { waited: s }),
            C::Expired,
            None,
        ),
        row(
            "deferred too old",
            r(Refusal::DeferredExpired),
            C::Expired,
            None,
        ),
        row(
            "route cloud, none configured",
            WireError::from(&router::Refusal::NoCloud),
            C::CloudUnavailable,
            None,
        ),
        row(
            "route cloud, offline",
            WireError::from(&router::Refusal::CloudOffline),
            C::CloudUnavailable,
            None,
        ),
        row(
            "cloud 429 with Retry-After",
            cloud(Cause::RateLimited, Some(2 * s)),
            C::CloudError,
            Some(2000),
        ),
        row(
            "cloud 401",
            cloud(Cause::Unauthorized, Some(2 * s)),
            C::CloudError,
            None,
        ),
        row(
            "cloud circuit open",
            cloud(Cause::CircuitOpen, Some(s)),
            C::CloudError,
            Some(1000),
        ),
        row("cloud cut", cloud(Cause::Cut, None), C::CloudError, None),
        row(
            "result of an unknown id",
            r(Refusal::NotDeferred),
            C::NotFound,
            None,
        ),
        row("draining", r(Refusal::ShuttingDown), C::ShuttingDown, None),
        row(
            "engine shut down",
            e(EngineError::ShutDown),
            C::ShuttingDown,
            None,
        ),
        row(
            "engine thread died",
            r(Refusal::EngineStopped),
            C::Internal,
            None,
        ),
        row("unanswered", r(Refusal::Unanswered), C::Internal, None),
        row(
            "idle connection",
            r(Refusal::IdleTimeout { secs: 300 }),
            C::IdleTimeout,
            None,
        ),
        row(
            "process over its connections",
            r(Refusal::ProcessLimit { limit: 16 }),
            C::Busy,
            Some(1000),
        ),
        row(
            "status-only connection",
            r(limit(Scope::StatusOnly)),
            C::Busy,
            Some(1000),
        ),
        row(
            "inference failed",
            e(EngineError::Inference("x".into())),
            C::Internal,
            None,
        ),
        row(
            "deferred queue unwritable",
            WireError::from(&io),
            C::Internal,
            None,
        ),
    ]
}

#[test]
fn every_error_gets_its_documented_code_and_retry_hint() {
    for r in table() {
        assert_eq!(r.got.code, r.code, "{}: {:?}", r.what, r.got);
        assert_eq!(r.got.retry_after_ms, r.retry_ms, "{}: {:?}", r.what, r.got);
        assert!(!r.got.message.is_empty(), "{}", r.what);
    }
}

#[test]
fn cloud_errors_carry_their_cause() {
    assert_eq!(cloud(Cause::Timeout, None).cause, Some("timeout"));
    assert_eq!(cloud(Cause::Deadline, None).cause, Some("deadline"));
}

#[test]
fn a_queue_io_error_keeps_the_path_out_of_the_reply() {
    let io = QueueError::Io {
        path: PathBuf::from("/var/lib/bitnetd/secret-path"),
        source: std::io::Error::other("disk full"),
    };
    assert!(!WireError::from(&io).message.contains("secret-path"));
}

#[test]
fn parse_errors_keep_the_id_they_could_read() {
    let e = crate::protocol::parse(br#"{"id":"a","prompt":"x","bogus":1}"#).unwrap_err();
    let w = WireError::from(e);
    assert_eq!(w.id, Some(serde_json::json!("a")));
    assert_eq!(w.code, ErrorCode::BadRequest);
}

#[test]
fn the_table_covers_every_code() {
    let covered: BTreeSet<&str> = table().iter().map(|r| r.code.as_str()).collect();
    let all: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(covered, all);
}

/// The codes of the table under `### Error codes` in `docs/protocol.md`.
fn documented_codes() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let section = doc
        .split("### Error codes")
        .nth(1)
        .expect("docs/protocol.md has a section `### Error codes`");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string))
        .collect()
}

#[test]
fn the_documented_codes_are_exactly_the_codes() {
    let documented = documented_codes();
    assert_eq!(documented.len(), ErrorCode::ALL.len(), "{documented:?}");
    let all: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    assert_eq!(documented, all);
}
