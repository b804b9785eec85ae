//! The qmp-dispatcher behind the QEMU guest agent's wire protocol (qemu-ga 7.2 compatible).
//!
//! A guest agent written in Rust registers its commands with a [`GuestAgent`] and serves a
//! Unix socket, a virtio-serial port or a serial line; hosts (libvirt, `qmp-shell -N`) see
//! qemu-ga: no greeting, no negotiation, one command at a time, replies ending in `"\n"`,
//! `guest-sync-delimited` replies preceded by 0xFF, and a parser whose state survives
//! reconnects. The [`guide`] covers embedding, the wire differences from QMP and the
//! deviations from qemu-ga.
//!
//! ```no_run
//! use qmp_dispatcher::{Command, NoArgs};
//! use qmp_qga::GuestAgent;
//!
//! # async fn run() -> std::io::Result<()> {
//! let agent = GuestAgent::builder()
//!     .version("7.2.22")
//!     .command(Command::sync("guest-get-host-name", |_: NoArgs, _| {
//!         Ok(serde_json::json!({"host-name": "guest"}))
//!     }))
//!     .block(["guest-exec"])
//!     .build()
//!     .expect("unique command names");
//! agent.serve_serial("/dev/virtio-ports/org.qemu.guest_agent.0").await
//! # }
//! ```
//!
//! # Modules
//! - [`agent`]: the builder (which registers qemu-ga's built-ins `guest-sync`,
//!   `guest-sync-delimited`, `guest-ping` and `guest-info`), block/allow/frozen filters and
//!   the serve methods.
//! - [`codec`]: qemu-ga's framing around the dispatcher's codec; its state is handed from
//!   client to client.
//! - [`serial`]: character devices with no connect or disconnect.

pub mod agent;
pub mod codec;
mod commands;
pub mod serial;

/// The guest agent guide (`docs/qga.md`); its Rust snippets are compiled as doctests.
#[doc = include_str!("../docs/qga.md")]
pub mod guide {}

pub use agent::{
    BuildError, FROZEN_ALLOWED, FROZEN_REASON, GuestAgent, GuestAgentBuilder, NOT_ALLOWED_REASON,
    ParserState, minimal_agent,
};
pub use codec::GuestAgentCodec;
pub use commands::SENTINEL;
pub use serial::{EOF_RETRY, SerialPort};
