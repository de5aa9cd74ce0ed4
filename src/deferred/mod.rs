//! Store-and-forward: cloud requests kept on disk while the cloud is offline, and forwarded when it is back.
//!
//! - [`queue`]: the durable queue and the results (fsync'd files, crash-safe, bounded).
//! - [`forwarder`]: the task that sends queued requests when the cloud is online, and delivers the answers.
//!
//! The guarantee (also in docs/cloud.md): a task acknowledged with `{"type":"deferred"}` is on disk. It is
//! sent to the cloud once; only if bitnetd dies (SIGKILL, power loss) while a send is in flight, so that the
//! outcome is unknown, is it sent again after the restart. Its result is kept for `{"cmd":"result"}` until
//! the retention limit, and an MQTT request's result is published to its reply address (again after a
//! restart if bitnetd died before recording the publication: consumers match by correlation data or id).

pub mod forwarder;
pub mod queue;

pub use forwarder::{Deliver, Forwarder};
pub use queue::{DeferredQueue, Lookup, QueueError, ReplyTo, StoredResult, Task, TaskRequest};
