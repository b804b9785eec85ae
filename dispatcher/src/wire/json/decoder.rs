//! Byte-level scanner: QEMU's lexer state machine plus its streamer (bracket counting,
//! limits, lexical-error recovery), cutting the stream into frames.

use bytes::{Buf, BytesMut};

use super::utf8::lossy;
use super::{Frame, Limits, fast, parser};

// Lexer states. `ERR` doubles as "lexical error" when a transition yields it.
const ERR: u8 = 0;
const RECOVERY: u8 = 1;
const DQ_ESC: u8 = 2;
const DQ: u8 = 3;
const SQ_ESC: u8 = 4;
const SQ: u8 = 5;
const ZERO: u8 = 6;
const EXP_DIGITS: u8 = 7;
const EXP_SIGN: u8 = 8;
const EXP_E: u8 = 9;
const MANT_DIGITS: u8 = 10;
const MANT: u8 = 11;
const DIGITS: u8 = 12;
const SIGN: u8 = 13;
const KEYWORD: u8 = 14;
const WS: u8 = 15;
const START: u8 = 16;
const NSTATES: usize = 17;

// Transition results >= TOKEN are completed tokens.
const TOKEN: u8 = 32;
const T_LCURLY: u8 = 32;
const T_RCURLY: u8 = 33;
const T_LSQUARE: u8 = 34;
const T_RSQUARE: u8 = 35;
const T_COLON: u8 = 36;
const T_COMMA: u8 = 37;
const T_INT: u8 = 38;
const T_FLOAT: u8 = 39;
const T_KW: u8 = 40;
const T_STR: u8 = 41;
const T_SKIP: u8 = 42;
/// The byte ends the current token but is not part of it; it is examined again.
const LA: u8 = 0x80;

const fn set(row: &mut [u8; 256], lo: u8, hi: u8, v: u8) {
    let mut b = lo as usize;
    while b <= hi as usize {
        row[b] = v;
        b += 1;
    }
}

/// Transition table equivalent to QEMU's lexer (without `%` interpolation).
const fn build() -> [[u8; 256]; NSTATES] {
    let mut t = [[ERR; 256]; NSTATES];
    // Recovery skips everything up to a structural char, a control char other than TAB,
    // or 0xFE/0xFF; that byte is then lexed afresh.
    set(&mut t[RECOVERY as usize], 0, 0x1F, START | LA);
    set(&mut t[RECOVERY as usize], 0x20, 0xFD, RECOVERY);
    set(&mut t[RECOVERY as usize], 0xFE, 0xFF, START | LA);
    t[RECOVERY as usize][b'\t' as usize] = RECOVERY;
    let mut k = 0;
    while k < 6 {
        t[RECOVERY as usize][b"[]{}:,"[k] as usize] = START | LA;
        k += 1;
    }

    set(&mut t[DQ_ESC as usize], 0x20, 0xFD, DQ);
    set(&mut t[DQ as usize], 0x20, 0xFD, DQ);
    t[DQ as usize][b'\\' as usize] = DQ_ESC;
    t[DQ as usize][b'"' as usize] = T_STR;
    set(&mut t[SQ_ESC as usize], 0x20, 0xFD, SQ);
    set(&mut t[SQ as usize], 0x20, 0xFD, SQ);
    t[SQ as usize][b'\\' as usize] = SQ_ESC;
    t[SQ as usize][b'\'' as usize] = T_STR;

    set(&mut t[ZERO as usize], 0, 0xFF, T_INT | LA);
    set(&mut t[ZERO as usize], b'0', b'9', ERR);
    t[ZERO as usize][b'.' as usize] = MANT;
    t[ZERO as usize][b'e' as usize] = EXP_E;
    t[ZERO as usize][b'E' as usize] = EXP_E;

    set(&mut t[EXP_DIGITS as usize], 0, 0xFF, T_FLOAT | LA);
    set(&mut t[EXP_DIGITS as usize], b'0', b'9', EXP_DIGITS);
    set(&mut t[EXP_SIGN as usize], b'0', b'9', EXP_DIGITS);
    t[EXP_E as usize][b'-' as usize] = EXP_SIGN;
    t[EXP_E as usize][b'+' as usize] = EXP_SIGN;
    set(&mut t[EXP_E as usize], b'0', b'9', EXP_DIGITS);

    set(&mut t[MANT_DIGITS as usize], 0, 0xFF, T_FLOAT | LA);
    set(&mut t[MANT_DIGITS as usize], b'0', b'9', MANT_DIGITS);
    t[MANT_DIGITS as usize][b'e' as usize] = EXP_E;
    t[MANT_DIGITS as usize][b'E' as usize] = EXP_E;
    set(&mut t[MANT as usize], b'0', b'9', MANT_DIGITS);

    set(&mut t[DIGITS as usize], 0, 0xFF, T_INT | LA);
    set(&mut t[DIGITS as usize], b'0', b'9', DIGITS);
    t[DIGITS as usize][b'e' as usize] = EXP_E;
    t[DIGITS as usize][b'E' as usize] = EXP_E;
    t[DIGITS as usize][b'.' as usize] = MANT;

    t[SIGN as usize][b'0' as usize] = ZERO;
    set(&mut t[SIGN as usize], b'1', b'9', DIGITS);

    set(&mut t[KEYWORD as usize], 0, 0xFF, T_KW | LA);
    set(&mut t[KEYWORD as usize], b'a', b'z', KEYWORD);

    set(&mut t[WS as usize], 0, 0xFF, T_SKIP | LA);
    let st = START as usize;
    let mut w = 0;
    while w < 4 {
        t[WS as usize][b" \t\r\n"[w] as usize] = WS;
        t[st][b" \t\r\n"[w] as usize] = WS;
        w += 1;
    }

    t[st][b'"' as usize] = DQ;
    t[st][b'\'' as usize] = SQ;
    t[st][b'0' as usize] = ZERO;
    set(&mut t[st], b'1', b'9', DIGITS);
    t[st][b'-' as usize] = SIGN;
    t[st][b'{' as usize] = T_LCURLY;
    t[st][b'}' as usize] = T_RCURLY;
    t[st][b'[' as usize] = T_LSQUARE;
    t[st][b']' as usize] = T_RSQUARE;
    t[st][b',' as usize] = T_COMMA;
    t[st][b':' as usize] = T_COLON;
    set(&mut t[st], b'a', b'z', KEYWORD);
    t
}

