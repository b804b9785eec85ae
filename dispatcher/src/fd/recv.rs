//! Reading a Unix socket with `recvmsg`, taking the SCM_RIGHTS fds that came with the bytes
//! and the byte they came with.
//!
//! Linux hands a `sendmsg`'s fds to the `recvmsg` that reads the first byte of it, but one
//! `recvmsg` also takes the fd-less bytes queued before that `sendmsg`, so a large read
//! does not say which of its bytes the fds came with. QEMU avoids the question by reading one
//! byte per call. This reader reads in large pieces until a connection first passes fds;
//! from then on it peeks before each read, and when fds are queued it reads up to them one
//! byte at a time (at most [`STEP_LIMIT`] bytes), so each fd is placed on the first byte of
//! its `sendmsg` exactly. A connection that never passes fds pays nothing for this.
//!
//! Every fd is received with close-on-exec set (`MSG_CMSG_CLOEXEC`), and its `O_NONBLOCK`
//! flag is cleared, as QEMU does: a handler gets a blocking fd whatever the client used.
//! (The flag lives on the open file description, so the client's own copy changes too.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bytes::BytesMut;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{MsgFlags, recvmsg};

/// Bytes a peeked read steps through one at a time to find the byte its fds came with.
/// Beyond this, the fds are placed on the first byte of the next read (a client would
/// have to queue this much ahead of an fd without waiting for replies).
pub const STEP_LIMIT: usize = 512;

/// The largest read, whatever room the buffer has.
const MAX_READ: usize = 64 * 1024;

/// The smallest read offered. recvmsg needs initialised memory, so each read zeroes the room
/// it offers; offering twice the last read (at least this) keeps that cost in proportion to
/// what arrives, while a bulk sender reaches [`MAX_READ`] in a few reads.
const MIN_READ: usize = 1024;

/// A connection's receiving state: whether it reads exactly yet, and how much it read last.
#[derive(Debug)]
pub struct RecvState {
    /// The connection has passed fds: find the exact byte of every later arrival.
    exact: bool,
    /// Bytes the last read brought.
    last: usize,
}

thread_local! {
    /// Room for the most fds Linux lets one message carry, so that a message over the
    /// server's own cap still hands every fd over to be closed. One per thread, not per
    /// connection: it is filled and parsed within one call.
    static CONTROL: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(vec![0u8; cmsg_align(HEADER) + SCM_MAX_FD * size_of::<RawFd>()]);
}

impl Default for RecvState {
    fn default() -> Self {
        RecvState::new()
    }
}

/// Linux's `SCM_MAX_FD`: no message carries more.
const SCM_MAX_FD: usize = 253;

/// `sizeof(struct cmsghdr)`.
const HEADER: usize = size_of::<nix::libc::cmsghdr>();

/// `CMSG_ALIGN`.
fn cmsg_align(len: usize) -> usize {
    len.div_ceil(size_of::<usize>()) * size_of::<usize>()
}

impl RecvState {
    /// A fresh reader. (The cap on fds per message is the session's to enforce: the
    /// reader takes every fd the kernel hands over, so that none is left unclosed.)
    pub fn new() -> Self {
        RecvState {
            exact: false,
            last: 0,
        }
    }

    /// Whether the connection has passed fds, so reads now peek first.
    pub fn is_exact(&self) -> bool {
        self.exact
    }
}

/// What one read brought: bytes appended to the buffer, and the fds that came with one of
/// them.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Received {
    /// Bytes appended; 0 means end of stream.
    pub len: usize,
    /// Index, among the appended bytes, of the byte the fds came with (0 when there are
    /// none).
    pub fds_at: usize,
    /// The fds, close-on-exec and blocking.
    pub fds: Vec<OwnedFd>,
    /// The kernel could not hand every fd over (`MSG_CTRUNC`: this process is out of fds);
    /// those it could are in `fds`, it closed the rest. The caller refuses the arrival.
    pub truncated: bool,
    /// The read took less than it offered: the socket's queue is empty now, so the caller
    /// may wait for the next readiness edge instead of reading again to hear `WouldBlock`.
    pub drained: bool,
}

impl Received {
    /// Plain bytes without fds: what any other transport reads.
    pub fn bytes(len: usize) -> Self {
        Received {
            len,
            ..Received::default()
        }
    }

