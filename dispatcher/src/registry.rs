//! The command table: built once by the embedder, then shared read-only by every client.

use hashbrown::HashTable;
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use tokio::sync::Semaphore;

use crate::args;
use crate::context::{Context, RequestContext};
use crate::error::{QmpError, RegisterError};
use crate::job::JobVerb;
use crate::job::record::JOB_STATUS_CHANGE;
use crate::qmp_return::{IntoReply, QmpReturn};
use crate::schema::{self, Declared, JsonSchema, SchemaInfo, TypeDesc};

/// A command handler in its most general form: it receives the raw arguments, the
/// [`Context`] (the embedder's state `S` and the request), and the [`QmpReturn`] it must
/// answer. The typed constructors of [`Command`] wrap closures into this.
pub trait Handler<S = ()>: Send + Sync + 'static {
    /// Runs the command. Called on the client's connection task, so it must not block:
    /// slow work belongs on another task or thread, answering through `ret` when done.
    fn call(&self, arguments: Map<String, Value>, cx: Context<S>, ret: QmpReturn);
}

impl<S, F> Handler<S> for F
where
    F: Fn(Map<String, Value>, Context<S>, QmpReturn) + Send + Sync + 'static,
{
    fn call(&self, arguments: Map<String, Value>, cx: Context<S>, ret: QmpReturn) {
        self(arguments, cx, ret)
    }
}

/// A command written as a type: a struct holding its own state, with named argument and
/// return types. Register it with [`Command::new`]. Each call runs [`run`](Self::run) as a
/// task on the server's tracker; cancelling the request drops the future.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use qmp_dispatcher::{Command, Context, NoArgs, QmpCommand, QmpError, Registry};
///
/// /// Counts its calls.
/// #[derive(Default)]
/// struct Counter(AtomicU64);
///
/// #[qmp_dispatcher::async_trait]
/// impl QmpCommand for Counter {
///     type Arguments = NoArgs;
///     type Returns = u64;
///
///     async fn run(&self, _: NoArgs, _: Context<()>) -> Result<u64, QmpError> {
///         Ok(self.0.fetch_add(1, Ordering::Relaxed) + 1)
///     }
/// }
///
/// let registry = Registry::builder()
///     .with(Command::new("x-count", Counter::default()))
///     .unwrap()
///     .build();
/// assert!(registry.commands().any(|c| c.name == "x-count"));
/// ```
#[async_trait::async_trait]
pub trait QmpCommand<S: Send + Sync + 'static = ()>: Send + Sync + 'static {
    /// The argument object, decoded with QEMU's argument-error texts and described in the
    /// schema.
    type Arguments: DeserializeOwned + JsonSchema + Send + 'static;
    /// The return value (`()` is `{}`), described in the schema.
    type Returns: Serialize + JsonSchema + Send + 'static;

    /// Runs one request.
    async fn run(
        &self,
        arguments: Self::Arguments,
        cx: Context<S>,
    ) -> Result<Self::Returns, QmpError>;
}

/// The handler a registry stores: a [`Handler`] bound to its registry's state.
pub(crate) trait Dispatch: Send + Sync + 'static {
    fn call(&self, arguments: Map<String, Value>, request: RequestContext, ret: QmpReturn);
}

struct Bound<S> {
    state: Arc<S>,
    handler: Arc<dyn Handler<S>>,
}

impl<S: Send + Sync + 'static> Dispatch for Bound<S> {
    fn call(&self, arguments: Map<String, Value>, request: RequestContext, ret: QmpReturn) {
        let cx = Context::new(Arc::clone(&self.state), request);
        self.handler.call(arguments, cx, ret)
    }
}

/// How many calls of one [`Command::blocking`] command run at once unless
/// [`Command::max_concurrent`] says otherwise; later calls wait (cancellably) for a slot.
pub const DEFAULT_BLOCKING_CONCURRENCY: usize = 4;

/// The QAPI feature that marks commands whose reply may come after later requests' replies
/// under the `async` capability: worth running concurrently.
pub const ASYNC_FEATURE: &str = "async";

/// The prefix of the QAPI features naming the events a command declares it emits
/// (`emits-STOP`).
pub const EMITS_FEATURE_PREFIX: &str = "emits-";

