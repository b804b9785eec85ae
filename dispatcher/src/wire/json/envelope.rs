//! Single-pass path for the commonest frame of all: a request object whose members are
//! only those a request may have, split into them without building the object.
//!
//! `{"execute": "query-version", "id": 7}` would otherwise become a map holding three
//! string keys, a string and an id, only for the session to take it apart again. Here
//! the member names are compared in the input and never allocated; the command name is
//! the one string made, `arguments` is parsed as any value is, and an id whose spelling
//! is already its canonical key is taken as it stands.
//!
//! Like the `fast` path it builds on, it gives up with `None`, having consumed nothing,
//! on anything outside that shape (another member, a duplicate, both `execute` and
//! `exec-oob`, a name or key with escapes, a member of the wrong type, an id that
//! is not a plain string or a canonical integer, any error or limit). The streaming
//! decoder then decodes the input as a [`Frame::Value`](super::Frame::Value), so what a
//! client sees never depends on which path ran: [`Envelope::into_parsed`] gives the value
//! the other path would have given, which the tests compare.

use compact_str::CompactString;
use serde_json::{Map, Value};

use super::fast::Live;
use super::grammar::{self, Open, Source};
use super::id::Id;
use super::scanner::{T_COLON, T_COMMA, T_LCURLY, T_PLAIN_STR, T_RCURLY};
use super::strings::decode_plain_compact;
use super::{Limits, ParsedValue};

/// A request object as the single-pass path splits it.
#[derive(Debug)]
pub struct Envelope {
    /// The command name, from `execute` or `exec-oob` (held inline up to 24 bytes).
    pub command: CompactString,
    /// The name came in `exec-oob` (there was no `execute`).
    pub exec_oob: bool,
    /// The `arguments` object; `None` when the member was absent.
    pub arguments: Option<Map<String, Value>>,
    /// The `id`, when there was one.
    pub id: Option<Id>,
}

impl Envelope {
    /// The value the streaming path would have decoded from the same input.
    pub fn into_parsed(self) -> ParsedValue {
        let mut map = Map::new();
        let name = if self.exec_oob { "exec-oob" } else { "execute" };
        map.insert(name.into(), Value::String(self.command.into_string()));
        if let Some(arguments) = self.arguments {
            map.insert("arguments".into(), Value::Object(arguments));
        }
        if let Some(id) = &self.id {
            // Only plain strings and integers come this way: standard JSON.
            let value = serde_json::from_str(id.text()).unwrap_or(Value::Null);
            map.insert("id".into(), value);
        }
        ParsedValue {
            value: Value::Object(map),
            id: self.id,
        }
    }
}

/// Which member a key names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Member {
    Execute,
    ExecOob,
    Arguments,
    Id,
}

impl Member {
    fn of(key: &[u8]) -> Option<Member> {
        match key {
            b"\"execute\"" => Some(Member::Execute),
            b"\"exec-oob\"" => Some(Member::ExecOob),
            b"\"arguments\"" => Some(Member::Arguments),
            b"\"id\"" => Some(Member::Id),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Splits the request object at the start of `buf` (after whitespace), if it has the
/// shape the module describes; returns it and the number of bytes it ends at.
pub(super) fn decode(
    buf: &[u8],
    limits: &Limits,
    stack: &mut Vec<Open>,
) -> Option<(Envelope, usize)> {
    let (start, mut live) = Live::at_container(buf, limits)?;
    if live.next().0 != T_LCURLY {
        return None;
    }
    let mut seen = 0u8;
    let mut envelope = Envelope {
        command: CompactString::default(),
        exec_oob: false,
        arguments: None,
        id: None,
    };
    loop {
        let (kind, key) = live.next();
        let member = Member::of(key).filter(|_| kind == T_PLAIN_STR)?;
        if seen & member.bit() != 0 || live.next().0 != T_COLON {
            return None;
        }
        seen |= member.bit();
        match member {
            Member::Execute | Member::ExecOob => {
                let (kind, name) = live.next();
                if kind != T_PLAIN_STR {
                    return None;
                }
                envelope.command = decode_plain_compact(name);
                envelope.exec_oob = member == Member::ExecOob;
            }
            Member::Arguments => match grammar::parse_nested(&mut live, stack).ok()? {
                Value::Object(arguments) => envelope.arguments = Some(arguments),
                _ => return None,
            },
            Member::Id => {
                let (kind, text) = live.next();
                envelope.id = Some(Id::spelled_canonically(kind, text)?);
            }
        }
        match live.next().0 {
            T_COMMA => {}
            T_RCURLY => break,
            _ => return None,
        }
    }
    let named = seen & (Member::Execute.bit() | Member::ExecOob.bit());
    if named == 0 || named == Member::Execute.bit() | Member::ExecOob.bit() {
        return None;
    }
    let end = live.finish()?;
    Some((envelope, start + end))
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use serde_json::json;

    use super::super::{Frame, JsonDecoder};

    fn frame(text: &str) -> Frame {
        let mut buf = BytesMut::from(text);
        JsonDecoder::default()
            .split_requests()
            .decode(&mut buf)
            .expect("a frame")
    }

    #[test]
    fn request_objects_are_split_and_nested_ids_are_arguments() {
        let Frame::Request(request) =
            frame(r#" {"execute":"q","arguments":{"id":1,"a":[1]},"id":"x"} "#)
        else {
            panic!("not split");
        };
        assert_eq!(request.command, "q");
        assert!(!request.exec_oob);
        let arguments = serde_json::Value::Object(request.arguments.unwrap());
        assert_eq!(arguments, json!({"id": 1, "a": [1]}));
        let id = request.id.unwrap();
        assert_eq!((id.text(), id.key()), ("\"x\"", "\"x\""));

        let Frame::Request(request) = frame(r#"{"id":-12,"exec-oob":"r"}"#) else {
            panic!("not split");
        };
        assert!(request.exec_oob && request.arguments.is_none());
        assert_eq!(request.id.unwrap().key(), "-12");
    }

    #[test]
    fn anything_else_is_left_to_the_other_paths() {
        for text in [
            r#"{"execute":"q","id":1.0}"#,
            r#"{"execute":"q","id":-0}"#,
            r#"{"execute":"q","id":1234567890123456789}"#,
            r#"{"execute":"q","id":[1]}"#,
            r#"{"execute":"q","id":null}"#,
            r#"{"execute":"q","extra":1}"#,
            r#"{"execute":"q","execute":"r"}"#,
            r#"{"execute":"q","exec-oob":"r"}"#,
            r#"{"arguments":{}}"#,
            r#"{"execute":"q\u0041"}"#,
            r#"{'execute':"q"}"#,
            r#"{"execute":"q","arguments":[]}"#,
            r#"{"execute":"q","arguments":{"a":1,"a":2}}"#,
            r#"{"execute":1}"#,
            "[1]",
        ] {
            assert!(
                !matches!(frame(text), Frame::Request(_)),
                "{text} was split"
            );
        }
    }
}
