//! Reusable QEMU-style QMP command handlers for a VMM built on `qmp-dispatcher`.

pub mod display;
