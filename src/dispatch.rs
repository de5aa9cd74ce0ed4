//! The dispatcher: every source (Unix socket, MQTT) hands it parsed requests. It applies the router's decision,
//! validates through the [`Backend`], queues, and turns engine events into [`Reply`]s, exactly one terminal
//! reply per accepted request. It also keeps the counters that `status` reports and drains on shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

use crate::budget::KvModel;
use crate::engine::{
    Backend, CancelToken, GenerateParams, Generation, JobEvent, JobHandle, JobOptions, Prompt,
    SamplingParams,
};
use crate::governor::Budget;
use crate::inflight::InFlight;
use crate::protocol::{Done, ErrorCode, Id, Reply, Request, Served, Timing, Usage, WireError};
use crate::router::{self, CloudState, Decision, RouteRequest};

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
}

/// Where and when a request came in.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The source, for logs: `socket`, `mqtt`.
    pub source: &'static str,
    /// When the message arrived; `deadline_ms` counts from here.
    pub received: Instant,
    /// Not started by then, it is not run (MQTT Message Expiry).
    pub start_by: Option<Instant>,
}

impl Origin {
    /// A request from `source` that arrived now.
    pub fn now(source: &'static str) -> Origin {
        Origin {
            source,
            received: Instant::now(),
            start_by: None,
        }
    }
}

/// An accepted request: its replies (tokens, then exactly one `done` or `error`) and a way to cancel it.
/// Dropping the receiver cancels the request too.
pub struct Ticket {
    pub replies: UnboundedReceiver<Reply>,
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

#[derive(Debug, Default)]
struct Counters {
    accepted: u64,
    done: u64,
    failed: u64,
    rejected: u64,
    tokens_out: u64,
    /// Moving averages over recent local requests.
    tokens_per_s: Option<f64>,
    ttft_ms: Option<f64>,
}

/// Weight of the newest request in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| o + EWMA_ALPHA * (new - o)))
}

