//! The dispatcher: every source hands it parsed requests (through [`crate::handler`]). It validates them
//! through the [`Backend`], asks [`router::decide`] where they run, and starts them: on the board (after
//! [`crate::admission`]), in the cloud (with a fallback to the board), or in the deferred queue. Each accepted
//! request gets its replies on a [`Ticket`], ending in exactly one terminal reply, which a [`ledger`] guard
//! guarantees even if the task running it panics. It also keeps the counters `status` reports and drains on
//! shutdown.
//!
//! Files: `route.rs` (the routing facts), `local.rs` and `cloud.rs` (the two ways to run), `ledger.rs` (books
//! and the completion guard), `report.rs` (`status`).

mod cloud;
#[cfg(test)]
pub(crate) mod fake;
mod ledger;
mod local;
mod report;
mod route;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::watch;

pub use cloud::CloudRoute;

use crate::budget::KvModel;
use crate::cloud::CloudRequest;
use crate::config::HotAction;
use crate::deferred::{Lookup, QueueError, ReplyTo, TaskRequest};
use crate::engine::{
    Backend, CancelToken, EngineError, GenerateParams, JobOptions, Message, Prompt, SamplingParams,
    ValidatedRequest,
};
use crate::errors::Refusal;
use crate::governor::Budget;
use crate::metrics::{Metrics, RequestOrigin};
use crate::protocol::{ErrorCode, Id, Reply, Request, WireError};
use crate::router::{Decision, Reason};
use crate::tasks::{self, Shaped};
use ledger::Ledger;
use local::{LocalRun, LocalRunner};

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

/// An accepted request: its replies (tokens, then exactly one `done`, `error` or `deferred`) and a way to
/// cancel it. Dropping the receiver cancels the request too.
pub struct Ticket {
    pub replies: UnboundedReceiver<Reply>,
    /// Where the request was sent: `local`, `cloud` or `deferred`, and the router's reason. (Where it ran is
    /// in its `done`: a cloud request that fails may run locally instead.)
    pub routed: Routed,
    cancel: CancelToken,
}

/// See [`Ticket::routed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub route: &'static str,
    pub reason: &'static str,
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
    local: Arc<LocalRunner>,
    ledger: Arc<Ledger>,
    opts: DispatchOptions,
    started: Instant,
    draining: AtomicBool,
}

impl Dispatcher {
    pub fn new(backend: Arc<dyn Backend>, opts: DispatchOptions) -> Arc<Dispatcher> {
        let ledger = Arc::new(Ledger::default());
        let local = Arc::new(LocalRunner {
            backend,
            ledger: ledger.clone(),
            kv: opts.kv,
            budget: opts.budget.clone(),
            memory_budget: opts.memory_budget,
            hot_action: opts.hot_action,
        });
        Arc::new(Dispatcher {
            local,
            ledger,
            opts,
            started: Instant::now(),
            draining: AtomicBool::new(false),
        })
    }

    /// Accepts `req` or refuses it with the reason (counted as rejected). Must be called on a tokio runtime.
    pub fn submit(&self, req: Request, origin: Origin) -> Result<Ticket, WireError> {
        let source = origin.source;
        let r = self.accept(&req, origin);
        if let Err(e) = &r {
            self.ledger.rejected(source, e.code);
        }
        r.map_err(|e| e.with_id(&req.id))
    }

