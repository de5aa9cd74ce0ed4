//! The configuration through the binary: `print-config`, `check-config`, errors that name key and line, and
//! `bitnetd run` without any config file.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{bitnetd, Client};

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bitnetd.toml");
    std::fs::write(&path, text).unwrap();
    let out = bitnetd()
        .arg("check-config")
        .arg(&path)
        .env_remove("BITNETD_MODEL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_printed_defaults_pass_check_config() {
    let out = bitnetd().arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[budget]") && text.contains("memory_bytes"));
    let (ok, stdout, stderr) = check(&text);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");
}

#[test]
fn check_config_names_the_key_and_line_of_a_bad_value() {
    let (ok, _, stderr) = check("[model]\n# a comment\nthreads = 0\n");
    assert!(!ok);
    assert!(
        stderr.contains("bitnetd.toml:3") && stderr.contains("model.threads"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (ok, _, stderr) = check("[socket]\nenabled = true\nsocket_path = \"/tmp/x\"\n");
    assert!(!ok);
    assert!(
        stderr.contains(":3") && stderr.contains("unknown field `socket_path`"),
        "{stderr}"
    );

    let (ok, _, stderr) = check("[engine]\nslots = \"two\"\n");
    assert!(!ok);
    assert!(
        stderr.contains(":2") && stderr.contains("invalid type"),
        "{stderr}"
    );
}

#[test]
fn a_budget_below_the_model_size_is_refused_with_the_numbers() {
    // The default model needs about 69 MiB (weights, int8 KV cache at full context, runtime).
    let (ok, _, stderr) = check("[engine]\nslots = 1\n\n[budget]\nmemory_bytes = \"66M\"\n");
    assert!(!ok);
    assert!(
        stderr.contains(":5") && stderr.contains("budget.memory_bytes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("MiB") && stderr.contains("raise"),
        "{stderr}"
    );
    // The same check stops `run` before it loads anything.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[budget]\nmemory_bytes = \"66M\"\n").unwrap();
    let out = bitnetd()
        .args(["run", "--config"])
        .arg(&cfg)
        .env("BITNETD_SOCKET", dir.path().join("s.sock"))
        .env_remove("BITNETD_MODEL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("budget.memory_bytes"), "{stderr}");
}

#[test]
fn a_missing_model_is_named() {
    let (ok, _, stderr) = check("[model]\npath = \"/nonexistent/model\"\n");
    assert!(!ok);
    assert!(
        stderr.contains("model.path") && stderr.contains("/nonexistent/model"),
        "{stderr}"
    );
}

#[test]
fn run_without_a_config_file_uses_the_default_model_and_the_runtime_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = bitnetd()
        .arg("run")
        .env("RUNTIME_DIRECTORY", dir.path())
        .env("XDG_RUNTIME_DIR", "/nonexistent")
        .env_remove("BITNETD_SOCKET")
        .env_remove("BITNETD_CONFIG")
        .env_remove("BITNETD_MODEL")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.path().join("bitnetd.sock");
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(start.elapsed() < common::PATIENCE);
        assert!(child.try_wait().unwrap().is_none(), "bitnetd exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Client::connect(&socket).status();
    assert_eq!(status["model"], "bitnet-b1.58-wordnet-5m");
    // `bitnetd ask` and `bitnetd status` find the same socket the same way.
    let out = common::run_ok(
        bitnetd()
            .args(["ask", "--max-tokens", "8", "What is a dog?"])
            .env("RUNTIME_DIRECTORY", dir.path())
            .env_remove("BITNETD_SOCKET")
            .env_remove("BITNETD_CONFIG"),
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("via local"));
    let out = bitnetd()
        .arg("status")
        .env("RUNTIME_DIRECTORY", dir.path())
        .env_remove("BITNETD_SOCKET")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"]["served"], 1);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!socket.exists());
}

#[test]
fn ask_reports_a_daemon_that_is_not_there() {
    let out = bitnetd()
        .args(["ask", "--socket", "/nonexistent/bitnetd.sock", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is bitnetd running"), "{stderr}");
}