/// What `{"cmd":"status"}` returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    pub version: &'static str,
    pub model: String,
    /// `ready` or `draining`.
    pub state: &'static str,
    pub uptime_s: f64,
    pub engine: EngineStatus,
    pub requests: RequestCounts,
    /// Moving average of local decode speed (absent before the first request).
    pub tokens_per_s: Option<f64>,
    /// Moving average of local time to first token, queue included.
    pub ttft_ms: Option<f64>,
    pub memory: MemoryStatus,
    /// The governor's view (absent when ungoverned).
    pub budget: Option<Budget>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineStatus {
    pub alive: bool,
    pub slots: usize,
    pub running: usize,
    /// Requests waiting for a slot.
    pub queue_depth: usize,
    pub threads: usize,
    /// The kernel running the packed ternary products (`none` for int8 exports).
    pub kernel: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestCounts {
    /// Accepted (each gets exactly one terminal reply).
    pub accepted: u64,
    /// Ended with `done`.
    pub served: u64,
    /// Accepted, then ended with `error`.
    pub failed: u64,
    /// Refused before acceptance (bad input, busy, ...).
    pub rejected: u64,
    pub in_flight: usize,
    pub tokens_generated: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryStatus {
    pub rss_bytes: Option<u64>,
    /// Resident size just before the model was loaded: the daemon's own baseline.
    pub rss_before_model_bytes: Option<u64>,
    pub budget_bytes: u64,
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
        let received = origin.received;
        if self.draining.load(Ordering::SeqCst) {
            return Err(WireError::new(
                ErrorCode::ShuttingDown,
                "bitnetd is shutting down",
            ));
        }
        let route = RouteRequest {
            route: req.route,
            private: req.private,
            defer: req.defer,
        };
        match router::decide(route, CloudState::Disabled) {
            Decision::Local => {}
            Decision::Refuse(e) => return Err(e),
            Decision::Cloud | Decision::Defer => {
                return Err(WireError::new(
                    ErrorCode::Internal,
                    "no cloud client in this build",
                ))
            }
        }
        self.admit_local()?;
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
        let backend = &self.backend;
        let validated = backend
            .prepare(&prompt, params)
            .map_err(|e| WireError::from(&e))?;
        let deadline = req
            .deadline_ms
            .map(Duration::from_millis)
            .or(self.opts.default_deadline)
            .map(|d| received + d);
        let prompt_tokens = validated.prompt_ids().len();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.reserve(seq, prompt_tokens + validated.max_new_tokens())?;
        let job = backend
            .submit(
                validated,
                JobOptions {
                    deadline,
                    start_by: origin.start_by,
                },
            )
            .map_err(|e| {
                self.reservations.lock().unwrap().remove(&seq);
                WireError::from(&e)
            })?;
        let cancel = job.cancel.clone();
        self.in_flight.insert(seq, cancel.clone());
        self.counters.lock().unwrap().accepted += 1;
        log::info!(id:% = req.id, source = origin.source, route = "local", prompt_tokens, stream = req.stream;
            "request accepted");
        if let Some(p) = &req.prompt {
            log::trace!(id:% = req.id; "prompt: {p:?}");
        }
        let (tx, replies) = unbounded_channel();
        let pump = Pump {
            dispatcher: self.clone(),
            seq,
            id: req.id.clone(),
            stream: req.stream,
            received,
            prompt_tokens,
            tx,
        };
        tokio::spawn(pump.run(job));
        Ok(Ticket { replies, cancel })
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
                in_flight: self.in_flight(),
                tokens_generated: c.tokens_out,
            },
            tokens_per_s: c.tokens_per_s.map(|v| (v * 10.0).round() / 10.0),
            ttft_ms: c.ttft_ms.map(|v| (v * 10.0).round() / 10.0),
            memory: MemoryStatus {
                rss_bytes: crate::budget::process_rss_bytes(),
                rss_before_model_bytes: self.opts.rss_before_model,
                budget_bytes: self.opts.memory_budget,
            },
            budget: self.opts.budget.as_ref().map(|b| b.borrow().clone()),
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

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Moves one job's engine events to its replies.
struct Pump {
    dispatcher: Arc<Dispatcher>,
    seq: u64,
    id: Id,
    stream: bool,
    received: Instant,
    prompt_tokens: usize,
    tx: UnboundedSender<Reply>,
}

impl Pump {
    async fn run(self, mut job: JobHandle) {
        let submitted = Instant::now();
        while let Some(ev) = job.events.recv().await {
            match ev {
                JobEvent::Token(t) => {
                    if self.stream && !t.text.is_empty() {
                        self.send(
                            Reply::Token {
                                id: self.id.clone(),
                                text: t.text,
                            },
                            &job,
                        );
                    }
                }
                JobEvent::Done(g) => {
                    self.done(&g, submitted, &job);
                    self.dispatcher.finished(self.seq, Ok(&g));
                    return;
                }
                JobEvent::Error(e) => {
                    log::warn!(id:% = self.id, code:? = WireError::from(&e).code; "request failed: {e}");
                    self.send(WireError::from(&e).with_id(&self.id).into(), &job);
                    self.dispatcher.finished(self.seq, Err(()));
                    return;
                }
            }
        }
        // The engine dropped the job without a terminal event: only if its thread died.
        self.send(
            WireError::new(ErrorCode::Internal, "the engine stopped")
                .with_id(&self.id)
                .into(),
            &job,
        );
        self.dispatcher.finished(self.seq, Err(()));
    }

    fn send(&self, reply: Reply, job: &JobHandle) {
        if self.tx.send(reply).is_err() {
            job.cancel.cancel();
        }
    }

    fn done(&self, g: &Generation, submitted: Instant, job: &JobHandle) {
        if self.stream && !g.trailing_text.is_empty() {
            self.send(
                Reply::Token {
                    id: self.id.clone(),
                    text: g.trailing_text.clone(),
                },
                job,
            );
        }
        let queue = (submitted - self.received) + g.queue_time;
        let timing = Timing {
            queue_ms: ms(queue),
            ttft_ms: ms(queue + g.ttft),
            total_ms: ms(queue + g.total),
            tokens_per_s: (g.decode_tokens_per_second() * 10.0).round() / 10.0,
        };
        log::info!(
            id:% = self.id, route = "local", finish_reason:? = g.finish_reason,
            prompt_tokens = self.prompt_tokens, completion_tokens = g.completion_tokens(),
            queue_ms = timing.queue_ms, ttft_ms = timing.ttft_ms, total_ms = timing.total_ms;
            "request done"
        );
        log::trace!(id:% = self.id; "answer: {:?}", g.text);
        self.send(
            Reply::Done(Done {
                id: self.id.clone(),
                text: (!self.stream).then(|| g.text.clone()),
                route: Served::Local,
                model: self.dispatcher.model_name().to_string(),
                finish_reason: g.finish_reason,
                usage: Usage {
                    prompt_tokens: g.prompt_tokens,
                    completion_tokens: g.completion_tokens(),
                },
                timing,
            }),
            job,
        );
    }
}
