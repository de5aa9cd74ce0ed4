//! The examples in docs/protocol.md work as written, against a running daemon.

mod common;

use std::process::Command;

use common::Daemon;

/// The fenced code blocks of `lang` in docs/protocol.md.
fn blocks(lang: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let fence = format!("```{lang}\n");
    doc.split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_string())
        .collect()
}

fn have(tool: &str) -> bool {
    common::have_tool(tool, &["-V"])
}

#[test]
fn the_python_example_streams_an_answer() {
    if !have("python3") {
        return;
    }
    let d = Daemon::start("");
    let [script] = blocks("python").try_into().expect("one Python example");
    let cmd = &mut Command::new("python3");
    cmd.arg("-c").arg(&script).env("BITNETD_SOCKET", &d.socket);
    let out = common::run_ok(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" tokens]"), "{stdout}");
    assert!(stdout.split_whitespace().count() > 3, "{stdout}");
}

#[test]
fn the_socat_example_gets_one_done_line() {
    if !have("socat") {
        return;
    }
    let d = Daemon::start("");
    let [script] = blocks("sh").try_into().expect("one shell example");
    let cmd = &mut Command::new("sh");
    cmd.arg("-c").arg(&script).env("BITNETD_SOCKET", &d.socket);
    let out = common::run_ok(cmd);
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["type"], "done", "{reply}");
    assert!(!reply["text"].as_str().unwrap().is_empty());
}

#[test]
fn the_documented_json_examples_parse() {
    for block in blocks("json") {
        let v: serde_json::Value =
            serde_json::from_str(&block).unwrap_or_else(|e| panic!("{e}: {block}"));
        assert!(v.is_object());
    }
}
