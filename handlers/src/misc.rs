//! Small QEMU commands a VMM monitor needs: `query-yank`, `x-delay`. (`quit` is
//! [`RunState::quit`](crate::run_state::RunState::quit): it emits `SHUTDOWN`.)

use std::time::Duration;

use qmp_dispatcher::{Command, NoArgs, QmpError};
use serde::{Deserialize, Serialize};

/// A yank instance, QEMU's `YankInstance` flat union (tagged by `type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum YankInstance {
    /// A block node.
    BlockNode {
        /// The node's name.
        #[serde(rename = "node-name")]
        node_name: String,
    },
    /// A character device.
    Chardev {
        /// The chardev's id.
        id: String,
    },
    /// The migration stream.
    Migration,
}

/// `query-yank`: lists yank instances (this demo has none). Allows OOB, so `exec-oob` works on
/// a real QEMU command.
pub fn query_yank<S: Send + Sync + 'static>() -> Command<S> {
    Command::sync("query-yank", |_: NoArgs, _| Ok(Vec::<YankInstance>::new())).allow_oob()
}

/// `x-delay` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DelayArgs {
    /// How long to wait before replying.
    pub ms: u64,
}

/// `x-delay {ms}`: replies `{}` after `ms` milliseconds without blocking anything; cancelling
/// it drops the timer. For tests and benchmarks.
pub fn x_delay<S: Send + Sync + 'static>() -> Command<S> {
    Command::async_fn("x-delay", |args: DelayArgs, _| async move {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok::<_, QmpError>(())
    })
}
