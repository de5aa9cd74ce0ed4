//! The Unix socket API (`docs/protocol.md`): the listening socket, the accept loop, and one task per
//! connection.

mod connection;
pub mod lines;
mod listener;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatcher;

pub use connection::ConnectionLimits;
pub use listener::Listener;

/// Why the socket server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {}: {message}", path.display())]
    Socket { path: PathBuf, message: String },
    #[error("socket activation: {0}")]
    Activation(String),
}

/// Accepts connections until `shutdown`, then stops accepting (dropping `listener` removes a socket file
/// bitnetd created). Connection tasks run on `tracker`; they finish answering what they accepted.
pub async fn serve(
    listener: Listener,
    dispatcher: Arc<Dispatcher>,
    limits: ConnectionLimits,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        // The permit is taken before accepting, so excess clients wait in the listen backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
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
        let (d, s) = (dispatcher.clone(), shutdown.clone());
        tracker.spawn(async move {
            connection::serve(stream, d, limits, s).await;
            drop(permit);
        });
    }
    drop(listener);
}
