//! bitnetd under systemd's protocols, driven as systemd would: a notify socket (READY, WATCHDOG, STOPPING,
//! EXTEND_TIMEOUT_USEC), socket activation with a passed descriptor, and `systemd-analyze verify` on the units.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::kimi::FakeKimi;
use common::{Client, Daemon};

/// Collects notify datagrams on a socket in `dir`; returns its path and the receiving end.
fn notify_socket(dir: &Path) -> (std::path::PathBuf, mpsc::Receiver<String>) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if tx.send(line.to_string()).is_err() {
                    return;
                }
            }
        }
    });
    (path, rx)
}

/// Waits for a notify line starting with `prefix`; returns it and every line seen before.
fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str) -> (String, Vec<String>) {
    let deadline = Instant::now() + common::PATIENCE;
    let mut before = vec![];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {prefix} (got {before:?})"));
        if line.starts_with(prefix) {
            return (line, before);
        }
        before.push(line);
    }
}

#[test]
fn notifies_ready_after_the_socket_is_served_then_watchdog_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, rx) = notify_socket(dir.path());
    let mut d = Daemon::spawn("", |c| {
        c.env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "300000");
    });
    let (_, before) = wait_for(&rx, "READY=1");
    assert!(
        UnixStream::connect(&d.socket).is_ok(),
        "READY=1 only once the socket is bound"
    );
    assert!(
        before.iter().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")),
        "asks for time while loading: {before:?}"
    );
    assert!(
        before.iter().any(|l| l.starts_with("STATUS=loading model")),
        "{before:?}"
    );
    let (status, _) = wait_for(&rx, "STATUS=");
    assert!(
        status.contains("serving bitnet-b1.58-wordnet-5m"),
        "{status}"
    );
    // `systemctl status` also shows the board's state and the cloud link (no key here: off).
    assert!(status.contains("; thermal Normal"), "{status}");
    assert!(status.ends_with("; cloud off"), "{status}");
    // Pings every 150 ms while the engine is alive.
    for _ in 0..3 {
        wait_for(&rx, "WATCHDOG=1");
    }
    let mut c = d.connect();
    assert_eq!(c.status()["engine"]["alive"], true);
    d.signal(libc::SIGTERM);
    wait_for(&rx, "STOPPING=1");
    assert!(d.wait().success(), "{}", d.log());
}

/// Waits for a `STATUS=` line ending with `suffix`.
fn wait_for_status(rx: &mpsc::Receiver<String>, suffix: &str) -> String {
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        let (line, _) = wait_for(rx, "STATUS=");
        if line.ends_with(suffix) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no STATUS= ending {suffix:?}; last: {line}"
        );
    }
}

#[test]
fn the_status_line_follows_the_cloud_link() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, rx) = notify_socket(dir.path());
    let kimi = FakeKimi::start();
    let config = format!(
        "[cloud]\nbase_url = \"{}\"\nprobe_interval_secs = 1\nprobe_timeout_ms = 500\n",
        kimi.base_url()
    );
    let mut d = Daemon::spawn(&config, |c| {
        c.env("NOTIFY_SOCKET", &notify)
            .env("KIMI_API_KEY", "sk-test");
    });
    wait_for(&rx, "READY=1");
    let line = wait_for_status(&rx, "; cloud online");
    assert!(
        line.starts_with("STATUS=serving bitnet-b1.58-wordnet-5m"),
        "{line}"
    );
    kimi.set_online(false);
    wait_for_status(&rx, "; cloud offline");
    kimi.set_online(true);
    wait_for_status(&rx, "; cloud online");
    d.terminate();
}

#[test]
fn no_watchdog_pings_unless_systemd_asks() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, rx) = notify_socket(dir.path());
    let mut d = Daemon::spawn("", |c| {
        c.env("NOTIFY_SOCKET", &notify);
    });
    wait_for(&rx, "READY=1");
    std::thread::sleep(Duration::from_millis(500));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(!rest.iter().any(|l| l == "WATCHDOG=1"), "{rest:?}");
    d.terminate();
}

/// Starts bitnetd with `listener` passed as fd 3 and LISTEN_FDS=1, LISTEN_PID set to the daemon's pid (through
/// `sh -c 'exec …'`, which keeps the pid).
fn spawn_activated(listener: &UnixListener, config_dir: &Path) -> std::process::Child {
    let cfg = config_dir.join("bitnetd.toml");
    std::fs::write(&cfg, "").unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_bitnetd"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("BITNETD_SOCKET", config_dir.join("unused.sock"))
        .env("BITNETD_LOG", "info")
        .stderr(std::process::Stdio::null())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("BITNETD_MODEL");
    // SAFETY: dup2 and fcntl are async-signal-safe; the closure touches only the descriptor numbers.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn socket_activation_serves_the_passed_socket_and_leaves_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = spawn_activated(&listener, dir.path());
    drop(listener);
    // Connecting works at once (systemd's backlog); the answer comes once the model is loaded.
    let mut c = Client::connect(&path);
    let s = c.status();
    assert_eq!(s["state"], "ready", "{s}");
    assert!(
        !dir.path().join("unused.sock").exists(),
        "no socket of its own"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < common::PATIENCE);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(path.exists(), "the socket belongs to systemd and stays");
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !common::have_tool("systemd-analyze", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for name in ["bitnetd.service", "bitnetd.socket", "bitnetd-http.socket"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        // verify checks that ExecStart= exists; point it at the binary under test.
        let text = text.replace("/usr/bin/bitnetd", env!("CARGO_BIN_EXE_bitnetd"));
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("bitnetd.socket"))
        .arg(dir.path().join("bitnetd-http.socket"))
        .arg(dir.path().join("bitnetd.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("Unknown"), "{stderr}");
    assert!(!stderr.contains("ignoring"), "{stderr}");
}

#[test]
fn socket_activation_passes_the_http_socket_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let api = UnixListener::bind(&path).unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = http.local_addr().unwrap();
    let cfg = dir.path().join("bitnetd.toml");
    // `listen` names a port nobody may take: the passed socket must be served instead.
    std::fs::write(&cfg, "[http]\nenabled = true\nlisten = [\"127.0.0.1:1\"]\n").unwrap();
    let (a, h) = (api.as_raw_fd(), http.as_raw_fd());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=bitnetd.socket:http exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_bitnetd"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("BITNETD_SOCKET", dir.path().join("unused.sock"))
        .env("BITNETD_LOG", "info")
        .stderr(std::process::Stdio::null())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("BITNETD_MODEL");
    // SAFETY: dup and dup2 are async-signal-safe; the closure touches only descriptor numbers. Both are moved
    // out of the way first, so that neither overwrites the other on its way to 3 and 4.
    unsafe {
        cmd.pre_exec(move || {
            for (from, high) in [(a, 100), (h, 101)] {
                if libc::dup2(from, high) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (high, to) in [(100, 3), (101, 4)] {
                if libc::dup2(high, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop((api, http));
    // The API socket answers status once the model is loaded; by then HTTP says ready.
    let mut c = Client::connect(&path);
    assert_eq!(c.status()["state"], "ready");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(common::PATIENCE)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""status":"ready""#), "{answer}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < common::PATIENCE);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
}
