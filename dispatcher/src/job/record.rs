//! One job's life cycle: QEMU's `job.c` sequence of states from `created` to `null`, the
//! verbs clients apply to it, and the points at which its work waits for them.
//!
//! Every change of state happens under the job's control lock and is announced there, so
//! the events of one job always come out in the order of its transitions. The status itself
//! lives in the job's [`Core`], readable without the lock.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::core::Core;
use super::id;
use super::status::{JobStatus, JobVerb, verb_refused};
use super::table::TableInner;
use crate::error::QmpError;
use crate::events::Events;

/// The event every transition of a public job emits.
pub(crate) const JOB_STATUS_CHANGE: &str = "JOB_STATUS_CHANGE";

/// QEMU's text for a job that ended because it was cancelled (`strerror(ECANCELED)`).
pub(crate) const OPERATION_CANCELED: &str = "Operation canceled";

/// The finalization steps of a job's driver, once its work has run (object-safe, so the
/// record can keep them while the job waits for `job-finalize`).
pub(crate) trait Steps: Send {
    fn prepare(&mut self) -> Result<(), QmpError>;
    fn commit(&mut self);
    fn abort(&mut self);
    fn clean(&mut self);
}

/// The reply a job owes when it runs as a deferred command: sent once it concludes.
pub(crate) type OnConclude = Box<dyn FnOnce(Result<(), QmpError>) + Send>;

/// Who sees a job.
pub(crate) enum Scope {
    /// Listed in the server's job table under its id, controlled by any client, every
    /// transition broadcast as `JOB_STATUS_CHANGE`.
    Public {
        id: Arc<str>,
        events: Events,
        table: Weak<TableInner>,
    },
    /// A deferred command's job: known to its request alone, never broadcast, cancelled
    /// with its client, answered when it concludes, and gone right after (Markus
    /// Armbruster's conditions C1–C4 for an asynchronous command).
    Private,
}

/// What the control lock guards.
pub(crate) struct Control {
    /// Paused by a client (`job-pause`), QEMU's `user_paused`.
    user_paused: bool,
    /// `job-complete` was accepted; the work sees it once the job is not paused.
    complete_requested: bool,
    /// Why the job aborted, once it did; `query-jobs` shows its text.
    error: Option<QmpError>,
    auto_finalize: bool,
    auto_dismiss: bool,
    /// The driver's finalization steps, from the end of its work until the job concludes.
    steps: Option<Box<dyn Steps>>,
    on_conclude: Option<OnConclude>,
}

/// One job, public or private.
pub(crate) struct JobRecord {
    scope: Scope,
    job_type: Arc<str>,
    pub(crate) core: Arc<Core>,
    control: Mutex<Control>,
    /// Wakes the work when a pause ends or completion is requested.
    wake: Notify,
    /// Cancelled by `job-cancel`, the private job's client leaving, or server shutdown.
    cancel: CancellationToken,
}

