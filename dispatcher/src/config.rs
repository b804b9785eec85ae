//! What a server says about itself and the limits it enforces, with their defaults.

use std::collections::HashMap;
use std::time::Duration;

use crate::events::Throttle;
use crate::wire::{Limits, LineEnding};

/// The version a server reports in its greeting and in `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[non_exhaustive]
pub struct VersionInfo {
    /// `{"major", "minor", "micro"}`; clients such as qmp-shell print it as a QEMU version.
    pub qemu: VersionTriple,
    /// Free-form package string (QEMU puts the distribution version here).
    pub package: String,
}

/// A `major.minor.micro` version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl VersionInfo {
    /// A version with a package string.
    pub fn new(major: u32, minor: u32, micro: u32, package: impl Into<String>) -> Self {
        VersionInfo {
            qemu: VersionTriple {
                major,
                minor,
                micro,
            },
            package: package.into(),
        }
    }
}

impl VersionInfo {
    /// The version as QEMU writes it, member order and spacing included:
    /// `{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "..."}`.
    pub fn to_qemu_json(&self) -> String {
        let VersionTriple {
            major,
            minor,
            micro,
        } = self.qemu;
        let package = serde_json::to_string(&self.package).unwrap_or_else(|_| "\"\"".into());
        format!(
            r#"{{"qemu": {{"micro": {micro}, "minor": {minor}, "major": {major}}}, "package": {package}}}"#
        )
    }
}

impl Default for VersionInfo {
    fn default() -> Self {
        VersionInfo::new(
            10,
            0,
            0,
            concat!("qmp-dispatcher ", env!("CARGO_PKG_VERSION")),
        )
    }
}

/// The protocol flavour a server speaks on its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dialect {
    /// Send the `{"QMP": ...}` greeting on connect.
    pub greeting: bool,
    /// Start in negotiation mode (only `qmp_capabilities` works until it succeeds).
    pub negotiation: bool,
    /// How each output message ends (applied by the connection's codec).
    pub line_ending: LineEnding,
    /// Deliver events to negotiated clients.
    pub events: bool,
    /// A departed client's connection (and its client slot) lasts until the handlers of its
    /// cancelled commands have let go of their returns: a single-threaded agent is busy
    /// until its command ends, and the next client waits, as with qemu-ga.
    pub busy_until_handlers_finish: bool,
}

impl Dialect {
    /// QEMU's QMP monitor.
    pub const QMP: Dialect = Dialect {
        greeting: true,
        negotiation: true,
        line_ending: LineEnding::CrLf,
        events: true,
        busy_until_handlers_finish: false,
    };
    /// The QEMU guest agent: no greeting, no negotiation, `\n` endings, no events. Its
    /// connections never gain `oob` or `async`, so they run one command at a time.
    pub const GUEST_AGENT: Dialect = Dialect {
        greeting: false,
        negotiation: false,
        line_ending: LineEnding::Lf,
        events: false,
        busy_until_handlers_finish: true,
    };
}

impl Dialect {
    /// This dialect with another line ending.
    pub const fn with_line_ending(mut self, line_ending: LineEnding) -> Self {
        self.line_ending = line_ending;
        self
    }

    /// This dialect with events delivered (or not).
    pub const fn with_events(mut self, events: bool) -> Self {
        self.events = events;
        self
    }
}

/// Default [`Config::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;
/// QEMU's `QMP_REQ_QUEUE_LEN_MAX`: in-band requests a legacy `oob` client may have queued.
pub const LEGACY_QUEUE_LEN: usize = 8;
/// Default [`Config::max_clients`].
pub const DEFAULT_MAX_CLIENTS: usize = 1024;
/// Default [`Config::max_pending_output`].
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 8 << 20;
/// Default [`Config::output_high_water`].
pub const DEFAULT_OUTPUT_HIGH_WATER: usize = 256 << 10;
/// Default [`Config::event_queue`].
pub const DEFAULT_EVENT_QUEUE: usize = 4096;
/// Default [`Config::max_retained`]: 16 MiB of ids per client.
pub const DEFAULT_MAX_RETAINED: usize = 16 << 20;
/// Default [`Config::max_memory`]: 1 GiB for every client's buffers and ids together.
pub const DEFAULT_MAX_MEMORY: usize = 1 << 30;
/// What a connection may hold even when the server-wide budget is spent, so a well-behaved
/// client is still read while others hold large partial requests: 64 KiB.
pub const MEMORY_FLOOR: usize = 64 << 10;
/// A connection's buffer larger than this is given back once it no longer needs the room,
/// so a client that once sent or received a large value does not keep its buffers while
/// idle: 1 MiB. Ordinary traffic grows buffers well past 64 KiB (they double as they grow),
/// and a threshold that low made them shrink and regrow under load.
pub const IDLE_CAPACITY: usize = 1 << 20;
/// Input buffered at once above which decoding (and the dispatch of what it decodes) moves
/// off the runtime's worker (`block_in_place`), so one large value does not stall the other
/// clients of that worker: 1 MiB.
pub const LARGE_FRAME: usize = 1 << 20;
/// `exec-oob` commands an async client may have in flight beyond
/// [`Config::max_in_flight`], so that control commands still run at the cap.
pub const OOB_RESERVE: usize = 8;

