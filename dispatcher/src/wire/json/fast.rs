//! Single-pass fast path for the common case: a complete object or array of standard JSON
//! at the start of the buffer, within the limits and without any error.
//!
//! It lexes (with QEMU's lexer rules, restricted to standard JSON) and builds the value in
//! one pass. Anything else (single quotes, a lexical, grammar or limit error, a value not
//! complete in the buffer, a top-level scalar) makes it give up with `None` before anything
//! is consumed, and the general scanner plus parser then handle the input from scratch.
//! So whenever it succeeds, the result is exactly the general path's: the same value, the
//! same end, and no error the general path would have reported.

use serde_json::map::Entry;
use serde_json::{Map, Value};

use super::parser::{Open, finish, number};
use super::utf8::decode_string;
use super::{Limits, ParsedValue};

/// Bytes that end the plain part of a string body: controls, `"`, `\` and non-ASCII.
const fn plain_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0x20;
    while b < 0x80 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
}

static PLAIN: [bool; 256] = plain_table();

/// Length of the leading run of `s` made of printable ASCII other than `"` and `\`.
#[inline]
pub(super) fn plain_len(s: &[u8]) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    // Eight bytes at a time while the strings are long; the lowest flagged byte is exact
    // (borrows only propagate upwards from a byte that is itself flagged).
    for chunk in s.chunks_exact(8) {
        let w = u64::from_le_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        let ctrl = w.wrapping_sub(LO * 0x20) & !w;
        let q = w ^ (LO * u64::from(b'"'));
        let bs = w ^ (LO * u64::from(b'\\'));
        let quote = q.wrapping_sub(LO) & !q;
        let backslash = bs.wrapping_sub(LO) & !bs;
        let hit = (ctrl | quote | backslash | w) & HI;
        if hit != 0 {
            return i + (hit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < s.len() && PLAIN[s[i] as usize] {
        i += 1;
    }
    i
}

/// `bytes` (all ASCII) as a string.
#[inline]
fn ascii_string(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap_or_default()
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

struct Fast<'a> {
    src: &'a [u8],
    pos: usize,
    tokens: usize,
}

impl Fast<'_> {
    #[inline]
    fn skip_ws(&mut self) {
        while self.pos < self.src.len() && is_ws(self.src[self.pos]) {
            self.pos += 1;
        }
    }

    /// The next byte after whitespace, without consuming it.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.src.get(self.pos).copied()
    }

    /// Consumes the punctuation token `c` after whitespace, or gives up.
    #[inline]
    fn expect(&mut self, c: u8) -> Option<()> {
        if self.peek()? != c {
            return None;
        }
        self.pos += 1;
        self.tokens += 1;
        Some(())
    }

    /// A double-quoted string token starting at `pos`.
    #[inline]
    fn string(&mut self) -> Option<String> {
        let start = self.pos;
        let body = start + 1;
        let n = plain_len(&self.src[body..]);
        let end = body + n;
        self.tokens += 1;
        if self.src.get(end) == Some(&b'"') {
            self.pos = end + 1;
            // Plain ASCII: the bytes are the value.
            return Some(ascii_string(&self.src[body..end]));
        }
        // Escapes or non-ASCII: find the end with the lexer's rules, then decode as usual.
        let mut i = end;
        loop {
            let b = *self.src.get(i)?;
            match b {
                b'"' => break,
                b'\\' => {
                    let e = *self.src.get(i + 1)?;
                    if !(0x20..=0xFD).contains(&e) {
                        return None;
                    }
                    i += 2;
                }
                0x20..=0xFD => i += 1,
                _ => return None,
            }
        }
        self.pos = i + 1;
        decode_string(&self.src[start..=i]).ok()
    }

    /// A number token starting at `pos` (`-` or a digit), with QEMU's lexer rules.
    #[inline]
    fn number(&mut self) -> Option<Value> {
        let src = self.src;
        let start = self.pos;
        let mut i = start;
        if src[i] == b'-' {
            i += 1;
        }
        match *src.get(i)? {
            b'0' => {
                i += 1;
                if src.get(i)?.is_ascii_digit() {
                    return None;
                }
            }
            b'1'..=b'9' => {
                i += 1;
                while src.get(i)?.is_ascii_digit() {
                    i += 1;
                }
            }
            _ => return None,
        }
        let mut integer = true;
        if src[i] == b'.' {
            integer = false;
            i += 1;
            if !src.get(i)?.is_ascii_digit() {
                return None;
            }
            while src.get(i)?.is_ascii_digit() {
                i += 1;
            }
        }
        if matches!(src[i], b'e' | b'E') {
            integer = false;
            i += 1;
            if matches!(*src.get(i)?, b'+' | b'-') {
                i += 1;
            }
            if !src.get(i)?.is_ascii_digit() {
                return None;
            }
            while src.get(i)?.is_ascii_digit() {
                i += 1;
            }
        }
        self.pos = i;
        self.tokens += 1;
        let text = std::str::from_utf8(&src[start..i]).ok()?;
        Some(number(text, integer))
    }

    /// A keyword token starting at `pos`.
    #[inline]
    fn keyword(&mut self) -> Option<Value> {
        let start = self.pos;
        let mut i = start;
        while self.src.get(i)?.is_ascii_lowercase() {
            i += 1;
        }
        self.pos = i;
        self.tokens += 1;
        match &self.src[start..i] {
            b"true" => Some(Value::Bool(true)),
            b"false" => Some(Value::Bool(false)),
            b"null" => Some(Value::Null),
            _ => None,
        }
    }

    /// An object key and its colon, after `{` or `,`.
    #[inline]
    fn key(&mut self) -> Option<String> {
        if self.peek()? != b'"' {
            return None;
        }
        let k = self.string()?;
        self.expect(b':')?;
        Some(k)
    }

    fn run(
        &mut self,
        stack: &mut Vec<Open>,
        max_nesting: usize,
    ) -> Option<(Value, Option<(usize, usize)>)> {
        let mut id_start = None;
        let mut id_span = None;
        'value: loop {
            let b = self.peek()?;
            let mut value = match b {
                b'{' | b'[' => {
                    self.pos += 1;
                    self.tokens += 1;
                    if stack.len() >= max_nesting {
                        return None;
                    }
                    if b == b'{' {
                        if self.peek()? == b'}' {
                            self.pos += 1;
                            self.tokens += 1;
                            Value::Object(Map::new())
                        } else {
                            let k = self.key()?;
                            if stack.is_empty() && k == "id" {
                                self.skip_ws();
                                id_start = Some(self.pos);
                            }
                            stack.push(Open::Object(Map::new(), Some(k)));
                            continue 'value;
                        }
                    } else if self.peek()? == b']' {
                        self.pos += 1;
                        self.tokens += 1;
                        Value::Array(Vec::new())
                    } else {
                        stack.push(Open::Array(Vec::new()));
                        continue 'value;
                    }
                }
                _ if stack.is_empty() => return None,
                b'"' => Value::String(self.string()?),
                b'-' | b'0'..=b'9' => self.number()?,
                b'a'..=b'z' => self.keyword()?,
                _ => return None,
            };
            // Fold the finished value into its enclosing containers.
            loop {
                let depth = stack.len();
                match stack.last_mut() {
                    None => return Some((value, id_span)),
                    Some(Open::Object(map, key)) => {
                        let k = key.take()?;
                        if depth == 1 && k == "id" {
                            id_span = id_start.map(|s| (s, self.pos));
                        }
                        match map.entry(k) {
                            Entry::Occupied(_) => return None,
                            Entry::Vacant(e) => {
                                e.insert(value);
                            }
                        }
                        match self.peek()? {
                            b',' => {
                                self.pos += 1;
                                self.tokens += 1;
                                let k = self.key()?;
                                if depth == 1 && k == "id" {
                                    self.skip_ws();
                                    id_start = Some(self.pos);
                                }
                                *key = Some(k);
                                continue 'value;
                            }
                            b'}' => {
                                self.pos += 1;
                                self.tokens += 1;
                            }
                            _ => return None,
                        }
                        let Some(Open::Object(map, _)) = stack.pop() else {
                            return None;
                        };
                        value = Value::Object(map);
                    }
                    Some(Open::Array(items)) => {
                        items.push(value);
                        match self.peek()? {
                            b',' => {
                                self.pos += 1;
                                self.tokens += 1;
                                continue 'value;
                            }
                            b']' => {
                                self.pos += 1;
                                self.tokens += 1;
                            }
                            _ => return None,
                        }
                        let Some(Open::Array(items)) = stack.pop() else {
                            return None;
                        };
                        value = Value::Array(items);
                    }
                }
            }
        }
    }
}

/// Decodes the object or array at the start of `buf` (after whitespace) if it is complete,
/// standard JSON, within `limits` and free of errors. Returns the value and the number of
/// bytes it ends at; `None` leaves everything to the general path.
pub(super) fn decode(
    buf: &[u8],
    limits: &Limits,
    stack: &mut Vec<Open>,
) -> Option<(ParsedValue, usize)> {
    let start = buf.iter().position(|&b| !is_ws(b))?;
    if !matches!(buf[start], b'{' | b'[') {
        return None;
    }
    // A value must end before `max_bytes` of text; a longer one is left to the general
    // path (which reports it) without building it here.
    let cap = start
        .saturating_add(limits.max_bytes.saturating_sub(1))
        .min(buf.len());
    let src = &buf[start..cap];
    let mut p = Fast {
        src,
        pos: 0,
        tokens: 0,
    };
    stack.clear();
    let result = p.run(stack, limits.max_nesting);
    stack.clear();
    let (value, span) = result?;
    if p.tokens > limits.max_tokens {
        return None;
    }
    Some((finish(value, span, src), start + p.pos))
}
