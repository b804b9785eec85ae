//! qmp-demo: a QEMU-like VMM monitor on the qmp-dispatcher.
//!
//! ```text
//! cargo run --release -p qmp-handlers --bin qmp-demo -- --qmp unix:qmp.sock
//! qmp-shell qmp.sock
//! ```

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use qmp_dispatcher::Policy;
use qmp_handlers::demo::{self, DemoOptions};
use qmp_handlers::run_state::HostShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// A QEMU-like VMM monitor: QMP on Unix or TCP sockets, with the `async` capability.
#[derive(Debug, Parser)]
#[command(name = "qmp-demo", version)]
struct Cli {
    /// Where to serve QMP: `unix:PATH` or `tcp:HOST:PORT`, optionally followed by
    /// `,readonly` (that listener offers only `query-*` commands, `qmp_capabilities` and the
    /// async built-ins). Repeatable; every listener takes many clients.
    #[arg(long = "qmp", value_name = "ADDR", required = true)]
    qmp: Vec<Listen>,
    /// Serve the guest-agent protocol (qemu-ga framing: guest-sync, guest-sync-delimited,
    /// guest-ping, guest-info) on `unix:PATH`.
    #[arg(long = "qga", value_name = "ADDR", value_parser = parse_qga)]
    qga: Option<PathBuf>,
    /// Commands one async client may have in flight.
    #[arg(long, default_value_t = qmp_dispatcher::config::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Clients connected at once.
    #[arg(long, default_value_t = qmp_dispatcher::config::DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
    /// Bytes of one request; larger ones are refused with QEMU's size-limit error.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    max_bytes: usize,
    /// Bytes all clients together may hold in buffers and request ids before the server
    /// stops reading from the clients that hold the most.
    #[arg(long, value_name = "BYTES", default_value_t = qmp_dispatcher::config::DEFAULT_MAX_MEMORY)]
    max_memory: usize,
    /// Permissions of the Unix sockets (octal, at most 777).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// A command's deadline, `NAME=MS`: after MS milliseconds the command is cancelled and
    /// its client gets `Command NAME timed out after MS ms`. Repeatable.
    #[arg(long = "timeout", value_name = "NAME=MS", value_parser = parse_timeout)]
    timeouts: Vec<(String, std::time::Duration)>,
    /// Record the dispatcher's metrics; SIGUSR1 prints them to stderr in Prometheus text
    /// format.
    #[arg(long)]
    metrics: bool,
    /// Test hook: milliseconds `screendump` sleeps per chunk of rows, so that tests can cancel
    /// a dump while its file is half written.
    #[arg(long, hide = true, value_name = "MS", default_value_t = 0)]
    screendump_chunk_delay_ms: u64,
}

impl Cli {
    /// Parses the command line and refuses combinations that can only be mistakes, before
    /// anything listens; exits with clap's usage error otherwise.
    fn parse_checked() -> Self {
        let cli = Cli::parse();
        if let Err(message) = cli.check() {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, message)
                .exit();
        }
        cli
    }

    /// The same socket path twice (two `--qmp`, or `--qmp` and `--qga`) would have the
    /// second listener fail, or, worse, silently serve one protocol on the other's path.
    fn check(&self) -> Result<(), String> {
        let qmp = self.qmp.iter().filter_map(|listen| match &listen.at {
            Address::Unix(path) => Some(("--qmp", path)),
            Address::Tcp(_) => None,
        });
        let qga = self.qga.iter().map(|path| ("--qga", path));
        let mut seen: Vec<(&str, &PathBuf, PathBuf)> = Vec::new();
        for (flag, path) in qmp.chain(qga) {
            let key = normalised(path);
            if let Some((first, first_path, _)) = seen.iter().find(|(_, _, k)| *k == key) {
                return Err(format!(
                    "{flag} unix:{} is the same socket as {first} unix:{}",
                    path.display(),
                    first_path.display()
                ));
            }
            seen.push((flag, path, key));
        }
        Ok(())
    }
}

/// `path` made absolute, with `.` components dropped and, when its directory exists,
/// symlinks and `..` in the directory resolved: two spellings of one socket compare equal.
fn normalised(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir
            .canonicalize()
            .map(|dir| dir.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// One `--qmp` listener.
#[derive(Debug, Clone)]
struct Listen {
    at: Address,
    /// `,readonly`: only `query-*` commands (`Policy::read_only`).
    read_only: bool,
}

#[derive(Debug, Clone)]
enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (s, read_only) = match s.strip_suffix(",readonly") {
            Some(address) => (address, true),
            None => (s, false),
        };
        let at = if let Some(path) = s.strip_prefix("unix:") {
            Address::Unix(unix_path(path)?)
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            Address::Tcp(addr.to_string())
        } else {
            return Err(format!(
                "expected unix:PATH or tcp:HOST:PORT, got '{s}' (add ,readonly for a read-only listener)"
            ));
        };
        Ok(Listen { at, read_only })
    }
}

