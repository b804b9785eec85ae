//! Jobs: long work that any client can examine and control, with QEMU 10.0's states,
//! verbs, refusals and `JOB_STATUS_CHANGE` events, and deferred commands as their special
//! case.
//!
//! # One mechanism, two faces
//!
//! Markus Armbruster's conditions for an asynchronous command rather than a job: it need
//! not broadcast its state (C1), its caller needs only the end (C2), the result is not
//! needed after a reconnect (C3), it need not be examined or controlled while it runs
//! (C4). A deferred command here is exactly a job with those four restrictions, and the
//! code has one tracking mechanism for both:
//!
//! * `core::Core` is the tracking core of *all* long work: the [`JobStatus`] and two
//!   settlement flags in one atomic word (`CANCEL`, QEMU's `job->cancelled`; `DONE`, QEMU's
//!   `deferred_to_main_loop`: whichever is set first wins the race between a cancel and the
//!   end of the work), beside the progress counters. A deferred command's in-flight entry
//!   and its `QmpReturn` share one core: the settlement that decides "reply or cancelled"
//!   is this word, and `query-async-commands` reads `status` and progress from it. A job's
//!   record owns one too, and `query-jobs` reads the same fields.
//! * `record::JobRecord` is the life cycle on top of the core: pause and resume, ready and
//!   complete, finalization (prepare, commit or abort, clean), conclusion and dismissal,
//!   with every transition checked against QEMU's table. Its `record::Scope` is the only
//!   difference between the faces:
//!   * `Public`: in the server's `table::JobTable` under its id, controlled by any client
//!     with `job-*`, every transition broadcast, alive until dismissed, cancelled only by
//!     `job-cancel` or server shutdown; the command that starts it replies at once;
//!   * `Private`: the job of a command started without `job-id`: not listed, never
//!     announced (C1), answered with its outcome when it concludes (C2), cancelled when its
//!     client leaves (C3) or with `async-command-cancel`, dismissed as soon as it concludes,
//!     and controlled by nobody else (C4).
//!
//!   A plain deferred command (a handler holding a `QmpReturn`) is the degenerate private
//!   job: a core in `running` whose end is its reply. It needs no record, because nothing
//!   can pause, ready or finalize it.
//! * Both faces run their work on the server's handler tracker and take their cancellation
//!   token from the same tree (server → connection → request for private work; server →
//!   job for public jobs), so shutdown cancels and waits for them alike.
//!
//! # The embedder's side
//!
//! A job is a [`JobDriver`]: `run` does the work with a [`JobHandle`] (progress, pause
//! points, readiness, cancellation), and `prepare`/`commit`/`abort`/`clean` finalize it, as
//! in QEMU. [`JobOptions`] carries its type, optional id and `auto-finalize`/`auto-dismiss`.
//!
//! # Where this follows QEMU and where it cannot
//!
//! States, transitions, the verb table, the refusal texts, the order of checks
//! (`job-resume` tests "not paused" before the verb), `Operation canceled`, cancelling a
//! paused job (it resumes, then aborts) and the auto-finalize/auto-dismiss defaults are
//! QEMU's. A pause takes effect on the status at once, as QEMU shows it for a job that is
//! sleeping; the work itself stops at its next pause point, and a paused job's work that
//! returns waits for the resume before the job moves on. There are no transactions: every
//! job is a transaction of one, so `waiting` is passed through at once.

pub(crate) mod core;
mod driver;
pub(crate) mod id;
pub(crate) mod record;
mod status;
pub(crate) mod table;

pub use driver::{JobDriver, JobHandle, JobOptions};
pub use id::is_well_formed as is_valid_job_id;
pub use record::JobInfo;
pub use status::{JobStatus, JobVerb};

#[cfg(test)]
mod tests;
