//! Helpers shared by the integration tests that run the `bitnetd` binary.

use std::process::Command;

/// A `bitnetd` command for the binary under test.
pub fn bitnetd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bitnetd"))
}

/// Runs a `generate --json` command, checks that it succeeded and returns its JSON line.
pub fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("running bitnetd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}
