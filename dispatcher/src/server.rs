//! The server: listeners, one task per client, limits, graceful shutdown.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Dialect, VersionInfo};
use crate::connection;
use crate::events::{Events, Throttle};
use crate::registry::Registry;
use crate::session::{Counters, Shared};
use crate::transport::Transport;
use crate::wire::Limits;

/// A QMP server: a registry of commands served to any number of clients, each with its own
/// session. Cheap to clone; every clone is the same server.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    /// Cancelled by [`Server::shutdown`]; every connection token is a child.
    shutdown: CancellationToken,
    /// Every connection task, so [`Server::wait`] knows when they are all gone.
    tasks: TaskTracker,
    /// Permits for connected clients; accepting waits while none is left.
    client_slots: Arc<Semaphore>,
}

/// Configures a [`Server`].
#[derive(Debug)]
pub struct ServerBuilder {
    registry: Registry,
    config: Config,
    events: Option<Events>,
}

/// A snapshot of a server's live totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Connected clients.
    pub clients: usize,
    /// Commands dispatched to handlers and not answered yet, across all clients.
    pub in_flight: usize,
    /// `QmpReturn`s still alive, answered or not, anywhere in the process.
    pub live_returns: usize,
    /// Connection tasks still running.
    pub connection_tasks: usize,
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

    /// Limits of one JSON value (default: QEMU's).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// Connected clients at once (default [`crate::config::DEFAULT_MAX_CLIENTS`]).
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

    /// Rate-limits an event name.
    pub fn throttle(mut self, event: impl Into<String>, throttle: Throttle) -> Self {
        self.config.throttles.insert(event.into(), throttle);
        self
    }

    /// Uses an event channel made beforehand (see [`Events::new`]); the builder's
    /// `event_queue` and `throttle` settings then do not apply.
    pub fn events(mut self, events: Events) -> Self {
        self.events = Some(events);
        self
    }

    /// Any other configuration.
    pub fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Builds the server. Call inside a tokio runtime if throttled events will be emitted
    /// from threads outside it.
    pub fn build(self) -> Server {
        let events = self.events.unwrap_or_else(|| {
            Events::with_throttles(self.config.event_queue, self.config.throttles.clone())
        });
        let client_slots = Arc::new(Semaphore::new(self.config.max_clients));
        let version_json =
            serde_json::value::RawValue::from_string(self.config.version.to_qemu_json())
                .expect("the version text is JSON");
        Server {
            shared: Arc::new(Shared {
                registry: Arc::new(self.registry),
                config: self.config,
                events,
                counters: Counters::default(),
                version_json,
            }),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            client_slots,
        }
    }
}

impl Server {
    /// Starts configuring a server for these commands.
    pub fn builder(registry: Registry) -> ServerBuilder {
        ServerBuilder {
            registry,
            config: Config::default(),
            events: None,
        }
    }

    /// The handle to emit events with.
    pub fn events(&self) -> &Events {
        &self.shared.events
    }

    /// The command table, to disable or enable commands at run time.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Live totals: clients, commands in flight, live `QmpReturn`s, connection tasks.
    pub fn stats(&self) -> Stats {
        let counters = &self.shared.counters;
        Stats {
            clients: counters.clients.load(Ordering::Relaxed),
            in_flight: counters.in_flight.load(Ordering::Relaxed),
            live_returns: counters.live_returns.load(Ordering::Relaxed),
            connection_tasks: self.tasks.len(),
        }
    }

    /// Accepts clients on a Unix socket until [`shutdown`](Self::shutdown).
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        loop {
            let Some(permit) = self.client_slot().await else {
                return Ok(());
            };
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => self.spawn_with_permit(stream, permit, "unix".to_string()),
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// Accepts clients on a TCP socket until [`shutdown`](Self::shutdown).
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        loop {
            let Some(permit) = self.client_slot().await else {
                return Ok(());
            };
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    self.spawn_with_permit(stream, permit, peer.to_string());
                }
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// Serves one client on any transport (stdio, a character device), in this task, until
    /// it disconnects or the server shuts down.
    ///
    /// Each connection starts with a fresh JSON parser, as QEMU's monitor does. A protocol
    /// whose parser outlives clients (the guest agent) keeps one connection and attaches
    /// clients to its transport instead; see `qmp-qga`.
    pub async fn serve_connection<T: Transport>(&self, transport: T) {
        let client = self
            .shared
            .counters
            .next_client
            .fetch_add(1, Ordering::Relaxed);
        // DEBUG, not INFO: the span is entered on every poll of the connection.
        let span = tracing::debug_span!("qmp_client", client);
        let _token = self.tasks.token();
        self.shared.counters.clients.fetch_add(1, Ordering::Relaxed);
        let end = connection::serve(
            Arc::clone(&self.shared),
            transport,
            self.shutdown.clone(),
            client,
        )
        .instrument(span)
        .await;
        self.shared.counters.clients.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(client, ?end, "client disconnected");
    }

    /// Spawns a task serving one client, counted by [`wait`](Self::wait).
    pub fn spawn_connection<T: Transport>(&self, transport: T) {
        let server = self.clone();
        self.tasks
            .spawn(async move { server.serve_connection(transport).await });
    }

    /// Stops accepting, cancels every in-flight command and closes every connection.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves when shutdown was requested.
    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await
    }

    /// Waits until every connection task has ended (after [`shutdown`](Self::shutdown)).
    pub async fn wait(&self) {
        self.tasks.wait().await
    }

    async fn client_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::select! {
            () = self.shutdown.cancelled() => None,
            permit = Arc::clone(&self.client_slots).acquire_owned() => permit.ok(),
        }
    }

    fn spawn_with_permit<T: Transport>(
        &self,
        transport: T,
        permit: tokio::sync::OwnedSemaphorePermit,
        peer: String,
    ) {
        let server = self.clone();
        tracing::debug!(%peer, "client connected");
        self.tasks.spawn(async move {
            server.serve_connection(transport).await;
            drop(permit);
        });
    }
}

/// Accept errors such as EMFILE are transient: log, back off, keep serving.
async fn accept_error(e: io::Error) -> io::Result<()> {
    tracing::warn!(cause = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    Ok(())
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("stats", &self.stats())
            .finish()
    }
}