/// A job as `query-jobs` lists it, with the members in QEMU's order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// How far the job got, in units of its own choosing.
    pub current_progress: u64,
    /// Its state.
    pub status: JobStatus,
    /// How far it will go (may change while it runs).
    pub total_progress: u64,
    /// Its type, named by the command that started it (`x-delay`, `backup`).
    #[serde(rename = "type")]
    pub job_type: String,
    /// Its id.
    pub id: String,
    /// Why it aborted: its own error, or `Operation canceled`. Only once it aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobRecord {
    /// A job whose status and progress live in `core`: a new core in `created` for a public
    /// job; the request's own core (already `running`) for a private one. Nothing is
    /// announced yet.
    pub(crate) fn new(
        core: Arc<Core>,
        scope: Scope,
        job_type: Arc<str>,
        auto_finalize: bool,
        auto_dismiss: bool,
        cancel: CancellationToken,
        on_conclude: Option<OnConclude>,
    ) -> Self {
        // Nobody could finalize or dismiss a private job: it goes as soon as its work ends.
        let private = matches!(scope, Scope::Private);
        let (auto_finalize, auto_dismiss) = (auto_finalize || private, auto_dismiss || private);
        JobRecord {
            scope,
            job_type,
            core,
            control: Mutex::new(Control {
                user_paused: false,
                complete_requested: false,
                error: None,
                auto_finalize,
                auto_dismiss,
                steps: None,
                on_conclude,
            }),
            wake: Notify::new(),
            cancel,
        }
    }

    /// The job's id; `None` for a private job.
    pub(crate) fn id(&self) -> Option<&str> {
        match &self.scope {
            Scope::Public { id, .. } => Some(id),
            Scope::Private => None,
        }
    }

    pub(crate) fn job_type(&self) -> &str {
        &self.job_type
    }

    pub(crate) fn status(&self) -> JobStatus {
        self.core.status()
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether a client paused the job (read under its lock).
    pub(crate) fn user_paused(&self, control: &Control) -> bool {
        control.user_paused
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `next` and announces it. Taking the guard proves the lock is held.
    pub(crate) fn transition(&self, _control: &mut Control, next: JobStatus) {
        self.core.set_status(next);
        self.announce(next);
    }

    /// Announces the state the job is in (also `created`, which follows no other state).
    pub(crate) fn announce(&self, status: JobStatus) {
        if let Scope::Public { id, events, .. } = &self.scope {
            let data = serde_json::json!({"id": &**id, "status": status.as_str()});
            events.emit(JOB_STATUS_CHANGE, Some(data));
        }
    }

    /// The state, if the job accepts `verb` in it; otherwise QEMU's refusal.
    fn check(&self, verb: JobVerb) -> Result<JobStatus, QmpError> {
        let status = self.status();
        match status {
            // Dismissed after the caller found it: gone, as far as the caller can tell.
            JobStatus::Null => Err(id::not_found()),
            _ if status.accepts(verb) => Ok(status),
            _ => Err(QmpError::generic(verb_refused(
                self.id().unwrap_or_default(),
                status,
                verb,
            ))),
        }
    }

    /// `job-pause`: the status changes at once (`paused`, or `standby` when ready); the
    /// work stops at its next pause point.
    pub(crate) fn pause(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        let status = self.check(JobVerb::Pause)?;
        if control.user_paused {
            return Err(QmpError::generic("Job is already paused"));
        }
        control.user_paused = true;
        match status {
            JobStatus::Running => self.transition(&mut control, JobStatus::Paused),
            JobStatus::Ready => self.transition(&mut control, JobStatus::Standby),
            _ => {}
        }
        Ok(())
    }

    /// `job-resume`. The not-paused check comes before the verb check, as in QEMU.
    pub(crate) fn resume(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        if self.status() == JobStatus::Null {
            return Err(id::not_found());
        }
        if !control.user_paused {
            return Err(QmpError::generic("Can't resume a job that was not paused"));
        }
        self.check(JobVerb::Resume)?;
        self.unpause(&mut control);
        Ok(())
    }

    /// `job-complete`: accepted when ready, and in standby, where it takes effect after
    /// `job-resume`.
    pub(crate) fn complete(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        self.check(JobVerb::Complete)?;
        if self.cancel.is_cancelled() {
            let id = self.id().unwrap_or_default();
            return Err(QmpError::generic(format!(
                "The active block job '{id}' cannot be completed"
            )));
        }
        control.complete_requested = true;
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-cancel`: a paused job is resumed first; a job whose work is still going is told
    /// through its token and aborts when the work returns; one waiting to be finalized
    /// aborts now.
    pub(crate) fn cancel(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        self.check(JobVerb::Cancel)?;
        self.core.force_cancel();
        self.unpause(&mut control);
        match self.status() {
            JobStatus::Waiting | JobStatus::Pending => {
                control
                    .error
                    .get_or_insert_with(|| QmpError::generic(OPERATION_CANCELED));
                self.transition(&mut control, JobStatus::Aborting);
                self.finalize_single(&mut control);
            }
            _ => {
                self.cancel.cancel();
                self.wake.notify_waiters();
            }
        }
        Ok(())
    }

    /// `job-finalize`: prepare, then commit or abort, clean, conclude.
    pub(crate) fn finalize(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        self.check(JobVerb::Finalize)?;
        self.do_finalize(&mut control);
        Ok(())
    }

    /// `job-dismiss`: a concluded job goes.
    pub(crate) fn dismiss(&self) -> Result<(), QmpError> {
        let mut control = self.lock();
        self.check(JobVerb::Dismiss)?;
        self.do_dismiss(&mut control);
        Ok(())
    }

    /// The server stops: whatever still runs is cancelled, whatever waits for a client is
    /// aborted or dismissed, so no job outlives it.
    pub(crate) fn shut_down(&self) {
        let mut control = self.lock();
        control.auto_dismiss = true;
        match self.status() {
            JobStatus::Waiting | JobStatus::Pending => {
                self.core.force_cancel();
                control
                    .error
                    .get_or_insert_with(|| QmpError::generic(OPERATION_CANCELED));
                self.transition(&mut control, JobStatus::Aborting);
                self.finalize_single(&mut control);
            }
            JobStatus::Concluded => self.do_dismiss(&mut control),
            JobStatus::Null => {}
            _ => {
                self.core.force_cancel();
                self.cancel.cancel();
                self.wake.notify_waiters();
            }
        }
    }

    /// Ends a client's pause: `paused` → `running`, `standby` → `ready`.
    fn unpause(&self, control: &mut Control) {
        if !control.user_paused {
            return;
        }
        control.user_paused = false;
        match self.status() {
            JobStatus::Paused => self.transition(control, JobStatus::Running),
            JobStatus::Standby => self.transition(control, JobStatus::Ready),
            _ => {}
        }
        self.wake.notify_waiters();
    }

    /// Resolves once the job is not paused by a client, or is cancelled.
    pub(crate) async fn pause_point(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().user_paused || self.cancel.is_cancelled() {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// The work declares it is ready (after a pause point: a paused job changes nothing).
    /// A private job has nobody to complete it, so readiness does not apply to it.
    pub(crate) async fn ready(&self) {
        if matches!(self.scope, Scope::Private) {
            return;
        }
        loop {
            self.pause_point().await;
            let mut control = self.lock();
            if self.cancel.is_cancelled() {
                return;
            }
            if control.user_paused {
                continue;
            }
            if self.status() == JobStatus::Running {
                self.transition(&mut control, JobStatus::Ready);
            }
            return;
        }
    }

    /// Waits for `job-complete` (seen only while not paused); false if cancelled first.
    pub(crate) async fn wait_complete(&self) -> bool {
        if matches!(self.scope, Scope::Private) {
            return !self.cancel.is_cancelled();
        }
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let control = self.lock();
                if self.cancel.is_cancelled() {
                    return false;
                }
                if control.complete_requested && !control.user_paused {
                    return true;
                }
            }
            tokio::select! {
                () = notified => {}
                () = self.cancel.cancelled() => return false,
            }
        }
    }

    /// The work returned: the job moves on to `waiting` and `pending` (and is finalized if
    /// automatic), or, failed or cancelled, to `aborting`. A job paused meanwhile waits for
    /// its resume first, as QEMU's job only completes while running.
    pub(crate) async fn finish(&self, result: Result<(), QmpError>, steps: Box<dyn Steps>) {
        let mut control = loop {
            self.pause_point().await;
            let control = self.lock();
            if !control.user_paused || self.cancel.is_cancelled() {
                break control;
            }
        };
        control.steps = Some(steps);
        let cancelled = !self.core.mark_done() || self.cancel.is_cancelled();
        let error = match result {
            Err(error) => Some(error),
            Ok(()) if cancelled => Some(QmpError::generic(OPERATION_CANCELED)),
            Ok(()) => None,
        };
        match error {
            Some(error) => {
                // Cancelled while paused (shutdown, a departed client): resume, then abort.
                self.unpause(&mut control);
                control.error = Some(error);
                self.transition(&mut control, JobStatus::Aborting);
                self.finalize_single(&mut control);
            }
            None => {
                self.transition(&mut control, JobStatus::Waiting);
                self.transition(&mut control, JobStatus::Pending);
                if control.auto_finalize {
                    self.do_finalize(&mut control);
                }
            }
        }
    }

    /// QEMU's `job_do_finalize` for a transaction of one: prepare, and abort if it fails.
    fn do_finalize(&self, control: &mut Control) {
        if let Some(steps) = control.steps.as_mut() {
            let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| steps.prepare()))
                .unwrap_or_else(|_| {
                    tracing::error!(job = ?self.id(), "a job's prepare step panicked");
                    Err(QmpError::generic("Job preparation failed: it panicked"))
                });
            if let Err(error) = prepared {
                control.error = Some(error);
                self.transition(control, JobStatus::Aborting);
            }
        }
        self.finalize_single(control);
    }

    /// QEMU's `job_finalize_single`: commit or abort, clean, conclude.
    fn finalize_single(&self, control: &mut Control) {
        let failed = control.error.is_some();
        if let Some(mut steps) = control.steps.take() {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if failed {
                    steps.abort();
                } else {
                    steps.commit();
                }
                steps.clean();
            }));
            if outcome.is_err() {
                tracing::error!(job = ?self.id(), "a job's finalization step panicked");
            }
        }
        self.transition(control, JobStatus::Concluded);
        if let Some(reply) = control.on_conclude.take() {
            reply(control.error.clone().map_or(Ok(()), Err));
        }
        if control.auto_dismiss || self.table().is_some_and(|table| table.is_closed()) {
            self.do_dismiss(control);
        }
    }

    /// `null`, and out of the table.
    fn do_dismiss(&self, control: &mut Control) {
        self.transition(control, JobStatus::Null);
        if let Some(table) = self.table() {
            table.remove(self);
        }
    }

    fn table(&self) -> Option<Arc<TableInner>> {
        match &self.scope {
            Scope::Public { table, .. } => table.upgrade(),
            Scope::Private => None,
        }
    }

    /// The `query-jobs` row.
    pub(crate) fn info(&self) -> JobInfo {
        let control = self.lock();
        let (current, total) = self.core.progress();
        JobInfo {
            current_progress: current,
            status: self.status(),
            total_progress: total,
            job_type: self.job_type.to_string(),
            id: self.id().unwrap_or_default().to_string(),
            error: control.error.as_ref().map(|e| e.desc.clone()),
        }
    }
}

impl std::fmt::Debug for JobRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRecord")
            .field("id", &self.id())
            .field("type", &self.job_type)
            .field("status", &self.status())
            .finish()
    }
}
