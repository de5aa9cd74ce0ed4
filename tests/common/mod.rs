//! Helpers shared by the integration tests that run the `bitnetd` binary.
#![allow(dead_code)]

pub mod broker;
pub mod kimi;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `bitnetd` command for the binary under test. When the tests themselves run under an emulator (`.ci/run`
/// cross-tests aarch64 under qemu-user), `BITNETD_TEST_RUNNER` names it, so that the child runs the same way:
/// `/path/to/.cargo/qemu-runner aarch64`.
pub fn bitnetd() -> Command {
    let bin = env!("CARGO_BIN_EXE_bitnetd");
    match std::env::var("BITNETD_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            let mut cmd = Command::new(words.next().expect("not empty"));
            cmd.args(words).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

/// Runs `cmd`, checks that it succeeded (showing its output if not) and returns its output.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a `generate --json` command, checks that it succeeded and returns its JSON line.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    serde_json::from_slice(&run_ok(cmd).stdout).expect("one JSON object on stdout")
}

/// Whether `tool` runs (`tool args`). A missing tool fails the test under `CI=true` (`.ci/run` installs every
/// tool the tests use, so a missing one is a broken CI); elsewhere the test says it is skipped, on stderr, and
/// the caller returns.
pub fn have_tool(tool: &str, args: &[&str]) -> bool {
    if Command::new(tool).args(args).output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{tool} is not installed, and under CI=true no test may skip (.ci/run installs it)"
    );
    eprintln!("SKIPPED: {tool} is not installed (.ci/run installs it)");
    false
}

/// How long a test waits for the daemon before failing.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A `bitnetd run` process on a temporary socket, with the shipped default model. Killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// The thread copying stderr; it ends at the pipe's end of file.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts `bitnetd run` with `config` (TOML) and waits until the socket accepts connections.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with(config, |_| {})
    }

    /// Like [`Daemon::start`], letting `adjust` change the command (environment, descriptors).
    pub fn start_with(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let d = Daemon::spawn(config, adjust);
        d.wait_for_socket();
        d
    }

    /// Starts the process without waiting for it. Unless `config` sets `telemetry_root`, the governor reads
    /// an empty fake tree (`<dir>/board`), so no test depends on this machine's temperature or memory pressure.
    pub fn spawn(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bitnetd.sock");
        let cfg = dir.path().join("bitnetd.toml");
        let board = dir.path().join("board");
        std::fs::create_dir_all(&board).unwrap();
        let config = if config.contains("telemetry_root") {
            config.to_string()
        } else {
            let root = format!("telemetry_root = \"{}\"\n", board.display());
            match config.find("[budget]\n") {
                Some(at) => format!("{}[budget]\n{root}{}", &config[..at], &config[at + 9..]),
                None => format!("{config}\n[budget]\n{root}"),
            }
        };
        std::fs::write(&cfg, config).unwrap();
        let mut cmd = bitnetd();
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("BITNETD_SOCKET", &socket)
            .env("BITNETD_LOG", "debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("BITNETD_MODEL")
            .env_remove("BITNETD_CONFIG")
            // No test reaches the real cloud: a key comes only from the test's own `adjust`.
            .env_remove("KIMI_API_KEY")
            .env_remove("MOONSHOT_API_KEY")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("STATE_DIRECTORY", dir.path().join("state"))
            // The fake cloud is on loopback; a proxy set on the test machine must not intercept it.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("starting bitnetd run");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Daemon {
            child,
            dir,
            socket,
            stderr,
            reader: Some(reader),
        }
    }

    /// The fake board tree the governor reads (see [`Daemon::spawn`]).
    pub fn board(&self) -> PathBuf {
        self.dir.path().join("board")
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle` `times` times (panics with the log after [`PATIENCE`]).
    pub fn wait_for_log(&self, needle: &str, times: usize) {
        let start = Instant::now();
        while self.log().matches(needle).count() < times {
            assert!(
                start.elapsed() < PATIENCE,
                "never logged {needle:?} {times} times: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the socket accepts connections (panics with the log if the daemon exits first).
    pub fn wait_for_socket(&self) {
        self.wait_for_path(&self.socket.clone());
    }

    pub fn wait_for_path(&self, path: &Path) {
        let start = Instant::now();
        while UnixStream::connect(path).is_err() {
            assert!(start.elapsed() < PATIENCE, "daemon not up: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit (panics after [`PATIENCE`]).
    pub fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The whole log is in once the copying thread has seen the end of the pipe.
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return s;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A line-oriented client of the socket API.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connecting to the daemon");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_raw(format!("{v}\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next reply line, or `None` when the daemon closed the connection.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))),
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("a reply, not end of stream")
    }

    /// Reads replies until the terminal one for `id`; returns its streamed texts and the terminal reply.
    /// Replies for other ids are skipped.
    pub fn finish(&mut self, id: &Value) -> (Vec<String>, Value) {
        let (_, tokens, end) = self.finish_thinking(id);
        (tokens, end)
    }

    /// Like [`Client::finish`], with the `reasoning` replies apart: (reasoning, tokens, terminal reply). A
    /// reasoning reply after the first token fails the test.
    pub fn finish_thinking(&mut self, id: &Value) -> (Vec<String>, Vec<String>, Value) {
        let (mut reasoning, mut tokens) = (vec![], vec![]);
        loop {
            let r = self.recv();
            if &r["id"] != id {
                continue;
            }
            let text = || r["text"].as_str().unwrap().to_string();
            match r["type"].as_str() {
                Some("token") => tokens.push(text()),
                Some("reasoning") => {
                    assert!(tokens.is_empty(), "reasoning after the answer began: {r}");
                    reasoning.push(text())
                }
                Some("done") | Some("error") | Some("deferred") => return (reasoning, tokens, r),
                other => panic!("unexpected reply type {other:?}: {r}"),
            }
        }
    }

    pub fn status(&mut self) -> Value {
        self.send(&serde_json::json!({"cmd": "status"}));
        loop {
            let r = self.recv();
            if r["type"] == "status" {
                return r;
            }
        }
    }
}

/// Writes `contents` to `rel` under the fake board, atomically (the governor may read it at any moment).
pub fn put_file(board: &Path, rel: &str, contents: &str) {
    let path = board.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A UPS HAT on the fake board: mains offline and the battery discharging at `percent`, or mains back and the
/// battery charging.
pub fn set_battery(board: &Path, percent: u32, mains: bool) {
    let supply = "sys/class/power_supply";
    put_file(board, &format!("{supply}/ups/type"), "Battery\n");
    let status = if mains { "Charging\n" } else { "Discharging\n" };
    put_file(board, &format!("{supply}/ups/status"), status);
    put_file(
        board,
        &format!("{supply}/ups/capacity"),
        &format!("{percent}\n"),
    );
    put_file(board, &format!("{supply}/ac/type"), "Mains\n");
    put_file(
        board,
        &format!("{supply}/ac/online"),
        if mains { "1\n" } else { "0\n" },
    );
}

/// Writes the fake board's temperature (°C).
pub fn set_temperature(board: &std::path::Path, celsius: f32) {
    let zone = board.join("sys/class/thermal/thermal_zone0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(
        zone.join("temp.tmp"),
        format!("{}\n", (celsius * 1000.0) as i64),
    )
    .unwrap();
    std::fs::rename(zone.join("temp.tmp"), zone.join("temp")).unwrap();
}

/// Polls `status` until it passes `check` (20 s at most).
pub fn wait_for_status(c: &mut Client, check: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let s = c.status();
        if check(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "status never got there: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `status` until its `budget` object passes `check` (20 s at most).
pub fn wait_for_budget(c: &mut Client, check: impl Fn(&Value) -> bool) -> Value {
    wait_for_status(c, |s| check(&s["budget"]))
}

/// One HTTP/1.1 request to `addr` (`127.0.0.1:port`) with `Connection: close`: the status and the body.
/// `extra` holds further header lines, each ending in `\r\n`.
pub fn http(addr: &str, method: &str, path: &str, extra: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

impl Daemon {
    /// The TCP address the HTTP API listens on (`127.0.0.1:port`), from the `ready` log line; waits for it.
    pub fn http_addr(&self) -> String {
        self.wait_for_log("HTTP on http://", 1);
        let log = self.log();
        let at = log.find("HTTP on http://").unwrap() + "HTTP on http://".len();
        log[at..]
            .chars()
            .take_while(|c| !matches!(c, ',' | ' ' | '\n'))
            .collect()
    }
}

/// The value of the unlabelled metric `name` in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
