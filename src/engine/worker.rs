//! The engine threads: inference runs on dedicated OS threads ("slots"), never on an async runtime. Jobs arrive
//! through one bounded queue; a full queue is a typed [`EngineError::Busy`], not a wait.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::session::{Observer, Session};
use super::{
    EngineError, FinishReason, GenerateParams, Generation, Model, Prompt, TokenEvent,
    ValidatedRequest,
};
use crate::meta::GenerationDefaults;

/// What a job streams back: tokens, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum JobEvent {
    Token(TokenEvent),
    Done(Generation),
    Error(EngineError),
}

/// Cancels a job; generation stops before the next forward pass.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A submitted job: its event stream and its cancel token. Dropping the receiver also cancels it.
pub struct JobHandle {
    pub events: UnboundedReceiver<JobEvent>,
    pub cancel: CancelToken,
}

/// Per-job limits set by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobOptions {
    /// A job still queued at its deadline fails with [`EngineError::DeadlineExceeded`]; a running one stops with
    /// [`FinishReason::Budget`].
    pub deadline: Option<Instant>,
    /// A job still queued at this time fails with [`EngineError::Expired`] (MQTT message expiry).
    pub start_by: Option<Instant>,
}

/// How the engine is laid out.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Inference threads, each with its own session (KV cache); requests run concurrently up to this number.
    pub slots: usize,
    /// Jobs that may wait for a free slot; one more is [`EngineError::Busy`].
    pub queue: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { slots: 1, queue: 8 }
    }
}

/// A snapshot of the engine's liveness and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineHealth {
    pub slots: usize,
    /// Slot threads still running (less than `slots` only after a thread died).
    pub slots_alive: usize,
    /// Slots running a job.
    pub running: usize,
    /// Jobs waiting for a slot.
    pub waiting: usize,
    /// The longest time a running slot has gone without progress (a forward pass or a token).
    pub longest_stall: Duration,
}

impl EngineHealth {
    /// True when every slot thread lives and none has been stuck for `stall_limit` or longer.
    pub fn is_alive(&self, stall_limit: Duration) -> bool {
        self.slots_alive == self.slots && self.longest_stall < stall_limit
    }
}

/// What serves validated requests. The daemon talks to inference only through this trait, and the only way to
/// make a [`ValidatedRequest`] is [`Backend::prepare`]. [`Engine`] is the real one; the dispatcher's tests use a
/// fake.
pub trait Backend: Send + Sync + 'static {
    /// The model's name, as replies and `status` report it.
    fn name(&self) -> &str;
    /// The model's sampling defaults, for what a request leaves unset.
    fn generation_defaults(&self) -> &GenerationDefaults;
    /// Inference threads per forward pass.
    fn threads(&self) -> usize;
    /// The kernel running the packed ternary products (`none` for int8 exports).
    fn kernel(&self) -> &'static str;
    /// Validates a request against the model (see [`Model::prepare`]).
    fn prepare(
        &self,
        prompt: &Prompt,
        params: GenerateParams,
    ) -> Result<ValidatedRequest, EngineError>;
    /// Queues a request that `cancel` stops (the caller keeps a clone; the returned handle carries one too);
    /// [`EngineError::Busy`] at once when the queue is full. The job's events end with exactly one `Done` or
    /// `Error`, unless its slot thread dies.
    fn submit(
        &self,
        req: ValidatedRequest,
        opts: JobOptions,
        cancel: CancelToken,
    ) -> Result<JobHandle, EngineError>;
    /// Liveness and load.
    fn health(&self) -> EngineHealth;
}

struct Job {
    req: ValidatedRequest,
    opts: JobOptions,
    events: UnboundedSender<JobEvent>,
    cancel: CancelToken,
    queued_at: Instant,
}

/// Progress marks of one slot, in milliseconds since the engine started (0 = idle).
#[derive(Default)]
struct SlotState {
    last_progress: AtomicU64,
}

struct Shared {
    epoch: Instant,
    queue: Mutex<Receiver<Job>>,
    waiting: AtomicUsize,
    slots: Vec<SlotState>,
    /// Local inference is paused (the board is too hot): jobs wait before starting and between steps.
    paused: AtomicBool,
    /// Running generations stop after this many tokens (`usize::MAX`: no cap).
    token_cap: AtomicUsize,
    /// Idle slots release their KV cache.
    free_idle: AtomicBool,
}

