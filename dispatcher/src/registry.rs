//! The command table: built once by the embedder, then shared read-only by every client.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::args;
use crate::error::{QmpError, RegisterError};
use crate::qmp_return::QmpReturn;
use crate::schema::{self, Declared, JsonSchema, SchemaInfo, TypeDesc};

/// A command handler in its most general form: it receives the raw arguments and the
/// [`QmpReturn`] it must answer. The typed constructors of [`Command`] wrap closures into this.
pub trait Handler: Send + Sync + 'static {
    /// Runs the command. Called on the client's connection task, so it must not block:
    /// slow work belongs on another task or thread, answering through `ret` when done.
    fn call(&self, arguments: Map<String, Value>, ret: QmpReturn);
}

impl<F> Handler for F
where
    F: Fn(Map<String, Value>, QmpReturn) + Send + Sync + 'static,
{
    fn call(&self, arguments: Map<String, Value>, ret: QmpReturn) {
        self(arguments, ret)
    }
}

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
}

impl Builtin {
    const ALL: [(&'static str, Builtin, bool); 6] = [
        ("qmp_capabilities", Builtin::QmpCapabilities, false),
        ("query-version", Builtin::QueryVersion, false),
        ("query-commands", Builtin::QueryCommands, false),
        ("query-qmp-schema", Builtin::QueryQmpSchema, false),
        ("query-async-commands", Builtin::QueryAsyncCommands, true),
        ("async-command-cancel", Builtin::AsyncCommandCancel, true),
    ];

    /// The built-in's argument and return types, for `query-qmp-schema`.
    fn types(self) -> (TypeDesc, TypeDesc) {
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
        }
    }
}

#[derive(Clone)]
pub(crate) enum Kind {
    Builtin(Builtin),
    Handler(Arc<dyn Handler>),
}

/// A command to register: a name, a handler, its QAPI flags and features, and the types
/// `query-qmp-schema` shows for its arguments and return value.
pub struct Command {
    name: Arc<str>,
    kind: Kind,
    allow_oob: bool,
    silent_success: bool,
    disabled: Option<Option<String>>,
    arg_type: TypeDesc,
    ret_type: TypeDesc,
    features: Vec<String>,
}

impl Command {
    /// A command from a raw [`Handler`]: it gets the arguments as a JSON object and the
    /// `QmpReturn` to answer, now or later. Its schema says `any` for both until
    /// [`arguments`](Self::arguments) and [`returns`](Self::returns) describe them.
    pub fn raw(name: impl Into<String>, handler: impl Handler) -> Self {
        Self::with_kind(name, Kind::Handler(Arc::new(handler)))
    }

