//! Small blocking clients of the socket API, behind `bitnetd ask` and `bitnetd status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::protocol::Route;

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
    #[error("{code}: {message}")]
    Remote { code: String, message: String },
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

/// Sends `ask` and writes the answer to `out` as it streams. Returns the terminal `done` (or `deferred`)
/// object.
pub fn ask(socket: &Path, ask: &Ask, out: &mut dyn Write) -> Result<Value, ClientError> {
    let id = ask
        .id
        .clone()
        .unwrap_or_else(|| format!("ask-{}", std::process::id()));
    let mut req = json!({
        "id": id,
        "stream": true,
        "route": ask.route,
        "private": ask.private,
        "defer": ask.defer,
    });
    if ask.raw {
        req["prompt"] = json!(ask.text);
    } else {
        req["messages"] = json!([{"role": "user", "content": ask.text}]);
    }
    for (k, v) in [
        ("max_tokens", ask.max_tokens.map(|v| json!(v))),
        ("temperature", ask.temperature.map(|v| json!(v))),
        ("deadline_ms", ask.deadline_ms.map(|v| json!(v))),
    ] {
        if let Some(v) = v {
            req[k] = v;
        }
    }
    let stream = connect(socket)?;
    let mut lines = send(&stream, &req)?;
    loop {
        let reply = next_reply(&mut lines)?;
        if reply["id"] != json!(id) {
            continue;
        }
        match reply["type"].as_str() {
            Some("token") => {
                out.write_all(reply["text"].as_str().unwrap_or_default().as_bytes())?;
                out.flush()?;
            }
            Some("done") | Some("deferred") => return Ok(reply),
            Some("error") => return Err(remote(&reply)),
            _ => return Err(ClientError::Protocol(reply.to_string())),
        }
    }
}

/// Fetches the result of deferred request `id`: its `done`, or its `deferred` reply while it waits.
pub fn result(socket: &Path, id: &str) -> Result<Value, ClientError> {
    let stream = connect(socket)?;
    let mut lines = send(&stream, &json!({"cmd": "result", "id": id}))?;
    let reply = next_reply(&mut lines)?;
    match reply["type"].as_str() {
        Some("done") | Some("deferred") => Ok(reply),
        Some("error") => Err(remote(&reply)),
        _ => Err(ClientError::Protocol(reply.to_string())),
    }
}

/// Asks for the daemon's status.
pub fn status(socket: &Path) -> Result<Value, ClientError> {
    let stream = connect(socket)?;
    let mut lines = send(&stream, &json!({"cmd": "status"}))?;
    let reply = next_reply(&mut lines)?;
    match reply["type"].as_str() {
        Some("status") => Ok(reply),
        Some("error") => Err(remote(&reply)),
        _ => Err(ClientError::Protocol(reply.to_string())),
    }
}

fn send<'a>(stream: &'a UnixStream, msg: &Value) -> Result<BufReader<&'a UnixStream>, ClientError> {
    let mut line = msg.to_string();
    line.push('\n');
    (&mut &*stream).write_all(line.as_bytes())?;
    Ok(BufReader::new(stream))
}

fn next_reply(lines: &mut impl BufRead) -> Result<Value, ClientError> {
    let mut line = String::new();
    if lines.read_line(&mut line)? == 0 {
        return Err(ClientError::Closed);
    }
    serde_json::from_str(&line).map_err(|e| ClientError::Protocol(format!("{e}: {line}")))
}

fn remote(reply: &Value) -> ClientError {
    ClientError::Remote {
        code: reply["code"].as_str().unwrap_or("unknown").to_string(),
        message: reply["message"].as_str().unwrap_or_default().to_string(),
    }
}
