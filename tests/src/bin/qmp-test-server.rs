//! `qmp-test-server --socket PATH [--max-in-flight N]`: the test commands of
//! [`qmp_tests::test_commands`] served on a Unix socket, for real clients (qemu.qmp,
//! qmp-shell, socat) to talk to. Prints `ready` on stdout once clients can connect; exits on
//! SIGTERM or SIGINT and removes its socket.

use std::path::PathBuf;
use std::process::ExitCode;

use qmp_dispatcher::{Registry, Server};
use qmp_tests::{Holds, test_commands};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: qmp-test-server --socket PATH [--max-in-flight N]";

struct Args {
    socket: PathBuf,
    max_in_flight: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut socket = None;
    let mut max_in_flight = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--max-in-flight" => {
                let n = value()?;
                max_in_flight = Some(n.parse().map_err(|_| format!("bad number: {n}"))?);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unexpected argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or_else(|| format!("--socket is required\n{USAGE}"))?,
        max_in_flight,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr, filtered by RUST_LOG (quiet by default).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();

    let holds = Holds::default();
    let mut registry = Registry::builder();
    test_commands(&mut registry, &holds);
    let mut builder = Server::builder(registry.build());
    if let Some(max) = args.max_in_flight {
        builder = builder.max_in_flight(max);
    }
    let server = builder.build();

    let listener = match qmp_dispatcher::bind_unix(&args.socket, 0o600) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot bind {}: {e}", args.socket.display());
            return ExitCode::FAILURE;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            eprintln!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    // Only now can a client connect, so a parent waiting for this line never races bind().
    println!("ready");

    let serving = server.clone();
    let status = tokio::select! {
        served = serving.serve_unix(listener) => match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("serving failed: {e}");
                ExitCode::FAILURE
            }
        },
        _ = term.recv() => ExitCode::SUCCESS,
        _ = int.recv() => ExitCode::SUCCESS,
    };
    server.shutdown();
    server.wait().await;
    let _ = std::fs::remove_file(&args.socket);
    status
}