    /// A command that answers at once. `A` is its argument struct (a mismatch is answered
    /// with QEMU's argument error); the result becomes `{"return": ...}` or an error reply.
    /// Runs on the connection task: keep it quick. The schema shows `A` and `R`.
    pub fn sync<A, R, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        R: Serialize + JsonSchema,
        F: Fn(A) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        Self::raw(name, move |arguments, ret: QmpReturn| {
            match args::decode(arguments) {
                Ok(a) => ret.reply(f(a)),
                Err(e) => ret.err(e),
            }
        })
        .arguments::<A>()
        .returns::<R>()
    }

    /// A command whose work is a future, run on its own task on the server's tracker (so
    /// [`crate::Server::wait`] waits for it). Cancelling the request (the client disconnects
    /// or uses `async-command-cancel`) drops the future. The schema shows `A` and `R`.
    pub fn async_fn<A, R, F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        R: Serialize + JsonSchema,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, QmpError>> + Send + 'static,
    {
        Self::raw(name, move |arguments, ret: QmpReturn| {
            let a = match args::decode(arguments) {
                Ok(a) => a,
                Err(e) => return ret.err(e),
            };
            let work = AssertUnwindSafe(f(a)).catch_unwind();
            ret.spawn(|ret| async move {
                tokio::select! {
                    biased;
                    () = ret.cancelled() => {}
                    outcome = work => match outcome {
                        Ok(result) => ret.reply(result),
                        Err(_) => {
                            let desc = format!("Command {} failed: its handler panicked", ret.command());
                            ret.err(QmpError::generic(desc));
                        }
                    },
                }
            });
        })
        .arguments::<A>()
        .returns::<R>()
    }

    /// A command that takes its typed arguments and the [`QmpReturn`], and answers whenever
    /// and from wherever it likes. The schema shows `A`, and `any` for the return value
    /// until [`returns`](Self::returns) names its type.
    pub fn deferred<A, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned + JsonSchema,
        F: Fn(A, QmpReturn) + Send + Sync + 'static,
    {
        Self::raw(name, move |arguments, ret: QmpReturn| {
            match args::decode(arguments) {
                Ok(a) => f(a, ret),
                Err(e) => ret.err(e),
            }
        })
        .arguments::<A>()
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

    fn with_kind(name: impl Into<String>, kind: Kind) -> Self {
        Command {
            name: name.into().into(),
            kind,
            allow_oob: false,
            silent_success: false,
            disabled: None,
            arg_type: TypeDesc::any(),
            ret_type: TypeDesc::any(),
            features: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Command {
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
    pub(crate) kind: Kind,
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
    features: Vec<String>,
}

impl Entry {
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
    by_name: HashMap<Arc<str>, Entry>,
    /// Registration order, for `query-commands` and the guest agent's `guest-info`.
    order: Vec<Arc<str>>,
    /// Declared events, in declaration order.
    events: Vec<Event>,
    /// `query-qmp-schema`, computed once by [`RegistryBuilder::build`].
    schema: schema::Compiled,
}

/// An event the registry declares, for `query-qmp-schema`.
struct Event {
    name: String,
    data: TypeDesc,
    features: Vec<String>,
}

/// Collects commands for a [`Registry`].
pub struct RegistryBuilder {
    registry: Registry,
}

impl Registry {
    /// A builder that already holds the commands of every QMP monitor: `qmp_capabilities`,
    /// `query-version`, `query-commands`, and the async capability's `query-async-commands`
    /// and `async-command-cancel`.
    pub fn builder() -> RegistryBuilder {
        let mut builder = Self::bare_builder();
        for (name, builtin, allow_oob) in Builtin::ALL {
            let (arg_type, ret_type) = builtin.types();
            let mut command = Command::with_kind(name, Kind::Builtin(builtin))
                .arg_type(arg_type)
                .ret_type(ret_type);
            command.allow_oob = allow_oob;
            builder.add(command).expect("built-in names are unique");
        }
        builder
    }

    /// A builder with no commands at all, for protocols without QMP's built-ins (the guest
    /// agent has no `qmp_capabilities`).
    pub fn bare_builder() -> RegistryBuilder {
        RegistryBuilder {
            registry: Registry {
                by_name: HashMap::new(),
                order: Vec::new(),
                events: Vec::new(),
                schema: schema::Compiled::default(),
            },
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name)
    }

    /// `query-qmp-schema`'s entries: every command (in registration order) and event (in
    /// declaration order), then the types they use.
    pub fn schema(&self) -> &[SchemaInfo] {
        &self.schema.entries
    }

    /// `query-qmp-schema`'s reply, serialized when the registry was built.
    pub(crate) fn schema_json(&self) -> &RawValue {
        &self.schema.json
    }

    /// Names in registration order, with whether each is enabled, allows OOB, and sends a
    /// reply on success.
    pub fn commands(&self) -> impl Iterator<Item = CommandInfo<'_>> {
        self.order.iter().map(|name| {
            let entry = &self.by_name[name];
            CommandInfo {
                name,
                enabled: entry.disabled().is_none(),
                allow_oob: entry.allow_oob,
                success_response: !entry.silent_success,
            }
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
        self.by_name
            .get(name)
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

impl RegistryBuilder {
    /// Adds a command; a name already taken is an error, not a replacement.
    pub fn add(&mut self, command: Command) -> Result<&mut Self, RegisterError> {
        if command.name.is_empty() {
            return Err(RegisterError::EmptyName);
        }
        if self.registry.by_name.contains_key(&command.name) {
            return Err(RegisterError::AlreadyRegistered(command.name.to_string()));
        }
        let entry = Entry {
            name: command.name.clone(),
            kind: command.kind,
            allow_oob: command.allow_oob,
            silent_success: command.silent_success,
            disabled: AtomicBool::new(command.disabled.is_some()),
            state: RwLock::new(command.disabled),
            arg_type: command.arg_type,
            ret_type: command.ret_type,
            features: command.features,
        };
        self.registry.order.push(command.name.clone());
        self.registry.by_name.insert(command.name, entry);
        Ok(self)
    }

    /// Adds a command, chaining by value.
    pub fn with(mut self, command: Command) -> Result<Self, RegisterError> {
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
    pub fn build(mut self) -> Registry {
        let registry = &self.registry;
        let commands = registry.order.iter().map(|name| {
            let entry = &registry.by_name[name];
            Declared::Command {
                name,
                arg: entry.arg_type,
                ret: entry.ret_type,
                allow_oob: entry.allow_oob,
                features: &entry.features,
            }
        });
        let events = registry.events.iter().map(|event| Declared::Event {
            name: &event.name,
            arg: event.data,
            features: &event.features,
        });
        let compiled = schema::build(commands.chain(events));
        self.registry.schema = compiled;
        self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_names_are_an_error() {
        let mut builder = Registry::builder();
        builder
            .add(Command::sync("x", |_: args::NoArgs| Ok(())))
            .unwrap();
        let again = builder.add(Command::sync("x", |_: args::NoArgs| Ok(())));
        assert_eq!(
            again.err(),
            Some(RegisterError::AlreadyRegistered("x".into()))
        );
        let builtin = builder.add(Command::sync("query-version", |_: args::NoArgs| Ok(())));
        assert!(builtin.is_err());
    }

    #[test]
    fn disabling_at_run_time() {
        let registry = Registry::bare_builder()
            .with(Command::sync("x", |_: args::NoArgs| Ok(())))
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