/// Commands every QMP monitor has, implemented by the session itself because they read or
/// change per-client state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    QmpCapabilities,
    QueryVersion,
    QueryCommands,
    QueryQmpSchema,
    QueryAsyncCommands,
    AsyncCommandCancel,
    GetFd,
    CloseFd,
    AddFd,
    RemoveFd,
    QueryFdsets,
    QueryJobs,
    /// `job-pause` and the other verbs: they act on the server's job table.
    JobVerb(JobVerb),
}

impl Builtin {
    const ALL: [(&'static str, Builtin, bool); 13] = [
        ("qmp_capabilities", Builtin::QmpCapabilities, false),
        ("query-version", Builtin::QueryVersion, false),
        ("query-commands", Builtin::QueryCommands, false),
        ("query-qmp-schema", Builtin::QueryQmpSchema, false),
        ("query-async-commands", Builtin::QueryAsyncCommands, true),
        ("async-command-cancel", Builtin::AsyncCommandCancel, true),
        ("query-jobs", Builtin::QueryJobs, false),
        ("job-pause", Builtin::JobVerb(JobVerb::Pause), false),
        ("job-resume", Builtin::JobVerb(JobVerb::Resume), false),
        ("job-cancel", Builtin::JobVerb(JobVerb::Cancel), false),
        ("job-complete", Builtin::JobVerb(JobVerb::Complete), false),
        ("job-finalize", Builtin::JobVerb(JobVerb::Finalize), false),
        ("job-dismiss", Builtin::JobVerb(JobVerb::Dismiss), false),
    ];

    /// The fd-passing commands, added by [`RegistryBuilder::fd_commands`]. None allows
    /// `exec-oob`, as in QEMU.
    const FD: [(&'static str, Builtin, bool); 5] = [
        ("getfd", Builtin::GetFd, false),
        ("closefd", Builtin::CloseFd, false),
        ("add-fd", Builtin::AddFd, false),
        ("remove-fd", Builtin::RemoveFd, false),
        ("query-fdsets", Builtin::QueryFdsets, false),
    ];

    /// The built-in's argument and return types, for `query-qmp-schema`.
    fn types(self) -> (TypeDesc, TypeDesc) {
        use crate::fd::commands as fd;
        use crate::fd::sets as fd_sets;
        use crate::schema::builtin_types as t;
        match self {
            Builtin::QmpCapabilities => (
                TypeDesc::decoded::<t::QmpCapabilitiesArguments>(),
                TypeDesc::empty(),
            ),
            Builtin::QueryVersion => (
                TypeDesc::empty(),
                TypeDesc::encoded::<crate::config::VersionInfo>(),
            ),
            Builtin::QueryCommands => (
                TypeDesc::empty(),
                TypeDesc::encoded::<Vec<t::CommandName>>(),
            ),
            Builtin::QueryQmpSchema => (TypeDesc::empty(), TypeDesc::encoded::<Vec<SchemaInfo>>()),
            Builtin::QueryAsyncCommands => (
                TypeDesc::empty(),
                TypeDesc::encoded::<Vec<t::AsyncCommandInfo>>(),
            ),
            Builtin::AsyncCommandCancel => (
                TypeDesc::decoded::<t::AsyncCommandCancelArguments>(),
                TypeDesc::empty(),
            ),
            Builtin::GetFd | Builtin::CloseFd => (
                TypeDesc::decoded::<fd::FdNameArguments>(),
                TypeDesc::empty(),
            ),
            Builtin::AddFd => (
                TypeDesc::decoded::<fd::AddFdArguments>(),
                TypeDesc::encoded::<fd_sets::AddFdInfo>(),
            ),
            Builtin::RemoveFd => (
                TypeDesc::decoded::<fd::RemoveFdArguments>(),
                TypeDesc::empty(),
            ),
            Builtin::QueryFdsets => (
                TypeDesc::empty(),
                TypeDesc::encoded::<Vec<fd_sets::FdsetInfo>>(),
            ),
            Builtin::QueryJobs => (
                TypeDesc::empty(),
                TypeDesc::encoded::<Vec<crate::job::JobInfo>>(),
            ),
            Builtin::JobVerb(_) => (TypeDesc::decoded::<t::JobIdArguments>(), TypeDesc::empty()),
        }
    }
}

pub(crate) enum Kind<S> {
    Builtin(Builtin),
    Handler(Arc<dyn Handler<S>>),
}

/// The registry's erased form of [`Kind`].
#[derive(Clone)]
pub(crate) enum Dispatcher {
    Builtin(Builtin),
    Handler(Arc<dyn Dispatch>),
}

/// A command to register: a name, a handler, its QAPI flags and features, the events it
/// emits, and the types `query-qmp-schema` shows for its arguments and return value.
///
/// `S` is the registry's state (see [`Registry::with_state`]); handlers get it through
/// their [`Context`].
pub struct Command<S = ()> {
    name: Arc<str>,
    kind: Kind<S>,
    allow_oob: bool,
    silent_success: bool,
    /// May reply after later requests (not answered at once on the connection task).
    out_of_order: bool,
    disabled: Option<Option<String>>,
    arg_type: TypeDesc,
    ret_type: TypeDesc,
    features: Vec<String>,
    emits: Vec<String>,
    /// The concurrency bound of a blocking command.
    blocking_slots: Option<(Arc<Semaphore>, usize)>,
}

impl<S: Send + Sync + 'static> Command<S> {
    /// A command from a raw [`Handler`]: it gets the arguments as a JSON object, its
    /// context and the `QmpReturn` to answer, now or later. Its schema says `any` for both
    /// until [`arguments`](Self::arguments) and [`returns`](Self::returns) describe them.
    pub fn raw(name: impl Into<String>, handler: impl Handler<S>) -> Self {
        let mut command = Self::with_kind(name, Kind::Handler(Arc::new(handler)));
        command.out_of_order = true;
        command
    }

    /// A command that answers at once. `A` is its argument struct (a mismatch is answered
    /// with QEMU's argument error); the result becomes `{"return": ...}` (`()` as `{}`) or
    /// an error reply. Runs on the connection task: keep it quick. The schema shows `A` and
    /// `R`.
    ///
    /// The typed constructors take `Result<R, QmpError>` rather than any [`IntoReply`], so
    /// a bare `Ok(value)` needs no annotation; `?` converts other errors through `From`.
    pub fn sync<A, R, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        R: Serialize + JsonSchema + Send,
        F: Fn(A, &Context<S>) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        let mut command =
            Self::raw(
                name,
                move |arguments, cx: Context<S>, ret: QmpReturn| match args::decode(arguments) {
                    Ok(a) => ret.reply(f(a, &cx)),
                    Err(e) => ret.err(e),
                },
            )
            .arguments::<A>()
            .returns::<R>();
        command.out_of_order = false;
        command
    }

