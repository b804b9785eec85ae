//! Micro-benchmarks of dispatch: typed argument decoding, and requests served end to end
//! with registries of 10 and 10,000 commands.
//!
//! Run with `cargo bench -p qmp-benches --bench dispatch`.
//!
//! The registry's lookup is `pub(crate)`, so registry size is measured end to end: a
//! `Server` serves one async client over `tokio::io::duplex` (through `ByteStream`, no
//! socket), which pipelines 256 requests per iteration and reads the 256 replies. The
//! requests cycle through every registered name, so the 10,000-command case touches the
//! whole table; the goal (issue #16) is cycling through all 10,000 within 1.2× the cost of
//! cycling through 10. A third case registers 10,000 but uses only 10 of them, to tell table
//! size from working set. The server and client are `qmp_benches::registry`'s, shared with
//! qmp-compare.
//!
//! After criterion's groups, `registry_ratio` times the three cases round by round in turn
//! and prints the ratios of their medians: criterion measures each case on its own, and the
//! noise between separate measurements on a shared machine swamps a 10-20% difference.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use qmp_benches::registry::{self, Client, PIPELINED, server_with};
use qmp_dispatcher::args;
use serde::Deserialize;
use serde_json::{Map, Value, json};

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

fn registry_size(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("dispatch_end_to_end");
    group.throughput(Throughput::Elements(PIPELINED as u64));
    // (registered, names the requests cycle through): the third case separates the table's
    // size from the working set of entries touched.
    for (commands, names_used) in registry::CASES {
        let label = if names_used == commands {
            "registered_commands"
        } else {
            "registered_commands_10_used"
        };
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

/// Rounds of each case timed by [`registry_ratio`].
const RATIO_ROUNDS: usize = 1500;

/// The registry-size goal as a ratio: the three cases timed round by round in turn (see
/// `qmp_benches::registry::interleaved_ratios`), since criterion measures each case on its
/// own and the machine's noise between them would swamp a 10-20% difference.
fn registry_ratio(rounds: usize) {
    let ratios = registry::interleaved_ratios(rounds, rounds / 10);
    println!(
        "registry_ratio: medians of {} interleaved rounds of {PIPELINED} requests: \
         10 of 10 commands {:.0} ns/cmd, all 10,000 of 10,000 {:.0} ns/cmd, 10 of 10,000 \
         {:.0} ns/cmd; all 10,000 ÷ 10 = {:.2}×, 10 of 10,000 ÷ 10 = {:.2}×",
        ratios.rounds,
        ratios.ns_per_command(0),
        ratios.ns_per_command(1),
        ratios.ns_per_command(2),
        ratios.all_of_10k(),
        ratios.ten_of_10k(),
    );
}

/// The benchmark group that `main` runs.
mod group {
    #![allow(missing_docs)] // criterion_group! defines an undocumented `pub fn`.
    criterion::criterion_group!(benches, super::argument_decoding, super::registry_size);
}

/// criterion's options that take a value, which is not a filter.
const VALUE_OPTIONS: [&str; 15] = [
    "--save-baseline",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--warm-up-time",
    "--measurement-time",
    "--sample-size",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--profile-time",
    "--output-format",
    "--color",
    "--plotting-backend",
];

/// criterion's groups, then the interleaved registry ratio unless a filter excludes it
/// (`cargo bench --bench dispatch -- registry_ratio` runs only the ratio; `--list` and
/// other filters skip it; under `--test` it runs a few rounds only, as a smoke test).
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut skip_value = false;
    for arg in &args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if VALUE_OPTIONS.contains(&arg.as_str()) {
            skip_value = true;
        } else if !arg.starts_with('-') {
            filter = Some(arg.as_str());
        }
    }
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    let ratio_wanted = filter.is_none_or(|filter| "registry_ratio".contains(filter));
    if filter.is_none() || !ratio_wanted {
        group::benches();
        Criterion::default().configure_from_args().final_summary();
    }
    if ratio_wanted && !has("--list") {
        registry_ratio(if has("--test") { 10 } else { RATIO_ROUNDS });
    }
}
