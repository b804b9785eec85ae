//! Load generator for QMP servers: throughput, latency percentiles, server CPU time and memory.
//!
//! Run against the floor with
//! `cargo run --release -p qmp-benches --bin qmp-bench -- --spawn "target/release/qmp-floor --unix /tmp/f.sock" --unix /tmp/f.sock --clients 8 --depth 8 --caps async`.
//! Each client connects, reads the greeting, negotiates `--caps`, then keeps exactly `--depth`
//! requests in flight, matching replies by id. Events are skipped; error replies are counted
//! apart, left out of the latency figures, and make the run exit with status 1.
//!
//! Other modes measure the server at scale rather than its throughput: idle clients by the
//! hundred thousand (`--idle-clients`), paused connections (`--paused-clients`, in
//! `paused.rs`), events to many clients (`--event-clients`, in `events.rs`), commands held
//! in flight (`--hold-in-flight`). Clients at that scale are compact (`many.rs`). qmp-bench
//! raises its open-file limit to what the run needs before it connects or spawns anything,
//! so a server it spawns inherits the limit too.

mod events;
mod many;
mod paused;

use std::error::Error;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

type BoxError = Box<dyn Error + Send + Sync>;

/// How long a greeting or negotiation reply may take before the client gives up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long clients may take to drain their in-flight commands after `--duration` ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Linux reports /proc/PID/stat times in USER_HZ, which is 100 on every architecture.
const USER_HZ: f64 = 100.0;
/// How often the server's VmRSS is sampled for this run's peak.
const RSS_INTERVAL: Duration = Duration::from_millis(50);
/// After Ctrl-C, how long clients may take to collect the replies still in flight.
const INTERRUPT_GRACE: Duration = Duration::from_secs(1);
/// How long a spawned server may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Handshakes under way at once when opening load clients: below the listen backlog, so
/// connecting thousands of clients is not refused while the server catches up.
const CONCURRENT_CONNECTS: usize = 256;
/// The request of a load run unless --command says otherwise.
const DEFAULT_COMMAND: &str = r#"{"execute":"query-version"}"#;
/// The request of a paused run: far longer than the run.
const PAUSED_COMMAND: &str = r#"{"execute":"x-delay","arguments":{"ms":60000}}"#;
/// Exit status of a run in which commands failed.
const EXIT_ERRORS: u8 = 1;
/// Exit status of a run stopped by Ctrl-C (128 + SIGINT), after printing its results.
const EXIT_INTERRUPTED: u8 = 130;

const EXAMPLES: &str = "\
Examples:
  # qmp-demo, 8 async clients with 8 commands in flight each, for 5 s; qmp-bench starts the
  # server, samples its CPU and memory, and stops it with SIGTERM at the end
  qmp-bench --spawn 'target/release/qmp-demo --qmp unix:/tmp/demo.sock' \\
      --unix /tmp/demo.sock --clients 8 --depth 8 --caps async

  # qemu-storage-daemon serves one client per monitor socket: one --unix per client
  qmp-bench --spawn 'qemu-storage-daemon \\
        --chardev socket,path=/tmp/m0.sock,server=on,wait=off,id=m0 --monitor chardev=m0 \\
        --chardev socket,path=/tmp/m1.sock,server=on,wait=off,id=m1 --monitor chardev=m1' \\
      --unix /tmp/m0.sock --unix /tmp/m1.sock --clients 2 --duration 3 --json

  # a server already running: 10,000 commands, latency of each
  qmp-bench --pid \"$(pidof qmp-demo)\" --unix /tmp/demo.sock --count 10000 --caps async

Exit status: 0 when every command succeeded, 1 when any failed (or the run could not
start), 130 when interrupted with Ctrl-C (the results so far are printed first).";

