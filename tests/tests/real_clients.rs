//! Real clients against our server: qemu.qmp (Python, from the venv that
//! `scripts/install-test-deps` creates) talking to the `qmp-test-server` binary, and qapi-rs
//! (Rust) talking to an in-process server.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use qmp_tests::venv;
use qmp_tests::{Scratch, TestServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `qmp-test-server` running on a socket in a scratch directory.
struct ServerProcess {
    child: Child,
    socket: PathBuf,
    _scratch: Scratch,
}

impl ServerProcess {
    async fn start(extra_args: &[&str]) -> Self {
        let scratch = Scratch::new();
        let socket = scratch.path("qmp.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_qmp-test-server"))
            .arg("--socket")
            .arg(&socket)
            .args(extra_args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qmp-test-server");
        // The server says `ready` once it listens.
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("qmp-test-server did not become ready")
            .expect("read qmp-test-server stdout");
        assert_eq!(
            line.as_deref(),
            Some("ready"),
            "qmp-test-server failed to start"
        );
        ServerProcess {
            child,
            socket,
            _scratch: scratch,
        }
    }

    /// Runs `tests/python/<script> SOCKET`; panics with its output unless it succeeds.
    async fn run_script(&self, script: &str) {
        venv::run_script(script, &[self.socket.as_path()], String::new).await;
    }

    /// SIGTERM, as a service manager would stop it: exits cleanly and removes its socket.
    async fn stop(mut self) {
        let pid = self.child.id().expect("still running").to_string();
        // sh's builtin kill: no extra dependency and no procps needed on the CI machine.
        let killed = Command::new("sh")
            .args(["-c", "kill -TERM \"$0\"", &pid])
            .status()
            .await
            .expect("run sh");
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("qmp-test-server ignored SIGTERM")
            .unwrap();
        assert!(status.success(), "qmp-test-server exited with {status}");
        assert!(!self.socket.exists(), "socket left behind");
    }
}

#[tokio::test]
async fn qemu_qmp_legacy_session() {
    let server = ServerProcess::start(&[]).await;
    server.run_script("legacy_session.py").await;
    server.stop().await;
}

#[tokio::test]
async fn qemu_qmp_async_session() {
    // Above the script's 200 concurrent commands, so they all run at once.
    let server = ServerProcess::start(&["--max-in-flight", "256"]).await;
    server.run_script("async_session.py").await;
    server.stop().await;
}

/// Our `fail` test command, typed for qapi-rs.
#[derive(serde::Serialize)]
struct Fail {}

impl qapi::Command for Fail {
    type Ok = qapi::Empty;
    const NAME: &'static str = "fail";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for Fail {}

/// Our `echo` test command, typed for qapi-rs.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Echo {
    text: String,
    n: i64,
}

impl qapi::Command for Echo {
    type Ok = Echo;
    const NAME: &'static str = "echo";
    const ALLOW_OOB: bool = false;
}
impl qapi::qmp::QmpCommand for Echo {}

/// qapi-rs is a strict legacy client: it negotiates `enable: []`, sends id-less requests one
/// at a time, and drops the whole stream on an unknown error class or event name.
#[tokio::test]
async fn qapi_rs_legacy_client() {
    use qapi::ExecuteError;
    use qapi::futures::QmpStreamTokio;

    let server =
        TestServer::start_with(|b| b.version(qmp_dispatcher::VersionInfo::new(9, 2, 1, "demo-1")))
            .await;
    let negotiation = QmpStreamTokio::open_uds(&server.socket)
        .await
        .expect("connect and read the greeting");
    let greeting = &negotiation.capabilities.QMP;
    assert_eq!(
        (greeting.version.qemu.major, greeting.version.qemu.minor),
        (9, 2)
    );
    let (qmp, events) = negotiation
        .negotiate()
        .await
        .expect("negotiate")
        .spawn_tokio();

    let version = qmp.execute(qapi::qmp::query_version {}).await.unwrap();
    assert_eq!(
        (
            version.qemu.major,
            version.qemu.minor,
            version.qemu.micro,
            version.package.as_str()
        ),
        (9, 2, 1, "demo-1")
    );

    let echo = Echo {
        text: "hi".into(),
        n: 7,
    };
    let reply = qmp
        .execute(Echo {
            text: "hi".into(),
            n: 7,
        })
        .await
        .unwrap();
    assert_eq!(reply, echo);

    match qmp.execute(Fail {}).await {
        Err(ExecuteError::Qapi(e)) => {
            assert_eq!(e.class, qapi::ErrorClass::DeviceNotFound);
            assert_eq!(e.desc, "Device 'nope' not found");
            assert!(e.id.is_none(), "reply to an id-less request carries an id");
        }
        other => panic!("fail: expected DeviceNotFound, got {other:?}"),
    }
    // A command QEMU has and we don't.
    match qmp.execute(qapi::qmp::query_status {}).await {
        Err(ExecuteError::Qapi(e)) => {
            assert_eq!(e.class, qapi::ErrorClass::CommandNotFound);
            assert_eq!(e.desc, "The command query-status has not been found");
        }
        other => panic!("query-status: expected CommandNotFound, got {other:?}"),
    }

    // Concurrent callers are serialised by the client; every one still gets its reply.
    let qmp = std::sync::Arc::new(qmp);
    let calls: Vec<_> = (0..10)
        .map(|n| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                let echo = Echo {
                    text: format!("call {n}"),
                    n,
                };
                let reply = qmp
                    .execute(Echo {
                        text: echo.text.clone(),
                        n,
                    })
                    .await
                    .unwrap();
                assert_eq!(reply, echo);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }

    // The stream is still healthy: nothing we sent made qapi-rs drop it.
    assert!(!events.is_finished(), "qapi-rs event loop ended early");
    drop(qmp);
}
