//! Request ids: the text echoed in replies and the canonical key ids are compared by, both
//! written by one compact-JSON writer (see the module doc of `wire::json` for the rules).

use std::fmt;
use std::ops::Deref;

use compact_str::CompactString;
use serde_json::Value;

use super::strings::plain_len;
use serde_json::value::RawValue;

/// The `id` member of a request: its echo text and its canonical key.
///
/// Dereferences to the echo text, so `Option<Id>::as_deref` gives `Option<&str>`.
/// Equality and hashing are by key.
///
/// The text is JSON that this crate's lexer checked or its writer wrote, held as a string
/// rather than a `serde_json::value::RawValue`: making one of those parses the text again,
/// which was a tenth of the server's work per request (docs/performance.md).
/// [`to_raw_value`](Self::to_raw_value) makes one when it is wanted. Ids of up to 24 bytes,
/// nearly all of them, are held inline without an allocation.
#[derive(Clone)]
pub struct Id {
    /// Compact JSON in the original member order and number spelling.
    text: CompactString,
    /// The canonical key, when it is not the same as `text` (rare: boxed twice so that an
    /// id stays 32 bytes).
    key: Option<Box<Box<str>>>,
}

impl Id {
    /// The text echoed in replies: compact JSON, members in their original order, numbers
    /// as spelled, strings in standard JSON escaping.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The echo text as a `RawValue`, to embed in a serialized structure (parses it again).
    pub fn to_raw_value(&self) -> Box<RawValue> {
        RawValue::from_string(self.text.to_string()).expect("an id's text is JSON")
    }

    /// The canonical key: equal for ids that are the same JSON value (see the module doc
    /// of `wire::json`), the same as [`canonical_key`] of the parsed value.
    pub fn key(&self) -> &str {
        self.key.as_deref().map_or(&self.text, |key| key)
    }

    /// Bytes of heap this id holds, for memory budgets.
    pub fn heap_size(&self) -> usize {
        self.text.len() + self.key.as_ref().map_or(0, |key| key.len())
    }

    /// The echo text, dropping the key.
    pub fn into_text(self) -> Box<str> {
        self.text.into_string().into_boxed_str()
    }

    /// The id a single token is, when its spelling is its canonical key: a plain string
    /// (printable ASCII without escapes, in double quotes) or an integer that fits an i64
    /// other than `-0`. `None` for any other token, which the grammar's writer handles.
    pub(super) fn spelled_canonically(kind: u8, token: &[u8]) -> Option<Id> {
        use super::scanner::{T_INT, T_PLAIN_STR};
        // Eighteen digits always fit an i64; the lexer allows no leading zeros.
        let canonical = match kind {
            T_PLAIN_STR => true,
            T_INT => token.len() <= 18 && token != b"-0",
            _ => false,
        };
        if !canonical {
            return None;
        }
        // Plain strings and integer tokens are ASCII, and JSON as they stand.
        let text = CompactString::from_utf8(token).ok()?;
        Some(Id { text, key: None })
    }
}

impl Deref for Id {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Id {}

impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            None => write!(f, "Id({})", self.text),
            Some(key) => write!(f, "Id({}, key {key})", self.text),
        }
    }
}

/// The canonical key of a value (iterative, so any depth is fine): the same as
/// [`Id::key`] for an id with this value, unless that id holds a number that overflows
/// a double (a [`Value`] cannot hold one).
pub fn canonical_key(value: &Value) -> String {
    enum Open<'a> {
        Array(std::slice::Iter<'a, Value>),
        Object(serde_json::map::Iter<'a>),
    }
    let mut w = Writer::new(Mode::Key);
    let mut stack = Vec::new();
    let mut next = Some(value);
    loop {
        match next.take() {
            Some(Value::Array(items)) => {
                w.open(false);
                stack.push(Open::Array(items.iter()));
            }
            Some(Value::Object(map)) => {
                w.open(true);
                stack.push(Open::Object(map.iter()));
            }
            Some(scalar) => w.scalar(scalar, None),
            None => {}
        }
        match stack.last_mut() {
            None => break,
            Some(Open::Array(items)) => match items.next() {
                Some(item) => next = Some(item),
                None => {
                    stack.pop();
                    w.close(false);
                }
            },
            Some(Open::Object(members)) => match members.next() {
                Some((key, item)) => {
                    w.key(key);
                    next = Some(item);
                }
                None => {
                    stack.pop();
                    w.close(true);
                }
            },
        }
    }
    w.into_string()
}

/// Which text a [`Writer`] writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The echo text: members in order, numbers and keywords as spelled.
    Echo,
    /// The canonical key: members sorted by key, numbers as `serde_json` writes them
    /// (a number that overflows a double keeps its spelling).
    Key,
}

/// The members of an object being written in key mode.
struct Members {
    /// Where the first member starts in the output.
    body: usize,
    /// Each member's key and where its text starts.
    members: Vec<(String, usize)>,
    /// Whether the keys came in sorted order so far.
    sorted: bool,
}

/// Writes compact JSON from a stream of events (the one writer of ids and keys).
struct Writer {
    mode: Mode,
    out: String,
    /// Key mode: the objects still open.
    objects: Vec<Members>,
}

impl Writer {
    fn new(mode: Mode) -> Writer {
        Writer {
            mode,
            out: String::new(),
            objects: Vec::new(),
        }
    }

