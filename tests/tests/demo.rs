//! The `qmp-demo` binary started as a process and driven over its sockets by real clients:
//! qemu.qmp scripts (`tests/python/demo_*.py`) and `qmp-shell`, from the venv that
//! `scripts/install-test-deps` creates, plus our raw Rust client for `quit` and signals.
//!
//! `qmp-demo` belongs to qmp-handlers, so `CARGO_BIN_EXE_qmp-demo` is not available here; the
//! binary is found next to this test's executable. `cargo test --workspace` builds it (the
//! qmp-handlers integration tests need it); `cargo test -p qmp-tests` alone does not.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use qmp_tests::venv::{self, python, workspace};
use qmp_tests::{Client, Scratch, error_reply, return_reply};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// A client's budget: generous, a hung client must not hang CI.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the demo to bind its sockets, or to exit once told to.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a 1920x1080 PPM: header plus RGB.
const PPM_SIZE: u64 = b"P6\n1920 1080\n255\n".len() as u64 + 1920 * 1080 * 3;

/// `target/<profile>/qmp-demo`, checked to exist and to be newer than the sources it is
/// built from, so a stale binary does not test old code.
fn demo_binary() -> PathBuf {
    // This test runs as target/<profile>/deps/demo-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let binary = profile_dir.join("qmp-demo");
    let hint = "`cargo test -p qmp-tests` does not build other packages' binaries: run \
                `cargo build -p qmp-handlers` (same profile) first, or `cargo test --workspace`";
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {hint}", binary.display()));
    for crate_dir in ["handlers", "dispatcher", "qga-compat"] {
        if let Some(source) = newer_source(&workspace().join(crate_dir).join("src"), built) {
            panic!(
                "{} is older than {}; {hint}",
                binary.display(),
                source.display()
            );
        }
    }
    binary
}

/// A `.rs` file under `dir` modified after `than`.
fn newer_source(dir: &Path, than: SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            if let Some(found) = newer_source(&path, than) {
                return Some(found);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && meta.modified().is_ok_and(|m| m > than)
        {
            return Some(path);
        }
    }
    None
}

/// A running `qmp-demo` with its QMP socket (and optionally a guest-agent socket) in a scratch
/// directory. Dropping it kills the process (`kill_on_drop`) before the directory goes.
struct Demo {
    child: Child,
    qmp: PathBuf,
    qga: Option<PathBuf>,
    /// Where screendumps go: a directory of their own, so leftovers are easy to spot.
    shots: PathBuf,
    log: PathBuf,
    _scratch: Scratch,
}

impl Demo {
    async fn start(extra_args: &[&str]) -> Self {
        Self::spawn(false, extra_args).await
    }

    async fn start_with_qga() -> Self {
        Self::spawn(true, &[]).await
    }

