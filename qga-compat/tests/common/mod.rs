//! Shared test helpers: scratch directories, the 7.2 stub agent, and a raw line client.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use qmp_dispatcher::{Command, QmpReturn};
use qmp_qga::{GuestAgent, GuestAgentBuilder};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a test waits for a reply line.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the recorded qemu-ga 7.2 transcripts live: the workspace's `tests/data/` (see its
/// README), part of the repository.
pub fn transcripts_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/qemu-ga-7.2"
    ))
}

/// A fresh scratch directory (a [`tempfile::TempDir`]), removed on drop. The same thin
/// wrapper as `qmp_tests::Scratch`: this crate cannot depend on qmp-tests (a cycle).
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    /// Creates a fresh directory under the system temp dir.
    pub fn new() -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix("qmp-qga-")
                .tempdir()
                .expect("create scratch dir"),
        )
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// qemu-ga 7.2's commands after the built-ins, in its registration order (its schema order,
/// the reverse of `guest-info`'s list in transcript 08). `None` marks where guest-info goes.
pub const QGA_72_COMMANDS: [Option<&str>; 39] = [
    Some("guest-get-time"),
    Some("guest-set-time"),
    None,
    Some("guest-shutdown"),
    Some("guest-file-open"),
    Some("guest-file-close"),
    Some("guest-file-read"),
    Some("guest-file-write"),
    Some("guest-file-seek"),
    Some("guest-file-flush"),
    Some("guest-fsfreeze-status"),
    Some("guest-fsfreeze-freeze"),
    Some("guest-fsfreeze-freeze-list"),
    Some("guest-fsfreeze-thaw"),
    Some("guest-fstrim"),
    Some("guest-suspend-disk"),
    Some("guest-suspend-ram"),
    Some("guest-suspend-hybrid"),
    Some("guest-network-get-interfaces"),
    Some("guest-get-vcpus"),
    Some("guest-set-vcpus"),
    Some("guest-get-disks"),
    Some("guest-get-fsinfo"),
    Some("guest-set-user-password"),
    Some("guest-get-memory-blocks"),
    Some("guest-set-memory-blocks"),
    Some("guest-get-memory-block-info"),
    Some("guest-exec-status"),
    Some("guest-exec"),
    Some("guest-get-host-name"),
    Some("guest-get-users"),
    Some("guest-get-timezone"),
    Some("guest-get-osinfo"),
    Some("guest-get-devices"),
    Some("guest-ssh-get-authorized-keys"),
    Some("guest-ssh-add-authorized-keys"),
    Some("guest-ssh-remove-authorized-keys"),
    Some("guest-get-diskstats"),
    Some("guest-get-cpustats"),
];

/// The time the stub `guest-get-time` reports: the one in transcript 08.
pub const STUB_TIME: i64 = 1795421840489761000;

/// A stub with qemu-ga's name and flags; answers `{}` except where a transcript needs more.
fn stub(name: &str) -> Command {
    let reply = match name {
        "guest-get-time" => json!(STUB_TIME),
        "guest-fsfreeze-status" => json!("thawed"),
        "guest-get-host-name" => json!({"host-name": "stub"}),
        _ => json!({}),
    };
    let command = Command::raw(name, move |_: Map<String, Value>, _, ret: QmpReturn| {
        ret.ok(&reply)
    });
    match name {
        "guest-shutdown" | "guest-suspend-disk" | "guest-suspend-ram" | "guest-suspend-hybrid" => {
            command.no_success_response()
        }
        // Not supported on Linux in 7.2: disabled at startup, no reason.
        "guest-get-devices" => command.disabled(None),
        _ => command,
    }
}

/// A builder holding stubs for every qemu-ga 7.2 command, registered in its order.
pub fn qga72_builder() -> GuestAgentBuilder {
    let mut builder = GuestAgent::builder().version("7.2.22");
    for slot in QGA_72_COMMANDS {
        builder = match slot {
            Some(name) => builder.command(stub(name)),
            None => builder.guest_info_here(),
        };
    }
    builder
}

/// Reads one `\n`-terminated line (including the `\n`) from `reader`, keeping extra bytes in
/// `pending`; `None` on EOF or timeout.
pub async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut R,
    pending: &mut Vec<u8>,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            return Some(pending.drain(..=end).collect());
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout_at(deadline, reader.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&chunk[..n]);
    }
}
