//! Server side of the QEMU Machine Protocol (QMP) for a virtual machine monitor.
//!
//! A VMM registers its commands in a [`Registry`], builds a [`Server`] and serves it on Unix
//! or TCP sockets (or any byte stream). Clients that did not opt in see exactly QEMU's
//! monitor; clients that negotiate the `async` capability may keep many commands in flight
//! and get each reply as it completes. Handlers answer through a [`QmpReturn`], at once or
//! later, from any task or thread. See `docs/protocol.md` and `docs/embedding.md`.
//!
//! # Layout
//! - [`wire`]: bytes to messages and back (JSON decoder with QEMU's rules, request
//!   validation, reply and event encoding).
//! - [`registry`]: the command table and the typed handler constructors.
//! - [`args`]: typed arguments with QEMU's argument-error texts.
//! - [`mod@qmp_return`]: the reply owed to one request.
//! - `in_flight`: each client's slab of commands awaiting a reply.
//! - `session`: one client's protocol state machine.
//! - [`events`]: broadcast events with timestamps and throttling.
//! - `connection`: the per-client task.
//! - [`server`], [`transport`], [`config`]: listeners, limits and shutdown.
//! - `unix_socket`: [`bind_unix`], owner-only and never over a live socket.
#![warn(missing_docs)]

pub mod args;
pub mod config;
mod connection;
pub mod error;
pub mod events;
mod in_flight;
pub mod qmp_return;
pub mod registry;
pub mod server;
mod session;
pub mod transport;
mod unix_socket;
pub mod wire;

pub use args::NoArgs;
pub use config::{Config, Dialect, VersionInfo};
pub use error::{ErrorClass, QmpError, RegisterError};
pub use events::{Events, Throttle};
pub use qmp_return::QmpReturn;
pub use registry::{Command, CommandInfo, Handler, Registry, RegistryBuilder};
pub use server::{Admitted, ConnectionParts, Server, ServerBuilder, Stats};
pub use transport::{ByteStream, Pipes, Transport};
pub use unix_socket::bind_unix;
pub use wire::{Message, QmpCodec, ServerCodec};