    async fn spawn(with_qga: bool, extra_args: &[&str]) -> Self {
        let scratch = Scratch::new();
        let qmp = scratch.path("qmp.sock");
        let qga = with_qga.then(|| scratch.path("qga.sock"));
        let shots = scratch.path("shots");
        std::fs::create_dir(&shots).unwrap();
        // The log goes to a file, not a pipe nobody drains; it is shown when a test fails.
        let log = scratch.path("demo.log");
        let mut command = Command::new(demo_binary());
        command
            .arg("--qmp")
            .arg(format!("unix:{}", qmp.display()))
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true);
        if let Some(qga) = &qga {
            command.arg("--qga").arg(format!("unix:{}", qga.display()));
        }
        let child = command.spawn().expect("spawn qmp-demo");
        let mut demo = Demo {
            child,
            qmp,
            qga,
            shots,
            log,
            _scratch: scratch,
        };
        // The socket files appear once bound, and binding also listens.
        let sockets: Vec<PathBuf> = [Some(demo.qmp.clone()), demo.qga.clone()]
            .into_iter()
            .flatten()
            .collect();
        let start = Instant::now();
        while !sockets.iter().all(|s| s.exists()) {
            if let Ok(Some(status)) = demo.child.try_wait() {
                panic!("qmp-demo exited with {status}:\n{}", demo.log());
            }
            assert!(
                start.elapsed() < PROCESS_TIMEOUT,
                "qmp-demo did not bind its sockets:\n{}",
                demo.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        demo
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn shot(&self, name: &str) -> PathBuf {
        self.shots.join(name)
    }

    /// Runs `tests/python/<script> QMP_SOCKET [SHOTS_DIR]`; panics with its output and the
    /// demo's log unless it succeeds.
    async fn run_script(&self, script: &str, with_shots: bool) {
        let mut args = vec![self.qmp.as_path()];
        if with_shots {
            args.push(&self.shots);
        }
        venv::run_script(script, &args, || format!("--- qmp-demo\n{}", self.log())).await;
    }

    /// Feeds `input` to `qmp-shell [flags] SOCKET` and returns what it printed.
    async fn qmp_shell(&self, socket: &Path, flags: &[&str], input: &str) -> String {
        // The module rather than .venv/bin/qmp-shell, so QMP_TEST_PYTHON is honoured too.
        let mut child = Command::new(python().await)
            .args(["-m", "qemu.qmp.qmp_shell"])
            .args(flags)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qmp-shell");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        // EOF ends the shell's loop.
        drop(stdin);
        let output = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
            .await
            .expect("qmp-shell did not finish")
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "qmp-shell failed ({}):\n--- stdout\n{stdout}--- stderr\n{}--- qmp-demo\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        stdout
    }

    /// Sends `signal` (e.g. `TERM`) to this process only.
    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        // sh's builtin kill: no extra dependency and no procps needed on the CI machine.
        let killed = Command::new("sh")
            .args(["-c", &format!("kill -{signal} \"$0\""), &pid])
            .status()
            .await
            .expect("run sh");
        assert!(killed.success());
    }

    async fn wait_exit(&mut self, why: &str) -> ExitStatus {
        tokio::time::timeout(PROCESS_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("qmp-demo did not exit after {why}:\n{}", self.log()))
            .unwrap()
    }
}

/// The JSON objects in qmp-shell's output: one per reply line, after any `(QEMU) ` prompts.
fn shell_replies(output: &str) -> Vec<Value> {
    output
        .lines()
        .map(|line| line.trim_start_matches("(QEMU) "))
        .filter(|line| line.starts_with('{') && line.contains('"'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[tokio::test]
async fn screendump_writes_ppm_and_png_and_reports_errors() {
    let demo = Demo::start(&[]).await;
    demo.run_script("demo_screendump.py", true).await;
}

#[tokio::test]
async fn stop_and_cont_reach_every_client() {
    let demo = Demo::start(&[]).await;
    demo.run_script("demo_run_state.py", false).await;
}

#[tokio::test]
async fn concurrent_screendumps_from_one_client() {
    let demo = Demo::start(&[]).await;
    demo.run_script("demo_screendump_batch.py", true).await;
}

#[tokio::test]
async fn cancelled_or_abandoned_screendump_leaves_no_file() {
    // 18 checks of 20 ms: a dump takes ~0.4 s, long enough to see it half written.
    let demo = Demo::start(&["--screendump-chunk-delay-ms", "20"]).await;
    demo.run_script("demo_screendump_cancel.py", true).await;
}

#[tokio::test]
async fn qmp_shell_session() {
    let demo = Demo::start(&[]).await;
    let shot = demo.shot("shell.ppm");
    // The empty line makes qmp-shell print the events it has received.
    let input = format!(
        "query-status\nstop\n\nquery-status\nquery-version\nscreendump filename={}\n",
        shot.display()
    );
    let start = Instant::now();
    let output = demo.qmp_shell(&demo.qmp, &[], &input).await;
    eprintln!("qmp-shell: {:?}", start.elapsed());
    assert!(
        output.contains("Welcome to the QMP low-level shell!"),
        "{output}"
    );
    assert!(output.contains("Connected to QEMU 10.0.0"), "{output}");
    // qmp-shell prints events as Python dicts, not JSON.
    assert!(output.contains("'event': 'STOP'"), "{output}");

    let replies = shell_replies(&output);
    assert_eq!(replies.len(), 5, "{output}");
    assert_eq!(
        replies[0],
        json!({"return": {"running": true, "status": "running"}})
    );
    assert_eq!(replies[1], json!({"return": {}}));
    assert_eq!(
        replies[2],
        json!({"return": {"running": false, "status": "paused"}})
    );
    assert_eq!(
        replies[3]["return"]["qemu"],
        json!({"major": 10, "minor": 0, "micro": 0})
    );
    assert!(
        replies[3]["return"]["package"]
            .as_str()
            .is_some_and(|p| p.starts_with("qmp-demo ")),
        "{}",
        replies[3]
    );
    assert_eq!(replies[4], json!({"return": {}}));
    assert_eq!(std::fs::metadata(&shot).unwrap().len(), PPM_SIZE);
}

#[tokio::test]
async fn guest_agent_over_qmp_shell() {
    let demo = Demo::start_with_qga().await;
    let qga = demo.qga.clone().unwrap();
    // -N: qemu-ga sends no greeting and has no qmp_capabilities.
    let output = demo
        .qmp_shell(&qga, &["-N"], "guest-ping\nguest-sync id=5\n")
        .await;
    assert!(output.contains("Connected"), "{output}");
    assert_eq!(
        shell_replies(&output),
        [json!({"return": {}}), json!({"return": 5})],
        "{output}"
    );
}

/// Asserts `msg` is `SHUTDOWN {"guest": false, "reason": reason}` with a timestamp.
fn assert_shutdown(msg: &Value, reason: &str) {
    assert_eq!(msg["event"], "SHUTDOWN", "{msg}");
    assert_eq!(
        msg["data"],
        json!({"guest": false, "reason": reason}),
        "{msg}"
    );
    assert!(msg["timestamp"]["seconds"].is_u64(), "{msg}");
}

#[tokio::test]
async fn quit_sends_shutdown_then_replies_then_exits_cleanly() {
    let mut demo = Demo::start(&[]).await;
    let mut client = Client::negotiated(&demo.qmp, &[]).await;
    let mut watcher = Client::negotiated(&demo.qmp, &[]).await;
    client.execute("quit", json!({}), json!("bye")).await;
    // As qemu-system-x86_64 10.0.2 does (conformance transcripts 08-quit.jsonl and
    // 09-quit-repeat.jsonl): the event first, then the reply, then EOF; a client that only
    // watches gets the event too.
    assert_shutdown(&client.recv().await, "host-qmp-quit");
    assert_eq!(client.recv().await, return_reply(json!({}), json!("bye")));
    client.expect_eof().await;
    assert_shutdown(&watcher.recv().await, "host-qmp-quit");
    watcher.expect_eof().await;

    let status = demo.wait_exit("quit").await;
    assert!(status.success(), "qmp-demo exited with {status}");
    assert!(!demo.qmp.exists(), "socket left behind");
}

#[tokio::test]
async fn quit_from_qemu_qmp_sends_shutdown_to_every_client() {
    let mut demo = Demo::start(&[]).await;
    demo.run_script("demo_shutdown.py", false).await;
    let status = demo.wait_exit("quit").await;
    assert!(status.success(), "qmp-demo exited with {status}");
}

#[tokio::test]
async fn signals_send_shutdown_exit_cleanly_and_remove_sockets() {
    // SIGHUP ends the demo like SIGTERM, as it ends QEMU and qemu-storage-daemon.
    for signal in ["TERM", "INT", "HUP"] {
        let mut demo = Demo::spawn(true, &["--qmp", "tcp:127.0.0.1:0"]).await;
        // A negotiated client is connected: shutting down must not wait for it to leave.
        let mut client = Client::negotiated(&demo.qmp, &["oob"]).await;
        // Still negotiating: QEMU sends it no events, only EOF.
        let mut greeted = Client::connect(&demo.qmp).await;
        greeted.greeting().await;

        demo.signal(signal).await;
        // 10-sigterm.jsonl, 11-sigint-sighup.jsonl: SHUTDOWN with reason host-signal, then EOF.
        assert_shutdown(&client.recv().await, "host-signal");
        client.expect_eof().await;
        greeted.expect_eof().await;
        let status = demo.wait_exit(&format!("SIG{signal}")).await;
        assert!(
            status.success(),
            "SIG{signal}: qmp-demo exited with {status}"
        );
        assert!(!demo.qmp.exists(), "SIG{signal}: QMP socket left behind");
        let qga = demo.qga.as_ref().unwrap();
        assert!(!qga.exists(), "SIG{signal}: guest-agent socket left behind");
    }
}

#[tokio::test]
async fn screendump_filename_of_the_wrong_type_gets_qemus_text() {
    let demo = Demo::start(&[]).await;
    let mut client = Client::negotiated(&demo.qmp, &[]).await;
    client
        .execute("screendump", json!({"filename": 42}), json!(1))
        .await;
    // QEMU's text; serde's own for a PathBuf would be "expected: path string".
    assert_eq!(
        client.recv_reply().await,
        error_reply(
            Some(json!(1)),
            "GenericError",
            "Invalid parameter type for 'filename', expected: string"
        )
    );
}

#[tokio::test]
async fn readonly_listener_timeouts_and_metrics_from_the_command_line() {
    let scratch = Scratch::new();
    let read_only = scratch.path("ro.sock");
    let demo = Demo::start(&[
        "--qmp",
        &format!("unix:{},readonly", read_only.display()),
        "--timeout",
        "x-delay=100",
        "--metrics",
        "--audit",
    ])
    .await;
    let start = Instant::now();
    while !read_only.exists() {
        assert!(start.elapsed() < PROCESS_TIMEOUT, "{}", demo.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut full = Client::negotiated(&demo.qmp, &[]).await;
    full.execute("x-delay", json!({"ms": 1000}), json!(1)).await;
    let reply = full.recv_reply().await;
    let text = "Command x-delay timed out after 100 ms";
    assert_eq!(reply, error_reply(Some(json!(1)), "GenericError", text));

    let mut ro = Client::negotiated(&read_only, &[]).await;
    ro.execute("query-commands", json!({}), json!(2)).await;
    let reply = ro.recv_reply().await;
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"query-status") && !names.contains(&"stop"),
        "{names:?}"
    );
    ro.execute("stop", json!({}), json!(3)).await;
    let text = "The command stop has not been found";
    assert_eq!(
        ro.recv_reply().await,
        error_reply(Some(json!(3)), "CommandNotFound", text)
    );

    demo.signal("USR1").await;
    let start = Instant::now();
    while !demo.log().contains("qmp_commands_total") {
        assert!(
            start.elapsed() < PROCESS_TIMEOUT,
            "no metrics:\n{}",
            demo.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = demo.log();
    assert!(log.contains(r#"outcome="timed-out""#), "{log}");
    assert!(log.contains("qmp_clients_connected 2"), "{log}");
    // --audit: the trail names the refused command and its policy.
    assert!(
        log.lines().any(|l| l.contains("qmp_dispatcher::audit")
            && l.contains(r#"command="stop""#)
            && l.contains(r#"outcome="refused""#)
            && l.contains(r#"policy="read-only""#)),
        "{log}"
    );
}