/// How often a paused job, or an idle slot, looks again.
const TICK: Duration = Duration::from_millis(50);

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// A handle to the engine threads. Cloning shares them; dropping every handle stops them after the queued jobs.
#[derive(Clone)]
pub struct Engine {
    model: Arc<Model>,
    queue: SyncSender<Job>,
    capacity: usize,
    shared: Arc<Shared>,
    threads: Arc<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Starts `opts.slots` engine threads behind a queue of `opts.queue` waiting jobs.
    pub fn spawn(model: Arc<Model>, opts: EngineOptions) -> Result<Engine, EngineError> {
        if opts.slots == 0 {
            return Err(EngineError::InvalidParam {
                name: "slots",
                message: "at least one slot".into(),
            });
        }
        let (queue, rx) = sync_channel::<Job>(opts.queue);
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            queue: Mutex::new(rx),
            waiting: AtomicUsize::new(0),
            slots: (0..opts.slots).map(|_| SlotState::default()).collect(),
            paused: AtomicBool::new(false),
            token_cap: AtomicUsize::new(usize::MAX),
            free_idle: AtomicBool::new(false),
        });
        let mut threads = Vec::with_capacity(opts.slots);
        for slot in 0..opts.slots {
            let (m, sh) = (model.clone(), shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("bitnetd-engine-{slot}"))
                .spawn(move || slot_loop(m, sh, slot))
                .map_err(|e| EngineError::Inference(format!("spawning an engine thread: {e}")))?;
            threads.push(t);
        }
        Ok(Engine {
            model,
            queue,
            capacity: opts.queue,
            shared,
            threads: Arc::new(threads),
        })
    }
}

impl Engine {
    /// Pauses local inference (queued jobs wait; running ones stop between forward passes, their deadlines
    /// still counting) or resumes it.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    /// Caps running and future generations at `cap` tokens (`finish_reason: "budget"`); `None` lifts it.
    pub fn set_token_cap(&self, cap: Option<usize>) {
        self.shared
            .token_cap
            .store(cap.unwrap_or(usize::MAX), Ordering::SeqCst);
    }

    /// While true, a slot frees its KV cache as soon as it is idle.
    pub fn set_free_idle(&self, free: bool) {
        self.shared.free_idle.store(free, Ordering::SeqCst);
    }
}

impl Backend for Engine {
    fn name(&self) -> &str {
        &self.model.meta.name
    }

    fn generation_defaults(&self) -> &GenerationDefaults {
        &self.model.meta.generation_defaults
    }

    fn threads(&self) -> usize {
        self.model.threads()
    }

    fn kernel(&self) -> &'static str {
        self.model.kernel().map_or("none", |k| k.name())
    }

    fn prepare(
        &self,
        prompt: &Prompt,
        params: GenerateParams,
    ) -> Result<ValidatedRequest, EngineError> {
        self.model.prepare(prompt, params)
    }

    fn submit(
        &self,
        req: ValidatedRequest,
        opts: JobOptions,
        cancel: CancelToken,
    ) -> Result<JobHandle, EngineError> {
        let (tx, events) = unbounded_channel();
        // Counted before sending so that a slot taking the job at once never sees the counter below zero.
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            req,
            opts,
            events: tx,
            cancel: cancel.clone(),
            queued_at: Instant::now(),
        };
        match self.queue.try_send(job) {
            Ok(()) => Ok(JobHandle { events, cancel }),
            Err(e) => {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => EngineError::Busy {
                        capacity: self.capacity,
                    },
                    TrySendError::Disconnected(_) => EngineError::ShutDown,
                })
            }
        }
    }

    fn health(&self) -> EngineHealth {
        let now = self.shared.now_ms();
        let marks: Vec<u64> = self
            .shared
            .slots
            .iter()
            .map(|s| s.last_progress.load(Ordering::Relaxed))
            .filter(|&m| m != 0)
            .collect();
        let stall = marks.iter().map(|&m| now.saturating_sub(m)).max();
        EngineHealth {
            slots: self.threads.len(),
            slots_alive: self.threads.iter().filter(|t| !t.is_finished()).count(),
            running: marks.len(),
            waiting: self.shared.waiting.load(Ordering::SeqCst),
            longest_stall: Duration::from_millis(stall.unwrap_or(0)),
        }
    }
}

