//! `qmp-shell -N` (qemu.qmp, the host-side tool for qemu-ga) against the agent.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::{Scratch, qga72_builder};
use tokio::io::AsyncWriteExt;

/// The qemu.qmp virtualenv that `scripts/install-test-deps` creates at the repository root.
fn qmp_shell() -> PathBuf {
    let shell = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/qmp-shell");
    assert!(
        shell.exists(),
        "{} is missing: run scripts/install-test-deps (it creates .venv with qemu.qmp)",
        shell.display()
    );
    shell
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_shell_skip_negotiation_talks_to_the_agent() {
    let shell = qmp_shell();
    let agent = qga72_builder().block(["guest-get-osinfo"]).build().unwrap();
    let scratch = Scratch::new();
    let socket = scratch.path("qga.sock");
    let listener = qmp_dispatcher::bind_unix(&socket, 0o600).unwrap();
    let serving = agent.clone();
    tokio::spawn(async move { serving.serve_unix(listener).await });

    let mut child = tokio::process::Command::new(&shell)
        .arg("-N")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start qmp-shell");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"guest-ping\nguest-sync id=42\nguest-get-osinfo\nguest-nope\nguest-get-time\n")
        .await
        .unwrap();
    drop(stdin);
    let output = tokio::time::timeout(common::TIMEOUT * 2, child.wait_with_output())
        .await
        .expect("qmp-shell finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "qmp-shell failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        r#"{"return": {}}"#,
        r#"{"return": 42}"#,
        r#"{"error": {"class": "CommandNotFound", "desc": "Command guest-get-osinfo has been disabled"}}"#,
        r#"{"error": {"class": "CommandNotFound", "desc": "The command guest-nope has not been found"}}"#,
        &format!(r#"{{"return": {}}}"#, common::STUB_TIME),
    ] {
        assert!(
            stdout.contains(expected),
            "qmp-shell output lacks {expected}:\n{stdout}\n{stderr}"
        );
    }
    agent.server().shutdown();
}
