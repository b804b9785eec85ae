//! `qmp-demo`'s security defaults: no listener unless asked for, Unix sockets owner-only,
//! and no TCP socket unless `--qmp tcp:...` asks for one.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn qmp_demo_refuses_to_start_without_a_qmp_address() {
    let output = Command::new(env!("CARGO_BIN_EXE_qmp-demo"))
        .output()
        .expect("run qmp-demo");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--qmp"), "{stderr}");
}

/// Inodes of the TCP sockets in LISTEN state, from `/proc/net/tcp{,6}`.
fn listening_tcp_inodes() -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Field 3 is the state (0A = LISTEN), field 9 the inode.
            if fields.get(3) == Some(&"0A") {
                if let Some(inode) = fields.get(9) {
                    inodes.push((*inode).to_string());
                }
            }
        }
    }
    inodes
}

#[test]
fn qmp_demo_on_a_unix_socket_is_owner_only_and_opens_no_tcp_port() {
    let dir = std::env::temp_dir().join(format!("qmp-demo-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("qmp.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmp-demo"))
        .arg("--qmp")
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qmp-demo");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "qmp-demo never created its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    let listening = listening_tcp_inodes();
    let own_tcp: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            let inode = target.strip_prefix("socket:[")?.strip_suffix(']')?;
            listening
                .contains(&inode.to_string())
                .then(|| inode.to_string())
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert!(own_tcp.is_empty(), "qmp-demo listens on TCP: {own_tcp:?}");
}
