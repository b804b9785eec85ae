//! Grammar stage: turns the tokens of one value into a [`serde_json::Value`] (the one value
//! builder), with QEMU's error precedence and texts, and builds the top-level `id` on the
//! way.
//!
//! Tokens come from a [`Source`]: those the streaming decoder recorded for a complete
//! value, or those the single-pass path lexes as it goes. The stage is iterative (an
//! explicit stack) rather than recursive, so deep nesting cannot overflow the thread's
//! stack whatever `max_nesting` is set to. Errors are raised in the same order as QEMU's
//! recursive-descent parser, which reports the first one.

use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

use super::ParsedValue;
use super::id::IdBuilder;
use super::scanner::{
    T_COLON, T_COMMA, T_END, T_FLOAT, T_INT, T_KW, T_LCURLY, T_LSQUARE, T_PLAIN_STR, T_RCURLY,
    T_RSQUARE, T_STR, Token,
};
use super::strings::{decode_plain, decode_string};

const PREMATURE: &str = "JSON parse error, premature EOI";

/// Where the grammar gets its tokens from.
pub(super) trait Source<'a> {
    /// The next token's kind and text; `T_END` once there are no more.
    fn next(&mut self) -> (u8, &'a [u8]);
}

/// The tokens the scanner recorded for one value, over the value's bytes.
pub(super) struct Recorded<'a> {
    src: &'a [u8],
    tokens: std::slice::Iter<'a, Token>,
}

impl<'a> Recorded<'a> {
    /// Tokens whose offsets are relative to the start of `src`.
    pub(super) fn new(src: &'a [u8], tokens: &'a [Token]) -> Self {
        Recorded {
            src,
            tokens: tokens.iter(),
        }
    }
}

impl<'a> Source<'a> for Recorded<'a> {
    #[inline(always)]
    fn next(&mut self) -> (u8, &'a [u8]) {
        match self.tokens.next() {
            Some(t) => (t.kind, &self.src[t.start as usize..t.end as usize]),
            None => (T_END, &[]),
        }
    }
}

/// One open container.
#[derive(Debug)]
pub(super) enum Open {
    /// An object and, once read, the key whose value is being parsed.
    Object(Map<String, Value>, Option<String>),
    Array(Vec<Value>),
}

/// QEMU's number conversion: integers as i64, else u64 (non-negative), else f64.
fn number(text: &[u8], integer: bool) -> Value {
    // Number tokens are ASCII.
    let text = std::str::from_utf8(text).unwrap_or("");
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

/// The value of a string token.
#[inline]
fn string((kind, text): (u8, &[u8])) -> Result<String, String> {
    if kind == T_PLAIN_STR {
        Ok(decode_plain(text))
    } else {
        decode_string(text)
    }
}

fn keyword(text: &[u8]) -> Result<Value, String> {
    match text {
        b"true" => Ok(Value::Bool(true)),
        b"false" => Ok(Value::Bool(false)),
        b"null" => Ok(Value::Null),
        _ => Err(format!(
            "JSON parse error, invalid keyword '{}'",
            String::from_utf8_lossy(text)
        )),
    }
}

/// Reads what follows a member of a container: `true` for its closing bracket `close`,
/// `false` for a comma; anything else is the error `expected` (or premature EOI).
#[inline]
fn closes<'a>(tokens: &mut impl Source<'a>, close: u8, expected: &str) -> Result<bool, String> {
    match tokens.next().0 {
        T_COMMA => Ok(false),
        T_END => Err(PREMATURE.into()),
        kind if kind == close => Ok(true),
        _ => Err(expected.into()),
    }
}

/// Parses one value from `tokens`. `stack` is scratch space, kept by the caller so its
/// allocation is reused.
pub(super) fn parse<'a>(
    tokens: &mut impl Source<'a>,
    stack: &mut Vec<Open>,
) -> Result<ParsedValue, String> {
    stack.clear();
    let result = run(tokens, stack, true);
    stack.clear();
    result
}

/// Parses one value nested in a larger one (a member's value): its own `id` members are
/// ordinary members, since only a top-level `id` is a request's.
pub(super) fn parse_nested<'a>(
    tokens: &mut impl Source<'a>,
    stack: &mut Vec<Open>,
) -> Result<Value, String> {
    stack.clear();
    let result = run(tokens, stack, false);
    stack.clear();
    result.map(|parsed| parsed.value)
}

