//! The connection task: one client's bytes through its codec and session, in small named
//! steps around one `select!` (shutdown, write, outbox, read).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{IDLE_CAPACITY, LARGE_FRAME, MEMORY_FLOOR};
use crate::context::ClientInfo;
use crate::fd::{Received, RecvState};
use crate::qmp_return::Outgoing;
use crate::server::{ConnectionParts, Shared};
use crate::session::Session;
use crate::transport::Transport;
use crate::wire::{Frame, Message, ServerCodec};

/// How long a closing connection may take to flush what it still has to say.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// EOF, everything answered.
    Finished,
    /// The peer went away (write error, full close) with work possibly in flight.
    Departed,
    /// The server is shutting down.
    Shutdown,
    /// The client did not read its output and exceeded the output limit.
    TooSlow,
}

/// One client: its transport halves, codec, buffers, session and outbox.
pub(crate) struct Connection<'p, T: Transport, C> {
    shared: Arc<Shared>,
    reader: T::Reader,
    writer: T::Writer,
    /// The codec and the undecoded input; borrowed, so they outlive the connection.
    parts: &'p mut ConnectionParts<C>,
    /// Encoded output not written yet: whole lines, the first possibly begun.
    write_buf: BytesMut,
    /// Part of the first line in `write_buf` has been written already.
    mid_line: bool,
    session: Session,
    outbox: mpsc::UnboundedReceiver<Outgoing>,
    cancel: CancellationToken,
    /// The client has sent EOF.
    eof: bool,
    /// The last decode found no complete frame in the input.
    input_drained: bool,
    /// Bytes this connection has counted against the server's memory budget.
    accounted: usize,
    client: u64,
    /// How this connection's socket is read for fds.
    recv: RecvState,
    /// Stream offset just past the last byte read: with `read_buf`'s length it gives the
    /// offset of every byte the decoder consumes, which the fd positions refer to.
    read_total: u64,
}

/// Sleeps until `when`; pending for ever without one (the select arm is disabled then).
async fn sleep_until_some(when: Option<tokio::time::Instant>) {
    match when {
        // Boxed: a timer is large, and every connection's task would carry one unused.
        Some(when) => Box::pin(tokio::time::sleep_until(when)).await,
        None => std::future::pending().await,
    }
}

/// What a read brought.
enum Input {
    Data(Received),
    Eof,
    Departed,
}

