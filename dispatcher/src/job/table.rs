//! The server's job table: every public job by id, from creation until it is dismissed,
//! whichever client started it and whether or not that client is still connected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::JobStatus;
use super::core::Core;
use super::driver::{self, JobDriver, JobOptions};
use super::id;
use super::record::{JobInfo, JobRecord, OnConclude, Scope};
use crate::error::QmpError;
use crate::events::Events;

/// A server's jobs. Cheap to clone; every clone is the same table.
#[derive(Clone, Debug)]
pub(crate) struct JobTable {
    inner: Arc<TableInner>,
}

/// What the table's jobs point back to, to leave it when dismissed.
#[derive(Debug)]
pub(crate) struct TableInner {
    /// In creation order; `query-jobs` lists the newest first, as QEMU does.
    jobs: Mutex<Vec<Arc<JobRecord>>>,
    events: Events,
    /// The tracker job work runs on: the server's handler tracker, so `Server::wait`
    /// waits for it.
    tasks: TaskTracker,
    /// Every job's token is a child: server shutdown cancels them all.
    shutdown: CancellationToken,
    /// Set by shutdown: from then on every job is dismissed as soon as it concludes.
    closed: AtomicBool,
}

impl TableInner {
    fn jobs(&self) -> MutexGuard<'_, Vec<Arc<JobRecord>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A dismissed job leaves the table.
    pub(crate) fn remove(&self, record: &JobRecord) {
        self.jobs()
            .retain(|job| !std::ptr::eq(Arc::as_ptr(job), record));
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl JobTable {
    /// A table whose jobs announce through `events`, run on `tasks` and are cancelled with
    /// `shutdown`.
    pub(crate) fn new(events: Events, tasks: TaskTracker, shutdown: CancellationToken) -> Self {
        JobTable {
            inner: Arc::new(TableInner {
                jobs: Mutex::new(Vec::new()),
                events,
                tasks,
                shutdown,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Creates a public job and starts its work: `Invalid job ID`, `Job ID ... already in
    /// use` (even by a concluded job) and a missing id are refused before anything starts.
    /// On success `created` and `running` are already announced, so the caller's reply
    /// follows them, as in QEMU.
    pub(crate) fn start<D: JobDriver>(
        &self,
        options: JobOptions,
        driver: D,
    ) -> Result<(), QmpError> {
        let Some(job_id) = options.id.as_deref() else {
            return Err(id::missing());
        };
        if !id::is_well_formed(job_id) {
            return Err(id::invalid(job_id));
        }
        let record = Arc::new(JobRecord::new(
            Arc::new(Core::new(JobStatus::Created)),
            Scope::Public {
                id: job_id.into(),
                events: self.inner.events.clone(),
                table: Arc::downgrade(&self.inner),
            },
            options.job_type.as_str().into(),
            options.auto_finalize,
            options.auto_dismiss,
            self.inner.shutdown.child_token(),
            None,
        ));
        {
            let mut jobs = self.inner.jobs();
            if jobs.iter().any(|job| job.id() == Some(job_id)) {
                return Err(id::in_use(job_id));
            }
            jobs.push(Arc::clone(&record));
        }
        driver::start(record, driver, &self.inner.tasks);
        Ok(())
    }

    /// Creates a private job, the face of a command started without `job-id`: not listed,
    /// never announced, cancelled with `cancel` (its request's token), and answered through
    /// `on_conclude` when it concludes. The record is for the request's in-flight entry.
    pub(crate) fn start_private<D: JobDriver>(
        &self,
        options: JobOptions,
        driver: D,
        core: Arc<Core>,
        cancel: CancellationToken,
        on_conclude: OnConclude,
    ) -> Arc<JobRecord> {
        let record = Arc::new(JobRecord::new(
            core,
            Scope::Private,
            options.job_type.as_str().into(),
            true,
            true,
            cancel,
            Some(on_conclude),
        ));
        driver::start(Arc::clone(&record), driver, &self.inner.tasks);
        record
    }

    /// The job of this id, or `Job not found`.
    pub(crate) fn find(&self, job_id: &str) -> Result<Arc<JobRecord>, QmpError> {
        self.inner
            .jobs()
            .iter()
            .find(|job| job.id() == Some(job_id))
            .cloned()
            .ok_or_else(id::not_found)
    }

    /// `query-jobs`: newest first.
    pub(crate) fn query(&self) -> Vec<JobInfo> {
        let jobs: Vec<Arc<JobRecord>> = self.inner.jobs().iter().rev().cloned().collect();
        jobs.iter().map(|job| job.info()).collect()
    }

    /// Jobs in the table, for `Stats`.
    pub(crate) fn len(&self) -> usize {
        self.inner.jobs().len()
    }

    /// Server shutdown: every job is cancelled, or aborted or dismissed if it waits for a
    /// client, and each leaves the table as soon as it concludes.
    pub(crate) fn shut_down(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.shutdown.cancel();
        let jobs: Vec<Arc<JobRecord>> = self.inner.jobs().clone();
        for job in jobs {
            job.shut_down();
        }
    }
}
