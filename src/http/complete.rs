//! `POST /v1/chat/completions` and `POST /v1/completions`: a body read within its limit, translated, handed to
//! the shared [`Handler`] as a request from `http`, and answered from its replies: one JSON body, or
//! server-sent events ending in `data: [DONE]`.
//!
//! The status line waits for the request's first reply, so that a request refused after acceptance (a
//! deadline passed in the queue, a cloud error without fallback) still gets its own status code (504, 502)
//! rather than a 200 stream that fails. Headers `x-bitnetd-route` and `x-bitnetd-route-reason` say where the
//! request was sent; the body (or the last chunk) says where it ran. A client that goes away cancels its
//! request: the response body, or the handler's future, holds a guard that cancels on drop.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::error::{HttpError, HttpResult};
use super::openai::{self, Kind};
use super::reply::{self, Head, Piece};
use super::{json_body, App};
use crate::dispatch::{Dispatcher, Origin, Routed};
use crate::errors::{Refusal, Scope};
use crate::handler::{Handler, Replies};
use crate::protocol::{self, Id, Reply, WireError};

/// What the handler tells one HTTP request.
enum Event {
    Routed(Routed),
    Reply(Box<Reply>),
}

/// The [`Replies`] of one HTTP request: its events, into the response being built.
struct HttpReplies {
    key: u64,
    tx: UnboundedSender<Event>,
}

impl Replies for HttpReplies {
    type Key = u64;

    fn key(&self, _id: &Id) -> u64 {
        self.key
    }

    async fn answer(&self, reply: Reply) {
        let _ = self.tx.send(Event::Reply(Box::new(reply)));
    }

    async fn forward(&self, reply: Reply) -> bool {
        self.tx.send(Event::Reply(Box::new(reply))).is_ok()
    }

    fn accepted(&self, routed: Routed) {
        let _ = self.tx.send(Event::Routed(routed));
    }
}

/// Cancels the request when dropped before its end (the client went away). Harmless after the end: the key is
/// then no longer in flight.
struct CancelOnDrop {
    handler: Arc<Handler<u64>>,
    key: u64,
    /// The request's place among `[http] max_in_flight`, freed with the response.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.handler.is_in_flight(&self.key) {
            log::debug!(key = self.key; "HTTP client gone: cancelling its request");
            self.handler.cancel(&self.key);
        }
    }
}