    /// A command whose work is a future, run on its own task on the server's tracker (so
    /// [`crate::Server::wait`] waits for it). Cancelling the request (the client disconnects
    /// or uses `async-command-cancel`) drops the future. The schema shows `A` and `R`.
    pub fn async_fn<A, R, F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        R: Serialize + JsonSchema + Send + 'static,
        F: Fn(A, Context<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
    {
        Self::raw(
            name,
            move |arguments, cx: Context<S>, ret: QmpReturn| match args::decode(arguments) {
                Ok(a) => run_to_reply(f(a, cx), ret),
                Err(e) => ret.err(e),
            },
        )
        .arguments::<A>()
        .returns::<R>()
    }

    /// A command that takes its typed arguments, its context and the [`QmpReturn`], and
    /// answers whenever and from wherever it likes. The schema shows `A`, and `any` for the
    /// return value until [`returns`](Self::returns) names its type.
    pub fn deferred<A, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        F: Fn(A, Context<S>, QmpReturn) + Send + Sync + 'static,
    {
        Self::raw(
            name,
            move |arguments, cx: Context<S>, ret: QmpReturn| match args::decode(arguments) {
                Ok(a) => f(a, cx, ret),
                Err(e) => ret.err(e),
            },
        )
        .arguments::<A>()
    }

    /// A command whose work blocks (file or device I/O, a library without async): it runs
    /// on tokio's blocking pool, tracked like [`QmpReturn::spawn_blocking`], with at most
    /// [`DEFAULT_BLOCKING_CONCURRENCY`] calls at once (see
    /// [`max_concurrent`](Self::max_concurrent)); later calls wait for a slot, and one
    /// cancelled while waiting never runs. Blocking work cannot be interrupted: check
    /// [`Context::is_cancelled`](RequestContext::is_cancelled) between steps. A reply after
    /// cancellation is discarded.
    pub fn blocking<A, R, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema + Send + 'static,
        R: Serialize + JsonSchema + Send + 'static,
        F: Fn(A, Context<S>) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        let slots = Arc::new(Semaphore::new(DEFAULT_BLOCKING_CONCURRENCY));
        let f = Arc::new(f);
        let slots_for_calls = Arc::clone(&slots);
        let mut command = Self::raw(name, move |arguments, cx: Context<S>, ret: QmpReturn| {
            let a: A = match args::decode(arguments) {
                Ok(a) => a,
                Err(e) => return ret.err(e),
            };
            let slots = Arc::clone(&slots_for_calls);
            let f = Arc::clone(&f);
            ret.spawn(|ret| async move {
                let slot = tokio::select! {
                    biased;
                    () = ret.cancelled() => return,
                    slot = slots.acquire_owned() => slot.expect("the semaphore is never closed"),
                };
                ret.spawn_blocking(move |ret| {
                    let _slot = slot;
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(a, cx)));
                    match result {
                        Ok(result) => ret.reply(result),
                        Err(_) => {
                            let error = panicked(ret.command());
                            ret.err(error)
                        }
                    }
                });
            });
        })
        .arguments::<A>()
        .returns::<R>();
        command.blocking_slots = Some((slots, DEFAULT_BLOCKING_CONCURRENCY));
        command
    }

    /// A command written as a type implementing [`QmpCommand`]; the schema shows its
    /// `Arguments` and `Returns`.
    pub fn new<C: QmpCommand<S>>(name: impl Into<String>, command: C) -> Self {
        let command = Arc::new(command);
        Self::raw(
            name,
            move |arguments, cx: Context<S>, ret: QmpReturn| match args::decode::<C::Arguments>(
                arguments,
            ) {
                Ok(a) => {
                    let command = Arc::clone(&command);
                    run_to_reply(async move { command.run(a, cx).await }, ret)
                }
                Err(e) => ret.err(e),
            },
        )
        .arguments::<C::Arguments>()
        .returns::<C::Returns>()
    }

    /// At most `n` calls of this [`blocking`](Self::blocking) command run at once
    /// (`n` ≥ 1). No effect on other kinds of command.
    pub fn max_concurrent(mut self, n: usize) -> Self {
        let n = n.max(1);
        if let Some((slots, current)) = &mut self.blocking_slots {
            // No call has run yet, so every permit is in the semaphore.
            if n > *current {
                slots.add_permits(n - *current);
            } else {
                slots.forget_permits(*current - n);
            }
            *current = n;
        }
        self
    }

    /// Declares an event this command may emit (through [`RequestContext::emit`]). The
    /// registry must declare the event too; `query-qmp-schema` shows the declaration as the
    /// command's feature `emits-NAME`. An undeclared event emitted from the command's
    /// context is flagged.
    pub fn emits(mut self, event: impl Into<String>) -> Self {
        self.emits.push(event.into());
        self
    }

    /// The schema shows `A`, as serde decodes it, for the arguments. For raw handlers that
    /// decode with [`args::decode`] themselves.
    pub fn arguments<A: JsonSchema>(self) -> Self {
        self.arg_type(TypeDesc::decoded::<A>())
    }

    /// The schema shows `R`, as serde encodes it, for the return value (`()` is `{}`).
    pub fn returns<R: JsonSchema>(self) -> Self {
        self.ret_type(TypeDesc::encoded::<R>())
    }

    /// Sets the schema's argument type.
    pub fn arg_type(mut self, desc: TypeDesc) -> Self {
        self.arg_type = desc;
        self
    }

    /// Sets the schema's return type.
    pub fn ret_type(mut self, desc: TypeDesc) -> Self {
        self.ret_type = desc;
        self
    }

    /// Adds a QAPI feature to the command's schema entry (`deprecated`, `unstable`, or the
    /// embedder's own).
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.features.push(feature.into());
        self
    }

    /// Allows `exec-oob`: the command runs as soon as it is read and its reply may overtake
    /// in-band replies. Like QEMU's `allow-oob`, such commands should finish quickly.
    pub fn allow_oob(mut self) -> Self {
        self.allow_oob = true;
        self
    }

    /// QAPI `success-response: false`: success sends no reply at all (the guest agent's
    /// `guest-shutdown`); errors are still answered.
    pub fn no_success_response(mut self) -> Self {
        self.silent_success = true;
        self
    }

    /// Registers the command disabled, with an optional reason; see
    /// [`Registry::disable`].
    pub fn disabled(mut self, reason: Option<&str>) -> Self {
        self.disabled = Some(reason.map(str::to_string));
        self
    }

    fn with_kind(name: impl Into<String>, kind: Kind<S>) -> Self {
        Command {
            name: name.into().into(),
            kind,
            allow_oob: false,
            silent_success: false,
            out_of_order: false,
            disabled: None,
            arg_type: TypeDesc::any(),
            ret_type: TypeDesc::any(),
            features: Vec::new(),
            emits: Vec::new(),
            blocking_slots: None,
        }
    }
}

