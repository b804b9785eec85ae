//! `QmpReturn`: the one reply a request is owed, deliverable now or later, from any thread.

use crate::counter::SpreadCounter;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::QmpError;
use crate::job::JobStatus;
use crate::job::core::Core;
use crate::registry::CommandId;
use crate::server::Shared;

/// Names one dispatched request inside its connection. The sequence number makes a late
/// completion harmless after its slab slot has been reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) key: usize,
    pub(crate) seq: u64,
}

/// Everything that reaches a connection from outside its task, in one FIFO, so an event a
/// handler emits before replying is written before the reply.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A handler's reply.
    Completion(Completion),
    /// An encoded event line.
    Event(bytes::Bytes),
    /// Events were lost because the client fell too far behind.
    Lagged,
}

/// What a handler produced for one request, on its way to the connection's writer.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) ticket: Ticket,
    pub(crate) outcome: Outcome,
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Return(Box<RawValue>),
    Error(QmpError),
}

/// The request's tracking core, the same one a job has (`crate::job::core::Core`): which
/// came first, a committed reply or its cancellation, and the status and progress
/// `query-async-commands` shows. Shared by the request's [`QmpReturn`] and its in-flight
/// entry, so that the handler and the session agree on one outcome (see
/// [`QmpReturn::ok_unless_cancelled`]); a command run as a private job shares it with its
/// job record.
#[derive(Debug, Clone)]
pub(crate) struct Settlement(Arc<Core>);

impl Default for Settlement {
    fn default() -> Self {
        // Dispatched means started: `created` passes unseen, as for any deferred command.
        Settlement(Arc::new(Core::new(JobStatus::Running)))
    }
}

impl Settlement {
    /// Settles the request as cancelled unless a reply was committed first; true if the
    /// request is (now or already) cancelled.
    pub(crate) fn cancel(&self) -> bool {
        self.0.request_cancel()
    }

    /// Tells the handler to stop: `is_cancelled` turns true and `cancelled` resolves.
    pub(crate) fn stop(&self) {
        self.0.stop();
    }

    /// Settles the request as replied unless it was cancelled first; true if it is replied.
    fn commit_reply(&self) -> bool {
        self.0.mark_done()
    }

    /// The core itself: status and progress.
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.0
    }
}

/// What every `QmpReturn` of one server shares: the leak counter and the tracker that
/// handler work runs on, so [`crate::Server::wait`] also waits for it.
#[derive(Debug, Default)]
pub(crate) struct ReturnShared {
    /// Live returns, for `Stats::live_returns`.
    pub(crate) live: SpreadCounter,
    pub(crate) tasks: TaskTracker,
}

/// The reply owed to one request.
///
/// A handler answers at once, or keeps the `QmpReturn`, moves it to another task or thread,
/// and answers later. The answering methods take `self`, so a request gets one reply at most;
/// dropping a `QmpReturn` unanswered still answers the client, with a `GenericError`, and
/// logs a warning, so a forgotten reply never hangs a client.
///
/// When the client disconnects, or cancels the request with `async-command-cancel`, the
/// return is *cancelled*: [`is_cancelled`](Self::is_cancelled) turns true, the
/// [`cancelled`](Self::cancelled) future resolves, and a reply sent afterwards is discarded
/// silently. It never reaches another client.
#[must_use = "a QmpReturn does nothing unless answered with ok() or err(); dropping it sends an error reply"]
pub struct QmpReturn {
    /// `None` once answered.
    sink: Option<Sink>,
    command: CommandId,
    /// The request's core: the reply-or-cancel race, progress and the stop signal.
    settlement: Settlement,
    /// The server: its registry names the command, `returns` counts live returns for the
    /// leak check (decremented on drop) and tracks the work spawned through this return.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Sink {
    tx: UnboundedSender<Outgoing>,
    ticket: Ticket,
}

impl QmpReturn {
    pub(crate) fn new(
        tx: UnboundedSender<Outgoing>,
        ticket: Ticket,
        command: CommandId,
        settlement: Settlement,
        shared: Arc<Shared>,
    ) -> Self {
        shared.returns.live.add(1);
        QmpReturn {
            sink: Some(Sink { tx, ticket }),
            command,
            settlement,
            shared,
        }
    }

