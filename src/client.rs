//! Small blocking clients of the socket API, behind `bitnetd ask`, `bitnetd result` and `bitnetd status`. They
//! send typed requests and read typed replies ([`crate::protocol`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use crate::engine::Message;
use crate::protocol::{Done, ErrorCode, ErrorReply, Id, OnDeadline, Reply, Request, Route, Status};

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {}: {source} (is bitnetd running? see --socket)", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to bitnetd: {0}")]
    Io(#[from] std::io::Error),
    #[error("bitnetd closed the connection before answering")]
    Closed,
    #[error("unexpected reply from bitnetd: {0}")]
    Protocol(String),
    /// bitnetd answered with an error reply.
    #[error("{}: {message}", code.as_str())]
    Remote {
        code: ErrorCode,
        message: String,
        /// When retrying may succeed, a hint of how long to wait.
        retry_after_ms: Option<u64>,
    },
}

/// What `ask` sends.
#[derive(Debug, Clone)]
pub struct Ask {
    pub text: String,
    /// Send `text` as a plain prompt instead of a user chat message.
    pub raw: bool,
    pub route: Route,
    pub private: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub deadline_ms: Option<u64>,
    /// May be kept and forwarded to the cloud later (then `ask` returns the `deferred` reply).
    pub defer: bool,
    /// The request id; default `ask-<pid>`. Give one to fetch a deferred result later.
    pub id: Option<String>,
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })
}

/// How a request ended, as the clients report it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Done(Box<Done>),
    /// Stored for the cloud; `bitnetd result <id>` fetches it later.
    Deferred {
        id: Id,
        position: usize,
    },
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Reply {
        match a {
            Answer::Done(d) => Reply::Done(*d),
            Answer::Deferred { id, position } => Reply::Deferred { id, position },
        }
    }
}

/// The request `ask` sends.
fn request(ask: &Ask, id: &str) -> Request {
    let (prompt, messages) = if ask.raw {
        (Some(ask.text.clone()), None)
    } else {
        let m = Message {
            role: "user".into(),
            content: ask.text.clone(),
        };
        (None, Some(vec![m]))
    };
    Request {
        id: Id::from(id),
        prompt,
        messages,
        max_tokens: ask.max_tokens,
        temperature: ask.temperature,
        top_p: None,
        top_k: None,
        repetition_penalty: None,
        seed: None,
        stop: None,
        stream: true,
        route: ask.route,
        private: ask.private,
        deadline_ms: ask.deadline_ms,
        defer: ask.defer,
        on_deadline: OnDeadline::default(),
        context: None,
        task: None,
        hypothesis: None,
        evidence: None,
        thinking: None,
    }
}

/// Sends `ask` and writes the answer to `out` as it streams. Returns how it ended: `done`, or `deferred`.
pub fn ask(socket: &Path, ask: &Ask, out: &mut dyn Write) -> Result<Answer, ClientError> {
    let id = ask
        .id
        .clone()
        .unwrap_or_else(|| format!("ask-{}", std::process::id()));
    let stream = connect(socket)?;
    let mut lines = send(&stream, &request(ask, &id))?;
    let want = Id::from(id);
    loop {
        let r = next_reply(&mut lines)?;
        if reply_id(&r).is_some_and(|i| *i != want) {
            continue;
        }
        match r {
            Reply::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            // A thinking model's reasoning is not part of the answer.
            Reply::Reasoning { .. } => {}
            r => return answer(r),
        }
    }
}

/// Fetches the result of deferred request `id`: its `done`, or its `deferred` reply while it waits.
pub fn result(socket: &Path, id: &str) -> Result<Answer, ClientError> {
    let stream = connect(socket)?;
    let mut lines = send(&stream, &json!({"cmd": "result", "id": id}))?;
    answer(next_reply(&mut lines)?)
}

/// Asks for the daemon's status.
pub fn status(socket: &Path) -> Result<Status, ClientError> {
    let stream = connect(socket)?;
    let mut lines = send(&stream, &json!({"cmd": "status"}))?;
    match next_reply(&mut lines)? {
        Reply::Status(s) => Ok(*s),
        Reply::Error(e) => Err(e.into()),
        r => Err(unexpected(&r)),
    }
}

fn reply_id(r: &Reply) -> Option<&Id> {
    match r {
        Reply::Done(d) => Some(&d.id),
        Reply::Deferred { id, .. } | Reply::Token { id, .. } | Reply::Reasoning { id, .. } => {
            Some(id)
        }
        Reply::Error(e) => e.id.as_ref(),
        Reply::Status(s) => s.id.as_ref(),
    }
}

fn answer(r: Reply) -> Result<Answer, ClientError> {
    match r {
        Reply::Done(d) => Ok(Answer::Done(Box::new(d))),
        Reply::Deferred { id, position } => Ok(Answer::Deferred { id, position }),
        Reply::Error(e) => Err(e.into()),
        r => Err(unexpected(&r)),
    }
}

fn unexpected(r: &Reply) -> ClientError {
    ClientError::Protocol(String::from_utf8_lossy(&r.to_line()).trim_end().to_string())
}

fn send<'a>(
    stream: &'a UnixStream,
    msg: &impl Serialize,
) -> Result<BufReader<&'a UnixStream>, ClientError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&mut &*stream).write_all(&line)?;
    Ok(BufReader::new(stream))
}

fn next_reply(lines: &mut impl BufRead) -> Result<Reply, ClientError> {
    let mut line = String::new();
    if lines.read_line(&mut line)? == 0 {
        return Err(ClientError::Closed);
    }
    serde_json::from_str(&line)
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", line.trim_end())))
}

impl From<ErrorReply> for ClientError {
    fn from(e: ErrorReply) -> ClientError {
        ClientError::Remote {
            code: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}
