//! File-descriptor passing over real sockets (issue 13): the QEMU 10.0 transcripts of
//! `data/qemu-10.0-fds` replayed with real fds (pipe write ends and regular files, watched
//! as the recorder watched them), the positional rule under pipelining, `oob` and `async`,
//! TCP, `screendump` into an fd set, qemu.qmp's `send_fd_scm()`, and fd-leak checks.
//!
//! Deviations from the recordings are listed in [`deviate`], each with its reason, and the
//! test fails if a listed deviation no longer applies.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use qmp_dispatcher::fd::is_fdset_path;
use qmp_dispatcher::{
    Access, Command, Context, FdLimits, FdsetFile, NoArgs, QmpError, QmpReturn, Registry, Server,
    VersionInfo,
};
use qmp_tests::{Scratch, TIMEOUT, data_dir, venv};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// Tests here count the process's open fds; the leak test takes this exclusively so that no
/// other test opens or closes fds meanwhile.
static FD_COUNTING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------------------
// The server: the fd built-ins plus the few QEMU commands the transcripts use.

#[derive(Default)]
struct Vm {
    paused: std::sync::atomic::AtomicBool,
    /// `blockdev-add` nodes: files opened from fd sets, held until `blockdev-del`.
    nodes: Mutex<HashMap<String, FdsetFile>>,
    /// Named fds taken by `x-hold-fd`, parked until the request is cancelled.
    held: Mutex<Vec<(OwnedFd, QmpReturn)>>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockdevAdd {
    driver: String,
    filename: String,
    node_name: String,
    read_only: Option<bool>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NodeName {
    node_name: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FdName {
    fdname: String,
}

fn status(vm: &Vm) -> Value {
    let paused = vm.paused.load(std::sync::atomic::Ordering::SeqCst);
    json!({"status": if paused { "paused" } else { "running" }, "running": !paused})
}

fn registry() -> Registry {
    let mut registry = Registry::with_state(Vm::default());
    registry
        .fd_commands()
        .unwrap()
        .event_without_data("STOP")
        .unwrap()
        .event_without_data("RESUME")
        .unwrap()
        .add(Command::sync(
            "query-status",
            |_: NoArgs, cx: &Context<Vm>| Ok(status(cx.state())),
        ))
        .unwrap()
        .add(
            Command::sync("stop", |_: NoArgs, cx: &Context<Vm>| {
                cx.state()
                    .paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                cx.emit("STOP", None);
                Ok(())
            })
            .emits("STOP"),
        )
        .unwrap()
        .add(
            Command::sync("cont", |_: NoArgs, cx: &Context<Vm>| {
                cx.state()
                    .paused
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                cx.emit("RESUME", None);
                Ok(())
            })
            .emits("RESUME"),
        )
        .unwrap()
        // QEMU's `file` driver on `/dev/fdset/N`: read-write unless `read-only`.
        .add(Command::sync(
            "blockdev-add",
            |args: BlockdevAdd, cx: &Context<Vm>| {
                if args.driver != "file" || !is_fdset_path(&args.filename) {
                    return Err(QmpError::generic("only file nodes on /dev/fdset/N here"));
                }
                let access = if args.read_only == Some(true) {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                };
                let file = cx.open_fdset(&args.filename, access)?;
                cx.state()
                    .nodes
                    .lock()
                    .unwrap()
                    .insert(args.node_name, file);
                Ok(())
            },
        ))
        .unwrap()
        .add(Command::sync(
            "blockdev-del",
            |args: NodeName, cx: &Context<Vm>| {
                let removed = cx.state().nodes.lock().unwrap().remove(&args.node_name);
                removed.map(drop).ok_or_else(|| {
                    QmpError::generic(format!(
                        "Failed to find node with node-name='{}'",
                        args.node_name
                    ))
                })
            },
        ))
        .unwrap()
        // Takes a named fd through the request context and reports what it is.
        .add(Command::sync(
            "x-fd-ino",
            |args: FdName, cx: &Context<Vm>| {
                let fd = cx.take_fd(&args.fdname)?;
                Ok(File::from(fd).metadata().map(|m| m.ino()).unwrap_or(0))
            },
        ))
        .unwrap()
        // Takes a named fd and keeps it until the request is cancelled (the client leaves).
        .add(Command::deferred(
            "x-hold-fd",
            |args: FdName, cx: Context<Vm>, ret: QmpReturn| match cx.take_fd(&args.fdname) {
                Ok(fd) => {
                    let vm = cx.state_arc();
                    let cancel = ret.cancellation_token().clone();
                    vm.held.lock().unwrap().push((fd, ret));
                    tokio::spawn(async move {
                        cancel.cancelled().await;
                        vm.held.lock().unwrap().clear();
                    });
                }
                Err(error) => ret.err(error),
            },
        ))
        .unwrap();
    registry.build()
}

/// The test server on one Unix socket per monitor name, and on TCP.
struct FdServer {
    server: Server,
    sockets: HashMap<String, PathBuf>,
    tcp: std::net::SocketAddr,
    scratch: Scratch,
}

impl FdServer {
    async fn start(limits: FdLimits) -> Self {
        let server = Server::builder(registry())
            .version(VersionInfo::new(10, 0, 2, "qmp-dispatcher fds test"))
            .offer_async(true)
            .fd_limits(limits)
            .build();
        let scratch = Scratch::new();
        let mut sockets = HashMap::new();
        for monitor in ["m0", "m1"] {
            let path = scratch.path(&format!("{monitor}.sock"));
            let listener = qmp_dispatcher::bind_unix(&path, 0o600).expect("bind");
            let accept = server.clone();
            tokio::spawn(async move { accept.serve_unix(listener).await });
            sockets.insert(monitor.to_string(), path);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = listener.local_addr().unwrap();
        let accept = server.clone();
        tokio::spawn(async move { accept.serve_tcp(listener).await });
        FdServer {
            server,
            sockets,
            tcp,
            scratch,
        }
    }

    async fn connect(&self) -> Conn {
        Conn::unix(&self.sockets["m0"]).await
    }

    /// Connects and negotiates `caps`.
    async fn negotiated(&self, caps: &[&str]) -> Conn {
        let mut conn = self.connect().await;
        conn.greeting().await;
        conn.send(
            serde_json::to_string(
                &json!({"execute": "qmp_capabilities", "arguments": {"enable": caps}}),
            )
            .unwrap()
            .as_bytes(),
            &[],
        )
        .await;
        assert_eq!(conn.recv().await, json!({"return": {}}));
        conn
    }

    async fn wait_idle(&self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while self.server.stats().clients > 0 || self.server.stats().in_flight > 0 {
            assert!(tokio::time::Instant::now() < deadline, "clients never left");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// A client that sends with sendmsg.

struct Conn {
    reader: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// The socket, for sendmsg (the write half keeps it open).
    raw: RawFd,
}

impl Conn {
    async fn unix(path: &Path) -> Conn {
        let stream = UnixStream::connect(path).await.expect("connect");
        let raw = stream.as_raw_fd();
        let (r, w) = stream.into_split();
        Conn {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
            raw,
        }
    }

    async fn tcp(addr: std::net::SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let raw = stream.as_raw_fd();
        let (r, w) = stream.into_split();
        Conn {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(w),
            raw,
        }
    }

    /// One sendmsg of `bytes` carrying `fds`.
    async fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let mut sent = 0;
        while sent < bytes.len() {
            let iov = [std::io::IoSlice::new(&bytes[sent..])];
            // Fds go with the first piece only, as the kernel attaches them.
            let cmsgs = if sent == 0 { cmsgs } else { &[] };
            match sendmsg::<()>(self.raw, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EAGAIN) => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Err(e) => panic!("sendmsg: {e}"),
            }
        }
    }

    async fn send_json(&mut self, value: &Value, fds: &[BorrowedFd<'_>]) {
        self.send(serde_json::to_string(value).unwrap().as_bytes(), fds)
            .await;
    }

    async fn recv(&mut self) -> Value {
        let mut line = Vec::new();
        let n = tokio::time::timeout(TIMEOUT, self.reader.read_until(b'\n', &mut line))
            .await
            .expect("timed out waiting for a line")
            .expect("read");
        assert!(n > 0, "unexpected EOF");
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(&line)))
    }

    async fn greeting(&mut self) {
        let greeting = self.recv().await;
        assert!(greeting.get("QMP").is_some(), "{greeting}");
    }

    async fn expect_silence(&mut self, ms: u64) {
        let mut byte = [0u8; 1];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(ms), self.reader.read(&mut byte)).await
        {
            panic!("expected silence, got {read:?} {byte:?}");
        }
    }

    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        tokio::time::timeout(TIMEOUT, self.reader.read_to_end(&mut rest))
            .await
            .expect("timed out waiting for EOF")
            .expect("read");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
}

// ---------------------------------------------------------------------------------------
// Passed fds and how the test watches them.

/// The test's view of a passed fd: the read end of a pipe whose write end was passed
/// (POLLHUP once every copy is closed), or a regular file (found by inode).
enum Probe {
    Pipe { read: OwnedFd, ino: u64 },
    File { dev: u64, ino: u64 },
}

impl Probe {
    /// A pipe: the probe, and the write end to pass.
    fn pipe() -> (Probe, OwnedFd) {
        let (read, write) = nix::unistd::pipe().unwrap();
        let ino = File::from(read.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino();
        (Probe::Pipe { read, ino }, write)
    }

    /// A 1 MiB regular file in `dir`, opened read-write or read-only.
    fn file(dir: &Path, label: &str, writable: bool) -> (Probe, OwnedFd) {
        let path = dir.join(format!("{label}.img"));
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .unwrap();
        let meta = file.metadata().unwrap();
        let probe = Probe::File {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        (probe, OwnedFd::from(file))
    }

    fn closed(&self) -> bool {
        match self {
            Probe::Pipe { read, .. } => {
                let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::ZERO).unwrap();
                fds[0]
                    .revents()
                    .is_some_and(|e| e.contains(PollFlags::POLLHUP))
            }
            Probe::File { .. } => self.held() == 0,
        }
    }

    /// Copies held in this process other than the test's own (the pipe's read end).
    fn held(&self) -> usize {
        let mut held = 0;
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(meta) = std::fs::metadata(entry.path()) else {
                continue;
            };
            let matches = match self {
                Probe::Pipe { ino, .. } => {
                    meta.ino() == *ino && fd_flags(&entry.file_name()) & 0o3 == 0o1
                }
                Probe::File { dev, ino } => meta.dev() == *dev && meta.ino() == *ino,
            };
            held += usize::from(matches);
        }
        held
    }
}

/// The `flags:` of `/proc/self/fdinfo/N`, octal.
fn fd_flags(fd: &std::ffi::OsStr) -> u32 {
    let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(fd)).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Replaying the transcripts.

/// Where this server deliberately differs from the recording: rewrites the expected record
/// and returns why, or `None`.
fn deviate(case: &str, record: &mut Value) -> Option<&'static str> {
    const NAMED: &str = "named fds belong to the connection and close with it (docs/protocol.md)";
    const POSITIONAL: &str =
        "positional rule: each pipelined getfd gets the fd sent with it, with oob too";
    let id = recv_id(record);
    let when = record["when"].as_str().unwrap_or("").to_string();
    let fd = record["fd"].as_str().unwrap_or("").to_string();
    let set_reply = |record: &mut Value, reply: Value| {
        record["data"] = Value::String(format!("{reply}\r\n"));
    };
    match case {
        "named-fd-survives-disconnect" => {
            if record["dir"] == "note" && when == "after disconnect" {
                if record.get("closed").is_some() {
                    record["closed"] = json!(true);
                }
                if record.get("held").is_some() {
                    record["held"] = json!({"A": [], "B": []});
                }
                return Some(NAMED);
            }
            if id.as_deref() == Some("c1") {
                set_reply(record, not_found("c1", "a"));
                return Some(NAMED);
            }
        }
        "fdset-two-monitors" => {
            if fd == "B" && when.starts_with("after c") {
                record["closed"] = json!(true);
                return Some(NAMED);
            }
            if id.as_deref() == Some("c2") {
                set_reply(record, not_found("c2", "a"));
                return Some(NAMED);
            }
        }
        "pipelined-split-sendmsgs-oob" => {
            if let Some(id) = id.as_deref().filter(|id| id.ends_with('b')) {
                set_reply(record, json!({"return": {}, "id": id}));
                return Some(POSITIONAL);
            }
            let round = when
                .strip_prefix("round ")
                .and_then(|r| r.split(':').next())
                .unwrap_or("")
                .to_string();
            if when.ends_with("after both replies") {
                if fd == format!("A{round}") {
                    record["closed"] = json!(false);
                    return Some(POSITIONAL);
                }
                if let Some(held) = record.get_mut("held").and_then(Value::as_object_mut) {
                    held.insert(format!("A{round}"), json!([0]));
                    return Some(POSITIONAL);
                }
            }
            if when.contains("after closefd a") && fd == format!("B{round}") {
                record["closed"] = json!(false);
                return Some(POSITIONAL);
            }
        }
        _ => {}
    }
    None
}

fn not_found(id: &str, name: &str) -> Value {
    json!({"id": id, "error": {"class": "GenericError",
        "desc": format!("File descriptor named '{name}' not found")}})
}

/// The id of a recorded reply.
fn recv_id(record: &Value) -> Option<String> {
    if record["dir"] != "recv" {
        return None;
    }
    let reply: Value = serde_json::from_str(record["data"].as_str()?).ok()?;
    reply["id"].as_str().map(str::to_string)
}

struct Replay<'s> {
    server: &'s FdServer,
    case: String,
    conns: HashMap<String, Conn>,
    probes: HashMap<String, Probe>,
    /// QEMU's fd numbers (add-fd) to ours and back, as last learnt.
    to_ours: HashMap<i64, i64>,
    to_recorded: HashMap<i64, i64>,
    /// Case 02: the client's watching dup, and whether the next fds are made non-blocking.
    watch: Option<OwnedFd>,
    nonblocking_next: bool,
    deviations: BTreeSet<&'static str>,
}

impl<'s> Replay<'s> {
    async fn run(server: &'s FdServer, file: &Path) -> BTreeSet<&'static str> {
        let text = std::fs::read_to_string(file).unwrap();
        let mut lines = text.lines();
        let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        let mut replay = Replay {
            server,
            case: header["case"].as_str().unwrap().to_string(),
            conns: HashMap::new(),
            probes: HashMap::new(),
            to_ours: HashMap::new(),
            to_recorded: HashMap::new(),
            watch: None,
            nonblocking_next: false,
            deviations: BTreeSet::new(),
        };
        for line in lines {
            let mut record: Value = serde_json::from_str(line).unwrap();
            if let Some(why) = deviate(&replay.case, &mut record) {
                replay.deviations.insert(why);
            }
            replay.step(&record).await;
        }
        replay.deviations
    }

    fn conn(&mut self, record: &Value) -> &mut Conn {
        let name = record["conn"].as_str().unwrap();
        self.conns
            .get_mut(name)
            .unwrap_or_else(|| panic!("{}: no connection {name}", self.case))
    }

    async fn step(&mut self, record: &Value) {
        let case = self.case.clone();
        match record["dir"].as_str().unwrap() {
            "connect" => {
                let path = record["path"].as_str().unwrap();
                let conn = match path.strip_prefix("tcp:") {
                    Some(_) => Conn::tcp(self.server.tcp).await,
                    None => {
                        let monitor = path.trim_end_matches(".sock").rsplit('-').next().unwrap();
                        Conn::unix(&self.server.sockets[monitor]).await
                    }
                };
                self.conns
                    .insert(record["conn"].as_str().unwrap().to_string(), conn);
            }
            "send" => self.send(record).await,
            "recv" => {
                let expected: Value =
                    serde_json::from_str(record["data"].as_str().unwrap()).unwrap();
                let mut got = self.conn(record).recv().await;
                if expected.get("QMP").is_some() {
                    assert!(got.get("QMP").is_some(), "{case}: greeting {got}");
                    return;
                }
                self.learn(&expected, &got);
                self.normalise(&mut got);
                assert_eq!(
                    strip_timestamp(got),
                    strip_timestamp(expected),
                    "{case}: reply differs"
                );
            }
            "silence" => {
                let ms = record["ms"].as_u64().unwrap().min(200);
                self.conn(record).expect_silence(ms).await;
            }
            "eof" => self.conn(record).expect_eof().await,
            "close" => {
                let name = record["conn"].as_str().unwrap();
                self.conns.remove(name);
            }
            "shutdown-wr" => {
                self.conn(record).writer.shutdown().await.unwrap();
            }
            "note" => self.note(record).await,
            other => panic!("{case}: unknown record {other}"),
        }
    }

    async fn send(&mut self, record: &Value) {
        let bytes = match record.get("hex") {
            Some(hex) => hex::decode(hex.as_str().unwrap()).unwrap(),
            None => self
                .translate_send(record["data"].as_str().unwrap())
                .into_bytes(),
        };
        let labels: Vec<String> = record["fd_labels"]
            .as_array()
            .map(|l| l.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let kind = record["fd_kind"].as_str().unwrap_or("");
        let mut passed = Vec::new();
        for label in &labels {
            let (probe, fd) = match kind {
                "pipe-write-end" => Probe::pipe(),
                "regular-file-O_RDWR" => Probe::file(&self.server.scratch.path(""), label, true),
                "regular-file-O_RDONLY" => Probe::file(&self.server.scratch.path(""), label, false),
                other => panic!("unknown fd kind {other}"),
            };
            if self.nonblocking_next {
                let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL).unwrap());
                fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
                self.watch = Some(fd.try_clone().unwrap());
                self.nonblocking_next = false;
            }
            self.probes.insert(label.clone(), probe);
            passed.push(fd);
        }
        let borrowed: Vec<BorrowedFd<'_>> = passed.iter().map(|fd| fd.as_fd()).collect();
        self.conn(record).send(&bytes, &borrowed).await;
        // The recorder closed its copies right after the sendmsg.
        drop(borrowed);
        drop(passed);
    }

