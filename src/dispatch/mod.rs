//! The dispatcher: every source (Unix socket, MQTT) hands it parsed requests. It applies the router's decision,
//! validates through the [`Backend`], queues, and turns engine events into [`Reply`]s, exactly one terminal
//! reply per accepted request. It also keeps the counters that `status` reports and drains on shutdown.

mod cloud;
mod local;
mod status;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::watch;

pub use cloud::CloudRoute;
pub use status::{
    CloudStatus, EngineStatus, LatencyStatus, MemoryStatus, RequestCounts, RouteLatency, Status,
};

use crate::budget::KvModel;
use crate::cloud::{Cause, CloudRequest};
use crate::config::HotAction;
use crate::deferred::{Lookup, QueueError, ReplyTo, TaskRequest};
use crate::engine::{
    Backend, CancelToken, EngineError, GenerateParams, Generation, JobOptions, Message, Prompt,
    SamplingParams, ValidatedRequest,
};
use crate::governor::Budget;
use crate::inflight::InFlight;
use crate::protocol::{ErrorCode, Id, OnDeadline, Reply, Request, Route, WireError};
use crate::router::{
    self, complexity, CloudState, Decision, LocalFit, LocalSpeed, Reason, RouteRequest, Situation,
};
use local::ms;
use status::{ewma, Counters};

/// The reply side of a local run: whom it answers, and what its `done` says about how it got there.
struct LocalRun {
    seq: u64,
    id: Id,
    stream: bool,
    received: Instant,
    route_reason: &'static str,
    /// The cloud's failure cause, when this run is a fallback.
    fallback: Option<Cause>,
    /// `max_tokens` as lowered to meet the deadline.
    shortened: Option<usize>,
}

/// Request defaults and limits that come from the configuration.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// `max_tokens` when a request does not say.
    pub default_max_tokens: usize,
    /// Deadline when a request does not set `deadline_ms`.
    pub default_deadline: Option<Duration>,
    /// A running slot without progress for this long makes the engine count as dead.
    pub stall_limit: Duration,
    /// The memory budget, reported in `status`.
    pub memory_budget: u64,
    /// Resident size before the model was loaded, reported in `status`.
    pub rss_before_model: Option<u64>,
    /// The governor's current view; `None` runs ungoverned (tests of the engine alone).
    pub budget: Option<watch::Receiver<Budget>>,
    /// How much KV cache a request reserves; `None` reserves nothing.
    pub kv: Option<KvModel>,
    /// The cloud route; `None` when no cloud is configured (everything runs locally).
    pub cloud: Option<CloudRoute>,
    /// Local requests while the board is hot: refused, or held until it cools.
    pub hot_action: HotAction,
}

/// Where and when a request came in.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The source, for logs: `socket`, `mqtt`.
    pub source: &'static str,
    /// When the message arrived; `deadline_ms` counts from here.
    pub received: Instant,
    /// Not started by then, it is not run (MQTT Message Expiry).
    pub start_by: Option<Instant>,
    /// Where the result of a deferred request goes.
    pub reply_to: ReplyTo,
}

impl Origin {
    /// A request from `source` that arrived now (a deferred result is kept for `{"cmd":"result"}`).
    pub fn now(source: &'static str) -> Origin {
        Origin {
            source,
            received: Instant::now(),
            start_by: None,
            reply_to: ReplyTo::Socket,
        }
    }
}

/// An accepted request: its replies (tokens, then exactly one `done` or `error`) and a way to cancel it.
/// Dropping the receiver cancels the request too.
pub struct Ticket {
    pub replies: tokio::sync::mpsc::UnboundedReceiver<Reply>,
    cancel: CancelToken,
}

impl Ticket {
    /// Stops the request before its next token; its terminal reply says `cancelled`.
    pub fn cancel(&self) {
        self.cancel.cancel()
    }

    /// A token that cancels this request, for whoever tracks it.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }
}

/// See the module documentation.
pub struct Dispatcher {
    backend: Arc<dyn Backend>,
    opts: DispatchOptions,
    started: Instant,
    counters: Mutex<Counters>,
    in_flight: InFlight<u64>,
    /// KV bytes reserved by each accepted local request, by sequence number.
    reservations: Mutex<HashMap<u64, u64>>,
    next_seq: AtomicU64,
    draining: AtomicBool,
}

