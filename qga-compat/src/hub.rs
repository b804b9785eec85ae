//! One long-lived dispatcher session whose byte stream is handed from client to client, so
//! the parser state survives reconnects as in qemu-ga.
//!
//! The dispatcher keeps a half-read value partly in its decoder and partly in the
//! connection's input buffer, and resets both at EOF. To keep them, the agent runs a single
//! dispatcher connection for its whole life over a [`Hub`]: clients are attached to the hub
//! one at a time, and the session never sees their EOF, only more bytes from the next one.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use qmp_dispatcher::Transport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, oneshot};

type BoxReader = Pin<Box<dyn AsyncRead + Send>>;
type BoxWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// The client slot the session reads from and writes to.
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// One permit: one attached client at a time.
    slot: Semaphore,
}

#[derive(Default)]
struct HubState {
    client: Option<Attached>,
    /// Tells attachments apart, so a cancelled `attach` removes only its own client.
    next_generation: u64,
    /// Bytes were offered to the writer and not flushed yet: the session still owes the
    /// current client output, so it must not be detached.
    unflushed: bool,
    /// The session's read side, waiting for a client or for output to drain.
    reader: Option<Waker>,
}

struct Attached {
    generation: u64,
    reader: BoxReader,
    writer: BoxWriter,
    /// The client sent EOF (or its read failed); it is detached once its output is written.
    finished_sending: bool,
    /// The client cannot take output any more (it closed); further output is dropped, as
    /// qemu-ga's write fails with EPIPE.
    gone: bool,
    detached: Option<oneshot::Sender<()>>,
}

impl Hub {
    pub(crate) fn new() -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::default(),
            slot: Semaphore::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `transport` through the shared session: waits for the slot (one client at a
    /// time), then until the client has sent EOF and received every reply it is owed.
    pub(crate) async fn attach<T: Transport>(&self, transport: T) {
        let Ok(_permit) = self.slot.acquire().await else {
            return;
        };
        let (reader, writer) = transport.split();
        let (detached_tx, detached) = oneshot::channel();
        let generation = {
            let mut state = self.lock();
            state.next_generation += 1;
            let generation = state.next_generation;
            state.client = Some(Attached {
                generation,
                reader: Box::pin(reader),
                writer: Box::pin(writer),
                finished_sending: false,
                gone: false,
                detached: Some(detached_tx),
            });
            state.unflushed = false;
            if let Some(waker) = state.reader.take() {
                waker.wake();
            }
            generation
        };
        // If this future is dropped (shutdown), the client must not stay attached.
        let _guard = DetachOnDrop {
            hub: self,
            generation,
        };
        let _ = detached.await;
    }

    /// Waits for the slot without attaching, for a client served by its own session.
    pub(crate) async fn turn(&self) -> Result<SemaphorePermit<'_>, AcquireError> {
        self.slot.acquire().await
    }

    /// The dispatcher transport that reads from and writes to whichever client is attached.
    pub(crate) fn transport(self: &Arc<Self>) -> HubTransport {
        HubTransport(Arc::clone(self))
    }
}

struct DetachOnDrop<'a> {
    hub: &'a Hub,
    generation: u64,
}

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        if state
            .client
            .as_ref()
            .is_some_and(|c| c.generation == self.generation)
        {
            state.client = None;
            state.unflushed = false;
        }
    }
}

/// The session's side of a [`Hub`].
pub(crate) struct HubTransport(Arc<Hub>);

impl Transport for HubTransport {
    type Reader = HubReader;
    type Writer = HubWriter;

    fn split(self) -> (HubReader, HubWriter) {
        (HubReader(Arc::clone(&self.0)), HubWriter(self.0))
    }
}

/// Reads the attached client; never reports EOF to the session.
pub(crate) struct HubReader(Arc<Hub>);

/// Writes to the attached client; output nobody can take is dropped, never an error, so the
/// session outlives every client.
pub(crate) struct HubWriter(Arc<Hub>);

impl AsyncRead for HubReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        loop {
            let unflushed = state.unflushed;
            let Some(client) = state.client.as_mut() else {
                state.reader = Some(cx.waker().clone());
                return Poll::Pending;
            };
            if !client.finished_sending {
                let before = buf.filled().len();
                match client.reader.as_mut().poll_read(cx, buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if buf.filled().len() > before => {
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(())) => client.finished_sending = true,
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(%error, "guest agent client read failed");
                        client.finished_sending = true;
                    }
                }
            }
            // The session reads only when nothing is running, so all that can still be owed
            // to this client is output on its way: wait for the flush that follows it.
            if unflushed {
                state.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let mut finished = state.client.take().expect("checked above");
            if let Some(detached) = finished.detached.take() {
                let _ = detached.send(());
            }
            // Dropping the halves closes the connection, as qemu-ga does after EOF.
            drop(finished);
        }
    }
}

impl AsyncWrite for HubWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.0.lock();
        // The session only writes while it has output queued; until the flush that empties
        // the queue, the client must stay attached.
        state.unflushed = true;
        let Some(client) = state.client.as_mut() else {
            return Poll::Ready(Ok(data.len()));
        };
        if client.gone {
            return Poll::Ready(Ok(data.len()));
        }
        match client.writer.as_mut().poll_write(cx, data) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(n)) if n > 0 => Poll::Ready(Ok(n)),
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "guest agent reply lost: client gone");
                }
                client.gone = true;
                Poll::Ready(Ok(data.len()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        if let Some(client) = state.client.as_mut().filter(|c| !c.gone) {
            match client.writer.as_mut().poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => client.gone = true,
            }
        }
        state.unflushed = false;
        if let Some(waker) = state.reader.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        if let Some(client) = state.client.as_mut().filter(|c| !c.gone) {
            let _ = std::task::ready!(client.writer.as_mut().poll_shutdown(cx));
        }
        Poll::Ready(Ok(()))
    }
}
