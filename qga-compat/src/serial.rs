//! A character device or serial port as a byte stream with no connect or disconnect.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{self, FlushArg, SetArg};
use qmp_dispatcher::Transport;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long the agent waits after EOF before reading again, like qemu-ga on virtio-serial.
pub const EOF_RETRY: Duration = Duration::from_millis(100);

/// A virtio-serial port, serial line or pty served like qemu-ga's `virtio-serial` method:
/// opened once and never closed. EOF or a hang-up (`EIO`) means "no host on the other end
/// right now": the agent waits [`EOF_RETRY`] and reads again. Output nobody can take
/// (the write fails) is dropped.
#[derive(Debug)]
pub struct SerialPort {
    device: Arc<AsyncFd<File>>,
}

impl SerialPort {
    /// Opens a device path (`/dev/virtio-ports/org.qemu.guest_agent.0`, `/dev/ttyS0`, a pty).
    /// A terminal is switched to raw mode and its pending input flushed, as qemu-ga's
    /// `isa-serial` method does. Call inside a tokio runtime.
    pub fn open(path: impl AsRef<Path>) -> io::Result<SerialPort> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
            .open(path)?;
        if let Ok(mut attrs) = termios::tcgetattr(file.as_fd()) {
            termios::cfmakeraw(&mut attrs);
            termios::tcsetattr(file.as_fd(), SetArg::TCSANOW, &attrs)?;
            termios::tcflush(file.as_fd(), FlushArg::TCIFLUSH)?;
        }
        SerialPort::from_file(file)
    }

    /// Serves an already open device (for instance a pty master). The file is switched to
    /// non-blocking mode; its terminal settings are left alone. Call inside a tokio runtime.
    pub fn from_file(file: File) -> io::Result<SerialPort> {
        let flags = OFlag::from_bits_retain(fcntl(file.as_fd(), FcntlArg::F_GETFL)?);
        fcntl(file.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // `File` owns its descriptor for its whole life, which is all the I/O-safety
        // concern behind the deprecation asks; the replacement is `unsafe`, which the
        // workspace denies.
        #[allow(deprecated)]
        let device = AsyncFd::new(file)?;
        Ok(SerialPort {
            device: Arc::new(device),
        })
    }
}

impl Transport for SerialPort {
    type Reader = SerialReader;
    type Writer = SerialWriter;

    fn split(self) -> (SerialReader, SerialWriter) {
        (
            SerialReader {
                device: Arc::clone(&self.device),
                backoff: None,
            },
            SerialWriter {
                device: self.device,
            },
        )
    }
}

/// The input half of a [`SerialPort`]; it never reports EOF.
#[derive(Debug)]
pub struct SerialReader {
    device: Arc<AsyncFd<File>>,
    backoff: Option<Pin<Box<Sleep>>>,
}

/// The output half of a [`SerialPort`].
#[derive(Debug)]
pub struct SerialWriter {
    device: Arc<AsyncFd<File>>,
}

impl AsyncRead for SerialReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            let device = Arc::clone(&self.device);
            let mut guard = match ready!(device.poll_read_ready(cx)) {
                Ok(guard) => guard,
                Err(error) => return Poll::Ready(Err(error)),
            };
            let read = guard.try_io(|device| device.get_ref().read(buf.initialize_unfilled()));
            match read {
                Ok(Ok(n)) if n > 0 => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(result) => {
                    // EOF (virtio-serial with no host) or EIO (a hung-up tty): no host now.
                    if let Err(error) = result {
                        tracing::trace!(%error, "serial port read failed; retrying");
                    }
                    guard.clear_ready();
                    self.backoff = Some(Box::pin(tokio::time::sleep(EOF_RETRY)));
                }
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for SerialWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.device.poll_write_ready(cx))?;
            match guard.try_io(|device| device.get_ref().write(data)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => {
                    // No host to read it (EIO on a hung-up tty): the reply is lost, the port
                    // stays.
                    tracing::debug!(%error, "serial port write failed; output dropped");
                    return Poll::Ready(Ok(data.len()));
                }
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
