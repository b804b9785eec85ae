//! The server: one accept loop for every listener, a task per client, the client limit,
//! and graceful shutdown.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::net::Listener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Dialect, VersionInfo};
use crate::connection::{Connection, End};
use crate::context::{ClientInfo, PeerCredentials};
use crate::counter::SpreadCounter;
use crate::error::QmpError;
use crate::events::{EventSettings, Events, Throttle};
use crate::fd::FdLimits;
use crate::fd::sets::FdSets;
use crate::job::table::JobTable;
use crate::job::{JobDriver, JobInfo, JobOptions};
use crate::policy::Policy;
use crate::qmp_return::ReturnShared;
use crate::registry::Registry;
use crate::transport::Transport;
use crate::wire::{Limits, QmpCodec, ServerCodec};

/// What every connection of one server shares.
pub(crate) struct Shared {
    pub(crate) registry: Registry,
    pub(crate) config: Config,
    pub(crate) events: Events,
    /// The greeting line every client gets, encoded once.
    pub(crate) greeting: Bytes,
    /// `query-version`'s reply, written once in QEMU's member order.
    pub(crate) version_json: Bytes,
    pub(crate) counters: Counters,
    /// What all connections hold, against `max_memory`.
    pub(crate) memory: MemoryBudget,
    /// Live-return count and the tracker of handler work.
    pub(crate) returns: Arc<ReturnShared>,
    /// The fd sets (`add-fd`), server-wide as QEMU's are global.
    pub(crate) fdsets: Arc<FdSets>,
    /// Every public job, whichever client started it; its work runs on `returns.tasks`.
    pub(crate) jobs: JobTable,
}

/// Live totals across a server's connections, for [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) clients: AtomicUsize,
    /// Kept by each client's in-flight table, in step with its entries.
    pub(crate) in_flight: Arc<SpreadCounter>,
    next_client: AtomicU64,
}

/// Bytes held by all connections of a server, against its budget.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
    /// Woken when usage falls back below the limit, for connections paused on it.
    freed: tokio::sync::Notify,
}

impl MemoryBudget {
    fn new(limit: usize) -> Self {
        MemoryBudget {
            used: AtomicUsize::new(0),
            limit,
            freed: tokio::sync::Notify::new(),
        }
    }

    /// Records a connection's change from `before` to `after` bytes.
    pub(crate) fn update(&self, before: usize, after: usize) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let previous = self.used.fetch_sub(before - after, Ordering::Relaxed);
            if previous >= self.limit && previous - (before - after) < self.limit {
                self.freed.notify_waiters();
            }
        }
    }

    /// True while the budget is spent.
    pub(crate) fn exhausted(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.limit
    }

    /// Resolves when memory is given back below the limit.
    pub(crate) async fn freed(&self) {
        let notified = self.freed.notified();
        if !self.exhausted() {
            return;
        }
        notified.await;
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// A QMP server: a registry of commands served to any number of clients, each with its own
/// session. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    /// Cancelled by [`Server::shutdown`]; every connection token is a child.
    shutdown: CancellationToken,
    /// Every connection task, so [`Server::wait`] knows when they are all gone.
    connections: TaskTracker,
    /// Permits for connected clients; accepting waits while none is left.
    client_slots: Arc<Semaphore>,
}

/// Configures a [`Server`]. Every setting has exactly one setter here; the resulting
/// [`Config`] can be read back through [`Server::config`].
#[derive(Debug)]
pub struct ServerBuilder {
    registry: Registry,
    config: Config,
    events: Events,
}

/// A snapshot of a server's live totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connected clients.
    pub clients: usize,
    /// Commands dispatched to handlers and not answered yet, across all clients.
    pub in_flight: usize,
    /// `QmpReturn`s still alive, answered or not, anywhere in the process.
    pub live_returns: usize,
    /// Connection tasks still running.
    pub connection_tasks: usize,
    /// Bytes held by all connections in buffers and retained ids, against
    /// [`Config::max_memory`].
    pub memory: usize,
    /// Events emitted through a [`RequestContext`](crate::RequestContext) by commands that
    /// did not declare them with [`Command::emits`](crate::Command::emits); tests assert 0.
    pub undeclared_events: usize,
    /// Handler work still running on the server's tracker ([`crate::QmpReturn::spawn`],
    /// [`crate::QmpReturn::spawn_blocking`], [`crate::Command::async_fn`], jobs' work).
    pub handler_tasks: usize,
    /// Jobs in the server's job table (`query-jobs`), in any state until dismissed.
    pub jobs: usize,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.commands().map(|c| c.name))
            .finish()
    }
}

