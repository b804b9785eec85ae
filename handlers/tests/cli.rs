//! `qmp-demo` command-line errors.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! `qmp-demo` binary itself (not just its unit-test harness), which the qmp-tests suite in
//! `tests/tests/demo.rs` runs as a process.

use std::process::{Command, Output};

fn qmp_demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmp-demo"))
        .args(args)
        .output()
        .expect("run qmp-demo")
}

#[test]
fn listen_address_needs_a_scheme() {
    let output = qmp_demo(&["--qmp", "qmp.sock"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected unix:PATH or tcp:HOST:PORT, got 'qmp.sock'"),
        "{stderr}"
    );
}

#[test]
fn unbindable_socket_is_reported_with_its_path() {
    let path = std::env::temp_dir()
        .join(format!("qmp-demo-cli-missing-{}", std::process::id()))
        .join("qmp.sock");
    let output = qmp_demo(&["--qmp", &format!("unix:{}", path.display())]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {}", path.display())),
        "{stderr}"
    );
}

#[test]
fn qga_listens_on_unix_only() {
    let dir = std::env::temp_dir().join(format!("qmp-demo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("qmp.sock");
    let output = qmp_demo(&[
        "--qmp",
        &format!("unix:{}", socket.display()),
        "--qga",
        "tcp:127.0.0.1:0",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--qga takes unix:PATH"), "{stderr}");
}