#[derive(Parser)]
#[command(
    about = "Load generator for QMP servers (QEMU monitors, qmp-dispatcher, qmp-floor)",
    after_help = EXAMPLES
)]
struct Cli {
    /// Unix socket of the server; repeat it to spread clients round-robin over several sockets
    /// (QEMU serves one client per monitor socket).
    #[arg(long, conflicts_with = "tcp")]
    unix: Vec<PathBuf>,
    /// TCP address of the server, e.g. 127.0.0.1:4444.
    #[arg(long)]
    tcp: Option<String>,
    /// Concurrent client connections (at least 1).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    clients: usize,
    /// Commands in flight per client, at least 1 (a legacy client, without capabilities, is
    /// held to 1).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    depth: usize,
    /// Issue commands for this many seconds (default 5 unless --count is given).
    #[arg(long, conflicts_with = "count")]
    duration: Option<f64>,
    /// Issue exactly this many commands in total, then stop.
    #[arg(long)]
    count: Option<u64>,
    /// The request without id; a unique numeric id is added to each request. Default:
    /// `{"execute":"query-version"}`, or with --paused-clients `x-delay` of 60 s.
    #[arg(long)]
    command: Option<String>,
    /// Capabilities to enable in qmp_capabilities, comma-separated, e.g. `oob,async`.
    /// Empty means a legacy client.
    #[arg(long, default_value = "")]
    caps: String,
    /// Guest-agent style: expect no greeting and send no qmp_capabilities.
    #[arg(long)]
    no_greeting: bool,
    /// Start the server with `sh -c "exec CMD"` (in its own process group, so Ctrl-C reaches
    /// only qmp-bench), wait for its socket(s), sample its CPU time and memory, and stop it at
    /// the end with SIGTERM (SIGKILL if it has not exited 5 s later).
    #[arg(long, conflicts_with = "pid")]
    spawn: Option<String>,
    /// Sample CPU time and memory of this already running server process. The peak RSS
    /// reported is the highest VmRSS sampled (every 50 ms) during this run, not the process's
    /// lifetime peak (VmHWM).
    #[arg(long)]
    pid: Option<u32>,
    /// Memory mode: connect and negotiate N clients, hold them idle, and report the server's
    /// RSS growth per client (needs --pid or --spawn). A comma-separated list such as
    /// `1000,10000,100000` grows the same set of clients step by step and reports each step
    /// (growth since the start ÷ clients connected), so the trend is visible.
    #[arg(long, value_delimiter = ',', value_parser = at_least_one)]
    idle_clients: Vec<usize>,
    /// Paused mode: N clients each send `--command` once (default `x-delay` of 60 s) and
    /// idle while it runs; reports the server's CPU over `--idle-seconds`, then closes
    /// clients one at a time and times until the server notices (see paused.rs: the server
    /// must be at its client limit, e.g. qmp-demo or qmp-floor with `--max-clients N`).
    /// Use no --caps (legacy clients): QEMU pauses a legacy client behind its command.
    #[arg(long, value_parser = at_least_one, conflicts_with_all = ["idle_clients", "hold_in_flight"])]
    paused_clients: Option<usize>,
    /// Paused mode: seconds of idling over which the server's CPU is measured.
    #[arg(long, default_value_t = 3.0)]
    idle_seconds: f64,
    /// Paused mode: departures to time.
    #[arg(long, default_value_t = 10)]
    departures: usize,
    /// Event mode: N negotiated clients that only read events, and one controller that
    /// alternates `stop` and `cont` (STOP and RESUME; qmp-floor needs `--events`). Without
    /// --event-rate, `--events` broadcasts one at a time; with it, a storm for --duration.
    #[arg(long, value_parser = at_least_one, conflicts_with_all = ["idle_clients", "hold_in_flight", "paused_clients"])]
    event_clients: Option<usize>,
    /// Event mode: broadcasts to time, one at a time.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    events: usize,
    /// Event mode: a storm of this many events per second for --duration seconds (default
    /// 10), every client checked to get every event in order, the server's RSS sampled.
    #[arg(long, requires = "event_clients")]
    event_rate: Option<f64>,
    /// Event mode: seconds every client may take to get one event before the run fails.
    #[arg(long, default_value_t = 30.0)]
    event_timeout: f64,
    /// Memory mode: each of `--clients` sends `--depth` commands at once (make them slow, e.g.
    /// `x-delay` of 20 s), then the server's RSS is sampled until it settles and its growth
    /// per in-flight command is reported (needs --pid or --spawn). Replies that arrive before
    /// the sample are counted as `early_replies`: the measurement is valid only if that is 0.
    #[arg(long, conflicts_with = "idle_clients")]
    hold_in_flight: bool,
    /// Let a legacy client (no capabilities) pipeline `--depth` requests without waiting for
    /// each reply. Servers queue them and answer in order; QEMU suspends the monitor while a
    /// command runs, so this shows what a legacy client waits for behind a slow command.
    #[arg(long)]
    pipeline_legacy: bool,
    /// Tokio worker threads of the generator (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a readable line: the run's settings, counts,
    /// latency percentiles (p50, p90, p99, p99.9, max) and server figures.
    #[arg(long)]
    json: bool,
    /// No progress line. Progress is shown once a second on stderr only when it is a
    /// terminal.
    #[arg(long, short)]
    quiet: bool,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(err) => Err(err.to_string()),
    }
}

/// Where clients connect; client `i` uses `targets[i % targets.len()]`.
#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
            Target::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Connects to `target`.
async fn connect_io(target: &Target) -> std::io::Result<Box<dyn Stream>> {
    Ok(match target {
        Target::Unix(path) => Box::new(UnixStream::connect(path).await?) as Box<dyn Stream>,
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
    })
}

/// Connects to `target`; the error names it.
async fn connect(target: &Target) -> Result<Box<dyn Stream>, BoxError> {
    connect_io(target)
        .await
        .map_err(|err| format!("cannot connect to {target}: {err}").into())
}