impl<'p, T: Transport, C: ServerCodec> Connection<'p, T, C> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        transport: T,
        parts: &'p mut ConnectionParts<C>,
        cancel: CancellationToken,
        info: Arc<ClientInfo>,
    ) -> Self {
        let client = info.id();
        let (reader, writer) = transport.split();
        let (outbox_tx, outbox) = mpsc::unbounded_channel();
        let session = Session::new(Arc::clone(&shared), info, outbox_tx);
        let recv = RecvState::new();
        // Input a previous connection left in the parts counts as read already.
        let read_total = parts.read_buf.len() as u64;
        Connection {
            shared,
            reader,
            writer,
            parts,
            write_buf: BytesMut::new(),
            mid_line: false,
            session,
            outbox,
            cancel,
            eof: false,
            input_drained: false,
            accounted: 0,
            client,
            recv,
            read_total,
        }
    }

    /// Serves the client until it leaves or the server stops, then closes the session.
    pub(crate) async fn run(mut self) -> End {
        let end = self.serve().await;
        self.finish(end).await;
        end
    }

    async fn serve(&mut self) -> End {
        let cancel = self.cancel.clone();
        // Pinned once: a fresh `cancelled()` per turn would register with the token anew.
        let stopping = cancel.cancelled();
        tokio::pin!(stopping);
        loop {
            if let Err(end) = self.process() {
                return end;
            }
            if self.is_finished() {
                return End::Finished;
            }
            self.shrink_buffers();
            self.account();
            let over_budget = self.over_memory_budget();
            let paused = !self.may_read() || over_budget;
            let rate_resumes = self.session.rate_paused_until();
            tokio::select! {
                biased;
                () = &mut stopping => return End::Shutdown,
                written = self.writer.write(&self.write_buf), if !self.write_buf.is_empty() => {
                    match written {
                        Ok(n) if n > 0 => self.consume_written(n),
                        _ => return End::Departed,
                    }
                    if self.write_buf.is_empty() && self.writer.flush().await.is_err() {
                        return End::Departed;
                    }
                }
                Some(message) = self.outbox.recv() => self.session.on_outgoing(message),
                ticket = std::future::poll_fn(|cx| self.session.poll_deadline(cx)),
                    if self.session.has_deadlines() => self.session.on_deadline(ticket),
                () = sleep_until_some(rate_resumes), if rate_resumes.is_some() => {}
                () = self.shared.memory.freed(), if over_budget => {}
                input = read_or_watch::<T>(
                    &mut self.reader,
                    &mut self.parts.read_buf,
                    &mut self.recv,
                    self.eof || paused,
                ) => match input {
                    Input::Data(received) => self.on_received(received),
                    Input::Eof => self.eof = true,
                    Input::Departed => return End::Departed,
                },
            }
            if paused && self.departed_while_paused() {
                return End::Departed;
            }
        }
    }

    /// Decodes every frame the session takes now and feeds it every outbox message that is
    /// ready, until neither makes progress, encoding output as it appears.
    fn process(&mut self) -> Result<(), End> {
        loop {
            while self.may_read() {
                // A large value is parsed, and its request dispatched, off the worker.
                let large = self.parts.read_buf.len() >= LARGE_FRAME;
                if !off_worker(large, || self.decode_and_dispatch()) {
                    break;
                }
                // Handlers that answered at once are answered before the next request, so
                // immediate replies keep request order.
                self.receive_ready();
                self.encode_output()?;
            }
            let progressed = self.receive_ready();
            self.encode_output()?;
            if !progressed {
                break;
            }
        }
        if self.session.is_lagged() {
            return Err(End::TooSlow);
        }
        Ok(())
    }

    /// Decodes the next frame, if the input holds one, and hands it to the session with the
    /// stream offset where it ended; otherwise tells the session how far the decoder got.
    fn decode_and_dispatch(&mut self) -> bool {
        let Some(frame) = self.decode() else {
            // Without a frame the decoder has scanned every byte read.
            self.session.on_reached(self.read_total);
            return false;
        };
        let end = self.read_total - self.parts.read_buf.len() as u64;
        self.session.on_frame_at(frame, end);
        true
    }

    /// Counts the bytes a read brought, and hands its fds to the session at their offset.
    fn on_received(&mut self, received: Received) {
        let position = self.read_total + received.fds_at as u64;
        self.read_total += received.len as u64;
        if received.has_fds() {
            self.session
                .on_fds(position, received.fds, received.truncated);
        }
    }

    /// The next frame of the input, if it holds one.
    fn decode(&mut self) -> Option<Frame> {
        let ConnectionParts { codec, read_buf } = &mut *self.parts;
        // The codecs here never fail; an error would be the transport's, and ends nothing.
        let frame = if self.eof {
            codec.decode_eof(read_buf)
        } else {
            codec.decode(read_buf)
        };
        let frame = frame.ok().flatten();
        self.input_drained = frame.is_none();
        frame
    }

    /// Moves every message already in the outbox into the session. True if there was one.
    fn receive_ready(&mut self) -> bool {
        let mut received = false;
        while let Ok(message) = self.outbox.try_recv() {
            self.session.on_outgoing(message);
            received = true;
        }
        received
    }

    /// Encodes the session's output. An event that would push unsent output past
    /// `max_pending_output` means the client does not read: it is disconnected. Replies
    /// never count against it (they are bounded by the in-flight cap and by reading pausing
    /// at `output_high_water`).
    fn encode_output(&mut self) -> Result<(), End> {
        let max_pending = self.shared.config.max_pending_output;
        while let Some(message) = self.session.next_output() {
            if let Message::Event(line) = &message {
                if self.write_buf.len() + line.len() > max_pending {
                    return Err(End::TooSlow);
                }
            }
            let large =
                matches!(&message, Message::Return { value, .. } if value.len() >= LARGE_FRAME);
            let (codec, write_buf) = (&mut self.parts.codec, &mut self.write_buf);
            // Our codecs cannot fail to encode.
            let _ = off_worker(large, || codec.encode(message, write_buf));
        }
        Ok(())
    }

    /// Whether to decode more input now: the session takes it and output is not backed up.
    fn may_read(&self) -> bool {
        self.session.wants_input() && self.write_buf.len() < self.shared.config.output_high_water
    }

    /// EOF, every frame decoded, nothing owed, everything written.
    fn is_finished(&self) -> bool {
        self.eof && self.input_drained && !self.session.has_pending() && self.write_buf.is_empty()
    }

    /// After a turn with reading paused (a legacy command running, the in-flight cap): has
    /// the client left meanwhile? Then a request waiting in the input is not started.
    fn departed_while_paused(&self) -> bool {
        !self.eof && !self.parts.read_buf.is_empty() && T::has_departed(&self.reader)
    }

    /// Gives back buffer room a large value needed once, and an emptied input buffer to
    /// the thread (the next read takes it again).
    fn shrink_buffers(&mut self) {
        crate::transport::release_input(&mut self.parts.read_buf);
        if self.write_buf.is_empty() && self.write_buf.capacity() > IDLE_CAPACITY {
            self.write_buf = BytesMut::new();
        }
        let read_buf = &mut self.parts.read_buf;
        if read_buf.capacity() > IDLE_CAPACITY && read_buf.capacity() > 4 * read_buf.len() {
            // The decoder's offsets are relative to the buffer's start, so a copy keeps them.
            let mut smaller = BytesMut::with_capacity(read_buf.len());
            smaller.extend_from_slice(read_buf);
            *read_buf = smaller;
        }
    }

    /// What this connection holds: its buffers and the ids its commands retain.
    fn held(&self) -> usize {
        self.parts.read_buf.capacity() + self.write_buf.capacity() + self.session.retained()
    }

    /// Brings the server-wide memory count up to date with this connection.
    fn account(&mut self) {
        let held = self.held();
        // Most turns change nothing; the shared counter is touched only when they do.
        if held != self.accounted {
            self.shared.memory.update(self.accounted, held);
            self.accounted = held;
        }
    }

    /// The server's budget is spent and this connection holds more than the floor every
    /// connection keeps: it reads nothing more until memory is given back.
    fn over_memory_budget(&self) -> bool {
        self.accounted > MEMORY_FLOOR && self.shared.memory.exhausted()
    }

    fn consume_written(&mut self, n: usize) {
        self.mid_line = self.write_buf[n - 1] != b'\n';
        self.write_buf.advance(n);
    }

    /// Says goodbye as the reason for ending allows, and cancels what is still in flight.
    async fn finish(&mut self, end: End) {
        if end == End::Shutdown {
            // Replies already produced (`quit`'s among them) and events emitted before the
            // shutdown still go out.
            self.receive_ready();
            let _ = self.encode_output();
        }
        // Handlers learn at once, not after a goodbye that may take a while to write.
        self.session.close();
        match end {
            End::Shutdown => {
                let flush = self.writer.write_all(&self.write_buf);
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
            }
            End::TooSlow => {
                crate::observe::slow_client_disconnected();
                tracing::warn!(
                    client = self.client,
                    pending = self.write_buf.len(),
                    "disconnecting a client that does not read its output"
                );
                // End what was written at a line boundary, if the client takes that much.
                if self.mid_line {
                    let line_end = self.write_buf.iter().position(|&b| b == b'\n');
                    if let Some(end) = line_end {
                        let rest = self.write_buf.split_to(end + 1);
                        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, self.writer.write_all(&rest))
                            .await;
                    }
                }
            }
            End::Finished | End::Departed => {}
        }
        self.shared.memory.update(self.accounted, 0);
        self.accounted = 0;
        let _ = self.writer.shutdown().await;
        if self.shared.config.dialect.busy_until_handlers_finish {
            self.wait_for_handlers().await;
        }
    }

    /// Waits until every handler of this connection has dropped its return (the outbox
    /// then closes), or the server stops. Late replies are discarded on the way.
    async fn wait_for_handlers(&mut self) {
        let stopping = self.cancel.cancelled();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                () = &mut stopping => return,
                message = self.outbox.recv() => if message.is_none() { return },
            }
        }
    }
}

/// Reads more input; when reading is paused or after EOF, only watches for the client
/// closing the connection entirely, so its commands are cancelled without waiting for them.
async fn read_or_watch<T: Transport>(
    reader: &mut T::Reader,
    input: &mut BytesMut,
    recv: &mut RecvState,
    watch_only: bool,
) -> Input {
    if watch_only {
        // Boxed, so only a paused connection carries the watch (a timer and a socket).
        Box::pin(T::departed(reader)).await;
        return Input::Departed;
    }
    match T::read_with_fds(reader, input, recv).await {
        // An fd can come with no byte only on a closed stream; dropping it closes it.
        Ok(received) if received.len == 0 => Input::Eof,
        Ok(received) => Input::Data(received),
        Err(_) => Input::Departed,
    }
}

/// Runs `work` so that a large piece of it does not hold up the other tasks of this worker
/// thread (`block_in_place` hands them to another worker). On a current-thread runtime,
/// where that is impossible, it simply runs.
fn off_worker<R>(large: bool, work: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread = || {
        Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread)
    };
    if large && multi_thread() {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}
