//! `GuestAgent`: the builder, command filters (block, allow, frozen) and the serve methods.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qmp_dispatcher::{
    Admitted, Command, ConnectionParts, Dialect, RegisterError, Registry, RegistryBuilder, Server,
    Transport, bind_unix,
};
use tokio::net::UnixListener;

use crate::codec::GuestAgentCodec;
use crate::commands;
use crate::serial::SerialPort;

/// Commands that stay enabled while the agent is frozen (qemu-ga 7.2's freeze allow list).
pub const FROZEN_ALLOWED: [&str; 6] = [
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// The reason frozen commands give: `Command X has been disabled: the agent is in frozen
/// state`.
pub const FROZEN_REASON: &str = "the agent is in frozen state";

/// The reason commands outside the allow list give (qemu-ga 8.0's text).
pub const NOT_ALLOWED_REASON: &str = "the command is not allowed";

/// What happens to a half-read request when a client goes and the next one comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ParserState {
    /// qemu-ga's behaviour and the default: the parser is the agent's, not the
    /// connection's. Bytes a client left unfinished are completed by the next client's bytes;
    /// hosts flush them with the 0xFF + `guest-sync-delimited` handshake.
    #[default]
    KeepAcrossClients,
    /// Like QEMU's monitor: every client starts with a fresh parser (a deviation from
    /// qemu-ga; serial ports, which have no clients, are unaffected).
    ResetOnConnect,
}

/// Why [`GuestAgentBuilder::build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Two commands share a name (an embedder command may not replace a built-in one).
    #[error(transparent)]
    Register(#[from] RegisterError),
}

/// A command the builder registers, in order.
enum Slot {
    Embedder(Command),
    GuestInfo,
}

/// Configures a [`GuestAgent`]. See [`GuestAgent::builder`].
pub struct GuestAgentBuilder {
    slots: Vec<Slot>,
    version: String,
    block: Vec<String>,
    allow: Option<Vec<String>>,
    parser: ParserState,
    frozen: bool,
}

impl GuestAgentBuilder {
    /// Registers one of the agent's commands. Registration order matters: `guest-info`
    /// lists commands newest first, as qemu-ga does.
    pub fn command(mut self, command: Command) -> Self {
        self.slots.push(Slot::Embedder(command));
        self
    }

    /// Places the built-in `guest-info` here in the registration order (qemu-ga registers it
    /// after `guest-set-time`). Without this call it is registered after every other command.
    pub fn guest_info_here(mut self) -> Self {
        self.slots.push(Slot::GuestInfo);
        self
    }