    /// Replies `{"return": value}`; a value that serializes to `null` (such as `()`) is sent
    /// as `{}`, as QEMU answers commands without a return value.
    pub fn ok<T: Serialize + ?Sized>(self, value: &T) {
        match encode_return(value) {
            Ok(raw) => self.ok_raw(raw),
            Err(e) => {
                let error = self.unserializable(e);
                self.err(error);
            }
        }
    }

    /// Replies `{"return": value}` with a value that is already JSON.
    pub fn ok_raw(mut self, value: Box<RawValue>) {
        self.send(Outcome::Return(value));
    }

    /// Replies `{"return": value}` unless the request was cancelled first, and says which
    /// happened: `true` if this reply stands, `false` if the request was cancelled (the client
    /// got `Command NAME has been cancelled`, or is gone) and the reply is discarded.
    ///
    /// For a handler whose work has a visible effect it must undo when cancelled (a file it
    /// wrote): the outcome is decided at one point with the session, so a cancel that loses
    /// the race is answered `No command with id ID is in flight` and is followed by this
    /// reply, never answered "cancelled" while the work stands. [`ok`](Self::ok) gives no such
    /// guarantee: a cancel racing it may win after the work is done.
    #[must_use = "false means the request was cancelled and its effect should be undone"]
    pub fn ok_unless_cancelled<T: Serialize + ?Sized>(mut self, value: &T) -> bool {
        match encode_return(value) {
            Ok(value) => {
                // Queued before it is committed: a cancel that finds it committed knows the
                // reply is on its way; one that wins first makes the session discard it.
                self.send(Outcome::Return(value));
                self.settlement.commit_reply()
            }
            Err(e) => {
                let error = self.unserializable(e);
                self.err(error);
                true
            }
        }
    }

    /// Replies with an error.
    pub fn err(mut self, error: QmpError) {
        self.send(Outcome::Error(error));
    }

    /// Replies with a handler's result: a success value, as [`ok`](Self::ok) sends it, or an
    /// error. See [`IntoReply`].
    pub fn reply(self, result: impl IntoReply) {
        match result.into_reply() {
            Ok(raw) => self.ok_raw(raw),
            Err(ReplyError::Command(error)) => self.err(error),
            Err(ReplyError::Unserializable(e)) => {
                let error = self.unserializable(e);
                self.err(error);
            }
        }
    }

    fn unserializable(&self, e: serde_json::Error) -> QmpError {
        tracing::error!(command = self.command(), cause = %e, "reply could not be serialized");
        QmpError::generic(format!(
            "Command {} produced an unserializable reply: {e}",
            self.command()
        ))
    }

    /// Reports how far the work got, for `query-async-commands` (`current-progress`,
    /// `total-progress`, in units of the command's choosing), as a job reports to
    /// `query-jobs`.
    pub fn set_progress(&self, current: u64, total: u64) {
        let core = self.settlement.core();
        core.set_total(total);
        core.set_progress(current);
    }

    /// The tracking core and the token, for a command run as a private job.
    pub(crate) fn settlement(&self) -> &Settlement {
        &self.settlement
    }

    /// The command this return answers.
    pub fn command(&self) -> &str {
        &self.shared.registry.command(self.command).name
    }

    /// True once the request was cancelled: its client disconnected or cancelled it. A reply
    /// is then discarded.
    pub fn is_cancelled(&self) -> bool {
        self.settlement.0.is_stopped()
    }

    /// Resolves when the request is cancelled.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future loses nothing, and a new one resolves at once if the
    /// request was cancelled meanwhile. Use it in `select!` beside the work itself.
    pub fn cancelled(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.settlement.0.stopped()
    }

    /// A token that is cancelled with this request, for work that runs apart from the
    /// `QmpReturn` (a blocking thread, a child task).
    pub fn cancellation_token(&self) -> CancellationToken {
        self.settlement.0.stop_token().clone()
    }