/// The members of a server message the generator needs; the rest is parsed and skipped.
#[derive(Deserialize)]
struct ReplyHead {
    id: Option<u64>,
    /// Parsed in full only when present, which is rare in a sound run.
    error: Option<serde_json::Value>,
    event: Option<IgnoredAny>,
}

/// One client connection with its receive buffer; server messages end in `\n` (QMP: `\r\n`).
struct Connection {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    /// Start of the bytes not yet returned by `next_line`.
    pos: usize,
}

impl Connection {
    fn new(stream: Box<dyn Stream>) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
        }
    }

    /// Returns the next complete line already received, without its line ending.
    fn next_line(&mut self) -> Option<&[u8]> {
        let rest = &self.buf[self.pos..];
        let len = rest.iter().position(|&byte| byte == b'\n')?;
        self.pos += len + 1;
        Some(&rest[..len])
    }

    /// Reads more bytes; fails on EOF, since the server must not hang up on a client.
    async fn fill(&mut self) -> Result<(), BoxError> {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.reserve(16 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err("server closed the connection".into());
        }
        Ok(())
    }

    /// Reads the next message that is not an event.
    async fn next_message(&mut self) -> Result<serde_json::Value, BoxError> {
        loop {
            while let Some(line) = self.next_line() {
                let message: serde_json::Value = serde_json::from_slice(line)?;
                if message.get("event").is_none() {
                    return Ok(message);
                }
            }
            self.fill().await?;
        }
    }
}

/// Connects one client, reads the greeting and negotiates the capabilities.
async fn open_client(target: &Target, opts: &Options) -> Result<Connection, BoxError> {
    let mut conn = Connection::new(many::connect_retrying(target).await?);
    if opts.no_greeting {
        return Ok(conn);
    }
    let handshake = async {
        let greeting = conn.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("expected a greeting, got {greeting}").into());
        }
        let negotiate = serde_json::json!({
            "execute": "qmp_capabilities",
            "arguments": { "enable": opts.caps },
        });
        conn.stream
            .write_all(negotiate.to_string().as_bytes())
            .await?;
        let reply = conn.next_message().await?;
        if reply.get("return").is_none() {
            return Err(format!("qmp_capabilities failed: {reply}").into());
        }
        Ok::<_, BoxError>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(result) => result.map(|()| conn),
        Err(_) => Err("no greeting or negotiation reply within 10 s (QEMU serves one client per socket: give one --unix per client)".into()),
    }
}

/// Settings shared by all clients of a run.
struct Options {
    caps: Vec<String>,
    no_greeting: bool,
    depth: usize,
    /// The request as given (or the mode's default), without id.
    command: String,
    /// The request serialised up to where `"id":N}` is appended.
    request_prefix: Vec<u8>,
    /// Total commands to issue, if counted rather than timed.
    count: Option<u64>,
    /// Commands issued so far by all clients; compared with `count`.
    issued: AtomicU64,
    /// Replies so far, errors included, for the progress line.
    replies: AtomicU64,
    /// Error replies so far.
    errors: AtomicU64,
    /// Set by Ctrl-C: issue nothing more.
    stop: AtomicBool,
}

impl Options {
    /// Whether a client may issue one more command at `now`.
    fn take_ticket(&self, now: Instant, deadline: Option<Instant>) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match (self.count, deadline) {
            (Some(count), _) => self.issued.fetch_add(1, Ordering::Relaxed) < count,
            (None, Some(deadline)) => now < deadline,
            (None, None) => false,
        }
    }
}

/// What one client measured. Shared with the run, which reads it even from a client it had
/// to abort (Ctrl-C).
struct ClientStats {
    /// Latency of successful commands only.
    latency_ns: Histogram<u64>,
    completed: u64,
    errors: u64,
    /// The first error reply, to show what failed.
    first_error: Option<String>,
    last_reply: Instant,
}

impl ClientStats {
    fn new() -> Result<Self, BoxError> {
        Ok(ClientStats {
            latency_ns: Histogram::new(3)?,
            completed: 0,
            errors: 0,
            first_error: None,
            last_reply: Instant::now(),
        })
    }
}

