//! The Python interpreter with qemu.qmp that the real-client tests run, from the venv that
//! `scripts/install-test-deps` creates.

use std::path::{Path, PathBuf};

use tokio::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `<workspace>/.venv/bin/python`, or `$QMP_TEST_PYTHON`. Missing prerequisites fail loudly:
/// a skipped interop test would look like a passing one.
pub async fn python() -> PathBuf {
    let python = std::env::var_os("QMP_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let hint = "run scripts/install-test-deps (or set QMP_TEST_PYTHON to a python with qemu.qmp)";
    let probe = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {hint}", python.display()));
    assert!(
        probe.status.success(),
        "{} cannot import qemu.qmp: {}; {hint}",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    python
}

/// How long one Python client script may run before it counts as hung.
pub const SCRIPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `tests/python/<script> ARGS...` with [`python`]; panics with its output, and with
/// `context()` (e.g. the server's log), unless it succeeds.
pub async fn run_script(script: &str, args: &[&Path], context: impl FnOnce() -> String) {
    let python = python().await;
    let start = std::time::Instant::now();
    let run = Command::new(&python)
        .arg(workspace().join("tests/python").join(script))
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish in {SCRIPT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}{}",
        output.status,
        context()
    );
    eprint!("{stdout}{stderr}");
    eprintln!("{script}: {:?}", start.elapsed());
}
