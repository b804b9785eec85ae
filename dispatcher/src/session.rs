//! One client's protocol state: negotiation, capabilities, the legacy in-band backlog, the
//! in-flight table, and the rule that says whether the connection may read more input.
//!
//! No I/O happens here. The connection task feeds frames and completions in and writes out
//! whatever accumulates in [`Session::out`].

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use bytes::BytesMut;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LEGACY_QUEUE_LEN};
use crate::error::QmpError;
use crate::events::{Events, Subscription};
use crate::in_flight::{InFlight, NewEntry};
use crate::qmp_return::{Completion, Outcome, Outgoing, QmpReturn, Ticket};
use crate::registry::{Builtin, Kind, Registry};
use crate::wire::request::{self, Request, RequestError};
use crate::wire::{Frame, encode};

/// State shared by every connection of one server.
pub(crate) struct Shared {
    pub(crate) registry: Arc<Registry>,
    pub(crate) config: Config,
    pub(crate) events: Events,
    pub(crate) counters: Counters,
    /// `query-version`'s reply, written once in QEMU's member order.
    pub(crate) version_json: Box<RawValue>,
}

/// Live totals across a server's connections, for [`crate::Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) clients: AtomicUsize,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) live_returns: Arc<AtomicUsize>,
    pub(crate) next_client: AtomicU64,
}

