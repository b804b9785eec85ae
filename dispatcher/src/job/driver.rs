//! The embedder's side of a job: the [`JobDriver`] it writes, the [`JobHandle`] its work
//! reports through, and the [`JobOptions`] a job is created with.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use super::record::{JobRecord, Steps};
use crate::error::QmpError;

/// A job's work and its finalization, as QEMU's `JobDriver` has them.
///
/// [`run`](Self::run) does the work, reporting through its [`JobHandle`]: progress, pause
/// points, readiness. When it returns `Ok`, the job goes through `waiting` to `pending`, and
/// is *finalized* (automatically, or by `job-finalize`): [`prepare`](Self::prepare), then
/// [`commit`](Self::commit), or [`abort`](Self::abort) if preparing failed, then
/// [`clean`](Self::clean). When `run` fails, or the job was cancelled, the job goes to
/// `aborting` and only `abort` and `clean` run. The four steps run under the job's lock, on
/// whichever task finalizes it (its own, or the connection task of the client that sent
/// `job-finalize` or `job-cancel`): keep them short and non-blocking, like a sync handler.
pub trait JobDriver: Send + 'static {
    /// The work. Call [`JobHandle::pause_point`] between steps and watch
    /// [`JobHandle::cancelled`]: the server's shutdown waits for this future to end.
    /// An `Err` aborts the job with that error (`query-jobs` shows its `desc`); returning
    /// after a cancel aborts it with `Operation canceled` whatever is returned.
    fn run(&mut self, job: &JobHandle) -> impl Future<Output = Result<(), QmpError>> + Send;

    /// Makes the result permanent, or fails (the job then aborts). By default, succeeds.
    fn prepare(&mut self) -> Result<(), QmpError> {
        Ok(())
    }

    /// The job succeeded.
    fn commit(&mut self) {}

    /// The job failed or was cancelled: undo what the work did.
    fn abort(&mut self) {}

    /// After `commit` or `abort`, in both cases.
    fn clean(&mut self) {}
}

impl<D: JobDriver> Steps for D {
    fn prepare(&mut self) -> Result<(), QmpError> {
        JobDriver::prepare(self)
    }
    fn commit(&mut self) {
        JobDriver::commit(self)
    }
    fn abort(&mut self) {
        JobDriver::abort(self)
    }
    fn clean(&mut self) {
        JobDriver::clean(self)
    }
}

/// How a job is created: its type, its id (without one, it runs as a deferred command),
/// and QEMU's `auto-finalize` and `auto-dismiss` (both true by default, as in QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    pub(crate) job_type: String,
    pub(crate) id: Option<String>,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
}

impl JobOptions {
    /// Options for a job of this type (`query-jobs` shows it as `type`), without an id.
    pub fn new(job_type: impl Into<String>) -> Self {
        JobOptions {
            job_type: job_type.into(),
            id: None,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }

    /// The job's id, as the client gave it (`job-id`); checked against QEMU's syntax when
    /// the job is created. `None` leaves it without one.
    pub fn id(mut self, id: Option<String>) -> Self {
        self.id = id;
        self
    }

    /// False: the job stops in `pending` until a client sends `job-finalize`.
    pub fn auto_finalize(mut self, auto: bool) -> Self {
        self.auto_finalize = auto;
        self
    }

    /// False: the job stays `concluded`, listed with its outcome, until `job-dismiss`.
    pub fn auto_dismiss(mut self, auto: bool) -> Self {
        self.auto_dismiss = auto;
        self
    }

    /// The id given, if any.
    pub fn job_id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

/// What a job's work holds: it reports progress, offers pause points, declares readiness,
/// and learns of cancellation through it. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct JobHandle {
    pub(crate) record: Arc<JobRecord>,
}

impl JobHandle {
    /// The job's id; `None` when it runs as a deferred command.
    pub fn id(&self) -> Option<&str> {
        self.record.id()
    }

    /// The job's type.
    pub fn job_type(&self) -> &str {
        self.record.job_type()
    }

    /// Sets `current-progress`.
    pub fn set_progress(&self, current: u64) {
        self.record.core.set_progress(current);
    }

    /// Adds to `current-progress`.
    pub fn add_progress(&self, delta: u64) {
        self.record.core.add_progress(delta);
    }

    /// Sets `total-progress`; it may change as the work learns more, as in QEMU.
    pub fn set_total_progress(&self, total: u64) {
        self.record.core.set_total(total);
    }

    /// A point where the work may be paused: resolves at once unless a client paused the
    /// job (`job-pause`), else when it is resumed or cancelled. The status shows `paused`
    /// (`standby` when ready) from the moment the client asked; the work stops here.
    pub async fn pause_point(&self) {
        self.record.pause_point().await
    }

    /// Declares the job ready, as a mirror in sync (after a pause point: a paused job
    /// becomes ready only once resumed). Then [`wait_complete`](Self::wait_complete).
    /// Without an id (the deferred-command face) nobody could complete the job: both
    /// return at once, as if `job-complete` had come.
    pub async fn ready(&self) {
        self.record.ready().await
    }

    /// Waits for `job-complete` (a completion requested in `standby` counts once the job is
    /// resumed); `false` if the job was cancelled first.
    pub async fn wait_complete(&self) -> bool {
        self.record.wait_complete().await
    }

    /// True once the job is cancelled: `job-cancel`, its client leaving (deferred face), or
    /// server shutdown.
    pub fn is_cancelled(&self) -> bool {
        self.record.cancel_token().is_cancelled()
    }

    /// Resolves when the job is cancelled. Cancel-safe.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.record.cancel_token().cancelled()
    }

    /// A token cancelled with the job, for threads and child tasks.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.record.cancel_token().clone()
    }
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("JobHandle").field(&self.record).finish()
    }
}

/// Runs a created job's work on `tasks`: `created` → `running` now (announced before the
/// caller replies), the rest as the work and the clients go.
pub(crate) fn start<D: JobDriver>(record: Arc<JobRecord>, mut driver: D, tasks: &TaskTracker) {
    {
        let mut control = record.lock();
        // A private job's core is its request's, already running; a public one starts
        // `created`, and says so.
        if record.status() == super::JobStatus::Created {
            record.announce(super::JobStatus::Created);
            record.transition(&mut control, super::JobStatus::Running);
        }
        if record.cancel_token().is_cancelled() {
            // Nothing to do here: the work sees it at once and the job aborts.
        } else if record.user_paused(&control) {
            // Paused by a client while `created`: it stops at its first pause point.
            record.transition(&mut control, super::JobStatus::Paused);
        }
    }
    let handle = JobHandle {
        record: Arc::clone(&record),
    };
    tasks.spawn(async move {
        let result = AssertUnwindSafe(driver.run(&handle))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!(job = ?record.id(), "a job's work panicked");
                Err(QmpError::generic(format!(
                    "Job of type {} failed: its work panicked",
                    record.job_type()
                )))
            });
        drop(handle);
        record.finish(result, Box::new(driver)).await;
    });
}