/// Keeps `depth` requests outstanding until the run ends, then drains them.
///
/// The id of a request is `seq * depth + slot`, so a reply finds its slot without a map lookup
/// while every id of the connection stays unique.
async fn run_load(
    mut conn: Connection,
    opts: Arc<Options>,
    deadline: Option<Instant>,
    stats: Arc<Mutex<ClientStats>>,
) -> Result<(), BoxError> {
    let depth = opts.depth as u64;
    let mut in_flight: Vec<Option<(u64, Instant)>> = vec![None; opts.depth];
    let mut free_slots: Vec<usize> = (0..opts.depth).rev().collect();
    let mut batch_slots = Vec::with_capacity(opts.depth);
    let mut out = Vec::with_capacity(opts.depth * (opts.request_prefix.len() + 24));
    let mut seq = 0u64;
    let mut now = Instant::now();
    loop {
        while let Some(&slot) = free_slots.last() {
            if !opts.take_ticket(now, deadline) {
                break;
            }
            free_slots.pop();
            let id = seq * depth + slot as u64;
            seq += 1;
            out.extend_from_slice(&opts.request_prefix);
            write!(out, "{id}}}")?;
            batch_slots.push((slot, id));
        }
        if !out.is_empty() {
            let sent = Instant::now();
            for &(slot, id) in &batch_slots {
                in_flight[slot] = Some((id, sent));
            }
            batch_slots.clear();
            conn.stream.write_all(&out).await?;
            out.clear();
        }
        if free_slots.len() == opts.depth {
            return Ok(());
        }

        conn.fill().await?;
        now = Instant::now();
        let mut stats = stats.lock().expect("stats lock");
        let (replies_before, errors_before) = (stats.completed, stats.errors);
        while let Some(line) = conn.next_line() {
            let reply: ReplyHead = serde_json::from_slice(line)?;
            if reply.event.is_some() {
                continue;
            }
            let Some(id) = reply.id else {
                return Err(format!("reply without id: {}", String::from_utf8_lossy(line)).into());
            };
            let slot = (id % depth) as usize;
            let sent = match in_flight[slot].take() {
                Some((expected, sent)) if expected == id => sent,
                _ => return Err(format!("reply to unknown id {id}").into()),
            };
            match reply.error {
                // A failure's latency says nothing about the command: kept out of the figures.
                Some(error) => {
                    stats.errors += 1;
                    stats.first_error.get_or_insert_with(|| error.to_string());
                }
                None => stats.latency_ns.record((now - sent).as_nanos() as u64)?,
            }
            stats.completed += 1;
            stats.last_reply = now;
            free_slots.push(slot);
        }
        opts.replies
            .fetch_add(stats.completed - replies_before, Ordering::Relaxed);
        opts.errors
            .fetch_add(stats.errors - errors_before, Ordering::Relaxed);
    }
}

/// The server process whose resources are sampled.
struct Server {
    pid: u32,
    /// Set when qmp-bench started the server; it is killed when the run ends.
    child: Option<tokio::process::Child>,
}

impl Server {
    /// Starts `command` and waits until every socket in `targets` accepts connections.
    async fn spawn(command: &str, targets: &[Target]) -> Result<Self, BoxError> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdout(std::process::Stdio::null())
            // Its own process group: a Ctrl-C in the terminal is for qmp-bench, which then
            // prints its results and stops the server itself.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot start `{command}`: {err}"))?;
        let pid = child.id().ok_or("server exited at once")?;
        let started = Instant::now();
        for target in targets {
            // A probe connection, not the socket file, shows the server is listening: a stale
            // file may be left from an earlier run. QEMU frees its one client slot when the
            // probe closes.
            loop {
                let probe = connect(target).await;
                if probe.is_ok() {
                    break;
                }
                if let Some(status) = child.try_wait()? {
                    return Err(format!("server exited with {status}").into());
                }
                if let (true, Err(err)) = (started.elapsed() > HANDSHAKE_TIMEOUT, probe) {
                    return Err(format!("server not listening within 10 s: {err}").into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(Self {
            pid,
            child: Some(child),
        })
    }

    /// User plus system CPU time the server has used so far, in seconds.
    fn cpu_seconds(&self) -> Result<f64, BoxError> {
        process_cpu_seconds(&self.pid.to_string())
    }

    /// A `/proc/PID/status` memory field such as `VmRSS` or `VmHWM`, in KiB.
    fn memory_kib(&self, field: &str) -> Result<u64, BoxError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .ok_or_else(|| format!("no {field} in /proc/{}/status", self.pid))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    }

    /// Stops a server qmp-bench started: SIGTERM, so it can remove its sockets, then SIGKILL
    /// if it is still running after [`STOP_GRACE`].
    async fn stop(mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok()
            && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok()
        {
            return;
        }
        eprintln!("qmp-bench: server did not exit on SIGTERM within 5 s; killing it");
        let _ = child.kill().await;
    }

    /// Samples VmRSS every [`RSS_INTERVAL`] into `peak` until aborted.
    async fn sample_rss(pid: u32, peak: Arc<AtomicU64>) {
        let server = Server { pid, child: None };
        loop {
            if let Ok(rss) = server.memory_kib("VmRSS") {
                peak.fetch_max(rss, Ordering::Relaxed);
            }
            tokio::time::sleep(RSS_INTERVAL).await;
        }
    }
}

/// User plus system CPU time of process `pid` (a number or `self`) so far, in seconds.
fn process_cpu_seconds(pid: &str) -> Result<f64, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields are counted after its closing ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .ok_or("bad stat")?
        .1
        .split_whitespace()
        .collect();
    let utime: f64 = fields.get(11).ok_or("bad stat")?.parse()?;
    let stime: f64 = fields.get(12).ok_or("bad stat")?.parse()?;
    Ok((utime + stime) / USER_HZ)
}

/// Opens `clients` connections concurrently, client `i` on `targets[i % targets.len()]`,
/// with at most [`CONCURRENT_CONNECTS`] handshakes under way at once.
async fn open_clients(
    clients: usize,
    targets: &[Target],
    opts: &Arc<Options>,
) -> Result<Vec<Connection>, BoxError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CONNECTS));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..clients {
        let target = targets[index % targets.len()].clone();
        let opts = Arc::clone(opts);
        let slots = Arc::clone(&slots);
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await?;
            open_client(&target, &opts).await
        });
    }
    let mut conns = Vec::with_capacity(clients);
    while let Some(result) = tasks.join_next().await {
        conns.push(result??);
    }
    Ok(conns)
}