fn slot_loop(model: Arc<Model>, shared: Arc<Shared>, slot: usize) {
    let next = |session: Option<&mut Session>| {
        let mut session = session;
        loop {
            let r = shared.queue.lock().ok()?.recv_timeout(TICK * 4);
            match r {
                Ok(job) => {
                    shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Some(job);
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(s) = session.as_deref_mut() {
                        free_if_asked(&shared, s);
                    }
                }
            }
        }
    };
    let mut session = match model.session() {
        Ok(s) => s,
        Err(e) => {
            while let Some(job) = next(None) {
                let _ = job.events.send(JobEvent::Error(e.clone()));
            }
            return;
        }
    };
    let state = &shared.slots[slot];
    while let Some(job) = next(Some(&mut session)) {
        wait_while_paused(&shared, &job);
        let queue_time = job.queued_at.elapsed();
        let result = if job.cancel.is_cancelled() {
            Ok(Generation::ended_before_start(
                &job.req,
                FinishReason::Cancelled,
            ))
        } else if job.opts.start_by.is_some_and(|d| Instant::now() >= d) {
            Err(EngineError::Expired { waited: queue_time })
        } else if job.opts.deadline.is_some_and(|d| Instant::now() >= d) {
            Err(EngineError::DeadlineExceeded { waited: queue_time })
        } else {
            state
                .last_progress
                .store(shared.now_ms(), Ordering::Relaxed);
            let mut watch = JobObserver {
                job: &job,
                progress: &state.last_progress,
                shared: &shared,
                generated: 0,
            };
            let r = session.generate(&job.req, &mut watch);
            state.last_progress.store(0, Ordering::Relaxed);
            r
        };
        free_if_asked(&shared, &mut session);
        let _ = job.events.send(match result {
            Ok(mut g) => {
                g.queue_time = queue_time;
                JobEvent::Done(g)
            }
            Err(e) => JobEvent::Error(e),
        });
    }
}

/// Releases the session's KV cache when the governor asks for it (memory pressure).
fn free_if_asked(shared: &Shared, session: &mut Session) {
    if shared.free_idle.load(Ordering::SeqCst) && !session.is_empty() {
        match session.reset() {
            Ok(()) => log::debug!("idle KV cache freed (memory pressure)"),
            Err(e) => log::warn!("freeing an idle KV cache: {e}"),
        }
    }
}

/// Holds a job that has not started while local inference is paused, until it resumes or the job is
/// cancelled, expired or past its deadline (the caller then handles those as usual).
fn wait_while_paused(shared: &Shared, job: &Job) {
    while shared.paused.load(Ordering::SeqCst)
        && !job.cancel.is_cancelled()
        && !job.events.is_closed()
        && job.opts.start_by.is_none_or(|d| Instant::now() < d)
        && job.opts.deadline.is_none_or(|d| Instant::now() < d)
    {
        std::thread::sleep(TICK);
    }
}

/// Streams a job's tokens, marks progress for the watchdog, waits while inference is paused, and stops on
/// cancel, a gone receiver, the deadline, or the governor's token cap.
struct JobObserver<'a> {
    job: &'a Job,
    progress: &'a AtomicU64,
    shared: &'a Shared,
    generated: usize,
}

impl JobObserver<'_> {
    fn limits(&self) -> ControlFlow<FinishReason> {
        loop {
            // A paused job counts as progressing: the pause is deliberate, not a stuck engine.
            self.progress.store(self.shared.now_ms(), Ordering::Relaxed);
            if self.job.cancel.is_cancelled() || self.job.events.is_closed() {
                return ControlFlow::Break(FinishReason::Cancelled);
            }
            if self.job.opts.deadline.is_some_and(|d| Instant::now() >= d) {
                return ControlFlow::Break(FinishReason::Budget);
            }
            if !self.shared.paused.load(Ordering::SeqCst) {
                return ControlFlow::Continue(());
            }
            std::thread::sleep(TICK);
        }
    }
}

impl Observer for JobObserver<'_> {
    fn check(&mut self) -> ControlFlow<FinishReason> {
        if self.generated >= self.shared.token_cap.load(Ordering::SeqCst) {
            return ControlFlow::Break(FinishReason::Budget);
        }
        self.limits()
    }

    fn token(&mut self, t: &TokenEvent) -> ControlFlow<FinishReason> {
        self.limits()?;
        self.generated += 1;
        if self.job.events.send(JobEvent::Token(t.clone())).is_err() {
            return ControlFlow::Break(FinishReason::Cancelled);
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(slots_alive: usize, stall_ms: u64) -> EngineHealth {
        EngineHealth {
            slots: 2,
            slots_alive,
            running: 1,
            waiting: 0,
            longest_stall: Duration::from_millis(stall_ms),
        }
    }

    #[test]
    fn the_engine_is_alive_only_with_every_slot_running_and_none_stuck() {
        let limit = Duration::from_secs(120);
        assert!(health(2, 0).is_alive(limit));
        assert!(health(2, 119_999).is_alive(limit));
        assert!(!health(2, 120_000).is_alive(limit), "a stuck slot");
        assert!(!health(1, 0).is_alive(limit), "a dead slot thread");
    }
}
