//! Reusable QEMU-style QMP command handlers for a VMM built on `qmp-dispatcher`, and the
//! `qmp-demo` monitor built from them.
//!
//! # Layout
//! - [`run_state`]: `query-status`, `stop`, `cont`, `system_powerdown`, `quit` and their
//!   events.
//! - [`display`]: framebuffers, a synthetic test pattern, PPM/PNG encoding.
//! - [`screendump`]: the deferred, cancellable `screendump` command.
//! - [`misc`]: `query-yank`, `x-delay`.
//! - [`demo`]: the registry and server of the `qmp-demo` binary.

pub mod demo;
pub mod display;
pub mod misc;
pub mod run_state;
pub mod screendump;
