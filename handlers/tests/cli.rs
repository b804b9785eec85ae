//! `qmp-demo` command-line errors.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! `qmp-demo` binary itself (not just its unit-test harness), which the qmp-tests suite in
//! `tests/tests/demo.rs` runs as a process.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a demo that should refuse to start may take to exit, or a started one to bind.
const TIMEOUT: Duration = Duration::from_secs(10);

fn demo_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qmp-demo"));
    command
        .args(args)
        // Colour must follow the terminal test, not the environment of whoever runs the tests.
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs qmp-demo to completion; a demo still running after [`TIMEOUT`] (one that started
/// when it should have refused to) is killed and fails the test.
fn qmp_demo(args: &[&str]) -> Output {
    let mut child = demo_command(args).spawn().expect("run qmp-demo");
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!(
                "qmp-demo {args:?} still running after {TIMEOUT:?}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts qmp-demo refused to start (clap's usage error, exit 2) with `message`.
fn assert_refused(args: &[&str], message: &str) {
    let output = qmp_demo(args);
    let stderr = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(stderr.contains(message), "{args:?}: {stderr}");
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qmp-demo-cli-")
        .tempdir()
        .unwrap()
}

fn unix(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// A started qmp-demo, its stderr going to a file; killed on drop.
struct Running {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Running {
    /// Starts qmp-demo and waits until `socket` accepts connections.
    fn start(args: &[&str], socket: &Path) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = demo_command(args)
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start qmp-demo");
        let mut running = Running { child, log };
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("qmp-demo exited with {status}: {}", running.stop());
            }
            assert!(Instant::now() < deadline, "qmp-demo never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        running
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    /// Waits until stderr contains `text`, and returns all of it.
    fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the demo and returns what it wrote to stderr.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let stderr = stderr(&output);
    assert!(
        stderr.contains(&format!("cannot listen on {}", path.display())),
        "{stderr}"
    );
    // stderr is a pipe here, not a terminal: no colour codes in the log.
    assert!(!stderr.contains('\x1b'), "ANSI escape in {stderr:?}");
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

#[test]
fn help_and_version_name_qmp_demo() {
    let help = qmp_demo(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.starts_with("A QEMU-like VMM monitor"), "{text}");
    assert!(text.contains("Usage: qmp-demo "), "{text}");
    assert!(!text.contains("qmp-handlers"), "{text}");

    let version = qmp_demo(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("qmp-demo {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn an_empty_unix_path_is_refused() {
    assert_refused(&["--qmp", "unix:"], "unix: needs a socket path");
    let dir = scratch();
    let qmp = unix(&dir.path().join("qmp.sock"));
    assert_refused(
        &["--qmp", &qmp, "--qga", "unix:"],
        "unix: needs a socket path",
    );
}

#[test]
fn the_same_socket_path_twice_is_refused() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let qmp = unix(&path);
    assert_refused(
        &["--qmp", &qmp, "--qmp", &qmp],
        &format!("--qmp {qmp} is the same socket as --qmp {qmp}"),
    );
    // The guest agent used to take the QMP socket over silently.
    assert_refused(
        &["--qmp", &qmp, "--qga", &qmp],
        &format!("--qga {qmp} is the same socket as --qmp {qmp}"),
    );
    // Spelled differently: relative, `./`, `dir/../`.
    let dir_path = dir.path().to_str().unwrap();
    let relative: PathBuf = pathdiff(dir.path());
    let dotted = format!("unix:{}/./qmp.sock", relative.display());
    let parent = format!("unix:{dir_path}/sub/../qmp.sock");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    assert_refused(&["--qmp", &qmp, "--qga", &dotted], "is the same socket as");
    assert_refused(&["--qmp", &parent, "--qmp", &qmp], "is the same socket as");
    assert!(!path.exists(), "nothing may listen");
}

/// `dir` relative to the current directory, through `..` components.
fn pathdiff(dir: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let ups = cwd.components().count() - 1;
    let mut relative = PathBuf::new();
    for _ in 0..ups {
        relative.push("..");
    }
    relative.join(dir.strip_prefix("/").unwrap())
}

#[test]
fn a_bad_qga_value_is_refused_before_anything_listens() {
    let dir = scratch();
    // A stale socket file at the QMP path: binding would replace it. Refusing the arguments
    // first leaves it untouched.
    let path = dir.path().join("qmp.sock");
    drop(UnixListener::bind(&path).unwrap());
    let stale = std::fs::metadata(&path).unwrap();
    assert_refused(
        &["--qmp", &unix(&path), "--qga", "tcp:127.0.0.1:0"],
        "--qga takes unix:PATH",
    );
    let after = std::fs::metadata(&path).expect("the stale socket is still there");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(after.ino(), stale.ino(), "the socket file was replaced");
}

#[test]
fn a_socket_mode_beyond_0o777_is_refused() {
    let dir = scratch();
    let qmp = unix(&dir.path().join("qmp.sock"));
    for mode in ["1000", "4755", "7777"] {
        assert_refused(
            &["--qmp", &qmp, "--socket-mode", mode],
            &format!("mode '{mode}' is not a permission mode"),
        );
    }
    assert_refused(&["--qmp", &qmp, "--socket-mode", "8"], "bad octal mode");
}

#[test]
fn a_second_demo_does_not_take_a_live_socket() {
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let qmp = unix(&path);
    let first = Running::start(&["--qmp", &qmp], &path);

    let second = qmp_demo(&["--qmp", &qmp]);
    let second_err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{second_err}");
    assert!(
        second_err.contains(&format!("cannot listen on {}", path.display()))
            && second_err.contains("is in use"),
        "{second_err}"
    );
    // The first demo still owns the path: a client gets its greeting.
    let mut client = UnixStream::connect(&path).expect("first demo reachable");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 7];
    client.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"{\"QMP\":");

    // On start it said where it listens, how to connect and how to stop.
    let banner = first.wait_for_log("stop with Ctrl-C");
    assert!(
        banner.contains(&format!(
            "QMP on {qmp}; connect with: qmp-shell {}",
            path.display()
        )),
        "{banner}"
    );
}

#[test]
fn the_start_message_names_every_listener() {
    let dir = scratch();
    let qmp = dir.path().join("qmp.sock");
    let qga = dir.path().join("qga.sock");
    let demo = Running::start(
        &[
            "--qmp",
            &unix(&qmp),
            "--qmp",
            "tcp:127.0.0.1:0",
            "--qga",
            &unix(&qga),
        ],
        &qga,
    );
    let banner = demo.wait_for_log("stop with Ctrl-C");
    assert!(
        banner.contains(&format!("qmp-shell {}", qmp.display())),
        "{banner}"
    );
    assert!(
        banner.contains("QMP on tcp:127.0.0.1:") && !banner.contains("tcp:127.0.0.1:0;"),
        "the TCP line shows the port chosen: {banner}"
    );
    assert!(
        banner.contains(&format!("connect with: qmp-shell -N {}", qga.display())),
        "{banner}"
    );
}

#[test]
fn max_bytes_limits_one_request() {
    use std::io::{BufRead, BufReader, Write};
    let dir = scratch();
    let path = dir.path().join("qmp.sock");
    let _demo = Running::start(&["--qmp", &unix(&path), "--max-bytes", "1000"], &path);
    let stream = UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\""), "{line}");
    let big = "x".repeat(2000);
    write!(
        writer,
        r#"{{"execute":"qmp_capabilities"}}{{"execute":"query-status","id":"{big}"}}{{"execute":"query-status","id":2}}"#
    )
    .unwrap();
    let mut replies = Vec::new();
    for _ in 0..3 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        replies.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(replies[0], serde_json::json!({"return": {}}));
    assert_eq!(
        replies[1]["error"]["desc"], "JSON token size limit exceeded",
        "{replies:?}"
    );
    assert_eq!(replies[2]["id"], 2, "the connection survives: {replies:?}");
}
