//! [`KimiClient`]: one streamed chat completion at a time per caller, with the client-side limits a fleet
//! needs: a requests-per-minute limiter, a concurrency cap, connect / first-byte / stall / overall timeouts,
//! retries with exponential backoff and jitter that honour `Retry-After` within the request's deadline, a
//! circuit breaker, and an answer cache for deterministic requests.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Semaphore;
use tokio::time::timeout_at;

use super::breaker::Breaker;
use super::cache::{AnswerCache, CachedAnswer};
use super::connectivity::Connectivity;
use super::limiter::RateLimiter;
use super::models::{self, Choice, ModelSetting, Traits};
use super::wire::{self, ApiUsage, ChatBody, Format, StreamOptions, Switch};
use super::{ApiKey, Cause, CloudError};
use crate::backoff::backoff;
use crate::config::CloudConfig;
use crate::engine::{FinishReason, Message};
use crate::protocol::{Done, Id, Served, Timing, Usage};

mod attempt;

/// Most bytes of an error body read.
const MAX_ERROR_BODY: usize = 64 << 10;

/// One chat completion to run in the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudRequest {
    pub messages: Vec<Message>,
    /// Tokens of answer asked for; what is sent follows [`models::max_tokens`].
    pub max_tokens: Option<usize>,
    /// Left out for models whose sampling is fixed.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    /// `Some(false)` turns thinking off where the model can; `None` keeps the model's default.
    pub thinking: Option<bool>,
    /// Ask for a JSON object (JSON mode).
    pub json: bool,
    /// Nothing is started, waited for or retried past this.
    pub deadline: Option<Instant>,
    /// Retry transient failures. Off when a local fallback is waiting: then the first failure ends it.
    pub retry: bool,
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Answer text.
    Text(String),
    /// A thinking model's reasoning, never part of the answer.
    Reasoning(String),
}

/// A finished cloud answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudAnswer {
    pub text: String,
    /// The reasoning of a thinking model (empty otherwise).
    pub reasoning: String,
    /// The model that answered.
    pub model: String,
    /// As the API says it: `stop`, `length`, `content_filter`, ...
    pub finish_reason: String,
    pub usage: Option<ApiUsage>,
    /// Served from the answer cache, without a request.
    pub cached: bool,
    /// HTTP attempts made (0 from the cache).
    pub attempts: u32,
    /// From the call until the first text.
    pub ttft: Option<Duration>,
}

impl CloudAnswer {
    /// The `done` reply for this answer, with its text and reasoning, timed by `timing`. With `json` (a
    /// validation) the text must hold the result object ([`crate::tasks::parse_result`]); when it does not,
    /// the answer fails with cause `protocol`.
    pub fn into_done(
        self,
        id: Id,
        route_reason: &str,
        timing: Timing,
        json: bool,
    ) -> Result<Done, CloudError> {
        let usage = self.usage.unwrap_or_default();
        let result = match json {
            true => Some(crate::tasks::parse_result(&self.text).map_err(|why| {
                CloudError::new(Cause::Protocol, format!("{} ({})", why, self.model))
            })?),
            false => None,
        };
        Ok(Done {
            id,
            text: Some(self.text),
            reasoning: (!self.reasoning.is_empty()).then_some(self.reasoning),
            result,
            route: Served::Cloud,
            route_reason: route_reason.to_string(),
            fallback: None,
            cached: self.cached,
            deferred: false,
            model: self.model,
            finish_reason: match self.finish_reason.as_str() {
                "length" => FinishReason::Length,
                "content_filter" => FinishReason::ContentFilter,
                _ => FinishReason::Stop,
            },
            usage: Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                reasoning_tokens: usage.reasoning_tokens,
            },
            timing,
        })
    }
}

/// A failed cloud request.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudFailure {
    pub error: CloudError,
    /// Text had already been passed on when it failed (the stream was cut mid-answer).
    pub relayed: bool,
    pub attempts: u32,
}

