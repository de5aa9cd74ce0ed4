//! A fake Kimi (Moonshot) server on loopback for the tests: real HTTP/1.1, chunked SSE streams in the wire
//! format of `POST /v1/chat/completions`, `GET /v1/models`, OpenAI-style error bodies, `Retry-After`. Each
//! chat request takes the next scripted [`Behavior`] (or the default one), and every request is recorded, so
//! tests can prove what did, and did not, leave the board. It can go "offline" (its port refuses
//! connections) and come back on the same port.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where the usage numbers go in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageAt {
    /// Inside `choices[0]` of the chunk with the finish reason (Moonshot's way).
    InChoice,
    /// A final chunk with empty `choices` (OpenAI's `include_usage` way).
    FinalChunk,
    None,
}

/// What the server does with one chat request.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// Streams `texts` as deltas (with `gap` between chunks), a finish, usage, and `data: [DONE]`.
    Stream {
        texts: Vec<String>,
        usage: UsageAt,
        gap: Duration,
    },
    /// An error status with an OpenAI-style body.
    Error {
        status: u16,
        kind: String,
        retry_after: Option<String>,
    },
    /// Reads the request, then says nothing (until the client gives up).
    Stall,
    /// Streams `texts`, then stops sending without ending the stream.
    StallAfter(Vec<String>),
    /// Streams `texts`, then drops the connection mid-body.
    CutAfter(Vec<String>),
    /// Streams `texts`, then a `data:` line that is not JSON.
    MalformedAfter(Vec<String>),
    /// A thinking model (kimi-k2.5 and later): `reasoning` as `reasoning_content` deltas, then `texts` as
    /// `content`, then usage counting the reasoning in `completion_tokens` and in
    /// `completion_tokens_details.reasoning_tokens`.
    Think {
        reasoning: Vec<String>,
        texts: Vec<String>,
    },
}

impl Behavior {
    pub fn answer(text: &str) -> Behavior {
        let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
        Behavior::Stream {
            texts: words,
            usage: UsageAt::InChoice,
            gap: Duration::ZERO,
        }
    }

    /// A thinking model's answer: `reasoning`, then `text`, word by word.
    pub fn think(reasoning: &str, text: &str) -> Behavior {
        let words = |t: &str| t.split_inclusive(' ').map(str::to_string).collect();
        Behavior::Think {
            reasoning: words(reasoning),
            texts: words(text),
        }
    }

    pub fn error(status: u16, kind: &str) -> Behavior {
        Behavior::Error {
            status,
            kind: kind.into(),
            retry_after: None,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
    /// When the server finished its reply (or started stalling).
    pub answered: Instant,
}

#[derive(Default)]
struct State {
    script: VecDeque<Behavior>,
    default: Option<Behavior>,
    recorded: Vec<Recorded>,
    models: Vec<String>,
}

/// See the module documentation. Stops serving when dropped.
pub struct FakeKimi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    online: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl FakeKimi {
    /// Starts on a free loopback port, online, answering every chat request with "Hello from Kimi".
    pub fn start() -> FakeKimi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let k = FakeKimi {
            addr,
            state: Arc::new((
                Mutex::new(State {
                    default: Some(Behavior::answer("Hello from Kimi")),
                    // Today's list: the retired K2 previews are gone.
                    models: ["kimi-test", "kimi-k2.6", "kimi-k2.5", "moonshot-v1-8k"]
                        .map(String::from)
                        .to_vec(),
                    ..Default::default()
                }),
                Condvar::new(),
            )),
            online: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        k.serve(listener);
        k
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The next chat requests get these behaviors, in order.
    pub fn script(&self, b: impl IntoIterator<Item = Behavior>) {
        self.state.0.lock().unwrap().script.extend(b);
    }

    /// What chat requests get once the script is used up.
    pub fn set_default(&self, b: Behavior) {
        self.state.0.lock().unwrap().default = Some(b);
    }

    pub fn set_models(&self, models: &[&str]) {
        self.state.0.lock().unwrap().models = models.iter().map(|s| s.to_string()).collect();
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.0.lock().unwrap().recorded.clone()
    }

    /// Chat requests received so far.
    pub fn chats(&self) -> Vec<Recorded> {
        self.recorded()
            .into_iter()
            .filter(|r| r.path.ends_with("/chat/completions"))
            .collect()
    }

    /// Waits until `n` chat requests were received.
    pub fn wait_for_chats(&self, n: usize, patience: Duration) -> Vec<Recorded> {
        let (lock, cv) = &*self.state;
        let start = Instant::now();
        let mut st = lock.lock().unwrap();
        loop {
            let chats: Vec<Recorded> = st
                .recorded
                .iter()
                .filter(|r| r.path.ends_with("/chat/completions"))
                .cloned()
                .collect();
            if chats.len() >= n {
                return chats;
            }
            assert!(
                start.elapsed() < patience,
                "{} of {n} chat requests came",
                chats.len()
            );
            st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
        }
    }

    /// Offline: the port refuses connections. Online again: it listens on the same port.
    pub fn set_online(&self, online: bool) {
        let was = self.online.swap(online, Ordering::SeqCst);
        if online && !was {
            let listener = (0..100)
                .find_map(|_| {
                    TcpListener::bind(self.addr).ok().or_else(|| {
                        std::thread::sleep(Duration::from_millis(50));
                        None
                    })
                })
                .expect("rebinding the fake Kimi port");
            self.serve(listener);
        }
        if !online && was {
            // Wake the accept loop so that it notices and drops the listener.
            let _ = TcpStream::connect(self.addr);
        }
    }

    fn serve(&self, listener: TcpListener) {
        let (state, online, stop) = (self.state.clone(), self.online.clone(), self.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) || !online.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (state, stop, online) = (state.clone(), stop.clone(), online.clone());
                std::thread::spawn(move || handle(conn, &state, &stop, &online));
            }
        });
    }
}

