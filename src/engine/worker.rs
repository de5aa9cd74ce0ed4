//! The engine thread: inference runs on a dedicated OS thread, never on an async runtime. Jobs arrive through a
//! bounded queue; a full queue is a typed [`EngineError::Busy`], not a wait.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::{EngineError, Generation, Model, TokenEvent, ValidatedRequest};

/// What a job streams back: tokens, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum JobEvent {
    Token(TokenEvent),
    Done(Generation),
    Error(EngineError),
}

/// Cancels a job; generation stops before the next token.
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

struct Job {
    req: ValidatedRequest,
    events: UnboundedSender<JobEvent>,
    cancel: CancelToken,
}

/// A handle to the engine thread. Cloning shares the thread; dropping every handle stops it after the
/// queued jobs.
#[derive(Clone)]
pub struct Engine {
    model: Arc<Model>,
    queue: SyncSender<Job>,
    capacity: usize,
    thread: Arc<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread with room for `capacity` waiting jobs.
    pub fn spawn(model: Arc<Model>, capacity: usize) -> Result<Engine, EngineError> {
        let (queue, rx) = sync_channel::<Job>(capacity);
        let m = model.clone();
        let thread = std::thread::Builder::new()
            .name("bitnetd-engine".into())
            .spawn(move || {
                let mut session = match m.session() {
                    Ok(s) => s,
                    Err(e) => {
                        for job in rx {
                            let _ = job.events.send(JobEvent::Error(e.clone()));
                        }
                        return;
                    }
                };
                for job in rx {
                    let events = job.events.clone();
                    let mut on_token = |t: &TokenEvent| {
                        if job.cancel.is_cancelled()
                            || events.send(JobEvent::Token(t.clone())).is_err()
                        {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    };
                    let result = if job.cancel.is_cancelled() {
                        Ok(Generation::cancelled_before_start(&job.req))
                    } else {
                        session.generate(&job.req, &mut on_token)
                    };
                    let _ = job.events.send(match result {
                        Ok(g) => JobEvent::Done(g),
                        Err(e) => JobEvent::Error(e),
                    });
                }
            })
            .map_err(|e| EngineError::Inference(format!("spawning the engine thread: {e}")))?;
        Ok(Engine {
            model,
            queue,
            capacity,
            thread: Arc::new(Some(thread)),
        })
    }

    /// The model this engine runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues a validated request. Fails at once with [`EngineError::Busy`] when the queue is full.
    pub fn submit(&self, req: ValidatedRequest) -> Result<JobHandle, EngineError> {
        let (tx, events) = unbounded_channel();
        let cancel = CancelToken::default();
        match self.queue.try_send(Job {
            req,
            events: tx,
            cancel: cancel.clone(),
        }) {
            Ok(()) => Ok(JobHandle { events, cancel }),
            Err(TrySendError::Full(_)) => Err(EngineError::Busy {
                capacity: self.capacity,
            }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShutDown),
        }
    }

    /// True while the engine thread runs.
    pub fn is_running(&self) -> bool {
        self.thread
            .as_ref()
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}
