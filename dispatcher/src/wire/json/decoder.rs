//! The streaming decoder: QEMU's JSON streamer (bracket counting, limits, lexical-error
//! recovery) over the scanner, cutting the stream into frames. It records the tokens of
//! the pending value and hands them to the grammar once the value is complete.

use bytes::{Buf, BytesMut};

use super::grammar::{self, Recorded};
use super::scanner::{
    self, Lexed, RECOVERY, START, T_LCURLY, T_LSQUARE, T_RCURLY, T_RSQUARE, T_SKIP, Token, WS,
};
use super::utf8::lossy;
use super::{Frame, Limits, SIZE_LIMIT, envelope, fast};

/// Cuts a byte stream into JSON values exactly where QEMU's JSON streamer would, with
/// QEMU's lexical rules, error texts and limits.
///
/// Offsets below are relative to the start of the caller's buffer; bytes before `pos`
/// have been scanned already and belong to the pending frame.
#[derive(Debug)]
pub struct JsonDecoder {
    limits: Limits,
    /// Lexer state after the bytes before `pos`.
    state: u8,
    /// Bytes of the buffer already scanned.
    pos: usize,
    /// Start of the token being lexed.
    tok_start: usize,
    /// Start of the first token of the pending value (valid when `tokens` is not empty).
    value_start: usize,
    /// Tokens of the pending value, offsets from `value_start`.
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    /// After a limit error: the rest of the oversized value is being skipped.
    discarding: bool,
    /// Scratch stack for the grammar, kept to reuse its allocation.
    stack: Vec<grammar::Open>,
    /// Request objects come as [`Frame::Request`].
    split_requests: bool,
}

impl Default for JsonDecoder {
    fn default() -> Self {
        JsonDecoder::new(Limits::default())
    }
}

impl JsonDecoder {
    /// A decoder with the given limits.
    pub fn new(limits: Limits) -> Self {
        JsonDecoder {
            limits: Limits {
                // Token offsets are 32-bit.
                max_bytes: limits.max_bytes.min(u32::MAX as usize),
                ..limits
            },
            state: START,
            pos: 0,
            tok_start: 0,
            value_start: 0,
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            discarding: false,
            stack: Vec::new(),
            split_requests: false,
        }
    }

    /// This decoder hands request objects over as [`Frame::Request`] wherever it can,
    /// split into their members without building the object (see [`Envelope`]); every
    /// other input still comes as [`Frame::Value`] or [`Frame::Error`].
    ///
    /// [`Envelope`]: super::Envelope
    pub fn split_requests(mut self) -> Self {
        self.split_requests = true;
        self
    }