impl<S> std::fmt::Debug for Command<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("name", &self.name)
            .field("allow_oob", &self.allow_oob)
            .finish()
    }
}

/// A registered command as the dispatcher sees it.
pub(crate) struct Entry {
    pub(crate) name: Arc<str>,
    pub(crate) kind: Dispatcher,
    pub(crate) allow_oob: bool,
    pub(crate) silent_success: bool,
    /// A hint for the common case, read without the lock: false means never disabled
    /// since the last `enable`. `state` is the truth.
    disabled: AtomicBool,
    /// `Some(reason)` while disabled: the flag and its reason change together, under one
    /// lock, so no reader sees one without the other.
    state: RwLock<Option<Option<String>>>,
    arg_type: TypeDesc,
    ret_type: TypeDesc,
    /// The schema's features: the declared ones, then `async` and `emits-*`.
    features: Vec<String>,
    /// Its metric handles, registered on first use.
    metrics: std::sync::OnceLock<crate::observe::CommandMetrics>,
    emits: Box<[Box<str>]>,
}

impl Entry {
    /// The command's metric handles.
    pub(crate) fn metrics(&self) -> &crate::observe::CommandMetrics {
        self.metrics
            .get_or_init(|| crate::observe::CommandMetrics::new(&self.name))
    }