impl Listen {
    fn policy(&self) -> Policy {
        if self.read_only {
            Policy::read_only()
        } else {
            Policy::full()
        }
    }
}

fn parse_timeout(s: &str) -> Result<(String, std::time::Duration), String> {
    let (name, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=MS, got '{s}'"))?;
    let ms: u64 = ms
        .parse()
        .map_err(|e| format!("bad milliseconds in '{s}': {e}"))?;
    if name.is_empty() {
        return Err(format!("expected a command name in '{s}'"));
    }
    Ok((name.to_string(), std::time::Duration::from_millis(ms)))
}

fn unix_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("unix: needs a socket path, as in unix:qmp.sock".to_string());
    }
    Ok(path.into())
}

/// `--qga` takes `unix:PATH` only: the guest agent's clients connect to a Unix socket.
fn parse_qga(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(path) => unix_path(path),
        None => Err(format!("--qga takes unix:PATH, got '{s}'")),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s, 8).map_err(|e| format!("bad octal mode '{s}': {e}"))?;
    if mode > 0o777 {
        return Err(format!(
            "mode '{s}' is not a permission mode: at most 777 (rwx for user, group, others)"
        ));
    }
    Ok(mode)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse_checked();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // Dropping the runtime would wait for every blocking thread, however stuck its handler
    // work (a file system that hangs); give them a moment, then exit regardless.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    // Installed before any socket exists: once a client can connect, a signal ends the demo
    // cleanly rather than by its default action.
    let mut signals = ShutdownSignals::install()?;
    // What to tell the user once everything listens.
    let mut banner = Vec::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let on_quit = stop.clone();
    let options = DemoOptions {
        max_in_flight: cli.max_in_flight,
        max_clients: cli.max_clients,
        max_bytes: cli.max_bytes,
        max_memory: cli.max_memory,
        screendump_chunk_delay: std::time::Duration::from_millis(cli.screendump_chunk_delay_ms),
        command_timeouts: cli.timeouts.clone(),
        ..DemoOptions::default()
    };
    if cli.metrics {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                eprint!("{}", handle.render());
            }
        });
        banner.push("metrics: kill -USR1 <pid> prints them to stderr".to_string());
    }
    let demo = demo::build(&options, move || on_quit.cancel())?;
    let server = demo.server.clone();

    // Removed however `run` ends, so a failed start leaves no socket file behind.
    let mut sockets = SocketFiles(Vec::new());
    let mut listeners = tokio::task::JoinSet::new();
    for listen in &cli.qmp {
        let policy = listen.policy();
        let mode = if listen.read_only { " (read-only)" } else { "" };
        match &listen.at {
            Address::Unix(path) => {
                let listener = qmp_dispatcher::bind_unix(path, cli.socket_mode)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                sockets.0.push(path.clone());
                banner.push(format!(
                    "QMP{mode} on unix:{0}; connect with: qmp-shell {0}",
                    path.display()
                ));
                let server = server.clone();
                listeners.spawn(async move { server.serve_with_policy(listener, policy).await });
            }
            Address::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                // The bound address, so that port 0 shows the port chosen.
                let local = listener.local_addr()?;
                banner.push(format!(
                    "QMP{mode} on tcp:{local}; connect with: qmp-shell {local}"
                ));
                let server = server.clone();
                listeners.spawn(async move { server.serve_with_policy(listener, policy).await });
            }
        }
    }
    let agent = std::sync::Arc::new(qmp_qga::minimal_agent());
    if let Some(path) = &cli.qga {
        let listener = qmp_dispatcher::bind_unix(path, cli.socket_mode)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        sockets.0.push(path.clone());
        banner.push(format!(
            "guest agent on unix:{0}; connect with: qmp-shell -N {0}",
            path.display()
        ));
        let agent = std::sync::Arc::clone(&agent);
        listeners.spawn(async move { agent.serve_unix(listener).await });
    }
    // Plain stderr, not the log: this is for whoever started the demo, whatever RUST_LOG says.
    for line in &banner {
        eprintln!("qmp-demo: {line}");
    }
    eprintln!("qmp-demo: stop with Ctrl-C (or the QMP command quit)");

    tokio::select! {
        // `quit` has sent its SHUTDOWN event already.
        () = stop.cancelled() => tracing::info!("quit"),
        name = signals.recv() => {
            tracing::info!(signal = name, "signal received");
            demo.run_state
                .host_shutdown(HostShutdown::HostSignal, demo.server.events());
        }
        Some(result) = listeners.join_next() => {
            if let Ok(Err(e)) = result {
                tracing::error!(cause = %e, "listener failed");
            }
        }
    }
    server.shutdown();
    agent.server().shutdown();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server.wait()).await;
    Ok(())
}

/// Socket files to remove when the demo exits.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The signals that end the demo like `quit`, as they end QEMU (and qemu-storage-daemon):
/// SIGTERM, SIGINT and SIGHUP.
struct ShutdownSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for one; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
