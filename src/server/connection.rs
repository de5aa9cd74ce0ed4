//! One client connection: reads request lines, hands them to the dispatcher, and writes every reply as one
//! line. Several requests may be in flight, told apart by `id`. Bad input gets an `error` line and the
//! connection stays usable. After the client's end of stream the connection answers what is in flight and then
//! closes; when the client is gone entirely (hang-up, failed write) its requests are cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, Origin, Ticket};
use crate::inflight::InFlight;
use crate::protocol::{self, ErrorCode, Id, Incoming, Reply, WireError};

use super::lines::{Line, LineReader};

/// Replies buffered per connection before request pumps wait for the writer.
const WRITE_QUEUE: usize = 256;

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_line_bytes: usize,
    pub max_requests: usize,
}

/// A request's key on its connection: its id as JSON text (so `"7"` and `7` differ).
fn key(id: &Id) -> String {
    id.to_string()
}

/// How often a half-closed connection is checked for the client having gone entirely.
const HANGUP_POLL: Duration = Duration::from_millis(20);

/// Serves `stream` until the client leaves, or until `shutdown` and every accepted request is answered.
pub async fn serve(
    stream: UnixStream,
    dispatcher: Arc<Dispatcher>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let (rd, mut wr) = stream.into_split();
    let (out, mut out_rx) = mpsc::channel::<Reply>(WRITE_QUEUE);
    let gone = CancellationToken::new();
    let writer = {
        let gone = gone.clone();
        tokio::spawn(async move {
            while let Some(reply) = out_rx.recv().await {
                if wr.write_all(&reply.to_line()).await.is_err() {
                    gone.cancel();
                    break;
                }
            }
            let _ = wr.shutdown().await;
        })
    };
    let in_flight = Arc::new(InFlight::<String>::default());
    let mut reader = LineReader::new(rd, limits.max_line_bytes);
    // Reading: until end of stream, the client going away, or shutdown with nothing left in flight.
    let mut reading = true;
    while reading {
        tokio::select! {
            line = reader.next() => match line {
                Ok(Some(line)) => handle(line, &dispatcher, &in_flight, &out, limits).await,
                Ok(None) | Err(_) => reading = false,
            },
            _ = gone.cancelled() => break,
            _ = in_flight.empty(), if shutdown.is_cancelled() => break,
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
    // End of stream may be a half-close (the client still reads its answers) or a full close: answer what is in
    // flight unless the client has hung up entirely or a write fails.
    if !reading {
        tokio::select! {
            _ = in_flight.empty() => {}
            _ = hung_up(reader.get_ref()) => {}
            _ = gone.cancelled() => {}
        }
    }
    in_flight.cancel_all();
    // Wait for the pumps to deliver the terminal replies of cancelled requests, then let the writer finish.
    in_flight.empty().await;
    drop(out);
    let _ = writer.await;
}

/// Resolves once the peer has closed its end completely (not just its writing side).
async fn hung_up(rd: &OwnedReadHalf) {
    loop {
        match rd.ready(Interest::WRITABLE).await {
            Ok(r) if !r.is_write_closed() => tokio::time::sleep(HANGUP_POLL).await,
            _ => return,
        }
    }
}

async fn handle(
    line: Line,
    dispatcher: &Arc<Dispatcher>,
    in_flight: &Arc<InFlight<String>>,
    out: &mpsc::Sender<Reply>,
    limits: ConnectionLimits,
) {
    let received = Instant::now();
    let reply = |e: WireError| async move {
        dispatcher.record_rejected();
        let _ = out.send(e.into()).await;
    };
    let text = match line {
        Line::Text(t) if t.trim().is_empty() => return,
        Line::Text(t) => t,
        Line::TooLong => {
            let msg = format!("line longer than {} bytes", limits.max_line_bytes);
            return reply(WireError::new(ErrorCode::TooLarge, msg)).await;
        }
        Line::NotUtf8 => {
            return reply(WireError::new(ErrorCode::BadRequest, "line is not UTF-8")).await
        }
    };
    match protocol::parse(text.as_bytes()) {
        Err(e) => reply(e).await,
        Ok(Incoming::Command {
            id,
            cmd: protocol::Command::Status,
        }) => {
            let _ = out
                .send(Reply::Status(Box::new(dispatcher.status(id))))
                .await;
        }
        Ok(Incoming::Command {
            id,
            cmd: protocol::Command::Result,
        }) => match id {
            Some(id) => {
                let _ = out.send(dispatcher.result(&id)).await;
            }
            None => {
                reply(WireError::new(
                    ErrorCode::BadRequest,
                    "`{\"cmd\":\"result\"}` needs the `id` of the deferred request",
                ))
                .await
            }
        },
        Ok(Incoming::Cancel { id }) => in_flight.cancel(&key(&id)),
        Ok(Incoming::Request(req)) => {
            // Only this task adds to this connection's set, so the checks below still hold at the insert.
            let k = key(&req.id);
            let refuse = {
                if in_flight.contains(&k) {
                    Some(WireError::new(
                        ErrorCode::BadRequest,
                        "a request with this id is in flight",
                    ))
                } else if in_flight.len() >= limits.max_requests {
                    let mut e = WireError::new(
                        ErrorCode::Busy,
                        format!(
                            "at most {} requests in flight per connection",
                            limits.max_requests
                        ),
                    );
                    e.retry_after_ms = Some(1000);
                    Some(e)
                } else {
                    None
                }
            };
            if let Some(e) = refuse {
                return reply(e.with_id(&req.id)).await;
            }
            let id = req.id.clone();
            match dispatcher.submit(
                *req,
                Origin {
                    received,
                    ..Origin::now("socket")
                },
            ) {
                Err(e) => {
                    let _ = out.send(e.into()).await;
                }
                Ok(ticket) => {
                    in_flight.insert(k, ticket.cancel_token());
                    tokio::spawn(forward(ticket, id, in_flight.clone(), out.clone()));
                }
            }
        }
    }
}

/// Copies one request's replies to the connection's writer.
async fn forward(
    mut ticket: Ticket,
    id: Id,
    in_flight: Arc<InFlight<String>>,
    out: mpsc::Sender<Reply>,
) {
    while let Some(reply) = ticket.replies.recv().await {
        let terminal = reply.is_terminal();
        if terminal {
            // Free the id before the client can see the answer, so that it may reuse the id at once. The
            // writer outlives this task (it ends when every sender, this one included, is dropped), so the
            // terminal reply is still written.
            in_flight.remove(&key(&id));
        }
        if out.send(reply).await.is_err() {
            ticket.cancel();
        }
        if terminal {
            return;
        }
    }
    in_flight.remove(&key(&id));
}