    /// Runs `work` as a task on the server's tracker, so [`crate::Server::wait`] waits for
    /// it. The task gets this return and must answer through it; it is not stopped by
    /// cancellation by itself, so select on [`cancelled`](Self::cancelled) inside.
    pub fn spawn<F, Fut>(self, work: F)
    where
        F: FnOnce(QmpReturn) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let tasks = self.shared.returns.tasks.clone();
        tasks.spawn(work(self));
    }

    /// Runs blocking `work` on tokio's blocking pool, tracked like [`spawn`](Self::spawn).
    /// Blocking work cannot be interrupted: check
    /// [`cancellation_token`](Self::cancellation_token) between steps and keep each step
    /// short, or the server's shutdown waits for it.
    pub fn spawn_blocking<F>(self, work: F)
    where
        F: FnOnce(QmpReturn) + Send + 'static,
    {
        let tasks = self.shared.returns.tasks.clone();
        tasks.spawn_blocking(move || work(self));
    }

    fn send(&mut self, outcome: Outcome) {
        if let Some(sink) = self.sink.take() {
            // The connection may be gone; then the reply has nobody to go to, by design.
            let _ = sink.tx.send(Outgoing::Completion(Completion {
                ticket: sink.ticket,
                outcome,
            }));
        }
    }
}

/// What a handler may answer with: [`QmpReturn::reply`] sends it, after the model of
/// jsonrpsee's `IntoResponse`.
///
/// Implemented for `Result<T, QmpError>` where `T: Serialize`, and for a bare [`QmpError`].
/// A success value that serializes to `null`, `()` above all, is sent as `{}`: QEMU never
/// answers `{"return": null}`. Errors of other types convert with `?` (through
/// `From<E> for QmpError`); the impl is not generic over the error type because a bare
/// `Ok(())` could then not infer it.
///
/// ```
/// use qmp_dispatcher::{IntoReply, QmpError};
///
/// assert_eq!(Ok(()).into_reply().unwrap().get(), "{}");
/// let status = Ok(serde_json::json!({"running": true}));
/// assert_eq!(status.into_reply().unwrap().get(), r#"{"running":true}"#);
/// ```
pub trait IntoReply: Send {
    /// The reply's JSON value, or why there is none.
    fn into_reply(self) -> Result<Box<RawValue>, ReplyError>;
}

impl<T: Serialize + Send> IntoReply for Result<T, QmpError> {
    fn into_reply(self) -> Result<Box<RawValue>, ReplyError> {
        match self {
            Ok(value) => encode_return(&value).map_err(ReplyError::Unserializable),
            Err(error) => Err(ReplyError::Command(error)),
        }
    }
}

impl IntoReply for QmpError {
    fn into_reply(self) -> Result<Box<RawValue>, ReplyError> {
        Err(ReplyError::Command(self))
    }
}

/// Why an [`IntoReply`] produced no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplyError {
    /// The command failed: this is its error reply.
    Command(QmpError),
    /// The success value could not be serialized (a map with non-string keys, a failing
    /// `Serialize` impl); the client gets a `GenericError` naming the command.
    Unserializable(serde_json::Error),
}

/// The one rule for success values: JSON, with `null` sent as `{}`.
fn encode_return<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, serde_json::Error> {
    // Made once: building a RawValue from text parses it, and most commands return nothing.
    static EMPTY: std::sync::LazyLock<Box<RawValue>> =
        std::sync::LazyLock::new(|| RawValue::from_string("{}".to_string()).expect("{} is JSON"));
    let raw = serde_json::value::to_raw_value(value)?;
    if raw.get() == "null" {
        return Ok(EMPTY.clone());
    }
    Ok(raw)
}

impl Drop for QmpReturn {
    fn drop(&mut self) {
        self.shared.returns.live.add(-1);
        if self.sink.is_none() || self.is_cancelled() {
            return;
        }
        let command = self.command();
        let desc = if std::thread::panicking() {
            tracing::error!(command, "handler panicked before replying");
            format!("Command {command} failed: its handler panicked")
        } else {
            tracing::warn!(command, "QmpReturn dropped without a reply");
            format!("Command {command} completed without a reply")
        };
        self.send(Outcome::Error(QmpError::generic(desc)));
    }
}

impl std::fmt::Debug for QmpReturn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpReturn")
            .field("command", &self.command())
            .field("answered", &self.sink.is_none())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}
