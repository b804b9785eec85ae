//! File descriptors passed by clients over Unix sockets (SCM_RIGHTS), as QEMU's monitor
//! takes them: `getfd`/`closefd` name fds per connection, `add-fd`/`remove-fd`/`query-fdsets`
//! keep server-wide fd sets that handlers open as `/dev/fdset/N`.
//!
//! The pieces, one concern each:
//! - [`recv`]: reading a Unix socket with `recvmsg`, taking the fds that came with the bytes.
//! - `positional`: which command gets which fd: fds are attached to the byte position where
//!   they arrived and become the connection's pending fds when the decoder reaches it.
//! - `named`: one connection's named fds (`getfd`, `closefd`).
//! - `sets`: the server's fd sets (`add-fd`, `remove-fd`, `query-fdsets`, `/dev/fdset/N`).
//!
//! Every fd is held as an [`OwnedFd`](std::os::fd::OwnedFd), so whatever path drops it
//! (a replaced pending fd, a failed `getfd`, a disconnect) closes it.

pub mod recv;

pub(crate) mod commands;
pub(crate) mod named;
pub(crate) mod positional;
pub(crate) mod sets;

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::error::QmpError;

pub use recv::{Received, RecvState};
pub use sets::{Access, FdsetFile, is_fdset_path};

/// The caps on passed file descriptors. QEMU has only the first; the others bound what one
/// client can make the server hold. Each refusal is a clear error, never a silent leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FdLimits {
    /// Fds one `sendmsg` may carry: QEMU's `TCP_MAX_FDS`, 16. A message with more is refused
    /// whole: its fds are closed and the next `getfd`/`add-fd` says why.
    pub per_message: usize,
    /// Fds one connection may hold received but not yet claimed (the pending slot plus
    /// arrivals read ahead of the decoder).
    pub pending_per_connection: usize,
    /// Named fds (`getfd`) one connection may hold.
    pub named_per_connection: usize,
    /// Fd sets a server may hold.
    pub fdsets_per_server: usize,
    /// Fds all fd sets of a server may hold together.
    pub fdset_fds_per_server: usize,
}

impl FdLimits {
    /// Sets [`per_message`](Self::per_message) (at least 1).
    pub fn per_message(mut self, fds: usize) -> Self {
        self.per_message = fds.max(1);
        self
    }

    /// Sets [`pending_per_connection`](Self::pending_per_connection).
    pub fn pending_per_connection(mut self, fds: usize) -> Self {
        self.pending_per_connection = fds;
        self
    }

    /// Sets [`named_per_connection`](Self::named_per_connection).
    pub fn named_per_connection(mut self, names: usize) -> Self {
        self.named_per_connection = names;
        self
    }

    /// Sets [`fdsets_per_server`](Self::fdsets_per_server).
    pub fn fdsets_per_server(mut self, sets: usize) -> Self {
        self.fdsets_per_server = sets;
        self
    }

    /// Sets [`fdset_fds_per_server`](Self::fdset_fds_per_server).
    pub fn fdset_fds_per_server(mut self, fds: usize) -> Self {
        self.fdset_fds_per_server = fds;
        self
    }
}

/// QEMU's per-message cap.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

impl Default for FdLimits {
    fn default() -> Self {
        FdLimits {
            per_message: MAX_FDS_PER_MESSAGE,
            pending_per_connection: 64,
            named_per_connection: 256,
            fdsets_per_server: 256,
            fdset_fds_per_server: 1024,
        }
    }
}

/// One connection's named fds, shared between its session (`getfd`, `closefd`) and its
/// handlers ([`RequestContext::take_fd`](crate::RequestContext::take_fd)).
#[derive(Debug)]
pub(crate) struct ClientFds {
    named: Mutex<named::NamedFds>,
}

impl Default for ClientFds {
    fn default() -> Self {
        ClientFds {
            named: Mutex::new(named::NamedFds::new(
                FdLimits::default().named_per_connection,
            )),
        }
    }
}

impl ClientFds {
    fn named(&self) -> std::sync::MutexGuard<'_, named::NamedFds> {
        self.named.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the cap on names (from the server's [`FdLimits`]).
    pub(crate) fn set_limit(&self, limit: usize) {
        self.named().set_limit(limit);
    }

    pub(crate) fn insert(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        self.named().insert(name, fd)
    }

    pub(crate) fn close(&self, name: &str) -> Result<(), QmpError> {
        self.named().close(name)
    }

    pub(crate) fn take(&self, name: &str) -> Result<OwnedFd, QmpError> {
        self.named().take(name)
    }

    /// Closes every named fd: the connection has ended.
    pub(crate) fn clear(&self) {
        self.named().clear();
    }
}
