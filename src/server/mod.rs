//! The Unix socket API (`docs/protocol.md`): the listening socket, the accept loop with its connection slots
//! ([`slots`]), and one task per connection.

mod connection;
pub mod lines;
pub mod listener;
pub mod slots;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatcher;
use crate::errors::Refusal;
use crate::protocol::{Reply, WireError};
use slots::{Peer, Slot, SlotRefusal, Slots};

pub use connection::ConnectionLimits;
pub use listener::Listener;
pub use slots::SlotLimits;

/// Why the socket server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {}: {message}", path.display())]
    Socket { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(String),
}

/// Accepts connections until `shutdown`, then stops accepting (dropping `listener` removes a socket file
/// bitnetd created). Connection tasks run on `tracker`; they finish answering what they accepted. Room is
/// checked before accepting ([`Slots`]), so clients beyond every slot wait in the listen backlog.
pub async fn serve(
    listener: Listener,
    dispatcher: Arc<Dispatcher>,
    limits: ConnectionLimits,
    slot_limits: SlotLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let shared = Arc::new(Shared {
        slots: Mutex::new(Slots::new(slot_limits)),
        freed: Notify::new(),
    });
    let mut said_full = false;
    loop {
        if !shared
            .wait_for_room(&shutdown, &mut said_full, slot_limits)
            .await
        {
            break;
        }
        let stream = tokio::select! {
            r = listener.socket.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    log::error!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let peer = peer_of(&stream);
        let taken = shared.slots.lock().unwrap().take(peer);
        let slot = match taken {
            Ok(slot) => slot,
            Err(SlotRefusal::PerProcess { limit }) => {
                log::warn!(uid = peer.uid, pid:? = peer.pid, limit;
                    "socket connection refused: the process holds its share of connections");
                let e = WireError::from(Refusal::ProcessLimit { limit });
                dispatcher.record_rejected("socket", e.code);
                tracker.spawn(refuse(stream, e));
                continue;
            }
        };
        if slot == Slot::StatusOnly {
            log::warn!(uid = peer.uid, pid:? = peer.pid, connections = slot_limits.connections;
                "every socket connection is taken: this one answers status only");
        }
        let guard = SlotGuard {
            shared: shared.clone(),
            peer,
            slot,
        };
        let (d, s) = (dispatcher.clone(), shutdown.clone());
        log::debug!(uid = peer.uid, pid:? = peer.pid, slot:? = slot; "socket connection opened");
        tracker.spawn(async move {
            connection::serve(stream, d, limits, slot, s).await;
            drop(guard);
            log::debug!(uid = peer.uid, pid:? = peer.pid; "socket connection closed");
        });
    }
    drop(listener);
}

/// The accept loop's slots, and a wake-up when one frees.
struct Shared {
    slots: Mutex<Slots>,
    freed: Notify,
}

impl Shared {
    /// Waits until a connection would get a slot; false on shutdown. Logs once each time every slot fills.
    async fn wait_for_room(
        &self,
        shutdown: &CancellationToken,
        said_full: &mut bool,
        limits: SlotLimits,
    ) -> bool {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release between the check and the wait is not missed.
            freed.as_mut().enable();
            if self.slots.lock().unwrap().has_room() {
                *said_full = false;
                return true;
            }
            if !*said_full {
                log::warn!(connections = limits.connections, status_connections = limits.status_connections;
                    "every socket connection is taken: new clients wait until one closes");
                *said_full = true;
            }
            tokio::select! {
                _ = freed => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }
}

/// Gives a connection's slot back when its task ends, however it ends.
struct SlotGuard {
    shared: Arc<Shared>,
    peer: Peer,
    slot: Slot,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut slots = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slots.release(self.peer, self.slot);
        self.shared.freed.notify_waiters();
    }
}

/// The client process of `stream`; an unknown one counts as uid `u32::MAX`.
fn peer_of(stream: &UnixStream) -> Peer {
    match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            pid: c.pid(),
        },
        Err(_) => Peer {
            uid: u32::MAX,
            pid: None,
        },
    }
}

/// Writes `error` as the connection's only line and closes it.
async fn refuse(mut stream: UnixStream, error: WireError) {
    let line = Reply::from(error).to_line();
    let write = async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}
