//! The connection task: one `select!` over client input, handler completions, events,
//! output and shutdown.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::session::{Session, Shared};
use crate::transport::Transport;
use crate::wire::JsonDecoder;

/// How long a closing connection may take to flush what it still has to say.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Serves one client until it leaves or the server stops.
pub(crate) async fn serve<T: Transport>(
    shared: Arc<Shared>,
    transport: T,
    shutdown: CancellationToken,
    client: u64,
) -> End {
    let (mut reader, mut writer) = transport.split();
    let (outbox_tx, mut outbox) = mpsc::unbounded_channel();
    let cancel = shutdown.child_token();
    let mut session = Session::new(Arc::clone(&shared), client, outbox_tx, cancel.clone());
    // Pinned once: a fresh `cancelled()` per loop turn would register with the token anew.
    let stopping = cancel.cancelled();
    tokio::pin!(stopping);
    // Fresh per connection, as QEMU's monitor re-creates its parser on every connect.
    let mut decoder = JsonDecoder::new(shared.config.limits);
    let mut input = BytesMut::with_capacity(8192);
    let mut eof = false;

    // Whether the last turn waited with reading suspended (a legacy command running, the
    // in-flight cap reached): if so the client may have left meanwhile.
    let mut was_suspended = false;
    let end = loop {
        if was_suspended && !eof && !input.is_empty() && T::has_departed(&reader) {
            break End::Departed;
        }
        // Take every request the session lets us take, and every completion that is ready,
        // until neither makes progress; then write in one go.
        let mut input_exhausted = false;
        loop {
            while session.can_read() {
                let frame = if eof {
                    decoder.decode_eof(&mut input)
                } else {
                    decoder.decode(&mut input)
                };
                let Some(frame) = frame else {
                    input_exhausted = true;
                    break;
                };
                session.on_frame(frame);
                // Handlers that answered at once are answered before the next request, so
                // immediate replies keep request order.
                while let Ok(message) = outbox.try_recv() {
                    session.on_outgoing(message);
                }
            }
            let mut progressed = false;
            while let Ok(message) = outbox.try_recv() {
                session.on_outgoing(message);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        if session.lagged {
            break End::TooSlow;
        }
        if eof && input_exhausted && !session.has_pending() && session.out.is_empty() {
            break End::Finished;
        }

        let suspended = !session.can_read();
        was_suspended = suspended;
        tokio::select! {
            biased;
            () = &mut stopping => break End::Shutdown,
            written = writer.write(&session.out), if !session.out.is_empty() => match written {
                Ok(0) | Err(_) => break End::Departed,
                Ok(n) => {
                    session.out.advance(n);
                    if session.out.is_empty() && writer.flush().await.is_err() {
                        break End::Departed;
                    }
                }
            },
            Some(message) = outbox.recv() => session.on_outgoing(message),
            // While reading is suspended (or after EOF) the input is only watched for the
            // client leaving, so its commands are cancelled without waiting for them.
            read = read_or_watch::<T>(&mut reader, &mut input, eof || suspended) => match read {
                Input::Eof => eof = true,
                Input::Data => {}
                Input::Departed => break End::Departed,
            },
        }
    };

    if end == End::Shutdown {
        // Say goodbye properly: replies already produced (`quit`'s among them) still go out.
        while let Ok(message) = outbox.try_recv() {
            session.on_outgoing(message);
        }
        let flush = writer.write_all(&session.out);
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
    }
    session.close();
    if end == End::TooSlow {
        tracing::warn!(
            client,
            pending = session.out.len(),
            "disconnecting a client that does not read its output"
        );
    }
    let _ = writer.shutdown().await;
    end
}

enum Input {
    Data,
    Eof,
    Departed,
}

/// Reads more input; after EOF, watches instead for the client closing entirely.
async fn read_or_watch<T: Transport>(
    reader: &mut T::Reader,
    input: &mut BytesMut,
    eof: bool,
) -> Input {
    if eof {
        T::departed(reader).await;
        return Input::Departed;
    }
    if input.capacity() - input.len() < 4096 {
        input.reserve(16 * 1024);
    }
    match reader.read_buf(input).await {
        Ok(0) => Input::Eof,
        Ok(_) => Input::Data,
        Err(_) => Input::Departed,
    }
}
