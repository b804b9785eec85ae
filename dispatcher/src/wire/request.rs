//! The request envelope: `{"execute" | "exec-oob": NAME, "arguments": {...}, "id": ANY}`,
//! validated in QEMU's order with QEMU's texts.

use compact_str::CompactString;
use serde_json::{Map, Value};

use super::json::{Envelope, Id, ParsedValue};
use super::qdict;
use crate::error::QmpError;

/// A request whose envelope is valid. The command itself is not looked up yet.
#[derive(Debug)]
pub struct Request {
    /// The command name, from `execute` or `exec-oob` (held inline up to 24 bytes, so a
    /// request costs no allocation for its name).
    pub command: CompactString,
    /// True when sent with `exec-oob`.
    pub oob: bool,
    /// The arguments; `{}` when the member was absent.
    pub arguments: Map<String, Value>,
    /// The `id`: its text is echoed in the reply, its key compares ids.
    pub id: Option<Id>,
}

/// A request rejected before dispatch. `id` is set once the input was known to be an object.
#[derive(Debug)]
pub struct RequestError {
    /// The `id` to echo, if any.
    pub id: Option<Id>,
    /// What is wrong.
    pub error: QmpError,
}

/// True when QEMU would run this value out of band: it has `exec-oob` and no `execute`.
/// QEMU decides this before validating anything, so the error replies of such a request also
/// bypass the in-band queue.
pub fn is_oob_keyed(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|map| map.contains_key("exec-oob") && !map.contains_key("execute"))
}

/// The request a split request object is. Its members were checked as it was split; only
/// `exec-oob` depends on the client: without the `oob` capability it is an unexpected
/// member (the only problem such an object can have, so QEMU's order is kept).
pub fn from_envelope(envelope: Envelope, oob_enabled: bool) -> Result<Request, RequestError> {
    if envelope.exec_oob && !oob_enabled {
        return Err(RequestError {
            id: envelope.id,
            error: QmpError::generic("QMP input member 'exec-oob' is unexpected"),
        });
    }
    Ok(Request {
        command: envelope.command,
        oob: envelope.exec_oob,
        arguments: envelope.arguments.unwrap_or_default(),
        id: envelope.id,
    })
}

