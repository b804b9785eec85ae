//! The `qmp-demo` VMM monitor: a QEMU-like command set on the dispatcher.

use std::sync::Arc;
use std::time::Duration;

use qmp_dispatcher::config::qemu_throttles;
use qmp_dispatcher::wire::Limits;
use qmp_dispatcher::{RegisterError, Registry, Server, VersionInfo};

use crate::display::TestPattern;
use crate::run_state::RunState;
use crate::{misc, screendump};

/// The display device id of the demo's framebuffer.
pub const DISPLAY_DEVICE: &str = "video0";

/// The demo's bound on `screendump`'s blocking work: small, since encoding is CPU-bound
/// and a target that hangs in the kernel should pin few threads.
pub const DEFAULT_SCREENDUMP_MAX_BLOCKING: usize = 2;

/// What the demo is configured with.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Commands an async client may have in flight.
    pub max_in_flight: usize,
    /// Clients at once, per server.
    pub max_clients: usize,
    /// Bytes of one request (the dispatcher's `limits.max_bytes`).
    pub max_bytes: usize,
    /// Bytes all clients together may hold in buffers and ids.
    pub max_memory: usize,
    /// Framebuffer size.
    pub display_size: (u32, u32),
    /// Blocking steps `screendump` runs at once (see `Screendump::new`).
    pub screendump_max_blocking: usize,
    /// Deadlines by command name (`--timeout NAME=MS`).
    pub command_timeouts: Vec<(String, Duration)>,
    /// Test hook: `screendump` sleeps this long per chunk of rows, to be caught in flight.
    #[doc(hidden)]
    pub screendump_chunk_delay: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            max_in_flight: qmp_dispatcher::config::DEFAULT_MAX_IN_FLIGHT,
            max_clients: qmp_dispatcher::config::DEFAULT_MAX_CLIENTS,
            max_bytes: qmp_dispatcher::wire::Limits::default().max_bytes,
            max_memory: qmp_dispatcher::config::DEFAULT_MAX_MEMORY,
            display_size: (1920, 1080),
            screendump_max_blocking: DEFAULT_SCREENDUMP_MAX_BLOCKING,
            command_timeouts: Vec::new(),
            screendump_chunk_delay: Duration::ZERO,
        }
    }
}

/// The demo VMM: its server and the state its commands change.
pub struct Demo {
    /// The QMP server; serve it on any number of listeners.
    pub server: Server,
    /// The VM's run state.
    pub run_state: RunState,
}

/// Builds the demo: `query-status`, `stop`, `cont`, `system_powerdown`, `screendump`,
/// `query-yank`, `x-delay` and `quit` (which calls `on_quit`), plus the dispatcher's
/// built-ins.
pub fn build(
    options: &DemoOptions,
    on_quit: impl Fn() + Send + Sync + 'static,
) -> Result<Demo, RegisterError> {
    let run_state = RunState::new();
    let (width, height) = options.display_size;
    let display = screendump::Display {
        device: DISPLAY_DEVICE.to_string(),
        framebuffer: Arc::new(TestPattern::new(width, height)),
    };

    let mut registry = Registry::with_state(run_state.clone());
    RunState::register(&mut registry)?;
    registry
        .add(
            screendump::Screendump::new(display, options.screendump_max_blocking)
                .chunk_delay(options.screendump_chunk_delay)
                .command(),
        )?
        .add(misc::query_yank())?
        .add(misc::x_delay())?
        .add(RunState::quit(on_quit))?;

    let mut builder = Server::builder(registry.try_build()?);
    for (event, throttle) in qemu_throttles() {
        builder = builder.throttle(event, throttle);
    }
    for (command, timeout) in &options.command_timeouts {
        builder = builder.command_timeout(command, *timeout);
    }
    let server = builder
        .version(VersionInfo::new(
            10,
            0,
            0,
            concat!("qmp-demo ", env!("CARGO_PKG_VERSION")),
        ))
        .max_in_flight(options.max_in_flight)
        .max_clients(options.max_clients)
        .limits(Limits {
            max_bytes: options.max_bytes,
            ..Limits::default()
        })
        .max_memory(options.max_memory)
        .build();
    Ok(Demo { server, run_state })
}