/// What a measurement produced: its results, and whether commands failed or it was cut short.
struct Outcome {
    json: serde_json::Value,
    line: String,
    /// Error replies, with the first one.
    errors: Option<(u64, String)>,
    /// What failed in a run that is not one of commands (clients that missed events).
    failure: Option<String>,
    interrupted: bool,
}

impl Outcome {
    fn of(json: serde_json::Value, line: String) -> Self {
        Outcome {
            json,
            line,
            errors: None,
            failure: None,
            interrupted: false,
        }
    }
}

/// The run's settings, echoed in `--json` so a result file says what was measured.
fn settings(cli: &Cli, targets: &[Target], opts: &Options) -> serde_json::Value {
    serde_json::json!({
        "command": opts.command,
        "caps": opts.caps,
        "clients": cli.clients,
        "depth": opts.depth,
        "duration_s": cli.duration,
        "count": cli.count,
        "targets": targets.iter().map(Target::to_string).collect::<Vec<_>>(),
        "pipeline_legacy": cli.pipeline_legacy,
        "no_greeting": cli.no_greeting,
    })
}

/// Prints replies so far once a second on stderr, overwriting its own line.
async fn show_progress(opts: Arc<Options>, start: Instant) {
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut previous = 0;
    loop {
        ticks.tick().await;
        let replies = opts.replies.load(Ordering::Relaxed);
        let errors = opts.errors.load(Ordering::Relaxed);
        eprint!(
            "\r\x1b[K{:.0} s: {replies} replies, {} cmds/s, {errors} errors",
            start.elapsed().as_secs_f64(),
            replies - previous
        );
        previous = replies;
    }
}