impl ServerBuilder {
    /// The version in the greeting and `query-version`.
    pub fn version(mut self, version: VersionInfo) -> Self {
        self.config.version = version;
        self
    }

    /// The protocol flavour (default [`Dialect::QMP`]).
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.config.dialect = dialect;
        self
    }

    /// Offer the `oob` capability (default true).
    pub fn offer_oob(mut self, offer: bool) -> Self {
        self.config.offer_oob = offer;
        self
    }

    /// Offer the `async` capability (default true).
    pub fn offer_async(mut self, offer: bool) -> Self {
        self.config.offer_async = offer;
        self
    }

    /// Commands an async client may have in flight before reading pauses (default
    /// [`crate::config::DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.config.max_in_flight = max.max(1);
        self
    }

    /// Bytes of request ids one client's in-flight commands may retain before reading from
    /// it pauses (default [`crate::config::DEFAULT_MAX_RETAINED`]). A command is always
    /// admitted when the client has nothing in flight, so no id QEMU accepts is refused.
    pub fn max_retained(mut self, bytes: usize) -> Self {
        self.config.max_retained = bytes;
        self
    }

    /// Bytes every connection together may hold in buffers and retained ids (default
    /// [`crate::config::DEFAULT_MAX_MEMORY`]); see [`Config::max_memory`].
    pub fn max_memory(mut self, bytes: usize) -> Self {
        self.config.max_memory = bytes;
        self
    }

    /// Limits of one JSON value (default: QEMU's).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Connected clients at once (default [`crate::config::DEFAULT_MAX_CLIENTS`]). Counts
    /// every connection: accepted by [`Server::serve`], or handed in through
    /// [`Server::serve_connection`] and its relatives.
    pub fn max_clients(mut self, max: usize) -> Self {
        self.config.max_clients = max.max(1);
        self
    }

    /// Unsent output after which a client that does not read its events is disconnected
    /// (default [`crate::config::DEFAULT_MAX_PENDING_OUTPUT`]).
    pub fn max_pending_output(mut self, bytes: usize) -> Self {
        self.config.max_pending_output = bytes;
        self
    }

    /// Unsent output at which reading from a client pauses (default
    /// [`crate::config::DEFAULT_OUTPUT_HIGH_WATER`]).
    pub fn output_high_water(mut self, bytes: usize) -> Self {
        self.config.output_high_water = bytes.max(1);
        self
    }

    /// Events queued per client before a lagging client is disconnected (default
    /// [`crate::config::DEFAULT_EVENT_QUEUE`]).
    pub fn event_queue(mut self, events: usize) -> Self {
        self.config.event_queue = events.max(1);
        self
    }

    /// A deadline for one command: after `timeout` it is cancelled and its client gets
    /// `Command NAME timed out after N ms` (see [`Config::timeout_for`]).
    pub fn command_timeout(mut self, command: impl Into<String>, timeout: Duration) -> Self {
        self.config.command_timeouts.insert(command.into(), timeout);
        self
    }

    /// A deadline for every handler command without one of its own.
    pub fn default_command_timeout(mut self, timeout: Duration) -> Self {
        self.config.default_command_timeout = Some(timeout);
        self
    }

    /// Limits how fast one client may start commands of any name (see
    /// [`RateLimit`](crate::config::RateLimit)).
    pub fn rate_limit(mut self, limit: crate::config::RateLimit) -> Self {
        self.config.rate_limit = Some(limit);
        self
    }

    /// Limits how fast one client may start `command`.
    pub fn command_rate_limit(
        mut self,
        command: impl Into<String>,
        limit: crate::config::RateLimit,
    ) -> Self {
        self.config
            .command_rate_limits
            .insert(command.into(), limit);
        self
    }

    /// Rate-limits an event name ([`crate::config::qemu_throttles`] lists QEMU's).
    pub fn throttle(mut self, event: impl Into<String>, throttle: Throttle) -> Self {
        self.config.throttles.insert(event.into(), throttle);
        self
    }

    /// Caps on passed file descriptors: per message, pending and named per connection, fd
    /// sets per server ([`FdLimits`] has the defaults).
    pub fn fd_limits(mut self, limits: FdLimits) -> Self {
        self.config.fd_limits = limits;
        self
    }

    /// Emits this server's events through a handle made beforehand with [`Events::new`]
    /// (for handlers built before the server). The builder's `event_queue` and `throttle`
    /// settings apply to it, whatever the order of the calls.
    pub fn events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Builds the server. Call inside a tokio runtime if throttled events will be emitted
    /// from threads outside it.
    pub fn build(self) -> Server {
        let ServerBuilder {
            registry,
            config,
            events,
        } = self;
        events.configure(EventSettings {
            capacity: config.event_queue,
            throttles: config.throttles.clone(),
        });
        let client_slots = Arc::new(Semaphore::new(config.max_clients));
        let config_max_memory = config.max_memory;
        let version_json = Bytes::from(config.version.to_qemu_json());
        let fd_limits = config.fd_limits;
        let shutdown = CancellationToken::new();
        let returns: Arc<ReturnShared> = Arc::default();
        let jobs = JobTable::new(
            events.clone(),
            returns.tasks.clone(),
            shutdown.child_token(),
        );
        Server {
            shared: Arc::new(Shared {
                greeting: greeting(&config),
                registry,
                config,
                events,
                version_json,
                counters: Counters::default(),
                memory: MemoryBudget::new(config_max_memory),
                fdsets: Arc::new(FdSets::new(
                    fd_limits.fdsets_per_server,
                    fd_limits.fdset_fds_per_server,
                )),
                returns,
                jobs,
            }),
            shutdown,
            connections: TaskTracker::new(),
            client_slots,
        }
    }
}

