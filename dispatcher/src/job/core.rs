//! The tracking core every piece of long work has, job or deferred command: its status,
//! whether a cancel or the end came first, and its progress, in atomics that any thread
//! may read without a lock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::status::JobStatus;

/// Status and settlement in one word, progress beside it.
///
/// The word holds the [`JobStatus`] in its low bits and three flags:
/// * `CANCEL`: a cancel was requested (QEMU's `job->cancelled`);
/// * `DONE`: the work ended and its outcome is committed (QEMU's `deferred_to_main_loop`);
///   from then on a soft cancel, the only kind a deferred command knows, has no effect;
/// * `PROGRESS`: the work reported progress, so listings show it;
/// * `STOP`: the work was told to stop (its request was cancelled, timed out, or its client
///   left), which [`is_stopped`](Self::is_stopped) and [`stop_token`](Self::stop_token) show.
///
/// `CANCEL` and `DONE` settle a race: whichever is set first wins, and the other is
/// refused (see [`request_cancel`](Self::request_cancel) and [`mark_done`](Self::mark_done)).
///
/// The stop signal is a flag rather than a child of the connection's token: a child token
/// costs an allocation and two locks of its parent, which every request of the connection
/// shares, and most handlers never look. Waiting for it ([`stopped`](Self::stopped)) takes
/// a `Notify`; a token is made only for work that asks for one.
#[derive(Debug)]
pub(crate) struct Core {
    word: AtomicU32,
    current: AtomicU64,
    total: AtomicU64,
    /// Wakes [`stopped`](Self::stopped) futures when `STOP` is set.
    stopping: Notify,
    /// Made by the first [`stop_token`](Self::stop_token), cancelled with `STOP`.
    token: OnceLock<CancellationToken>,
}

const STATUS_MASK: u32 = 0xf;
const CANCEL: u32 = 1 << 4;
const DONE: u32 = 1 << 5;
const PROGRESS: u32 = 1 << 6;
const STOP: u32 = 1 << 7;

impl Core {
    /// A core in `status` with no progress reported.
    pub(crate) fn new(status: JobStatus) -> Self {
        Core {
            word: AtomicU32::new(u32::from(status.to_u8())),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            stopping: Notify::new(),
            token: OnceLock::new(),
        }
    }

    /// Tells the work to stop: sets `STOP` and cancels the token, if one was made.
    pub(crate) fn stop(&self) {
        self.word.fetch_or(STOP, Ordering::AcqRel);
        self.stopping.notify_waiters();
        // Paired with the fence in `stop_token`: either it sees `STOP`, or this sees its
        // token; a token made meanwhile is never left uncancelled.
        fence(Ordering::SeqCst);
        if let Some(token) = self.token.get() {
            token.cancel();
        }
    }

    /// True once the work was told to [`stop`](Self::stop).
    pub(crate) fn is_stopped(&self) -> bool {
        self.word.load(Ordering::Acquire) & STOP != 0
    }

    /// Resolves once the work is told to stop. Cancel-safe.
    pub(crate) async fn stopped(&self) {
        // A `Notified` hears every `notify_waiters` after its creation, so a stop between
        // the check and the wait is not missed.
        let notified = self.stopping.notified();
        if self.is_stopped() {
            return;
        }
        notified.await;
    }

    /// A token cancelled when the work is told to stop (at once if it was already).
    pub(crate) fn stop_token(&self) -> &CancellationToken {
        let token = self.token.get_or_init(CancellationToken::new);
        fence(Ordering::SeqCst);
        if self.is_stopped() {
            token.cancel();
        }
        token
    }

    pub(crate) fn status(&self) -> JobStatus {
        JobStatus::from_u8((self.word.load(Ordering::Acquire) & STATUS_MASK) as u8)
    }

