//! Replays QEMU 10.0's recorded QMP conversations against our dispatcher and checks that
//! every reply equals QEMU's, except for the deliberate deviations listed in [`DEVIATIONS`].
//!
//! The server under test registers stand-ins for the qemu-storage-daemon commands the
//! transcripts use ([`Qsd`]); commands that blocked QEMU's main loop on a blkdebug FIFO are
//! deferred here and answered when the transcript notes that the FIFO was released.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use qmp_dispatcher::wire::Limits;
use qmp_dispatcher::{
    Command, Events, NoArgs, QmpError, QmpReturn, Registry, Server, ServerBuilder, VersionInfo,
};
use qmp_tests::transcript::{Payload, Record, Transcript};
use qmp_tests::{Client, Holds, TIMEOUT, TestServer};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

/// The longest a `silence` record is checked for; the recorded waits (up to a second) are
/// compressed so the whole file stays fast.
const MAX_SILENCE_MS: u64 = 150;

/// How long we wait for stray output before closing a connection.
const TRAILING_CHECK_MS: u64 = 30;

/// How one deliberate deviation shows on the wire.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// Where QEMU answers the request `request` (the last send on the connection ends
    /// with it) with the line `qemu`, we send `ours`.
    Reply {
        request: &'static str,
        qemu: &'static str,
        ours: &'static str,
    },
    /// QEMU sends `qemu` (every recorded copy); we send nothing.
    Omitted { qemu: &'static str },
    /// QEMU is silent on this connection where we already answer.
    NotSilent { conn: &'static str },
    /// The case is not replayed at all.
    Skipped,
}

/// A deliberate difference from QEMU 10.0, per transcript file prefix.
#[derive(Debug, Clone, Copy)]
struct Deviation {
    case: &'static str,
    change: Change,
    reason: &'static str,
}

const ID_VERBATIM: &str = "the id is echoed verbatim, not re-serialised: the number keeps its \
                           spelling, which here parses to a different JSON value";

/// Every deliberate difference from QEMU 10.0 the replay accepts. (Greetings always differ
/// in `capabilities`: we offer `async` too; that is checked in [`Replay::check_greeting`].)
const DEVIATIONS: &[Deviation] = &[
    Deviation {
        case: "13",
        change: Change::Reply {
            request: r#"{"execute":"query-jobs","id":1.0}"#,
            qemu: r#"{"return": [], "id": 1}"#,
            ours: r#"{"return": [], "id": 1.0}"#,
        },
        reason: ID_VERBATIM,
    },
    Deviation {
        case: "13",
        change: Change::Reply {
            request: r#"{"execute":"query-jobs","id":1e3}"#,
            qemu: r#"{"return": [], "id": 1000}"#,
            ours: r#"{"return": [], "id": 1e3}"#,
        },
        reason: ID_VERBATIM,
    },
    Deviation {
        case: "13",
        change: Change::Reply {
            request: r#"{"execute":"query-jobs","id":-0}"#,
            qemu: r#"{"return": [], "id": 0}"#,
            ours: r#"{"return": [], "id": -0}"#,
        },
        reason: ID_VERBATIM,
    },
    Deviation {
        case: "13",
        change: Change::Reply {
            request: r#"{"execute":"query-jobs","id":-0.0}"#,
            qemu: r#"{"return": [], "id": -0}"#,
            ours: r#"{"return": [], "id": -0.0}"#,
        },
        reason: ID_VERBATIM,
    },
    Deviation {
        case: "13",
        change: Change::Reply {
            request: r#"{"execute":"query-jobs","id":1E+2}"#,
            qemu: r#"{"return": [], "id": 100}"#,
            ours: r#"{"return": [], "id": 1E+2}"#,
        },
        reason: ID_VERBATIM,
    },
    Deviation {
        case: "06",
        change: Change::Reply {
            request: r#"{"execute":"qmp_capabilities","arguments":{"enable":["async"]},"id":1}"#,
            qemu: r#"{"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'async'"}}"#,
            ours: r#"{"id": 1, "error": {"class": "GenericError", "desc": "Capability async not available"}}"#,
        },
        reason: "we know the async capability; this case runs on a server that does not offer \
                 it (so the rest of the transcript stays in negotiation mode), and we say so",
    },
    Deviation {
        case: "18",
        change: Change::Reply {
            request: r#"{"execute": "block-job-cancel", "arguments": {"device": "j", "bogus": 1, "zzz": 2}, "id": "unexpected"}"#,
            qemu: r#"{"id": "unexpected", "error": {"class": "GenericError", "desc": "Parameter 'zzz' is unexpected"}}"#,
            ours: r#"{"id": "unexpected", "error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}"#,
        },
        reason: "with several unexpected arguments QEMU names the first in GLib hash-table \
                 order, which is arbitrary; we name the first in sorted order",
    },
    Deviation {
        case: "27",
        change: Change::Omitted {
            qemu: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        },
        reason: "a limit error is one error reply followed by clean recovery, not QEMU 10.0's \
                 cascade of 1025 parse errors",
    },
    Deviation {
        case: "38",
        change: Change::NotSilent { conn: "c1" },
        reason: "we serve many clients at once: the second client gets its greeting (and its \
                 early request is answered) at once instead of after the first client leaves",
    },
    Deviation {
        case: "43",
        change: Change::Skipped,
        reason: "pretty=on monitors (multi-line indented output) are not supported",
    },
];

/// Cases whose recorded reply order after a FIFO release depends on QEMU's socket reads
/// (Recv-Q): there we check behaviour instead of the exact interleaving. The first reply
/// (the blocked command's) must come first, every recorded reply must arrive, and replies
/// to in-band commands keep their order; an `exec-oob` reply may come earlier.
const RELAXED_AFTER_RELEASE: &[&str] = &["34", "35", "36"];

fn case_id(file: &str) -> &str {
    file.split('-').next().unwrap_or(file)
}

fn deviations(file: &str) -> impl Iterator<Item = &'static Deviation> + '_ {
    DEVIATIONS.iter().filter(move |d| d.case == case_id(file))
}

// ---------------------------------------------------------------------------------------
// The qemu-storage-daemon stand-in
// ---------------------------------------------------------------------------------------

/// QSD's default size of a null-co node.
const NULL_CO_SIZE: u64 = 1 << 30;

/// State behind the stand-in commands: block nodes, parked FIFO-blocked commands, events.
#[derive(Default)]
struct Qsd {
    /// Node name to size.
    nodes: Mutex<BTreeMap<String, u64>>,
    /// FIFO name (`fifo-xyz`) to the blocked `blockdev-add` and the node it creates.
    blocked: Mutex<HashMap<String, (QmpReturn, String, u64)>>,
    parked: tokio::sync::Notify,
    events: OnceLock<Events>,
    quit_requested: Mutex<bool>,
}

impl Qsd {
    /// Answers the command blocked on `fifo` as QEMU does once the FIFO opens: the node
    /// appears and the command succeeds (even if its client has gone).
    async fn release(&self, fifo: &str) {
        let blocked = tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.parked.notified();
                if let Some(entry) = self.blocked.lock().unwrap().remove(fifo) {
                    return entry;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing blocked on {fifo}"));
        let (ret, node, size) = blocked;
        self.nodes.lock().unwrap().insert(node, size);
        ret.ok(&json!({}));
    }

    /// Waits until a command is blocked on `fifo`.
    async fn wait_blocked(&self, fifo: &str) {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.parked.notified();
                if self.blocked.lock().unwrap().contains_key(fifo) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing blocked on {fifo}"));
    }

    fn emit(&self, name: &str, data: Value) {
        self.events
            .get()
            .expect("events installed")
            .emit(name, Some(data));
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobArgs {
    device: String,
    #[allow(dead_code)]
    force: Option<bool>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BlockJobSetSpeedArgs {
    device: String,
    #[allow(dead_code)]
    speed: i64,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct IdArgs {
    id: String,
}

/// `BlockdevOptions`, flattened: the discriminator `driver` and the members of the drivers
/// the transcripts use.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct BlockdevOptions {
    driver: BlockdevDriver,
    node_name: Option<String>,
    size: Option<u64>,
    read_zeroes: Option<bool>,
    config: Option<String>,
    image: Option<Box<BlockdevOptions>>,
}

#[derive(Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
enum BlockdevDriver {
    Blkdebug,
    NullCo,
    NullAio,
    Raw,
    File,
    Qcow2,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct NodeNameArgs {
    node_name: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct BlockdevBackupArgs {
    job_id: String,
    device: String,
    target: String,
    sync: MirrorSyncMode,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
enum MirrorSyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TransactionArgs {
    actions: Vec<TransactionAction>,
}

/// A transaction action with its discriminator kept as a string: QEMU names a bad union
/// discriminator by its bare member name (`'type'`), not by its path in the list.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TransactionAction {
    #[serde(rename = "type")]
    kind: String,
    #[allow(dead_code)]
    data: Option<Value>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct WriteThresholdArgs {
    node_name: String,
    #[allow(dead_code)]
    write_threshold: QapiUint64,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct DirtyBitmapAddArgs {
    node: String,
    name: String,
    granularity: Option<u32>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct BlockResizeArgs {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct QomGetArgs {
    path: String,
    property: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct QueryNamedBlockNodesArgs {
    flat: Option<bool>,
}

/// QAPI's `uint64` as QEMU's input visitor reads it: any integer (a negative one wraps), and
/// anything else is `Parameter '...' expects uint64` rather than a type error.
#[derive(schemars::JsonSchema)]
struct QapiUint64(#[allow(dead_code)] u64);

impl<'de> Deserialize<'de> for QapiUint64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match (value.as_u64(), value.as_i64()) {
            (Some(n), _) => Ok(QapiUint64(n)),
            (None, Some(n)) => Ok(QapiUint64(n as u64)),
            _ => Err(serde::de::Error::invalid_value(
                serde::de::Unexpected::Other("a non-integer"),
                &"u64",
            )),
        }
    }
}

fn job_not_found(device: &str) -> QmpError {
    QmpError::device_not_active(format!("Block job '{device}' not found"))
}

/// Registers the QSD commands the transcripts send.
fn qsd_commands(qsd: &Arc<Qsd>) -> Registry {
    let mut builder = Registry::builder();
    let blockdev_add = Arc::clone(qsd);
    let blockdev_del = Arc::clone(qsd);
    let backup = Arc::clone(qsd);
    let named_nodes = Arc::clone(qsd);
    let quit = Arc::clone(qsd);
    builder
        // query-jobs and job-pause are the dispatcher's built-ins (no job exists here).
        .add(Command::sync("query-block-jobs", |_: NoArgs, _| Ok(json!([]))))
        .unwrap()
        .add(Command::sync("query-block-exports", |_: NoArgs, _| {
            Ok(json!([]))
        }))
        .unwrap()
        .add(Command::sync("block-job-cancel", |a: BlockJobArgs, _| -> Result<(), _> {
            Err(job_not_found(&a.device))
        }))
        .unwrap()
        .add(Command::sync("block-job-pause", |a: BlockJobArgs, _| -> Result<(), _> {
            Err(job_not_found(&a.device))
        }))
        .unwrap()
        .add(Command::sync(
            "block-job-set-speed",
            |a: BlockJobSetSpeedArgs, _| -> Result<(), _> { Err(job_not_found(&a.device)) },
        ))
        .unwrap()
        .add(Command::sync("chardev-remove", |a: IdArgs, _| -> Result<(), _> {
            Err(QmpError::generic(format!("Chardev '{}' not found", a.id)))
        }))
        .unwrap()
        .add(Command::sync("qom-get", |a: QomGetArgs, _| -> Result<(), _> {
            Err(QmpError::device_not_found(format!(
                "Device '{}' not found",
                a.path
            )))
        }))
        .unwrap()
        .add(Command::sync("block_resize", |a: BlockResizeArgs, _| -> Result<(), _> {
            Err(QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                a.device.unwrap_or_default(),
                a.node_name.unwrap_or_default()
            )))
        }))
        .unwrap()
        .add(Command::sync(
            "block-set-write-threshold",
            |a: WriteThresholdArgs, _| -> Result<(), _> {
                Err(QmpError::generic(format!(
                    "Device '{}' not found",
                    a.node_name
                )))
            },
        ))
        .unwrap()
        .add(Command::sync(
            "block-dirty-bitmap-add",
            |a: DirtyBitmapAddArgs, _| -> Result<(), _> {
                Err(QmpError::generic(format!(
                    "Cannot find device='' nor node-name='{}'",
                    a.node
                )))
            },
        ))
        .unwrap()
        .add(Command::sync("transaction", |a: TransactionArgs, _| {
            const KINDS: &[&str] = &[
                "abort",
                "block-dirty-bitmap-add",
                "blockdev-backup",
                "blockdev-snapshot",
                "drive-backup",
            ];
            for action in &a.actions {
                if !KINDS.contains(&action.kind.as_str()) {
                    return Err(QmpError::generic(format!(
                        "Parameter 'type' does not accept value '{}'",
                        action.kind
                    )));
                }
            }
            Ok(json!({}))
        }))
        .unwrap()
        .add(Command::deferred(
            "blockdev-add",
            move |a: BlockdevOptions, _, ret: QmpReturn| {
                let node = a.node_name.clone().unwrap_or_default();
                let size = a.size.unwrap_or(NULL_CO_SIZE);
                // The recorder blocked QEMU with a blkdebug config FIFO named TMP/fifo-*.
                let fifo = a.config.as_deref().and_then(|c| c.strip_prefix("TMP/"));
                match fifo {
                    Some(fifo) if a.driver == BlockdevDriver::Blkdebug => {
                        let mut blocked = blockdev_add.blocked.lock().unwrap();
                        blocked.insert(fifo.to_string(), (ret, node, size));
                        blockdev_add.parked.notify_waiters();
                    }
                    _ => {
                        blockdev_add.nodes.lock().unwrap().insert(node, size);
                        ret.ok(&json!({}));
                    }
                }
            },
        ))
        .unwrap()
        .add(Command::sync("blockdev-del", move |a: NodeNameArgs, _| {
            match blockdev_del.nodes.lock().unwrap().remove(&a.node_name) {
                Some(_) => Ok(json!({})),
                None => Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{}'",
                    a.node_name
                ))),
            }
        }))
        .unwrap()
        .add(Command::sync(
            "query-named-block-nodes",
            move |_: QueryNamedBlockNodesArgs, _| {
                let nodes = named_nodes.nodes.lock().unwrap();
                Ok(nodes
                    .keys()
                    .map(|name| json!({"node-name": name}))
                    .collect::<Vec<_>>())
            },
        ))
        .unwrap()
        .add(Command::sync("blockdev-backup", move |a: BlockdevBackupArgs, _| {
            let len = backup.nodes.lock().unwrap().get(&a.device).copied();
            let Some(len) = len else {
                return Err(QmpError::generic(format!(
                    "Cannot find device='{}' nor node-name='{}'",
                    a.device, a.device
                )));
            };
            // A null-co backup completes within the command, so QEMU emits the whole job
            // life cycle before the reply.
            let status = |status: &str| json!({"status": status, "id": a.job_id});
            for state in ["created", "running", "paused", "running", "waiting", "pending"] {
                backup.emit("JOB_STATUS_CHANGE", status(state));
            }
            backup.emit(
                "BLOCK_JOB_COMPLETED",
                json!({"device": a.job_id, "len": len, "offset": len, "speed": 0, "type": "backup"}),
            );
            for state in ["concluded", "null"] {
                backup.emit("JOB_STATUS_CHANGE", status(state));
            }
            Ok(json!({}))
        }))
        .unwrap()
        .add(Command::sync("quit", move |_: NoArgs, _| {
            *quit.quit_requested.lock().unwrap() = true;
            Ok(json!({}))
        }))
        .unwrap();
    builder.build()
}

/// The version QSD 10.0.2 reported when the transcripts were recorded.
fn qsd_version() -> VersionInfo {
    VersionInfo::new(10, 0, 2, "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1")
}

/// A server with the QSD stand-ins, configured for `file`.
fn start_server(file: &str, configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Started {
    let qsd = Arc::new(Qsd::default());
    let mut builder = Server::builder(qsd_commands(&qsd)).version(qsd_version());
    if case_id(file) == "06" {
        builder = builder.offer_async(false);
    }
    let server = configure(builder).build();
    let _ = qsd.events.set(server.events().clone());
    Started {
        server: TestServer::serve(server, Holds::default()),
        qsd,
    }
}

struct Started {
    server: TestServer,
    qsd: Arc<Qsd>,
}

// ---------------------------------------------------------------------------------------
// The replayer
// ---------------------------------------------------------------------------------------

/// Reconstructs a payload the recorder cut, from what the transcript says it was; the result
/// is checked against the recorded length and SHA-256.
fn reconstruct(payload: &Payload) -> Option<Vec<u8>> {
    let (len, _) = payload.full.as_ref()?;
    let burst = {
        // 30, 31: `{"execute": "query-jobs", "id": N}\n` for N = 1, 2, ...
        let mut bytes = Vec::new();
        let mut n = 1;
        while bytes.len() < *len {
            bytes.extend(format!("{{\"execute\": \"query-jobs\", \"id\": {n}}}\n").bytes());
            n += 1;
        }
        bytes
    };
    let candidates = [
        burst,
        // 27: `{"execute":"query-jobs","id":[[[...]]]}\n`, n levels inside `id`.
        {
            let head = br#"{"execute":"query-jobs","id":"#;
            let n = len.saturating_sub(head.len() + 2) / 2;
            let mut bytes = head.to_vec();
            bytes.extend(std::iter::repeat_n(b'[', n));
            bytes.extend(std::iter::repeat_n(b']', n));
            bytes.extend_from_slice(b"}\n");
            bytes
        },
        // 27: QEMU's echo of it, `{"return": [], "id": [[[...]]]}\r\n`.
        {
            let head = br#"{"return": [], "id": "#;
            let n = len.saturating_sub(head.len() + 3) / 2;
            let mut bytes = head.to_vec();
            bytes.extend(std::iter::repeat_n(b'[', n));
            bytes.extend(std::iter::repeat_n(b']', n));
            bytes.extend_from_slice(b"}\r\n");
            bytes
        },
    ];
    candidates
        .into_iter()
        .find(|candidate| candidate.starts_with(&payload.bytes) && payload.matches(candidate))
}

/// Parses one server line, checking its CRLF ending.
fn parse_line(line: &[u8]) -> Value {
    try_parse_line(line)
        .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(line)))
}

/// Like [`parse_line`], but a value nested deeper than serde_json's recursion limit (27's
/// 1024 levels) is an error for the caller to handle.
fn try_parse_line(line: &[u8]) -> Result<Value, serde_json::Error> {
    assert!(
        line.ends_with(b"\r\n"),
        "line does not end in CRLF: {:?}",
        String::from_utf8_lossy(line)
    );
    serde_json::from_slice(line)
}

/// An event without its timestamp (which can never match), after checking it has one.
fn without_timestamp(mut event: Value) -> Value {
    if let Some(object) = event.as_object_mut() {
        if object.contains_key("event") {
            let timestamp = object.remove("timestamp").unwrap_or(Value::Null);
            assert!(
                timestamp["seconds"].is_u64() && timestamp["microseconds"].is_u64(),
                "bad event timestamp in {event:?}"
            );
        }
    }
    event
}

/// What we expect for one recorded line.
enum Expected {
    Line(Value),
    /// Too deep to parse: compared byte for byte.
    Raw(Vec<u8>),
    /// A cut line we cannot rebuild; checked by [`Replay::check_opaque`].
    Opaque,
}

struct Replay {
    file: String,
    records: Vec<Record>,
    started: Started,
    clients: HashMap<String, Client>,
    /// Connections the server has closed (nothing more can arrive).
    closed_by_server: Vec<String>,
    /// Indexes into [`DEVIATIONS`] that matched a line, to catch stale entries.
    applied: std::cell::RefCell<Vec<usize>>,
    /// The last bytes sent on each connection, to match [`Change::Reply`] deviations.
    last_sent: HashMap<String, Vec<u8>>,
    /// Ids of requests sent with `exec-oob`, for the relaxed ordering check.
    oob_ids: Vec<Value>,
}

impl Replay {
    async fn run(file: &str) {
        Self::run_with(file, |b| b).await
    }

    async fn run_with(file: &str, configure: impl FnOnce(ServerBuilder) -> ServerBuilder) {
        let transcript = Transcript::load(file);
        let mut replay = Replay {
            file: file.to_string(),
            records: transcript.records,
            started: start_server(file, configure),
            clients: HashMap::new(),
            closed_by_server: Vec::new(),
            last_sent: HashMap::new(),
            applied: Default::default(),
            oob_ids: Vec::new(),
        };
        let mut i = 0;
        while i < replay.records.len() {
            i = replay.step(i).await;
        }
        for (conn, client) in replay.clients.iter_mut() {
            if !replay.closed_by_server.contains(conn) {
                assert_no_more(conn, client).await;
            }
        }
        for (index, deviation) in DEVIATIONS.iter().enumerate() {
            let line_level = matches!(
                deviation.change,
                Change::Reply { .. } | Change::Omitted { .. }
            );
            if deviation.case == case_id(file) && line_level {
                assert!(
                    replay.applied.borrow().contains(&index),
                    "{file}: deviation {deviation:?} never applied"
                );
            }
        }
        replay.started.server.server.shutdown();
    }

    fn client(&mut self, conn: &str) -> &mut Client {
        self.clients
            .get_mut(conn)
            .unwrap_or_else(|| panic!("{conn} is not connected"))
    }

    /// Performs record `i` (and, for a relaxed batch, the records it covers); returns the
    /// index of the next record.
    async fn step(&mut self, i: usize) -> usize {
        let record = self.records[i].clone();
        match record {
            Record::Connect { conn } => {
                let client = self.started.server.connect().await;
                self.clients.insert(conn, client);
            }
            Record::Send { conn, payload } => {
                let bytes = if payload.is_truncated() {
                    reconstruct(&payload).unwrap_or_else(|| {
                        panic!("{}: cannot rebuild a cut send {payload:?}", self.file)
                    })
                } else {
                    payload.bytes.clone()
                };
                self.note_oob_ids(&bytes);
                self.client(&conn).send(&bytes).await;
                self.last_sent.insert(conn.clone(), bytes.clone());
                if let Some(fifo) = blocking_fifo(&bytes) {
                    // QEMU's main loop was blocked before the transcript's next send; wait
                    // until ours is too, so later sends arrive as separate reads.
                    self.started.qsd.wait_blocked(&fifo).await;
                }
            }
            Record::Recv { conn, line, count } => {
                for _ in 0..count {
                    self.expect_line(&conn, &line, i).await;
                }
            }
            Record::Silence { conn, ms } => {
                let excused = deviations(&self.file)
                    .any(|d| matches!(d.change, Change::NotSilent { conn: c } if c == conn));
                if !excused {
                    self.client(&conn)
                        .expect_silence(ms.min(MAX_SILENCE_MS))
                        .await;
                }
            }
            Record::Eof { conn } => {
                if std::mem::take(&mut *self.started.qsd.quit_requested.lock().unwrap()) {
                    // What a VMM does after answering `quit`: stop serving.
                    self.started.server.server.shutdown();
                }
                self.client(&conn).expect_eof().await;
                self.closed_by_server.push(conn);
            }
            Record::ShutdownWrite { conn } => self.client(&conn).shutdown_write().await,
            Record::Close { conn } => {
                let mut client = self.clients.remove(&conn).expect("close of unknown conn");
                if !self.closed_by_server.contains(&conn) {
                    assert_no_more(&conn, &mut client).await;
                }
            }
            Record::Note { text } => {
                if let Some(fifo) = released_fifo(&text) {
                    self.started.qsd.release(fifo).await;
                    if RELAXED_AFTER_RELEASE.contains(&case_id(&self.file)) {
                        return self.relaxed_batch(i + 1).await;
                    }
                }
            }
        }
        i + 1
    }

    fn note_oob_ids(&mut self, bytes: &[u8]) {
        for line in bytes.split(|&b| b == b'\n') {
            if let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(line) {
                if request.contains_key("exec-oob") {
                    self.oob_ids
                        .push(request.get("id").cloned().unwrap_or(Value::Null));
                }
            }
        }
    }

    /// The expectation for a recorded line after applying this case's deviations; `None`
    /// when we deliberately send nothing.
    fn expected(&self, conn: &str, line: &Payload) -> Option<Expected> {
        let last_sent = self
            .last_sent
            .get(conn)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let last_sent = String::from_utf8_lossy(last_sent);
        let full = if line.is_truncated() {
            match reconstruct(line) {
                Some(full) => full,
                None => return Some(Expected::Opaque),
            }
        } else {
            line.bytes.clone()
        };
        let Ok(qemu) = try_parse_line(&full) else {
            return Some(Expected::Raw(full));
        };
        let parse = |text: &str| -> Value { serde_json::from_str(text).expect("deviation JSON") };
        for (index, deviation) in DEVIATIONS.iter().enumerate() {
            if deviation.case != case_id(&self.file) {
                continue;
            }
            let applied = || self.applied.borrow_mut().push(index);
            match deviation.change {
                Change::Reply {
                    request,
                    qemu: q,
                    ours,
                } if parse(q) == qemu && last_sent.trim_end().ends_with(request) => {
                    applied();
                    return Some(Expected::Line(parse(ours)));
                }
                Change::Omitted { qemu: q } if parse(q) == qemu => {
                    applied();
                    return None;
                }
                _ => {}
            }
        }
        Some(Expected::Line(qemu))
    }

    async fn expect_line(&mut self, conn: &str, line: &Payload, index: usize) {
        let Some(expected) = self.expected(conn, line) else {
            return;
        };
        let ours = self.client(conn).recv_line().await;
        if let Expected::Raw(qemu) = &expected {
            assert!(
                ours == *qemu,
                "{} record {index} on {conn}: reply differs: ours {:?}",
                self.file,
                String::from_utf8_lossy(&ours)
            );
            return;
        }
        let ours_value = parse_line(&ours);
        match expected {
            Expected::Raw(_) => unreachable!("compared above"),
            Expected::Line(qemu) if qemu.get("QMP").is_some() => {
                self.check_greeting(qemu, ours_value)
            }
            Expected::Line(qemu) => assert_eq!(
                without_timestamp(ours_value),
                without_timestamp(qemu),
                "{} record {index} on {conn}: reply differs (left: ours, right: QEMU)",
                self.file,
            ),
            Expected::Opaque => self.check_opaque(index, &ours_value),
        }
    }

    /// Greetings must match except for `capabilities`, which lists what we offer.
    fn check_greeting(&self, mut qemu: Value, mut ours: Value) {
        let config = self.started.server.server.config();
        let mut offered = Vec::new();
        if config.offer_oob {
            offered.push("oob");
        }
        if config.offer_async {
            offered.push("async");
        }
        let caps = ours["QMP"]
            .as_object_mut()
            .and_then(|qmp| qmp.remove("capabilities"));
        assert_eq!(
            caps,
            Some(json!(offered)),
            "{}: greeting capabilities",
            self.file
        );
        qemu["QMP"].as_object_mut().unwrap().remove("capabilities");
        assert_eq!(ours, qemu, "{}: greeting", self.file);
    }

    /// A cut line we cannot rebuild: 42's `query-named-block-nodes` (QEMU's full node
    /// records). Our stand-in lists node names only; they must be the nodes the recorder
    /// found afterwards, minus QEMU's auto-named children (`#block...`).
    fn check_opaque(&self, index: usize, ours: &Value) {
        let survivors = self.records[index..]
            .iter()
            .find_map(|r| match r {
                Record::Note { text } => text.strip_prefix("nodes existing afterwards: "),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{}: cut line {index} and no node list", self.file));
        let expected: Vec<String> =
            serde_json::from_str::<Vec<String>>(&survivors.replace('\'', "\""))
                .expect("node list")
                .into_iter()
                .filter(|name| !name.starts_with('#'))
                .collect();
        let names: Vec<String> = ours["return"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: not a node list: {ours}", self.file))
            .iter()
            .map(|node| node["node-name"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(names, expected, "{}: surviving nodes", self.file);
    }

    /// Checks the replies recorded right after a FIFO release behaviourally (see
    /// [`RELAXED_AFTER_RELEASE`]); returns the index after the batch.
    async fn relaxed_batch(&mut self, start: usize) -> usize {
        let mut end = start;
        let mut expected = Vec::new();
        let mut batch_conn = None;
        while let Some(Record::Recv { conn, line, count }) = self.records.get(end) {
            if batch_conn.get_or_insert(conn.clone()) != conn {
                break;
            }
            for _ in 0..*count {
                if let Some(Expected::Line(value)) = self.expected(conn, line) {
                    expected.push(value);
                }
            }
            end += 1;
        }
        let Some(conn) = batch_conn else {
            return start;
        };
        let mut ours = Vec::new();
        for _ in 0..expected.len() {
            let line = self.client(&conn).recv_line().await;
            ours.push(parse_line(&line));
        }
        assert_eq!(
            ours.first(),
            expected.first(),
            "{}: the blocked command answers first",
            self.file
        );
        let in_band = |replies: &[Value]| -> Vec<Value> {
            replies
                .iter()
                .filter(|r| !self.oob_ids.contains(&r["id"]))
                .cloned()
                .collect()
        };
        assert_eq!(
            in_band(&ours),
            in_band(&expected),
            "{}: in-band replies in order",
            self.file
        );
        let mut sorted_ours: Vec<String> = ours.iter().map(Value::to_string).collect();
        let mut sorted_expected: Vec<String> = expected.iter().map(Value::to_string).collect();
        sorted_ours.sort();
        sorted_expected.sort();
        assert_eq!(
            sorted_ours, sorted_expected,
            "{}: the same replies",
            self.file
        );
        end
    }
}

/// The FIFO a sent `blockdev-add` blocks on (`"config": "TMP/fifo-x"`).
fn blocking_fifo(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let start = text.find("\"TMP/")? + "\"TMP/".len();
    let len = text[start..].find('"')?;
    Some(text[start..start + len].to_string())
}

/// The FIFO a note says was released (`FIFO fifo-x opened+closed by client: ...`).
fn released_fifo(note: &str) -> Option<&str> {
    let rest = note.strip_prefix("FIFO ")?;
    let (fifo, tail) = rest.split_once(' ')?;
    tail.starts_with("opened+closed").then_some(fifo)
}

/// Fails if the server sent anything the transcript does not show.
async fn assert_no_more(conn: &str, client: &mut Client) {
    let extra =
        tokio::time::timeout(Duration::from_millis(TRAILING_CHECK_MS), client.recv_line()).await;
    if let Ok(line) = extra {
        panic!(
            "{conn}: unexpected output {:?}",
            String::from_utf8_lossy(&line)
        );
    }
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

macro_rules! replay_cases {
    ($($(#[$attr:meta])* $name:ident => $file:literal,)*) => {
        /// Every transcript replayed by a test below.
        const REPLAYED: &[&str] = &[$($file),*];
        $(
            $(#[$attr])*
            #[tokio::test]
            async fn $name() {
                Replay::run($file).await;
            }
        )*
    };
}

replay_cases! {
    greeting => "01-greeting.jsonl",
    cmd_before_negotiation => "02-cmd-before-negotiation.jsonl",
    malformed_before_negotiation => "03-malformed-before-negotiation.jsonl",
    negotiate_plain => "04-negotiate-plain.jsonl",
    negotiate_oob => "05-negotiate-oob.jsonl",
    negotiate_bad_args => "06-negotiate-bad-args.jsonl",
    negotiate_twice => "07-negotiate-twice.jsonl",
    non_object_requests => "08-non-object-requests.jsonl",
    missing_execute => "09-missing-execute.jsonl",
    execute_not_string => "10-execute-not-string.jsonl",
    unexpected_member => "11-unexpected-member.jsonl",
    arguments_not_object => "12-arguments-not-object.jsonl",
    id_echo_types => "13-id-echo-types.jsonl",
    id_on_errors => "14-id-on-errors.jsonl",
    exec_oob_without_cap => "15-exec-oob-without-cap.jsonl",
    exec_oob_with_cap => "16-exec-oob-with-cap.jsonl",
    unknown_command => "17-unknown-command.jsonl",
    argument_errors => "18-argument-errors.jsonl",
    error_classes => "19-error-classes.jsonl",
    json_syntax_errors => "20-json-syntax-errors.jsonl",
    json_lexical_errors => "21-json-lexical-errors.jsonl",
    invalid_utf8 => "22-invalid-utf8.jsonl",
    whitespace_only => "23-whitespace-only.jsonl",
    lookahead_scalars => "25-lookahead-scalars.jsonl",
    nesting_limit => "27-nesting-limit.jsonl",
    burst_20 => "30-burst-20.jsonl",
    burst_20_oob => "31-burst-20-oob.jsonl",
    queue_limit_7 => "34-queue-limit-7.jsonl",
    queue_limit_8 => "35-queue-limit-8.jsonl",
    no_oob_blocked => "36-no-oob-blocked.jsonl",
    events_job => "37-events-job.jsonl",
    second_client_waits => "38-second-client-waits.jsonl",
    reconnect_resets => "39-reconnect-resets.jsonl",
    half_close => "40-half-close.jsonl",
    disconnect_inflight_no_oob => "42-disconnect-inflight-no-oob.jsonl",
    mode_control => "44-mode-control.jsonl",
    quit => "45-quit.jsonl",
}

/// Transcripts replaced by scaled-down equivalents below (QEMU needs 64 MiB or millions of
/// tokens to reach its limits).
const SCALED_DOWN: &[&str] = &["28-token-count-limit.jsonl", "29-token-size-limit.jsonl"];

#[test]
fn every_transcript_is_covered() {
    for file in Transcript::corpus_files() {
        let skipped = deviations(&file).any(|d| matches!(d.change, Change::Skipped));
        assert!(
            REPLAYED.contains(&file.as_str()) || SCALED_DOWN.contains(&file.as_str()) || skipped,
            "{file} is neither replayed, scaled down nor listed as a deviation"
        );
    }
    for deviation in DEVIATIONS {
        assert!(!deviation.reason.is_empty());
    }
}

/// 28 scaled down: with a 64-token limit, 63 tokens pass and 65 give one error, then the
/// stream recovers (QEMU: 2^21 tokens).
#[tokio::test]
async fn token_count_limit_scaled_down() {
    let limits = Limits {
        max_tokens: 64,
        ..Limits::default()
    };
    let started = start_server("28", |b| b.limits(limits));
    let mut client = started.server.negotiated(&[]).await;
    // `{"execute":"query-jobs","id":[1,...]}` has 2n + 9 tokens.
    let request = |n: usize| {
        let ones = vec!["1"; n].join(",");
        format!("{{\"execute\":\"query-jobs\",\"id\":[{ones}]}}\n")
    };
    client.send(request(27)).await;
    assert_eq!(
        client.recv().await,
        json!({"return": [], "id": vec![1; 27]})
    );
    client.send(request(28)).await;
    assert_eq!(
        client.recv().await,
        json!({"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}})
    );
    client
        .send("{\"execute\": \"query-jobs\", \"id\": \"after-count\"}\n")
        .await;
    assert_eq!(
        client.recv().await,
        json!({"return": [], "id": "after-count"})
    );
    assert_no_more("c0", &mut client).await;
}

/// 29 scaled down: with a 256-byte limit, a longer string gives one size error and no
/// `stray` error for its tail (QEMU 10.0 sends both), then the stream recovers.
#[tokio::test]
async fn token_size_limit_scaled_down() {
    let limits = Limits {
        max_bytes: 256,
        ..Limits::default()
    };
    let started = start_server("29", |b| b.limits(limits));
    let mut client = started.server.negotiated(&[]).await;
    let request = |n: usize| {
        let id = "a".repeat(n);
        format!("{{\"execute\":\"query-jobs\",\"id\":\"{id}\"}}\n")
    };
    client.send(request(100)).await;
    assert_eq!(
        client.recv().await,
        json!({"return": [], "id": "a".repeat(100)})
    );
    client.send(request(300)).await;
    assert_eq!(
        client.recv().await,
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    client
        .send("{\"execute\": \"query-jobs\", \"id\": \"after-size\"}\n")
        .await;
    assert_eq!(
        client.recv().await,
        json!({"return": [], "id": "after-size"})
    );
    assert_no_more("c0", &mut client).await;
}

/// 42 with both requests in one write: the second is still in our input buffer when the
/// client hangs up, and runs once the blocked command finishes. QEMU reads one byte at a time
/// and stops after each request, so it never holds a whole unread request and loses it with
/// the socket.
#[tokio::test]
async fn disconnect_inflight_no_oob_coalesced() {
    let started = start_server("42", |b| b);
    let mut client = started.server.negotiated(&[]).await;
    client
        .send(concat!(
            r#"{"execute": "blockdev-add", "id": "dn-blocked", "arguments": {"driver": "blkdebug", "node-name": "dn-blk", "config": "TMP/fifo-dn-blk", "image": {"driver": "null-co", "read-zeroes": true}}}"#,
            "\n",
            r#"{"execute": "blockdev-add", "id": "dn-n1", "arguments": {"driver": "null-co", "node-name": "dn-n1"}}"#,
            "\n",
        ))
        .await;
    started.qsd.wait_blocked("fifo-dn-blk").await;
    drop(client);
    started.qsd.release("fifo-dn-blk").await;
    let mut client = started.server.negotiated(&[]).await;
    client
        .send(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true},"id":"nodes"}"#)
        .await;
    assert_eq!(
        client.recv().await,
        json!({"return": [{"node-name": "dn-blk"}], "id": "nodes"})
    );
}
