//! Streaming JSON decoder with QEMU's lexer rules, limits and error texts.
//!
//! PLACEHOLDER: a naive implementation over serde_json so the rest of the crate can be
//! built and tested; replaced by the QEMU-compatible lexer/streamer/parser.

use bytes::{Buf, BytesMut};
use serde_json::Value;
use serde_json::value::RawValue;

/// Limits on one JSON value, as QEMU's JSON streamer enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum nesting of `{` and `[` (QEMU: 1024).
    pub max_nesting: usize,
    /// Maximum number of tokens in one value (QEMU: 2^21).
    pub max_tokens: usize,
    /// Maximum bytes of token text in one value (QEMU: 64 MiB).
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nesting: 1024,
            max_tokens: 1 << 21,
            max_bytes: 64 << 20,
        }
    }
}

/// One complete item cut from the input stream.
#[derive(Debug)]
pub enum Frame {
    /// A complete, well-formed JSON value.
    Value(ParsedValue),
    /// A lexical, syntax or limit error. `desc` is QEMU's text; the reply carries no id.
    Error(String),
}

/// A parsed JSON value, plus the raw text of its top-level `id` member when it is an object.
#[derive(Debug)]
pub struct ParsedValue {
    /// The value itself.
    pub value: Value,
    /// The `id` member of a top-level object, re-encoded as compact standard JSON with its
    /// original member order and number spelling.
    pub id: Option<Box<RawValue>>,
}

/// Cuts a byte stream into JSON values.
#[derive(Debug, Default)]
pub struct JsonDecoder {
    limits: Limits,
}

impl JsonDecoder {
    /// A decoder with the given limits.
    pub fn new(limits: Limits) -> Self {
        JsonDecoder { limits }
    }

    /// Takes the next frame from `buf`, consuming exactly its bytes. `None` means more input
    /// is needed (whitespace-only input also yields `None`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        let _ = self.limits;
        let start = buf.iter().position(|b| !b" \t\r\n".contains(b));
        let Some(start) = start else {
            buf.clear();
            return None;
        };
        buf.advance(start);
        let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(value)) => {
                let n = it.byte_offset();
                buf.advance(n);
                let id = value
                    .get("id")
                    .map(|id| RawValue::from_string(id.to_string()).unwrap());
                Some(Frame::Value(ParsedValue { value, id }))
            }
            Some(Err(e)) if e.is_eof() => None,
            Some(Err(_)) => {
                buf.clear();
                Some(Frame::Error("JSON parse error, expecting value".into()))
            }
            None => None,
        }
    }

    /// Like [`decode`](Self::decode) once the peer has sent EOF: flushes a pending
    /// top-level scalar. A partial object or array is dropped without a reply, as in QEMU.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        self.decode(buf)
    }

    /// True when no partial value is pending (nothing buffered inside the decoder).
    pub fn is_idle(&self) -> bool {
        true
    }
}