/// `{"QMP": {"version": ..., "capabilities": [...]}}`, as QEMU spells it.
fn greeting(config: &Config) -> Bytes {
    let mut capabilities = Vec::new();
    if config.offer_oob {
        capabilities.push("\"oob\"");
    }
    if config.offer_async {
        capabilities.push("\"async\"");
    }
    let text = format!(
        r#"{{"QMP": {{"version": {}, "capabilities": [{}]}}}}"#,
        config.version.to_qemu_json(),
        capabilities.join(", ")
    );
    Bytes::from(text)
}

/// A client that holds one of the server's [`max_clients`](ServerBuilder::max_clients)
/// slots and may be served: see [`Server::admit`] and [`Server::serve_admitted`].
#[derive(Debug)]
pub struct Admitted<T> {
    transport: T,
    /// The listener's name for the peer, for the log.
    peer: Option<String>,
    credentials: Option<PeerCredentials>,
    policy: Policy,
    _slot: OwnedSemaphorePermit,
}

impl<T> Admitted<T> {
    /// The client's transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The peer's credentials, read when it was admitted (Unix sockets only).
    pub fn peer_credentials(&self) -> Option<PeerCredentials> {
        self.credentials
    }

    /// The policy the client will be served under ([`Policy::full`] unless set).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Serves the client under `policy`.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
}

/// A connection's codec and the input it has read but not decoded yet: what survives a
/// connection when the protocol's parser outlives clients (the guest agent), in the manner
/// of `tokio_util::codec::FramedParts`.
#[derive(Debug)]
pub struct ConnectionParts<C> {
    /// The codec, with its decoder's state.
    pub codec: C,
    /// Bytes read from earlier clients and not decoded yet.
    pub read_buf: BytesMut,
}

impl<C> ConnectionParts<C> {
    /// Parts with an empty input buffer.
    pub fn new(codec: C) -> Self {
        ConnectionParts {
            codec,
            read_buf: BytesMut::new(),
        }
    }
}

impl Server {
    /// Starts configuring a server for these commands.
    pub fn builder(registry: Registry) -> ServerBuilder {
        ServerBuilder {
            registry,
            config: Config::default(),
            events: Events::new(),
        }
    }

    /// The handle to emit events with.
    pub fn events(&self) -> &Events {
        &self.shared.events
    }

    /// What this server's connections share, for the session's own tests.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The command table, to disable or enable commands at run time.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Live totals: clients, commands in flight, live `QmpReturn`s, tasks.
    pub fn stats(&self) -> Stats {
        let counters = &self.shared.counters;
        Stats {
            clients: counters.clients.load(Ordering::Relaxed),
            in_flight: counters.in_flight.get(),
            live_returns: self.shared.returns.live.get(),
            connection_tasks: self.connections.len(),
            handler_tasks: self.shared.returns.tasks.len(),
            memory: self.shared.memory.used(),
            undeclared_events: self.shared.events.undeclared(),
            jobs: self.shared.jobs.len(),
        }
    }

