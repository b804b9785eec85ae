//! What a handler knows about the request it serves: the embedder's state, the client (its
//! capabilities and peer credentials), and the server's event handle.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::QmpError;
use crate::events::Events;
use crate::fd::{Access, ClientFds, FdsetFile};
use crate::job::{JobDriver, JobOptions};
use crate::policy::Policy;
use crate::qmp_return::{QmpReturn, Settlement};
use crate::registry::{CommandId, CommandInfo};
use crate::server::Shared;

/// The credentials of a Unix-socket peer, read with `SO_PEERCRED` when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerCredentials {
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
    /// The peer's process id, where the platform reports it.
    pub pid: Option<i32>,
}

/// The capabilities a client enabled with `qmp_capabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// `oob`: the client may use `exec-oob`.
    pub oob: bool,
    /// `async`: the client may keep many commands in flight.
    pub r#async: bool,
}

impl Capabilities {
    const OOB: u8 = 1;
    const ASYNC: u8 = 2;

    fn bits(self) -> u8 {
        (u8::from(self.oob) * Self::OOB) | (u8::from(self.r#async) * Self::ASYNC)
    }

    fn from_bits(bits: u8) -> Self {
        Capabilities {
            oob: bits & Self::OOB != 0,
            r#async: bits & Self::ASYNC != 0,
        }
    }
}

/// One connected client, as its handlers see it. Shared by every request of the connection.
#[derive(Debug)]
pub struct ClientInfo {
    id: u64,
    peer: Option<PeerCredentials>,
    policy: Policy,
    /// Set once, at negotiation; handlers only run afterwards.
    capabilities: AtomicU8,
    /// The fds the client named with `getfd`; closed when the connection ends.
    pub(crate) fds: ClientFds,
}

impl ClientInfo {
    pub(crate) fn new(id: u64, peer: Option<PeerCredentials>, policy: Policy) -> Self {
        ClientInfo {
            id,
            peer,
            policy,
            capabilities: AtomicU8::new(0),
            fds: ClientFds::default(),
        }
    }

    /// The client's number on this server, as in its log span (`client=N`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The peer's credentials, on Unix sockets.
    pub fn peer(&self) -> Option<PeerCredentials> {
        self.peer
    }

    /// The policy the client is served under: which commands and events it has.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What the client negotiated.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities::from_bits(self.capabilities.load(Ordering::Acquire))
    }

    pub(crate) fn set_capabilities(&self, capabilities: Capabilities) {
        self.capabilities
            .store(capabilities.bits(), Ordering::Release);
    }
}

/// The request a handler serves: which command, for which client, on which server. Cheap
/// to clone, and `'static`, so deferred work can keep it.
#[derive(Clone)]
pub struct RequestContext {
    client: Arc<ClientInfo>,
    shared: Arc<Shared>,
    command: CommandId,
    /// The request's core, shared with its return: the stop signal is read there.
    settlement: Settlement,
}

impl RequestContext {
    pub(crate) fn new(
        client: Arc<ClientInfo>,
        shared: Arc<Shared>,
        command: CommandId,
        settlement: Settlement,
    ) -> Self {
        RequestContext {
            client,
            shared,
            command,
            settlement,
        }
    }

    /// The client that sent the request.
    pub fn client(&self) -> &ClientInfo {
        &self.client
    }

    /// The command being run.
    pub fn command(&self) -> &str {
        &self.shared.registry.command(self.command).name
    }

    /// The server's event handle, for work that outlives the request. Events a command
    /// emits *as part of the request* should go through [`emit`](Self::emit), which checks
    /// them against the command's declaration.
    pub fn events(&self) -> &Events {
        &self.shared.events
    }

    /// Emits an event to every negotiated client, as [`Events::emit`] does, and checks that
    /// the command declared it with [`Command::emits`](crate::Command::emits): an undeclared
    /// event is still sent, and flagged (a warning in the log, and
    /// [`Stats::undeclared_events`](crate::Stats::undeclared_events)), so tests can fail on it.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let command = self.shared.registry.command(self.command);
        if !command.emits(name) {
            self.shared.events.flag_undeclared(&command.name, name);
        }
        self.shared.events.emit(name, data);
    }

    /// [`emit`](Self::emit) with data of any serializable type.
    pub fn emit_data<T: serde::Serialize>(&self, name: &str, data: &T) {
        self.emit(name, serde_json::to_value(data).ok());
    }

    /// True once the request was cancelled (the client left, or cancelled it).
    pub fn is_cancelled(&self) -> bool {
        self.settlement.core().is_stopped()
    }

