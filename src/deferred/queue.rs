//! The durable queue. Layout under `<state_dir>/deferred/`:
//!
//! - `tasks/<seq>.json`: an accepted task, written (temp file, fsync, rename, fsync of the directory) before
//!   it is acknowledged;
//! - `tasks/<seq>.sending`: written and fsync'd just before the task goes to the cloud; a task found with it
//!   at start has an unknown outcome and is sent again;
//! - `results/<seq>.json`: the outcome, written before the task files are removed, so a crash in between
//!   leaves a finished task that start-up cleans away rather than resends.
//!
//! Calls do small synchronous file I/O (one fsync'd file each); the dispatcher calls `push` inline so that the
//! acknowledgement follows the fsync.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

mod files;

use crate::cloud::CloudRequest;
use crate::config::DeferConfig;
use crate::engine::Message;
use crate::protocol::{Id, StoredReply};
use files::{io, list, read_json, remove, set_aside, sync_dir, write_durably};

/// What is sent to the cloud for a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// See `protocol::Request::thinking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<bool>,
    /// The answer must be a JSON object (`task: "validate"`), parsed into the result's `result`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
}

impl TaskRequest {
    /// What is kept of a cloud request: everything but its deadline and retry policy.
    pub fn from_cloud(r: CloudRequest) -> TaskRequest {
        TaskRequest {
            messages: r.messages,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            stop: r.stop,
            thinking: r.thinking,
            json: r.json,
        }
    }

    /// The cloud request that forwards it: no deadline (it may wait for the cloud), retries on.
    pub fn to_cloud(&self) -> CloudRequest {
        CloudRequest {
            messages: self.messages.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone(),
            thinking: self.thinking,
            json: self.json,
            deadline: None,
            retry: true,
        }
    }
}

/// Where a task's result goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ReplyTo {
    /// Kept for `{"cmd":"result"}`.
    Socket,
    /// Published to the request's reply address (and kept too).
    Mqtt {
        topic: String,
        /// Hex of the MQTT v5 Correlation Data.
        correlation: Option<String>,
    },
}

/// An accepted task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub seq: u64,
    pub id: Id,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub reply_to: ReplyTo,
    pub request: TaskRequest,
}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    pub seq: u64,
    pub id: Id,
    pub finished_ms: u64,
    pub reply_to: ReplyTo,
    pub reply: StoredReply,
    /// Published to its MQTT reply address.
    #[serde(default)]
    pub delivered: bool,
}

/// What `{"cmd":"result"}` finds.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Waiting (`position` tasks are ahead or equal, 1-based).
    Pending {
        position: usize,
    },
    Done(Box<StoredResult>),
    Unknown,
}

/// Why a task cannot be queued, or the queue used.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the deferred queue is full ({tasks} tasks, {bytes} bytes; limits {max_tasks} and {max_bytes})")]
    Full {
        tasks: usize,
        bytes: u64,
        max_tasks: usize,
        max_bytes: u64,
    },
    #[error("a deferred request with this id is already waiting")]
    Duplicate,
    #[error("deferred queue {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Entry {
    task: Task,
    bytes: u64,
    sending: bool,
}

#[derive(Default)]
struct Inner {
    tasks: BTreeMap<u64, Entry>,
    results: BTreeMap<u64, StoredResult>,
    /// Id (as JSON text) to the seq of its task or latest result.
    by_id: HashMap<String, u64>,
    next_seq: u64,
    bytes: u64,
}

/// What start-up found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    pub tasks: usize,
    /// Tasks that were being sent when bitnetd stopped: they will be sent again.
    pub unknown_outcome: usize,
    /// Tasks whose result was already written (removed now).
    pub finished: usize,
    pub results: usize,
    /// Files that could not be read (moved aside as `*.corrupt`).
    pub corrupt: usize,
}

