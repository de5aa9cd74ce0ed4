//! The OpenAI-compatible HTTP API (`[http]`, `docs/http.md`): a third source beside the Unix socket and MQTT,
//! through the same [`Handler`] and dispatcher, so routing, budgets and privacy hold as they do there.
//!
//! - this file: the shared state, [`serve`] and the small endpoints (`/v1/models`, `/health`, `/metrics`);
//! - [`openai`]: request bodies to bitnetd requests; [`reply`]: replies to response bodies and chunks;
//! - [`complete`]: `POST /v1/chat/completions` and `/v1/completions`, streamed or not;
//! - [`error`]: error codes to HTTP statuses; [`listen`]: the addresses and sockets.
//!
//! It starts before the model is loaded, so that `/health` can say `loading` (503) instead of refusing the
//! connection; every other endpoint answers 503 until the dispatcher is there.

mod complete;
pub mod error;
pub mod listen;
pub mod openai;
pub mod reply;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cloud::key::ApiKey;
use crate::config::HttpConfig;
use crate::dispatch::Dispatcher;
use crate::errors::Scope;
use crate::handler::Handler;
use error::{HttpError, HttpResult};
pub use listen::{HttpError as ListenError, HttpListener};

/// Seconds a client is asked to wait while the model loads or the daemon drains.
const UNAVAILABLE_RETRY_MS: u64 = 5000;

/// What every listener's routes share.
struct Shared {
    /// `None` until the model is loaded.
    dispatcher: watch::Receiver<Option<Arc<Dispatcher>>>,
    handler: std::sync::OnceLock<Arc<Handler<u64>>>,
    /// `[http] max_in_flight` permits: one per request until its answer is sent.
    slots: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    max_body_bytes: usize,
    key: Option<ApiKey>,
    next_key: AtomicU64,
}

/// One listener's state: the shared part, whether its clients must send the key, and whether it is TCP.
#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    needs_key: bool,
    tcp: bool,
}