impl Drop for FakeKimi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn handle(
    conn: TcpStream,
    state: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
    online: &AtomicBool,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        // Offline also drops kept-alive connections, as a dead uplink would.
        if reader.read_line(&mut line).unwrap_or(0) == 0 || !online.load(Ordering::SeqCst) {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (mut length, mut authorization) = (0usize, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let behavior = if path.ends_with("/chat/completions") {
            let mut st = state.0.lock().unwrap();
            st.script.pop_front().or_else(|| st.default.clone())
        } else {
            None
        };
        // Recorded on arrival, so that a client that has its answer always finds its request here; `answered`
        // is moved to the end of the response once it is written.
        let index = {
            let mut st = state.0.lock().unwrap();
            st.recorded.push(Recorded {
                method: method.clone(),
                path: path.clone(),
                authorization: authorization.clone(),
                body: body.clone(),
                answered: Instant::now(),
            });
            state.1.notify_all();
            st.recorded.len() - 1
        };
        let record = |answered| {
            let mut st = state.0.lock().unwrap();
            st.recorded[index].answered = answered;
            state.1.notify_all();
        };
        if authorization.as_deref() != Some("Bearer sk-test") {
            let b = json!({"error": {"type": "invalid_authentication_error", "message": "Invalid Authentication"}});
            let _ = respond(&mut conn, 401, &[], &b.to_string());
            record(Instant::now());
            continue;
        }
        if path.ends_with("/models") {
            let models = state.0.lock().unwrap().models.clone();
            let data: Vec<Value> = models
                .iter()
                .map(|m| json!({"id": m, "object": "model"}))
                .collect();
            let _ = respond(
                &mut conn,
                200,
                &[],
                &json!({"object": "list", "data": data}).to_string(),
            );
            record(Instant::now());
            continue;
        }
        let Some(b) = behavior else {
            let _ = respond(
                &mut conn,
                404,
                &[],
                r#"{"error":{"type":"resource_not_found_error","message":"no"}}"#,
            );
            record(Instant::now());
            continue;
        };
        let model = body["model"].as_str().unwrap_or("?").to_string();
        // As Moonshot does: an id the account does not list is 404, and K2.5 and later refuse a temperature or
        // top_p of their own.
        let listed = state.0.lock().unwrap().models.contains(&model);
        let fixed = model.starts_with("kimi-k2.5") || model.starts_with("kimi-k2.6");
        let refusal = if !listed {
            Some((
                404,
                "resource_not_found_error",
                format!("Not found the model {model}"),
            ))
        } else if fixed && (body.get("temperature").is_some() || body.get("top_p").is_some()) {
            Some((
                400,
                "invalid_request_error",
                "invalid temperature: only 1 is allowed for this model".to_string(),
            ))
        } else {
            None
        };
        if let Some((status, kind, message)) = refusal {
            let b = json!({"error": {"type": kind, "message": message}});
            let _ = respond(&mut conn, status, &[], &b.to_string());
            record(Instant::now());
            continue;
        }
        match b {
            Behavior::Error {
                status,
                kind,
                retry_after,
            } => {
                let headers: Vec<(&str, String)> = retry_after
                    .map(|r| vec![("Retry-After", r)])
                    .unwrap_or_default();
                let b = json!({"error": {"type": kind, "message": format!("fake {status}")}});
                let _ = respond(&mut conn, status, &headers, &b.to_string());
                record(Instant::now());
            }
            Behavior::Stall => {
                record(Instant::now());
                hold(stop);
                return;
            }
            Behavior::Stream { texts, usage, gap } => {
                let ok = stream(&mut conn, &model, &texts, gap)
                    .and_then(|_| finish(&mut conn, &model, usage));
                record(Instant::now());
                if ok.is_err() {
                    return;
                }
            }
            Behavior::Think { reasoning, texts } => {
                let ok = stream_reasoning(&mut conn, &model, &reasoning)
                    .and_then(|_| {
                        for t in &texts {
                            chunk(
                                &mut conn,
                                &event(&model, json!([{"index": 0, "delta": {"content": t}}]), None),
                            )?;
                        }
                        Ok(())
                    })
                    .and_then(|_| {
                        let r = reasoning.len();
                        let u = json!({"prompt_tokens": 11, "completion_tokens": r + texts.len(),
                            "total_tokens": 11 + r + texts.len(),
                            "completion_tokens_details": {"reasoning_tokens": r}});
                        chunk(
                            &mut conn,
                            &event(&model, json!([{"index": 0, "delta": {}, "finish_reason": "stop", "usage": u}]), None),
                        )
                    })
                    .and_then(|_| chunk(&mut conn, "data: [DONE]\n\n"))
                    .and_then(|_| conn.write_all(b"0\r\n\r\n"));
                record(Instant::now());
                if ok.is_err() {
                    return;
                }
            }
            Behavior::StallAfter(texts) => {
                let _ = stream(&mut conn, &model, &texts, Duration::ZERO);
                record(Instant::now());
                hold(stop);
                return;
            }
            Behavior::CutAfter(texts) => {
                let _ = stream(&mut conn, &model, &texts, Duration::ZERO);
                record(Instant::now());
                let _ = conn.shutdown(std::net::Shutdown::Both);
                return;
            }
            Behavior::MalformedAfter(texts) => {
                let _ = stream(&mut conn, &model, &texts, Duration::ZERO)
                    .and_then(|_| {
                        chunk(
                            &mut conn,
                            "data: {\"choices\":[{\"delta\":{\"content\": oops\n\n",
                        )
                    })
                    .and_then(|_| chunk(&mut conn, "data: [DONE]\n\n"))
                    .and_then(|_| conn.write_all(b"0\r\n\r\n"));
                record(Instant::now());
            }
        }
    }
}

fn hold(stop: &AtomicBool) {
    let start = Instant::now();
    while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn respond(
    conn: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &str,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

fn chunk(conn: &mut TcpStream, data: &str) -> std::io::Result<()> {
    conn.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())?;
    conn.flush()
}

fn event(model: &str, choices: Value, usage: Option<Value>) -> String {
    let mut v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": choices});
    if let Some(u) = usage {
        v["usage"] = u;
    }
    format!("data: {v}\n\n")
}

fn stream(
    conn: &mut TcpStream,
    model: &str,
    texts: &[String],
    gap: Duration,
) -> std::io::Result<()> {
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    chunk(
        conn,
        &event(
            model,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
            None,
        ),
    )?;
    for t in texts {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        chunk(
            conn,
            &event(model, json!([{"index": 0, "delta": {"content": t}}]), None),
        )?;
    }
    Ok(())
}

/// The response head and the reasoning deltas of a thinking model (`content` is absent while it reasons).
fn stream_reasoning(
    conn: &mut TcpStream,
    model: &str,
    reasoning: &[String],
) -> std::io::Result<()> {
    stream(conn, model, &[], Duration::ZERO)?;
    for r in reasoning {
        chunk(
            conn,
            &event(
                model,
                json!([{"index": 0, "delta": {"reasoning_content": r}}]),
                None,
            ),
        )?;
    }
    Ok(())
}

fn finish(conn: &mut TcpStream, model: &str, usage: UsageAt) -> std::io::Result<()> {
    let u = json!({"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14});
    match usage {
        UsageAt::InChoice => chunk(
            conn,
            &event(
                model,
                json!([{"index": 0, "delta": {}, "finish_reason": "stop", "usage": u}]),
                None,
            ),
        )?,
        UsageAt::FinalChunk => {
            chunk(
                conn,
                &event(
                    model,
                    json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                    None,
                ),
            )?;
            chunk(conn, &event(model, json!([]), Some(u)))?;
        }
        UsageAt::None => chunk(
            conn,
            &event(
                model,
                json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                None,
            ),
        )?,
    }
    chunk(conn, "data: [DONE]\n\n")?;
    conn.write_all(b"0\r\n\r\n")?;
    conn.flush()
}
