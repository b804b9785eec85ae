//! Grammar stage: turns the bytes of one complete, lexically valid value into a
//! [`serde_json::Value`], with QEMU's error precedence and texts.
//!
//! The scanner has already checked every token, so this stage re-tokenizes with a much
//! simpler tokenizer. It is iterative (an explicit stack) rather than recursive, so deep
//! nesting cannot overflow the thread's stack whatever `max_nesting` is set to. Errors are
//! raised in the same order as QEMU's recursive-descent parser, which reports the first one.

use serde_json::map::Entry;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use super::fast::plain_len;
use super::utf8::decode_string;
use super::{Frame, ParsedValue};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Int,
    Float,
    Kw,
    End,
}

const PREMATURE: &str = "JSON parse error, premature EOI";

/// One open container.
#[derive(Debug)]
pub(super) enum Open {
    /// An object and, once read, the key whose value is being parsed.
    Object(Map<String, Value>, Option<String>),
    Array(Vec<Value>),
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
    tok_start: usize,
    tok_end: usize,
}

impl<'a> Parser<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.src.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek_is(&mut self, c: u8) -> bool {
        self.skip_ws();
        self.src.get(self.pos) == Some(&c)
    }

    fn next(&mut self) -> Tok {
        self.skip_ws();
        self.tok_start = self.pos;
        let Some(&b) = self.src.get(self.pos) else {
            self.tok_end = self.pos;
            return Tok::End;
        };
        self.pos += 1;
        let tok = match b {
            b'{' => Tok::LCurly,
            b'}' => Tok::RCurly,
            b'[' => Tok::LSquare,
            b']' => Tok::RSquare,
            b':' => Tok::Colon,
            b',' => Tok::Comma,
            b'"' | b'\'' => {
                if b == b'"' {
                    self.pos += plain_len(&self.src[self.pos..]);
                }
                while let Some(&c) = self.src.get(self.pos) {
                    self.pos += if c == b'\\' { 2 } else { 1 };
                    if c == b {
                        break;
                    }
                }
                self.pos = self.pos.min(self.src.len());
                Tok::Str
            }
            b'-' | b'0'..=b'9' => {
                // JSON's number grammar, as the lexer cut it: a sign only first or right
                // after the exponent marker, one exponent. `[1-2]` is two numbers.
                let (mut float, mut exponent, mut prev) = (false, false, b);
                while let Some(&c) = self.src.get(self.pos) {
                    match c {
                        b'0'..=b'9' => {}
                        b'-' | b'+' if matches!(prev, b'e' | b'E') => {}
                        b'.' if !float => float = true,
                        b'e' | b'E' if !exponent => (float, exponent) = (true, true),
                        _ => break,
                    }
                    prev = c;
                    self.pos += 1;
                }
                if float { Tok::Float } else { Tok::Int }
            }
            b'a'..=b'z' => {
                while let Some(b'a'..=b'z') = self.src.get(self.pos) {
                    self.pos += 1;
                }
                Tok::Kw
            }
            // Unreachable for scanner output; treat as the end so nothing panics.
            _ => Tok::End,
        };
        self.tok_end = self.pos;
        tok
    }

    fn text(&self) -> &'a [u8] {
        &self.src[self.tok_start..self.tok_end]
    }

    /// Value of a scalar token just read.
    fn scalar(&self, tok: Tok) -> Result<Value, String> {
        if tok == Tok::Str {
            return decode_string(self.text()).map(Value::String);
        }
        let text = std::str::from_utf8(self.text()).unwrap_or("");
        match tok {
            Tok::Kw => match text {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                "null" => Ok(Value::Null),
                _ => Err(format!("JSON parse error, invalid keyword '{text}'")),
            },
            _ => Ok(number(text, tok == Tok::Int)),
        }
    }

    fn run(&mut self, stack: &mut Vec<Open>) -> Result<(Value, Option<(usize, usize)>), String> {
        stack.clear();
        let mut id_start = None;
        let mut id_span = None;
        'value: loop {
            let tok = self.next();
            let mut value = match tok {
                Tok::LCurly if self.peek_is(b'}') => {
                    self.next();
                    Value::Object(Map::new())
                }
                Tok::LCurly => {
                    stack.push(Open::Object(Map::new(), None));
                    continue 'value;
                }
                Tok::LSquare if self.peek_is(b']') => {
                    self.next();
                    Value::Array(Vec::new())
                }
                Tok::LSquare => {
                    stack.push(Open::Array(Vec::new()));
                    continue 'value;
                }
                Tok::Str | Tok::Int | Tok::Float | Tok::Kw => self.scalar(tok)?,
                Tok::End => return Err(PREMATURE.into()),
                _ => return Err("JSON parse error, expecting value".into()),
            };
            // Fold the finished value into its enclosing containers.
            loop {
                let depth = stack.len();
                match stack.last_mut() {
                    None => return Ok((value, id_span)),
                    Some(Open::Object(map, key)) => match key.take() {
                        None => {
                            let Value::String(k) = value else {
                                return Err(
                                    "JSON parse error, key is not a string in object".into()
                                );
                            };
                            match self.next() {
                                Tok::Colon => {}
                                Tok::End => return Err(PREMATURE.into()),
                                _ => {
                                    return Err("JSON parse error, missing : in object pair".into());
                                }
                            }
                            if depth == 1 && k == "id" {
                                self.skip_ws();
                                id_start = Some(self.pos);
                            }
                            *key = Some(k);
                            continue 'value;
                        }
                        Some(k) => {
                            if depth == 1 && k == "id" {
                                id_span = id_start.map(|s| (s, self.tok_end));
                            }
                            match map.entry(k) {
                                Entry::Occupied(_) => {
                                    return Err("JSON parse error, duplicate key".into());
                                }
                                Entry::Vacant(e) => {
                                    e.insert(value);
                                }
                            }
                            match self.next() {
                                Tok::RCurly => {}
                                Tok::Comma => continue 'value,
                                Tok::End => return Err(PREMATURE.into()),
                                _ => {
                                    return Err(
                                        "JSON parse error, expected separator in dict".into()
                                    );
                                }
                            }
                            let Some(Open::Object(map, _)) = stack.pop() else {
                                unreachable!("top of stack is an object")
                            };
                            value = Value::Object(map);
                        }
                    },
                    Some(Open::Array(items)) => {
                        items.push(value);
                        match self.next() {
                            Tok::RSquare => {}
                            Tok::Comma => continue 'value,
                            Tok::End => return Err(PREMATURE.into()),
                            _ => return Err("JSON parse error, expected separator in list".into()),
                        }
                        let Some(Open::Array(items)) = stack.pop() else {
                            unreachable!("top of stack is an array")
                        };
                        value = Value::Array(items);
                    }
                }
            }
        }
    }
}

