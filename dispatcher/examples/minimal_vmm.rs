//! A minimal VMM monitor: a few commands served over QMP on a Unix socket.
//!
//! Run it with a socket path, then talk to it from another terminal:
//!
//! ```text
//! cargo run -p qmp-dispatcher --example minimal_vmm -- /tmp/vmm.sock
//! qmp-shell /tmp/vmm.sock                     # pip install qemu.qmp
//! (QEMU) query-status
//! (QEMU) stop
//! (QEMU) screendump filename=/tmp/screen.ppm
//! ```
//!
//! Or speak raw QMP: `socat - UNIX-CONNECT:/tmp/vmm.sock`, then type
//! `{"execute": "qmp_capabilities", "arguments": {"enable": ["async"]}}` followed by requests
//! that each carry an `id`. Ctrl-C stops the server. `RUST_LOG=qmp_dispatcher=debug` shows
//! the dispatcher's logs.
//!
//! Commands:
//! - `query-status`: synchronous; returns `{"running", "status"}`.
//! - `stop` / `cont`: synchronous; change the state and emit `STOP` / `RESUME`.
//! - `x-sleep {"seconds": N}`: an `async fn`; cancelling it drops the future.
//! - `screendump {"filename": F}`: deferred to a blocking thread that writes the file in steps,
//!   watches for cancellation between steps and removes the partial file if cancelled.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qmp_dispatcher::{
    Command, Context, JsonSchema, NoArgs, QmpError, QmpReturn, RegisterError, Registry, Server,
    bind_unix,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, JsonSchema)]
struct StatusInfo {
    running: bool,
    status: &'static str,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SleepArgs {
    seconds: u64,
}

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct ScreendumpArgs {
    filename: PathBuf,
}

/// The VM state the commands act on: the registry's state, which every handler receives
/// through its `Context`.
struct Vm {
    running: AtomicBool,
}

impl Vm {
    /// Changes the state and tells every client, through the request's context (which
    /// checks the event against the command's `emits` declaration).
    fn set_running(&self, running: bool, cx: &Context<Vm>) {
        self.running.store(running, Ordering::SeqCst);
        cx.emit(if running { "RESUME" } else { "STOP" }, None);
    }
}

fn registry() -> Result<Registry, RegisterError> {
    let mut builder = Registry::with_state(Vm {
        running: AtomicBool::new(true),
    });
    builder
        .event_without_data("STOP")?
        .event_without_data("RESUME")?
        .add(Command::sync(
            "query-status",
            |_: NoArgs, cx: &Context<Vm>| {
                let running = cx.state().running.load(Ordering::SeqCst);
                let status = if running { "running" } else { "paused" };
                Ok(StatusInfo { running, status })
            },
        ))?
        // `Ok(())` is answered `{}`, QEMU's reply for commands without a value.
        .add(
            Command::sync("stop", |_: NoArgs, cx: &Context<Vm>| {
                cx.state().set_running(false, cx);
                Ok(())
            })
            .emits("STOP"),
        )?
        .add(
            Command::sync("cont", |_: NoArgs, cx: &Context<Vm>| {
                cx.state().set_running(true, cx);
                Ok(())
            })
            .emits("RESUME"),
        )?
        .add(Command::async_fn(
            "x-sleep",
            |args: SleepArgs, _| async move {
                tokio::time::sleep(Duration::from_secs(args.seconds)).await;
                Ok(())
            },
        ))?
        .add(Command::deferred("screendump", screendump))?;
    builder.try_build()
}

/// Validates at once (a failure to start is an immediate error reply), then writes the file
/// on tokio's blocking pool (tracked by the server, so shutdown waits for it) and answers
/// from there.
fn screendump(args: ScreendumpArgs, _: Context<Vm>, ret: QmpReturn) {
    let file = match std::fs::File::create(&args.filename) {
        Ok(file) => file,
        Err(e) => {
            let desc = format!("Could not open '{}': {e}", args.filename.display());
            return ret.err(QmpError::generic(desc));
        }
    };
    ret.spawn_blocking(move |ret| {
        let (width, height) = (64usize, 48usize);
        let mut out = std::io::BufWriter::new(file);
        let mut result = write!(out, "P6\n{width} {height}\n255\n");
        for row in 0..height {
            // A slow device: one row every 50 ms, checking for cancellation between rows.
            std::thread::sleep(Duration::from_millis(50));
            if ret.is_cancelled() {
                drop(out);
                let _ = std::fs::remove_file(&args.filename);
                return; // The client has its reply already; a reply now would be discarded.
            }
            let shade = (row * 255 / height) as u8;
            result = result.and_then(|()| out.write_all(&[shade, 0, 255 - shade].repeat(width)));
        }
        match result.and_then(|()| out.flush()) {
            Ok(()) => ret.reply(Ok(())),
            Err(e) => ret.err(QmpError::generic(format!("Write failed: {e}"))),
        }
    });
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let Some(path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: minimal_vmm SOCKET_PATH");
        std::process::exit(2);
    };

    let registry = registry().expect("the command table is consistent");
    let server = Server::builder(registry).build();

    let listener = bind_unix(&path, 0o600)?;
    eprintln!("QMP on {}; Ctrl-C to stop", path.display());
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });

    tokio::signal::ctrl_c().await?;
    server.shutdown();
    server.wait().await;
    accept.await.expect("accept task")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
