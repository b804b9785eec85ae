//! Streaming JSON decoder with QEMU 10.0's lexer rules, limits and error texts.
//!
//! # Design
//!
//! Each rule exists once:
//!
//! * `scanner`: a byte-level state machine with the same transition table as QEMU's JSON
//!   lexer. It is the one definition of what a token is; it reports where each lexeme ends
//!   and its kind. String bodies take a tight word-at-a-time path (`strings::plain_len`).
//! * `strings` and `utf8`: decoding a string token into its value (escapes, QEMU's view
//!   of UTF-8, their error texts).
//! * `grammar`: the iterative grammar stage over a stream of tokens and the one value
//!   builder (containers fold into [`serde_json::Value`]s there), reporting QEMU's first
//!   grammar error. It also drives the `id` writer while it parses the top-level `id`.
//! * `id`: [`Id`], its echo text and its canonical key, written by one compact-JSON
//!   writer that [`canonical_key`] shares.
//!
//! Two drivers run them over the caller's buffer, without copying it:
//!
//! 0. `fast`: when no value is pending and the buffer holds a complete object or array
//!    within the limits and without any error, the grammar pulls tokens straight from the
//!    scanner and builds the value in a single pass. Anything else makes this path give up
//!    before consuming anything, and the streaming decoder handles the input instead, so
//!    behaviour is the streaming decoder's in every case (the
//!    `whole_buffer_matches_byte_at_a_time` test checks this by feeding the same inputs
//!    whole and byte by byte).
//!    `envelope` is the same path specialised for request objects: it splits them into
//!    their members without building the object, when the decoder is asked to
//!    ([`JsonDecoder::split_requests`]), and gives up into the other paths just as `fast`
//!    gives up into the streaming one.
//! 1. `decoder`: QEMU's streamer (bracket counting, limits, recovery) over the scanner,
//!    keeping the lexer state across calls so a stream fed in any split is scanned once
//!    (O(n)). It records the boundaries of the pending value's tokens and hands them to the
//!    grammar once the value is complete.
//!
//! Handing standard JSON to `serde_json` instead was rejected: it silently accepts
//! duplicate keys, turns `-0` into a float and rejects QEMU's extensions, so every value
//! would need a second pass anyway, and the id text and key fall out of our own parse.
//! The ignored `speed` and `speed_big` tests compare timings with
//! `serde_json::from_slice::<Value>`.
//!
//! # Ids
//!
//! The `id` member of a top-level object becomes an [`Id`], computed while the grammar
//! builds the value (no second parse, any nesting depth the limits allow):
//!
//! * Its echo text ([`Id::text`]) is compact JSON: members in their original order,
//!   numbers and keywords spelled as in the input (`1.0`, `-0`, `1E+2`, `1e400` stay so),
//!   strings in standard JSON escaping as `serde_json` writes them (`'it\'s'` becomes
//!   `"it's"`, `"\u0041"` becomes `"A"`, a modified-UTF-8 NUL becomes `"\u0000"`).
//! * Its canonical key ([`Id::key`]) is the same compact JSON except that object members
//!   are sorted by key (byte order of the decoded key) and numbers are written by their
//!   value: an integer token that fits i64 or u64 as that integer in decimal (`-0` is `0`),
//!   any other number that fits a double as `serde_json` writes that `f64` (`1.0` and
//!   `1.00` are both `1.0`; `1` and `1.0` differ), and a number that overflows a double
//!   by its own spelling (`1e400` and `2e400` differ, `1e400` and `1E400` too). Ids are
//!   the same id when their keys are equal.
//! * The key is stored only when it differs from the echo text.
//! * [`canonical_key`] gives the key of a [`serde_json::Value`] (for an id given as a
//!   command argument), equal to [`Id::key`] for the same id unless that id holds a
//!   number that overflows a double.
//!
//! # Deviations from QEMU 10.0
//!
//! * Limit errors do not cascade: one error, then the rest of the oversized value is
//!   skipped until its brackets balance (like newer upstream QEMU). A lexical error inside
//!   that skipped rest ends the skipping silently (the lexer then recovers as usual).
//! * The size limit counts the whole text of a value from its first token, including
//!   whitespace between tokens, and is checked byte by byte (so memory stays bounded);
//!   QEMU counts only token text, and also rejects one whitespace run over 64 MiB.
//! * Numbers that overflow a double (`1e400`) become `null` in the value; QEMU keeps
//!   infinity. The `id`'s text and key keep their spelling.
//! * Strings are Rust strings: the modified-UTF-8 NUL (`C0 80`, or `\u0000`) is U+0000.
//! * At EOF ([`JsonDecoder::decode_eof`]) a pending top-level number or keyword is
//!   flushed; QEMU's monitor drops it. Incomplete input is dropped silently.
//! * Ids are echoed as their own text, not re-serialized the way QEMU writes them.

mod decoder;
mod envelope;
mod fast;
mod grammar;
mod id;
mod scanner;
mod strings;
mod utf8;

#[cfg(test)]
mod tests;

pub use decoder::JsonDecoder;
pub use envelope::Envelope;
pub use id::{Id, canonical_key};

use serde_json::Value;

const SIZE_LIMIT: &str = "JSON token size limit exceeded";
const COUNT_LIMIT: &str = "JSON token count limit exceeded";
const NESTING_LIMIT: &str = "JSON nesting depth limit exceeded";

/// Limits on one JSON value, as QEMU's JSON streamer enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum nesting of `{` and `[` (QEMU: 1024).
    pub max_nesting: usize,
    /// Maximum number of tokens in one value (QEMU: 2^21).
    pub max_tokens: usize,
    /// Maximum bytes of one value (QEMU: 64 MiB of token text); at most 4 GiB is honoured.
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

impl Limits {
    /// The error a value breaks when a token brings it to `bytes` bytes, after `tokens`
    /// tokens, with `depth` containers open; checked in QEMU's order.
    fn exceeded(&self, bytes: usize, tokens: usize, depth: i64) -> Option<&'static str> {
        if bytes >= self.max_bytes {
            Some(SIZE_LIMIT)
        } else if tokens >= self.max_tokens {
            Some(COUNT_LIMIT)
        } else if depth > self.max_nesting as i64 {
            Some(NESTING_LIMIT)
        } else {
            None
        }
    }
}

/// One complete item cut from the input stream.
#[derive(Debug)]
pub enum Frame {
    /// A complete, well-formed JSON value.
    Value(ParsedValue),
    /// A complete request object, split into its members (only from a decoder that
    /// [splits requests](JsonDecoder::split_requests)). The same input may as well come as
    /// a `Value`: [`Envelope::into_parsed`] gives the value it would have been.
    Request(Envelope),
    /// A lexical, syntax or limit error. The string is QEMU's `GenericError` desc; the
    /// reply carries no id.
    Error(String),
}

/// A parsed JSON value, plus its top-level `id` member when it is an object.
#[derive(Debug)]
pub struct ParsedValue {
    /// The value itself (numbers: i64, else u64, else f64, as in QEMU).
    pub value: Value,
    /// The `id` member of a top-level object (see [`Id`] for its text and key); `None` for
    /// non-objects and objects without `id`.
    pub id: Option<Id>,
}
