//! The forwarder: while the cloud is online, sends the oldest waiting task, stores its outcome, and hands
//! MQTT results to the MQTT service for publication. Offline, it waits for the connectivity monitor.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::queue::{DeferredQueue, StoredResult, Task};
use crate::cloud::{Cause, KimiClient};
use crate::errors::Refusal;
use crate::protocol::{ErrorReply, StoredReply, Timing, WireError};
use crate::router::CloudState;

/// Pause after a forward failed for a reason that may pass (the link still looked online).
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Results for the MQTT service to publish, in order of completion.
pub type Deliver = UnboundedReceiver<StoredResult>;

/// See the module documentation.
pub struct Forwarder {
    queue: Arc<DeferredQueue>,
    client: Arc<KimiClient>,
    link: watch::Receiver<CloudState>,
    deliver: UnboundedSender<StoredResult>,
}

impl Forwarder {
    /// A forwarder, and the receiving end of its MQTT deliveries. MQTT results left undelivered by an
    /// earlier run are queued on it first.
    pub fn new(
        queue: Arc<DeferredQueue>,
        client: Arc<KimiClient>,
        link: watch::Receiver<CloudState>,
    ) -> (Forwarder, Deliver) {
        let (tx, rx) = unbounded_channel();
        for r in queue.undelivered() {
            let _ = tx.send(r);
        }
        (
            Forwarder {
                queue,
                client,
                link,
                deliver: tx,
            },
            rx,
        )
    }

    /// Runs until `stop`. A task being sent when `stop` comes is abandoned mid-flight (its `.sending` mark
    /// stays, so it is sent again after the restart).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            self.expire();
            if *self.link.borrow() != CloudState::Online {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.link.changed() => if r.is_err() { return },
                    // Expiry goes on while offline.
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                continue;
            }
            let Some(task) = self.queue.next_pending() else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.queue.added.notified() => {}
                    _ = self.link.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                continue;
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                again = self.forward(&task) => if again {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                },
            }
        }
    }

    /// Sends one task. Returns true when it must wait and be tried again.
    async fn forward(&self, task: &Task) -> bool {
        if let Err(e) = self.queue.mark_sending(task.seq) {
            log::error!(seq = task.seq; "{e}");
            return true;
        }
        let started = Instant::now();
        let req = task.request.to_cloud();
        // Nobody streams a deferred answer; the channel only satisfies the client's interface.
        let (tx, _rx) = unbounded_channel();
        let reply = match self.client.chat(&req, &tx).await {
            Ok(a) => {
                let total = started.elapsed();
                let usage = a.usage.unwrap_or_default();
                let ttft = a.ttft.unwrap_or(total);
                let timing = Timing::measured(ttft, total, usage.completion_tokens);
                match a.into_done(task.id.clone(), "deferred", timing, req.json) {
                    Ok(mut done) => {
                        done.deferred = true;
                        StoredReply::Done(done)
                    }
                    Err(e) => StoredReply::Error(WireError::from(&e).with_id(&task.id).into()),
                }
            }
            // Not processed, or worth another go once the cloud is back: keep the task.
            Err(f) if f.error.cause.retryable() || f.error.cause == Cause::CircuitOpen => {
                log::warn!(seq = task.seq, cause = f.error.cause.as_str(); "deferred task not forwarded yet: {}", f.error.message);
                self.queue.unmark_sending(task.seq);
                return true;
            }
            Err(f) => StoredReply::Error(WireError::from(&f.error).with_id(&task.id).into()),
        };
        self.finish(task, reply);
        false
    }

    fn finish(&self, task: &Task, reply: StoredReply) {
        let ok = matches!(reply, StoredReply::Done(_));
        match self.queue.complete(task, reply) {
            Ok(r) => {
                log::info!(seq = task.seq, id:% = task.id, ok; "deferred task finished");
                if matches!(r.reply_to, super::ReplyTo::Mqtt { .. }) {
                    let _ = self.deliver.send(r);
                }
            }
            Err(e) => log::error!(seq = task.seq; "storing a deferred result: {e}"),
        }
    }

    fn expire(&self) {
        for task in self.queue.expired(SystemTime::now()) {
            let e = ErrorReply::from(WireError::from(Refusal::DeferredExpired).with_id(&task.id));
            self.finish(&task, StoredReply::Error(e));
        }
    }
}