static TABLE: [[u8; 256]; NSTATES] = build();

const SIZE_LIMIT: &str = "JSON token size limit exceeded";
const COUNT_LIMIT: &str = "JSON token count limit exceeded";
const NESTING_LIMIT: &str = "JSON nesting depth limit exceeded";

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
    /// Start of the first token of the pending value (valid when `tokens > 0`).
    value_start: usize,
    /// Tokens of the pending value.
    tokens: usize,
    braces: i64,
    brackets: i64,
    /// After a limit error: the rest of the oversized value is being skipped.
    discarding: bool,
    /// Scratch stack for the parser, kept to reuse its allocation.
    stack: Vec<parser::Open>,
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
            limits,
            state: START,
            pos: 0,
            tok_start: 0,
            value_start: 0,
            tokens: 0,
            braces: 0,
            brackets: 0,
            discarding: false,
            stack: Vec::new(),
        }
    }

    /// Takes the next frame from `buf`, consuming exactly its bytes (the lookahead byte that
    /// ends a top-level number or keyword stays in `buf`). `None` means more input is needed;
    /// bytes scanned so far may then have been consumed into the decoder's state.
    /// Whitespace-only input yields `None`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        if self.pos == 0 && self.tokens == 0 && !self.discarding && matches!(self.state, START | WS)
        {
            // Nothing of a value is pending: try the whole value in one pass.
            if let Some((value, end)) = fast::decode(buf, &self.limits, &mut self.stack) {
                self.state = START;
                self.tok_start = end;
                self.value_start = end;
                self.consume(buf, end);
                return Some(Frame::Value(value));
            }
        }
        let len = buf.len();
        let mut i = self.pos.min(len);
        while i < len {
            let st = self.state;
            if st == START {
                self.tok_start = i;
            }
            if st == DQ || st == SQ {
                // Fast path through the body of a string, stopping at the size limit.
                let row = &TABLE[st as usize];
                let stop = if self.discarding {
                    len
                } else {
                    len.min(self.value_begin().saturating_add(self.limits.max_bytes))
                };
                let from = i;
                if st == DQ {
                    i += fast::plain_len(&buf[i..stop.max(i)]);
                }
                while i < stop && row[buf[i] as usize] == st {
                    i += 1;
                }
                if i > from {
                    if !self.discarding && i - self.value_begin() >= self.limits.max_bytes {
                        return Some(self.limit_error(buf, i, SIZE_LIMIT));
                    }
                    continue;
                }
            }
            let next = TABLE[st as usize][buf[i] as usize];
            let kind = next & !LA;
            if kind >= TOKEN {
                self.state = START;
                if kind == T_SKIP {
                    continue;
                }
                let end = if next & LA == 0 { i + 1 } else { i };
                i = end;
                if let Some(frame) = self.token(kind, buf, end) {
                    return Some(frame);
                }
                continue;
            }
            match kind {
                ERR => {
                    let end = i + 1;
                    self.state = RECOVERY;
                    if self.discarding {
                        // The oversized value is over; nothing more is reported for it.
                        self.reset_value();
                        i = end;
                        continue;
                    }
                    let text = lossy(&buf[self.tok_start.min(i)..end]);
                    self.reset_value();
                    self.consume(buf, end);
                    return Some(Frame::Error(format!("JSON parse error, stray '{text}'")));
                }
                START => self.state = START,
                _ => {
                    self.state = kind;
                    i += 1;
                    let counted = self.tokens > 0 || (kind != WS && kind != RECOVERY);
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
        let kind = match self.state {
            ZERO | DIGITS => T_INT,
            MANT_DIGITS | EXP_DIGITS => T_FLOAT,
            KEYWORD => T_KW,
            _ => 0,
        };
        let frame = if kind != 0 && self.tokens == 0 && !self.discarding {
            self.state = START;
            let end = self.pos.min(buf.len());
            self.token(kind, buf, end)
        } else {
            None
        };
        buf.clear();
        *self = JsonDecoder::new(self.limits);
        frame
    }

    /// True when no partial value is pending: nothing but whitespace or skipped garbage has
    /// been seen since the last frame.
    pub fn is_idle(&self) -> bool {
        !self.discarding && self.tokens == 0 && matches!(self.state, START | WS | RECOVERY)
    }

    /// Where the size of the pending value is measured from.
    fn value_begin(&self) -> usize {
        if self.tokens > 0 {
            self.value_start
        } else {
            self.tok_start
        }
    }

    fn reset_value(&mut self) {
        self.tokens = 0;
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
        } else if self.tokens > 0 {
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

    /// Streamer step for a completed token ending at `end`.
    fn token(&mut self, kind: u8, buf: &mut BytesMut, end: usize) -> Option<Frame> {
        match kind {
            T_LCURLY => self.braces += 1,
            T_RCURLY => self.braces -= 1,
            T_LSQUARE => self.brackets += 1,
            T_RSQUARE => self.brackets -= 1,
            _ => {}
        }
        // Like QEMU: a value ends when the counts balance or either goes negative.
        let complete =
            !((self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0);
        if self.discarding {
            if complete {
                self.reset_value();
            }
            return None;
        }
        if self.tokens == 0 {
            self.value_start = self.tok_start;
        }
        let limit = if end - self.value_start >= self.limits.max_bytes {
            Some(SIZE_LIMIT)
        } else if self.tokens >= self.limits.max_tokens {
            Some(COUNT_LIMIT)
        } else if self.braces + self.brackets > self.limits.max_nesting as i64 {
            Some(NESTING_LIMIT)
        } else {
            None
        };
        if let Some(desc) = limit {
            return Some(self.limit_error(buf, end, desc));
        }
        self.tokens += 1;
        if !complete {
            return None;
        }
        let frame = parser::parse(&buf[self.value_start..end], &mut self.stack);
        self.reset_value();
        self.consume(buf, end);
        Some(frame)
    }

    /// Reports a limit error for the bytes up to `end`, then skips the rest of the value:
    /// the current token and everything until the brackets balance (the newer upstream
    /// recovery rather than 10.0's cascade of follow-up errors).
    fn limit_error(&mut self, buf: &mut BytesMut, end: usize, desc: &str) -> Frame {
        let balanced =
            !((self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0);
        self.tokens = 0;
        if balanced && self.state == START {
            self.reset_value();
        } else {
            self.discarding = true;
        }
        self.consume(buf, end);
        Frame::Error(desc.to_owned())
    }
}
