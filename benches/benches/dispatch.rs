//! Micro-benchmarks of dispatch: typed argument decoding, and requests served end to end
//! with registries of 10 and 10,000 commands.
//!
//! Run with `cargo bench -p qmp-benches --bench dispatch`.
//!
//! The registry's lookup is `pub(crate)`, so registry size is measured end to end: a
//! `Server` serves one async client over `tokio::io::duplex` (through `ByteStream`, no
//! socket), which pipelines 256 requests per iteration and reads the 256 replies. The
//! requests cycle through every registered name, so the 10,000-command case touches the
//! whole table; the goal is throughput flat (±10%) from 10 to 10,000 commands. A third case
//! registers 10,000 but uses only 10 of them, to tell table size from working set.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_main};
use qmp_dispatcher::{ByteStream, Command, NoArgs, QmpError, Registry, Server, args};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Requests pipelined per iteration of the end-to-end benchmark.
const PIPELINED: usize = 256;

/// A small argument struct, like `x-delay`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DelayArgs {
    ms: u64,
}

/// A richer one, shaped like a `blockdev-add` for a qcow2 node over a file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct BlockdevArgs {
    driver: String,
    node_name: String,
    read_only: Option<bool>,
    cache: Option<CacheArgs>,
    discard: Option<String>,
    file: FileArgs,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct CacheArgs {
    direct: bool,
    no_flush: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
#[allow(dead_code)]
struct FileArgs {
    driver: String,
    filename: String,
    aio: Option<String>,
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("benchmark arguments are objects"),
    }
}

fn argument_decoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("args_decode");
    let delay = object(json!({"ms": 10}));
    group.bench_function("small", |b| {
        b.iter_batched(
            || delay.clone(),
            |arguments| black_box(args::decode::<DelayArgs>(arguments).unwrap()),
            BatchSize::SmallInput,
        );
    });
    let blockdev = object(json!({
        "driver": "qcow2", "node-name": "disk0", "read-only": false,
        "cache": {"direct": true, "no-flush": false}, "discard": "unmap",
        "file": {"driver": "file", "filename": "/var/lib/vm/disk0.qcow2", "aio": "io_uring"},
    }));
    group.bench_function("nested", |b| {
        b.iter_batched(
            || blockdev.clone(),
            |arguments| black_box(args::decode::<BlockdevArgs>(arguments).unwrap()),
            BatchSize::SmallInput,
        );
    });
    let wrong = object(json!({"ms": "ten"}));
    group.bench_function("type_error", |b| {
        b.iter_batched(
            || wrong.clone(),
            |arguments| black_box(args::decode::<DelayArgs>(arguments).unwrap_err()),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// A server with `commands` registered commands besides the built-ins, each answering `{}`.
fn server_with(commands: usize) -> Server {
    let mut registry = Registry::builder();
    for index in 0..commands {
        registry
            .add(Command::sync(command_name(index), |_: NoArgs, _| {
                Ok::<_, QmpError>(json!({}))
            }))
            .expect("names are unique");
    }
    Server::builder(registry.build())
        .max_in_flight(PIPELINED * 2)
        .build()
}

/// Fixed-width names, so every request has the same length whatever the registry size.
fn command_name(index: usize) -> String {
    format!("x-bench-{index:05}")
}

/// The client end of a served duplex stream, negotiated with `async`.
struct Client {
    stream: DuplexStream,
    buf: Vec<u8>,
    /// `PIPELINED` requests, cycling through the registered names batch after batch.
    batches: Vec<Vec<u8>>,
    next_batch: usize,
}

impl Client {
    /// Connects to `server`; requests cycle through the first `names_used` commands.
    async fn connect(server: &Server, names_used: usize) -> Self {
        let (client, served) = tokio::io::duplex(256 * 1024);
        server.spawn_connection(ByteStream(served));
        let mut this = Client {
            stream: client,
            buf: Vec::with_capacity(64 * 1024),
            batches: Vec::new(),
            next_batch: 0,
        };
        this.read_lines(1).await; // greeting
        this.stream
            .write_all(br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["async"]}}"#)
            .await
            .unwrap();
        this.read_lines(1).await;
        let batch_count = names_used.div_ceil(PIPELINED).max(1);
        let mut id = 0;
        for _ in 0..batch_count {
            let mut batch = Vec::new();
            for _ in 0..PIPELINED {
                let name = command_name(id % names_used);
                batch.extend_from_slice(format!(r#"{{"execute":"{name}","id":{id}}}"#).as_bytes());
                id += 1;
            }
            this.batches.push(batch);
        }
        this
    }

    /// Reads until `lines` more newline-terminated messages have arrived.
    async fn read_lines(&mut self, mut lines: usize) {
        while lines > 0 {
            self.buf.clear();
            let read = self.stream.read_buf(&mut self.buf).await.unwrap();
            assert!(read > 0, "server closed the connection");
            lines = lines.saturating_sub(self.buf.iter().filter(|&&b| b == b'\n').count());
        }
    }

    /// Pipelines one batch and waits for all its replies.
    async fn round(&mut self) {
        let batch = std::mem::take(&mut self.batches[self.next_batch]);
        let (stream_read, mut stream_write) = tokio::io::split(&mut self.stream);
        let write = async {
            stream_write.write_all(&batch).await.unwrap();
        };
        let read = async {
            let mut stream_read = stream_read;
            let mut buf = std::mem::take(&mut self.buf);
            let mut lines = PIPELINED;
            while lines > 0 {
                buf.clear();
                let read = stream_read.read_buf(&mut buf).await.unwrap();
                assert!(read > 0, "server closed the connection");
                lines = lines.saturating_sub(buf.iter().filter(|&&b| b == b'\n').count());
            }
            buf
        };
        let ((), buf) = tokio::join!(write, read);
        self.buf = buf;
        self.batches[self.next_batch] = batch;
        self.next_batch = (self.next_batch + 1) % self.batches.len();
    }
}

fn registry_size(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("dispatch_end_to_end");
    group.throughput(Throughput::Elements(PIPELINED as u64));
    // (registered, names the requests cycle through): the third case separates the table's
    // size from the working set of entries touched.
    for (commands, names_used, label) in [
        (10, 10, "registered_commands"),
        (10_000, 10_000, "registered_commands"),
        (10_000, 10, "registered_commands_10_used"),
    ] {
        let server = server_with(commands);
        let mut client = runtime.block_on(Client::connect(&server, names_used));
        group.bench_with_input(BenchmarkId::new(label, commands), &commands, |b, _| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iterations {
                        client.round().await;
                    }
                    start.elapsed()
                })
            });
        });
        server.shutdown();
        drop(client);
        runtime.block_on(async {
            // The timer must be created inside the runtime.
            let _ = tokio::time::timeout(Duration::from_secs(5), server.wait()).await;
        });
    }
    group.finish();
}

/// The benchmark group that `criterion_main!` runs.
mod group {
    #![allow(missing_docs)] // criterion_group! defines an undocumented `pub fn`.
    criterion::criterion_group!(benches, super::argument_decoding, super::registry_size);
}
criterion_main!(group::benches);