/// `top_level`: the value is a whole frame, so an object's `id` member is the request's id.
fn run<'a>(
    tokens: &mut impl Source<'a>,
    stack: &mut Vec<Open>,
    top_level: bool,
) -> Result<ParsedValue, String> {
    // The top-level `id`: being built while its value is parsed, then done.
    let mut building: Option<IdBuilder> = None;
    let mut id = None;
    let mut tok = tokens.next();
    'value: loop {
        let depth = stack.len();
        if let Some(Open::Object(_, key @ None)) = stack.last_mut() {
            if matches!(tok.0, T_PLAIN_STR | T_STR) {
                let k = string(tok)?;
                match tokens.next().0 {
                    T_COLON => {}
                    T_END => return Err(PREMATURE.into()),
                    _ => return Err("JSON parse error, missing : in object pair".into()),
                }
                if top_level && depth == 1 && k == "id" {
                    building = Some(IdBuilder::new());
                } else if let Some(b) = &mut building {
                    b.key(&k);
                }
                *key = Some(k);
                tok = tokens.next();
                continue 'value;
            }
            // Any other key is parsed as a value and rejected once complete, so there is no
            // id to build.
            building = None;
        }
        let mut value = match tok.0 {
            kind @ (T_LCURLY | T_LSQUARE) => {
                let object = kind == T_LCURLY;
                if let Some(b) = &mut building {
                    b.open(object);
                }
                let next = tokens.next();
                if next.0 == if object { T_RCURLY } else { T_RSQUARE } {
                    if let Some(b) = &mut building {
                        b.close(object);
                    }
                    if object {
                        Value::Object(Map::new())
                    } else {
                        Value::Array(Vec::new())
                    }
                } else {
                    stack.push(if object {
                        Open::Object(Map::new(), None)
                    } else {
                        Open::Array(Vec::new())
                    });
                    tok = next;
                    continue 'value;
                }
            }
            kind @ (T_PLAIN_STR | T_STR | T_INT | T_FLOAT | T_KW) => {
                let value = match kind {
                    T_PLAIN_STR | T_STR => Value::String(string(tok)?),
                    T_KW => keyword(tok.1)?,
                    _ => number(tok.1, kind == T_INT),
                };
                if let Some(b) = &mut building {
                    let number = matches!(kind, T_INT | T_FLOAT).then_some(tok.1);
                    b.scalar(&value, number);
                }
                value
            }
            T_END => return Err(PREMATURE.into()),
            _ => return Err("JSON parse error, expecting value".into()),
        };
        // Fold the finished value into its enclosing containers.
        loop {
            let depth = stack.len();
            match stack.last_mut() {
                None => return Ok(ParsedValue { value, id }),
                Some(Open::Object(map, key)) => match key.take() {
                    // Strings in key position were taken as keys above.
                    None => return Err("JSON parse error, key is not a string in object".into()),
                    Some(k) => {
                        if top_level && depth == 1 && k == "id" {
                            id = building.take().and_then(IdBuilder::finish);
                        }
                        match map.entry(k) {
                            Entry::Occupied(_) => {
                                return Err("JSON parse error, duplicate key".into());
                            }
                            Entry::Vacant(e) => {
                                e.insert(value);
                            }
                        }
                        if !closes(
                            tokens,
                            T_RCURLY,
                            "JSON parse error, expected separator in dict",
                        )? {
                            tok = tokens.next();
                            continue 'value;
                        }
                        let Some(Open::Object(map, _)) = stack.pop() else {
                            unreachable!("top of stack is an object")
                        };
                        if let Some(b) = &mut building {
                            b.close(true);
                        }
                        value = Value::Object(map);
                    }
                },
                Some(Open::Array(items)) => {
                    items.push(value);
                    if !closes(
                        tokens,
                        T_RSQUARE,
                        "JSON parse error, expected separator in list",
                    )? {
                        tok = tokens.next();
                        continue 'value;
                    }
                    let Some(Open::Array(items)) = stack.pop() else {
                        unreachable!("top of stack is an array")
                    };
                    if let Some(b) = &mut building {
                        b.close(false);
                    }
                    value = Value::Array(items);
                }
            }
        }
    }
}