/// See the module documentation. Cheap to share (`Arc`).
pub struct KimiClient {
    http: reqwest::Client,
    key: ApiKey,
    url: String,
    models_url: String,
    setting: ModelSetting,
    /// The id requests go to: the setting's choice from the last model list.
    model: RwLock<String>,
    cfg: CloudConfig,
    limiter: Mutex<RateLimiter>,
    slots: Semaphore,
    breaker: Mutex<Breaker>,
    cache: AnswerCache,
    link: Arc<Connectivity>,
}

enum Attempt {
    Done(CloudAnswer),
    Failed { error: CloudError, relayed: bool },
}

impl KimiClient {
    /// A client for `cfg`, reporting what it sees to `link`. Fails only on an unusable `ca_file`.
    pub fn new(
        cfg: &CloudConfig,
        key: ApiKey,
        link: Arc<Connectivity>,
    ) -> Result<KimiClient, CloudError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .user_agent(concat!("bitnetd/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                CloudError::new(
                    Cause::Connect,
                    format!("[cloud] ca_file {}: {e}", ca.display()),
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                CloudError::new(
                    Cause::Connect,
                    format!("[cloud] ca_file {}: {e}", ca.display()),
                )
            })?;
            b = b.tls_certs_merge(certs);
        }
        let http = b
            .build()
            .map_err(|e| CloudError::new(Cause::Connect, format!("HTTP client: {e}")))?;
        let base = cfg.base_url.trim_end_matches('/');
        Ok(KimiClient {
            http,
            key,
            url: format!("{base}/chat/completions"),
            models_url: format!("{base}/models"),
            model: RwLock::new(ModelSetting::parse(&cfg.model).provisional().to_string()),
            setting: ModelSetting::parse(&cfg.model),
            limiter: Mutex::new(RateLimiter::new(cfg.requests_per_minute, Instant::now())),
            slots: Semaphore::new(cfg.max_concurrency),
            breaker: Mutex::new(Breaker::new(cfg.breaker_failures, cfg.breaker_open)),
            cache: AnswerCache::new(cfg.cache_entries),
            cfg: cfg.clone(),
            link,
        })
    }

    /// The model id requests go to (for `auto`, the choice from the last model list).
    pub fn model(&self) -> String {
        self.model.read().unwrap().clone()
    }

    /// What `[cloud] model` asks for.
    pub fn setting(&self) -> &ModelSetting {
        &self.setting
    }

    /// Applies the account's model list: requests go to the chosen id from now on. Returns the choice.
    pub fn apply_listing(&self, listed: &[String]) -> Choice {
        let choice = models::choose(&self.setting, listed);
        if let Choice::Chosen(id) = &choice {
            let mut m = self.model.write().unwrap();
            if *m != *id {
                log::info!(model = id.as_str(), setting = self.cfg.model.as_str(); "cloud model chosen");
                *m = id.clone();
            }
        }
        choice
    }

    /// Answers in the cache.
    pub fn cached_answers(&self) -> usize {
        self.cache.len()
    }

    /// Drops every cached answer (memory pressure).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// True while the breaker refuses requests.
    pub fn circuit_open(&self) -> bool {
        self.breaker.lock().unwrap().is_open(Instant::now())
    }

    /// The request body for `req` to `model`, shaped by the model's `traits`.
    fn body(&self, req: &CloudRequest, model: &str, traits: Traits) -> Vec<u8> {
        let thinks = traits.thinks(req.thinking);
        let sampling = |v: Option<f32>| v.filter(|_| !traits.fixed_sampling);
        serde_json::to_vec(&ChatBody {
            model,
            messages: &req.messages,
            stream: true,
            max_tokens: Some(models::max_tokens(
                req.max_tokens,
                thinks,
                self.cfg.min_answer_tokens,
                self.cfg.reasoning_budget_tokens,
            )),
            temperature: sampling(req.temperature),
            top_p: sampling(req.top_p),
            stop: &req.stop,
            thinking: match req.thinking {
                Some(on) if traits.thinking_switch => Some(if on {
                    Switch::Enabled
                } else {
                    Switch::Disabled
                }),
                _ => None,
            },
            response_format: req.json.then_some(Format::JsonObject),
            stream_options: StreamOptions {
                include_usage: true,
            },
        })
        .expect("the chat body serializes")
    }

    /// Runs `req`, sending each piece of text and reasoning to `tokens` as it arrives. A closed `tokens`
    /// receiver cancels the request. Retries (when `req.retry`) only before anything was passed on.
    pub async fn chat(
        &self,
        req: &CloudRequest,
        tokens: &UnboundedSender<Piece>,
    ) -> Result<CloudAnswer, CloudFailure> {
        let started = Instant::now();
        let model = self.model();
        let traits = Traits::of(&model);
        let body = self.body(req, &model, traits);
        // Deterministic only when temperature 0 is actually sent (fixed-sampling models leave it out).
        let deterministic = req.temperature == Some(0.0) && !traits.fixed_sampling;
        let cache_key = deterministic.then(|| AnswerCache::key(&body));
        if let Some(hit) = cache_key.and_then(|k| self.cache.get(&k)) {
            let _ = tokens.send(Piece::Text(hit.text.clone()));
            return Ok(CloudAnswer {
                text: hit.text,
                reasoning: String::new(),
                model,
                finish_reason: hit.finish_reason,
                usage: hit.usage,
                cached: true,
                attempts: 0,
                ttft: Some(started.elapsed()),
            });
        }
        let mut attempts = 0u32;
        loop {
            let fail = |error: CloudError, relayed: bool, attempts: u32| CloudFailure {
                error,
                relayed,
                attempts,
            };
            let limit = self.attempt_limit(req.deadline);
            if let Err(e) = self.admit(req, limit.0).await {
                return Err(fail(e, false, attempts));
            }
            let permit = match timeout_at(limit.0.into(), self.slots.acquire()).await {
                Ok(p) => p.expect("the semaphore is never closed"),
                Err(_) => {
                    return Err(fail(
                        self.timed_out(limit, "a free cloud slot"),
                        false,
                        attempts,
                    ))
                }
            };
            attempts += 1;
            let outcome = self.attempt(&body, &model, limit, tokens, started).await;
            drop(permit);
            let (error, relayed) = match outcome {
                Attempt::Done(answer) => {
                    self.on_result(None);
                    if let (Some(k), true) = (cache_key, answer.finish_reason == "stop") {
                        self.cache.put(
                            k,
                            CachedAnswer {
                                text: answer.text.clone(),
                                finish_reason: answer.finish_reason.clone(),
                                usage: answer.usage,
                            },
                        );
                    }
                    return Ok(CloudAnswer { attempts, ..answer });
                }
                Attempt::Failed { error, relayed } => (error, relayed),
            };
            self.on_result(Some(&error));
            log::warn!(cause = error.cause.as_str(), attempt = attempts, relayed; "cloud request failed: {}", error.message);
            if relayed || !req.retry || !error.cause.retryable() || attempts > self.cfg.max_retries
            {
                return Err(fail(error, relayed, attempts));
            }
            let jitter: f64 = rand::rng().random();
            let wait = backoff(attempts - 1, self.cfg.retry_min, self.cfg.retry_max, jitter)
                .max(error.retry_after.unwrap_or_default());
            if req.deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Err(fail(error, false, attempts));
            }
            log::info!(wait_ms = wait.as_millis() as u64, attempt = attempts; "retrying the cloud request");
            tokio::time::sleep(wait).await;
        }
    }

    /// The end of the next attempt: the overall timeout or the deadline, whichever is first, and whether the
    /// deadline is the one.
    fn attempt_limit(&self, deadline: Option<Instant>) -> (Instant, bool) {
        let own = Instant::now() + self.cfg.request_timeout;
        match deadline {
            Some(d) if d <= own => (d, true),
            _ => (own, false),
        }
    }

    fn timed_out(&self, limit: (Instant, bool), waiting_for: &str) -> CloudError {
        if limit.1 {
            CloudError::new(
                Cause::Deadline,
                format!("the deadline passed waiting for {waiting_for}"),
            )
        } else {
            CloudError::new(
                Cause::Timeout,
                format!("no {waiting_for} within the request timeout"),
            )
        }
    }

    /// The breaker and the rate limiter. Waits for the rate limiter only when retries are allowed and the wait
    /// ends before `until`.
    async fn admit(&self, req: &CloudRequest, until: Instant) -> Result<(), CloudError> {
        if let Err(open_for) = self.breaker.lock().unwrap().try_acquire(Instant::now()) {
            let mut e = CloudError::new(
                Cause::CircuitOpen,
                format!(
                    "the cloud failed repeatedly; not trying again for {:.0} s",
                    open_for.as_secs_f64().ceil()
                ),
            );
            e.retry_after = Some(open_for);
            return Err(e);
        }
        loop {
            let wait = match self.limiter.lock().unwrap().try_take(Instant::now()) {
                Ok(()) => return Ok(()),
                Err(w) => w,
            };
            if !req.retry || Instant::now() + wait > until {
                self.breaker.lock().unwrap().on_abandoned(Instant::now());
                let mut e = CloudError::new(
                    Cause::RateLimited,
                    format!(
                        "over [cloud] requests_per_minute = {}; next slot in {:.1} s",
                        self.cfg.requests_per_minute,
                        wait.as_secs_f64()
                    ),
                );
                e.retry_after = Some(wait);
                return Err(e);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Tells the breaker and the connectivity monitor how a request went. Only outages count against the
    /// cloud; a refused key or a bad request says nothing about reachability.
    fn on_result(&self, error: Option<&CloudError>) {
        let mut b = self.breaker.lock().unwrap();
        match error {
            Some(e) if e.cause.is_outage() => {
                if b.on_failure(Instant::now()) {
                    log::warn!(open_s = self.cfg.breaker_open.as_secs(); "cloud circuit breaker opened");
                    self.link.circuit_opened();
                } else {
                    self.link.request_failed();
                }
            }
            Some(e) if e.cause == Cause::Cancelled => b.on_abandoned(Instant::now()),
            _ => {
                b.on_success();
                self.link.request_succeeded();
            }
        }
    }

    /// `GET /models`: the model ids the account can use. Any HTTP answer means the cloud is reachable.
    pub async fn list_models(&self, within: Duration) -> Result<Vec<String>, CloudError> {
        let send = self
            .http
            .get(&self.models_url)
            .bearer_auth(self.key.expose())
            .send();
        let until = Instant::now() + within;
        let resp = match timeout_at(until.into(), send).await {
            Err(_) => return Err(CloudError::new(Cause::Timeout, "the probe timed out")),
            Ok(Err(e)) => return Err(transport_error(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let body = read_capped(resp, until).await;
        if !status.is_success() {
            return Err(wire::http_error(status.as_u16(), &body, None));
        }
        serde_json::from_slice::<wire::ModelList>(&body)
            .map(|l| l.data.into_iter().map(|m| m.id).collect())
            .map_err(|e| CloudError::new(Cause::Protocol, format!("unreadable model list: {e}")))
    }
}

/// A reqwest failure as a [`CloudError`]; reqwest's message names the URL, never the headers.
pub(super) fn transport_error(e: &reqwest::Error) -> CloudError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    let cause = if e.is_timeout() {
        Cause::Timeout
    } else if e.is_connect() || e.is_request() {
        Cause::Connect
    } else {
        Cause::Cut
    };
    CloudError::new(cause, msg)
}

pub(super) async fn read_capped(resp: reqwest::Response, until: Instant) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Ok(Some(Ok(b))) = timeout_at(until.into(), stream.next()).await {
        body.extend_from_slice(&b);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    body
}