/// True for a `Host` or `Origin` naming this machine's loopback (`localhost`, `127.0.0.1`, `[::1]`, any port).
fn is_loopback_name(value: &str) -> bool {
    let host = value.split_once("://").map_or(value, |(_, rest)| rest);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl App {
    /// 401 unless the request carries the key (when this listener needs one). TCP without a key serves only
    /// this machine: a request must name a loopback host, and a browser's must come from a loopback origin,
    /// so that a web page cannot drive the daemon (DNS rebinding, cross-site requests).
    fn authorize(&self, headers: &HeaderMap) -> HttpResult<()> {
        let Some(key) = self.shared.key.as_ref().filter(|_| self.needs_key) else {
            if self.tcp {
                let header = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
                let host_ok = header(header::HOST).is_some_and(is_loopback_name);
                let origin_ok = header(header::ORIGIN).is_none_or(is_loopback_name);
                if !(host_ok && origin_ok) {
                    return Err(HttpError::http(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "without an API key, this address serves only this machine (Host and Origin must be loopback)",
                    ));
                }
            }
            return Ok(());
        };
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match offered {
            Some(k) if key.matches(k.as_bytes()) => Ok(()),
            Some(_) => Err(HttpError::http(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "Incorrect API key provided",
            )),
            None => Err(HttpError::http(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "This address needs an API key: send `Authorization: Bearer <key>`",
            )),
        }
    }

    /// The dispatcher, or 503 while the model loads.
    fn dispatcher(&self) -> HttpResult<Arc<Dispatcher>> {
        self.shared.dispatcher.borrow().clone().ok_or_else(|| {
            let mut e = HttpError::http(
                StatusCode::SERVICE_UNAVAILABLE,
                "loading",
                "the model is loading",
            );
            e.retry_after_ms = Some(UNAVAILABLE_RETRY_MS);
            e
        })
    }

    /// The handler every HTTP request goes through (made with the dispatcher, once).
    fn handler(&self, d: &Arc<Dispatcher>) -> Arc<Handler<u64>> {
        self.shared
            .handler
            .get_or_init(|| {
                Arc::new(Handler::new(
                    d.clone(),
                    self.shared.max_in_flight,
                    Scope::Http,
                ))
            })
            .clone()
    }

    fn next_key(&self) -> u64 {
        self.shared.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

/// Serves HTTP on `listeners` until `stop` is cancelled, then lets open responses finish (a stream ends with
/// its request, which the dispatcher's drain bounds). `dispatcher` is `None` while the model loads.
pub fn serve(
    cfg: &HttpConfig,
    key: Option<ApiKey>,
    listeners: Vec<HttpListener>,
    dispatcher: watch::Receiver<Option<Arc<Dispatcher>>>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    let shared = Arc::new(Shared {
        dispatcher,
        handler: std::sync::OnceLock::new(),
        slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight)),
        max_in_flight: cfg.max_in_flight,
        max_body_bytes: cfg.max_body_bytes,
        key,
        next_key: AtomicU64::new(0),
    });
    for l in listeners {
        let app = App {
            shared: shared.clone(),
            needs_key: l.needs_key(),
            tcp: matches!(l, HttpListener::Tcp { .. }),
        };
        let router = routes(app);
        let stop = stop.clone();
        tracker.spawn(async move {
            let name = l.to_string();
            let done = stop.clone();
            let r = match l {
                HttpListener::Tcp { socket, .. } => {
                    axum::serve(socket, router)
                        .with_graceful_shutdown(async move { done.cancelled().await })
                        .await
                }
                HttpListener::Unix { socket, .. } => {
                    axum::serve(socket, router)
                        .with_graceful_shutdown(async move { done.cancelled().await })
                        .await
                }
            };
            if let Err(e) = r {
                log::error!(listener = name.as_str(); "HTTP server stopped: {e}");
            }
        });
    }
}

fn routes(app: App) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(app): State<App>, h: HeaderMap, b: Body| {
                complete::complete(app, openai::Kind::Chat, h, b)
            }),
        )
        .route(
            "/v1/completions",
            post(|State(app): State<App>, h: HeaderMap, b: Body| {
                complete::complete(app, openai::Kind::Completion, h, b)
            }),
        )
        .route("/v1/models", get(models))
        .route("/v1/results/{id}", get(result))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            HttpError::http(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (see docs/http.md)",
            )
        })
        .with_state(app)
}

/// A JSON body.
fn json_body(v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /v1/models`: the local model, and the cloud model when the cloud route is on.
async fn models(State(app): State<App>, headers: HeaderMap) -> HttpResult<Response> {
    app.authorize(&headers)?;
    let d = app.dispatcher()?;
    let model = |id: &str, owner: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": owner});
    let mut data = vec![model(d.model_name(), "bitnetd")];
    if let Some(c) = d.cloud_model() {
        data.push(model(&c, "moonshot"));
    }
    Ok(json_body(&json!({"object": "list", "data": data})))
}

/// `GET /health`: 200 `ready`; 503 `loading`, `draining` or `engine_stopped` (no key needed).
async fn health(State(app): State<App>) -> Response {
    let Some(d) = app.shared.dispatcher.borrow().clone() else {
        let mut r = json_body(&json!({"status": "loading"}));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    };
    let (status, code) = if d.is_draining() {
        ("draining", StatusCode::SERVICE_UNAVAILABLE)
    } else if !d.engine_alive() {
        ("engine_stopped", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ready", StatusCode::OK)
    };
    let mut r =
        json_body(&json!({"status": status, "model": d.model_name(), "in_flight": d.in_flight()}));
    *r.status_mut() = code;
    r
}

/// `GET /metrics`: Prometheus text (see [`crate::metrics`]).
async fn metrics(State(app): State<App>, headers: HeaderMap) -> HttpResult<Response> {
    app.authorize(&headers)?;
    let d = app.dispatcher()?;
    let text = d.metrics().render(&d.status(None));
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// `GET /v1/results/{id}`: the answer to a deferred request (202 while it waits).
async fn result(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> HttpResult<Response> {
    app.authorize(&headers)?;
    let d = app.dispatcher()?;
    complete::deferred_result(&d, &id)
}
