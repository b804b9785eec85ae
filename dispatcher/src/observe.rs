//! What the server reports about itself: metrics through the `metrics` facade, and the
//! audit trail of executed commands through `tracing`. Every metric name and the audit
//! target are defined here, once.
//!
//! | Metric | Kind | Labels |
//! |---|---|---|
//! | `qmp_clients_connected` | gauge | |
//! | `qmp_commands_in_flight` | gauge | |
//! | `qmp_commands_total` | counter | `command`, `outcome` |
//! | `qmp_command_duration_seconds` | histogram | `command` |
//! | `qmp_events_sent_total` | counter | |
//! | `qmp_events_dropped_total` | counter | |
//! | `qmp_clients_disconnected_slow_total` | counter | |
//!
//! `outcome` is one of [`Outcome`]'s names. Without a recorder installed every call is a
//! no-op.

use std::sync::Arc;
use std::time::Instant;

use crate::context::ClientInfo;
use crate::error::QmpError;

/// The `tracing` target of the audit trail: one INFO line per command, with the client's
/// identity, the command and its outcome, never its arguments (they may hold secrets).
pub const AUDIT_TARGET: &str = "qmp_dispatcher::audit";

/// Metric names.
pub mod names {
    /// Gauge: connected clients.
    pub const CLIENTS_CONNECTED: &str = "qmp_clients_connected";
    /// Gauge: commands dispatched to handlers and not answered yet.
    pub const COMMANDS_IN_FLIGHT: &str = "qmp_commands_in_flight";
    /// Counter: commands by `command` and `outcome`.
    pub const COMMANDS_TOTAL: &str = "qmp_commands_total";
    /// Histogram: seconds from dispatch to outcome, by `command`.
    pub const COMMAND_DURATION: &str = "qmp_command_duration_seconds";
    /// Counter: event lines queued to clients.
    pub const EVENTS_SENT: &str = "qmp_events_sent_total";
    /// Counter: event lines not queued because the client lagged.
    pub const EVENTS_DROPPED: &str = "qmp_events_dropped_total";
    /// Counter: clients disconnected for not reading their output.
    pub const CLIENTS_DISCONNECTED_SLOW: &str = "qmp_clients_disconnected_slow_total";
}

/// How one request ended, as the audit trail and `qmp_commands_total` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a return value.
    Ok,
    /// Answered with an error by its handler or built-in.
    Error,
    /// Refused before it ran: unknown to the client's policy or registry, disabled,
    /// negotiation first, OOB not allowed, a bad `async` id.
    Refused,
    /// Cancelled with `async-command-cancel`.
    Cancelled,
    /// Cancelled by its deadline.
    TimedOut,
    /// Cancelled because its client left or the server stopped.
    Abandoned,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed-out",
            Outcome::Abandoned => "abandoned",
        }
    }
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::Ok,
    Outcome::Error,
    Outcome::Refused,
    Outcome::Cancelled,
    Outcome::TimedOut,
    Outcome::Abandoned,
];

/// One registered command's metric handles, registered with the recorder on the command's
/// first use and kept, so that a command costs no label allocation. A recorder must
/// therefore be installed before the server runs commands, as the `metrics` crate advises.
pub(crate) struct CommandMetrics {
    totals: [metrics::Counter; OUTCOMES.len()],
    duration: metrics::Histogram,
}

impl CommandMetrics {
    pub(crate) fn new(command: &Arc<str>) -> Self {
        let name = metrics::SharedString::from(Arc::clone(command));
        let totals = OUTCOMES.map(|outcome| {
            metrics::counter!(names::COMMANDS_TOTAL, "command" => name.clone(), "outcome" => outcome.as_str())
        });
        let duration = metrics::histogram!(names::COMMAND_DURATION, "command" => name);
        CommandMetrics { totals, duration }
    }
}

/// Records one request's end: the counter, the latency (for requests that ran), and the
/// audit line. `metrics` are the command's handles; `None` for a name the registry does not
/// know, whose series is looked up each time.
pub(crate) fn command_finished(
    client: &ClientInfo,
    command: &str,
    metrics: Option<&CommandMetrics>,
    started: Option<Instant>,
    outcome: Outcome,
    error: Option<&QmpError>,
) {
    let index = OUTCOMES.iter().position(|&o| o == outcome).unwrap_or(0);
    match metrics {
        Some(handles) => {
            handles.totals[index].increment(1);
            if let Some(started) = started {
                handles.duration.record(started.elapsed().as_secs_f64());
            }
        }
        None => {
            let name = metrics::SharedString::from(command.to_owned());
            metrics::counter!(names::COMMANDS_TOTAL, "command" => name, "outcome" => outcome.as_str())
                .increment(1);
        }
    }
    let peer = client.peer();
    tracing::info!(
        target: AUDIT_TARGET,
        client = client.id(),
        policy = client.policy().name(),
        uid = peer.map(|p| p.uid),
        pid = peer.and_then(|p| p.pid),
        command,
        outcome = outcome.as_str(),
        class = error.map(|e| e.class.as_str()),
        "qmp command"
    );
}

/// A client connected (`+1`) or left (`-1`).
pub(crate) fn clients_changed(delta: f64) {
    metrics::gauge!(names::CLIENTS_CONNECTED).increment(delta);
}

/// The gauge of commands in flight, for one in-flight table to keep: registering a series
/// on every change would look it up twice per command.
pub(crate) fn in_flight_gauge() -> metrics::Gauge {
    metrics::gauge!(names::COMMANDS_IN_FLIGHT)
}

/// One event was queued to `sent` clients and dropped for `dropped` lagging ones.
pub(crate) fn event_fanned_out(sent: u64, dropped: u64) {
    metrics::counter!(names::EVENTS_SENT).increment(sent);
    if dropped > 0 {
        metrics::counter!(names::EVENTS_DROPPED).increment(dropped);
    }
}

/// A client was disconnected for not reading.
pub(crate) fn slow_client_disconnected() {
    metrics::counter!(names::CLIENTS_DISCONNECTED_SLOW).increment(1);
}