/// Everything a server is configured with, as set through [`crate::ServerBuilder`] (the
/// only way to set it) and read back with [`crate::Server::config`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Reported in the greeting and by `query-version`.
    pub version: VersionInfo,
    /// The protocol flavour.
    pub dialect: Dialect,
    /// Offer the `oob` capability (`exec-oob`).
    pub offer_oob: bool,
    /// Offer the `async` capability.
    pub offer_async: bool,
    /// Commands an async client may have in flight; at the limit the server stops reading
    /// from that client until one completes. Nothing is ever dropped.
    pub max_in_flight: usize,
    /// Bytes of ids one client's in-flight commands may retain; at the budget reading
    /// pauses, as at the in-flight cap. A client with nothing in flight is always read.
    pub max_retained: usize,
    /// Limits of one JSON value on input.
    pub limits: Limits,
    /// Bytes all connections together may hold in input and output buffers and retained
    /// ids. Past it, connections holding more than [`MEMORY_FLOOR`] stop reading until
    /// memory is given back. Keep it well above `limits.max_bytes`: a request larger than
    /// the budget would wait for ever.
    pub max_memory: usize,
    /// Connected clients per server; further connections wait in the listen backlog.
    pub max_clients: usize,
    /// A client whose unread output would exceed this because of events (it does not read
    /// them) is disconnected. Replies never count against it: they are bounded by the
    /// in-flight cap and by reading pausing at `output_high_water`.
    pub max_pending_output: usize,
    /// Reading from a client pauses while this much of its output is unsent.
    pub output_high_water: usize,
    /// Events buffered per client between the emitter and the client's connection task; a
    /// client that falls further behind is disconnected.
    pub event_queue: usize,
    /// Rate limits by event name.
    pub throttles: HashMap<String, Throttle>,
    /// Deadlines by command name; see [`timeout_for`](Self::timeout_for).
    pub command_timeouts: HashMap<String, Duration>,
    /// The deadline of handler commands without one of their own; `None`: no deadline.
    pub default_command_timeout: Option<Duration>,
    /// Commands one client may start, of any name; over it reading from the client pauses.
    pub rate_limit: Option<RateLimit>,
    /// Per-client limits by command name, beside [`rate_limit`](Self::rate_limit).
    pub command_rate_limits: HashMap<String, RateLimit>,
}

impl Config {
    /// The deadline of `command`: its own, else the default. Applies to commands with a
    /// handler (built-ins answer at once). On expiry the command is cancelled as
    /// `async-command-cancel` cancels it, and its client gets `GenericError`
    /// `Command NAME timed out after N ms`.
    pub fn timeout_for(&self, command: &str) -> Option<Duration> {
        self.command_timeouts
            .get(command)
            .copied()
            .or(self.default_command_timeout)
    }
}

/// A rate: at most `burst` commands at once, refilled at `burst` per `per`. Over the limit
/// the server delays reading from the client (backpressure): no request is refused, because
/// QEMU has no error class for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Commands allowed in a burst, and per period.
    pub burst: u32,
    /// The period.
    pub per: Duration,
}

impl RateLimit {
    /// `n` commands per second, in bursts of up to `n`.
    pub fn per_second(n: u32) -> Self {
        RateLimit {
            burst: n,
            per: Duration::from_secs(1),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: VersionInfo::default(),
            dialect: Dialect::QMP,
            offer_oob: true,
            offer_async: true,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_retained: DEFAULT_MAX_RETAINED,
            command_timeouts: HashMap::new(),
            default_command_timeout: None,
            rate_limit: None,
            command_rate_limits: HashMap::new(),
            limits: Limits::default(),
            max_memory: DEFAULT_MAX_MEMORY,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            output_high_water: DEFAULT_OUTPUT_HIGH_WATER,
            event_queue: DEFAULT_EVENT_QUEUE,
            throttles: HashMap::new(),
        }
    }
}

/// QEMU's throttled events and their keys, for servers that emit them.
pub fn qemu_throttles() -> HashMap<String, Throttle> {
    let second = Duration::from_secs(1);
    let mut throttles = HashMap::new();
    for (name, key) in [
        ("RTC_CHANGE", None),
        ("WATCHDOG", None),
        ("BALLOON_CHANGE", None),
        ("QUORUM_REPORT_BAD", Some("node-name")),
        ("QUORUM_FAILURE", None),
        ("VSERPORT_CHANGE", Some("id")),
        ("MEMORY_DEVICE_SIZE_CHANGE", Some("qom-path")),
        ("HV_BALLOON_STATUS_REPORT", None),
    ] {
        throttles.insert(
            name.to_string(),
            Throttle {
                period: second,
                key: key.map(str::to_string),
            },
        );
    }
    throttles
}