    /// True when fds arrived (or were refused for being too many).
    pub fn has_fds(&self) -> bool {
        !self.fds.is_empty() || self.truncated
    }
}

/// Reads from a non-blocking Unix stream socket into `buf`'s spare room (at most
/// [`MAX_READ`]), taking fds as the module describes. `WouldBlock` when nothing is queued.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut BytesMut,
    state: &mut RecvState,
) -> io::Result<Received> {
    let offer = (2 * state.last).clamp(MIN_READ, MAX_READ);
    let room = (buf.capacity() - buf.len()).clamp(1, offer);
    let received = read_offering(socket, buf, room, state)?;
    state.last = received.len;
    Ok(received)
}

/// One read offering `room` bytes: plain until the connection passes fds, exact after.
fn read_offering(
    socket: BorrowedFd<'_>,
    buf: &mut BytesMut,
    room: usize,
    state: &mut RecvState,
) -> io::Result<Received> {
    if !state.exact {
        let mut received = read_into(socket, buf, room)?;
        if received.has_fds() {
            state.exact = true;
        }
        // Linux ends a read after the message that brings fds, queued data or not; without
        // fds a read ends short only on an empty queue.
        received.drained = received.len > 0 && received.len < room && !received.has_fds();
        return Ok(received);
    }
    let peeked = peek(socket, buf, room)?;
    if peeked.len == 0 {
        return Ok(Received::bytes(0));
    }
    if !peeked.has_fds() {
        // Nothing queued up to `peeked.len` carries fds; reading that much reads no more.
        // The peek ended short without reaching any fds: the queue held no more.
        let mut received = read_into(socket, buf, peeked.len)?;
        received.drained = received.len == peeked.len && peeked.len < room;
        return Ok(received);
    }
    // Bytes may be left behind the fds' byte: never drained.
    step_to_fds(socket, buf, peeked.len)
}

/// Reads one byte at a time until the byte that brings the fds, then returns it with them.
fn step_to_fds(socket: BorrowedFd<'_>, buf: &mut BytesMut, peeked: usize) -> io::Result<Received> {
    let mut stepped = 0;
    let steps = peeked.min(STEP_LIMIT);
    while stepped < steps {
        let received = match read_into(socket, buf, 1) {
            // Bytes already taken must reach the caller; EOF or the error recurs next time.
            Err(_) | Ok(Received { len: 0, .. }) if stepped > 0 => {
                return Ok(Received::bytes(stepped));
            }
            Ok(received) => received,
            Err(e) => return Err(e),
        };
        if received.has_fds() {
            return Ok(Received {
                len: stepped + 1,
                fds_at: stepped,
                ..received
            });
        }
        if received.len == 0 {
            return Ok(received);
        }
        stepped += 1;
    }
    if stepped == peeked {
        // The fds lie beyond what was peeked.
        return Ok(Received::bytes(stepped));
    }
    // Stepped out: the rest is read at once, and its fds placed on its first byte.
    let rest = match read_into(socket, buf, peeked - stepped) {
        Ok(rest) => rest,
        Err(_) if stepped > 0 => return Ok(Received::bytes(stepped)),
        Err(e) => return Err(e),
    };
    Ok(Received {
        len: stepped + rest.len,
        fds_at: stepped,
        ..rest
    })
}

/// Peeks at up to `room` queued bytes: how many there are up to the first fd-carrying
/// message, and whether one is among them. The peeked fds are copies and closed at once.
fn peek(socket: BorrowedFd<'_>, buf: &mut BytesMut, room: usize) -> io::Result<Received> {
    let start = buf.len();
    let received = receive(socket, buf, room, MsgFlags::MSG_PEEK);
    buf.truncate(start);
    received
}

/// One `recvmsg` of at most `room` bytes, appended to `buf`.
fn read_into(socket: BorrowedFd<'_>, buf: &mut BytesMut, room: usize) -> io::Result<Received> {
    receive(socket, buf, room, MsgFlags::empty())
}

fn receive(
    socket: BorrowedFd<'_>,
    buf: &mut BytesMut,
    room: usize,
    flags: MsgFlags,
) -> io::Result<Received> {
    CONTROL.with_borrow_mut(|control| receive_with(socket, buf, room, control, flags))
}