    /// Starts a job that no command started (the VMM's own work), as a command with
    /// `job-id` would: see [`RequestContext::start_job`](crate::RequestContext::start_job).
    /// `Invalid job ID`, `Job ID ... already in use` and a missing id are refused.
    pub fn start_job<D: JobDriver>(&self, options: JobOptions, driver: D) -> Result<(), QmpError> {
        self.shared.jobs.start(options, driver)
    }

    /// The jobs, as `query-jobs` lists them (newest first).
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        self.shared.jobs.query()
    }

    /// A codec for one connection of this server: QEMU's decoder with the configured limits,
    /// and the dialect's line ending.
    pub fn codec(&self) -> QmpCodec {
        let config = &self.shared.config;
        QmpCodec::new(config.limits, config.dialect.line_ending)
    }

    /// Accepts clients on any listener (`UnixListener`, `TcpListener`, ...) until
    /// [`shutdown`](Self::shutdown), serving each on its own task with a fresh codec.
    ///
    /// A client slot is taken *before* accepting, so clients beyond
    /// [`max_clients`](ServerBuilder::max_clients) wait in the kernel's listen backlog, as
    /// with QEMU. Transient accept errors (descriptor exhaustion, aborted connections) are
    /// logged, rate-limited, and retried after a pause; any other error is returned.
    pub async fn serve<L>(&self, listener: L) -> io::Result<()>
    where
        L: Listener,
        L::Io: Transport,
        L::Addr: std::fmt::Debug,
    {
        self.serve_with(listener, |server, client| async move {
            let mut parts = ConnectionParts::new(server.codec());
            server.serve_admitted(client, &mut parts).await;
        })
        .await
    }

    /// [`serve`](Self::serve), with every client of this listener under `policy`: a
    /// read-only monitor beside a full one, say.
    pub async fn serve_with_policy<L>(&self, listener: L, policy: Policy) -> io::Result<()>
    where
        L: Listener,
        L::Io: Transport,
        L::Addr: std::fmt::Debug,
    {
        self.serve_with_policy_for(listener, move |_| policy.clone())
            .await
    }

    /// [`serve`](Self::serve), with each client's policy chosen from its peer credentials
    /// (`None` where the transport has none): uid 0 gets everything, others read-only, say.
    pub async fn serve_with_policy_for<L, F>(&self, listener: L, choose: F) -> io::Result<()>
    where
        L: Listener,
        L::Io: Transport,
        L::Addr: std::fmt::Debug,
        F: Fn(Option<PeerCredentials>) -> Policy + Send + Sync + 'static,
    {
        let choose = Arc::new(choose);
        self.serve_with(listener, move |server, client| {
            let policy = choose(client.peer_credentials());
            async move {
                let mut parts = ConnectionParts::new(server.codec());
                server
                    .serve_admitted(client.with_policy(policy), &mut parts)
                    .await;
            }
        })
        .await
    }

    /// Accepts clients on a Unix socket; the same as [`serve`](Self::serve).
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        self.serve(listener).await
    }

    /// Accepts clients on a TCP socket; the same as [`serve`](Self::serve).
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        self.serve(listener).await
    }

    /// The accept loop behind [`serve`](Self::serve), serving each admitted client with
    /// `serve_client` on a task of its own. For protocols that keep state across clients
    /// (the guest agent hands its parser from one client to the next).
    pub async fn serve_with<L, F, Fut>(&self, mut listener: L, serve_client: F) -> io::Result<()>
    where
        L: Listener,
        L::Io: Transport,
        L::Addr: std::fmt::Debug,
        F: Fn(Server, Admitted<L::Io>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut errors = AcceptErrors::default();
        loop {
            let Some(slot) = self.client_slot().await else {
                return Ok(());
            };
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((transport, peer)) => {
                    transport.on_accept();
                    let credentials = transport.peer_credentials();
                    let client = Admitted {
                        credentials,
                        transport,
                        peer: Some(format!("{peer:?}")),
                        policy: Policy::full(),
                        _slot: slot,
                    };
                    self.connections.spawn(serve_client(self.clone(), client));
                }
                Err(error) => errors.handle(error).await?,
            }
        }
    }

    /// Waits for a client slot for `transport`; `None` once the server shuts down.
    pub async fn admit<T: Transport>(&self, transport: T) -> Option<Admitted<T>> {
        let slot = self.client_slot().await?;
        Some(Admitted {
            credentials: transport.peer_credentials(),
            transport,
            peer: None,
            policy: Policy::full(),
            _slot: slot,
        })
    }

    /// Serves one client on any transport (stdio, a character device), in this task, until
    /// it disconnects or the server shuts down. Waits first for a client slot. Each call
    /// starts with a fresh codec, as QEMU's monitor re-creates its parser on every connect.
    pub async fn serve_connection<T: Transport>(&self, transport: T) {
        if let Some(client) = self.admit(transport).await {
            let mut parts = ConnectionParts::new(self.codec());
            self.serve_admitted(client, &mut parts).await;
        }
    }

    /// Spawns a task serving one client, counted by [`wait`](Self::wait).
    pub fn spawn_connection<T: Transport>(&self, transport: T) {
        let server = self.clone();
        self.connections
            .spawn(async move { server.serve_connection(transport).await });
    }

    /// Serves an admitted client with the given codec and unread input, in this task. When
    /// the client leaves, `parts` holds the codec's state and the bytes not decoded yet, for
    /// the next client of a protocol whose parser outlives connections. If this future is
    /// dropped, `parts` stays consistent.
    pub async fn serve_admitted<T: Transport, C: ServerCodec>(
        &self,
        client: Admitted<T>,
        parts: &mut ConnectionParts<C>,
    ) {
        let counters = &self.shared.counters;
        let id = counters.next_client.fetch_add(1, Ordering::Relaxed);
        // DEBUG, not INFO: the span is entered on every poll of the connection.
        let creds = client.credentials;
        let span = tracing::debug_span!(
            "qmp_client",
            client = id,
            peer = client.peer.as_deref(),
            uid = creds.map(|c| c.uid),
            pid = creds.and_then(|c| c.pid),
            policy = client.policy.name(),
        );
        let _task = self.connections.token();
        counters.clients.fetch_add(1, Ordering::Relaxed);
        crate::observe::clients_changed(1.0);
        let connection = Connection::new(
            Arc::clone(&self.shared),
            client.transport,
            parts,
            self.shutdown.child_token(),
            Arc::new(ClientInfo::new(id, creds, client.policy)),
        );
        let end: End = connection.run().instrument(span).await;
        counters.clients.fetch_sub(1, Ordering::Relaxed);
        crate::observe::clients_changed(-1.0);
        tracing::debug!(client = id, ?end, "client disconnected");
    }

    /// Stops accepting, cancels every in-flight command and every job, and closes every
    /// connection.
    pub fn shutdown(&self) {
        // Jobs first: those waiting for a client abort or go now, the rest are cancelled
        // (their tokens are children of the shutdown token) and go when their work ends.
        self.shared.jobs.shut_down();
        self.shutdown.cancel();
        self.connections.close();
        self.shared.returns.tasks.close();
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves when shutdown was requested.
    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await
    }

    /// Waits until every connection task and every piece of tracked handler work has ended
    /// (after [`shutdown`](Self::shutdown)).
    pub async fn wait(&self) {
        self.connections.wait().await;
        self.shared.returns.tasks.wait().await;
    }

    async fn client_slot(&self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            () = self.shutdown.cancelled() => None,
            permit = Arc::clone(&self.client_slots).acquire_owned() => permit.ok(),
        }
    }
}

