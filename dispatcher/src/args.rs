//! Typed command arguments: serde in, QEMU's argument-error texts out.
//!
//! A handler's argument struct is an ordinary serde type. QEMU's own names are kebab-case and
//! it rejects unknown members, so the usual shape is
//! `#[serde(rename_all = "kebab-case", deny_unknown_fields)]`.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::QmpError;

/// Arguments of a command that takes none: any member is `Parameter 'x' is unexpected`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Decodes `arguments` into `A`, turning a mismatch into the error QEMU would report.
pub fn decode<A: DeserializeOwned>(arguments: Map<String, Value>) -> Result<A, QmpError> {
    let arguments = Value::Object(arguments);
    // Arguments that fit need no path: serde_path_to_error copies every member name it
    // passes, two allocations per member, so it runs only to describe a mismatch (the same
    // deserialization again, which fails the same way).
    if let Ok(decoded) = A::deserialize(&arguments) {
        return Ok(decoded);
    }
    serde_path_to_error::deserialize(arguments).map_err(|err| {
        let path = err.path().to_string();
        QmpError::generic(describe(&path, &err.into_inner().to_string()))
    })
}

/// Maps a serde_json message at `path` (serde_path_to_error's `a.b[0]` form, `.` for the
/// top level) to QEMU's wording.
fn describe(path: &str, message: &str) -> String {
    let at = |name: &str| -> String {
        match (path, name) {
            (".", name) => name.to_string(),
            (path, "") => path.to_string(),
            (path, name) => format!("{path}.{name}"),
        }
    };
    if let Some(field) = quoted_after(message, "missing field ") {
        return format!("Parameter '{}' is missing", at(field));
    }
    if let Some(field) = quoted_after(message, "unknown field ") {
        // The path already ends at the unknown member.
        let name = if path.ends_with(field) {
            path.to_string()
        } else {
            at(field)
        };
        return format!("Parameter '{name}' is unexpected");
    }
    if let Some(variant) = quoted_after(message, "unknown variant ") {
        return format!("Parameter '{}' does not accept value '{variant}'", at(""));
    }
    if let Some(expected) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    {
        return format!(
            "Invalid parameter type for '{}', expected: {}",
            at(""),
            qapi_type(expected.1)
        );
    }
    if let Some((_, expected)) = message
        .strip_prefix("invalid value: ")
        .and_then(|m| m.split_once(", expected "))
    {
        if let Some(bits) = expected
            .strip_prefix('u')
            .filter(|b| b.parse::<u8>().is_ok())
        {
            let name = if bits == "64" {
                "uint64".to_string()
            } else {
                format!("uint{bits}_t")
            };
            return format!("Parameter '{}' expects {name}", at(""));
        }
        if let Some(bits) = expected
            .strip_prefix('i')
            .filter(|b| b.parse::<u8>().is_ok())
        {
            return format!("Parameter '{}' expects int{bits}_t", at(""));
        }
    }
    message.to_string()
}

/// The text between the backticks that follow `prefix`.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split_once('`').map(|(name, _)| name)
}

/// QAPI's name for what serde expected.
fn qapi_type(expected: &str) -> &str {
    let expected = expected.trim();
    match expected {
        // "path string" is serde's expectation for `PathBuf` (and `Path`).
        "a string" | "a char" | "a borrowed string" | "variant identifier" | "path string" => {
            "string"
        }
        "a boolean" => "boolean",
        "f32" | "f64" | "a number" => "number",
        "a sequence" | "an array" => "array",
        "a map" => "object",
        e if e.starts_with("struct ") || e.starts_with("enum ") => "object",
        e if e.len() <= 4 && (e.starts_with('i') || e.starts_with('u')) => "integer",
        e if e.starts_with("a string") => "string",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Image {
        driver: Driver,
        node_name: Option<String>,
        size: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Driver {
        Raw,
        Qcow2,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Args {
        device: String,
        force: Option<bool>,
        image: Option<Image>,
        actions: Option<Vec<Image>>,
        granularity: Option<u32>,
        filename: Option<std::path::PathBuf>,
    }

    fn err(value: Value) -> String {
        let Value::Object(map) = value else { panic!() };
        decode::<Args>(map).unwrap_err().desc
    }

    #[test]
    fn qemu_argument_error_texts() {
        assert_eq!(err(json!({})), "Parameter 'device' is missing");
        assert_eq!(
            err(json!({"device": "d", "x": 1})),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            err(json!({"device": 1})),
            "Invalid parameter type for 'device', expected: string"
        );
        assert_eq!(
            err(json!({"device": "d", "force": 1})),
            "Invalid parameter type for 'force', expected: boolean"
        );
        assert_eq!(
            err(json!({"device": "d", "image": {"driver": "raw", "x": 1}})),
            "Parameter 'image.x' is unexpected"
        );
        assert_eq!(
            err(json!({"device": "d", "image": {}})),
            "Parameter 'image.driver' is missing"
        );
        assert_eq!(
            err(json!({"device": "d", "image": {"driver": "nope"}})),
            "Parameter 'image.driver' does not accept value 'nope'"
        );
        assert_eq!(
            err(json!({"device": "d", "actions": [1]})),
            "Invalid parameter type for 'actions[0]', expected: object"
        );
        assert_eq!(
            err(json!({"device": "d", "image": {"driver": "raw", "size": 1.5}})),
            "Invalid parameter type for 'image.size', expected: integer"
        );
        assert_eq!(
            err(json!({"device": "d", "granularity": -1})),
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            err(json!({"device": "d", "actions": "x"})),
            "Invalid parameter type for 'actions', expected: array"
        );
        assert_eq!(
            err(json!({"device": "d", "filename": 42})),
            "Invalid parameter type for 'filename', expected: string"
        );
    }

    #[test]
    fn no_args_rejects_members() {
        let Value::Object(map) = json!({"bogus": 1}) else {
            panic!()
        };
        assert_eq!(
            decode::<NoArgs>(map).unwrap_err().desc,
            "Parameter 'bogus' is unexpected"
        );
        assert!(decode::<NoArgs>(Map::new()).is_ok());
    }
}
