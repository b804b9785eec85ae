//! [`QmpCodec`]: QMP's framing as a `tokio_util::codec` pair. Decoding cuts the input into
//! [`Frame`]s with QEMU's JSON rules; encoding writes one [`Message`] per line in the
//! dialect's line ending.
//!
//! The session produces `Message`s and never sees bytes; a protocol that frames its output
//! differently (the guest agent's 0xFF sentinel before a `guest-sync-delimited` reply)
//! wraps this codec instead of reaching into the session.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::encode::{self, LineEnding};
use super::json::{Frame, Id, JsonDecoder, Limits};
use crate::error::QmpError;

/// One message from the server to a client, before framing.
#[derive(Debug)]
#[non_exhaustive]
pub enum Message {
    /// The `{"QMP": ...}` greeting, already encoded (it is the same for every client).
    Greeting(Bytes),
    /// An event, already encoded once for every subscriber, without a line ending.
    Event(Bytes),
    /// `{"return": value, "id": id}`.
    Return {
        /// The command this answers, for dialects that frame some replies specially; set for
        /// replies of handlers, `None` for the built-ins, which no dialect frames apart.
        command: Option<Arc<str>>,
        /// The request's id, echoed verbatim.
        id: Option<Id>,
        /// The return value as JSON text (shared, so a built-in's fixed reply is not copied).
        value: Bytes,
    },
    /// `{"id": id, "error": {"class": ..., "desc": ...}}`.
    Error {
        /// The request's id, when the input got far enough to have one.
        id: Option<Id>,
        /// What went wrong.
        error: QmpError,
    },
}

/// QMP framing: QEMU's streaming JSON decoder in, one message per line out.
#[derive(Debug)]
pub struct QmpCodec {
    decoder: JsonDecoder,
    line_ending: LineEnding,
}

impl QmpCodec {
    /// A codec with these input limits and output line ending.
    pub fn new(limits: Limits, line_ending: LineEnding) -> Self {
        QmpCodec {
            decoder: JsonDecoder::new(limits).split_requests(),
            line_ending,
        }
    }

    /// The line ending this codec writes.
    pub fn line_ending(&self) -> LineEnding {
        self.line_ending
    }

    /// True when no partial value is pending in the decoder.
    pub fn is_idle(&self) -> bool {
        self.decoder.is_idle()
    }
}

impl Decoder for QmpCodec {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        Ok(self.decoder.decode(src))
    }

    /// At EOF a pending top-level number or keyword is flushed as a frame and a partial
    /// value is dropped, as [`JsonDecoder::decode_eof`] describes. Never an error: QEMU
    /// ignores an unfinished value at disconnect.
    fn decode_eof(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        Ok(self.decoder.decode_eof(src))
    }
}

impl Encoder<Message> for QmpCodec {
    type Error = io::Error;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> io::Result<()> {
        match message {
            Message::Greeting(line) | Message::Event(line) => dst.extend_from_slice(&line),
            Message::Return { id, value, .. } => {
                encode::success(dst, &value, id.as_ref().map(Id::text))
            }
            Message::Error { id, error } => encode::error(dst, &error, id.as_ref().map(Id::text)),
        }
        dst.extend_from_slice(self.line_ending.as_bytes());
        Ok(())
    }
}

/// What a connection codec must be: QMP frames in, [`Message`]s out. Implemented by every
/// type that is both, such as [`QmpCodec`] or a wrapper around it.
pub trait ServerCodec:
    Decoder<Item = Frame, Error = io::Error> + Encoder<Message, Error = io::Error> + Send + 'static
{
}

impl<C> ServerCodec for C where
    C: Decoder<Item = Frame, Error = io::Error>
        + Encoder<Message, Error = io::Error>
        + Send
        + 'static
{
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(codec: &mut QmpCodec, message: Message) -> Vec<u8> {
        let mut out = BytesMut::new();
        codec.encode(message, &mut out).unwrap();
        out.to_vec()
    }

    #[test]
    fn every_message_ends_in_the_dialects_line_ending() {
        for (ending, tail) in [(LineEnding::CrLf, &b"\r\n"[..]), (LineEnding::Lf, b"\n")] {
            let mut codec = QmpCodec::new(Limits::default(), ending);
            let messages = [
                Message::Greeting(Bytes::from_static(b"{\"QMP\": {}}")),
                Message::Event(Bytes::from_static(b"{\"event\": \"STOP\"}")),
                Message::Return {
                    command: Some("x".into()),
                    id: None,
                    value: Bytes::from_static(b"{}"),
                },
                Message::Error {
                    id: None,
                    error: QmpError::generic("no"),
                },
            ];
            for message in messages {
                let line = encoded(&mut codec, message);
                assert!(line.ends_with(tail), "{:?}", String::from_utf8_lossy(&line));
                assert!(!line[..line.len() - tail.len()].contains(&b'\n'));
            }
        }
    }

    #[test]
    fn decodes_frames_and_flushes_a_number_at_eof() {
        let mut codec = QmpCodec::new(Limits::default(), LineEnding::CrLf);
        let mut input = BytesMut::from(&b"{\"execute\": \"x\"} 42"[..]);
        // The codec splits request objects.
        assert!(matches!(
            codec.decode(&mut input).unwrap(),
            Some(Frame::Request(request)) if request.command == "x"
        ));
        assert!(codec.decode(&mut input).unwrap().is_none());
        let Some(Frame::Value(number)) = codec.decode_eof(&mut input).unwrap() else {
            panic!("the pending number is flushed at EOF");
        };
        assert_eq!(number.value, 42);
        assert!(codec.is_idle());
    }
}