/// Throughput run: returns the results as JSON and a readable line. Ctrl-C stops it early
/// with the results so far.
async fn measure_load(
    cli: &Cli,
    targets: &[Target],
    opts: Arc<Options>,
    server: Option<&Server>,
) -> Result<Outcome, BoxError> {
    let conns = open_clients(cli.clients, targets, &opts).await?;
    let cpu_before = server.map(Server::cpu_seconds).transpose()?;
    // The generator's own CPU time shows whether it, not the server, is the bottleneck.
    let generator_cpu_before = process_cpu_seconds("self")?;
    let peak_rss = Arc::new(AtomicU64::new(0));
    let mut helpers = tokio::task::JoinSet::new();
    if let Some(server) = server {
        helpers.spawn(Server::sample_rss(server.pid, Arc::clone(&peak_rss)));
    }
    let start = Instant::now();
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    if progress {
        helpers.spawn(show_progress(Arc::clone(&opts), start));
    }
    let duration = cli.duration.map(Duration::from_secs_f64);
    let deadline = duration.map(|duration| start + duration);
    let mut tasks = tokio::task::JoinSet::new();
    let mut all_stats = Vec::with_capacity(conns.len());
    for conn in conns {
        let stats = Arc::new(Mutex::new(ClientStats::new()?));
        all_stats.push(Arc::clone(&stats));
        tasks.spawn(run_load(conn, Arc::clone(&opts), deadline, stats));
    }
    let interrupted = {
        let joined = async {
            while let Some(result) = tasks.join_next().await {
                result??;
            }
            Ok::<_, BoxError>(())
        };
        tokio::pin!(joined);
        let give_up = async {
            match duration {
                Some(duration) => tokio::time::sleep(duration + DRAIN_TIMEOUT).await,
                None => std::future::pending().await,
            }
        };
        let interrupted = tokio::select! {
            result = &mut joined => {
                result?;
                false
            }
            () = give_up => return Err("clients did not finish: server stopped replying".into()),
            _ = tokio::signal::ctrl_c() => true,
        };
        if interrupted {
            opts.stop.store(true, Ordering::Relaxed);
            // Replies already on their way still count; slow ones are given up.
            let _ = tokio::time::timeout(INTERRUPT_GRACE, &mut joined).await;
        }
        interrupted
    };
    tasks.abort_all();
    helpers.abort_all();
    if progress {
        eprint!("\r\x1b[K");
    }

    let mut latency_ns = Histogram::<u64>::new(3)?;
    let (mut completed, mut errors, mut first_error, mut end) = (0, 0, None, start);
    for stats in &all_stats {
        let stats = stats.lock().expect("stats lock");
        latency_ns.add(&stats.latency_ns)?;
        completed += stats.completed;
        errors += stats.errors;
        if first_error.is_none() {
            first_error.clone_from(&stats.first_error);
        }
        end = end.max(stats.last_reply);
    }
    if interrupted {
        end = Instant::now();
    }
    let seconds = (end - start).as_secs_f64();
    let server_cpu_seconds = match (server, cpu_before) {
        (Some(server), Some(before)) => Some(server.cpu_seconds()? - before),
        _ => None,
    };
    let generator_cpu_seconds = process_cpu_seconds("self")? - generator_cpu_before;
    // One last sample, so a run shorter than the interval still has one.
    let peak_rss_kib = server
        .map(|server| {
            server
                .memory_kib("VmRSS")
                .map(|rss| rss.max(peak_rss.load(Ordering::Relaxed)))
        })
        .transpose()?;
    let per_sec = completed as f64 / seconds;
    let ok = completed - errors;
    let micros =
        |quantile: f64| (ok > 0).then(|| latency_ns.value_at_quantile(quantile) as f64 / 1000.0);
    let (p50, p90, p99, p999) = (micros(0.5), micros(0.9), micros(0.99), micros(0.999));
    let max = (ok > 0).then(|| latency_ns.max() as f64 / 1000.0);
    let json = serde_json::json!({
        "settings": settings(cli, targets, &opts),
        "commands": completed,
        "ok": ok,
        "errors": errors,
        "first_error": first_error,
        "interrupted": interrupted,
        "seconds": seconds,
        "commands_per_sec": per_sec,
        "p50_us": p50,
        "p90_us": p90,
        "p99_us": p99,
        "p99_9_us": p999,
        "max_us": max,
        "server_cpu_seconds": server_cpu_seconds,
        "generator_cpu_seconds": generator_cpu_seconds,
        "server_peak_rss_kib": peak_rss_kib,
        "clients": cli.clients,
        "depth": opts.depth,
    });
    let us = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.1} us"));
    let mut line = format!(
        "{} clients x depth {}: {completed} cmds in {seconds:.2} s = {per_sec:.0} cmds/s; \
         latency of the {ok} ok: p50 {}, p90 {}, p99 {}, p99.9 {}, max {}; {errors} errors",
        cli.clients,
        opts.depth,
        us(p50),
        us(p90),
        us(p99),
        us(p999),
        us(max),
    );
    write!(
        line,
        "; generator cpu {generator_cpu_seconds:.2} s ({:.2} cores)",
        generator_cpu_seconds / seconds
    )?;
    if let (Some(cpu), Some(rss)) = (server_cpu_seconds, peak_rss_kib) {
        let cores = cpu / seconds;
        write!(
            line,
            "; server cpu {cpu:.2} s ({cores:.2} cores, {:.1} us/cmd), \
             server peak RSS this run {rss} KiB",
            cpu * 1e6 / completed.max(1) as f64
        )?;
    }
    if interrupted {
        line.push_str(" (interrupted)");
    }
    Ok(Outcome {
        json,
        line,
        errors: (errors > 0).then(|| (errors, first_error.unwrap_or_default())),
        failure: None,
        interrupted,
    })
}

/// Memory run: RSS growth of the server per idle, negotiated client, at each of `steps`
/// (increasing client counts; the clients of one step stay for the next).
///
/// Clients are compact (`many.rs`): once negotiated each is a bare stream that nobody reads,
/// so the generator holds 100,000 of them in a few tens of MB.
async fn measure_idle(
    steps: &[usize],
    targets: &[Target],
    shake: Arc<many::Handshake>,
    server: &Server,
) -> Result<Outcome, BoxError> {
    let before = settled_rss_kib(server).await?;
    let mut conns = Vec::new();
    let mut results = Vec::with_capacity(steps.len());
    let mut line = String::new();
    for &clients in steps {
        let started = Instant::now();
        let more = clients.saturating_sub(conns.len());
        conns.append(&mut many::open_many(more, conns.len(), targets, &shake).await?);
        let connect_seconds = started.elapsed().as_secs_f64();
        // Let the server finish whatever per-connection setup follows the negotiation reply.
        let after = settled_rss_kib(server).await?;
        let per_client = (after as f64 - before as f64) / conns.len() as f64;
        results.push(serde_json::json!({
            "clients": conns.len(),
            "rss_after_kib": after,
            "kib_per_client": per_client,
            "connect_seconds": connect_seconds,
        }));
        if !line.is_empty() {
            line.push_str("; ");
        }
        write!(
            line,
            "{} idle clients: server RSS {before} -> {after} KiB = {per_client:.2} KiB per \
             client (connected in {connect_seconds:.1} s)",
            conns.len()
        )?;
    }
    drop(conns);
    let last = results.last().cloned().unwrap_or_default();
    let json = serde_json::json!({
        "idle_clients": last["clients"],
        "rss_before_kib": before,
        "rss_after_kib": last["rss_after_kib"],
        "kib_per_client": last["kib_per_client"],
        "steps": results,
    });
    Ok(Outcome::of(json, line))
}

