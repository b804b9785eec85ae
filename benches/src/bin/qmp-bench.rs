//! Load generator for QMP servers: throughput, latency percentiles, server CPU time and memory.
//!
//! Run against the floor with
//! `cargo run --release -p qmp-benches --bin qmp-bench -- --spawn "target/release/qmp-floor --unix /tmp/f.sock" --unix /tmp/f.sock --clients 8 --depth 8 --caps async`.
//! Each client connects, reads the greeting, negotiates `--caps`, then keeps exactly `--depth`
//! requests in flight, matching replies by id. Events are skipped; error replies are counted.

use std::error::Error;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

#[derive(Parser)]
#[command(about = "Load generator for QMP servers (QEMU monitors, qmp-dispatcher, qmp-floor)")]
struct Cli {
    /// Unix socket of the server; repeat it to spread clients round-robin over several sockets
    /// (QEMU serves one client per monitor socket).
    #[arg(long, conflicts_with = "tcp")]
    unix: Vec<PathBuf>,
    /// TCP address of the server, e.g. 127.0.0.1:4444.
    #[arg(long)]
    tcp: Option<String>,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Commands in flight per client (a legacy client, without capabilities, is held to 1).
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Issue commands for this many seconds (default 5 unless --count is given).
    #[arg(long, conflicts_with = "count")]
    duration: Option<f64>,
    /// Issue exactly this many commands in total, then stop.
    #[arg(long)]
    count: Option<u64>,
    /// The request without id; a unique numeric id is added to each request.
    #[arg(long, default_value = r#"{"execute":"query-version"}"#)]
    command: String,
    /// Capabilities to enable in qmp_capabilities, comma-separated, e.g. `oob,async`.
    /// Empty means a legacy client.
    #[arg(long, default_value = "")]
    caps: String,
    /// Guest-agent style: expect no greeting and send no qmp_capabilities.
    #[arg(long)]
    no_greeting: bool,
    /// Start the server with `sh -c "exec CMD"`, wait for its socket(s), sample its CPU time
    /// and peak RSS, and kill it at the end.
    #[arg(long, conflicts_with = "pid")]
    spawn: Option<String>,
    /// Sample CPU time and memory of this already running server process.
    #[arg(long)]
    pid: Option<u32>,
    /// Memory mode: connect and negotiate N clients, hold them idle, and report the server's
    /// RSS growth per client (needs --pid or --spawn).
    #[arg(long)]
    idle_clients: Option<usize>,
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
    /// Print one JSON object instead of a readable line.
    #[arg(long)]
    json: bool,
}

/// Where clients connect; client `i` uses `targets[i % targets.len()]`.
#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(target: &Target) -> std::io::Result<Box<dyn Stream>> {
    Ok(match target {
        Target::Unix(path) => Box::new(UnixStream::connect(path).await?),
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
    })
}

/// The members of a server message the generator needs; the rest is parsed and skipped.
#[derive(Deserialize)]
struct ReplyHead {
    id: Option<u64>,
    error: Option<IgnoredAny>,
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
    let mut conn = Connection::new(connect(target).await?);
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
    /// The request serialised up to where `"id":N}` is appended.
    request_prefix: Vec<u8>,
    /// Total commands to issue, if counted rather than timed.
    count: Option<u64>,
    /// Commands issued so far by all clients; compared with `count`.
    issued: AtomicU64,
}

impl Options {
    /// Whether a client may issue one more command at `now`.
    fn take_ticket(&self, now: Instant, deadline: Option<Instant>) -> bool {
        match (self.count, deadline) {
            (Some(count), _) => self.issued.fetch_add(1, Ordering::Relaxed) < count,
            (None, Some(deadline)) => now < deadline,
            (None, None) => false,
        }
    }
}

/// What one client measured.
struct ClientStats {
    latency_ns: Histogram<u64>,
    completed: u64,
    errors: u64,
    last_reply: Instant,
}