    /// Takes the next frame from `buf`, consuming exactly its bytes (the lookahead byte that
    /// ends a top-level number or keyword stays in `buf`). `None` means more input is needed;
    /// bytes scanned so far may then have been consumed into the decoder's state.
    /// Whitespace-only input yields `None`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        if self.pos == 0 && self.is_idle() && self.state != RECOVERY {
            // Nothing of a value is pending: try the whole value in one pass.
            if self.split_requests {
                if let Some((request, end)) = envelope::decode(buf, &self.limits, &mut self.stack) {
                    self.state = START;
                    self.consume(buf, end);
                    return Some(Frame::Request(request));
                }
            }
            if let Some((value, end)) = fast::decode(buf, &self.limits, &mut self.stack) {
                self.state = START;
                self.consume(buf, end);
                return Some(Frame::Value(value));
            }
        }
        let len = buf.len();
        let mut i = self.pos.min(len);
        while i < len {
            if self.state == START {
                self.tok_start = i;
            }
            // Whitespace and skipped garbage between values do not count towards the size
            // limit; everything else stops where the pending value would reach it.
            let uncounted = self.tokens.is_empty() && matches!(self.state, WS | RECOVERY);
            let stop = if self.discarding || uncounted {
                len
            } else {
                len.min(self.value_begin().saturating_add(self.limits.max_bytes))
            };
            match scanner::lex(self.state, buf, i, stop) {
                Lexed::Token { kind, end } => {
                    self.state = START;
                    i = end;
                    if kind != T_SKIP {
                        if let Some(frame) = self.token(kind, buf, end) {
                            return Some(frame);
                        }
                    }
                }
                Lexed::Error { at } => {
                    let end = at + 1;
                    self.state = RECOVERY;
                    if self.discarding {
                        // The oversized value is over; nothing more is reported for it.
                        self.reset_value();
                        i = end;
                        continue;
                    }
                    let text = lossy(&buf[self.tok_start.min(at)..end]);
                    self.reset_value();
                    self.consume(buf, end);
                    return Some(Frame::Error(format!("JSON parse error, stray '{text}'")));
                }
                Lexed::More { state } => {
                    self.state = state;
                    i = stop;
                    let counted = !self.tokens.is_empty() || !matches!(state, WS | RECOVERY);
                    if !self.discarding
                        && counted
                        && i - self.value_begin() >= self.limits.max_bytes
                    {
                        return Some(self.limit_error(buf, i, SIZE_LIMIT));
                    }
                }
            }
        }
        self.compact(buf, i);
        None
    }

    /// Like [`decode`](Self::decode) once the peer has sent EOF: a pending top-level number
    /// or keyword (which lacks its lookahead byte) is flushed as a frame; a partial object,
    /// array or string is dropped without a frame. The decoder is then idle and `buf` empty.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        if let Some(frame) = self.decode(buf) {
            return Some(frame);
        }
        let frame = match scanner::token_at_end(self.state) {
            Some(kind) if self.tokens.is_empty() && !self.discarding => {
                self.state = START;
                let end = self.pos.min(buf.len());
                self.token(kind, buf, end)
            }
            _ => None,
        };
        buf.clear();
        let split_requests = self.split_requests;
        *self = JsonDecoder::new(self.limits);
        self.split_requests = split_requests;
        frame
    }

    /// True when no partial value is pending: nothing but whitespace or skipped garbage has
    /// been seen since the last frame.
    pub fn is_idle(&self) -> bool {
        !self.discarding && self.tokens.is_empty() && matches!(self.state, START | WS | RECOVERY)
    }

    /// Where the size of the pending value is measured from.
    fn value_begin(&self) -> usize {
        if self.tokens.is_empty() {
            self.tok_start
        } else {
            self.value_start
        }
    }

    fn reset_value(&mut self) {
        // A huge value's token list is not kept for the rest of the connection.
        if self.tokens.capacity() > 1 << 12 {
            self.tokens = Vec::new();
        }
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.discarding = false;
    }

    /// Drops the first `end` bytes (a finished frame) and rebases offsets.
    fn consume(&mut self, buf: &mut BytesMut, end: usize) {
        buf.advance(end);
        self.pos = 0;
        self.tok_start = self.tok_start.saturating_sub(end);
        self.value_start = self.value_start.saturating_sub(end);
    }

    /// At the end of input, keeps only the bytes still needed for the pending value.
    fn compact(&mut self, buf: &mut BytesMut, scanned: usize) {
        let keep_from = if self.discarding {
            scanned
        } else if !self.tokens.is_empty() {
            self.value_start
        } else if matches!(self.state, START | WS | RECOVERY) {
            scanned
        } else {
            self.tok_start
        };
        let keep_from = keep_from.min(scanned);
        self.consume(buf, keep_from);
        self.pos = scanned - keep_from;
    }

    /// True when the bracket counts end a value, as in QEMU: they balance or either goes
    /// negative.
    fn balanced(&self) -> bool {
        !((self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0)
    }

    /// Streamer step for a completed token ending at `end`.
    fn token(&mut self, kind: u8, buf: &mut BytesMut, end: usize) -> Option<Frame> {
        match kind {
            T_LCURLY => self.braces += 1,
            T_RCURLY => self.braces -= 1,
            T_LSQUARE => self.brackets += 1,
            T_RSQUARE => self.brackets -= 1,
            _ => {}
        }
        let complete = self.balanced();
        if self.discarding {
            if complete {
                self.reset_value();
            }
            return None;
        }
        if self.tokens.is_empty() {
            self.value_start = self.tok_start;
        }
        let exceeded = self.limits.exceeded(
            end - self.value_start,
            self.tokens.len(),
            self.braces + self.brackets,
        );
        if let Some(desc) = exceeded {
            return Some(self.limit_error(buf, end, desc));
        }
        self.tokens.push(Token {
            kind,
            start: (self.tok_start - self.value_start) as u32,
            end: (end - self.value_start) as u32,
        });
        if !complete {
            return None;
        }
        let src = &buf[self.value_start..end];
        let parsed = grammar::parse(&mut Recorded::new(src, &self.tokens), &mut self.stack);
        self.reset_value();
        self.consume(buf, end);
        Some(parsed.map_or_else(Frame::Error, Frame::Value))
    }

    /// Reports a limit error for the bytes up to `end`, then skips the rest of the value:
    /// the current token and everything until the brackets balance (the newer upstream
    /// recovery rather than 10.0's cascade of follow-up errors).
    fn limit_error(&mut self, buf: &mut BytesMut, end: usize, desc: &str) -> Frame {
        let balanced = self.balanced();
        self.tokens.clear();
        if balanced && self.state == START {
            self.reset_value();
        } else {
            self.discarding = true;
        }
        self.consume(buf, end);
        Frame::Error(desc.to_owned())
    }
}
