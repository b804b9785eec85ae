//! Shared helpers for the integration tests: a server on a real Unix socket with test
//! commands, and a raw QMP client that speaks bytes and checks lines.

pub mod fuzz_checks;
pub mod fuzz_fds;
pub mod transcript;
pub mod venv;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_dispatcher::{
    Command, NoArgs, QmpError, QmpReturn, Registry, RegistryBuilder, Server, ServerBuilder,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long a test waits for a line before failing.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The recorded transcripts and QEMU data the tests read (`tests/data/`, see its README):
/// part of the repository, so a fresh clone needs nothing beside it.
pub const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");

/// A directory of [`DATA_DIR`], e.g. `data_dir("qemu-10.0")`.
pub fn data_dir(name: &str) -> PathBuf {
    Path::new(DATA_DIR).join(name)
}

/// A fresh scratch directory (a [`tempfile::TempDir`]), removed on drop.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    /// Creates a fresh directory under the system temp dir.
    pub fn new() -> Self {
        Scratch(
            tempfile::Builder::new()
                .prefix("qmp-tests-")
                .tempdir()
                .expect("create scratch dir"),
        )
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Deferred replies the test controls: `hold {key}` parks its `QmpReturn` here.
#[derive(Clone, Default)]
pub struct Holds {
    parked: Arc<Mutex<HashMap<String, QmpReturn>>>,
    /// Keys whose handler saw the cancellation, in order.
    cancelled: Arc<Mutex<Vec<String>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Holds {
    /// Waits until `key` is parked.
    pub async fn wait_parked(&self, key: &str) {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.notify.notified();
                if self.parked.lock().unwrap().contains_key(key) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{key} never parked"));
    }

    /// Answers the parked `key` with `value`.
    pub fn release(&self, key: &str, value: Value) {
        let ret = self
            .parked
            .lock()
            .unwrap()
            .remove(key)
            .unwrap_or_else(|| panic!("{key} not parked"));
        ret.ok(&value);
    }

    /// Takes the parked return out (to drop it, or answer it from elsewhere).
    pub fn take(&self, key: &str) -> QmpReturn {
        self.parked
            .lock()
            .unwrap()
            .remove(key)
            .unwrap_or_else(|| panic!("{key} not parked"))
    }

    /// Waits until the handler of `key` has observed its cancellation.
    pub async fn wait_cancelled(&self, key: &str) {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.notify.notified();
                if self.cancelled.lock().unwrap().iter().any(|k| k == key) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{key} never saw its cancellation"));
    }

    /// Takes every parked return out, with its key.
    pub fn take_all(&self) -> Vec<(String, QmpReturn)> {
        self.parked.lock().unwrap().drain().collect()
    }

    /// Number of returns currently parked.
    pub fn parked(&self) -> usize {
        self.parked.lock().unwrap().len()
    }
}

/// The panic message of the `panic` test command.
pub const HANDLER_PANIC: &str = "test handler panics on purpose";
/// The panic message of the `async-panic` test command.
pub const FUTURE_PANIC: &str = "test future panics on purpose";

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct HoldArgs {
    key: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DelayArgs {
    ms: u64,
}

/// The test commands, added to a registry with QMP's built-ins:
/// - `echo`: returns its arguments;
/// - `fail`: a `DeviceNotFound` error;
/// - `hold {key}`: deferred; parks its `QmpReturn` in [`Holds`] and records cancellation;
/// - `x-delay {ms}`: an async fn that sleeps (an hour at most);
/// - `panic`: a handler that panics; `async-panic`: one that panics in its future;
/// - `forget`: drops its `QmpReturn` without replying;
/// - `oob-echo`: allow-oob echo;
/// - `disabled-cmd`: disabled with a reason.
pub fn test_commands(builder: &mut RegistryBuilder, holds: &Holds) {
    let holds = holds.clone();
    builder
        .add(Command::raw(
            "echo",
            |arguments: serde_json::Map<String, Value>, _, ret: QmpReturn| ret.ok(&arguments),
        ))
        .unwrap()
        .add(Command::sync(
            "fail",
            |_: NoArgs, _| -> Result<(), QmpError> {
                Err(QmpError::device_not_found("Device 'nope' not found"))
            },
        ))
        .unwrap()
        .add(Command::deferred(
            "hold",
            move |args: HoldArgs, _, ret: QmpReturn| {
                let token = ret.cancellation_token();
                let holds = holds.clone();
                holds.parked.lock().unwrap().insert(args.key.clone(), ret);
                holds.notify.notify_waiters();
                tokio::spawn(async move {
                    token.cancelled().await;
                    // A real handler would release its resources here.
                    holds.parked.lock().unwrap().remove(&args.key);
                    holds.cancelled.lock().unwrap().push(args.key);
                    holds.notify.notify_waiters();
                });
            },
        ))
        .unwrap()
        .add(Command::async_fn(
            "x-delay",
            |args: DelayArgs, _| async move {
                // At most an hour, so a fuzzed session that outlives a day is hung, not slow.
                tokio::time::sleep(Duration::from_millis(args.ms.min(3_600_000))).await;
                Ok(json!({}))
            },
        ))
        .unwrap()
        .add(Command::sync(
            "panic",
            |_: NoArgs, _| -> Result<(), QmpError> { panic!("{HANDLER_PANIC}") },
        ))
        .unwrap()
        .add(Command::async_fn(
            "async-panic",
            |_: NoArgs, _| async move {
                tokio::task::yield_now().await;
                if true {
                    panic!("{FUTURE_PANIC}");
                }
                Ok(())
            },
        ))
        .unwrap()
        .add(Command::deferred(
            "forget",
            |_: NoArgs, _, ret: QmpReturn| drop(ret),
        ))
        .unwrap()
        .add(
            Command::raw(
                "oob-echo",
                |arguments: serde_json::Map<String, Value>, _, ret: QmpReturn| ret.ok(&arguments),
            )
            .allow_oob(),
        )
        .unwrap()
        .add(Command::sync("disabled-cmd", |_: NoArgs, _| Ok(())).disabled(Some("for testing")))
        .unwrap();
}

/// The resident set size of this process, in bytes (`VmRSS` in `/proc/self/status`).
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib << 10
}

/// This process's user and group ids, as the owner of `/proc/self` (what a Unix-socket
/// peer's credentials report), without a libc binding.
pub fn own_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self").expect("/proc/self");
    (meta.uid(), meta.gid())
}

/// A server on a Unix socket in a scratch directory.
pub struct TestServer {
    /// The server, for stats, events and shutdown.
    pub server: Server,
    /// The test commands' parked returns.
    pub holds: Holds,
    /// Where it listens.
    pub socket: PathBuf,
    /// Events commands may emit without declaring them before the test fails (see `Drop`).
    undeclared_allowed: std::sync::atomic::AtomicUsize,
    _scratch: Scratch,
}

/// A test fails when a command emitted an event it did not declare (`Command::emits`):
/// the flag `Stats::undeclared_events` is checked when the server is dropped.
impl Drop for TestServer {
    fn drop(&mut self) {
        let allowed = self
            .undeclared_allowed
            .load(std::sync::atomic::Ordering::Relaxed);
        let flagged = self.server.stats().undeclared_events;
        if flagged > allowed && !std::thread::panicking() {
            panic!("{flagged} event(s) emitted by commands that do not declare them");
        }
    }
}

impl TestServer {
    /// Starts a server with the test commands and default configuration.
    pub async fn start() -> Self {
        Self::start_with(|b| b).await
    }

    /// Starts a server with the test commands and a customised configuration.
    pub async fn start_with(configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Self {
        let holds = Holds::default();
        let mut builder = Registry::builder();
        test_commands(&mut builder, &holds);
        let server = configure(Server::builder(builder.build())).build();
        Self::serve(server, holds)
    }

    /// Serves an already built server on a fresh socket.
    pub fn serve(server: Server, holds: Holds) -> Self {
        let scratch = Scratch::new();
        let socket = scratch.path("qmp.sock");
        let listener = qmp_dispatcher::bind_unix(&socket, 0o600).expect("bind");
        let accept = server.clone();
        tokio::spawn(async move { accept.serve_unix(listener).await });
        TestServer {
            server,
            holds,
            socket,
            undeclared_allowed: Default::default(),
            _scratch: scratch,
        }
    }

    /// Lets the test emit `n` undeclared events on purpose without failing.
    pub fn allow_undeclared_events(&self, n: usize) {
        self.undeclared_allowed
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connects a raw client (greeting not read yet).
    pub async fn connect(&self) -> Client {
        Client::connect(&self.socket).await
    }

    /// Connects, reads the greeting and negotiates `caps`.
    pub async fn negotiated(&self, caps: &[&str]) -> Client {
        Client::negotiated(&self.socket, caps).await
    }

    /// Waits until the server's totals satisfy `done` (or fails after [`TIMEOUT`]).
    pub async fn wait_stats(&self, what: &str, done: impl Fn(qmp_dispatcher::Stats) -> bool) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let stats = self.server.stats();
            if done(stats) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A raw QMP client over a Unix socket.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    /// Connects to `path`.
    pub async fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).await.expect("connect");
        let (reader, writer) = stream.into_split();
        Client {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// Connects to `path`, reads the greeting and negotiates `caps`.
    pub async fn negotiated(path: &Path, caps: &[&str]) -> Self {
        let mut client = Self::connect(path).await;
        client.greeting().await;
        client.negotiate(caps).await;
        client
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).await.expect("send");
    }

    /// Sends a JSON value (no newline, as qemu.qmp does).
    pub async fn send_json(&mut self, value: &Value) {
        self.send(serde_json::to_vec(value).unwrap()).await;
    }

    /// Reads one raw line including its ending; panics on timeout or EOF.
    pub async fn recv_line(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("timed out waiting for a line")
            .expect("read");
        assert!(n > 0, "unexpected EOF");
        line
    }

    /// Reads one message; checks it ends in CRLF.
    pub async fn recv(&mut self) -> Value {
        let line = self.recv_line().await;
        assert!(
            line.ends_with(b"\r\n"),
            "line does not end in CRLF: {:?}",
            String::from_utf8_lossy(&line)
        );
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(&line)))
    }

    /// Reads the next message that is not an event.
    pub async fn recv_reply(&mut self) -> Value {
        loop {
            let msg = self.recv().await;
            if msg.get("event").is_none() {
                return msg;
            }
        }
    }

    /// Asserts nothing arrives within `ms`.
    pub async fn expect_silence(&mut self, ms: u64) {
        let mut byte = [0u8; 1];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(ms), self.reader.read(&mut byte)).await
        {
            panic!("expected silence, got {read:?} {:?}", byte);
        }
    }