    /// `remove-fd` names QEMU's fd numbers: send ours instead.
    fn translate_send(&self, data: &str) -> String {
        let Ok(mut value) = serde_json::from_str::<Value>(data) else {
            return data.to_string();
        };
        let Some(fd) = value["arguments"]["fd"].as_i64() else {
            return data.to_string();
        };
        let Some(&ours) = self.to_ours.get(&fd) else {
            return data.to_string();
        };
        value["arguments"]["fd"] = json!(ours);
        let ending = if data.ends_with('\n') { "\n" } else { "" };
        format!("{value}{ending}")
    }

    /// An add-fd reply pairs QEMU's number with ours.
    fn learn(&mut self, expected: &Value, got: &Value) {
        if let (Some(recorded), Some(ours)) = (
            expected["return"]["fd"].as_i64(),
            got["return"]["fd"].as_i64(),
        ) {
            self.to_ours.insert(recorded, ours);
            self.to_recorded.insert(ours, recorded);
        }
    }

    /// Our fd numbers in a reply, as QEMU's.
    fn normalise(&self, got: &mut Value) {
        let map = |n: i64| *self.to_recorded.get(&n).unwrap_or(&n);
        match got.get_mut("return") {
            Some(Value::Object(info)) => {
                if let Some(fd) = info.get("fd").and_then(Value::as_i64) {
                    info.insert("fd".into(), json!(map(fd)));
                }
            }
            Some(Value::Array(sets)) => {
                for set in sets {
                    for fd in set["fds"].as_array_mut().into_iter().flatten() {
                        if let Some(n) = fd["fd"].as_i64() {
                            fd["fd"] = json!(map(n));
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some(desc) = got["error"]["desc"].as_str() {
            if let Some((head, tail)) = desc.split_once(", fd:") {
                let (number, rest) = tail.split_once('\'').unwrap_or((tail, ""));
                if let Ok(n) = number.parse::<i64>() {
                    got["error"]["desc"] = json!(format!("{head}, fd:{}'{rest}", map(n)));
                }
            }
        }
    }

    async fn note(&mut self, record: &Value) {
        let case = &self.case;
        let data = record["data"].as_str().unwrap();
        if let (Some(label), Some(closed)) = (record["fd"].as_str(), record["closed"].as_bool()) {
            let probe = &self.probes[label];
            let when = record["when"].as_str().unwrap_or("");
            if closed {
                eventually(&format!("{case}: {label} closed {when}"), || probe.closed()).await;
            } else {
                let waited = record["waited_ms"].as_u64().unwrap_or(0).min(200);
                tokio::time::sleep(Duration::from_millis(waited)).await;
                assert!(!probe.closed(), "{case}: {label} closed {when}");
            }
        } else if let Some(held) = record["held"].as_object() {
            for (label, copies) in held {
                let probe = &self.probes[label];
                let mut want = copies.as_array().unwrap().len();
                // Case 02's watching dup is the client's copy, not the server's.
                if let (Some(watch), Probe::Pipe { ino, .. }) = (&self.watch, probe) {
                    let watched = File::from(watch.try_clone().unwrap()).metadata().unwrap();
                    want += usize::from(watched.ino() == *ino);
                }
                let when = record["when"].as_str().unwrap_or("");
                eventually(
                    &format!(
                        "{case}: {label} held {want} times {when} (now {})",
                        probe.held()
                    ),
                    || probe.held() == want,
                )
                .await;
            }
        } else if data.starts_with("client set O_NONBLOCK") {
            self.nonblocking_next = true;
        } else if data.starts_with("client's dup of A still has O_NONBLOCK: False") {
            let watch = self.watch.as_ref().expect("the watching dup");
            let flags = OFlag::from_bits_retain(fcntl(watch, FcntlArg::F_GETFL).unwrap());
            assert!(
                !flags.contains(OFlag::O_NONBLOCK),
                "{case}: O_NONBLOCK not cleared"
            );
        } else if data.starts_with("client closed the watching dup") {
            self.watch = None;
        }
    }
}

fn strip_timestamp(mut value: Value) -> Value {
    if let Some(object) = value.as_object_mut() {
        object.remove("timestamp");
    }
    value
}

/// Every recording, replayed on a fresh server each; the deviations are exactly the listed
/// ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_transcripts_replay() {
    let _shared = FD_COUNTING.read().await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir("qemu-10.0-fds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 19);
    let mut deviating = BTreeSet::new();
    for file in &files {
        let server = FdServer::start(FdLimits::default()).await;
        let deviations = Replay::run(&server, file).await;
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        eprintln!(
            "{name}: ok{}",
            if deviations.is_empty() {
                ""
            } else {
                " (deviates)"
            }
        );
        if !deviations.is_empty() {
            deviating.insert(name);
        }
        server.server.shutdown();
        server.server.wait().await;
    }
    let expected: BTreeSet<String> = [
        "11-fdset-two-monitors",
        "13-named-fd-survives-disconnect",
        "17-pipelined-split-sendmsgs-oob",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(deviating, expected, "the deviation table is out of date");
}

// ---------------------------------------------------------------------------------------
// The positional rule, 1,000 times in a row.

/// Which way a client sends its fds.
#[derive(Clone, Copy, Debug)]
enum Style {
    /// libvirt: the command's bytes and its fd in one sendmsg.
    Libvirt,
    /// qemu.qmp: one space byte carrying the fd, then the command.
    SpaceByte,
}

/// Pipelined rounds of `getfd a` + A, `getfd b` + B, then `x-fd-ino` of each, without
/// waiting for any reply: every name must hold the fd sent with it.
async fn pipelined_rounds(caps: &[&str], style: Style) {
    let server = FdServer::start(FdLimits::default()).await;
    let mut conn = server.negotiated(caps).await;
    for round in 0..1000 {
        let mut inos = Vec::new();
        let mut probes = Vec::new();
        for name in ["a", "b"] {
            let (probe, fd) = Probe::pipe();
            let Probe::Pipe { ino, .. } = &probe else {
                unreachable!()
            };
            inos.push(*ino);
            probes.push(probe);
            let getfd = json!({"execute": "getfd", "arguments": {"fdname": name},
                "id": format!("g{name}{round}")});
            match style {
                Style::Libvirt => conn.send_json(&getfd, &[fd.as_fd()]).await,
                Style::SpaceByte => {
                    conn.send(b" ", &[fd.as_fd()]).await;
                    conn.send_json(&getfd, &[]).await;
                }
            }
        }
        for name in ["a", "b"] {
            let ino = json!({"execute": "x-fd-ino", "arguments": {"fdname": name},
                "id": format!("i{name}{round}")});
            conn.send_json(&ino, &[]).await;
        }
        let mut replies = HashMap::new();
        for _ in 0..4 {
            let reply = conn.recv().await;
            replies.insert(reply["id"].as_str().unwrap().to_string(), reply);
        }
        for (i, name) in ["a", "b"].iter().enumerate() {
            assert_eq!(
                replies[&format!("g{name}{round}")]["return"],
                json!({}),
                "{caps:?} {style:?} round {round}: {replies:?}"
            );
            assert_eq!(
                replies[&format!("i{name}{round}")]["return"],
                json!(inos[i]),
                "{caps:?} {style:?} round {round}: {name} holds another fd"
            );
        }
        // x-fd-ino took and closed both.
        for probe in &probes {
            eventually("taken fds closed", || probe.closed()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_legacy_clients_get_their_own_fds() {
    let _shared = FD_COUNTING.read().await;
    pipelined_rounds(&[], Style::Libvirt).await;
    pipelined_rounds(&[], Style::SpaceByte).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_oob_clients_get_their_own_fds() {
    let _shared = FD_COUNTING.read().await;
    pipelined_rounds(&["oob"], Style::Libvirt).await;
    pipelined_rounds(&["oob"], Style::SpaceByte).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_async_clients_get_their_own_fds() {
    let _shared = FD_COUNTING.read().await;
    pipelined_rounds(&["async"], Style::Libvirt).await;
    pipelined_rounds(&["async"], Style::SpaceByte).await;
}

/// An fd sent while an earlier request still waits in the queue is not seen by that request,
/// and an fd sent with an exec-oob command stays pending for the next in-band getfd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_see_the_slot_of_their_position() {
    let _shared = FD_COUNTING.read().await;
    let server = FdServer::start(FdLimits::default()).await;
    let mut conn = server.negotiated(&["oob"]).await;
    // Park a command, so everything after it queues.
    let (probe_a, a) = Probe::pipe();
    conn.send(b" ", &[a.as_fd()]).await;
    drop(a);
    conn.send_json(
        &json!({"execute": "getfd", "arguments": {"fdname": "held"}, "id": 0}),
        &[],
    )
    .await;
    assert_eq!(conn.recv().await, json!({"return": {}, "id": 0}));
    conn.send_json(
        &json!({"execute": "x-hold-fd", "arguments": {"fdname": "held"}, "id": 1}),
        &[],
    )
    .await;
    conn.send_json(
        &json!({"execute": "getfd", "arguments": {"fdname": "x"}, "id": 2}),
        &[],
    )
    .await;
    let (probe_b, b) = Probe::pipe();
    conn.send_json(
        &json!({"exec-oob": "getfd", "arguments": {"fdname": "y"}, "id": 3}),
        &[b.as_fd()],
    )
    .await;
    drop(b);
    // The oob refusal comes first; the queued getfd x waits behind x-hold-fd.
    assert_eq!(
        conn.recv().await,
        json!({"id": 3, "error": {"class": "GenericError", "desc": "The command getfd does not support OOB"}})
    );
    assert!(!probe_b.closed());
    drop(probe_a);
    // Leaving cancels x-hold-fd; nothing leaks.
    drop(conn);
    eventually("B closed at disconnect", || probe_b.closed()).await;
    server.wait_idle().await;
}

// ---------------------------------------------------------------------------------------
// TCP, limits, leaks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_no_fds() {
    let _shared = FD_COUNTING.read().await;
    let server = FdServer::start(FdLimits::default()).await;
    let mut conn = Conn::tcp(server.tcp).await;
    conn.greeting().await;
    conn.send_json(&json!({"execute": "qmp_capabilities"}), &[])
        .await;
    conn.recv().await;
    let (probe, fd) = Probe::pipe();
    // Linux drops SCM_RIGHTS on TCP without an error.
    conn.send(b" ", &[fd.as_fd()]).await;
    drop(fd);
    assert!(probe.closed());
    for (command, id) in [("getfd", "g1"), ("add-fd", "af1")] {
        let args = if command == "getfd" {
            json!({"fdname": "a"})
        } else {
            json!({})
        };
        conn.send_json(
            &json!({"execute": command, "arguments": args, "id": id}),
            &[],
        )
        .await;
        assert_eq!(
            conn.recv().await,
            json!({"id": id, "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_clear_errors() {
    let _shared = FD_COUNTING.read().await;
    let limits = FdLimits::default()
        .pending_per_connection(4)
        .named_per_connection(2)
        .fdsets_per_server(1);
    let server = FdServer::start(limits).await;
    let mut conn = server.negotiated(&[]).await;
    let call =
        |name: &str, args: Value, id: u32| json!({"execute": name, "arguments": args, "id": id});
    // 17 fds in one message: refused whole, and closed.
    let pipes: Vec<(Probe, OwnedFd)> = (0..17).map(|_| Probe::pipe()).collect();
    let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, fd)| fd.as_fd()).collect();
    conn.send_json(&call("getfd", json!({"fdname": "a"}), 1), &fds)
        .await;
    drop(fds);
    let (probes, fds): (Vec<Probe>, Vec<OwnedFd>) = pipes.into_iter().unzip();
    drop(fds);
    let reply = conn.recv().await;
    let desc = reply["error"]["desc"].as_str().unwrap().to_string();
    assert!(desc.contains("at most 16"), "{desc}");
    for probe in &probes {
        assert!(probe.closed());
    }
    // Named: two names, a third is refused (and its fd closed).
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let (probe, fd) = Probe::pipe();
        conn.send_json(
            &call("getfd", json!({"fdname": name}), 10 + i as u32),
            &[fd.as_fd()],
        )
        .await;
        drop(fd);
        let reply = conn.recv().await;
        if i < 2 {
            assert_eq!(reply["return"], json!({}));
        } else {
            let desc = reply["error"]["desc"].as_str().unwrap();
            assert!(desc.contains("at most 2"), "{desc}");
            assert!(probe.closed());
        }
    }
    // Fd sets: one set; a second is refused.
    let (_p, fd) = Probe::pipe();
    conn.send_json(&call("add-fd", json!({}), 20), &[fd.as_fd()])
        .await;
    assert_eq!(conn.recv().await["return"]["fdset-id"], json!(0));
    let (_q, fd) = Probe::pipe();
    conn.send_json(&call("add-fd", json!({"fdset-id": 3}), 21), &[fd.as_fd()])
        .await;
    let desc = conn.recv().await["error"]["desc"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(desc.contains("Too many fd sets"), "{desc}");
}

/// Counts the process's open fds before and after each scenario (the server runs in this
/// process): passed fds left pending, named, in a half-sent command, taken by a command in
/// flight when the client vanishes, in fd sets, and refused for the limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_leaks() {
    let _exclusive = FD_COUNTING.write().await;
    let limits = FdLimits::default().pending_per_connection(8);
    let server = FdServer::start(limits).await;
    // Warm up: the runtime's and the listeners' fds exist before the first count.
    drop(server.negotiated(&[]).await);
    server.wait_idle().await;
    let pipe_burst = |n: usize| {
        (0..n)
            .map(|_| nix::unistd::pipe().unwrap().1)
            .collect::<Vec<_>>()
    };
    for scenario in 0..7 {
        let before = open_fds();
        {
            let mut conn = server
                .negotiated(if scenario == 3 { &["async"] } else { &[] })
                .await;
            let fds = pipe_burst(if scenario == 5 { 20 } else { 1 });
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
            match scenario {
                // Pending at disconnect.
                0 => conn.send(b" ", &borrowed).await,
                // Named at disconnect.
                1 => {
                    conn.send_json(
                        &json!({"execute": "getfd", "arguments": {"fdname": "a"}, "id": 1}),
                        &borrowed,
                    )
                    .await;
                    conn.recv().await;
                }
                // Half a command carrying an fd.
                2 => conn.send(br#"{"execute": "getfd", "argu"#, &borrowed).await,
                // Taken by a command in flight; the client vanishes mid-command.
                3 => {
                    conn.send_json(
                        &json!({"execute": "getfd", "arguments": {"fdname": "h"}, "id": 1}),
                        &borrowed,
                    )
                    .await;
                    conn.recv().await;
                    conn.send_json(
                        &json!({"execute": "x-hold-fd", "arguments": {"fdname": "h"}, "id": 2}),
                        &[],
                    )
                    .await;
                    let vm_holds = || server.server.stats().in_flight == 1;
                    eventually("x-hold-fd in flight", vm_holds).await;
                }
                // In an fd set, then removed.
                4 => {
                    conn.send_json(&json!({"execute": "add-fd", "id": 1}), &borrowed)
                        .await;
                    let fd = conn.recv().await["return"]["fd"].clone();
                    conn.send_json(&json!({"execute": "remove-fd", "arguments": {"fdset-id": 0, "fd": fd}, "id": 2}), &[]).await;
                    assert_eq!(conn.recv().await["return"], json!({}));
                }
                // Too many in one message, and more pending than allowed.
                5 => {
                    conn.send(b" ", &borrowed).await;
                    for _ in 0..12 {
                        let one = [borrowed[0]];
                        conn.send(b" ", &one).await;
                    }
                    conn.send_json(
                        &json!({"execute": "getfd", "arguments": {"fdname": "z"}, "id": 1}),
                        &[],
                    )
                    .await;
                    conn.recv().await;
                }
                // Many pending arrivals read ahead behind a parked command, then a hang-up.
                _ => {
                    conn.send_json(
                        &json!({"execute": "getfd", "arguments": {"fdname": "h"}, "id": 1}),
                        &borrowed,
                    )
                    .await;
                    conn.recv().await;
                    conn.send_json(
                        &json!({"execute": "x-hold-fd", "arguments": {"fdname": "h"}, "id": 2}),
                        &[],
                    )
                    .await;
                    for i in 0..4 {
                        let one = [borrowed[0]];
                        conn.send_json(&json!({"execute": "getfd", "arguments": {"fdname": format!("q{i}")}, "id": 10 + i}), &one).await;
                    }
                }
            }
            drop(borrowed);
            drop(fds);
            // Abrupt: no EOF handshake, whatever is in flight.
            drop(conn);
        }
        server.wait_idle().await;
        eventually(
            &format!("scenario {scenario}: fds back to {before}"),
            || open_fds() == before,
        )
        .await;
    }
    assert!(server.server.stats().in_flight == 0);
}

// ---------------------------------------------------------------------------------------
// Handlers using fds: the demo's screendump into an fd set, and the schema.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screendump_writes_into_an_fdset_pipe() {
    let _shared = FD_COUNTING.read().await;
    let options = qmp_handlers::demo::DemoOptions {
        display_size: (64, 48),
        ..Default::default()
    };
    let demo = qmp_handlers::demo::build(&options, || {}).unwrap();
    let scratch = Scratch::new();
    let path = scratch.path("qmp.sock");
    let listener = qmp_dispatcher::bind_unix(&path, 0o600).unwrap();
    let accept = demo.server.clone();
    tokio::spawn(async move { accept.serve_unix(listener).await });
    let mut conn = Conn::unix(&path).await;
    conn.greeting().await;
    conn.send_json(&json!({"execute": "qmp_capabilities"}), &[])
        .await;
    conn.recv().await;

    let (read, write) = nix::unistd::pipe().unwrap();
    let reader = std::thread::spawn(move || {
        let mut image = Vec::new();
        File::from(read).read_to_end(&mut image).unwrap();
        image
    });
    conn.send_json(&json!({"execute": "add-fd", "id": 1}), &[write.as_fd()])
        .await;
    drop(write);
    let added = conn.recv().await;
    let (set, fd) = (
        added["return"]["fdset-id"].clone(),
        added["return"]["fd"].clone(),
    );
    conn.send_json(
        &json!({"execute": "screendump", "arguments": {"filename": format!("/dev/fdset/{set}")}, "id": 2}),
        &[],
    )
    .await;
    assert_eq!(conn.recv().await, json!({"return": {}, "id": 2}));
    conn.send_json(
        &json!({"execute": "screendump", "arguments": {"filename": "/dev/fdset/9"}, "id": 3}),
        &[],
    )
    .await;
    assert_eq!(
        conn.recv().await["error"]["desc"],
        json!("Failed to find fdset /dev/fdset/9")
    );
    // Removing the set closes the last write end: the reader sees EOF after the image.
    conn.send_json(
        &json!({"execute": "remove-fd", "arguments": {"fdset-id": set, "fd": fd}, "id": 4}),
        &[],
    )
    .await;
    assert_eq!(conn.recv().await, json!({"return": {}, "id": 4}));
    let image = reader.join().unwrap();
    let header = b"P6\n64 48\n255\n";
    assert!(
        image.starts_with(header),
        "{:?}",
        &image[..16.min(image.len())]
    );
    assert_eq!(image.len(), header.len() + 64 * 48 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_describes_the_fd_builtins() {
    let _shared = FD_COUNTING.read().await;
    let server = FdServer::start(FdLimits::default()).await;
    let mut conn = server.negotiated(&[]).await;
    conn.send_json(&json!({"execute": "query-qmp-schema", "id": 1}), &[])
        .await;
    let schema = conn.recv().await["return"].as_array().unwrap().clone();
    let by_name: HashMap<&str, &Value> = schema
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    let members = |command: &str| -> Vec<(String, String, bool)> {
        let arg = by_name[command]["arg-type"].as_str().unwrap();
        let mut members: Vec<_> = by_name[arg]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let ty = m["type"].as_str().unwrap();
                let ty = by_name
                    .get(ty)
                    .and_then(|t| t["json-type"].as_str())
                    .unwrap_or(ty);
                (
                    m["name"].as_str().unwrap().to_string(),
                    ty.to_string(),
                    m.get("default").is_some(),
                )
            })
            .collect();
        members.sort();
        members
    };
    for command in ["getfd", "closefd"] {
        assert_eq!(
            members(command),
            [("fdname".into(), "string".into(), false)]
        );
    }
    assert_eq!(
        members("add-fd"),
        [
            ("fdset-id".into(), "int".into(), true),
            ("opaque".into(), "string".into(), true)
        ]
    );
    assert_eq!(
        members("remove-fd"),
        [
            ("fd".into(), "int".into(), true),
            ("fdset-id".into(), "int".into(), false)
        ]
    );
    assert!(by_name.contains_key("query-fdsets"));
    for entry in &schema {
        if ["getfd", "closefd", "add-fd", "remove-fd", "query-fdsets"]
            .contains(&entry["name"].as_str().unwrap())
        {
            assert_eq!(entry["meta-type"], "command");
            assert!(entry.get("allow-oob").is_none(), "{entry}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// qemu.qmp.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_qmp_send_fd_scm() {
    let _shared = FD_COUNTING.read().await;
    let server = FdServer::start(FdLimits::default()).await;
    let socket = server.sockets["m0"].clone();
    venv::run_script("fd_passing.py", &[socket.as_path()], String::new).await;
    server.wait_idle().await;
}