    /// Whether the command declared that it emits `event`.
    pub(crate) fn emits(&self, event: &str) -> bool {
        self.emits.iter().any(|e| &**e == event)
    }

    /// `Some(reason)` when disabled.
    pub(crate) fn disabled(&self) -> Option<Option<String>> {
        if !self.disabled.load(Ordering::Acquire) {
            return None;
        }
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, state: Option<Option<String>>) {
        let mut guard = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.disabled.store(state.is_some(), Ordering::Release);
        *guard = state;
    }
}

/// The immutable set of commands a server dispatches to. Build it with
/// [`Registry::builder`].
pub struct Registry {
    /// The commands in registration order (`query-commands`, the guest agent's
    /// `guest-info`); a [`CommandId`] is a place here.
    entries: Vec<Entry>,
    /// Places in `entries`, hashed by name: every request is looked up here. Four bytes a
    /// bucket, so the index of 10,000 commands is 64 KiB, not the entries themselves.
    by_name: HashTable<u32>,
    /// foldhash: the names are the embedder's, fixed once built, so a client cannot crowd
    /// one bucket.
    hasher: hashbrown::DefaultHashBuilder,
    /// Declared events, in declaration order.
    events: Vec<Event>,
    /// `query-qmp-schema`, computed once by [`RegistryBuilder::build`].
    schema: schema::Compiled,
}

/// A registered command's place in its [`Registry`]. In-flight requests and their returns
/// keep it rather than the name: it costs no shared reference count, and the end of a
/// request finds its command without hashing the name again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommandId(u32);

/// An event the registry declares, for `query-qmp-schema`.
struct Event {
    name: String,
    data: TypeDesc,
    features: Vec<String>,
}

/// Collects commands for a [`Registry`]; `S` is the state its handlers share.
pub struct RegistryBuilder<S = ()> {
    state: Arc<S>,
    registry: Registry,
}

impl Registry {
    /// A builder that already holds the commands of every QMP monitor: `qmp_capabilities`,
    /// `query-version`, `query-commands`, `query-qmp-schema`, the async capability's
    /// `query-async-commands` and `async-command-cancel`, and the jobs' `query-jobs`,
    /// `job-pause`, `job-resume`, `job-cancel`, `job-complete`, `job-finalize` and
    /// `job-dismiss`, with the `JOB_STATUS_CHANGE` event.
    pub fn builder() -> RegistryBuilder {
        Self::with_state(())
    }

