//! The fd built-ins: `getfd`, `closefd`, `add-fd`, `remove-fd` and `query-fdsets`, their
//! argument types (decoded with QEMU's argument-error texts, and described in
//! `query-qmp-schema`), and the order in which they check things, which decides what a
//! failing request does to the pending fd.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::ClientFds;
use super::positional::PositionalFds;
use super::sets::{AddFdInfo, FdSets, FdsetInfo};
use crate::args;
use crate::error::QmpError;

/// `getfd` and `closefd` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FdNameArguments {
    /// The name the fd is (or is to be) known by on this connection.
    fdname: String,
}

/// `add-fd` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct AddFdArguments {
    /// The set to add to; the lowest unused id when absent.
    fdset_id: Option<i64>,
    /// Free-form text shown by `query-fdsets`.
    opaque: Option<String>,
}

/// `remove-fd` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct RemoveFdArguments {
    /// The set.
    fdset_id: i64,
    /// One fd of it (as `add-fd` returned it); every fd of the set when absent.
    fd: Option<i64>,
}

/// `getfd`: arguments first (a bad request leaves the pending fd alone), then the pending
/// fd (so an empty slot is reported before a bad name), then the name (a refused name
/// still consumes, and closes, the fd).
pub(crate) fn getfd(
    pending: &mut PositionalFds,
    client: &ClientFds,
    arguments: Map<String, Value>,
) -> Result<(), QmpError> {
    let FdNameArguments { fdname } = args::decode(arguments)?;
    let fd = pending.take()?;
    client.insert(&fdname, fd)
}

/// `closefd`.
pub(crate) fn closefd(client: &ClientFds, arguments: Map<String, Value>) -> Result<(), QmpError> {
    let FdNameArguments { fdname } = args::decode(arguments)?;
    client.close(&fdname)
}

/// `add-fd`: arguments, then the pending fd, then the set id (a negative one closes the
/// fd taken).
pub(crate) fn add_fd(
    pending: &mut PositionalFds,
    sets: &FdSets,
    arguments: Map<String, Value>,
) -> Result<AddFdInfo, QmpError> {
    let AddFdArguments { fdset_id, opaque } = args::decode(arguments)?;
    let fd = pending.take()?;
    sets.add(fd, fdset_id, opaque)
}

/// `remove-fd`.
pub(crate) fn remove_fd(sets: &FdSets, arguments: Map<String, Value>) -> Result<(), QmpError> {
    let RemoveFdArguments { fdset_id, fd } = args::decode(arguments)?;
    sets.remove(fdset_id, fd)
}

/// `query-fdsets`.
pub(crate) fn query_fdsets(
    sets: &FdSets,
    arguments: Map<String, Value>,
) -> Result<Vec<FdsetInfo>, QmpError> {
    args::decode::<args::NoArgs>(arguments)?;
    Ok(sets.query())
}