    /// Moves to `next`, keeping the flags. Transitions are serialized by the owner (a job's
    /// control lock); the table check catches a state machine bug in tests.
    pub(crate) fn set_status(&self, next: JobStatus) {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let current = JobStatus::from_u8((word & STATUS_MASK) as u8);
            debug_assert!(current.may_become(next), "{current} -> {next}");
            let new = (word & !STATUS_MASK) | u32::from(next.to_u8());
            match self
                .word
                .compare_exchange_weak(word, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(seen) => word = seen,
            }
        }
    }

    /// Records a cancel unless the work's end was committed first; true if the work is
    /// (now or already) cancelled.
    pub(crate) fn request_cancel(&self) -> bool {
        self.settle(CANCEL, DONE)
    }

    /// Commits the work's end unless a cancel came first; true if the end stands.
    pub(crate) fn mark_done(&self) -> bool {
        self.settle(DONE, CANCEL)
    }

    /// Records a cancel whatever came before: `job-cancel` aborts even a job whose work has
    /// ended, while it waits to be finalized.
    pub(crate) fn force_cancel(&self) {
        self.word.fetch_or(CANCEL, Ordering::AcqRel);
    }

    #[cfg(test)]
    pub(crate) fn is_cancel_requested(&self) -> bool {
        self.word.load(Ordering::Acquire) & CANCEL != 0
    }

    /// Sets `flag` unless `rival` is set; true if `flag` is set afterwards.
    fn settle(&self, flag: u32, rival: u32) -> bool {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            if word & flag != 0 {
                return true;
            }
            if word & rival != 0 {
                return false;
            }
            match self.word.compare_exchange_weak(
                word,
                word | flag,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => word = seen,
            }
        }
    }

    /// Sets how far the work got.
    pub(crate) fn set_progress(&self, current: u64) {
        self.current.store(current, Ordering::Relaxed);
        self.word.fetch_or(PROGRESS, Ordering::Relaxed);
    }

    /// Adds to how far the work got.
    pub(crate) fn add_progress(&self, delta: u64) {
        self.current.fetch_add(delta, Ordering::Relaxed);
        self.word.fetch_or(PROGRESS, Ordering::Relaxed);
    }

    /// Sets how far the work will go (it may change while the work runs, as in QEMU).
    pub(crate) fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.word.fetch_or(PROGRESS, Ordering::Relaxed);
    }

    /// `(current, total)`, whether reported or not (jobs always show it).
    pub(crate) fn progress(&self) -> (u64, u64) {
        (
            self.current.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// `(current, total)` if the work ever reported progress.
    pub(crate) fn reported_progress(&self) -> Option<(u64, u64)> {
        (self.word.load(Ordering::Relaxed) & PROGRESS != 0).then(|| self.progress())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_token_is_cancelled_whether_made_before_or_after_the_stop() {
        let early = Core::new(JobStatus::Running);
        let token = early.stop_token().clone();
        assert!(!token.is_cancelled() && !early.is_stopped());
        early.stop();
        assert!(token.is_cancelled() && early.is_stopped());
        let late = Core::new(JobStatus::Running);
        late.stop();
        assert!(late.stop_token().is_cancelled());
        // The flag survives status changes.
        late.set_status(JobStatus::Aborting);
        assert!(late.is_stopped());
    }

    #[tokio::test]
    async fn stopped_resolves_on_a_stop_before_or_while_waiting() {
        let core = std::sync::Arc::new(Core::new(JobStatus::Running));
        let waiter = tokio::spawn({
            let core = std::sync::Arc::clone(&core);
            async move { core.stopped().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        core.stop();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter heard the stop")
            .unwrap();
        // Already stopped: resolves at once.
        core.stopped().await;
    }

    #[test]
    fn cancel_and_end_settle_once() {
        let core = Core::new(JobStatus::Running);
        assert!(core.mark_done());
        assert!(core.mark_done(), "idempotent");
        assert!(!core.request_cancel(), "the end came first");
        assert!(!core.is_cancel_requested());

        let core = Core::new(JobStatus::Running);
        assert!(core.request_cancel());
        assert!(!core.mark_done(), "the cancel came first");
        assert!(core.request_cancel());
    }

    #[test]
    fn status_keeps_the_flags_and_progress_is_reported_once_set() {
        let core = Core::new(JobStatus::Created);
        core.force_cancel();
        core.set_status(JobStatus::Running);
        assert_eq!(core.status(), JobStatus::Running);
        assert!(core.is_cancel_requested());
        assert_eq!(core.reported_progress(), None);
        core.set_total(10);
        core.add_progress(3);
        core.add_progress(4);
        assert_eq!(core.reported_progress(), Some((7, 10)));
    }
}
