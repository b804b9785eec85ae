//! The big-reply goal of issue #16 (target 6): a 10 MiB reply, a large `query-*` result, is
//! encoded and written at ≥ 0.8× the speed of `serde_json::to_writer` into a `Vec` plus the
//! write itself, and holds up other clients' small replies by no more than 10 ms at p99.
//!
//! Run with `cargo bench -p qmp-benches --bench reply` (about 30 s). In process, on a
//! two-worker runtime, over Unix socket pairs:
//!
//! - *dispatcher*: a client sends `x-big` to a [`Server`] whose handler returns the node list
//!   (serialized by the dispatcher as any reply is) and reads the reply line;
//! - *baseline*: a task serializes the same list with `serde_json::to_writer` into a `Vec`
//!   and writes it to a socket, whose peer reads the line the same way.
//!
//! Rounds alternate between the two so the machine's noise falls on both alike; the medians
//! and their ratio are printed. Meanwhile a second client of the server sends `query-version`
//! one at a time, and the p99 of its round trips is printed beside the same measure taken
//! with no big reply under way. With `--test` (as `cargo test --benches` runs it) a few small
//! rounds only, as a smoke test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use qmp_dispatcher::{Command, NoArgs, QmpError, Registry, Server};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One entry of the list, shaped like QEMU's `query-named-block-nodes`.
#[derive(Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
struct Node {
    node_name: String,
    drv: String,
    file: String,
    ro: bool,
    encrypted: bool,
    bps: u64,
    iops: u64,
    image: Image,
}

#[derive(Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
struct Image {
    virtual_size: u64,
    filename: String,
    format: String,
    cluster_size: u64,
    dirty_flag: bool,
}

/// A list whose JSON is at least `bytes` long.
fn nodes(bytes: usize) -> Vec<Node> {
    let node = |index: usize| Node {
        node_name: format!("node{index}"),
        drv: "qcow2".into(),
        file: format!("/var/lib/vm/disk{index}.qcow2"),
        ro: index % 2 == 0,
        encrypted: false,
        bps: 0,
        iops: index as u64,
        image: Image {
            virtual_size: (index as u64) << 30,
            filename: format!("/var/lib/vm/disk{index}.qcow2"),
            format: "qcow2".into(),
            cluster_size: 65536,
            dirty_flag: false,
        },
    };
    // The shortest entry sets the count, so the list comes out at least `bytes` long.
    let per_node = serde_json::to_vec(&node(0)).unwrap().len() + 1;
    (0..bytes.div_ceil(per_node)).map(node).collect()
}

/// The list, shared between rounds without copying; serialized whole on every reply.
#[derive(Clone, schemars::JsonSchema)]
#[schemars(transparent)]
struct Nodes(Arc<Vec<Node>>);

impl Serialize for Nodes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// A line reader on one end of a socket pair.
struct Lines {
    reader: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl Lines {
    fn new(stream: UnixStream) -> Self {
        Lines {
            reader: BufReader::with_capacity(1 << 20, stream),
            line: Vec::with_capacity(16 << 20),
        }
    }

    async fn next(&mut self) -> usize {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line).await.unwrap();
        assert!(n > 0, "unexpected EOF");
        n
    }

    async fn send(&mut self, request: &[u8]) {
        self.reader.get_mut().write_all(request).await.unwrap();
    }
}

/// A client of `server`, greeted and negotiated.
async fn client(server: &Server) -> Lines {
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.spawn_connection(theirs);
    let mut lines = Lines::new(ours);
    lines.next().await; // greeting
    lines.send(b"{\"execute\": \"qmp_capabilities\"}\n").await;
    lines.next().await;
    lines
}

/// The dispatcher's round: `x-big` and its reply line.
async fn dispatcher_round(client: &mut Lines) -> Duration {
    let start = Instant::now();
    client.send(b"{\"execute\": \"x-big\", \"id\": 1}\n").await;
    let n = client.next().await;
    let elapsed = start.elapsed();
    assert!(client.line.starts_with(b"{\"return\": ["), "not a return");
    std::hint::black_box(n);
    elapsed
}

/// The baseline's round: `to_writer` into a `Vec`, written whole, read as a line.
async fn baseline_round(list: &Nodes) -> Duration {
    let (writer, reader) = UnixStream::pair().unwrap();
    let mut reader = Lines::new(reader);
    let list = list.clone();
    let start = Instant::now();
    let writing = tokio::spawn(async move {
        let mut writer = writer;
        let mut out = Vec::new();
        serde_json::to_writer(&mut out, &list).unwrap();
        out.extend_from_slice(b"\r\n");
        writer.write_all(&out).await.unwrap();
        writer
    });
    reader.next().await;
    let elapsed = start.elapsed();
    drop(writing.await.unwrap());
    elapsed
}

/// Round trips of `query-version` while `running` holds, one at a time.
async fn small_replies(mut client: Lines, running: Arc<AtomicBool>) -> Vec<Duration> {
    let mut times = Vec::new();
    while running.load(Ordering::Relaxed) {
        let start = Instant::now();
        client.send(b"{\"execute\": \"query-version\"}\n").await;
        client.next().await;
        times.push(start.elapsed());
    }
    times
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort_unstable();
    times[((times.len() - 1) as f64 * p) as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let smoke = std::env::args().any(|arg| arg == "--test");
    let (bytes, rounds) = if smoke { (1 << 20, 3) } else { (10 << 20, 40) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let list = Nodes(Arc::new(nodes(bytes)));
    let size = serde_json::to_vec(&list).unwrap().len();
    let mut registry = Registry::builder();
    let served = list.clone();
    registry
        .add(Command::sync("x-big", move |_: NoArgs, _| {
            Ok::<_, QmpError>(served.clone())
        }))
        .expect("a new name");
    let server = Server::builder(registry.build()).build();

    runtime.block_on(async {
        // Small replies with nothing else under way, for reference.
        let running = Arc::new(AtomicBool::new(true));
        let quiet = tokio::spawn(small_replies(client(&server).await, Arc::clone(&running)));
        tokio::time::sleep(Duration::from_millis(if smoke { 50 } else { 1000 })).await;
        running.store(false, Ordering::Relaxed);
        let mut quiet = quiet.await.unwrap();

        let mut big = client(&server).await;
        let running = Arc::new(AtomicBool::new(true));
        let busy = tokio::spawn(small_replies(client(&server).await, Arc::clone(&running)));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(dispatcher_round(&mut big).await);
            theirs.push(baseline_round(&list).await);
        }
        running.store(false, Ordering::Relaxed);
        let mut busy = busy.await.unwrap();

        let (ours, theirs) = (percentile(&mut ours, 0.5), percentile(&mut theirs, 0.5));
        println!(
            "big_reply: {:.1} MiB, medians of {rounds} alternating rounds: dispatcher {:.1} ms, \
             to_writer + write {:.1} ms; speed ratio {:.2}x (goal >= 0.8x)",
            size as f64 / (1 << 20) as f64,
            ms(ours),
            ms(theirs),
            theirs.as_secs_f64() / ours.as_secs_f64(),
        );
        println!(
            "big_reply: query-version round trips of another client: p99 {:.2} ms while big \
             replies are written ({} round trips), p99 {:.2} ms with none ({}); goal: at most \
             10 ms more",
            ms(percentile(&mut busy, 0.99)),
            busy.len(),
            ms(percentile(&mut quiet, 0.99)),
            quiet.len(),
        );
    });
    server.shutdown();
}
