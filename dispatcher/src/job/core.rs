//! The tracking core every piece of long work has, job or deferred command: its status,
//! whether a cancel or the end came first, and its progress, in atomics that any thread
//! may read without a lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use once_cell::race::OnceBox;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

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
/// the core's one waker slot; a token is made only for work that asks for one, or for a
/// second waiter while the slot is taken.
#[derive(Debug)]
pub(crate) struct Core {
    word: AtomicU32,
    current: AtomicU64,
    total: AtomicU64,
    /// The waker of the [`Stopped`] future that holds the slot (`WAITING`), woken by
    /// `STOP`. One slot rather than a `Notify`: a `Notified` is 64 bytes in every handler
    /// task that waits, and nearly every one waits alone.
    waiter: AtomicWaker,
    /// Made by the first [`stop_token`](Self::stop_token), cancelled with `STOP`. A
    /// `OnceBox` is one pointer (a `OnceLock` two words): the core stays in glibc's 80-byte
    /// chunks, one per request in flight.
    token: OnceBox<CancellationToken>,
}

const STATUS_MASK: u32 = 0xf;
const CANCEL: u32 = 1 << 4;
const DONE: u32 = 1 << 5;
const PROGRESS: u32 = 1 << 6;
const STOP: u32 = 1 << 7;
/// A [`Stopped`] future holds the waker slot.
const WAITING: u32 = 1 << 8;

impl Core {
    /// A core in `status` with no progress reported.
    pub(crate) fn new(status: JobStatus) -> Self {
        Core {
            word: AtomicU32::new(u32::from(status.to_u8())),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            waiter: AtomicWaker::new(),
            token: OnceBox::new(),
        }
    }

    /// Tells the work to stop: sets `STOP` and cancels the token, if one was made.
    pub(crate) fn stop(&self) {
        self.word.fetch_or(STOP, Ordering::AcqRel);
        self.waiter.wake();
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
    pub(crate) fn stopped(&self) -> Stopped<'_> {
        Stopped {
            core: self,
            wait: Wait::Unpolled,
        }
    }

    /// A token cancelled when the work is told to stop (at once if it was already).
    pub(crate) fn stop_token(&self) -> &CancellationToken {
        let token = self
            .token
            .get_or_init(|| Box::new(CancellationToken::new()));
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

/// The future of [`Core::stopped`]: 16 bytes. The first waiter takes the core's waker slot;
/// one that finds it taken waits on the stop token instead (boxed, so the common case stays
/// small).
#[derive(Debug)]
pub(crate) struct Stopped<'a> {
    core: &'a Core,
    wait: Wait,
}

#[derive(Debug)]
enum Wait {
    Unpolled,
    /// Holds the waker slot; gives it back when dropped.
    Slot,
    Token(Pin<Box<WaitForCancellationFutureOwned>>),
    Done,
}

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let core = self.core;
        if let Wait::Unpolled = self.wait {
            if core.is_stopped() {
                self.wait = Wait::Done;
                return Poll::Ready(());
            }
            let before = core.word.fetch_or(WAITING, Ordering::AcqRel);
            self.wait = if before & WAITING == 0 {
                Wait::Slot
            } else {
                Wait::Token(Box::pin(core.stop_token().clone().cancelled_owned()))
            };
        }
        match &mut self.wait {
            Wait::Slot => {
                // Registered before the check: a stop after the check wakes this waker.
                core.waiter.register(cx.waker());
                if !core.is_stopped() {
                    return Poll::Pending;
                }
                self.release();
                Poll::Ready(())
            }
            Wait::Token(wait) => {
                let ready = wait.as_mut().poll(cx);
                if ready.is_ready() {
                    self.wait = Wait::Done;
                }
                ready
            }
            Wait::Unpolled | Wait::Done => Poll::Ready(()),
        }
    }
}

impl Stopped<'_> {
    /// Gives the waker slot back, and the waker with it, so no task is kept alive by a
    /// future that is gone.
    fn release(&mut self) {
        if let Wait::Slot = std::mem::replace(&mut self.wait, Wait::Done) {
            drop(self.core.waiter.take());
            self.core.word.fetch_and(!WAITING, Ordering::AcqRel);
        }
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.release();
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

    #[tokio::test]
    async fn every_waiter_hears_the_stop_when_several_wait_or_one_gave_up() {
        use std::future::Future;
        use std::sync::Arc;
        use std::task::{Context, Poll, Waker};
        let core = Arc::new(Core::new(JobStatus::Running));
        // One waiter polled and dropped gives the slot back, and its waker with it.
        let mut gone = Box::pin(core.stopped());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        drop(gone);
        assert_eq!(core.word.load(Ordering::Acquire) & WAITING, 0);
        // Three at once: the first takes the slot, the others the token.
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let core = Arc::clone(&core);
                tokio::spawn(async move { core.stopped().await })
            })
            .collect();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(waiters.iter().all(|w| !w.is_finished()));
        core.stop();
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("every waiter heard the stop")
                .unwrap();
        }
        let mut late = Box::pin(core.stopped());
        assert_eq!(late.as_mut().poll(&mut cx), Poll::Ready(()));
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