    /// The version `guest-info` reports (default: this crate's version).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Disables these commands for the agent's life (qemu-ga's `--block-rpcs`): they answer
    /// `Command X has been disabled`, with no reason, as in 7.2. Unknown names are ignored.
    pub fn block<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.block.extend(names.into_iter().map(Into::into));
        self
    }

    /// Disables every command not named here (qemu-ga 8.0's `--allow-rpcs`), with the reason
    /// `the command is not allowed`. The block list still applies to allowed commands. Name
    /// `guest-sync-delimited` and `guest-sync` too, or hosts cannot synchronise.
    pub fn allow<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allow
            .get_or_insert_with(Vec::new)
            .extend(names.into_iter().map(Into::into));
        self
    }

    /// Whether parser state survives reconnects (default
    /// [`ParserState::KeepAcrossClients`], as in qemu-ga).
    pub fn parser_state(mut self, parser: ParserState) -> Self {
        self.parser = parser;
        self
    }

    /// Starts frozen, like qemu-ga finding its `isfrozen` state file at startup.
    pub fn frozen(mut self, frozen: bool) -> Self {
        self.frozen = frozen;
        self
    }

    /// Builds the agent. The built-ins `guest-sync-delimited`, `guest-sync` and `guest-ping`
    /// are registered first, in qemu-ga's order, then the embedder's commands.
    pub fn build(self) -> Result<GuestAgent, BuildError> {
        let mut registry = Registry::bare_builder();
        registry
            .add(commands::guest_sync_delimited())?
            .add(commands::guest_sync())?
            .add(commands::guest_ping())?;
        let mut info_placed = false;
        let add_info = |registry: &mut RegistryBuilder| -> Result<(), RegisterError> {
            registry.add(commands::guest_info(self.version.clone()))?;
            Ok(())
        };
        for slot in self.slots {
            match slot {
                Slot::Embedder(command) => {
                    registry.add(command)?;
                }
                Slot::GuestInfo if !info_placed => {
                    add_info(&mut registry)?;
                    info_placed = true;
                }
                Slot::GuestInfo => {}
            }
        }
        if !info_placed {
            add_info(&mut registry)?;
        }
        let registry = registry.build();
        // Commands registered disabled (not supported on this platform) stay disabled
        // whatever the filters say.
        let platform_disabled = registry
            .commands()
            .filter(|c| !c.enabled)
            .map(|c| c.name.to_string())
            .collect();
        for name in self.block.iter().chain(self.allow.iter().flatten()) {
            if !registry.commands().any(|c| c.name == name) {
                tracing::warn!(command = %name, "filter names an unknown guest agent command");
            }
        }
        // One client at a time, as qemu-ga: the next waits for the slot (in the listen
        // backlog when it comes through `serve_unix`).
        let server = Server::builder(registry)
            .dialect(Dialect::GUEST_AGENT)
            .offer_oob(false)
            .offer_async(false)
            .max_clients(1)
            .build();
        let keep = self.parser == ParserState::KeepAcrossClients;
        let parts = ConnectionParts::new(GuestAgentCodec::new(server.codec(), keep));
        let agent = GuestAgent {
            inner: Arc::new(Inner {
                server,
                filters: Filters {
                    block: self.block.into_iter().collect(),
                    allow: self.allow.map(|names| names.into_iter().collect()),
                    platform_disabled,
                },
                frozen: AtomicBool::new(self.frozen),
                frozen_lock: Mutex::new(()),
                parser: self.parser,
                parts: tokio::sync::Mutex::new(parts),
            }),
        };
        agent.apply_filters(self.frozen);
        Ok(agent)
    }
}

/// A guest agent: the dispatcher behind qemu-ga's wire protocol. Cheap to clone; every clone
/// is the same agent.
///
/// No greeting, no negotiation (`qmp_capabilities` is an unknown command), one command at a
/// time, `exec-oob` rejected, replies ending in `"\n"`, and no events.
#[derive(Clone)]
pub struct GuestAgent {
    inner: Arc<Inner>,
}

struct Inner {
    server: Server,
    filters: Filters,
    frozen: AtomicBool,
    /// Serialises `set_frozen`, so concurrent calls cannot interleave their updates.
    frozen_lock: Mutex<()>,
    parser: ParserState,
    /// The codec and unread input, handed from client to client with
    /// [`ParserState::KeepAcrossClients`].
    parts: tokio::sync::Mutex<ConnectionParts<GuestAgentCodec>>,
}

struct Filters {
    block: HashSet<String>,
    allow: Option<HashSet<String>>,
    platform_disabled: HashSet<String>,
}

impl Filters {
    /// The disabled state a command should have: `None` enabled, `Some(reason)` disabled.
    /// In 7.2 the block list is applied last, so a blocked command gives no reason even when
    /// frozen.
    fn state(&self, name: &str, frozen: bool) -> Option<Option<&'static str>> {
        if self.block.contains(name) {
            Some(None)
        } else if self
            .allow
            .as_ref()
            .is_some_and(|allow| !allow.contains(name))
        {
            Some(Some(NOT_ALLOWED_REASON))
        } else if frozen && !FROZEN_ALLOWED.contains(&name) {
            Some(Some(FROZEN_REASON))
        } else {
            None
        }
    }
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("frozen", &self.is_frozen())
            .field("parser", &self.inner.parser)
            .field("server", &self.inner.server)
            .finish()
    }
}