/// An in-band item waiting its turn behind a running legacy command: a request, or the
/// error reply of input that could not become one (errors keep their place in line).
enum InBand {
    Request(Request),
    Reject(RequestError),
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    /// Log and span field naming this client.
    pub(crate) client: u64,
    /// False until `qmp_capabilities` succeeds (always true without negotiation).
    negotiated: bool,
    oob: bool,
    async_mode: bool,
    in_flight: InFlight,
    /// Legacy clients: in-band requests read but not started (QEMU's request queue).
    backlog: VecDeque<InBand>,
    /// Legacy clients: the in-band command executing now; nothing else in-band starts until
    /// it replies.
    running: Option<Ticket>,
    /// Encoded output not yet written to the socket.
    pub(crate) out: BytesMut,
    /// The connection's outbox: handlers' replies and events arrive through it, in order.
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The connection's token; every in-flight command holds a child of it.
    cancel: CancellationToken,
    /// Events flow into the outbox while this is held: from negotiation to disconnect.
    events: Option<Subscription>,
    /// Events were lost because this client fell behind; the connection ends.
    pub(crate) lagged: bool,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        client: u64,
        outbox: mpsc::UnboundedSender<Outgoing>,
        cancel: CancellationToken,
    ) -> Self {
        let dialect = shared.config.dialect;
        let mut session = Session {
            client,
            negotiated: !dialect.negotiation,
            oob: false,
            async_mode: false,
            in_flight: InFlight::new(Arc::clone(&shared.counters.in_flight)),
            backlog: VecDeque::new(),
            running: None,
            out: BytesMut::with_capacity(4096),
            outbox,
            cancel,
            events: None,
            lagged: false,
            shared,
        };
        if dialect.greeting {
            session.write_greeting();
        }
        if dialect.events && session.negotiated {
            session.events = Some(session.shared.events.subscribe(session.outbox.clone()));
        }
        session
    }

    /// Whether the connection may take another request from its input: QEMU's monitor
    /// suspension for legacy clients, the in-flight cap for async ones, and output
    /// backpressure for both.
    pub(crate) fn can_read(&self) -> bool {
        if self.out.len() >= self.shared.config.output_high_water {
            return false;
        }
        if self.in_flight.len() >= self.shared.config.max_in_flight {
            // Also bounds deferred exec-oob commands of legacy clients.
            return false;
        }
        if self.async_mode {
            true
        } else if self.oob {
            self.backlog.len() < LEGACY_QUEUE_LEN
        } else {
            self.running.is_none() && self.backlog.is_empty()
        }
    }

    /// True while some request still owes a reply.
    pub(crate) fn has_pending(&self) -> bool {
        !self.in_flight.is_empty() || !self.backlog.is_empty() || self.running.is_some()
    }

    /// Handles one decoded input frame.
    pub(crate) fn on_frame(&mut self, frame: Frame) {
        let (item, out_of_band) = match frame {
            Frame::Error(desc) => (
                InBand::Reject(RequestError {
                    id: None,
                    error: QmpError::generic(desc),
                }),
                false,
            ),
            Frame::Value(parsed) => {
                let out_of_band = request::is_oob_keyed(&parsed.value);
                match request::parse(parsed, self.oob) {
                    Ok(request) => (InBand::Request(request), out_of_band),
                    Err(rejected) => (InBand::Reject(rejected), out_of_band),
                }
            }
        };
        if out_of_band || self.async_mode {
            self.execute(item, false);
        } else {
            self.backlog.push_back(item);
        }
        self.pump();
    }

    /// Handles whatever arrived in the outbox.
    pub(crate) fn on_outgoing(&mut self, message: Outgoing) {
        match message {
            Outgoing::Completion(completion) => self.on_completion(completion),
            Outgoing::Event(line) => {
                if let Some(subscription) = &self.events {
                    subscription.delivered();
                    // Only events can pile up unasked: replies are bounded by the in-flight
                    // cap and by reading pausing at `output_high_water`, so a large reply
                    // never counts against a client.
                    if self.out.len() + line.len() > self.shared.config.max_pending_output {
                        self.lagged = true;
                        return;
                    }
                    self.out.extend_from_slice(&line);
                }
            }
            Outgoing::Lagged => self.lagged = true,
        }
    }

    /// Handles a handler's reply.
    fn on_completion(&mut self, completion: Completion) {
        let Some(entry) = self.in_flight.take(completion.ticket) else {
            return; // Cancelled: the reply has nobody to go to.
        };
        let ending = self.shared.config.dialect.line_ending;
        match completion.outcome {
            Outcome::Return { .. } if entry.silent_success => {}
            Outcome::Return { value, prefix } => {
                if let Some(prefix) = prefix {
                    self.out.extend_from_slice(prefix);
                }
                encode::success(&mut self.out, &value, entry.id.as_deref(), ending);
            }
            Outcome::Error(error) => {
                encode::error(&mut self.out, &error, entry.id.as_deref(), ending)
            }
        }
        if self.running == Some(completion.ticket) {
            self.running = None;
            self.pump();
        }
    }

    /// The client is gone or the server stops: cancel everything it had in flight.
    pub(crate) fn close(&mut self) {
        let cancelled = self.in_flight.len();
        self.in_flight.cancel_all();
        self.backlog.clear();
        self.running = None;
        self.events = None;
        if cancelled > 0 {
            tracing::debug!(
                client = self.client,
                cancelled,
                "cancelled in-flight commands of a departed client"
            );
        }
    }

    /// Starts queued in-band work while nothing in-band is running (legacy clients).
    fn pump(&mut self) {
        while self.running.is_none() {
            let Some(item) = self.backlog.pop_front() else {
                break;
            };
            self.execute(item, true);
        }
    }

    fn execute(&mut self, item: InBand, in_band: bool) {
        let request = match item {
            InBand::Request(request) => request,
            InBand::Reject(rejected) => {
                return self.write_error(rejected.id.as_deref(), &rejected.error);
            }
        };
        let ticket = self.dispatch(request);
        if in_band && !self.async_mode {
            self.running = ticket;
        }
    }

    /// Looks the command up and starts it; returns the ticket when a handler now owes a
    /// reply (built-ins and rejections answer at once).
    fn dispatch(&mut self, request: Request) -> Option<Ticket> {
        let shared = Arc::clone(&self.shared);
        if !self.negotiated && request.command != "qmp_capabilities" {
            let error = QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            self.write_error(request.id.as_deref(), &error);
            return None;
        }
        let id_key = match self.async_checks(&request) {
            Ok(id_key) => id_key,
            Err(error) => {
                self.write_error(request.id.as_deref(), &error);
                return None;
            }
        };
        let Some(command) = shared.registry.get(&request.command) else {
            let error = QmpError::command_not_found(format!(
                "The command {} has not been found",
                request.command
            ));
            self.write_error(request.id.as_deref(), &error);
            return None;
        };
        if let Some(reason) = command.disabled() {
            let desc = match reason {
                Some(reason) => format!("Command {} has been disabled: {reason}", request.command),
                None => format!("Command {} has been disabled", request.command),
            };
            let error = QmpError::command_not_found(desc);
            self.write_error(request.id.as_deref(), &error);
            return None;
        }
        if request.oob && !command.allow_oob {
            let error = QmpError::generic(format!(
                "The command {} does not support OOB",
                request.command
            ));
            self.write_error(request.id.as_deref(), &error);
            return None;
        }
        let handler = match &command.kind {
            Kind::Builtin(Builtin::QueryVersion) if request.arguments.is_empty() => {
                let ending = shared.config.dialect.line_ending;
                encode::success(
                    &mut self.out,
                    &shared.version_json,
                    request.id.as_deref(),
                    ending,
                );
                return None;
            }
            Kind::Builtin(builtin) => {
                let result = self.builtin(*builtin, request.arguments);
                self.write_result(request.id.as_deref(), result);
                return None;
            }
            Kind::Handler(handler) => Arc::clone(handler),
        };

        let id_key = match id_key {
            None if self.async_mode => request.id_value.as_ref().map(Value::to_string),
            id_key => id_key,
        };
        let cancel = self.cancel.child_token();
        let ticket = self.in_flight.insert(NewEntry {
            id: request.id.map(crate::wire::json::Id::into_text),
            id_key,
            command: Arc::clone(&command.name),
            cancel: cancel.clone(),
            oob: request.oob,
            silent_success: command.silent_success,
            indexed: self.async_mode,
        });
        let ret = QmpReturn::new(
            self.outbox.clone(),
            ticket,
            Arc::clone(&command.name),
            cancel,
            Arc::clone(&shared.counters.live_returns),
        );
        let span = tracing::debug_span!("command", client = self.client, cmd = %command.name);
        let _entered = span.enter();
        // A panicking handler drops `ret` while unwinding, which answers the client.
        let call =
            std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(request.arguments, ret)));
        if call.is_err() {
            tracing::error!("command handler panicked");
        }
        Some(ticket)
    }

    /// The async capability's rules: an id is required and must not match one in flight.
    /// Returns the id's canonical form for the in-flight index.
    fn async_checks(&self, request: &Request) -> Result<Option<String>, QmpError> {
        if !self.async_mode {
            return Ok(None);
        }
        let Some(id) = &request.id_value else {
            return Err(QmpError::generic(
                "QMP input lacks member 'id', required by capability 'async'",
            ));
        };
        if self.in_flight.is_empty() {
            return Ok(None); // Nothing to clash with; the key is made if the command defers.
        }
        let id_key = id.to_string();
        if self.in_flight.has_id(&id_key) {
            return Err(QmpError::generic(format!(
                "QMP input member 'id' {id_key} is already in use by a command in flight"
            )));
        }
        Ok(Some(id_key))
    }

    fn builtin(
        &mut self,
        builtin: Builtin,
        arguments: Map<String, Value>,
    ) -> Result<Box<RawValue>, QmpError> {
        let value = match builtin {
            Builtin::QmpCapabilities => self.negotiate(arguments),
            Builtin::QueryVersion => {
                no_args(arguments)?;
                return Ok(self.shared.version_json.clone());
            }
            Builtin::QueryCommands => {
                no_args(arguments)?;
                let names = self.shared.registry.commands().filter(|c| c.enabled);
                Ok(Value::Array(
                    names
                        .map(|c| serde_json::json!({ "name": c.name }))
                        .collect(),
                ))
            }
            Builtin::QueryAsyncCommands => {
                no_args(arguments)?;
                Ok(Value::Array(
                    self.in_flight
                        .iter()
                        .map(|(_, entry)| in_flight_info(entry))
                        .collect(),
                ))
            }
            Builtin::AsyncCommandCancel => self.cancel_by_id(arguments),
        }?;
        Ok(serde_json::value::to_raw_value(&value).expect("a Value always serializes"))
    }

    fn negotiate(&mut self, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        if self.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let mut wanted: Vec<&str> = Vec::new();
        if let Some(enable) = arguments.get("enable") {
            let Value::Array(items) = enable else {
                return Err(QmpError::generic(
                    "Invalid parameter type for 'enable', expected: array",
                ));
            };
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(name @ ("oob" | "async")) => wanted.push(name),
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'null' does not accept value '{other}'"
                        )));
                    }
                    None => {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for 'enable[{i}]', expected: string"
                        )));
                    }
                }
            }
        }
        if let Some(other) = arguments.keys().find(|key| *key != "enable") {
            return Err(QmpError::generic(format!(
                "Parameter '{other}' is unexpected"
            )));
        }
        let config = &self.shared.config;
        let mut missing: Vec<&str> = Vec::new();
        for name in &wanted {
            let offered = match *name {
                "oob" => config.offer_oob,
                _ => config.offer_async,
            };
            if !offered && !missing.contains(name) {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                missing.join(", ")
            )));
        }
        self.oob = wanted.contains(&"oob");
        self.async_mode = wanted.contains(&"async");
        self.negotiated = true;
        if config.dialect.events {
            self.events = Some(self.shared.events.subscribe(self.outbox.clone()));
        }
        tracing::debug!(
            client = self.client,
            oob = self.oob,
            r#async = self.async_mode,
            "capabilities negotiated"
        );
        Ok(Value::Object(Map::new()))
    }

    /// `async-command-cancel`: cancels one of this client's own commands. The cancelled
    /// command is answered with an error right away; its handler learns through its token.
    fn cancel_by_id(&mut self, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct CancelArgs {
            id: Value,
        }
        let CancelArgs { id } = crate::args::decode(arguments)?;
        let id_key = id.to_string();
        let found = if self.async_mode {
            self.in_flight.take_by_id(&id_key)
        } else {
            let ticket = self.in_flight.iter().find_map(|(ticket, entry)| {
                let raw = entry.id.as_deref()?;
                let value: Value = serde_json::from_str(raw.get()).ok()?;
                (value == id).then_some(ticket)
            });
            ticket.and_then(|ticket| self.in_flight.take(ticket).map(|entry| (ticket, entry)))
        };
        let Some((ticket, entry)) = found else {
            return Err(QmpError::generic(format!(
                "No command with id {id_key} is in flight"
            )));
        };
        entry.cancel.cancel();
        tracing::debug!(client = self.client, cmd = %entry.command, "command cancelled by the client");
        let error = QmpError::generic(format!("Command {} has been cancelled", entry.command));
        self.write_error(entry.id.as_deref(), &error);
        if self.running == Some(ticket) {
            self.running = None;
        }
        Ok(Value::Object(Map::new()))
    }

    fn write_result(&mut self, id: Option<&RawValue>, result: Result<Box<RawValue>, QmpError>) {
        match result {
            Ok(raw) => {
                encode::success(
                    &mut self.out,
                    &raw,
                    id,
                    self.shared.config.dialect.line_ending,
                );
            }
            Err(error) => self.write_error(id, &error),
        }
    }

    fn write_error(&mut self, id: Option<&RawValue>, error: &QmpError) {
        encode::error(
            &mut self.out,
            error,
            id,
            self.shared.config.dialect.line_ending,
        );
    }

    fn write_greeting(&mut self) {
        let config = &self.shared.config;
        let mut capabilities = Vec::new();
        if config.offer_oob {
            capabilities.push("\"oob\"");
        }
        if config.offer_async {
            capabilities.push("\"async\"");
        }
        let greeting = format!(
            r#"{{"QMP": {{"version": {}, "capabilities": [{}]}}}}"#,
            config.version.to_qemu_json(),
            capabilities.join(", ")
        );
        self.out.extend_from_slice(greeting.as_bytes());
        self.out
            .extend_from_slice(config.dialect.line_ending.as_bytes());
    }
}

/// Checks that a built-in taking no arguments got none, without a serde round trip.
fn no_args(arguments: Map<String, Value>) -> Result<(), QmpError> {
    if arguments.is_empty() {
        return Ok(());
    }
    crate::args::decode::<crate::args::NoArgs>(arguments).map(drop)
}

/// One row of `query-async-commands`.
fn in_flight_info(entry: &crate::in_flight::Entry) -> Value {
    let id = entry
        .id
        .as_deref()
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    let mut row = Map::new();
    if let Some(id) = id {
        row.insert("id".into(), id);
    }
    row.insert("command".into(), Value::String(entry.command.to_string()));
    row.insert(
        "elapsed-ms".into(),
        Value::from(entry.started.elapsed().as_millis() as u64),
    );
    row.insert("oob".into(), Value::Bool(entry.oob));
    Value::Object(row)
}
