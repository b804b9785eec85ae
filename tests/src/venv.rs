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