    fn accept(&self, req: &Request, origin: Origin) -> Result<Ticket, WireError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown.into());
        }
        if req.deadline_ms == Some(0) {
            return Err(Refusal::InvalidDeadline.into());
        }
        // The same prompt runs on the board and in the cloud: context and task templates applied.
        let shaped = tasks::shape(req);
        let params = self.params(req, shaped.temperature);
        let max_tokens = params.max_tokens;
        // Local validation also tells routing whether the prompt fits the local context.
        let local = match self.local.backend.prepare(&shaped.prompt, params) {
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
        let run = |reason: Reason| LocalRun {
            stream: req.stream,
            received: origin.received,
            route_reason: reason.as_str(),
            fallback: None,
            on_deadline: req.on_deadline,
            validate: shaped.json,
            opts: JobOptions {
                deadline,
                start_by: origin.start_by,
            },
        };
        match decision {
            Decision::Refuse(r) => Err(WireError::from(&r)),
            Decision::Local(reason) => {
                let validated = local.map_err(|(tokens, context)| {
                    WireError::from(&EngineError::PromptTooLong { tokens, context })
                })?;
                self.start_local(req, &origin, validated, run(reason), reason)
            }
            Decision::Cloud { reason, fallback } => {
                let fallback = local.ok().filter(|_| fallback);
                let cloud = cloud_request(req, &shaped, deadline, fallback.is_none());
                self.start_cloud(req, cloud, &origin, run(reason), reason, fallback)
            }
            Decision::Defer(reason) => {
                self.defer(req, cloud_request(req, &shaped, None, true), origin, reason)
            }
        }
    }

    fn start_local(
        &self,
        req: &Request,
        origin: &Origin,
        validated: ValidatedRequest,
        run: LocalRun,
        reason: Reason,
    ) -> Result<Ticket, WireError> {
        let seq = self.ledger.next_seq();
        let cancel = CancelToken::default();
        let queued = self.local.queue(seq, &run, validated, &cancel)?;
        let (tx, replies) = unbounded_channel();
        let labels = RequestOrigin {
            source: origin.source,
            route: "local",
            reason: reason.as_str(),
        };
        let completion = self
            .ledger
            .open(seq, req.id.clone(), labels, tx, cancel.clone());
        log::info!(id:% = req.id, source = origin.source, route = "local", route_reason = reason.as_str(),
            prompt_tokens = queued.prompt_tokens(), stream = req.stream; "request accepted");
        if let Some(p) = &req.prompt {
            log::trace!(id:% = req.id; "prompt: {p:?}");
        }
        self.local.spawn(run, queued, completion);
        Ok(Ticket {
            replies,
            routed: labels.routed(),
            cancel,
        })
    }

    fn start_cloud(
        &self,
        req: &Request,
        cloud: CloudRequest,
        origin: &Origin,
        run: LocalRun,
        reason: Reason,
        fallback: Option<ValidatedRequest>,
    ) -> Result<Ticket, WireError> {
        let route = self
            .opts
            .cloud
            .as_ref()
            .expect("the router chose the cloud, so there is one");
        let seq = self.ledger.next_seq();
        let cancel = CancelToken::default();
        let (tx, replies) = unbounded_channel();
        let labels = RequestOrigin {
            source: origin.source,
            route: "cloud",
            reason: reason.as_str(),
        };
        let completion = self
            .ledger
            .open(seq, req.id.clone(), labels, tx, cancel.clone());
        log::info!(id:% = req.id, source = origin.source, route = "cloud", route_reason = reason.as_str(),
            fallback = fallback.is_some(), stream = req.stream; "request accepted");
        let job = cloud::CloudJob {
            client: route.client.clone(),
            req: cloud,
            run,
            fallback: fallback.map(|v| (self.local.clone(), v)),
            cancel: cancel.clone(),
            completion,
        };
        tokio::spawn(job.run());
        Ok(Ticket {
            replies,
            routed: labels.routed(),
            cancel,
        })
    }

    fn defer(
        &self,
        req: &Request,
        r: CloudRequest,
        origin: Origin,
        reason: Reason,
    ) -> Result<Ticket, WireError> {
        let route = self
            .opts
            .cloud
            .as_ref()
            .expect("the router deferred, so there is a cloud");
        let task = TaskRequest::from_cloud(r);
        let stored = route.queue.push(req.id.clone(), origin.reply_to, task);
        let task = stored.map_err(|e| {
            if let QueueError::Io { .. } = e {
                log::error!("{e}");
            }
            WireError::from(&e)
        })?;
        self.ledger
            .accepted(origin.source, "deferred", reason.as_str());
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
            routed: Routed {
                route: "deferred",
                reason: reason.as_str(),
            },
            cancel: CancelToken::default(),
        })
    }

    /// The answer to `{"cmd":"result","id":...}`.
    pub fn result(&self, id: &Id) -> Reply {
        let lookup = self.opts.cloud.as_ref().map(|c| c.queue.lookup(id));
        match lookup {
            Some(Lookup::Pending { position }) => Reply::Deferred {
                id: id.clone(),
                position,
            },
            Some(Lookup::Done(r)) => r.reply.into(),
            Some(Lookup::Unknown) | None => {
                WireError::from(Refusal::NotDeferred).with_id(id).into()
            }
        }
    }

    /// The local generation parameters of `req`; `temperature` is the request's or its task's.
    fn params(&self, req: &Request, temperature: Option<f32>) -> GenerateParams {
        let d = self.local.backend.generation_defaults();
        GenerateParams {
            max_tokens: req.max_tokens.unwrap_or(self.opts.default_max_tokens),
            sampling: SamplingParams {
                temperature: temperature.or(d.temperature).unwrap_or(0.0),
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

    /// Counts a message `source` refused with `code` before it reached [`Dispatcher::submit`] (unreadable, too
    /// large, over a per-client limit).
    pub fn record_rejected(&self, source: &str, code: ErrorCode) {
        self.ledger.rejected(source, code);
    }

    /// The request counters and histograms, for `/metrics` (render them with [`Dispatcher::status`]).
    pub fn metrics(&self) -> &Metrics {
        self.ledger.metrics()
    }

    /// Requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.ledger.in_flight().len()
    }

    /// From now on new requests are refused with `shutting_down`; accepted ones go on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Cancels every request in flight; each still gets its terminal reply (`cancelled`).
    pub fn cancel_all(&self) {
        self.ledger.in_flight().cancel_all();
    }

    /// Resolves when no request is in flight.
    pub async fn idle(&self) {
        self.ledger.in_flight().empty().await;
    }

    /// True when every engine slot lives and none is stuck.
    pub fn engine_alive(&self) -> bool {
        self.local.backend.health().is_alive(self.opts.stall_limit)
    }

    /// The name of the model served.
    pub fn model_name(&self) -> &str {
        self.local.backend.name()
    }

    /// The cloud model requests are sent to, when the cloud route is on.
    pub fn cloud_model(&self) -> Option<String> {
        self.opts
            .cloud
            .as_ref()
            .map(|c| c.client.model().to_string())
    }

    /// True once [`Dispatcher::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// The cloud form of a request, as shaped: a text prompt becomes one user message.
fn cloud_request(
    req: &Request,
    shaped: &Shaped,
    deadline: Option<Instant>,
    retry: bool,
) -> CloudRequest {
    let messages = match &shaped.prompt {
        Prompt::Chat(m) => m.clone(),
        Prompt::Text(p) => vec![Message {
            role: "user".into(),
            content: p.clone(),
        }],
        // Requests carry text or messages; token ids come only from the library.
        Prompt::Ids(_) => vec![],
    };
    CloudRequest {
        messages,
        max_tokens: req.max_tokens,
        temperature: shaped.temperature,
        top_p: req.top_p,
        stop: req.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        thinking: req.thinking,
        json: shaped.json,
        deadline,
        retry,
    }
}
