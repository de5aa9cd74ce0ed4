//! The request handling every source shares (the Unix socket, MQTT, and any later one): a message read by the
//! source becomes a refusal, an answer to a control message (`status`, `result`, `cancel`), or an accepted
//! request whose replies are forwarded until exactly one terminal reply. The per-client limit and the set of
//! requests in flight live here; a source keeps only its transport and addressing, behind [`Replies`].

use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::dispatch::{Dispatcher, Origin, Routed, Ticket};
use crate::errors::{Refusal, Scope};
use crate::inflight::InFlight;
use crate::protocol::{Command, Id, Incoming, Reply, WireError};

/// Where the replies to one message go: a source's transport and addressing.
pub trait Replies: Send + Sync + 'static {
    /// How the source tells its requests apart (a socket: the id on the connection; MQTT: the reply address
    /// and id).
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of the request with `id` answered here.
    fn key(&self, id: &Id) -> Self::Key;

    /// Sends the reply to a control message, or a refusal. It may wait for the transport, never for the
    /// source's own reading loop.
    fn answer(&self, reply: Reply) -> impl Future<Output = ()> + Send;

    /// Sends one reply of an accepted request; false when the requester is gone (the request is cancelled).
    fn forward(&self, reply: Reply) -> impl Future<Output = bool> + Send;

    /// Told once a request is accepted, before its first reply: where it was sent. Sources whose transport
    /// shows it up front (HTTP headers) use it; the default ignores it.
    fn accepted(&self, _routed: Routed) {}
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A control message, answered.
    Answered,
    /// A request, accepted: its replies are being forwarded.
    Accepted,
    /// Refused with an error reply (unreadable, over a limit, or refused by the dispatcher).
    Refused,
    /// A cancel message (it has no reply; unknown ids are ignored).
    Cancelled,
}

/// See the module documentation. One per socket connection; one for all of MQTT.
pub struct Handler<K> {
    dispatcher: Arc<Dispatcher>,
    in_flight: Arc<InFlight<K>>,
    limit: usize,
    scope: Scope,
    forwards: TaskTracker,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Handler<K> {
    /// A handler whose clients may have `limit` requests in flight together (`scope` names the limit in its
    /// error message).
    pub fn new(dispatcher: Arc<Dispatcher>, limit: usize, scope: Scope) -> Handler<K> {
        Handler {
            dispatcher,
            in_flight: Arc::default(),
            limit,
            scope,
            forwards: TaskTracker::new(),
        }
    }

    /// Handles one message, read by the source at `origin` (or refused while reading), answering through
    /// `to`. Must be called on a tokio runtime.
    pub async fn handle<R: Replies<Key = K>>(
        &self,
        message: Result<Incoming, WireError>,
        origin: Origin,
        to: R,
    ) -> Handled {
        let incoming = match message {
            Ok(i) => i,
            Err(e) => return self.refuse(e, origin.source, &to).await,
        };
        match incoming {
            Incoming::Command {
                id,
                cmd: Command::Status,
            } => {
                let status = self.dispatcher.status(id);
                to.answer(Reply::Status(Box::new(status))).await;
                Handled::Answered
            }
            Incoming::Command {
                id: Some(id),
                cmd: Command::Result,
            } => {
                to.answer(self.dispatcher.result(&id)).await;
                Handled::Answered
            }
            Incoming::Command {
                id: None,
                cmd: Command::Result,
            } => {
                self.refuse(Refusal::ResultNeedsId.into(), origin.source, &to)
                    .await
            }
            Incoming::Cancel { id } => {
                self.in_flight.cancel(&to.key(&id));
                Handled::Cancelled
            }
            Incoming::Request(req) => {
                // Only the source's reading loop adds to this set, so the checks still hold at the insert.
                let key = to.key(&req.id);
                let refusal = if self.in_flight.contains(&key) {
                    Some(Refusal::DuplicateId)
                } else if self.in_flight.len() >= self.limit {
                    Some(Refusal::ClientLimit {
                        limit: self.limit,
                        scope: self.scope,
                    })
                } else {
                    None
                };
                if let Some(r) = refusal {
                    let e = WireError::from(r).with_id(&req.id);
                    return self.refuse(e, origin.source, &to).await;
                }
                let id = req.id.clone();
                match self.dispatcher.submit(*req, origin) {
                    Err(e) => {
                        to.answer(e.into()).await;
                        Handled::Refused
                    }
                    Ok(ticket) => {
                        to.accepted(ticket.routed);
                        self.in_flight.insert(key.clone(), ticket.cancel_token());
                        let in_flight = self.in_flight.clone();
                        self.forwards.spawn(forward(ticket, id, key, in_flight, to));
                        Handled::Accepted
                    }
                }
            }
        }
    }

    async fn refuse<R: Replies>(&self, e: WireError, source: &str, to: &R) -> Handled {
        self.dispatcher.record_rejected(source, e.code);
        to.answer(e.into()).await;
        Handled::Refused
    }

    /// True while the request with `key` is in flight here.
    pub fn is_in_flight(&self, key: &K) -> bool {
        self.in_flight.contains(key)
    }

    /// Requests accepted here and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Resolves once no request accepted here is in flight.
    pub async fn idle(&self) {
        self.in_flight.empty().await
    }

    /// Cancels the request with `key` if it is in flight here (it still gets its terminal reply).
    pub fn cancel(&self, key: &K) {
        self.in_flight.cancel(key)
    }

    /// Cancels every request accepted here; each still gets its terminal reply.
    pub fn cancel_all(&self) {
        self.in_flight.cancel_all()
    }

    /// Resolves once every accepted request's terminal reply has been handed to its source's transport. Call
    /// when no more messages will be handled.
    pub async fn finished(&self) {
        self.forwards.close();
        self.forwards.wait().await
    }
}

/// Forwards one request's replies until its terminal one.
async fn forward<R: Replies>(
    mut ticket: Ticket,
    id: Id,
    key: R::Key,
    in_flight: Arc<InFlight<R::Key>>,
    to: R,
) {
    while let Some(reply) = ticket.replies.recv().await {
        let terminal = reply.is_terminal();
        if terminal {
            // The key is free before the client can see the answer, so that it may reuse the id at once.
            in_flight.remove(&key);
        }
        if !to.forward(reply).await {
            ticket.cancel();
        }
        if terminal {
            return;
        }
    }
    // The dispatcher guarantees a terminal reply; should its channel still end without one, the client gets
    // an error rather than silence.
    in_flight.remove(&key);
    log::error!(id:% = id; "a request's replies ended without a terminal reply");
    to.forward(WireError::from(Refusal::Unanswered).with_id(&id).into())
        .await;
}

#[cfg(test)]
mod tests;