    /// A token cancelled with the request, for work that runs apart from it (made on the
    /// first call: requests that never ask have none).
    pub fn cancellation_token(&self) -> &CancellationToken {
        self.settlement.core().stop_token()
    }

    /// The server's commands in registration order, as `query-commands` lists them (with
    /// the disabled ones, marked): what the guest agent's `guest-info` reports.
    pub fn commands(&self) -> impl Iterator<Item = CommandInfo<'_>> {
        self.shared.registry.commands()
    }

    /// Takes the fd the client passed and named with `getfd`: the handler owns it from now
    /// on and the name is free again, as QEMU's commands that consume a named fd do. Only
    /// this client's names are visible (named fds belong to the connection).
    pub fn take_fd(&self, name: &str) -> Result<std::os::fd::OwnedFd, QmpError> {
        self.client.fds.take(name)
    }

    /// Opens `/dev/fdset/N` as QEMU's `qemu_open` does: a dup of the first fd of set `N`
    /// (added with `add-fd`, by any client) whose access mode is `access`, with QEMU's
    /// errors (`Failed to find fdset /dev/fdset/N`, `Failed to find file descriptor with
    /// matching flags=0x2`, `Could not parse fdset ...`). The set stays alive, even if
    /// emptied by `remove-fd`, until the returned file is dropped.
    pub fn open_fdset(&self, path: &str, access: Access) -> Result<FdsetFile, QmpError> {
        self.shared.fdsets.open(path, access)
    }

    /// Starts `driver` as this request's job, and answers `ret` according to the face the
    /// client chose (protocol.md §15.7):
    /// * with an id in `options` (the client sent `job-id`): a job in the server's table,
    ///   announced with `JOB_STATUS_CHANGE`, controlled by any client with `job-*`, kept
    ///   after the client leaves; `ret` is answered `{}` at once, after the `created` and
    ///   `running` events, or with the id error (`Invalid job ID 'ID'`,
    ///   `Job ID 'ID' already in use`);
    /// * without: the same work as a deferred command, private to the request: no events,
    ///   listed by the caller's `query-async-commands` with its status and progress,
    ///   cancelled with the request, finalized as soon as its work ends; `ret` is answered
    ///   then, `{}` or the job's error.
    pub fn start_job<D: JobDriver>(&self, options: JobOptions, driver: D, ret: QmpReturn) {
        if options.job_id().is_some() {
            return ret.reply(self.shared.jobs.start(options, driver));
        }
        let core = Arc::clone(ret.settlement().core());
        let cancel = ret.cancellation_token();
        self.shared.jobs.start_private(
            options,
            driver,
            core,
            cancel,
            Box::new(move |outcome| ret.reply(outcome)),
        );
    }

    /// Starts `driver` as a job in the server's table, for a command that only starts jobs
    /// (QEMU's `blockdev-create`): without an id in `options` this is
    /// `Parameter 'job-id' is missing`. The caller replies (`{}` on success, QEMU's
    /// convention).
    pub fn start_public_job<D: JobDriver>(
        &self,
        options: JobOptions,
        driver: D,
    ) -> Result<(), QmpError> {
        self.shared.jobs.start(options, driver)
    }
}

impl crate::events::Emit for RequestContext {
    fn emit(&self, name: &str, data: Option<Value>) {
        RequestContext::emit(self, name, data)
    }
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("client", &self.client.id)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// What a typed handler receives: the embedder's state `S` (from
/// [`Registry::with_state`](crate::Registry::with_state); `()` without) and the
/// [`RequestContext`], which it dereferences to.
pub struct Context<S> {
    state: Arc<S>,
    request: RequestContext,
}

impl<S> Context<S> {
    pub(crate) fn new(state: Arc<S>, request: RequestContext) -> Self {
        Context { state, request }
    }

    /// The embedder's state, shared by every command of the registry.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The state as an `Arc`, for work that outlives the request.
    pub fn state_arc(&self) -> Arc<S> {
        Arc::clone(&self.state)
    }

    /// The request part alone.
    pub fn request(&self) -> &RequestContext {
        &self.request
    }
}

impl<S> Clone for Context<S> {
    fn clone(&self) -> Self {
        Context {
            state: Arc::clone(&self.state),
            request: self.request.clone(),
        }
    }
}

impl<S> Deref for Context<S> {
    type Target = RequestContext;

    fn deref(&self) -> &RequestContext {
        &self.request
    }
}

impl<S> std::fmt::Debug for Context<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.request.fmt(f)
    }
}
