//! Which command gets which fd: the positional rule.
//!
//! QEMU keeps one pending slot per connection: the fds of the latest message that carried
//! any. A newer arrival closes and replaces them, and the next `getfd` or `add-fd` to run
//! takes the first and closes the rest. QEMU fills the slot when it reads the first byte of
//! the fds' `sendmsg`; with `oob` off it stops reading after each command until that command
//! has answered, so the slot then holds exactly the fds that arrived before the command's
//! last byte.
//!
//! This server reads ahead, so it keeps each arrival queued at its byte position and moves
//! it into the slot only when the stream has been processed up to it: the slot a command
//! sees is always the one QEMU with `oob` off would show it, however far ahead the input
//! was read, and for every client (pipelined, `oob`, `async`). Sans-IO: the connection says
//! where fds arrived ([`PositionalFds::arrive`]) and how far the stream has been processed
//! ([`PositionalFds::reach`]); the session takes fds for `getfd`/`add-fd`
//! ([`PositionalFds::take`]).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use crate::error::QmpError;

/// QEMU's error when `getfd` or `add-fd` finds the slot empty.
pub(crate) const NO_FD: &str = "No file descriptor supplied via SCM_RIGHTS";

/// Why an arrival was refused: its fds were closed on arrival, and the command that would
/// have taken them says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The message carried more fds than one message may.
    TooManyInMessage(usize),
    /// The connection already held its limit of unclaimed fds.
    TooManyPending(usize),
}

impl Refusal {
    fn error(self) -> QmpError {
        QmpError::generic(match self {
            Refusal::TooManyInMessage(limit) => format!(
                "File descriptors refused: a message may carry at most {limit}, and their \
                 message carried more"
            ),
            Refusal::TooManyPending(limit) => format!(
                "File descriptors refused: the connection already held {limit} file \
                 descriptors not claimed by getfd or add-fd"
            ),
        })
    }
}

/// What an arrival brings into the slot.
#[derive(Debug)]
enum Contents {
    Fds(Vec<OwnedFd>),
    Refused(Refusal),
}

#[derive(Debug)]
struct Arrival {
    /// Stream offset of the byte the fds came with.
    position: u64,
    contents: Contents,
}

/// One connection's received fds: those queued at their positions, and the slot.
#[derive(Debug)]
pub(crate) struct PositionalFds {
    /// Arrivals the stream has not been processed up to, in position order.
    queued: VecDeque<Arrival>,
    /// QEMU's pending slot.
    slot: Option<Contents>,
    /// Fds held in `queued` and `slot` together.
    held: usize,
    /// Cap on `held`.
    limit: usize,
    /// Cap on fds per message.
    per_message: usize,
}

impl PositionalFds {
    /// Holds at most `limit` unclaimed fds, and refuses a message with more than
    /// `per_message`.
    pub(crate) fn new(limit: usize, per_message: usize) -> Self {
        PositionalFds {
            queued: VecDeque::new(),
            slot: None,
            held: 0,
            limit,
            per_message,
        }
    }

    /// Fds arrived with the byte at `position`. `truncated` means the message carried more
    /// than the reader had room for. A refused arrival's fds are closed now; it still
    /// replaces the slot when reached, so the command that would take them learns why.
    pub(crate) fn arrive(&mut self, position: u64, fds: Vec<OwnedFd>, truncated: bool) {
        let contents = if truncated || fds.len() > self.per_message {
            Contents::Refused(Refusal::TooManyInMessage(self.per_message))
        } else if self.held + fds.len() > self.limit {
            Contents::Refused(Refusal::TooManyPending(self.limit))
        } else if fds.is_empty() {
            return;
        } else {
            self.held += fds.len();
            Contents::Fds(fds)
        };
        if let Contents::Refused(_) = contents {
            tracing::warn!(position, "refused file descriptors passed by a client");
            // Consecutive refusals keep the first: it is reached first, and each later one
            // would only replace it with itself. This bounds the queue.
            if matches!(
                self.queued.back(),
                Some(Arrival {
                    contents: Contents::Refused(_),
                    ..
                })
            ) {
                return;
            }
        }
        debug_assert!(self.queued.back().is_none_or(|a| a.position <= position));
        self.queued.push_back(Arrival { position, contents });
    }

    /// The stream has been processed up to (not including) byte `position`: every arrival
    /// before it enters the slot in turn, each closing the fds it replaces.
    pub(crate) fn reach(&mut self, position: u64) {
        while self.queued.front().is_some_and(|a| a.position < position) {
            let arrival = self.queued.pop_front().expect("checked above");
            self.replace_slot(Some(arrival.contents));
        }
    }