    /// Like [`builder`](Self::builder), for handlers that share the embedder's `state`:
    /// each receives it through its [`Context`], without capturing clones of it.
    pub fn with_state<S: Send + Sync + 'static>(state: S) -> RegistryBuilder<S> {
        let mut builder = Self::bare_with_state(state);
        builder
            .add_builtins(&Builtin::ALL)
            .expect("built-in names are unique");
        builder
            .event::<schema::builtin_types::JobStatusChange>(JOB_STATUS_CHANGE)
            .expect("the first event declared");
        builder
    }

    /// A builder with no commands at all, for protocols without QMP's built-ins (the guest
    /// agent has no `qmp_capabilities`).
    pub fn bare_builder() -> RegistryBuilder {
        Self::bare_with_state(())
    }

    /// [`bare_builder`](Self::bare_builder) with handler state, as [`with_state`](Self::with_state).
    pub fn bare_with_state<S: Send + Sync + 'static>(state: S) -> RegistryBuilder<S> {
        RegistryBuilder {
            state: Arc::new(state),
            registry: Registry {
                entries: Vec::new(),
                by_name: HashTable::new(),
                hasher: hashbrown::DefaultHashBuilder::default(),
                events: Vec::new(),
                schema: schema::Compiled::default(),
            },
        }
    }

    /// The command of this name, with its place.
    pub(crate) fn lookup(&self, name: &str) -> Option<(CommandId, &Entry)> {
        let hash = self.hasher.hash_one(name);
        let &index = self
            .by_name
            .find(hash, |&i| *self.entries[i as usize].name == *name)?;
        Some((CommandId(index), &self.entries[index as usize]))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.lookup(name).map(|(_, entry)| entry)
    }

    /// The command at `id`, which this registry gave out.
    pub(crate) fn command(&self, id: CommandId) -> &Entry {
        &self.entries[id.0 as usize]
    }

    /// The metric handles of a registered command.
    pub(crate) fn metrics_of(&self, name: &str) -> Option<&crate::observe::CommandMetrics> {
        self.get(name).map(Entry::metrics)
    }

    /// `query-qmp-schema`'s entries: every command (in registration order) and event (in
    /// declaration order), then the types they use.
    pub fn schema(&self) -> &[SchemaInfo] {
        &self.schema.entries
    }

    /// `query-qmp-schema`'s reply, serialized when the registry was built.
    pub(crate) fn schema_bytes(&self) -> &bytes::Bytes {
        &self.schema.json
    }

    /// `query-qmp-schema`'s reply with only the commands and events the filters keep (and
    /// the types they use), for a [`Policy`](crate::Policy) that narrows the registry.
    pub(crate) fn schema_json_filtered(
        &self,
        command: impl Fn(&str) -> bool,
        event: impl Fn(&str) -> bool,
    ) -> bytes::Bytes {
        self.compile_schema(command, event).json
    }

    fn compile_schema(
        &self,
        command: impl Fn(&str) -> bool,
        event: impl Fn(&str) -> bool,
    ) -> schema::Compiled {
        let commands = self
            .entries
            .iter()
            .filter(|e| command(&e.name))
            .map(|entry| Declared::Command {
                name: &entry.name,
                arg: entry.arg_type,
                ret: entry.ret_type,
                allow_oob: entry.allow_oob,
                features: &entry.features,
            });
        let events = self
            .events
            .iter()
            .filter(|e| event(&e.name))
            .map(|e| Declared::Event {
                name: &e.name,
                arg: e.data,
                features: &e.features,
            });
        schema::build(commands.chain(events))
    }

    /// Names in registration order, with whether each is enabled, allows OOB, and sends a
    /// reply on success.
    pub fn commands(&self) -> impl Iterator<Item = CommandInfo<'_>> {
        self.entries.iter().map(|entry| CommandInfo {
            name: &entry.name,
            enabled: entry.disabled().is_none(),
            allow_oob: entry.allow_oob,
            success_response: !entry.silent_success,
        })
    }

    /// Disables a command at run time, with an optional reason: it answers
    /// `CommandNotFound` `Command NAME has been disabled[: REASON]` and leaves
    /// `query-commands` (its schema entry stays: the schema is static, as QEMU's).
    pub fn disable(&self, name: &str, reason: Option<&str>) -> Result<(), RegisterError> {
        self.entry(name)?
            .set_state(Some(reason.map(str::to_string)));
        Ok(())
    }

    /// Enables a command again.
    pub fn enable(&self, name: &str) -> Result<(), RegisterError> {
        self.entry(name)?.set_state(None);
        Ok(())
    }

    /// [`disable`](Self::disable) (`Some(reason)`) or [`enable`](Self::enable) (`None`);
    /// returns false if no such command exists.
    pub fn set_disabled(&self, name: &str, disabled: Option<Option<&str>>) -> bool {
        match disabled {
            Some(reason) => self.disable(name, reason),
            None => self.enable(name),
        }
        .is_ok()
    }

    fn entry(&self, name: &str) -> Result<&Entry, RegisterError> {
        self.get(name)
            .ok_or_else(|| RegisterError::UnknownCommand(name.to_string()))
    }
}

