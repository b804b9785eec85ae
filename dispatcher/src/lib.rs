//! Server side of the QEMU Machine Protocol (QMP) for a virtual machine monitor.
//!
//! A VMM registers its commands in a [`Registry`], builds a [`Server`] and serves it on Unix
//! or TCP sockets (or any byte stream). Clients that did not opt in see exactly QEMU's
//! monitor; clients that negotiate the `async` capability may keep many commands in flight
//! and get each reply as it completes. Handlers answer through a [`QmpReturn`], at once or
//! later, from any task or thread.
//!
//! # Quick start
//!
//! A quick command, a deferred one, an event, served on a Unix socket, and a client that
//! negotiates and runs them:
//!
//! ```
//! use std::time::Duration;
//!
//! use qmp_dispatcher::{Command, Events, NoArgs, QmpReturn, Registry, Server, bind_unix};
//! use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
//!
//! #[derive(serde::Deserialize, schemars::JsonSchema)]
//! #[serde(rename_all = "kebab-case", deny_unknown_fields)]
//! struct DelayArgs {
//!     ms: u64,
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Handlers are made before the server: give them an event handle now.
//!     let events = Events::new();
//!     let stop_events = events.clone();
//!
//!     let mut registry = Registry::builder(); // holds qmp_capabilities & co. already
//!     registry
//!         // Answers at once, on the connection task.
//!         .add(Command::sync("query-status", |_: NoArgs, _| {
//!             Ok(serde_json::json!({"running": true, "status": "running"}))
//!         }))?
//!         // Emits an event, then answers; `()` is answered as `{}`, as QEMU does.
//!         .add(Command::sync("stop", move |_: NoArgs, _| {
//!             stop_events.emit("STOP", None);
//!             Ok(())
//!         }))?
//!         // Keeps its QmpReturn and answers later from a blocking thread.
//!         .add(Command::deferred("x-delay", |args: DelayArgs, _, ret: QmpReturn| {
//!             ret.spawn_blocking(move |ret| {
//!                 std::thread::sleep(Duration::from_millis(args.ms));
//!                 ret.reply(Ok(()));
//!             });
//!         }))?;
//!     let server = Server::builder(registry.build()).events(events).build();
//!
//!     let dir = tempfile::tempdir()?;
//!     let path = dir.path().join("qmp.sock");
//!     let listener = bind_unix(&path, 0o600)?; // owner only: whoever connects controls the VM
//!     let serving = tokio::spawn({
//!         let server = server.clone();
//!         async move { server.serve(listener).await }
//!     });
//!
//!     // A client: greeting, negotiation, then commands.
//!     let (input, mut output) = tokio::net::UnixStream::connect(&path).await?.into_split();
//!     let mut lines = BufReader::new(input).lines();
//!     let greeting = lines.next_line().await?.unwrap_or_default();
//!     assert!(greeting.starts_with(r#"{"QMP": {"version": "#));
//!     output.write_all(br#"{"execute": "qmp_capabilities"}"#).await?;
//!     assert_eq!(lines.next_line().await?.unwrap_or_default(), r#"{"return": {}}"#);
//!
//!     output.write_all(br#"{"execute": "query-status", "id": 1}"#).await?;
//!     let status = lines.next_line().await?.unwrap_or_default();
//!     assert_eq!(status, r#"{"return": {"running":true,"status":"running"}, "id": 1}"#);
//!
//!     output.write_all(br#"{"execute": "x-delay", "arguments": {"ms": 10}, "id": 2}"#).await?;
//!     assert_eq!(lines.next_line().await?.unwrap_or_default(), r#"{"return": {}, "id": 2}"#);
//!
//!     output.write_all(br#"{"execute": "stop", "id": 3}"#).await?;
//!     let event = lines.next_line().await?.unwrap_or_default();
//!     assert!(event.contains(r#""event": "STOP""#), "{event}");
//!     assert_eq!(lines.next_line().await?.unwrap_or_default(), r#"{"return": {}, "id": 3}"#);
//!
//!     // Stop accepting, cancel what is in flight, close every connection, and wait.
//!     server.shutdown();
//!     server.wait().await;
//!     serving.await??;
//!     Ok(())
//! }
//! ```
//!
//! The example needs tokio's `rt-multi-thread` and `macros` features (and `tempfile` for the
//! scratch directory); `dispatcher/examples/minimal_vmm.rs` is a runnable VMM monitor.
//!
//! # Guides
//! - [`guide::embedding`]: registering commands, typed arguments, deferred replies,
//!   cancellation, events, limits, serving and shutting down.
//! - [`guide::protocol`]: the wire protocol, QEMU's and the `async` capability.
//! - [`guide::design`]: how the server is built and why.
//! - [`guide::security`]: the threat model and what the server does about it.
//!
//! # Modules
//! - [`wire`]: bytes to messages and back (JSON decoder with QEMU's rules, request
//!   validation, reply and event encoding, the [`QmpCodec`]).
//! - [`registry`]: the command table and the typed handler constructors.
//! - [`args`]: typed arguments with QEMU's argument-error texts.
//! - [`schema`]: `query-qmp-schema`, derived from the handlers' Rust types.
//! - [`mod@qmp_return`]: the reply owed to one request.
//! - [`events`]: broadcast events with timestamps and throttling.
//! - [`fd`]: file descriptors passed over Unix sockets (`getfd`, `add-fd`, `/dev/fdset/N`).
//! - [`job`]: jobs (QEMU's `job-*` life cycle), deferred commands as their special case.
//! - [`server`], [`transport`], [`config`]: serving, byte streams, limits and shutdown.
//! - [`context`]: what a handler knows about its request and client.
//! - [`policy`]: which commands and events a listener offers.
//! - [`observe`]: metrics and the audit trail.
//! - [`error`]: QMP error replies and registration errors.
#![warn(missing_docs)]