/// The endpoint.
pub(super) async fn complete(
    app: App,
    kind: Kind,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    app.authorize(&headers)?;
    let d = app.dispatcher()?;
    let refuse = |code: protocol::ErrorCode, message: String| {
        d.record_rejected("http", code);
        HttpError::from_reply(&WireError::new(code, message).into())
    };
    // JSON only: a browser's cross-origin "simple" request (text/plain, a form) cannot get this far.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        d.record_rejected("http", protocol::ErrorCode::BadRequest);
        return Err(HttpError::http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON, with `Content-Type: application/json`",
        ));
    }
    let limit = app.shared.max_body_bytes;
    let too_large = || {
        refuse(
            protocol::ErrorCode::TooLarge,
            format!("the body is over {limit} bytes ([http] max_body_bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if over_limit(&e) => return Err(too_large()),
        // The client broke off or sent a malformed body: nobody is left to answer, and nothing was accepted.
        Err(e) => {
            return Err(refuse(
                protocol::ErrorCode::BadRequest,
                format!("reading the body: {e}"),
            ))
        }
    };
    // The permit is held until the answer is sent (or the client leaves): a semaphore taken before the work.
    let Ok(permit) = app.shared.slots.clone().try_acquire_owned() else {
        let e = WireError::from(Refusal::ClientLimit {
            limit: app.shared.max_in_flight,
            scope: Scope::Http,
        });
        d.record_rejected("http", e.code);
        return Err(HttpError::from_reply(&e.into()));
    };
    let id = format!("{}{:016x}", kind.id_prefix(), rand::random::<u64>());
    let models = openai::Models {
        local: d.model_name().to_string(),
        cloud: d.cloud_model(),
    };
    let t = match openai::translate(kind, &bytes, &id, &models) {
        Ok(t) => t,
        Err(e) => {
            d.record_rejected("http", protocol::ErrorCode::BadRequest);
            return Err(HttpError::bad_param(e));
        }
    };
    let parsed = protocol::parse_value(t.request).map_err(WireError::from);
    let handler = app.handler(&d);
    let key = app.next_key();
    let (tx, mut rx) = unbounded_channel();
    handler
        .handle(parsed, Origin::now("http"), HttpReplies { key, tx })
        .await;
    let guard = CancelOnDrop {
        handler,
        key,
        _permit: permit,
    };
    let mut routed = None;
    let first = loop {
        match rx.recv().await {
            Some(Event::Routed(r)) => routed = Some(r),
            Some(Event::Reply(r)) => break *r,
            None => {
                return Err(HttpError::from_reply(
                    &WireError::new(protocol::ErrorCode::Internal, "no reply").into(),
                ))
            }
        }
    };
    let (route, reason) = routed.map_or(("none", ""), |r| (r.route, r.reason));
    let model = match route {
        "cloud" | "deferred" => models.cloud.unwrap_or(models.local),
        _ => models.local,
    };
    let head = Head {
        kind,
        id: id.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs()),
        model,
    };
    let mut response = match first {
        Reply::Error(e) => return Err(HttpError::from_reply(&e)),
        Reply::Deferred { position, .. } => {
            let mut r = deferred_body(&id, position);
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
        first if t.stream => stream(head, first, rx, guard, t.include_usage),
        first => collect(head, first, rx).await?,
    };
    let h = response.headers_mut();
    for (name, value) in [
        ("x-bitnetd-route", route),
        ("x-bitnetd-route-reason", reason),
        ("x-request-id", &id),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    Ok(response)
}

/// True when reading a body failed because it passed the limit.
fn over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The body of a deferred request (202): where to pick up its answer.
fn deferred_body(id: &str, position: usize) -> Response {
    json_body(&json!({
        "id": id,
        "object": "bitnetd.deferred",
        "position": position,
        "result_url": format!("/v1/results/{id}"),
    }))
}

/// One body for a request that did not stream: its replies collected until the terminal one.
async fn collect(
    head: Head,
    first: Reply,
    mut rx: UnboundedReceiver<Event>,
) -> HttpResult<Response> {
    let (mut text, mut reasoning) = (String::new(), String::new());
    let mut next = Some(first);
    while let Some(r) = next.take() {
        match r {
            Reply::Token { text: t, .. } => text.push_str(&t),
            Reply::Reasoning { text: t, .. } => reasoning.push_str(&t),
            Reply::Done(d) => {
                // Not streamed, the text comes whole in `done` (streamed, it came as tokens).
                let text = d.text.clone().unwrap_or(text);
                let reasoning = d.reasoning.clone().unwrap_or(reasoning);
                return Ok(json_body(&reply::body(&head, &d, &text, &reasoning)));
            }
            Reply::Error(e) => return Err(HttpError::from_reply(&e)),
            Reply::Deferred { position, .. } => return Ok(deferred_body(&head.id, position)),
            Reply::Status(_) => {}
        }
        next = loop {
            match rx.recv().await {
                Some(Event::Reply(r)) => break Some(*r),
                Some(Event::Routed(_)) => continue,
                None => break None,
            }
        };
    }
    Err(HttpError::from_reply(
        &WireError::new(protocol::ErrorCode::Internal, "the replies ended early").into(),
    ))
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The SSE response: a role chunk (chat), the first reply's chunk, the rest as they come, the last chunks, and
/// `data: [DONE]`. An error after the first event is sent as `data: {"error": ...}` and ends the stream.
fn stream(
    head: Head,
    first: Reply,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    include_usage: bool,
) -> Response {
    struct State {
        head: Head,
        rx: UnboundedReceiver<Event>,
        pending: Option<Reply>,
        ended: bool,
        include_usage: bool,
        _guard: CancelOnDrop,
    }
    let opening = match head.kind {
        Kind::Chat => Some(event(&reply::chunk(&head, Piece::Role))),
        Kind::Completion => None,
    };
    let state = State {
        head,
        rx,
        pending: Some(first),
        ended: false,
        include_usage,
        _guard: guard,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        loop {
            let r = match s.pending.take() {
                Some(r) => r,
                None => match s.rx.recv().await {
                    Some(Event::Reply(r)) => *r,
                    Some(Event::Routed(_)) => continue,
                    None => {
                        s.ended = true;
                        let e = HttpError::from_reply(
                            &WireError::new(
                                protocol::ErrorCode::Internal,
                                "the replies ended early",
                            )
                            .into(),
                        );
                        return Some((Bytes::from(format!("data: {}\n\n", e.body())), s));
                    }
                },
            };
            let out = match r {
                Reply::Token { text, .. } => event(&reply::chunk(&s.head, Piece::Text(&text))),
                Reply::Reasoning { text, .. } if s.head.kind == Kind::Chat => {
                    event(&reply::chunk(&s.head, Piece::Reasoning(&text)))
                }
                Reply::Reasoning { .. } | Reply::Status(_) => continue,
                Reply::Done(d) => {
                    s.ended = true;
                    let mut b = Vec::new();
                    for c in reply::last_chunks(&s.head, &d, s.include_usage) {
                        b.extend_from_slice(&event(&c));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    Bytes::from(b)
                }
                Reply::Error(e) => {
                    s.ended = true;
                    event(&HttpError::from_reply(&e).body())
                }
                Reply::Deferred { .. } => {
                    s.ended = true;
                    Bytes::from_static(b"data: [DONE]\n\n")
                }
            };
            return Some((out, s));
        }
    });
    let body = futures_util::stream::iter(opening)
        .chain(events)
        .map(Ok::<_, std::convert::Infallible>);
    let mut r = Response::new(Body::from_stream(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

use futures_util::StreamExt;

/// `GET /v1/results/{id}`: a deferred request's answer as the body it would have had (200), 202 while it
/// waits, or the error it ended with.
pub(super) fn deferred_result(d: &Dispatcher, id: &str) -> HttpResult<Response> {
    // Only HTTP's own ids: the socket's and MQTT's are chosen by their clients, and are theirs to fetch.
    if ![Kind::Chat, Kind::Completion]
        .iter()
        .any(|k| id.starts_with(k.id_prefix()))
    {
        return Err(HttpError::http(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such deferred request",
        ));
    }
    let kind = if id.starts_with(Kind::Chat.id_prefix()) {
        Kind::Chat
    } else {
        Kind::Completion
    };
    match d.result(&Value::from(id)) {
        Reply::Done(done) => {
            let head = Head {
                kind,
                id: id.to_string(),
                created: 0,
                model: done.model.clone(),
            };
            let text = done.text.clone().unwrap_or_default();
            let reasoning = done.reasoning.clone().unwrap_or_default();
            Ok(json_body(&reply::body(&head, &done, &text, &reasoning)))
        }
        Reply::Deferred { position, .. } => {
            let mut r = deferred_body(id, position);
            *r.status_mut() = StatusCode::ACCEPTED;
            Ok(r)
        }
        Reply::Error(e) => Err(HttpError::from_reply(&e)),
        _ => Err(HttpError::http(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such deferred request",
        )),
    }
}