fn receive_with(
    socket: BorrowedFd<'_>,
    buf: &mut BytesMut,
    room: usize,
    control: &mut [u8],
    flags: MsgFlags,
) -> io::Result<Received> {
    let start = buf.len();
    // recvmsg needs initialised memory (see `MIN_READ`).
    buf.resize(start + room, 0);
    let flags = flags | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT;
    // Zeroed, so that bytes a call did not write read as no message.
    control.fill(0);
    let mut iov = [io::IoSliceMut::new(&mut buf[start..])];
    let result = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(control), flags)
        .map(|msg| (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC)));
    let (len, truncated) = match result {
        Ok(received) => received,
        Err(errno) => {
            buf.truncate(start);
            return Err(errno.into());
        }
    };
    // Read from the buffer directly: nix refuses to parse a truncated one, and the fds it
    // does hold are ours to close.
    let mut fds: Vec<OwnedFd> = rights(control).into_iter().map(adopt).collect();
    buf.truncate(start + len);
    if !flags.contains(MsgFlags::MSG_PEEK) {
        for fd in &fds {
            clear_nonblocking(fd.as_fd());
        }
    } else {
        // Peeked fds only say that fds are queued; the real read brings its own copies.
        let peeked = !fds.is_empty();
        fds.clear();
        if peeked {
            return Ok(Received {
                len,
                truncated: true,
                ..Received::default()
            });
        }
    }
    Ok(Received {
        len,
        fds,
        truncated,
        ..Received::default()
    })
}

/// The fds of the SCM_RIGHTS messages in a control buffer the kernel filled.
fn rights(control: &[u8]) -> Vec<RawFd> {
    let mut fds = Vec::new();
    let mut at = 0;
    while at + HEADER <= control.len() {
        let word = |offset: usize, width: usize| &control[at + offset..at + offset + width];
        let len = usize::from_ne_bytes(word(0, size_of::<usize>()).try_into().expect("width"));
        let level_at = size_of::<usize>();
        let level = i32::from_ne_bytes(word(level_at, 4).try_into().expect("width"));
        let kind = i32::from_ne_bytes(word(level_at + 4, 4).try_into().expect("width"));
        if len < HEADER {
            break;
        }
        let end = (at + len).min(control.len());
        if level == nix::libc::SOL_SOCKET && kind == nix::libc::SCM_RIGHTS {
            let data = &control[at + HEADER..end];
            fds.extend(
                data.chunks_exact(size_of::<RawFd>())
                    .map(|raw| RawFd::from_ne_bytes(raw.try_into().expect("width"))),
            );
        }
        at += cmsg_align(len);
    }
    fds
}

