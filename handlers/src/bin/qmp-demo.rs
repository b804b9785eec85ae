//! qmp-demo: a QEMU-like VMM monitor on the qmp-dispatcher.
//!
//! ```text
//! cargo run --release -p qmp-handlers --bin qmp-demo -- --qmp unix:qmp.sock
//! qmp-shell qmp.sock
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qmp_handlers::demo::{self, DemoOptions};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A QEMU-like VMM monitor: QMP on Unix or TCP sockets, with the `async` capability.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where to serve QMP: `unix:PATH` or `tcp:HOST:PORT`. Repeatable; every listener takes
    /// many clients.
    #[arg(long = "qmp", value_name = "ADDR", required = true)]
    qmp: Vec<Listen>,
    /// Serve the guest-agent protocol (qemu-ga framing: guest-sync, guest-sync-delimited,
    /// guest-ping, guest-info) on `unix:PATH`.
    #[arg(long = "qga", value_name = "ADDR")]
    qga: Option<Listen>,
    /// Commands one async client may have in flight.
    #[arg(long, default_value_t = qmp_dispatcher::config::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Clients connected at once.
    #[arg(long, default_value_t = qmp_dispatcher::config::DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
    /// Permissions of the Unix sockets (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Test hook: milliseconds `screendump` sleeps per chunk of rows, so that tests can cancel
    /// a dump while its file is half written.
    #[arg(long, hide = true, value_name = "MS", default_value_t = 0)]
    screendump_chunk_delay_ms: u64,
}

#[derive(Debug, Clone)]
enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            Ok(Listen::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            Ok(Listen::Tcp(addr.to_string()))
        } else {
            Err(format!("expected unix:PATH or tcp:HOST:PORT, got '{s}'"))
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("bad octal mode '{s}': {e}"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
    let stop = tokio_util::sync::CancellationToken::new();
    let on_quit = stop.clone();
    let options = DemoOptions {
        max_in_flight: cli.max_in_flight,
        max_clients: cli.max_clients,
        screendump_chunk_delay: std::time::Duration::from_millis(cli.screendump_chunk_delay_ms),
        ..DemoOptions::default()
    };
    let demo = demo::build(&options, move || on_quit.cancel())?;
    let server = demo.server.clone();

    // Removed however `run` ends, so a failed start leaves no socket file behind.
    let mut sockets = SocketFiles(Vec::new());
    let mut listeners = tokio::task::JoinSet::new();
    for listen in &cli.qmp {
        match listen {
            Listen::Unix(path) => {
                let listener = qmp_dispatcher::bind_unix(path, cli.socket_mode)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "QMP listening");
                sockets.0.push(path.clone());
                let server = server.clone();
                listeners.spawn(async move { server.serve_unix(listener).await });
            }
            Listen::Tcp(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
                tracing::info!(%addr, "QMP listening");
                let server = server.clone();
                listeners.spawn(async move { server.serve_tcp(listener).await });
            }
        }
    }
    let agent = std::sync::Arc::new(qmp_qga::minimal_agent());
    match &cli.qga {
        Some(Listen::Unix(path)) => {
            let listener = qmp_dispatcher::bind_unix(path, cli.socket_mode)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "guest agent listening");
            sockets.0.push(path.clone());
            let agent = std::sync::Arc::clone(&agent);
            listeners.spawn(async move { agent.serve_unix(listener).await });
        }
        Some(Listen::Tcp(_)) => return Err("--qga takes unix:PATH".into()),
        None => {}
    }

    tokio::select! {
        () = stop.cancelled() => tracing::info!("quit"),
        () = shutdown_signal() => tracing::info!("signal received"),
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

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
