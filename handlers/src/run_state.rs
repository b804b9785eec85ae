//! The VM's run state and the commands that change it: `query-status`, `stop`, `cont`,
//! `system_powerdown`, `quit`, with QEMU's events.

use std::sync::{Arc, Mutex};

use qmp_dispatcher::{
    Command, Context, Emit, NoArgs, QmpError, QmpReturn, RegisterError, RegistryBuilder,
};
use serde::Serialize;

/// QEMU's `RunState` values a simple VMM goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Guest is running.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// Guest has shut down.
    Shutdown,
}

/// `query-status` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct StatusInfo {
    /// True while the guest runs.
    pub running: bool,
    /// The detailed state.
    pub status: Status,
}

/// Why the host shut the VM down: QEMU's `ShutdownCause`, as `SHUTDOWN` reports it in
/// `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostShutdown {
    /// The `quit` command.
    HostQmpQuit,
    /// SIGTERM, SIGINT or SIGHUP.
    HostSignal,
}

/// `SHUTDOWN` event data, as QEMU sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct ShutdownData {
    /// True if the guest asked for the shutdown.
    pub guest: bool,
    /// Why.
    pub reason: HostShutdown,
}

/// The VM's run state, shared by the commands that read and change it (it is the demo
/// registry's state). Emits `STOP`, `RESUME`, `POWERDOWN` and `SHUTDOWN` like QEMU, through
/// whatever [`Emit`] the caller has: a command's context, or the server's handle.
#[derive(Clone)]
pub struct RunState {
    status: Arc<Mutex<Status>>,
}

impl Default for RunState {
    fn default() -> Self {
        Self::new()
    }
}

impl RunState {
    /// A running VM.
    pub fn new() -> Self {
        RunState {
            status: Arc::new(Mutex::new(Status::Running)),
        }
    }

    /// The current state.
    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pauses the guest; emits `STOP` if it was running (QEMU emits nothing otherwise).
    pub fn stop(&self, events: &impl Emit) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if *status == Status::Running {
            *status = Status::Paused;
            drop(status);
            events.emit("STOP", None);
        }
    }

    /// Resumes the guest; emits `RESUME`.
    pub fn cont(&self, events: &impl Emit) -> Result<(), QmpError> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match *status {
            Status::Shutdown => Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            )),
            Status::Running => Ok(()),
            Status::Paused => {
                *status = Status::Running;
                drop(status);
                events.emit("RESUME", None);
                Ok(())
            }
        }
    }

    /// Asks the guest to power down (ACPI button): emits `POWERDOWN`.
    pub fn powerdown(&self, events: &impl Emit) {
        events.emit("POWERDOWN", None);
    }

    /// The host ends the VM: the state becomes `shutdown` and `SHUTDOWN {"guest": false,
    /// "reason": ...}` goes to every negotiated client, as QEMU 10 sends it on `quit` and on
    /// SIGTERM, SIGINT and SIGHUP. Call it before shutting the server down, so the event is
    /// queued to every client before the connections close.
    pub fn host_shutdown(&self, reason: HostShutdown, events: &impl Emit) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Status::Shutdown;
        let data = ShutdownData {
            guest: false,
            reason,
        };
        events.emit_data("SHUTDOWN", &data);
    }

    /// `quit`: emits `SHUTDOWN` (reason `host-qmp-quit`), replies, then calls `on_quit`
    /// (which should stop the server and the process). QEMU sends the event before the
    /// reply.
    pub fn quit(on_quit: impl Fn() + Send + Sync + 'static) -> Command<RunState> {
        Command::deferred(
            "quit",
            move |_: NoArgs, cx: Context<RunState>, ret: QmpReturn| {
                cx.state().host_shutdown(HostShutdown::HostQmpQuit, &*cx);
                ret.reply(Ok(()));
                on_quit();
            },
        )
        .returns::<()>()
        .emits("SHUTDOWN")
    }

    /// Registers `query-status`, `stop`, `cont` and `system_powerdown`, and declares the
    /// events `SHUTDOWN`, `STOP`, `RESUME` and `POWERDOWN`.
    pub fn register(builder: &mut RegistryBuilder<RunState>) -> Result<(), RegisterError> {
        builder
            .event::<ShutdownData>("SHUTDOWN")?
            .event_without_data("STOP")?
            .event_without_data("RESUME")?
            .event_without_data("POWERDOWN")?
            .add(Command::sync(
                "query-status",
                |_: NoArgs, cx: &Context<RunState>| {
                    let status = cx.state().status();
                    Ok(StatusInfo {
                        running: status == Status::Running,
                        status,
                    })
                },
            ))?
            .add(
                Command::sync("stop", |_: NoArgs, cx: &Context<RunState>| {
                    cx.state().stop(&**cx);
                    Ok(())
                })
                .emits("STOP"),
            )?
            .add(
                Command::sync("cont", |_: NoArgs, cx: &Context<RunState>| {
                    cx.state().cont(&**cx)
                })
                .emits("RESUME"),
            )?
            .add(
                Command::sync("system_powerdown", |_: NoArgs, cx: &Context<RunState>| {
                    cx.state().powerdown(&**cx);
                    Ok(())
                })
                .emits("POWERDOWN"),
            )?;
        Ok(())
    }
}
