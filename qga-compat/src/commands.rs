//! The agent's own commands: guest-sync, guest-sync-delimited, guest-ping and guest-info.

use qmp_dispatcher::{Command, NoArgs, QmpError, QmpReturn};
use serde::Serialize;
use serde_json::{Map, Value};

/// The byte qemu-ga writes before a `guest-sync-delimited` reply, and that hosts send to
/// flush the agent's parser.
pub const SENTINEL: u8 = 0xFF;

/// `guest-sync {id}`: echoes `id`, so a line-oriented host can skip stale replies.
pub(crate) fn guest_sync() -> Command {
    Command::raw(
        "guest-sync",
        |arguments: Map<String, Value>, _, ret: QmpReturn| match sync_id(&arguments) {
            Ok(id) => ret.ok(&id),
            Err(error) => ret.err(error),
        },
    )
}

/// `guest-sync-delimited {id}`: like `guest-sync`; [`crate::GuestAgentCodec`] writes the
/// 0xFF before its reply.
pub(crate) fn guest_sync_delimited() -> Command {
    Command::raw(
        "guest-sync-delimited",
        |arguments: Map<String, Value>, _, ret: QmpReturn| match sync_id(&arguments) {
            Ok(id) => ret.ok(&id),
            Err(error) => ret.err(error),
        },
    )
}

/// `guest-ping`: answers `{}`.
pub(crate) fn guest_ping() -> Command {
    Command::sync("guest-ping", |_: NoArgs, _| Ok(Map::new()))
}

/// `guest-info`: the version and every command, newest registration first, as qemu-ga
/// lists them. The command table comes from the request's context.
pub(crate) fn guest_info(version: String) -> Command {
    Command::sync("guest-info", move |_: NoArgs, cx| {
        let mut supported_commands: Vec<CommandEntry> = cx
            .commands()
            .map(|c| CommandEntry {
                enabled: c.enabled,
                name: c.name.to_string(),
                success_response: c.success_response,
            })
            .collect();
        supported_commands.reverse();
        Ok(GuestAgentInfo {
            version: version.clone(),
            supported_commands,
        })
    })
}

/// The reply of `guest-info`; members in qemu-ga's output order.
#[derive(Serialize, qmp_dispatcher::JsonSchema)]
#[schemars(crate = "qmp_dispatcher::schemars")]
struct GuestAgentInfo {
    version: String,
    supported_commands: Vec<CommandEntry>,
}

#[derive(Serialize, qmp_dispatcher::JsonSchema)]
#[schemars(crate = "qmp_dispatcher::schemars")]
struct CommandEntry {
    enabled: bool,
    name: String,
    #[serde(rename = "success-response")]
    success_response: bool,
}

/// The `id` argument of the sync commands, checked in the QAPI visitor's order: presence and
/// type first, unexpected members last. Only int64 is an integer here: `2^63` and `1.0` are
/// type errors, as in qemu-ga.
fn sync_id(arguments: &Map<String, Value>) -> Result<i64, QmpError> {
    let id = arguments
        .get("id")
        .ok_or_else(|| QmpError::generic("Parameter 'id' is missing"))?;
    let id = id
        .as_i64()
        .ok_or_else(|| QmpError::generic("Invalid parameter type for 'id', expected: integer"))?;
    if let Some(extra) = arguments.keys().find(|key| *key != "id") {
        return Err(QmpError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn sync_id_follows_the_visitor_order() {
        assert_eq!(sync_id(&args(json!({"id": -5}))).unwrap(), -5);
        let desc = |v| sync_id(&args(v)).unwrap_err().desc;
        assert_eq!(desc(json!({})), "Parameter 'id' is missing");
        assert_eq!(desc(json!({"x": 2})), "Parameter 'id' is missing");
        assert_eq!(
            desc(json!({"id": 1, "x": 2})),
            "Parameter 'x' is unexpected"
        );
        for bad in [
            json!(1.0),
            json!(9223372036854775808u64),
            json!("1"),
            json!(null),
            json!([]),
        ] {
            assert_eq!(
                desc(json!({ "id": bad })),
                "Invalid parameter type for 'id', expected: integer"
            );
        }
    }
}
