//! Byte streams a server can serve: Unix and TCP sockets, or any `AsyncRead + AsyncWrite`.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use crate::context::PeerCredentials;
use crate::fd::{Received, RecvState};

/// A connection's byte stream, split into halves for the connection loop.
pub trait Transport: Send + 'static {
    /// The input half.
    type Reader: AsyncRead + Send + Unpin + 'static;
    /// The output half.
    type Writer: AsyncWrite + Send + Unpin + 'static;

    /// Splits the stream.
    fn split(self) -> (Self::Reader, Self::Writer);

    /// Called once when a listener accepts the stream, to set socket options.
    fn on_accept(&self) {}

    /// The peer's credentials, where the transport knows them (`SO_PEERCRED` on Unix
    /// sockets); read once when the client is admitted.
    fn peer_credentials(&self) -> Option<PeerCredentials> {
        None
    }

    /// After the client sent EOF, resolves if it has closed the connection entirely rather
    /// than only its sending side. A half-closed client still gets its replies; a departed
    /// one has its commands cancelled at once. Never resolves where the transport cannot tell.
    fn departed(reader: &Self::Reader) -> impl Future<Output = ()> + Send + '_ {
        let _ = reader;
        std::future::pending()
    }

    /// Whether the client has closed the connection entirely, asked of the kernel now.
    /// Checked before a suspended connection resumes, so a request that waited behind a
    /// running command is not started for a client that has left. False where the
    /// transport cannot tell.
    fn has_departed(reader: &Self::Reader) -> bool {
        let _ = reader;
        false
    }

    /// Reads more input into `buf`, with the file descriptors that came with it where the
    /// transport can carry them (Unix sockets, SCM_RIGHTS; see [`crate::fd::recv`]), making
    /// room in `buf` first ([`reserve_for_read`]). The default reads bytes only: on TCP and
    /// other streams no fd can arrive.
    fn read_with_fds<'a>(
        reader: &'a mut Self::Reader,
        buf: &'a mut BytesMut,
        state: &'a mut RecvState,
    ) -> impl Future<Output = io::Result<Received>> + Send + 'a {
        let _ = state;
        async move {
            reserve_for_read(buf);
            reader.read_buf(buf).await.map(Received::bytes)
        }
    }
}

/// Spare room below which a read first grows the input buffer, and by how much.
const READ_RESERVE: usize = 1024;
const READ_GROWTH: usize = 4096;

/// The largest empty input buffer a thread keeps for the next connection it reads.
const SPARE_MAX: usize = 64 * 1024;

thread_local! {
    /// An empty input buffer, handed from connection to connection on this thread: a
    /// connection takes it when data is ready and gives it back once it has decoded all it
    /// read, so a busy worker reuses one allocation and an idle connection holds none.
    static SPARE: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Makes room in `buf` for one read, taking this thread's spare buffer if `buf` has none.
/// Unix sockets call it once data is ready, so an idle connection holds no input buffer.
pub fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() == 0 {
        SPARE.with_borrow_mut(|spare| std::mem::swap(buf, spare));
    }
    if buf.capacity() - buf.len() < READ_RESERVE {
        buf.reserve(READ_GROWTH);
    }
}

/// Gives an input buffer with nothing left in it back to this thread, for the next read of
/// any connection (see [`reserve_for_read`]). A buffer that still holds input is kept.
pub fn release_input(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let buf = std::mem::take(buf);
    if buf.capacity() <= SPARE_MAX {
        SPARE.with_borrow_mut(|spare| {
            if spare.capacity() < buf.capacity() {
                *spare = buf;
            }
        });
    }
}

/// How long reading must stay paused before a Unix socket is watched for its peer's full
/// close: most commands end sooner, and a watch costs a `dup` and an epoll registration.
const DEPARTURE_GRACE: Duration = Duration::from_millis(10);

impl Transport for UnixStream {
    type Reader = unix::OwnedReadHalf;
    type Writer = unix::OwnedWriteHalf;

