//! Streaming JSON decoder with QEMU 10.0's lexer rules, limits and error texts.
//!
//! # Design
//!
//! Decoding runs over the caller's buffer, without copying it:
//!
//! 0. `fast`: when no value is pending and the buffer holds a complete object or array of
//!    standard JSON (double quotes only) within the limits and without any error, it is
//!    lexed and built in a single pass. Anything else makes this stage give up before
//!    consuming anything, and the two general stages below handle the input instead, so
//!    behaviour is theirs in every case (the `whole_buffer_matches_byte_at_a_time` test
//!    checks this by feeding the same inputs whole and byte by byte).
//! 1. `decoder`: a byte-level state machine with the same transition table as QEMU's
//!    JSON lexer, plus the streamer's bracket counting and limits. It finds where a value
//!    ends (or where a lexical or limit error occurs) and checks every token on the way,
//!    keeping its state across calls so a stream fed in any split is scanned once (O(n)).
//!    String bodies take a tight fast path.
//! 2. `parser`: once a value is complete, its bytes (known to be lexically valid) are
//!    parsed by an iterative grammar stage that builds the [`serde_json::Value`] directly,
//!    reporting QEMU's first grammar error.
//!
//! Handing standard JSON to `serde_json` instead was rejected: it silently accepts
//! duplicate keys, turns `-0` into a float and rejects QEMU's extensions, so every value
//! would need a second pass anyway, and the raw `id` text falls out of our own parse.
//! The ignored `speed` and `speed_big` tests compare timings with
//! `serde_json::from_slice::<Value>`.
//!
//! # Deviations from QEMU 10.0
//!
//! * Limit errors do not cascade: one error, then the rest of the oversized value is
//!   skipped until its brackets balance (like newer upstream QEMU). A lexical error inside
//!   that skipped rest ends the skipping silently (the lexer then recovers as usual).
//! * The size limit counts the whole text of a value from its first token, including
//!   whitespace between tokens, and is checked byte by byte (so memory stays bounded);
//!   QEMU counts only token text, and also rejects one whitespace run over 64 MiB.
//! * Numbers that overflow a double (`1e400`) become `null`; QEMU keeps infinity.
//! * Strings are Rust strings: the modified-UTF-8 NUL (`C0 80`, or `\u0000`) is U+0000.
//! * At EOF ([`JsonDecoder::decode_eof`]) a pending top-level number or keyword is
//!   flushed; QEMU's monitor drops it. Incomplete input is dropped silently.

mod decoder;
mod fast;
mod parser;
mod utf8;

#[cfg(test)]
mod tests;

pub use decoder::JsonDecoder;

use serde_json::Value;
use serde_json::value::RawValue;

/// Limits on one JSON value, as QEMU's JSON streamer enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum nesting of `{` and `[` (QEMU: 1024).
    pub max_nesting: usize,
    /// Maximum number of tokens in one value (QEMU: 2^21).
    pub max_tokens: usize,
    /// Maximum bytes of one value (QEMU: 64 MiB of token text).
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
    /// A lexical, syntax or limit error. The string is QEMU's `GenericError` desc; the
    /// reply carries no id.
    Error(String),
}

/// A parsed JSON value, plus the raw text of its top-level `id` member when it is an object.
#[derive(Debug)]
pub struct ParsedValue {
    /// The value itself (numbers: i64, else u64, else f64, as in QEMU).
    pub value: Value,
    /// The `id` member of a top-level object, as compact standard JSON with its original
    /// member order and number spelling; `None` for non-objects and objects without `id`.
    pub id: Option<Box<RawValue>>,
}
