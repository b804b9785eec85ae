//! Small QEMU commands a VMM monitor needs: `query-yank`, `x-delay`. (`quit` is
//! [`RunState::quit`](crate::run_state::RunState::quit): it emits `SHUTDOWN`.)

use std::time::Duration;

use qmp_dispatcher::{
    Command, Context, JobDriver, JobHandle, JobOptions, NoArgs, QmpError, QmpReturn,
};
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
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DelayArgs {
    /// How long to work (milliseconds of running time: a paused job's pause does not
    /// count).
    pub ms: u64,
    /// Run as a job of this id (type `x-delay`): the reply comes at once, the rest as
    /// `JOB_STATUS_CHANGE` events. Without it the command replies when the work ends.
    pub job_id: Option<String>,
    /// QEMU's `auto-finalize` (default true): false stops the job in `pending`.
    pub auto_finalize: Option<bool>,
    /// QEMU's `auto-dismiss` (default true): false keeps the job `concluded`.
    pub auto_dismiss: Option<bool>,
    /// After `ms`, the job becomes `ready` and waits for `job-complete`, like a mirror.
    pub ready: Option<bool>,
    /// After `ms`, the work fails with this error instead.
    pub fail: Option<String>,
}

/// How often an `x-delay` job reports progress and passes a pause point.
const PROGRESS_STEP_MS: u64 = 50;

/// An `x-delay` without `job-id` cannot be paused, so it only reports progress, in tenths:
/// ten thousand clients each waiting on one must not wake the server 200,000 times a second.
const PRIVATE_PROGRESS_STEPS: u64 = 10;

/// `x-delay {ms}`: works for `ms` milliseconds without blocking anything, reporting
/// progress from 0 to `ms`. Without `job-id` it replies `{}` when done (cancelling it stops
/// the timer), a deferred command that `query-async-commands` shows with its progress; with
/// `job-id` it is a job of type `x-delay` that any client can follow and control. For tests,
/// benchmarks and trying jobs out.
pub fn x_delay<S: Send + Sync + 'static>() -> Command<S> {
    Command::deferred("x-delay", |args: DelayArgs, cx: Context<S>, ret| {
        if args.job_id.is_none() {
            // The degenerate private job: nothing can pause, ready or finalize it, so it
            // needs no job record, only its request's core (for the progress) and its reply.
            return ret.spawn(move |ret| {
                delay_privately(args.ms, args.fail.map(String::into_boxed_str), ret)
            });
        }
        let options = JobOptions::new("x-delay")
            .id(args.job_id)
            .auto_finalize(args.auto_finalize.unwrap_or(true))
            .auto_dismiss(args.auto_dismiss.unwrap_or(true));
        let job = DelayJob {
            ms: args.ms,
            ready: args.ready.unwrap_or(false),
            fail: args.fail,
        };
        cx.start_job(options, job, ret);
    })
    .returns::<()>()
    .emits("JOB_STATUS_CHANGE")
}

/// `x-delay` without `job-id`: sleeps in tenths of `ms`, reporting progress, and replies.
///
/// One timer, moved on at each step: the task of every such command in flight is a few
/// hundred bytes, and ten thousand may be (see docs/performance.md).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn's state holds a copy of its arguments"
)]
fn delay_privately(
    ms: u64,
    fail: Option<Box<str>>,
    ret: QmpReturn,
) -> impl Future<Output = ()> + Send {
    // A block, not an `async fn`: the compiler copies an `async fn`'s arguments into its
    // state beside the locals, 80 bytes more in every task.
    async move {
        ret.set_progress(0, ms);
        let step = |done: u64| (ms - done).min(PROGRESS_STEP_MS.max(ms / PRIVATE_PROGRESS_STEPS));
        let mut done = step(0);
        let timer = tokio::time::sleep(Duration::from_millis(done));
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                () = ret.cancelled() => return,
                () = &mut timer => {}
            }
            ret.set_progress(done, ms);
            if done == ms {
                break;
            }
            let next = step(done);
            done += next;
            let deadline = timer.deadline() + Duration::from_millis(next);
            timer.as_mut().reset(deadline);
        }
        match fail {
            Some(error) => ret.err(QmpError::generic(error)),
            None => ret.reply(Ok(())),
        }
    }
}

/// The work of `x-delay` as a job.
struct DelayJob {
    ms: u64,
    ready: bool,
    fail: Option<String>,
}

impl JobDriver for DelayJob {
    async fn run(&mut self, job: &JobHandle) -> Result<(), QmpError> {
        job.set_total_progress(self.ms);
        let mut done = 0;
        while done < self.ms {
            job.pause_point().await;
            let step = (self.ms - done).min(PROGRESS_STEP_MS);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(step)) => {}
                // The job aborts with `Operation canceled` whatever is returned.
                () = job.cancelled() => return Ok(()),
            }
            done += step;
            job.set_progress(done);
        }
        if let Some(error) = &self.fail {
            return Err(QmpError::generic(error.clone()));
        }
        if self.ready {
            job.ready().await;
            job.wait_complete().await;
        }
        Ok(())
    }
}