/// QEMU's number conversion: integers as i64, else u64 (non-negative), else f64.
pub(super) fn number(text: &str, integer: bool) -> Value {
    if integer {
        if let Ok(n) = text.parse::<i64>() {
            return Value::Number(n.into());
        }
        if let Ok(n) = text.parse::<u64>() {
            return Value::Number(n.into());
        }
    }
    // Overflow to infinity cannot be held by serde_json; it becomes null (documented).
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// Parses one complete value (the bytes from its first to its last token). `stack` is
/// scratch space, kept by the caller so its allocation is reused.
pub(super) fn parse(src: &[u8], stack: &mut Vec<Open>) -> Frame {
    let mut p = Parser {
        src,
        pos: 0,
        tok_start: 0,
        tok_end: 0,
    };
    let result = p.run(stack);
    stack.clear();
    match result {
        Ok((value, span)) => Frame::Value(finish(value, span, src)),
        Err(desc) => Frame::Error(desc),
    }
}

/// The parsed value of `src` plus its `id` text, from the span of the top-level `id`
/// member's value within `src`.
pub(super) fn finish(value: Value, span: Option<(usize, usize)>, src: &[u8]) -> ParsedValue {
    let id = match (&value, span) {
        (Value::Object(map), Some((s, e))) => match map.get("id") {
            // A double-quoted string whose value is as long as its body had no escapes
            // (each one, like a modified-UTF-8 NUL, is longer than what it stands for),
            // so it holds no `"`, `\` or control characters and is its own serialization:
            // quote it (one exact allocation, a quick validation), about half the cost
            // of `to_raw_value`.
            Some(Value::String(id)) if e - s == id.len() + 2 && src[s] == b'"' => {
                let mut text = String::with_capacity(id.len() + 2);
                text.push('"');
                text.push_str(id);
                text.push('"');
                RawValue::from_string(text).ok()
            }
            // Re-serializing these gives the same text as the span, minus the
            // validation pass `RawValue::from_string` would do.
            Some(id @ (Value::String(_) | Value::Bool(_) | Value::Null)) => {
                serde_json::value::to_raw_value(id).ok()
            }
            _ => raw_id(&src[s..e]),
        },
        _ => None,
    };
    ParsedValue { value, id }
}

/// Compact standard JSON for the `id` member's value, keeping member order and number
/// spelling. Input that already is compact, ASCII, double-quoted JSON is copied as is.
fn raw_id(span: &[u8]) -> Option<Box<RawValue>> {
    let mut in_str = false;
    let mut escaped = false;
    let mut verbatim = true;
    for &b in span {
        if b >= 0x80 || b == b'\'' {
            verbatim = false;
            break;
        }
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if b == b'"' {
            in_str = true;
        } else if b.is_ascii_whitespace() {
            verbatim = false;
            break;
        }
    }
    let text = if verbatim {
        String::from_utf8(span.to_vec()).ok()?
    } else {
        let mut out = String::with_capacity(span.len());
        let mut p = Parser {
            src: span,
            pos: 0,
            tok_start: 0,
            tok_end: 0,
        };
        loop {
            match p.next() {
                Tok::End => break,
                Tok::Str => {
                    let s = decode_string(p.text()).ok()?;
                    out.push_str(&serde_json::to_string(&s).ok()?);
                }
                _ => out.push_str(std::str::from_utf8(p.text()).ok()?),
            }
        }
        out
    };
    RawValue::from_string(text).ok()
}