/// What [`Registry::commands`] reports about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandInfo<'a> {
    /// The command name.
    pub name: &'a str,
    /// False while disabled.
    pub enabled: bool,
    /// Accepts `exec-oob`.
    pub allow_oob: bool,
    /// False for `success-response: false` commands.
    pub success_response: bool,
}

impl<S: Send + Sync + 'static> RegistryBuilder<S> {
    /// Adds QEMU's fd-passing commands, built into the server: `getfd`, `closefd`, `add-fd`,
    /// `remove-fd` and `query-fdsets` (what `qemu-system-*` has and `qemu-storage-daemon`
    /// lacks). Handlers then reach the fds through
    /// [`RequestContext::take_fd`](crate::RequestContext::take_fd) and
    /// [`RequestContext::open_fdset`](crate::RequestContext::open_fdset); see
    /// [`crate::fd`].
    pub fn fd_commands(&mut self) -> Result<&mut Self, RegisterError> {
        self.add_builtins(&Builtin::FD)
    }

    fn add_builtins(
        &mut self,
        builtins: &[(&'static str, Builtin, bool)],
    ) -> Result<&mut Self, RegisterError> {
        for &(name, builtin, allow_oob) in builtins {
            let (arg_type, ret_type) = builtin.types();
            let mut command = Command::with_kind(name, Kind::Builtin(builtin))
                .arg_type(arg_type)
                .ret_type(ret_type);
            command.allow_oob = allow_oob;
            self.add(command)?;
        }
        Ok(self)
    }

    /// Adds a command; a name already taken is an error, not a replacement.
    pub fn add(&mut self, command: Command<S>) -> Result<&mut Self, RegisterError> {
        if command.name.is_empty() {
            return Err(RegisterError::EmptyName);
        }
        if self.registry.get(&command.name).is_some() {
            return Err(RegisterError::AlreadyRegistered(command.name.to_string()));
        }
        let kind = match command.kind {
            Kind::Builtin(builtin) => Dispatcher::Builtin(builtin),
            Kind::Handler(handler) => Dispatcher::Handler(Arc::new(Bound {
                state: Arc::clone(&self.state),
                handler,
            })),
        };
        let mut features = command.features;
        if command.out_of_order {
            features.push(ASYNC_FEATURE.to_string());
        }
        features.extend(
            command
                .emits
                .iter()
                .map(|event| format!("{EMITS_FEATURE_PREFIX}{event}")),
        );
        let entry = Entry {
            name: command.name.clone(),
            kind,
            allow_oob: command.allow_oob,
            silent_success: command.silent_success,
            disabled: AtomicBool::new(command.disabled.is_some()),
            state: RwLock::new(command.disabled),
            arg_type: command.arg_type,
            ret_type: command.ret_type,
            features,
            metrics: std::sync::OnceLock::new(),
            emits: command
                .emits
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
        };
        let registry = &mut self.registry;
        let index = u32::try_from(registry.entries.len()).expect("fewer than 2^32 commands");
        let hash = registry.hasher.hash_one(&*entry.name);
        let (entries, hasher) = (&registry.entries, &registry.hasher);
        registry.by_name.insert_unique(hash, index, |&i| {
            hasher.hash_one(&*entries[i as usize].name)
        });
        registry.entries.push(entry);
        Ok(self)
    }

    /// Adds a command, chaining by value.
    pub fn with(mut self, command: Command<S>) -> Result<Self, RegisterError> {
        self.add(command)?;
        Ok(self)
    }

    /// Declares an event whose data is `T` (as serde encodes it), for `query-qmp-schema`.
    /// Emitting stays [`Events::emit`](crate::Events::emit)'s business; this only describes.
    pub fn event<T: JsonSchema>(&mut self, name: &str) -> Result<&mut Self, RegisterError> {
        self.declare_event(name, TypeDesc::encoded::<T>(), &[])
    }

    /// Declares an event that carries no `data` (QEMU's `STOP`, `RESUME`, `POWERDOWN`).
    pub fn event_without_data(&mut self, name: &str) -> Result<&mut Self, RegisterError> {
        self.declare_event(name, TypeDesc::empty(), &[])
    }

    /// Declares an event with its data type and QAPI features.
    pub fn declare_event(
        &mut self,
        name: &str,
        data: TypeDesc,
        features: &[&str],
    ) -> Result<&mut Self, RegisterError> {
        if name.is_empty() {
            return Err(RegisterError::EmptyName);
        }
        if self.registry.events.iter().any(|e| e.name == name) {
            return Err(RegisterError::AlreadyRegistered(name.to_string()));
        }
        self.registry.events.push(Event {
            name: name.to_string(),
            data,
            features: features.iter().map(|f| f.to_string()).collect(),
        });
        Ok(self)
    }

    /// Finishes the registry, computing and serializing its schema once.
    ///
    /// # Panics
    /// If a command declares with [`Command::emits`] an event the registry does not
    /// declare: a programming error, like a duplicate name. [`try_build`](Self::try_build)
    /// returns it instead.
    pub fn build(self) -> Registry {
        self.try_build().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Finishes the registry, or says which command emits an undeclared event.
    pub fn try_build(mut self) -> Result<Registry, RegisterError> {
        let registry = &self.registry;
        for entry in &registry.entries {
            if let Some(event) = entry
                .emits
                .iter()
                .find(|event| !registry.events.iter().any(|e| *e.name == ***event))
            {
                return Err(RegisterError::UndeclaredEvent {
                    command: entry.name.to_string(),
                    event: event.to_string(),
                });
            }
        }
        self.registry.schema = self.registry.compile_schema(|_| true, |_| true);
        Ok(self.registry)
    }
}

/// Runs a handler's future to its reply on the server's tracker, dropping it if the request
/// is cancelled first, and answering a panic with an error.
fn run_to_reply<R, Fut>(work: Fut, ret: QmpReturn)
where
    R: IntoReply,
    Fut: Future<Output = R> + Send + 'static,
{
    let work = AssertUnwindSafe(work).catch_unwind();
    ret.spawn(|ret| async move {
        tokio::select! {
            biased;
            () = ret.cancelled() => {}
            outcome = work => match outcome {
                Ok(result) => ret.reply(result),
                Err(_) => {
                    let error = panicked(ret.command());
                    ret.err(error)
                }
            },
        }
    });
}

fn panicked(command: &str) -> QmpError {
    QmpError::generic(format!("Command {command} failed: its handler panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_names_are_an_error() {
        let mut builder = Registry::builder();
        builder
            .add(Command::sync("x", |_: args::NoArgs, _| Ok(())))
            .unwrap();
        let again = builder.add(Command::sync("x", |_: args::NoArgs, _| Ok(())));
        assert_eq!(
            again.err(),
            Some(RegisterError::AlreadyRegistered("x".into()))
        );
        let builtin = builder.add(Command::sync("query-version", |_: args::NoArgs, _| Ok(())));
        assert!(builtin.is_err());
    }

    #[test]
    fn disabling_at_run_time() {
        let registry = Registry::bare_builder()
            .with(Command::sync("x", |_: args::NoArgs, _| Ok(())))
            .unwrap()
            .build();
        assert_eq!(registry.get("x").unwrap().disabled(), None);
        assert!(registry.set_disabled("x", Some(Some("frozen"))));
        assert_eq!(
            registry.get("x").unwrap().disabled(),
            Some(Some("frozen".into()))
        );
        assert!(registry.set_disabled("x", None));
        assert!(!registry.commands().any(|c| !c.enabled));
        assert!(!registry.set_disabled("nope", None));
        assert_eq!(
            registry.disable("nope", None),
            Err(RegisterError::UnknownCommand("nope".into()))
        );
        registry.disable("x", None).unwrap();
        assert_eq!(registry.get("x").unwrap().disabled(), Some(None));
        registry.enable("x").unwrap();
        assert_eq!(registry.get("x").unwrap().disabled(), None);
    }
}