impl GuestAgent {
    /// Starts configuring an agent.
    pub fn builder() -> GuestAgentBuilder {
        GuestAgentBuilder {
            slots: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            block: Vec::new(),
            allow: None,
            parser: ParserState::default(),
            frozen: false,
        }
    }

    /// The dispatcher server underneath: stats, `shutdown`, `wait`, and the registry.
    pub fn server(&self) -> &Server {
        &self.inner.server
    }

    /// Enters or leaves the frozen state (qemu-ga after `guest-fsfreeze-freeze` and
    /// `-thaw`): while frozen only [`FROZEN_ALLOWED`] commands run, the others answer
    /// `Command X has been disabled: the agent is in frozen state`.
    pub fn set_frozen(&self, frozen: bool) {
        let _serial = self
            .inner
            .frozen_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.frozen.store(frozen, Ordering::Release);
        self.apply_filters(frozen);
    }

    /// True while frozen.
    pub fn is_frozen(&self) -> bool {
        self.inner.frozen.load(Ordering::Acquire)
    }

    fn apply_filters(&self, frozen: bool) {
        let registry = self.inner.server.registry();
        let filters = &self.inner.filters;
        let names: Vec<String> = registry.commands().map(|c| c.name.to_string()).collect();
        for name in names {
            if filters.platform_disabled.contains(&name) {
                continue;
            }
            registry.set_disabled(&name, filters.state(&name, frozen));
        }
    }

    /// Accepts clients on a Unix socket until [`Server::shutdown`], serving one at a time as
    /// qemu-ga does: the next connection is accepted only when the current client has closed,
    /// so others wait in the listen backlog.
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let agent = self.clone();
        self.inner
            .server
            .serve_with(listener, move |_, client| {
                let agent = agent.clone();
                async move { agent.serve_admitted(client).await }
            })
            .await
    }

    /// Binds `path` (mode 0600, replacing a stale socket) and serves it like
    /// [`serve_unix`](Self::serve_unix).
    pub async fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let listener = bind_unix(path, 0o600)?;
        self.serve_unix(listener).await
    }

    /// Serves one client on any byte stream until it has sent EOF and received its replies,
    /// or the agent shuts down. Calls wait their turn: one client at a time. With
    /// [`ParserState::KeepAcrossClients`] the parser state carries over to the next call,
    /// also when this future is dropped before the client is done.
    pub async fn serve_stream<T: Transport>(&self, transport: T) {
        if let Some(client) = self.inner.server.admit(transport).await {
            self.serve_admitted(client).await;
        }
    }

    /// Opens a virtio-serial port, serial line or pty and serves it until
    /// [`Server::shutdown`]. The port is never closed: on EOF or hang-up the agent waits
    /// [`crate::EOF_RETRY`] and reads again (qemu-ga's virtio-serial behaviour).
    pub async fn serve_serial(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let port = SerialPort::open(path)?;
        self.serve_stream(port).await;
        Ok(())
    }

    async fn serve_admitted<T: Transport>(&self, client: Admitted<T>) {
        let inner = &self.inner;
        match inner.parser {
            ParserState::KeepAcrossClients => {
                let mut parts = inner.parts.lock().await;
                inner.server.serve_admitted(client, &mut parts).await;
            }
            ParserState::ResetOnConnect => {
                let codec = GuestAgentCodec::new(inner.server.codec(), false);
                let mut parts = ConnectionParts::new(codec);
                inner.server.serve_admitted(client, &mut parts).await;
            }
        }
    }
}

/// An agent with only the built-in commands (`guest-sync`, `guest-sync-delimited`,
/// `guest-ping`, `guest-info`), for demos and tests; serve it with
/// [`GuestAgent::listen_unix`].
pub fn minimal_agent() -> GuestAgent {
    GuestAgent::builder()
        .build()
        .expect("the built-in command names are unique")
}