pub mod args;
pub mod config;
mod connection;
pub mod context;
pub(crate) mod counter;
pub mod error;
pub mod events;
pub mod fd;
mod in_flight;
pub mod job;
pub mod observe;
pub mod policy;
pub mod qmp_return;
mod rate;
pub mod registry;
pub mod schema;
pub mod server;
mod session;
pub mod transport;
mod unix_socket;
pub mod wire;

pub mod guide {
    //! The project's guides from `docs/`, rendered here. Their Rust snippets are compiled
    //! (and run, unless marked `no_run`) as doctests of this crate.

    #[doc = include_str!("../docs/embedding.md")]
    pub mod embedding {}

    #[doc = include_str!("../docs/protocol.md")]
    pub mod protocol {}

    #[doc = include_str!("../docs/design.md")]
    pub mod design {}

    #[doc = include_str!("../docs/security.md")]
    pub mod security {}
}

/// The README's Rust snippets, compiled as doctests. The README itself is the package's
/// front page; the crate documentation above stands on its own.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use args::NoArgs;
pub use async_trait::async_trait;
pub use config::{Config, Dialect, VersionInfo};
pub use context::{Capabilities, ClientInfo, Context, PeerCredentials, RequestContext};
pub use error::{ErrorClass, QmpError, RegisterError};
pub use events::{Emit, Events, Throttle};
pub use fd::{Access, FdLimits, FdsetFile};
pub use job::{JobDriver, JobHandle, JobInfo, JobOptions, JobStatus};
pub use policy::Policy;
pub use qmp_return::{IntoReply, QmpReturn, ReplyError};
pub use registry::{Command, CommandInfo, Handler, QmpCommand, Registry, RegistryBuilder};
pub use schema::{JsonSchema, SchemaInfo, TypeDesc};
/// The JSON Schema crate the schema is derived with, for `#[schemars(crate = "qmp_dispatcher::schemars")]`
/// in crates that derive [`JsonSchema`] without depending on it.
pub use schemars;
pub use server::{Admitted, ConnectionParts, Server, ServerBuilder, Stats};
/// Returned by [`QmpReturn::cancellation_token`]: cancelled with its request.
pub use tokio_util::sync::CancellationToken;
pub use transport::{ByteStream, Pipes, Transport};
pub use unix_socket::bind_unix;
pub use wire::{Message, QmpCodec, ServerCodec};
