//! Small QEMU commands a VMM monitor needs: `query-yank`, `x-delay`. (`quit` is
//! [`RunState::quit`](crate::run_state::RunState::quit): it emits `SHUTDOWN`.)

use std::time::Duration;

use qmp_dispatcher::{Command, NoArgs, QmpError};
use serde::Deserialize;
use serde_json::json;

/// `query-yank`: lists yank instances (this demo has none). Allows OOB, so `exec-oob` works on
/// a real QEMU command.
pub fn query_yank() -> Command {
    Command::sync("query-yank", |_: NoArgs| Ok(json!([]))).allow_oob()
}

/// `x-delay` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayArgs {
    /// How long to wait before replying.
    pub ms: u64,
}

/// `x-delay {ms}`: replies `{}` after `ms` milliseconds without blocking anything; cancelling
/// it drops the timer. For tests and benchmarks.
pub fn x_delay() -> Command {
    Command::async_fn("x-delay", |args: DelayArgs| async move {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok::<_, QmpError>(json!({}))
    })
}
