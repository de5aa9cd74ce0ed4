//! The examples in docs/protocol.md and docs/http.md work as written, against a running daemon.

mod common;

use std::process::Command;

use common::Daemon;

/// The fenced code blocks of `lang` in docs/protocol.md.
fn blocks(lang: &str) -> Vec<String> {
    blocks_of("protocol.md", lang)
}

/// The fenced code blocks of `lang` in `docs/<doc>`.
fn blocks_of(doc: &str, lang: &str) -> Vec<String> {
    let doc =
        std::fs::read_to_string(format!("{}/docs/{doc}", env!("CARGO_MANIFEST_DIR"))).unwrap();
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

#[test]
fn the_http_curl_examples_answer_stream_and_count() {
    if !have("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("http.sock");
    let d = Daemon::start(&format!(
        "[http]\nenabled = true\nlisten = [\"unix:{}\"]\n",
        uds.display()
    ));
    d.wait_for_path(&uds);
    let [one, streamed, health, metrics] = blocks_of("http.md", "sh")
        .try_into()
        .expect("four shell examples in docs/http.md");
    let run = |script: &str| {
        let cmd = &mut Command::new("sh");
        cmd.arg("-c").arg(script).env("BITNETD_HTTP_SOCKET", &uds);
        String::from_utf8(common::run_ok(cmd).stdout).unwrap()
    };
    let body: serde_json::Value = serde_json::from_str(&run(&one)).unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert!(!body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(body["bitnetd"]["route"], "local");
    let events = run(&streamed);
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    assert!(events.contains("\"usage\""), "{events}");
    assert!(events.contains("\"route_reason\":\"private\""), "{events}");
    let h: serde_json::Value = serde_json::from_str(&run(&health)).unwrap();
    assert_eq!(h["status"], "ready");
    let m = run(&metrics);
    assert!(
        m.contains(
            r#"bitnetd_requests_total{source="http",route="local",reason="simple",outcome="ok"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(
            r#"bitnetd_requests_total{source="http",route="local",reason="private",outcome="ok"} 1"#
        ),
        "{m}"
    );
}

#[test]
fn the_http_python_example_streams_an_answer() {
    let python = std::env::var("BITNETD_TEST_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/bitnetd-test-venv/bin/python".into());
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{python} has no openai package, and under CI=true no test may skip (.ci/run makes the venv)"
        );
        eprintln!("SKIPPED: no Python with the openai package");
        return;
    }
    let d = Daemon::start("[http]\nenabled = true\nlisten = [\"127.0.0.1:0\"]\n");
    d.wait_for_log("HTTP on http://127.0.0.1:", 1);
    let log = d.log();
    let at = log.find("HTTP on ").unwrap() + "HTTP on ".len();
    let url: String = log[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',')
        .collect();
    let [script] = blocks_of("http.md", "python")
        .try_into()
        .expect("one Python example in docs/http.md");
    let script = script.replace("http://127.0.0.1:8080", &url);
    let cmd = &mut Command::new(&python);
    cmd.arg("-c").arg(&script).env("NO_PROXY", "127.0.0.1");
    let out = String::from_utf8(common::run_ok(cmd).stdout).unwrap();
    assert!(out.split_whitespace().count() > 3, "{out}");
    assert!(
        d.log().contains("route_reason=private"),
        "the example's extra_body reached the router"
    );
}

#[test]
fn the_http_json_examples_parse() {
    for block in blocks_of("http.md", "json") {
        let v: serde_json::Value =
            serde_json::from_str(&block).unwrap_or_else(|e| panic!("{e}: {block}"));
        assert!(v.is_object());
    }
}
