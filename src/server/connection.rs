//! One client connection: reads request lines, hands them to the dispatcher, and writes every reply as one
//! line. Several requests may be in flight, told apart by `id`. Bad input gets an `error` line and the
//! connection stays usable. After the client's end of stream the connection answers what is in flight and then
//! closes; when the client is gone entirely (hang-up, failed write) its requests are cancelled. A connection
//! with nothing in flight that stays silent for `[socket] idle_timeout_secs` gets an `idle_timeout` error line
//! and is closed; a status-only one ([`Slot::StatusOnly`]) answers control messages and refuses requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, Origin};
use crate::errors::{Refusal, Scope};
use crate::handler::{Handler, Replies};
use crate::protocol::{self, Id, Reply, WireError};

use super::lines::{Line, LineReader};
use super::slots::Slot;

/// Replies buffered per connection before request pumps wait for the writer.
const WRITE_QUEUE: usize = 256;

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_line_bytes: usize,
    pub max_requests: usize,
    /// A connection with nothing in flight that sends nothing for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// The connection's writer queue, as the handler's [`Replies`]: a request's key is its id as JSON text (so
/// `"7"` and `7` differ).
#[derive(Clone)]
struct Writer(mpsc::Sender<Reply>);

impl Replies for Writer {
    type Key = String;

    fn key(&self, id: &Id) -> String {
        id.to_string()
    }

    async fn answer(&self, reply: Reply) {
        let _ = self.0.send(reply).await;
    }

    async fn forward(&self, reply: Reply) -> bool {
        self.0.send(reply).await.is_ok()
    }
}

/// How often a half-closed connection is checked for the client having gone entirely.
const HANGUP_POLL: Duration = Duration::from_millis(20);

/// Serves `stream` until the client leaves, or until `shutdown` and every accepted request is answered.
pub async fn serve(
    stream: UnixStream,
    dispatcher: Arc<Dispatcher>,
    limits: ConnectionLimits,
    slot: Slot,
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
    let handler = match slot {
        Slot::Full => Handler::<String>::new(dispatcher, limits.max_requests, Scope::Connection),
        Slot::StatusOnly => Handler::new(dispatcher, 0, Scope::StatusOnly),
    };
    let mut idle_at = limits.idle_timeout.map(|d| Instant::now() + d);
    let mut reader = LineReader::new(rd, limits.max_line_bytes);
    // Reading: until end of stream, the client going away, or shutdown with nothing left in flight.
    let mut reading = true;
    while reading {
        tokio::select! {
            line = reader.next() => match line {
                Ok(Some(line)) => {
                    idle_at = limits.idle_timeout.map(|d| Instant::now() + d);
                    if let Some(message) = read(line, limits) {
                        let origin = Origin::now("socket");
                        handler.handle(message, origin, Writer(out.clone())).await;
                    }
                }
                Ok(None) | Err(_) => reading = false,
            },
            _ = gone.cancelled() => break,
            _ = sleep_until(idle_at) => {
                let idle = limits.idle_timeout.unwrap_or_default();
                if handler.in_flight() > 0 {
                    idle_at = Some(Instant::now() + idle);
                } else {
                    log::info!(idle_s = idle.as_secs(); "socket connection idle: closed");
                    let e = WireError::from(Refusal::IdleTimeout { secs: idle.as_secs() });
                    Writer(out.clone()).answer(e.into()).await;
                    break;
                }
            }
            _ = handler.idle(), if shutdown.is_cancelled() => break,
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
    // End of stream may be a half-close (the client still reads its answers) or a full close: answer what is in
    // flight unless the client has hung up entirely or a write fails.
    if !reading {
        tokio::select! {
            _ = handler.idle() => {}
            _ = hung_up(reader.get_ref()) => {}
            _ = gone.cancelled() => {}
        }
    }
    handler.cancel_all();
    // Wait for the terminal replies of cancelled requests to reach the writer, then let it finish.
    handler.finished().await;
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

/// One line as a message for the handler; `None` for a blank line.
fn read(line: Line, limits: ConnectionLimits) -> Option<Result<protocol::Incoming, WireError>> {
    match line {
        Line::Text(t) if t.trim().is_empty() => None,
        Line::Text(t) => Some(protocol::parse(t.as_bytes()).map_err(WireError::from)),
        Line::TooLong => Some(Err(Refusal::LineTooLong {
            limit: limits.max_line_bytes,
        }
        .into())),
        Line::NotUtf8 => Some(Err(Refusal::NotUtf8.into())),
    }
}

/// Resolves at `at`; never when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
