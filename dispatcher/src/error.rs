//! Errors: the ones a client sees on the wire, and the ones the library returns to Rust code.

use std::fmt;

/// QEMU's error classes (`QapiErrorClass`). Clients such as the `qapi` crate accept no others,
/// so the set is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Almost every failure: QEMU reports nearly all errors with this class.
    GenericError,
    /// The command does not exist, is disabled, or capabilities are not negotiated yet.
    CommandNotFound,
    /// A device (or block job) exists but is not active.
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability (system emulators only).
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply as the client sees it: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// One of QEMU's error classes.
    pub class: ErrorClass,
    /// Human-readable description; clients show it as is.
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of nearly every QEMU failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

/// Registering a command failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisterError {
    /// A command (built-ins included) or event of that name is already registered.
    #[error("'{0}' is already registered")]
    AlreadyRegistered(String),
    /// Command and event names must be non-empty.
    #[error("command and event names must not be empty")]
    EmptyName,
    /// [`Registry::disable`](crate::Registry::disable) or `enable` named no command.
    #[error("no command '{0}'")]
    UnknownCommand(String),
    /// A command declares with [`Command::emits`](crate::Command::emits) an event the
    /// registry does not declare.
    #[error("command '{command}' emits event '{event}', which is not declared")]
    UndeclaredEvent {
        /// The command.
        command: String,
        /// The event it names.
        event: String,
    },
}