/// How often the server's RSS is sampled while waiting for it to settle.
const SETTLE_INTERVAL: Duration = Duration::from_millis(250);
/// RSS counts as settled when it changed by less than this fraction over one interval.
const SETTLE_TOLERANCE: f64 = 0.002;
/// Give up waiting for the RSS to settle after this long and sample it anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the server's RSS stops growing (the server has taken in everything sent) and
/// returns it in KiB.
async fn settled_rss_kib(server: &Server) -> Result<u64, BoxError> {
    let started = Instant::now();
    let mut previous = server.memory_kib("VmRSS")?;
    let mut steady_samples = 0;
    loop {
        tokio::time::sleep(SETTLE_INTERVAL).await;
        let current = server.memory_kib("VmRSS")?;
        let change = (current as f64 - previous as f64).abs() / previous.max(1) as f64;
        steady_samples = if change < SETTLE_TOLERANCE {
            steady_samples + 1
        } else {
            0
        };
        previous = current;
        if steady_samples >= 2 || started.elapsed() > SETTLE_TIMEOUT {
            return Ok(current);
        }
    }
}

/// Sends `depth` requests in one write, then reads until the connection fails, counting
/// every reply (events aside) in `early_replies`. Runs until aborted.
async fn hold_requests(
    mut conn: Connection,
    opts: Arc<Options>,
    early_replies: Arc<AtomicU64>,
) -> Result<(), BoxError> {
    let mut out = Vec::with_capacity(opts.depth * (opts.request_prefix.len() + 24));
    for id in 0..opts.depth {
        out.extend_from_slice(&opts.request_prefix);
        write!(out, "{id}}}")?;
    }
    conn.stream.write_all(&out).await?;
    loop {
        conn.fill().await?;
        while let Some(line) = conn.next_line() {
            let reply: ReplyHead = serde_json::from_slice(line)?;
            if reply.event.is_none() {
                early_replies.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Memory run: RSS growth of the server per command held in flight.
///
/// The baseline is taken with every client connected and negotiated, so only the commands'
/// own cost is counted. Each client then writes its `--depth` requests in one go and keeps
/// reading, counting any reply that comes back before the sample.
async fn measure_held(
    clients: usize,
    targets: &[Target],
    opts: Arc<Options>,
    server: &Server,
) -> Result<Outcome, BoxError> {
    let conns = open_clients(clients, targets, &opts).await?;
    let before = settled_rss_kib(server).await?;
    let early_replies = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        let opts = Arc::clone(&opts);
        let early_replies = Arc::clone(&early_replies);
        tasks.spawn(hold_requests(conn, opts, early_replies));
    }
    let after = settled_rss_kib(server).await?;
    // A client task that ended has failed: `fill` only returns to read more.
    if let Some(result) = tasks.try_join_next() {
        result??;
    }
    tasks.abort_all();
    let early_replies = early_replies.load(Ordering::Relaxed);
    let commands = clients * opts.depth;
    let per_command = (after as f64 - before as f64) / commands as f64;
    let json = serde_json::json!({
        "commands_in_flight": commands,
        "clients": clients,
        "depth": opts.depth,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_command": per_command,
        "early_replies": early_replies,
    });
    let line = format!(
        "{commands} commands in flight ({clients} clients x {}): server RSS {before} -> {after} KiB \
         = {per_command:.3} KiB per command; {early_replies} early replies",
        opts.depth
    );
    Ok(Outcome::of(json, line))
}

/// Serialises `command` up to the point where `"id":N}` is appended, rejecting a given id.
fn request_prefix(command: &str) -> Result<Vec<u8>, BoxError> {
    let request: serde_json::Map<String, serde_json::Value> = serde_json::from_str(command)
        .map_err(|err| format!("--command must be a JSON object: {err}"))?;
    if request.contains_key("id") {
        return Err("--command must not contain an id: qmp-bench adds one".into());
    }
    let mut prefix = serde_json::to_vec(&request)?;
    prefix.pop(); // the closing '}'
    if !request.is_empty() {
        prefix.push(b',');
    }
    prefix.extend_from_slice(br#""id":"#);
    Ok(prefix)
}

async fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    let targets: Vec<Target> = match &cli.tcp {
        Some(addr) => vec![Target::Tcp(addr.clone())],
        None if cli.unix.is_empty() => return Err("give --unix PATH or --tcp HOST:PORT".into()),
        None => cli.unix.iter().cloned().map(Target::Unix).collect(),
    };
    let caps: Vec<String> = cli
        .caps
        .split(',')
        .filter(|cap| !cap.is_empty())
        .map(String::from)
        .collect();
    let mut depth = cli.depth;
    if caps.is_empty() && !cli.no_greeting && depth > 1 && !cli.pipeline_legacy {
        eprintln!(
            "qmp-bench: legacy client (no capabilities): depth held to 1 (see --pipeline-legacy)"
        );
        depth = 1;
    }
    let command = cli.command.clone().unwrap_or_else(|| {
        if cli.paused_clients.is_some() {
            PAUSED_COMMAND.to_string()
        } else {
            DEFAULT_COMMAND.to_string()
        }
    });
    let shake = Arc::new(many::Handshake::new(&caps, cli.no_greeting));
    // Every client is a descriptor here and in the server; raised before the server is
    // spawned, so that it inherits the limit.
    let clients_needed = [
        cli.clients,
        cli.idle_clients.iter().copied().max().unwrap_or(0),
        cli.paused_clients.map_or(0, |n| n + 1),
        cli.event_clients.map_or(0, |n| n + 1),
    ]
    .into_iter()
    .max()
    .unwrap_or(0) as u64;
    qmp_benches::nofile::raise_to(clients_needed + qmp_benches::nofile::SPARE_DESCRIPTORS)?;
    let opts = Arc::new(Options {
        caps,
        no_greeting: cli.no_greeting,
        depth,
        request_prefix: request_prefix(&command)?,
        command,
        count: cli.count,
        issued: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let server = match (&cli.spawn, cli.pid) {
        (Some(command), _) => Some(Server::spawn(command, &targets).await?),
        (None, Some(pid)) => Some(Server { pid, child: None }),
        (None, None) => None,
    };
    let scale_mode = !cli.idle_clients.is_empty()
        || cli.hold_in_flight
        || cli.paused_clients.is_some()
        || cli.event_clients.is_some();
    let result = match &server {
        None if scale_mode => Err(
            "--idle-clients, --hold-in-flight, --paused-clients and --event-clients need \
             --pid or --spawn"
                .into(),
        ),
        Some(server) if !cli.idle_clients.is_empty() => {
            measure_idle(&cli.idle_clients, &targets, shake, server).await
        }
        Some(server) if cli.hold_in_flight => {
            measure_held(cli.clients, &targets, opts, server).await
        }
        Some(server) if cli.paused_clients.is_some() => {
            let settings = paused::Paused {
                clients: cli.paused_clients.unwrap_or(1),
                request_prefix: opts.request_prefix.clone(),
                idle: Duration::from_secs_f64(cli.idle_seconds),
                departures: cli.departures,
            };
            paused::measure(&settings, &targets, shake, server).await
        }
        Some(server) => match cli.event_clients {
            Some(clients) => {
                let settings = events::EventRun {
                    clients,
                    targets: &targets,
                    shake: &shake,
                    server,
                    timeout: Duration::from_secs_f64(cli.event_timeout),
                };
                match cli.event_rate {
                    Some(rate) => {
                        let duration = Duration::from_secs_f64(cli.duration.unwrap_or(10.0));
                        events::measure_storm(&settings, rate, duration).await
                    }
                    None => events::measure_broadcast(&settings, cli.events).await,
                }
            }
            None => measure_load(&cli, &targets, opts, Some(server)).await,
        },
        None => measure_load(&cli, &targets, opts, None).await,
    };
    if let Some(server) = server {
        server.stop().await;
    }
    let outcome = result?;
    if cli.json {
        println!("{}", outcome.json);
    } else {
        println!("{}", outcome.line);
    }
    if let Some(failure) = &outcome.failure {
        eprintln!("qmp-bench: FAILED: {failure}");
        return Ok(ExitCode::from(EXIT_ERRORS));
    }
    if let Some((errors, first)) = &outcome.errors {
        eprintln!(
            "qmp-bench: FAILED: {errors} commands answered with an error (not in the latency \
             figures); the first: {first}"
        );
        return Ok(ExitCode::from(EXIT_ERRORS));
    }
    if outcome.interrupted {
        eprintln!("qmp-bench: interrupted; the results above are partial");
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if cli.duration.is_none() && cli.count.is_none() {
        cli.duration = Some(if cli.event_rate.is_some() { 10.0 } else { 5.0 });
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("qmp-bench: {err}");
            ExitCode::from(EXIT_ERRORS)
        }
    }
}