    /// A separator if a value (or member) came before at this level.
    fn separate(&mut self) {
        if !matches!(self.out.as_bytes().last(), None | Some(b'[' | b'{' | b':')) {
            self.out.push(',');
        }
    }

    fn open(&mut self, object: bool) {
        self.separate();
        self.out.push(if object { '{' } else { '[' });
        if object && self.mode == Mode::Key {
            self.objects.push(Members {
                body: self.out.len(),
                members: Vec::new(),
                sorted: true,
            });
        }
    }

    fn key(&mut self, key: &str) {
        self.separate();
        if let Some(object) = self.objects.last_mut() {
            if object
                .members
                .last()
                .is_some_and(|(last, _)| last.as_str() > key)
            {
                object.sorted = false;
            }
            object.members.push((key.to_owned(), self.out.len()));
        }
        self.string(key);
        self.out.push(':');
    }

    fn string(&mut self, s: &str) {
        // Exact when nothing needs escaping, so a string id is allocated once.
        if plain_len(s.as_bytes()) == s.len() {
            // Nothing to escape: the common case, written without `serde_json`.
            self.out.reserve(s.len() + 2);
            self.out.push('"');
            self.out.push_str(s);
            self.out.push('"');
        } else {
            self.out
                .push_str(&serde_json::to_string(s).expect("a string serializes"));
        }
    }

    /// A scalar; `number` is the token's own text when the value comes from a number token
    /// (`Null` for one that overflows a double).
    fn scalar(&mut self, value: &Value, number: Option<&[u8]>) {
        self.separate();
        match (value, number) {
            (Value::String(s), _) => self.string(s),
            (Value::Number(n), _) if self.mode == Mode::Key => {
                self.out.push_str(canonical_number(n, &mut [0; 40]));
            }
            // Number tokens are ASCII.
            (_, Some(spelling)) => self
                .out
                .push_str(std::str::from_utf8(spelling).unwrap_or("")),
            (value, None) => {
                self.out
                    .push_str(&serde_json::to_string(value).expect("a scalar serializes"));
            }
        }
    }

    fn close(&mut self, object: bool) {
        if !object {
            self.out.push(']');
            return;
        }
        if let Some(object) = self.objects.pop().filter(|object| !object.sorted) {
            // Rewrite the members in key order (keys are unique: duplicates are errors).
            let Members {
                body, mut members, ..
            } = object;
            let mut ends: Vec<usize> = members.iter().skip(1).map(|(_, at)| at - 1).collect();
            ends.push(self.out.len());
            let mut spans: Vec<(String, usize, usize)> = members
                .drain(..)
                .zip(ends)
                .map(|((key, start), end)| (key, start, end))
                .collect();
            spans.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut sorted = String::with_capacity(self.out.len() - body);
            for (k, (_, start, end)) in spans.iter().enumerate() {
                if k > 0 {
                    sorted.push(',');
                }
                sorted.push_str(&self.out[*start..*end]);
            }
            self.out.truncate(body);
            self.out.push_str(&sorted);
        }
        self.out.push('}');
    }

    fn into_string(self) -> String {
        self.out
    }
}

/// A number in the key, as `serde_json` writes it, in `buf`.
fn canonical_number<'b>(n: &serde_json::Number, buf: &'b mut [u8; 40]) -> &'b str {
    let mut rest = &mut buf[..];
    serde_json::to_writer(&mut rest, n).expect("a number fits 40 bytes");
    let len = 40 - rest.len();
    // serde_json writes ASCII.
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

/// Builds an [`Id`] from the events of the grammar while it parses the id's value.
pub(super) struct IdBuilder {
    echo: Writer,
    /// Not made for a string or keyword id, whose key is its echo text.
    key: Option<Writer>,
}

impl IdBuilder {
    pub(super) fn new() -> IdBuilder {
        IdBuilder {
            echo: Writer::new(Mode::Echo),
            key: None,
        }
    }

    /// Both writers, the key writer made at the first event that can make it differ.
    fn writers(&mut self, may_differ: bool) -> impl Iterator<Item = &mut Writer> {
        if may_differ && self.key.is_none() && self.echo.out.is_empty() {
            self.key = Some(Writer::new(Mode::Key));
        }
        std::iter::once(&mut self.echo).chain(self.key.as_mut())
    }

    pub(super) fn open(&mut self, object: bool) {
        self.writers(true).for_each(|w| w.open(object));
    }

    pub(super) fn key(&mut self, key: &str) {
        self.writers(true).for_each(|w| w.key(key));
    }

    /// A scalar value; `number` is the token's text when it is a number.
    pub(super) fn scalar(&mut self, value: &Value, number: Option<&[u8]>) {
        let may_differ = match (value, number) {
            // The id is this number: its key is its text unless that is not canonical.
            (Value::Number(n), Some(spelling)) if self.echo.out.is_empty() => {
                canonical_number(n, &mut [0; 40]).as_bytes() != spelling
            }
            _ => number.is_some(),
        };
        self.writers(may_differ)
            .for_each(|w| w.scalar(value, number));
    }

    pub(super) fn close(&mut self, object: bool) {
        self.writers(true).for_each(|w| w.close(object));
    }

    /// The id, once its value is complete.
    pub(super) fn finish(self) -> Option<Id> {
        // The writer's output is compact JSON: it needs no second check.
        let text = CompactString::from(self.echo.into_string());
        let key = self
            .key
            .map(Writer::into_string)
            .filter(|key| **key != *text)
            .map(|key| Box::new(key.into_boxed_str()));
        Some(Id { text, key })
    }
}