/// Keeps `depth` requests outstanding until the run ends, then drains them.
///
/// The id of a request is `seq * depth + slot`, so a reply finds its slot without a map lookup
/// while every id of the connection stays unique.
async fn run_load(
    mut conn: Connection,
    opts: Arc<Options>,
    deadline: Option<Instant>,
) -> Result<ClientStats, BoxError> {
    let depth = opts.depth as u64;
    let mut in_flight: Vec<Option<(u64, Instant)>> = vec![None; opts.depth];
    let mut free_slots: Vec<usize> = (0..opts.depth).rev().collect();
    let mut batch_slots = Vec::with_capacity(opts.depth);
    let mut out = Vec::with_capacity(opts.depth * (opts.request_prefix.len() + 24));
    let mut seq = 0u64;
    let mut stats = ClientStats {
        latency_ns: Histogram::new(3)?,
        completed: 0,
        errors: 0,
        last_reply: Instant::now(),
    };
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
            return Ok(stats);
        }

        conn.fill().await?;
        now = Instant::now();
        while let Some(line) = conn.next_line() {
            let reply: ReplyHead = serde_json::from_slice(line)?;
            if reply.event.is_some() {
                continue;
            }
            let Some(id) = reply.id else {
                return Err(format!("reply without id: {}", String::from_utf8_lossy(line)).into());
            };
            let slot = (id % depth) as usize;
            match in_flight[slot].take() {
                Some((expected, sent)) if expected == id => {
                    stats.latency_ns.record((now - sent).as_nanos() as u64)?;
                }
                _ => return Err(format!("reply to unknown id {id}").into()),
            }
            stats.errors += u64::from(reply.error.is_some());
            stats.completed += 1;
            stats.last_reply = now;
            free_slots.push(slot);
        }
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
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("server exited at once")?;
        let started = Instant::now();
        for target in targets {
            // A probe connection, not the socket file, shows the server is listening: a stale
            // file may be left from an earlier run. QEMU frees its one client slot when the
            // probe closes.
            loop {
                if connect(target).await.is_ok() {
                    break;
                }
                if let Some(status) = child.try_wait()? {
                    return Err(format!("server exited with {status}").into());
                }
                if started.elapsed() > HANDSHAKE_TIMEOUT {
                    return Err("server socket did not appear within 10 s".into());
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

    async fn stop(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
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

/// Opens `clients` connections concurrently, client `i` on `targets[i % targets.len()]`.
async fn open_clients(
    clients: usize,
    targets: &[Target],
    opts: &Arc<Options>,
) -> Result<Vec<Connection>, BoxError> {
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..clients {
        let target = targets[index % targets.len()].clone();
        let opts = Arc::clone(opts);
        tasks.spawn(async move { open_client(&target, &opts).await });
    }
    let mut conns = Vec::with_capacity(clients);
    while let Some(result) = tasks.join_next().await {
        conns.push(result??);
    }
    Ok(conns)
}

/// Throughput run: returns the results as JSON and a readable line.
async fn measure_load(
    cli: &Cli,
    targets: &[Target],
    opts: Arc<Options>,
    server: Option<&Server>,
) -> Result<(serde_json::Value, String), BoxError> {
    let conns = open_clients(cli.clients, targets, &opts).await?;
    let cpu_before = server.map(Server::cpu_seconds).transpose()?;
    // The generator's own CPU time shows whether it, not the server, is the bottleneck.
    let generator_cpu_before = process_cpu_seconds("self")?;
    let start = Instant::now();
    let duration = cli.duration.map(Duration::from_secs_f64);
    let deadline = duration.map(|duration| start + duration);
    let mut tasks = tokio::task::JoinSet::new();
    for conn in conns {
        tasks.spawn(run_load(conn, Arc::clone(&opts), deadline));
    }
    let mut latency_ns = Histogram::<u64>::new(3)?;
    let (mut completed, mut errors, mut end) = (0, 0, start);
    let joined = async {
        while let Some(result) = tasks.join_next().await {
            let stats = result??;
            latency_ns.add(&stats.latency_ns)?;
            completed += stats.completed;
            errors += stats.errors;
            end = end.max(stats.last_reply);
        }
        Ok::<_, BoxError>(())
    };
    match duration {
        Some(duration) => tokio::time::timeout(duration + DRAIN_TIMEOUT, joined)
            .await
            .map_err(|_| "clients did not finish: server stopped replying")??,
        None => joined.await?,
    }
    let seconds = (end - start).as_secs_f64();
    let cpu_seconds = match (server, cpu_before) {
        (Some(server), Some(before)) => Some(server.cpu_seconds()? - before),
        _ => None,
    };
    let generator_cpu_seconds = process_cpu_seconds("self")? - generator_cpu_before;
    let peak_rss_kib = server
        .map(|server| server.memory_kib("VmHWM"))
        .transpose()?;
    let per_sec = completed as f64 / seconds;
    let micros = |quantile: f64| latency_ns.value_at_quantile(quantile) as f64 / 1000.0;
    let (p50, p99, max) = (micros(0.5), micros(0.99), latency_ns.max() as f64 / 1000.0);
    let json = serde_json::json!({
        "commands": completed,
        "seconds": seconds,
        "commands_per_sec": per_sec,
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "errors": errors,
        "cpu_seconds": cpu_seconds,
        "generator_cpu_seconds": generator_cpu_seconds,
        "peak_rss_kib": peak_rss_kib,
        "clients": cli.clients,
        "depth": opts.depth,
    });
    let mut line = format!(
        "{} clients x depth {}: {completed} cmds in {seconds:.2} s = {per_sec:.0} cmds/s; \
         latency p50 {p50:.1} us, p99 {p99:.1} us, max {max:.1} us; {errors} errors",
        cli.clients, opts.depth
    );
    write!(
        line,
        "; generator cpu {generator_cpu_seconds:.2} s ({:.2} cores)",
        generator_cpu_seconds / seconds
    )?;
    if let (Some(cpu), Some(rss)) = (cpu_seconds, peak_rss_kib) {
        let cores = cpu / seconds;
        write!(
            line,
            "; server cpu {cpu:.2} s ({cores:.2} cores, {:.1} us/cmd), peak RSS {rss} KiB",
            cpu * 1e6 / completed as f64
        )?;
    }
    Ok((json, line))
}

/// Memory run: RSS growth of the server per idle, negotiated client.
async fn measure_idle(
    clients: usize,
    targets: &[Target],
    opts: Arc<Options>,
    server: &Server,
) -> Result<(serde_json::Value, String), BoxError> {
    let before = server.memory_kib("VmRSS")?;
    let conns = open_clients(clients, targets, &opts).await?;
    // Let the server finish whatever per-connection setup follows the negotiation reply.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.memory_kib("VmRSS")?;
    drop(conns);
    let per_client = (after as f64 - before as f64) / clients as f64;
    let json = serde_json::json!({
        "idle_clients": clients,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_client": per_client,
    });
    let line = format!(
        "{clients} idle clients: server RSS {before} -> {after} KiB = {per_client:.2} KiB per client"
    );
    Ok((json, line))
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
) -> Result<(serde_json::Value, String), BoxError> {
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
    Ok((json, line))
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

async fn run(cli: Cli) -> Result<(), BoxError> {
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
    let mut depth = cli.depth.max(1);
    if caps.is_empty() && !cli.no_greeting && depth > 1 && !cli.pipeline_legacy {
        eprintln!(
            "qmp-bench: legacy client (no capabilities): depth held to 1 (see --pipeline-legacy)"
        );
        depth = 1;
    }
    let opts = Arc::new(Options {
        caps,
        no_greeting: cli.no_greeting,
        depth,
        request_prefix: request_prefix(&cli.command)?,
        count: cli.count,
        issued: AtomicU64::new(0),
    });
    let server = match (&cli.spawn, cli.pid) {
        (Some(command), _) => Some(Server::spawn(command, &targets).await?),
        (None, Some(pid)) => Some(Server { pid, child: None }),
        (None, None) => None,
    };
    let result = match (cli.idle_clients, cli.hold_in_flight, &server) {
        (Some(clients), _, Some(server)) => measure_idle(clients, &targets, opts, server).await,
        (None, true, Some(server)) => measure_held(cli.clients, &targets, opts, server).await,
        (Some(_), _, None) | (None, true, None) => {
            Err("--idle-clients and --hold-in-flight need --pid or --spawn".into())
        }
        (None, false, server) => measure_load(&cli, &targets, opts, server.as_ref()).await,
    };
    if let Some(server) = server {
        server.stop().await;
    }
    let (json, line) = result?;
    if cli.json {
        println!("{json}");
    } else {
        println!("{line}");
    }
    Ok(())
}

fn main() {
    let mut cli = Cli::parse();
    if cli.duration.is_none() && cli.count.is_none() {
        cli.duration = Some(5.0);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    if let Err(err) = runtime.block_on(run(cli)) {
        eprintln!("qmp-bench: {err}");
        std::process::exit(1);
    }
}