impl Dispatcher {
    pub fn new(backend: Arc<dyn Backend>, opts: DispatchOptions) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            backend,
            opts,
            started: Instant::now(),
            counters: Mutex::default(),
            in_flight: InFlight::default(),
            reservations: Mutex::default(),
            next_seq: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// Accepts `req` or refuses it with the reason. Must be called on a tokio runtime.
    pub fn submit(self: &Arc<Self>, req: Request, origin: Origin) -> Result<Ticket, WireError> {
        let r = self.accept(&req, origin);
        if r.is_err() {
            self.counters.lock().unwrap().rejected += 1;
        }
        r.map_err(|e| e.with_id(&req.id))
    }

    fn accept(self: &Arc<Self>, req: &Request, origin: Origin) -> Result<Ticket, WireError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(WireError::new(
                ErrorCode::ShuttingDown,
                "bitnetd is shutting down",
            ));
        }
        if req.deadline_ms == Some(0) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "invalid deadline_ms: must be at least 1",
            ));
        }
        let prompt = match (&req.prompt, &req.messages) {
            (Some(p), _) => Prompt::Text(p.clone()),
            (None, Some(m)) => Prompt::Chat(m.clone()),
            (None, None) => return Err(WireError::new(ErrorCode::BadRequest, "no prompt")),
        };
        let params = self.params(req);
        let max_tokens = params.max_tokens;
        // Local validation also tells routing whether the prompt fits the local context.
        let local = match self.backend.prepare(&prompt, params) {
            Ok(v) => Ok(v),
            Err(EngineError::PromptTooLong { tokens, context }) => Err((tokens, context)),
            Err(e) => return Err(WireError::from(&e)),
        };
        let deadline = req
            .deadline_ms
            .map(Duration::from_millis)
            .or(self.opts.default_deadline)
            .map(|d| origin.received + d);
        let decision = self.route(req, &local, max_tokens, deadline);
        let too_long = |(tokens, context): (usize, usize)| {
            WireError::from(&EngineError::PromptTooLong { tokens, context })
        };
        match decision {
            Decision::Refuse(e) => Err(e),
            Decision::Local(reason) => {
                let mut validated = local.map_err(too_long)?;
                self.admit_local()?;
                let shortened = self.fit_deadline(req, &mut validated, deadline)?;
                let opts = JobOptions {
                    deadline,
                    start_by: origin.start_by,
                };
                self.start_local(req, &origin, validated, opts, reason, shortened)
            }
            Decision::Cloud { reason, fallback } => {
                let fallback = local
                    .ok()
                    .filter(|_| fallback)
                    .map(|validated| cloud::Fallback {
                        validated,
                        opts: JobOptions {
                            deadline,
                            start_by: origin.start_by,
                        },
                    });
                self.start_cloud(req, &origin, deadline, reason, fallback)
            }
            Decision::Defer(reason) => self.defer(req, origin, reason),
        }
    }

    /// Gathers the routing facts and asks the router.
    fn route(
        &self,
        req: &Request,
        local: &Result<ValidatedRequest, (usize, usize)>,
        max_tokens: usize,
        deadline: Option<Instant>,
    ) -> Decision {
        let cloud_state = self
            .opts
            .cloud
            .as_ref()
            .map_or(CloudState::Disabled, |c| c.link.state());
        let (threshold, fallback, score) = match &self.opts.cloud {
            Some(c) if req.route == Route::Auto && !req.private => {
                let text = match (&req.prompt, &req.messages) {
                    (Some(p), _) => p.clone(),
                    (None, Some(m)) => m
                        .iter()
                        .map(|m| m.content.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => String::new(),
                };
                let c2 = complexity::score(&text, &c.router.keywords, c.router.long_prompt_chars);
                log::debug!(id:% = req.id, score = c2.score, signals:? = c2.signals; "complexity");
                (
                    c.router.complexity_threshold,
                    c.router.fallback_to_local,
                    c2.score,
                )
            }
            Some(c) => (
                c.router.complexity_threshold,
                c.router.fallback_to_local,
                0.0,
            ),
            None => (f32::INFINITY, false, 0.0),
        };
        let speed = self.local_speed();
        let fit = match local {
            Ok(v) => LocalFit::Fits {
                prompt_tokens: v.prompt_ids().len(),
            },
            Err((prompt_tokens, context)) => LocalFit::TooLong {
                prompt_tokens: *prompt_tokens,
                context: *context,
            },
        };
        let now = Instant::now();
        router::decide(
            &RouteRequest {
                route: req.route,
                private: req.private,
                defer: req.defer,
                fit,
                max_tokens,
                deadline: deadline.map(|d| d.saturating_duration_since(now)),
                complexity: score,
            },
            &Situation {
                cloud: cloud_state,
                local_admits: self
                    .opts
                    .budget
                    .as_ref()
                    .is_none_or(|b| b.borrow().directive.admit_local),
                local_speed: speed,
                complexity_threshold: threshold,
                fallback_to_local: fallback,
            },
        )
    }

    /// The measured local speed (moving averages), once there is one.
    fn local_speed(&self) -> Option<LocalSpeed> {
        let c = self.counters.lock().unwrap();
        c.ttft_ms.zip(c.tokens_per_s).map(|(ttft, tps)| LocalSpeed {
            ttft: Duration::from_secs_f64(ttft / 1e3),
            tokens_per_s: tps,
        })
    }

    /// Applies the request's deadline to a local run: when `max_tokens` cannot be generated in time at the
    /// measured speed, shortens it to what fits (returns the new limit) or refuses with `deadline`, as the
    /// request asks.
    fn fit_deadline(
        &self,
        req: &Request,
        v: &mut ValidatedRequest,
        deadline: Option<Instant>,
    ) -> Result<Option<usize>, WireError> {
        let (Some(deadline), Some(speed)) = (deadline, self.local_speed()) else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let wanted = v.max_new_tokens();
        let needed = speed.estimate(wanted);
        if needed <= left {
            return Ok(None);
        }
        match req.on_deadline {
            OnDeadline::Refuse => Err(WireError::new(
                ErrorCode::Deadline,
                format!(
                    "{wanted} tokens need about {} ms here (first token {} ms, {:.1} tokens/s) and the deadline \
                     leaves {} ms: lower max_tokens, allow more time, or send on_deadline \"shorten\"",
                    needed.as_millis(),
                    speed.ttft.as_millis(),
                    speed.tokens_per_s,
                    left.as_millis()
                ),
            )),
            OnDeadline::Shorten => {
                let decode = left.saturating_sub(speed.ttft).as_secs_f64() * speed.tokens_per_s;
                let fits = 1 + decode.floor() as usize;
                v.shorten_to(fits);
                log::info!(id:% = req.id, max_tokens = wanted, shortened_to = v.max_new_tokens(),
                    left_ms = left.as_millis() as u64; "shortened to meet the deadline");
                Ok(Some(v.max_new_tokens()))
            }
        }
    }

    fn count_route(&self, route: &'static str, reason: Reason) {
        let mut c = self.counters.lock().unwrap();
        c.accepted += 1;
        *c.routes
            .entry(route)
            .or_default()
            .entry(reason.as_str())
            .or_default() += 1;
    }

    fn start_local(
        self: &Arc<Self>,
        req: &Request,
        origin: &Origin,
        validated: ValidatedRequest,
        opts: JobOptions,
        reason: Reason,
        shortened: Option<usize>,
    ) -> Result<Ticket, WireError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, replies) = unbounded_channel();
        let run = LocalRun {
            seq,
            id: req.id.clone(),
            stream: req.stream,
            received: origin.received,
            route_reason: reason.as_str(),
            fallback: None,
            shortened,
        };
        let pump = self.submit_local(run, validated, opts, tx)?;
        let cancel = pump.1;
        self.count_route("local", reason);
        log::info!(id:% = req.id, source = origin.source, route = "local", route_reason = reason.as_str(),
            prompt_tokens = pump.0.prompt_tokens, stream = req.stream; "request accepted");
        if let Some(p) = &req.prompt {
            log::trace!(id:% = req.id; "prompt: {p:?}");
        }
        tokio::spawn(pump.0.run(pump.2));
        Ok(Ticket { replies, cancel })
    }

    /// Reserves memory, queues the job on the engine and tracks it; the caller spawns the returned pump.
    fn submit_local(
        self: &Arc<Self>,
        run: LocalRun,
        validated: ValidatedRequest,
        opts: JobOptions,
        tx: UnboundedSender<Reply>,
    ) -> Result<(local::Pump, CancelToken, crate::engine::JobHandle), WireError> {
        let seq = run.seq;
        let prompt_tokens = validated.prompt_ids().len();
        self.reserve(seq, prompt_tokens + validated.max_new_tokens())?;
        let job = self.backend.submit(validated, opts).map_err(|e| {
            self.reservations.lock().unwrap().remove(&seq);
            WireError::from(&e)
        })?;
        let cancel = job.cancel.clone();
        self.in_flight.insert(seq, cancel.clone());
        let pump = local::Pump {
            dispatcher: self.clone(),
            seq,
            id: run.id,
            stream: run.stream,
            received: run.received,
            prompt_tokens,
            route_reason: run.route_reason,
            fallback: run.fallback.map(Cause::as_str),
            shortened: run.shortened,
            tx,
        };
        Ok((pump, cancel, job))
    }

    /// Runs a cloud request that failed early with `cause` on the local engine instead. Called from the cloud
    /// job, whose sequence number and in-flight entry (`run.seq`) it takes over.
    fn fallback(
        self: &Arc<Self>,
        run: LocalRun,
        cause: Cause,
        fb: cloud::Fallback,
        tx: UnboundedSender<Reply>,
    ) -> Result<(), WireError> {
        self.admit_local()?;
        let run = LocalRun {
            fallback: Some(cause),
            ..run
        };
        let (pump, _cancel, job) = self.submit_local(run, fb.validated, fb.opts, tx)?;
        {
            let mut c = self.counters.lock().unwrap();
            *c.fallbacks.entry(cause.as_str()).or_default() += 1;
            *c.cloud_errors.entry(cause.as_str()).or_default() += 1;
        }
        tokio::spawn(pump.run(job));
        Ok(())
    }

    fn start_cloud(
        self: &Arc<Self>,
        req: &Request,
        origin: &Origin,
        deadline: Option<Instant>,
        reason: Reason,
        fallback: Option<cloud::Fallback>,
    ) -> Result<Ticket, WireError> {
        let route = self
            .opts
            .cloud
            .as_ref()
            .expect("the router chose the cloud, so there is one");
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let cancel = CancelToken::default();
        self.in_flight.insert(seq, cancel.clone());
        self.count_route("cloud", reason);
        log::info!(id:% = req.id, source = origin.source, route = "cloud", route_reason = reason.as_str(),
            fallback = fallback.is_some(), stream = req.stream; "request accepted");
        let (tx, replies) = unbounded_channel();
        let retry = fallback.is_none();
        let job = cloud::CloudJob {
            dispatcher: self.clone(),
            client: route.client.clone(),
            seq,
            id: req.id.clone(),
            stream: req.stream,
            received: origin.received,
            route_reason: reason.as_str(),
            req: cloud_request(req, deadline, retry),
            fallback,
            cancel: cancel.clone(),
            tx,
        };
        tokio::spawn(job.run());
        Ok(Ticket { replies, cancel })
    }

    fn defer(
        self: &Arc<Self>,
        req: &Request,
        origin: Origin,
        reason: Reason,
    ) -> Result<Ticket, WireError> {
        let route = self
            .opts
            .cloud
            .as_ref()
            .expect("the router deferred, so there is a cloud");
        let r = cloud_request(req, None, true);
        let task = TaskRequest {
            messages: r.messages,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            stop: r.stop,
        };
        let stored = route
            .queue
            .push(req.id.clone(), origin.reply_to.clone(), task);
        let task = stored.map_err(|e| match e {
            QueueError::Full { .. } => {
                let mut w = WireError::new(ErrorCode::Busy, e.to_string());
                w.retry_after_ms = Some(60_000);
                w
            }
            QueueError::Duplicate => WireError::new(ErrorCode::BadRequest, e.to_string()),
            QueueError::Io { .. } => {
                log::error!("{e}");
                WireError::new(
                    ErrorCode::Internal,
                    "the deferred queue could not be written",
                )
            }
        })?;
        self.count_route("deferred", reason);
        self.counters.lock().unwrap().deferred += 1;
        log::info!(id:% = req.id, source = origin.source, route = "deferred", route_reason = reason.as_str(),
            seq = task.seq; "request deferred until the cloud is reachable");
        let (tx, replies) = unbounded_channel();
        let position = match route.queue.lookup(&req.id) {
            Lookup::Pending { position } => position,
            _ => 1,
        };
        let _ = tx.send(Reply::Deferred {
            id: req.id.clone(),
            position,
        });
        Ok(Ticket {
            replies,
            cancel: CancelToken::default(),
        })
    }

    /// The answer to `{"cmd":"result","id":...}`.
    pub fn result(&self, id: &Id) -> Reply {
        let not_found = || {
            WireError::new(
                ErrorCode::NotFound,
                "no deferred request with this id (or its result passed the retention limit)",
            )
            .with_id(id)
            .into()
        };
        let Some(route) = &self.opts.cloud else {
            return not_found();
        };
        match route.queue.lookup(id) {
            Lookup::Pending { position } => Reply::Deferred {
                id: id.clone(),
                position,
            },
            Lookup::Done(r) => r.reply.into(),
            Lookup::Unknown => not_found(),
        }
    }

    /// A cloud request ended (`cause` when it failed), without a fallback; `timing` of a fresh (not cached)
    /// answer feeds the cloud latency estimate.
    fn cloud_finished(
        &self,
        seq: u64,
        cause: Option<Cause>,
        tokens: usize,
        timing: Option<&crate::protocol::Timing>,
    ) {
        {
            let mut c = self.counters.lock().unwrap();
            match cause {
                None => {
                    c.done += 1;
                    c.tokens_out += tokens as u64;
                    if let Some(t) = timing {
                        c.cloud_ttft_ms = ewma(c.cloud_ttft_ms, t.ttft_ms);
                        if t.tokens_per_s > 0.0 {
                            c.cloud_tokens_per_s = ewma(c.cloud_tokens_per_s, t.tokens_per_s);
                        }
                    }
                }
                Some(cause) => {
                    c.failed += 1;
                    *c.cloud_errors.entry(cause.as_str()).or_default() += 1;
                }
            }
        }
        self.in_flight.remove(&seq);
    }

    /// Reserves the KV cache of a request of `tokens` (prompt + most generated) against the memory budget (the
    /// governor's, which a cgroup limit may lower), or refuses it with `over_budget`.
    fn reserve(&self, seq: u64, tokens: usize) -> Result<(), WireError> {
        let Some(kv) = self.opts.kv else {
            return Ok(());
        };
        let budget = match &self.opts.budget {
            Some(b) => b.borrow().state.memory_budget,
            None => self.opts.memory_budget,
        };
        let new = kv.per_token * tokens as u64;
        let mut reservations = self.reservations.lock().unwrap();
        let reserved: Vec<u64> = reservations.values().copied().collect();
        if let Err(needed) = kv.admits(budget, &reserved, new) {
            let mib = |b: u64| b >> 20;
            let mut e = WireError::new(
                ErrorCode::OverBudget,
                format!(
                    "{tokens} tokens need {} MiB of KV cache; with the work in flight that is {} MiB of a {} MiB \
                     memory budget: lower max_tokens or retry later",
                    mib(new).max(1),
                    mib(needed),
                    mib(budget)
                ),
            );
            // Worth retrying only if it fits once the board is idle.
            if kv.admits(budget, &[], new).is_ok() {
                e.retry_after_ms = Some(1000);
            }
            return Err(e);
        }
        reservations.insert(seq, new);
        Ok(())
    }

    /// Refuses local work while the governor says the board cannot take it (too hot, memory pressure).
    fn admit_local(&self) -> Result<(), WireError> {
        let Some(b) = &self.opts.budget else {
            return Ok(());
        };
        let b = b.borrow();
        if b.directive.admit_local {
            return Ok(());
        }
        // Hot but not short of memory: `queue` accepts the request; the paused engine holds it.
        if b.directive.local_paused
            && !b.state.memory_pressure
            && self.opts.hot_action == HotAction::Queue
        {
            return Ok(());
        }
        let why = if b.directive.local_paused {
            let t = b
                .temperature_c
                .map_or(String::new(), |t| format!(" ({t:.1} °C)"));
            format!("the board is too hot{t}: local inference is paused")
        } else {
            "the board is short of memory: no new local work for now".to_string()
        };
        let mut e = WireError::new(ErrorCode::OverBudget, why);
        e.retry_after_ms = b.directive.retry_after_ms;
        Err(e)
    }

    fn params(&self, req: &Request) -> GenerateParams {
        let d = &self.backend.model().meta.generation_defaults;
        GenerateParams {
            max_tokens: req.max_tokens.unwrap_or(self.opts.default_max_tokens),
            sampling: SamplingParams {
                temperature: req.temperature.or(d.temperature).unwrap_or(0.0),
                top_k: req.top_k.or(d.top_k).unwrap_or(0),
                top_p: req.top_p.or(d.top_p).unwrap_or(1.0),
                repetition_penalty: req
                    .repetition_penalty
                    .or(d.repetition_penalty)
                    .unwrap_or(1.0),
                seed: req.seed.unwrap_or(0),
            },
            stop: req.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
            stop_ids: vec![],
        }
    }

    /// Counts a message a source refused before it reached [`Dispatcher::submit`] (unreadable, too large, over a
    /// per-connection limit).
    pub fn record_rejected(&self) {
        self.counters.lock().unwrap().rejected += 1;
    }

    /// Requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// From now on new requests are refused with `shutting_down`; accepted ones go on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Cancels every request in flight; each still gets its terminal reply (`cancelled`).
    pub fn cancel_all(&self) {
        self.in_flight.cancel_all();
    }

    /// Resolves when no request is in flight.
    pub async fn idle(&self) {
        self.in_flight.empty().await;
    }

    /// True when every engine slot lives and none is stuck.
    pub fn engine_alive(&self) -> bool {
        self.backend.health().is_alive(self.opts.stall_limit)
    }

    /// The name of the model served.
    pub fn model_name(&self) -> &str {
        &self.backend.model().meta.name
    }

    /// A snapshot for `{"cmd":"status"}`.
    pub fn status(&self, id: Option<Id>) -> Status {
        let h = self.backend.health();
        let c = self.counters.lock().unwrap();
        Status {
            id,
            version: env!("CARGO_PKG_VERSION"),
            model: self.model_name().to_string(),
            state: if self.draining.load(Ordering::SeqCst) {
                "draining"
            } else {
                "ready"
            },
            uptime_s: self.started.elapsed().as_secs_f64(),
            engine: EngineStatus {
                alive: h.is_alive(self.opts.stall_limit),
                slots: h.slots,
                running: h.running,
                queue_depth: h.waiting,
                threads: self.backend.model().threads(),
                kernel: self.backend.model().kernel().map_or("none", |k| k.name()),
            },
            requests: RequestCounts {
                accepted: c.accepted,
                served: c.done,
                failed: c.failed,
                rejected: c.rejected,
                deferred: c.deferred,
                in_flight: self.in_flight(),
                tokens_generated: c.tokens_out,
                routes: c.routes.clone(),
                fallbacks: c.fallbacks.clone(),
            },
            tokens_per_s: c.tokens_per_s.map(|v| (v * 10.0).round() / 10.0),
            ttft_ms: c.ttft_ms.map(|v| (v * 10.0).round() / 10.0),
            memory: MemoryStatus {
                rss_bytes: crate::budget::process_rss_bytes(),
                rss_before_model_bytes: self.opts.rss_before_model,
                budget_bytes: self.opts.memory_budget,
            },
            latency: LatencyStatus {
                local: RouteLatency::rounded(c.ttft_ms, c.tokens_per_s),
                cloud: RouteLatency::rounded(c.cloud_ttft_ms, c.cloud_tokens_per_s),
            },
            budget: self.opts.budget.as_ref().map(|b| b.borrow().clone()),
            cloud: self.opts.cloud.as_ref().map(|r| CloudStatus {
                model: r.client.model().to_string(),
                link: r.link.status(),
                circuit_open: r.client.circuit_open(),
                cached_answers: r.client.cached_answers(),
                errors: c.cloud_errors.clone(),
                deferred_pending: r.queue.pending(),
                deferred_results: r.queue.results(),
            }),
        }
    }

    fn finished(&self, seq: u64, outcome: Result<&Generation, ()>) {
        {
            let mut c = self.counters.lock().unwrap();
            match outcome {
                Ok(g) => {
                    c.done += 1;
                    c.tokens_out += g.completion_tokens() as u64;
                    if g.completion_tokens() > 1 {
                        c.tokens_per_s = ewma(c.tokens_per_s, g.decode_tokens_per_second());
                    }
                    if g.completion_tokens() > 0 {
                        c.ttft_ms = ewma(c.ttft_ms, ms(g.queue_time + g.ttft));
                    }
                }
                Err(()) => c.failed += 1,
            }
        }
        self.reservations.lock().unwrap().remove(&seq);
        self.in_flight.remove(&seq);
    }
}

/// The cloud form of a request: a prompt becomes one user message.
fn cloud_request(req: &Request, deadline: Option<Instant>, retry: bool) -> CloudRequest {
    let messages = match (&req.prompt, &req.messages) {
        (_, Some(m)) => m.clone(),
        (Some(p), None) => vec![Message {
            role: "user".into(),
            content: p.clone(),
        }],
        (None, None) => vec![],
    };
    CloudRequest {
        messages,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        deadline,
        retry,
    }
}