/// Takes ownership of an fd the kernel has just installed in this process.
#[allow(unsafe_code)]
fn adopt(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` comes from an SCM_RIGHTS message this process just received: the kernel
    // installed it for us, it is open, and nothing else in the process knows its number.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Clears `O_NONBLOCK`, as QEMU does for every fd it receives.
fn clear_nonblocking(fd: BorrowedFd<'_>) {
    if let Ok(bits) = fcntl(fd, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_retain(bits);
        if flags.contains(OFlag::O_NONBLOCK) {
            let _ = fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use nix::sys::socket::{ControlMessage, sendmsg};

    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn send(socket: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let iov = [io::IoSlice::new(bytes)];
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
        sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    /// Reads everything queued, as (bytes, [(absolute offset, fd count)]).
    fn drain(socket: &UnixStream, state: &mut RecvState) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut buf = BytesMut::with_capacity(4096);
        let mut arrivals = Vec::new();
        loop {
            let before = buf.len();
            match recv_with_fds(socket.as_fd(), &mut buf, state) {
                Ok(r) if r.len == 0 => break,
                Ok(r) => {
                    if r.has_fds() {
                        arrivals.push((before + r.fds_at, r.fds.len()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            if buf.capacity() - buf.len() < 16 {
                buf.reserve(4096);
            }
        }
        (buf.to_vec(), arrivals)
    }

    #[test]
    fn fds_are_placed_on_the_first_byte_of_their_sendmsg_once_exact() {
        let (client, server) = pair();
        let (_r, w) = pipe();
        let mut state = RecvState::default();
        // The first arrival switches the connection to exact reads.
        send(&client, b" ", &[w.as_fd()]);
        let (bytes, arrivals) = drain(&server, &mut state);
        assert_eq!(
            (bytes.as_slice(), arrivals.as_slice()),
            (&b" "[..], &[(0, 1)][..])
        );
        assert!(state.is_exact());
        // Fd-less bytes queued before an fd message no longer hide its position.
        send(&client, b"{\"execute\": \"getfd\"}", &[]);
        send(&client, b" ", &[w.as_fd()]);
        send(&client, b"{\"x\": 1}", &[w.as_fd(), w.as_fd()]);
        send(&client, b"tail", &[]);
        let (bytes, arrivals) = drain(&server, &mut state);
        assert_eq!(bytes, b"{\"execute\": \"getfd\"} {\"x\": 1}tail");
        assert_eq!(arrivals, [(20, 1), (21, 2)]);
    }

    /// `drained` lets the caller skip the read that would find the queue empty, so it must
    /// never be set while data is still queued: that data would wait for an edge that has
    /// already passed.
    #[test]
    fn only_a_read_that_emptied_the_queue_says_so() {
        let (client, server) = pair();
        let (_r, w) = pipe();
        let mut state = RecvState::default();
        let mut buf = BytesMut::with_capacity(4096);
        let mut read =
            |state: &mut RecvState| recv_with_fds(server.as_fd(), &mut buf, state).unwrap();
        send(&client, b"plain", &[]);
        let plain = read(&mut state);
        assert!(plain.len == 5 && plain.drained);
        // Linux ends a read after a message with fds, whatever follows it.
        send(&client, b"ab", &[w.as_fd()]);
        send(&client, b"cd", &[]);
        let with_fds = read(&mut state);
        assert!(with_fds.has_fds() && with_fds.len == 2 && !with_fds.drained);
        // Exact reads: up to the byte that brings the next fds, then what is left.
        send(&client, b"ef", &[w.as_fd()]);
        let stepped = read(&mut state);
        assert!(stepped.has_fds() && stepped.len == 3 && !stepped.drained);
        let last = read(&mut state);
        assert!(last.len == 1 && last.drained, "{last:?}");
        assert_eq!(&buf[..], b"plainabcdef");
    }

    #[test]
    fn received_fds_are_cloexec_and_blocking() {
        let (client, server) = pair();
        let (_r, w) = pipe();
        let flags = OFlag::from_bits_retain(fcntl(w.as_fd(), FcntlArg::F_GETFL).unwrap());
        fcntl(w.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
        send(&client, b"x", &[w.as_fd()]);
        let mut buf = BytesMut::with_capacity(64);
        let received = recv_with_fds(server.as_fd(), &mut buf, &mut RecvState::default()).unwrap();
        let fd = &received.fds[0];
        let fl = OFlag::from_bits_retain(fcntl(fd.as_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(!fl.contains(OFlag::O_NONBLOCK));
        let fdfl = fcntl(fd.as_fd(), FcntlArg::F_GETFD).unwrap();
        assert_ne!(fdfl & libc_fd_cloexec(), 0);
    }

    fn libc_fd_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }

    #[test]
    fn every_fd_of_a_large_message_is_taken() {
        let (client, server) = pair();
        let (_r, w) = pipe();
        let fds: Vec<BorrowedFd<'_>> = (0..SCM_MAX_FD).map(|_| w.as_fd()).collect();
        send(&client, b"x", &fds);
        let mut buf = BytesMut::with_capacity(64);
        let received = recv_with_fds(server.as_fd(), &mut buf, &mut RecvState::new()).unwrap();
        assert!(!received.truncated);
        assert_eq!(received.fds.len(), SCM_MAX_FD);
    }

    #[test]
    fn a_long_prefix_is_stepped_through_only_up_to_the_limit() {
        let (client, server) = pair();
        let (_r, w) = pipe();
        let mut state = RecvState::default();
        send(&client, b" ", &[w.as_fd()]);
        drain(&server, &mut state);
        let prefix = vec![b' '; STEP_LIMIT + 100];
        send(&client, &prefix, &[]);
        send(&client, b"{}", &[w.as_fd()]);
        let (bytes, arrivals) = drain(&server, &mut state);
        assert_eq!(bytes.len(), STEP_LIMIT + 102);
        // Placed at or before the exact byte, never after it.
        assert_eq!(arrivals.len(), 1);
        assert!(arrivals[0].0 <= STEP_LIMIT + 100, "{arrivals:?}");
    }
}
