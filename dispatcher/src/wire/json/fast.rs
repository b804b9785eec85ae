//! Single-pass path for the common case: a complete object or array at the start of the
//! buffer, within the limits and without any error.
//!
//! The grammar pulls its tokens straight from the scanner as it builds the value, so each
//! byte is looked at once. Anything else (a lexical, grammar or limit error, a value not
//! complete in the buffer, a top-level scalar) makes it give up with `None` before
//! anything is consumed, and the streaming decoder then handles the input from scratch.
//! So whenever it succeeds, the result is exactly the streaming path's: the same value and
//! id (the same grammar builds them), the same end, and no error the streaming path would
//! have reported.

use super::grammar::{self, Open, Source};
use super::scanner::{Lexed, START, T_END, T_LCURLY, T_LSQUARE, T_RCURLY, T_RSQUARE, T_SKIP, lex};
use super::{Limits, ParsedValue};

/// Tokens lexed on demand from a whole buffer; the end of the tokens at the first sign
/// that the streaming path is needed.
pub(super) struct Live<'a> {
    src: &'a [u8],
    limits: &'a Limits,
    pos: usize,
    tokens: usize,
    depth: i64,
}

impl<'a> Source<'a> for Live<'a> {
    #[inline(always)]
    fn next(&mut self) -> (u8, &'a [u8]) {
        loop {
            let start = self.pos;
            let Lexed::Token { kind, end } = lex(START, self.src, start, self.src.len()) else {
                return (T_END, &[]);
            };
            self.pos = end;
            self.tokens += 1;
            match kind {
                T_SKIP => {
                    self.tokens -= 1;
                    continue;
                }
                T_LCURLY | T_LSQUARE => {
                    // Only an opening bracket can make the value too deep; the byte limit
                    // is the slice's end, the token count is checked once at the end.
                    self.depth += 1;
                    if self.limits.exceeded(end, 0, self.depth).is_some() {
                        return (T_END, &[]);
                    }
                }
                T_RCURLY | T_RSQUARE => self.depth -= 1,
                _ => {}
            }
            return (kind, &self.src[start..end]);
        }
    }
}

/// Decodes the object or array at the start of `buf` (after whitespace) if it is complete,
/// within `limits` and free of errors. Returns the value and the number of bytes it ends
/// at; `None` leaves everything to the streaming path.
pub(super) fn decode(
    buf: &[u8],
    limits: &Limits,
    stack: &mut Vec<Open>,
) -> Option<(ParsedValue, usize)> {
    let (start, mut live) = Live::at_container(buf, limits)?;
    let parsed = grammar::parse(&mut live, stack).ok()?;
    let end = live.finish()?;
    Some((parsed, start + end))
}

impl<'a> Live<'a> {
    /// Tokens of the object or array that starts `buf` after any whitespace, and where it
    /// starts; `None` when something else does.
    pub(super) fn at_container(buf: &'a [u8], limits: &'a Limits) -> Option<(usize, Self)> {
        let start = match lex(START, buf, 0, buf.len()) {
            Lexed::Token { kind: T_SKIP, end } => end,
            _ => 0,
        };
        if !matches!(buf.get(start), Some(b'{' | b'[')) {
            return None;
        }
        // A value must end before `max_bytes` of text; a longer one is left to the
        // streaming path (which reports it) without lexing further here.
        let cap = start
            .saturating_add(limits.max_bytes.saturating_sub(1))
            .min(buf.len());
        let live = Live {
            src: &buf[start..cap],
            limits,
            pos: 0,
            tokens: 0,
            depth: 0,
        };
        Some((start, live))
    }

    /// After the value's last token: where it ends, unless it has more tokens than the
    /// limit allows (counted before the last token, as the streaming path checks it).
    pub(super) fn finish(&self) -> Option<usize> {
        if self.limits.exceeded(self.pos, self.tokens - 1, 0).is_some() {
            return None;
        }
        Some(self.pos)
    }
}