    fn split(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    fn peer_credentials(&self) -> Option<PeerCredentials> {
        let cred = self.peer_cred().ok()?;
        Some(PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        })
    }

    #[allow(clippy::manual_async_fn)] // The trait promises a `Send` future.
    fn departed(reader: &Self::Reader) -> impl Future<Output = ()> + Send + '_ {
        // A Unix socket whose peer closed both directions reports a hang-up (EPOLLHUP, write
        // side closed); after a mere shutdown(SHUT_WR) it does not. The kernel says so as an
        // edge on a registration of our own, a duplicate of the socket's descriptor, so that
        // clearing its readiness to wait for the next edge never touches the connection's
        // reader and writer: no timer, no polling while the client idles.
        async move {
            tokio::time::sleep(DEPARTURE_GRACE).await;
            use std::os::fd::AsFd;
            let watch = reader
                .as_ref()
                .as_fd()
                .try_clone_to_owned()
                .and_then(|fd| UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)));
            let Ok(watch) = watch else {
                // Out of descriptors: the departure is noticed when a reply fails instead.
                return std::future::pending().await;
            };
            loop {
                match watch.ready(Interest::WRITABLE).await {
                    Ok(ready) if !ready.is_write_closed() => {}
                    _ => return,
                }
                // Writable, but not hung up: forget that, and wait for the socket's next edge.
                let _ = watch.try_io(Interest::WRITABLE, || {
                    Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }

    fn has_departed(reader: &Self::Reader) -> bool {
        use std::os::fd::AsFd;
        hung_up(reader.as_ref().as_fd())
    }

    #[allow(clippy::manual_async_fn)] // The trait promises a `Send` future.
    fn read_with_fds<'a>(
        reader: &'a mut Self::Reader,
        buf: &'a mut BytesMut,
        state: &'a mut RecvState,
    ) -> impl Future<Output = io::Result<Received>> + Send + 'a {
        use std::os::fd::AsFd;
        async move {
            let stream: &UnixStream = reader.as_ref();
            loop {
                stream.readable().await?;
                reserve_for_read(buf);
                // A read that drained the socket is handed to tokio as `WouldBlock`, so that it
                // clears the readiness it saw before the read (an edge since then survives):
                // the next read waits for data instead of costing a `recvmsg` that finds none.
                let mut drained = None;
                let read = stream.try_io(Interest::READABLE, || {
                    let received = crate::fd::recv::recv_with_fds(stream.as_fd(), buf, state)?;
                    if !received.drained {
                        return Ok(received);
                    }
                    drained = Some(received);
                    Err(io::ErrorKind::WouldBlock.into())
                });
                match read {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => match drained {
                        Some(received) => return Ok(received),
                        None => continue,
                    },
                    read => return read,
                }
            }
        }
    }
}

/// True if the socket reports a hang-up: its peer closed both directions.
fn hung_up(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|events| events.contains(PollFlags::POLLHUP))
}

impl Transport for TcpStream {
    type Reader = tcp::OwnedReadHalf;
    type Writer = tcp::OwnedWriteHalf;

    fn split(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }

    /// Replies are small and latency matters: no Nagle delay.
    fn on_accept(&self) {
        let _ = self.set_nodelay(true);
    }
}

/// Any byte stream (stdio, a character device, an in-memory duplex), served like a socket.
#[derive(Debug)]
pub struct ByteStream<T>(pub T);

impl<T: AsyncRead + AsyncWrite + Send + 'static> Transport for ByteStream<T> {
    type Reader = ReadHalf<T>;
    type Writer = WriteHalf<T>;

    fn split(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self.0)
    }
}

/// Separate input and output streams, such as stdin and stdout.
#[derive(Debug)]
pub struct Pipes<R, W> {
    /// Where requests come from.
    pub input: R,
    /// Where replies go.
    pub output: W,
}

impl<R, W> Transport for Pipes<R, W>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    type Reader = R;
    type Writer = W;

    fn split(self) -> (R, W) {
        (self.input, self.output)
    }
}