/// See the module documentation.
pub struct DeferredQueue {
    tasks_dir: PathBuf,
    results_dir: PathBuf,
    cfg: DeferConfig,
    inner: Mutex<Inner>,
    /// Signalled when a task is added.
    pub added: Notify,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key of an id in the index.
fn id_key(id: &Id) -> String {
    id.to_string()
}

impl DeferredQueue {
    /// Opens (creating) the queue under `cfg.state_dir`, recovering what a previous run left.
    pub fn open(cfg: &DeferConfig) -> Result<(DeferredQueue, Recovery), QueueError> {
        let root = cfg.state_dir.join("deferred");
        let q = DeferredQueue {
            tasks_dir: root.join("tasks"),
            results_dir: root.join("results"),
            cfg: cfg.clone(),
            inner: Mutex::default(),
            added: Notify::new(),
        };
        for d in [&q.tasks_dir, &q.results_dir] {
            fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        let rec = q.recover()?;
        Ok((q, rec))
    }

    fn recover(&self) -> Result<Recovery, QueueError> {
        let mut rec = Recovery::default();
        let mut inner = self.inner.lock().unwrap();
        for (seq, path) in list(&self.results_dir)? {
            match read_json::<StoredResult>(&path) {
                Some(r) => {
                    inner.by_id.insert(id_key(&r.id), seq);
                    inner.results.insert(seq, r);
                    rec.results += 1;
                }
                None => set_aside(&path, &mut rec),
            }
            inner.next_seq = inner.next_seq.max(seq + 1);
        }
        for (seq, path) in list(&self.tasks_dir)? {
            inner.next_seq = inner.next_seq.max(seq + 1);
            let sending = self.tasks_dir.join(format!("{seq}.sending"));
            if inner.results.contains_key(&seq) {
                remove(&path);
                remove(&sending);
                rec.finished += 1;
                continue;
            }
            let Some(task) = read_json::<Task>(&path) else {
                set_aside(&path, &mut rec);
                continue;
            };
            if sending.exists() {
                rec.unknown_outcome += 1;
                remove(&sending);
            }
            let bytes = fs::metadata(&path).map_or(0, |m| m.len());
            inner.bytes += bytes;
            inner.by_id.insert(id_key(&task.id), seq);
            inner.tasks.insert(
                seq,
                Entry {
                    task,
                    bytes,
                    sending: false,
                },
            );
            rec.tasks += 1;
        }
        sync_dir(&self.tasks_dir);
        Ok(rec)
    }

    /// Stores a task durably and returns it with its sequence number. `Full` and `Duplicate` (an id still
    /// waiting) leave nothing behind.
    pub fn push(
        &self,
        id: Id,
        reply_to: ReplyTo,
        request: TaskRequest,
    ) -> Result<Task, QueueError> {
        let mut inner = self.inner.lock().unwrap();
        let key = id_key(&id);
        if let Some(seq) = inner.by_id.get(&key) {
            if inner.tasks.contains_key(seq) {
                return Err(QueueError::Duplicate);
            }
        }
        let task = Task {
            seq: inner.next_seq,
            id,
            created_ms: now_ms(),
            reply_to,
            request,
        };
        let text = serde_json::to_vec(&task).expect("a task serializes");
        let bytes = text.len() as u64;
        if inner.tasks.len() >= self.cfg.max_tasks || inner.bytes + bytes > self.cfg.max_bytes {
            return Err(QueueError::Full {
                tasks: inner.tasks.len(),
                bytes: inner.bytes,
                max_tasks: self.cfg.max_tasks,
                max_bytes: self.cfg.max_bytes,
            });
        }
        write_durably(&self.tasks_dir, &format!("{}.json", task.seq), &text)?;
        inner.next_seq += 1;
        inner.bytes += bytes;
        inner.by_id.insert(key, task.seq);
        inner.tasks.insert(
            task.seq,
            Entry {
                task: task.clone(),
                bytes,
                sending: false,
            },
        );
        drop(inner);
        self.added.notify_one();
        Ok(task)
    }

    /// The oldest task not being sent.
    pub fn next_pending(&self) -> Option<Task> {
        let inner = self.inner.lock().unwrap();
        inner
            .tasks
            .values()
            .find(|e| !e.sending)
            .map(|e| e.task.clone())
    }

    /// Records, durably, that `seq` is about to be sent.
    pub fn mark_sending(&self, seq: u64) -> Result<(), QueueError> {
        write_durably(&self.tasks_dir, &format!("{seq}.sending"), b"")?;
        if let Some(e) = self.inner.lock().unwrap().tasks.get_mut(&seq) {
            e.sending = true;
        }
        Ok(())
    }

    /// The send failed in a way that shows the cloud did not process it: the task waits again.
    pub fn unmark_sending(&self, seq: u64) {
        remove(&self.tasks_dir.join(format!("{seq}.sending")));
        sync_dir(&self.tasks_dir);
        if let Some(e) = self.inner.lock().unwrap().tasks.get_mut(&seq) {
            e.sending = false;
        }
    }

    /// Stores the outcome of `task`, then removes the task. Returns the stored result.
    pub fn complete(&self, task: &Task, reply: StoredReply) -> Result<StoredResult, QueueError> {
        let result = StoredResult {
            seq: task.seq,
            id: task.id.clone(),
            finished_ms: now_ms(),
            reply_to: task.reply_to.clone(),
            reply,
            delivered: false,
        };
        self.store_result(&result)?;
        remove(&self.tasks_dir.join(format!("{}.json", task.seq)));
        remove(&self.tasks_dir.join(format!("{}.sending", task.seq)));
        sync_dir(&self.tasks_dir);
        let mut inner = self.inner.lock().unwrap();
        if let Some(e) = inner.tasks.remove(&task.seq) {
            inner.bytes -= e.bytes;
        }
        let key = id_key(&task.id);
        if let Some(old) = inner.by_id.insert(key, task.seq) {
            if old != task.seq && inner.results.remove(&old).is_some() {
                remove(&self.results_dir.join(format!("{old}.json")));
            }
        }
        inner.results.insert(task.seq, result.clone());
        drop(inner);
        self.prune(SystemTime::now());
        Ok(result)
    }

    fn store_result(&self, r: &StoredResult) -> Result<(), QueueError> {
        let text = serde_json::to_vec(r).expect("a result serializes");
        write_durably(&self.results_dir, &format!("{}.json", r.seq), &text)
    }

    /// Records that `seq`'s result was published.
    pub fn mark_delivered(&self, seq: u64) -> Result<(), QueueError> {
        let r = {
            let mut inner = self.inner.lock().unwrap();
            let Some(r) = inner.results.get_mut(&seq) else {
                return Ok(());
            };
            r.delivered = true;
            r.clone()
        };
        self.store_result(&r)
    }

    /// MQTT results not yet published (after a restart, or while the broker was away).
    pub fn undelivered(&self) -> Vec<StoredResult> {
        let inner = self.inner.lock().unwrap();
        inner
            .results
            .values()
            .filter(|r| !r.delivered && matches!(r.reply_to, ReplyTo::Mqtt { .. }))
            .cloned()
            .collect()
    }

    /// Where the request with `id` stands.
    pub fn lookup(&self, id: &Id) -> Lookup {
        let inner = self.inner.lock().unwrap();
        let Some(seq) = inner.by_id.get(&id_key(id)) else {
            return Lookup::Unknown;
        };
        if inner.tasks.contains_key(seq) {
            let position = inner.tasks.range(..=seq).count();
            return Lookup::Pending { position };
        }
        match inner.results.get(seq) {
            Some(r) => Lookup::Done(Box::new(r.clone())),
            None => Lookup::Unknown,
        }
    }

    /// Tasks older than `max_age` (they end with `expired`), oldest first.
    pub fn expired(&self, now: SystemTime) -> Vec<Task> {
        let cutoff = cutoff_ms(now, self.cfg.max_age);
        let inner = self.inner.lock().unwrap();
        inner
            .tasks
            .values()
            .filter(|e| !e.sending && e.task.created_ms < cutoff)
            .map(|e| e.task.clone())
            .collect()
    }

    /// Drops results past the retention time, and the oldest beyond `max_results`.
    pub fn prune(&self, now: SystemTime) {
        let cutoff = cutoff_ms(now, self.cfg.result_retention);
        let mut inner = self.inner.lock().unwrap();
        let mut drop_seqs: Vec<u64> = inner
            .results
            .values()
            .filter(|r| r.finished_ms < cutoff)
            .map(|r| r.seq)
            .collect();
        let over = inner.results.len().saturating_sub(drop_seqs.len());
        let excess = over.saturating_sub(self.cfg.max_results);
        drop_seqs.extend(
            inner
                .results
                .keys()
                .filter(|s| !drop_seqs.contains(s))
                .take(excess)
                .copied()
                .collect::<Vec<_>>(),
        );
        for seq in drop_seqs {
            if let Some(r) = inner.results.remove(&seq) {
                let key = id_key(&r.id);
                if inner.by_id.get(&key) == Some(&seq) {
                    inner.by_id.remove(&key);
                }
                remove(&self.results_dir.join(format!("{seq}.json")));
            }
        }
    }

    /// Tasks waiting (or being sent).
    pub fn pending(&self) -> usize {
        self.inner.lock().unwrap().tasks.len()
    }

    /// Results kept.
    pub fn results(&self) -> usize {
        self.inner.lock().unwrap().results.len()
    }
}

fn cutoff_ms(now: SystemTime, age: Duration) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.saturating_sub(age).as_millis() as u64)
}

#[cfg(test)]
mod tests;
