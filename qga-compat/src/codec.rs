//! [`GuestAgentCodec`]: QMP's codec with qemu-ga's framing on top: the 0xFF sentinel before a
//! `guest-sync-delimited` reply, and a parser that keeps its state when a client leaves.

use std::io;

use bytes::{BufMut, BytesMut};
use qmp_dispatcher::wire::Frame;
use qmp_dispatcher::{Message, QmpCodec};
use tokio_util::codec::{Decoder, Encoder};

use crate::commands::SENTINEL;

/// The guest agent's codec. Wraps [`QmpCodec`]; see the module documentation.
#[derive(Debug)]
pub struct GuestAgentCodec {
    inner: QmpCodec,
    /// Whether a client's EOF leaves a half-read value for the next client (qemu-ga) or
    /// ends it (QEMU's monitor).
    keep_across_clients: bool,
}

impl GuestAgentCodec {
    /// Wraps `inner`. With `keep_across_clients`, EOF flushes nothing: the bytes a client
    /// left unfinished are completed by the next client's, as in qemu-ga.
    pub fn new(inner: QmpCodec, keep_across_clients: bool) -> Self {
        GuestAgentCodec {
            inner,
            keep_across_clients,
        }
    }
}

impl Decoder for GuestAgentCodec {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        self.inner.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        if self.keep_across_clients {
            self.inner.decode(src)
        } else {
            self.inner.decode_eof(src)
        }
    }
}

impl Encoder<Message> for GuestAgentCodec {
    type Error = io::Error;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> io::Result<()> {
        // Only a successful reply gets the sentinel: in qemu-ga the handler sets the flag,
        // so an argument error is written plain.
        if let Message::Return {
            command: Some(command),
            ..
        } = &message
        {
            if &**command == "guest-sync-delimited" {
                dst.put_u8(SENTINEL);
            }
        }
        self.inner.encode(message, dst)
    }
}