    /// `getfd`/`add-fd`: the first fd of the slot; the rest are closed and the slot emptied,
    /// whatever the command then does with the fd.
    pub(crate) fn take(&mut self) -> Result<OwnedFd, QmpError> {
        match self.slot.take() {
            None => Err(QmpError::generic(NO_FD)),
            Some(Contents::Refused(refusal)) => Err(refusal.error()),
            Some(Contents::Fds(fds)) => {
                self.held -= fds.len();
                let mut fds = fds.into_iter();
                let first = fds.next().expect("an arrival holds at least one fd");
                Ok(first)
            }
        }
    }

    /// Closes everything: the connection ends.
    pub(crate) fn clear(&mut self) {
        self.queued.clear();
        self.slot = None;
        self.held = 0;
    }

    /// Fds held, queued or pending.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Fds in the slot now.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        match &self.slot {
            Some(Contents::Fds(fds)) => fds.len(),
            _ => 0,
        }
    }

    fn replace_slot(&mut self, contents: Option<Contents>) {
        if let Some(Contents::Fds(old)) = std::mem::replace(&mut self.slot, contents) {
            self.held -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// A pipe's write end, and a probe that says whether every copy of it is closed.
    fn pipe() -> (OwnedFd, impl Fn() -> bool) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let closed = move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::ZERO).unwrap();
            fds[0]
                .revents()
                .is_some_and(|e| e.contains(PollFlags::POLLHUP))
        };
        (w, closed)
    }

    fn fds() -> PositionalFds {
        PositionalFds::new(64, 16)
    }

    #[test]
    fn an_empty_slot_gives_qemus_error() {
        assert_eq!(fds().take().unwrap_err().desc, NO_FD);
    }

    #[test]
    fn arrivals_wait_for_their_position() {
        let mut p = fds();
        let (a, a_closed) = pipe();
        let (b, b_closed) = pipe();
        let (a_raw, b_raw) = (a.as_raw_fd(), b.as_raw_fd());
        p.arrive(10, vec![a], false);
        p.arrive(30, vec![b], false);
        // A command ending at 20 sees A only; B is still queued behind it.
        p.reach(20);
        assert_eq!(p.take().unwrap().as_raw_fd(), a_raw);
        assert!(a_closed());
        p.reach(40);
        assert_eq!(p.take().unwrap().as_raw_fd(), b_raw);
        assert!(b_closed());
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn a_later_arrival_closes_the_pending_one_when_reached() {
        let mut p = fds();
        let (a, a_closed) = pipe();
        let (b, _b_closed) = pipe();
        let b_raw = b.as_raw_fd();
        p.arrive(0, vec![a], false);
        p.reach(1);
        p.arrive(1, vec![b], false);
        assert!(!a_closed(), "B is not reached yet");
        p.reach(2);
        assert!(a_closed());
        assert_eq!(p.take().unwrap().as_raw_fd(), b_raw);
    }

    #[test]
    fn take_keeps_the_first_and_closes_the_rest() {
        let mut p = fds();
        let (a, a_closed) = pipe();
        let (b, b_closed) = pipe();
        p.arrive(0, vec![a, b], false);
        p.reach(1);
        let first = p.take().unwrap();
        assert!(b_closed());
        assert!(!a_closed());
        drop(first);
        assert!(a_closed());
        assert_eq!(p.take().unwrap_err().desc, NO_FD);
    }

    #[test]
    fn refusals_are_explained_to_the_command_that_reaches_them() {
        let mut p = PositionalFds::new(2, 16);
        let (a, _) = pipe();
        let (b, b_closed) = pipe();
        let (c, c_closed) = pipe();
        p.arrive(0, vec![a], false);
        p.arrive(1, vec![b, c], false);
        assert!(b_closed() && c_closed(), "refused on arrival");
        p.reach(2);
        let error = p.take().unwrap_err();
        assert!(error.desc.contains("already held 2"), "{}", error.desc);
        p.arrive(3, vec![], true);
        p.arrive(4, vec![], true);
        assert_eq!(p.queued.len(), 1);
        p.reach(5);
        assert!(p.take().unwrap_err().desc.contains("at most 16"));
    }

    #[test]
    fn clear_closes_queued_and_pending() {
        let mut p = fds();
        let (a, a_closed) = pipe();
        let (b, b_closed) = pipe();
        p.arrive(0, vec![a], false);
        p.reach(1);
        p.arrive(5, vec![b], false);
        assert_eq!((p.pending(), p.held()), (1, 2));
        p.clear();
        assert!(a_closed() && b_closed());
    }
}
