//! The command table: built once by the embedder, then shared read-only by every client.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::args;
use crate::error::{QmpError, RegisterError};
use crate::qmp_return::QmpReturn;

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
    QueryAsyncCommands,
    AsyncCommandCancel,
}

impl Builtin {
    const ALL: [(&'static str, Builtin, bool); 5] = [
        ("qmp_capabilities", Builtin::QmpCapabilities, false),
        ("query-version", Builtin::QueryVersion, false),
        ("query-commands", Builtin::QueryCommands, false),
        ("query-async-commands", Builtin::QueryAsyncCommands, true),
        ("async-command-cancel", Builtin::AsyncCommandCancel, true),
    ];
}

#[derive(Clone)]
pub(crate) enum Kind {
    Builtin(Builtin),
    Handler(Arc<dyn Handler>),
}

/// A command to register: a name, a handler and its QAPI flags.
pub struct Command {
    name: Arc<str>,
    kind: Kind,
    allow_oob: bool,
    silent_success: bool,
    disabled: Option<Option<String>>,
}

impl Command {
    /// A command from a raw [`Handler`]: it gets the arguments as a JSON object and the
    /// `QmpReturn` to answer, now or later.
    pub fn raw(name: impl Into<String>, handler: impl Handler) -> Self {
        Self::with_kind(name, Kind::Handler(Arc::new(handler)))
    }

    /// A command that answers at once. `A` is its argument struct (a mismatch is answered
    /// with QEMU's argument error); the result becomes `{"return": ...}` or an error reply.
    /// Runs on the connection task: keep it quick.
    pub fn sync<A, R, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned,
        R: Serialize,
        F: Fn(A) -> Result<R, QmpError> + Send + Sync + 'static,
    {
        Self::raw(name, move |arguments, ret: QmpReturn| {
            match args::decode(arguments) {
                Ok(a) => ret.reply(f(a)),
                Err(e) => ret.err(e),
            }
        })
    }

    /// A command whose work is a future, run on its own task on the server's tracker (so
    /// [`crate::Server::wait`] waits for it). Cancelling the request (the client disconnects
    /// or uses `async-command-cancel`) drops the future.
    pub fn async_fn<A, R, F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned,
        R: Serialize,
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
    }

    /// A command that takes its typed arguments and the [`QmpReturn`], and answers whenever
    /// and from wherever it likes.
    pub fn deferred<A, F>(name: impl Into<String>, f: F) -> Self
    where
        A: DeserializeOwned,
        F: Fn(A, QmpReturn) + Send + Sync + 'static,
    {
        Self::raw(name, move |arguments, ret: QmpReturn| {
            match args::decode(arguments) {
                Ok(a) => f(a, ret),
                Err(e) => ret.err(e),
            }
        })
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
    /// [`Registry::set_disabled`].
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
    disabled: AtomicBool,
    reason: RwLock<Option<String>>,
}

impl Entry {
    /// `Some(reason)` when disabled.
    pub(crate) fn disabled(&self) -> Option<Option<String>> {
        if !self.disabled.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.reason
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The immutable set of commands a server dispatches to. Build it with
/// [`Registry::builder`].
pub struct Registry {
    by_name: HashMap<Arc<str>, Entry>,
    /// Registration order, for `query-commands` and the guest agent's `guest-info`.
    order: Vec<Arc<str>>,
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
            let mut command = Command::with_kind(name, Kind::Builtin(builtin));
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
            },
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name)
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

    /// Disables (`Some(reason)`) or enables (`None`) a command at run time; a disabled command
    /// answers `CommandNotFound` `Command NAME has been disabled[: REASON]`. Returns false if
    /// no such command exists.
    pub fn set_disabled(&self, name: &str, disabled: Option<Option<&str>>) -> bool {
        let Some(entry) = self.by_name.get(name) else {
            return false;
        };
        let mut reason = entry.reason.write().unwrap_or_else(|e| e.into_inner());
        *reason = disabled.flatten().map(str::to_string);
        entry.disabled.store(disabled.is_some(), Ordering::Release);
        true
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
            reason: RwLock::new(command.disabled.flatten()),
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

    /// Finishes the registry.
    pub fn build(self) -> Registry {
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
    }
}