/// Validates the envelope of one decoded value. `oob_enabled` is whether this client
/// negotiated the `oob` capability: without it `exec-oob` is just an unexpected member.
pub fn parse(parsed: ParsedValue, oob_enabled: bool) -> Result<Request, RequestError> {
    let Value::Object(map) = parsed.value else {
        return Err(RequestError {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let id = parsed.id;
    let fail = |id, desc: String| {
        Err(RequestError {
            id,
            error: QmpError::generic(desc),
        })
    };

    let command_key = if envelope_is_valid(&map, oob_enabled) {
        // The common case: nothing to report, so QEMU's check order does not matter.
        [("execute", "execute"), ("exec-oob", "exec-oob")]
            .into_iter()
            .find(|(key, _)| map.contains_key(*key))
            .map(|(_, key)| key)
    } else {
        match first_problem(&map, oob_enabled) {
            Ok(command_key) => command_key,
            Err(desc) => return fail(id, desc),
        }
    };
    let Some(command_key) = command_key else {
        return fail(id, "QMP input lacks member 'execute'".into());
    };
    let oob = command_key == "exec-oob";
    // One pass taking members by value; the envelope was validated above.
    let (mut command, mut arguments) = (CompactString::default(), Map::new());
    for (key, value) in map {
        match (key.as_str(), value) {
            (key, Value::String(name)) if key == command_key => command = name.into(),
            ("arguments", Value::Object(object)) => arguments = object,
            _ => {}
        }
    }
    Ok(Request {
        command,
        oob,
        arguments,
        id,
    })
}

/// Walks the members in QEMU's hash-table order and reports the first problem it meets, as
/// QEMU does; returns which member names the command when there is none.
fn first_problem(
    map: &Map<String, Value>,
    oob_enabled: bool,
) -> Result<Option<&'static str>, String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|key| qdict::bucket(key));
    let mut command_key: Option<&'static str> = None;
    for key in keys {
        match key.as_str() {
            name @ ("execute" | "exec-oob") if name == "execute" || oob_enabled => {
                if !map[name].is_string() {
                    return Err(format!("QMP input member '{name}' must be a string"));
                }
                if command_key.is_some() {
                    return Err("QMP input member 'execute' clashes with 'exec-oob'".into());
                }
                command_key = Some(if name == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                });
            }
            "arguments" => {
                if !map["arguments"].is_object() {
                    return Err("QMP input member 'arguments' must be an object".into());
                }
            }
            "id" => {}
            other => return Err(format!("QMP input member '{other}' is unexpected")),
        }
    }
    Ok(command_key)
}

/// True when every member is one a request may have, with the right type, and at most one
/// of `execute`/`exec-oob` is present.
fn envelope_is_valid(map: &Map<String, Value>, oob_enabled: bool) -> bool {
    let mut commands = 0;
    map.iter().all(|(key, value)| match key.as_str() {
        "execute" => {
            commands += 1;
            value.is_string()
        }
        "exec-oob" if oob_enabled => {
            commands += 1;
            value.is_string()
        }
        "arguments" => value.is_object(),
        "id" => true,
        _ => false,
    }) && commands <= 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::json::{Frame, JsonDecoder};

    fn parsed(text: &str) -> ParsedValue {
        let mut buf = bytes::BytesMut::from(text);
        match JsonDecoder::default().decode_eof(&mut buf) {
            Some(Frame::Value(parsed)) => parsed,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn desc(text: &str, oob: bool) -> String {
        parse(parsed(text), oob).unwrap_err().error.desc
    }

    #[test]
    fn qemu_texts_in_qemu_order() {
        assert_eq!(desc("[1]", false), "QMP input must be a JSON object");
        assert_eq!(desc("{}", false), "QMP input lacks member 'execute'");
        assert_eq!(
            desc(r#"{"execute":true}"#, false),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(r#"{"execute":"x","arguments":[]}"#, false),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(r#"{"execute":"x","zzz":1,"aaa":2}"#, false),
            "QMP input member 'aaa' is unexpected"
        );
        assert_eq!(
            desc(r#"{"exec-oob":"x"}"#, false),
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(r#"{"exec-oob":"x","execute":"y"}"#, true),
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
        assert_eq!(
            desc(r#"{"exec-oob":1}"#, true),
            "QMP input member 'exec-oob' must be a string"
        );
    }

    #[test]
    fn id_is_kept_on_envelope_errors_but_not_for_non_objects() {
        assert!(
            parse(parsed(r#"{"id":5}"#), false)
                .unwrap_err()
                .id
                .is_some()
        );
        assert!(parse(parsed("[5]"), false).unwrap_err().id.is_none());
    }

    #[test]
    fn valid_oob_request() {
        let req = parse(
            parsed(r#"{"exec-oob":"q","arguments":{"a":1},"id":"x"}"#),
            true,
        )
        .unwrap();
        assert!(req.oob);
        assert_eq!(req.command, "q");
        assert_eq!(req.arguments["a"], 1);
        assert_eq!(req.id.unwrap().text(), "\"x\"");
    }

    #[test]
    fn ids_keep_their_text_and_key() {
        let req = parse(parsed(r#"{"execute":"x","id":1e400}"#), false).unwrap();
        let id = req.id.unwrap();
        assert_eq!((id.text(), id.key()), ("1e400", "1e400"));
        let err = parse(parsed(r#"{"id":{"b":-0,"a":1.00},"zz":1}"#), false).unwrap_err();
        let id = err.id.unwrap();
        assert_eq!(id.text(), r#"{"b":-0,"a":1.00}"#);
        assert_eq!(id.key(), r#"{"a":1.0,"b":0}"#);
        // `as_deref` still gives the echo text for the encoder.
        let req = parse(parsed(r#"{"execute":"x","id":[1]}"#), false).unwrap();
        assert_eq!(req.id.as_deref(), Some("[1]"));
    }
}
