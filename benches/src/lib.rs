//! Benchmark tools for qmp-dispatcher.
//!
//! # Layout
//!
//! - `src/bin/qmp-floor.rs`: the floor, a minimal tokio QMP server that greets, parses every
//!   request with serde_json and answers `{"return": {}}` (`x-delay {"ms": N}` answers after
//!   N ms without holding up the client's other requests). Any QMP server is measured against it.
//!   `--events` makes `stop` and `cont` broadcast `STOP` and `RESUME`; `--max-clients N`
//!   leaves further connections in the listen backlog.
//! - `src/bin/qmp-bench/`: the load generator. Clients keep `--depth` commands in flight each
//!   and report throughput, latency percentiles, and the server's CPU time and peak RSS.
//!   `--idle-clients 1000,10000,100000` and `--hold-in-flight` measure server RSS per client
//!   and per in-flight command; `--paused-clients N` the idle CPU of connections paused
//!   behind a slow command and how fast a departure is noticed; `--event-clients N` one
//!   event at a time to N clients, or with `--event-rate` a storm; `--pipeline-legacy` lets
//!   a client without capabilities pipeline.
//! - `src/bin/qmp-compare/`: the side-by-side run of qmp-demo, qmp-floor and
//!   qemu-storage-daemon behind `scripts/bench-compare`; see `docs/performance.md`.
//! - `benches/codec.rs`, `benches/dispatch.rs`: criterion micro-benchmarks of the JSON
//!   decoder, argument decoding and end-to-end dispatch with 10 and 10,000 commands.
//! - [`registry`]: the registry-size measurement behind `dispatch.rs` and qmp-compare's
//!   registry row; [`nofile`]: raising `RLIMIT_NOFILE` for 100,000 clients.
//!
//! # Usage
//!
//! ```text
//! # floor, 8 async clients with 8 commands in flight each, for 5 s
//! qmp-bench --spawn "target/release/qmp-floor --unix /tmp/f.sock" --unix /tmp/f.sock \
//!     --clients 8 --depth 8 --caps async
//! # QEMU serves one client per monitor socket: give one --unix per client
//! qmp-bench --spawn "qemu-storage-daemon --chardev socket,path=/tmp/q/m0.sock,server=on,wait=off,id=m0 \
//!     --monitor chardev=m0 --chardev socket,path=/tmp/q/m1.sock,server=on,wait=off,id=m1 \
//!     --monitor chardev=m1" --unix /tmp/q/m0.sock --unix /tmp/q/m1.sock --clients 2 --json
//! # server memory per idle negotiated client, at 1,000 and 10,000 clients
//! qmp-bench --pid "$(pidof qmp-floor)" --unix /tmp/f.sock --idle-clients 1000,10000 --caps async
//! # 1,000 legacy clients paused behind x-delay 60 s: idle CPU, then 10 departures
//! qmp-bench --spawn "target/release/qmp-demo --qmp unix:/tmp/d.sock --max-clients 1000" \
//!     --unix /tmp/d.sock --paused-clients 1000
//! # STOP/RESUME to 10,000 clients, 20 times one at a time; then a storm of 1,000/s for 10 s
//! qmp-bench --spawn "target/release/qmp-floor --unix /tmp/f.sock --events" --unix /tmp/f.sock \
//!     --event-clients 10000 --caps async
//! qmp-bench --spawn "target/release/qmp-floor --unix /tmp/f.sock --events" --unix /tmp/f.sock \
//!     --event-clients 1000 --event-rate 1000 --duration 10 --caps async
//! ```
//!
//! qmp-bench raises its open-file limit to what the run needs (see [`nofile`]) before it
//! spawns the server, which inherits it.
//!
//! On a 2-core machine the generator and the server share the cores: compare the server's CPU
//! per command (reported with `--spawn` or `--pid`) rather than commands/s alone.

pub mod nofile;
pub mod registry;