/// How the accept loop treats errors: transient ones (the process or system is out of
/// descriptors or memory, a connection died in the backlog) are retried after
/// [`ACCEPT_RETRY`], with one warning per [`ACCEPT_WARN_EVERY`] at most, so descriptor
/// exhaustion cannot flood the log; anything else ends the loop.
#[derive(Default)]
struct AcceptErrors {
    last_warning: Option<Instant>,
    suppressed: u64,
}

/// Pause after a transient accept error.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// At most one accept warning this often.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

impl AcceptErrors {
    async fn handle(&mut self, error: io::Error) -> io::Result<()> {
        if !is_transient(&error) {
            tracing::error!(cause = %error, "accept failed; no longer accepting");
            return Err(error);
        }
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_WARN_EVERY)
        {
            tracing::warn!(cause = %error, suppressed = self.suppressed, "accept failed; retrying");
            self.last_warning = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(ACCEPT_RETRY).await;
        Ok(())
    }
}

/// Accept errors that pass: resource exhaustion and connections that died while queued.
fn is_transient(error: &io::Error) -> bool {
    use io::ErrorKind::*;
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) {
        return true;
    }
    use nix::errno::Errno;
    // A firewall refusing one connection shows as EPERM.
    let transient = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::ENOMEM,
        Errno::EPROTO,
        Errno::EPERM,
    ];
    error
        .raw_os_error()
        .is_some_and(|code| transient.iter().any(|errno| *errno as i32 == code))
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("stats", &self.stats())
            .finish()
    }
}