    /// Asserts the server closes the connection.
    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.reader.read_to_end(&mut rest))
            .await
            .expect("timed out waiting for EOF")
            .expect("read");
        assert!(
            rest.is_empty(),
            "data before EOF: {}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// Asserts the server closes the connection, with nothing but events before.
    pub async fn expect_eof_after_events(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.reader.read_to_end(&mut rest))
            .await
            .expect("timed out waiting for EOF")
            .expect("read");
        for line in rest.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let message: Value = serde_json::from_slice(line).expect("a JSON line");
            assert!(message.get("event").is_some(), "data before EOF: {message}");
        }
    }

    /// Reads and returns the greeting.
    pub async fn greeting(&mut self) -> Value {
        let greeting = self.recv().await;
        assert!(greeting.get("QMP").is_some(), "not a greeting: {greeting}");
        greeting
    }

    /// Negotiates `caps`; panics unless it succeeds.
    pub async fn negotiate(&mut self, caps: &[&str]) {
        self.send_json(&json!({"execute": "qmp_capabilities", "arguments": {"enable": caps}}))
            .await;
        assert_eq!(self.recv().await, json!({"return": {}}));
    }

    /// Sends a command with an id, returns the request JSON.
    pub async fn execute(&mut self, command: &str, arguments: Value, id: Value) {
        self.send_json(&json!({"execute": command, "arguments": arguments, "id": id}))
            .await;
    }

    /// Shuts down the sending side (half-close).
    pub async fn shutdown_write(&mut self) {
        self.writer.shutdown().await.expect("shutdown");
    }
}

/// `{"id": id, "error": {"class": class, "desc": desc}}`.
pub fn error_reply(id: Option<Value>, class: &str, desc: &str) -> Value {
    let mut reply = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// `{"return": value, "id": id}`.
pub fn return_reply(value: Value, id: Value) -> Value {
    json!({"return": value, "id": id})
}
