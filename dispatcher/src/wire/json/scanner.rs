//! QEMU's JSON lexer as a byte-level state machine: the one definition of what a token is.
//!
//! [`lex`] runs the transition table from a saved state and reports where the lexeme ends
//! and what kind of token it is. The streaming decoder calls it with its saved state and a
//! stop offset (the size limit); the single-pass path calls it from `START` over a whole
//! buffer. Both hand the token boundaries they get to the grammar.

use super::strings::plain_len;

/// Declares `u8` constants numbered in order from a first value.
macro_rules! numbered {
    ($n:expr;) => {};
    ($n:expr; $(#[$doc:meta])* $vis:vis $name:ident $(, $($rest:tt)*)?) => {
        $(#[$doc])*
        $vis const $name: u8 = $n;
        numbered!($n + 1; $($($rest)*)?);
    };
}

// Lexer states. `ERR` doubles as "lexical error" when a transition yields it. The two
// string-body states `DQ` and `SQ` are adjacent, so testing for either is one comparison.
numbered!(0;
    ERR, pub(super) RECOVERY, DQ, SQ, DQ_ESC, SQ_ESC, ZERO, EXP_DIGITS, EXP_SIGN, EXP_E,
    MANT_DIGITS, MANT, DIGITS, SIGN, KEYWORD, pub(super) WS, pub(super) START,
);
const NSTATES: usize = START as usize + 1;

// Transition results >= TOKEN are completed tokens.
const TOKEN: u8 = 32;
numbered!(TOKEN;
    pub(super) T_LCURLY, pub(super) T_RCURLY, pub(super) T_LSQUARE, pub(super) T_RSQUARE,
    pub(super) T_COLON, pub(super) T_COMMA, pub(super) T_INT, pub(super) T_FLOAT,
    pub(super) T_KW, pub(super) T_STR,
    /// Whitespace, or garbage skipped after a lexical error: not a token of any value.
    pub(super) T_SKIP,
    /// Not produced by the table: the end of a value's tokens.
    pub(super) T_END,
    /// A `T_STR` whose body is all printable ASCII without `"` or `\`, so it is its own
    /// value; found when the string is lexed in one go from its opening quote.
    pub(super) T_PLAIN_STR,
);

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
    set(&mut t[RECOVERY as usize], 0, 0x1F, T_SKIP | LA);
    set(&mut t[RECOVERY as usize], 0x20, 0xFD, RECOVERY);
    set(&mut t[RECOVERY as usize], 0xFE, 0xFF, T_SKIP | LA);
    t[RECOVERY as usize][b'\t' as usize] = RECOVERY;
    let mut k = 0;
    while k < 6 {
        t[RECOVERY as usize][b"[]{}:,"[k] as usize] = T_SKIP | LA;
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

/// Where [`lex`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lexed {
    /// A token of `kind` (a `T_*` constant, `T_SKIP` included) ends at `end`, exclusive;
    /// the lexer is back in `START` there.
    Token {
        /// The token's kind.
        kind: u8,
        /// Offset just past its last byte.
        end: usize,
    },
    /// The byte at `at` is a lexical error.
    Error {
        /// Offset of the offending byte.
        at: usize,
    },
    /// The stop offset was reached in the middle of a lexeme, in `state`.
    More {
        /// The state to resume in.
        state: u8,
    },
}

/// Runs the lexer from `state` over `src[i..stop]` until one lexeme ends (a token, or a
/// run of whitespace or skipped garbage as `T_SKIP`), a lexical error, or `stop`.
#[inline(always)]
pub(super) fn lex(mut state: u8, src: &[u8], mut i: usize, stop: usize) -> Lexed {
    if state == START && i < stop {
        // The first step by hand: most tokens are one byte of punctuation, and most strings
        // are plain (no transition out of `START` looks ahead).
        let next = TABLE[START as usize][src[i] as usize];
        if next >= TOKEN {
            return Lexed::Token {
                kind: next,
                end: i + 1,
            };
        }
        if next == ERR {
            return Lexed::Error { at: i };
        }
        state = next;
        i += 1;
        if state == DQ {
            i += plain_len(&src[i..stop]);
            if i < stop && src[i] == b'"' {
                return Lexed::Token {
                    kind: T_PLAIN_STR,
                    end: i + 1,
                };
            }
        }
    }
    while i < stop {
        if state.wrapping_sub(DQ) <= SQ - DQ {
            // Through the body of a string: plain ASCII a word at a time, then byte by byte.
            if state == DQ {
                i += plain_len(&src[i..stop]);
            }
            let row = &TABLE[state as usize];
            while i < stop && row[src[i] as usize] == state {
                i += 1;
            }
            if i == stop {
                break;
            }
        }
        let next = TABLE[state as usize][src[i] as usize];
        let kind = next & !LA;
        if kind >= TOKEN {
            let end = if next & LA == 0 { i + 1 } else { i };
            return Lexed::Token { kind, end };
        }
        if kind == ERR {
            return Lexed::Error { at: i };
        }
        state = kind;
        i += 1;
    }
    Lexed::More { state }
}

/// The token a lexeme pending in `state` is when the input ends there: a number or
/// keyword (complete but for the lookahead byte that would end it), else nothing.
pub(super) fn token_at_end(state: u8) -> Option<u8> {
    // The lexeme ends as it would before a space.
    let next = TABLE[state as usize][b' ' as usize];
    let kind = next & !LA;
    (next & LA != 0 && kind != T_SKIP).then_some(kind)
}

/// One token of a value, as offsets from the value's first byte.
#[derive(Clone, Copy, Debug)]
pub(super) struct Token {
    /// Its kind, a `T_*` constant.
    pub(super) kind: u8,
    /// Offset of its first byte.
    pub(super) start: u32,
    /// Offset just past its last byte.
    pub(super) end: u32,
}
