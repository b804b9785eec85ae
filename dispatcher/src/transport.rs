//! Byte streams a server can serve: Unix and TCP sockets, or any `AsyncRead + AsyncWrite`.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use crate::context::PeerCredentials;

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
}

/// How often a half-open Unix socket is checked for a full close.
const DEPARTURE_POLL: Duration = Duration::from_millis(20);

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
        // A Unix socket whose peer closed both directions reports a hang-up (write side
        // closed); after a mere shutdown(SHUT_WR) it does not.
        async move {
            loop {
                match reader.ready(Interest::WRITABLE).await {
                    Ok(ready) if !ready.is_write_closed() => {}
                    _ => return,
                }
                tokio::time::sleep(DEPARTURE_POLL).await;
            }
        }
    }

    fn has_departed(reader: &Self::Reader) -> bool {
        use std::os::fd::AsFd;
        hung_up(reader.as_ref().as_fd())
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
