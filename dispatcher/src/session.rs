//! One client's protocol state machine: negotiation, capabilities, the legacy in-band
//! backlog, the in-flight table, and the rule that says whether it takes more input.
//!
//! Sans-IO: decoded [`Frame`]s and outbox messages go in, [`Message`]s come out of
//! [`Session::next_output`]. The connection owns the bytes; every protocol rule is here and
//! can be tested without a socket (see the tests at the end).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::time::DelayQueue;

use crate::config::{LEGACY_QUEUE_LEN, OOB_RESERVE};
use crate::context::{Capabilities, ClientInfo, RequestContext};
use crate::error::QmpError;
use crate::events::Subscription;
use crate::fd::{self, positional::PositionalFds};
use crate::in_flight::{self, InFlight, NewEntry};
use crate::job::table::JobTable;
use crate::job::{JobStatus, JobVerb};
use crate::observe;
use crate::qmp_return::{Completion, Outcome, Outgoing, QmpReturn, Settlement, Ticket};
use crate::rate::RateLimits;
use crate::registry::{Builtin, CommandId, Dispatcher, Registry};
use crate::server::Shared;
use crate::wire::request::{self, Request, RequestError};
use crate::wire::{Frame, Id, Message, canonical_key};

/// Input that became a request, or the error reply of input that could not (errors keep
/// their place in a legacy client's line).
enum Input {
    Request(Request),
    Reject(RequestError),
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    /// Log and span field naming this client.
    client: u64,
    /// What handlers learn about this client.
    info: Arc<ClientInfo>,
    /// False until `qmp_capabilities` succeeds (always true without negotiation).
    negotiated: bool,
    oob: bool,
    async_mode: bool,
    in_flight: InFlight,
    /// Legacy clients: in-band input read but not started (QEMU's request queue), each with
    /// the stream offset where its frame ended.
    backlog: VecDeque<(Input, u64)>,
    /// Legacy clients: the in-band command executing now; nothing else in-band starts until
    /// it replies.
    running: Option<Ticket>,
    /// Async clients at their in-flight cap or retained budget: the one request read ahead,
    /// waiting for room. Requests that need no room still run meanwhile.
    lookahead: Option<(Request, u64)>,
    /// Messages for the client, in the order they must be written.
    output: VecDeque<Message>,
    /// The connection's outbox: handlers' replies and events arrive through it, in order.
    /// Dropped on close, so the outbox closes once no handler holds a return any more.
    outbox: Option<mpsc::UnboundedSender<Outgoing>>,
    /// Events flow into the outbox while this is held: from negotiation to disconnect.
    events: Option<Subscription>,
    /// Events were lost because this client fell behind; the connection must end.
    lagged: bool,
    /// The client's command rate limits, when the server sets any.
    rate: Option<RateLimits>,
    /// When each command with a timeout is cancelled, unless it ends first.
    /// Made on the first deadline: an empty queue's timer wheel is kilobytes, and most
    /// clients never have a command with a deadline.
    deadlines: Option<Box<DelayQueue<Ticket>>>,
    /// `query-version`'s reply, this session's own copy: sharing one allocation among all
    /// connections would bounce its reference count between cores on every reply.
    version_json: Bytes,
    /// Fds received and not yet claimed, at their stream positions (see `fd::positional`).
    fds: PositionalFds,
    /// How far the decoder has processed the input: a stream offset.
    reached: u64,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<Shared>,
        info: Arc<ClientInfo>,
        outbox: mpsc::UnboundedSender<Outgoing>,
    ) -> Self {
        let dialect = shared.config.dialect;
        info.fds
            .set_limit(shared.config.fd_limits.named_per_connection);
        let mut session = Session {
            client: info.id(),
            info,
            negotiated: !dialect.negotiation,
            oob: false,
            async_mode: false,
            in_flight: InFlight::new(Arc::clone(&shared.counters.in_flight)),
            backlog: VecDeque::new(),
            running: None,
            lookahead: None,
            output: VecDeque::new(),
            outbox: Some(outbox),
            events: None,
            lagged: false,
            deadlines: None,
            rate: RateLimits::configured(&shared.config).then(RateLimits::default),
            version_json: Bytes::copy_from_slice(&shared.version_json),
            fds: PositionalFds::new(
                shared.config.fd_limits.pending_per_connection,
                shared.config.fd_limits.per_message,
            ),
            reached: 0,
            shared,
        };
        if dialect.greeting {
            let greeting = session.shared.greeting.clone();
            session.output.push_back(Message::Greeting(greeting));
        }
        if session.negotiated {
            session.subscribe();
        }
        session
    }

    /// Whether the session takes another frame: QEMU's monitor suspension for legacy
    /// clients; for async clients, one frame of lookahead beyond the in-flight cap and the
    /// retained budget, so control commands still run there.
    pub(crate) fn wants_input(&self) -> bool {
        if self.rate_paused_until().is_some() {
            return false;
        }
        if self.async_mode {
            return self.lookahead.is_none();
        }
        // Also bounds deferred exec-oob commands of legacy clients.
        if !self.has_room(false) {
            return false;
        }
        if self.oob {
            self.backlog.len() < LEGACY_QUEUE_LEN
        } else {
            self.running.is_none() && self.backlog.is_empty()
        }
    }

    /// True while some request still owes a reply.
    pub(crate) fn has_pending(&self) -> bool {
        !self.in_flight.is_empty()
            || !self.backlog.is_empty()
            || self.running.is_some()
            || self.lookahead.is_some()
    }

    /// True once events were lost because the client did not keep up; the connection ends.
    pub(crate) fn is_lagged(&self) -> bool {
        self.lagged
    }

    /// Bytes of ids the in-flight table holds.
    pub(crate) fn retained(&self) -> usize {
        self.in_flight.retained()
    }

    /// The next message for the client, in order.
    pub(crate) fn next_output(&mut self) -> Option<Message> {
        self.output.pop_front()
    }

    /// Handles one decoded input frame without a stream position (no fds are passed).
    #[cfg(test)]
    pub(crate) fn on_frame(&mut self, frame: Frame) {
        self.on_frame_at(frame, self.reached);
    }

    /// Fds arrived with the input byte at stream offset `position`.
    pub(crate) fn on_fds(&mut self, position: u64, fds: Vec<OwnedFd>, truncated: bool) {
        self.fds.arrive(position, fds, truncated);
    }

    /// The decoder has scanned the input up to stream offset `position` without finding
    /// another frame.
    pub(crate) fn on_reached(&mut self, position: u64) {
        self.reached = self.reached.max(position);
        self.reach_idle();
    }

    /// Fds that arrived before the decoder's position join the pending slot, unless input
    /// decoded before them has not started yet: then they wait for it (`execute`).
    fn reach_idle(&mut self) {
        if self.backlog.is_empty() && self.lookahead.is_none() {
            self.fds.reach(self.reached);
        }
    }

    /// Handles one decoded input frame, which ended at stream offset `end`.
    pub(crate) fn on_frame_at(&mut self, frame: Frame, end: u64) {
        self.reached = self.reached.max(end);
        let (input, out_of_band) = match frame {
            Frame::Error(desc) => (
                Input::Reject(RequestError {
                    id: None,
                    error: QmpError::generic(desc),
                }),
                false,
            ),
            Frame::Value(parsed) => {
                let out_of_band = request::is_oob_keyed(&parsed.value);
                match request::parse(parsed, self.oob) {
                    Ok(request) => (Input::Request(request), out_of_band),
                    Err(rejected) => (Input::Reject(rejected), out_of_band),
                }
            }
            Frame::Request(envelope) => {
                let out_of_band = envelope.exec_oob;
                match request::from_envelope(envelope, self.oob) {
                    Ok(request) => (Input::Request(request), out_of_band),
                    Err(rejected) => (Input::Reject(rejected), out_of_band),
                }
            }
        };
        if self.async_mode {
            self.admit(input, end);
        } else if out_of_band {
            // Out of stream order: it sees the slot as it is, and moves nothing into it
            // (no command that takes fds allows exec-oob).
            self.execute(input, None, false);
        } else {
            self.backlog.push_back((input, end));
        }
        self.advance();
    }

    /// Handles whatever arrived in the outbox.
    pub(crate) fn on_outgoing(&mut self, message: Outgoing) {
        match message {
            Outgoing::Completion(completion) => self.on_completion(completion),
            Outgoing::Event(line) => {
                if let Some(subscription) = &self.events {
                    subscription.delivered();
                    self.output.push_back(Message::Event(line));
                }
            }
            Outgoing::Lagged => self.lagged = true,
        }
        self.advance();
    }

    /// While the client is over its rate limit: when reading may resume.
    pub(crate) fn rate_paused_until(&self) -> Option<tokio::time::Instant> {
        self.rate.as_ref().and_then(RateLimits::paused_until)
    }

    /// True while some command in flight has a deadline.
    pub(crate) fn has_deadlines(&self) -> bool {
        self.deadlines
            .as_ref()
            .is_some_and(|queue| !queue.is_empty())
    }

    /// Resolves with the next command whose deadline passed; pending while none has.
    pub(crate) fn poll_deadline(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Ticket> {
        let Some(deadlines) = &mut self.deadlines else {
            return Poll::Pending;
        };
        match deadlines.poll_expired(cx) {
            Poll::Ready(Some(expired)) => Poll::Ready(expired.into_inner()),
            _ => Poll::Pending,
        }
    }

    /// A command's deadline passed: it is cancelled as `async-command-cancel` cancels it,
    /// and its client told so (unless a reply was committed first: then that reply stands).
    pub(crate) fn on_deadline(&mut self, ticket: Ticket) {
        let won = self
            .in_flight
            .get(ticket)
            .is_some_and(|entry| entry.settlement.cancel());
        let Some(mut entry) = won.then(|| self.in_flight.take(ticket)).flatten() else {
            return;
        };
        entry.deadline = None; // Expired: no longer in the queue.
        entry.settlement.stop();
        let command = record_end(
            &self.info,
            &self.shared.registry,
            &entry,
            observe::Outcome::TimedOut,
            None,
        );
        let after = self
            .shared
            .config
            .timeout_for(&command.name)
            .unwrap_or_default();
        let desc = format!(
            "Command {} timed out after {} ms",
            command.name,
            after.as_millis()
        );
        tracing::debug!(client = self.client, cmd = %command.name, "command timed out");
        self.push_error(entry.id, QmpError::generic(desc));
        self.left_in_flight(ticket);
        self.advance();
    }

    /// The client is gone or the server stops: cancel everything it had in flight.
    pub(crate) fn close(&mut self) {
        let cancelled = self.in_flight.len();
        self.deadlines = None;
        let (info, registry) = (&self.info, &self.shared.registry);
        self.in_flight.cancel_all(|entry| {
            record_end(info, registry, entry, observe::Outcome::Abandoned, None);
        });
        self.backlog.clear();
        self.lookahead = None;
        // Fds close with the connection: pending ones as in QEMU, named ones by this
        // server's choice (they belong to the connection; see `fd::named`).
        self.fds.clear();
        self.info.fds.clear();
        self.running = None;
        self.events = None;
        self.outbox = None;
        if cancelled > 0 {
            tracing::debug!(
                client = self.client,
                cancelled,
                "cancelled in-flight commands of a departed client"
            );
        }
    }

    /// A handler's reply.
    fn on_completion(&mut self, completion: Completion) {
        let Some(entry) = self.in_flight.take(completion.ticket) else {
            return; // Cancelled: the reply has nobody to go to.
        };
        self.forget_deadline(&entry);
        let (outcome, error) = match &completion.outcome {
            Outcome::Return(_) => (observe::Outcome::Ok, None),
            Outcome::Error(error) => (observe::Outcome::Error, Some(error)),
        };
        let command = record_end(&self.info, &self.shared.registry, &entry, outcome, error);
        match completion.outcome {
            Outcome::Return(_) if entry.silent_success => {}
            Outcome::Return(value) => self.output.push_back(Message::Return {
                command: Some(Arc::clone(&command.name)),
                id: entry.id,
                value: json_bytes(value),
            }),
            Outcome::Error(error) => self.push_error(entry.id, error),
        }
        self.left_in_flight(completion.ticket);
    }

    fn forget_deadline(&mut self, entry: &in_flight::Entry) {
        if let Some(key) = &entry.deadline {
            if let Some(deadlines) = &mut self.deadlines {
                deadlines.try_remove(key);
            }
        }
    }

    /// A command left the in-flight table; [`advance`](Self::advance) then starts what
    /// waited for it.
    fn left_in_flight(&mut self, ticket: Ticket) {
        if self.running == Some(ticket) {
            self.running = None;
        }
    }

    /// Starts whatever may start now: queued in-band work of a legacy client while nothing
    /// in-band runs, and an async client's lookahead once there is room. Called at the end
    /// of every input, so replies already produced keep their order.
    fn advance(&mut self) {
        while self.running.is_none() {
            let Some((input, end)) = self.backlog.pop_front() else {
                break;
            };
            self.execute(input, Some(end), true);
        }
        let room = self
            .lookahead
            .as_ref()
            .is_some_and(|(r, _)| self.has_room(r.oob));
        if room {
            let (request, end) = self.lookahead.take().expect("checked above");
            self.execute(Input::Request(request), Some(end), false);
        }
        self.reach_idle();
    }

    /// Whether the in-flight table has room for one more command: below the cap (plus
    /// [`OOB_RESERVE`] for `exec-oob`) and within the retained budget. An empty table always
    /// has room, so no single request that QEMU accepts is refused.
    fn has_room(&self, oob: bool) -> bool {
        let config = &self.shared.config;
        let cap = config.max_in_flight + if oob { OOB_RESERVE } else { 0 };
        self.in_flight.is_empty()
            || (self.in_flight.len() < cap && self.in_flight.retained() < config.max_retained)
    }

    /// Async clients: run now what has room or needs none; keep the rest as the lookahead.
    fn admit(&mut self, input: Input, end: u64) {
        if let Input::Request(request) = &input {
            // Room first: it is the cheap test, and the common answer.
            if !self.has_room(request.oob) && self.may_enter_in_flight(request) {
                let Input::Request(request) = input else {
                    unreachable!()
                };
                self.lookahead = Some((request, end));
                return;
            }
        }
        self.execute(input, Some(end), false);
    }

    /// Whether dispatching `request` could add to the in-flight table: it names a command
    /// with a handler. Built-ins and requests rejected before dispatch answer at once.
    fn may_enter_in_flight(&self, request: &Request) -> bool {
        self.negotiated
            && self
                .shared
                .registry
                .get(&request.command)
                .is_some_and(|command| matches!(command.kind, Dispatcher::Handler(_)))
    }

    /// Runs `input`. `at` is where its frame ended, for input run in stream order: fds that
    /// arrived before it join the slot first, so it sees what QEMU would show it.
    fn execute(&mut self, input: Input, at: Option<u64>, in_band: bool) {
        if let Some(end) = at {
            self.fds.reach(end);
        }
        let request = match input {
            Input::Request(request) => request,
            Input::Reject(rejected) => return self.push_error(rejected.id, rejected.error),
        };
        let ticket = self.dispatch(request);
        if in_band && !self.async_mode {
            self.running = ticket;
        }
    }

    /// Looks the command up and starts it; returns the ticket when a handler now owes a
    /// reply (built-ins and rejections answer at once).
    fn dispatch(&mut self, request: Request) -> Option<Ticket> {
        let Request {
            command: name,
            oob,
            arguments,
            id,
            ..
        } = request;
        if let Some(rate) = &mut self.rate {
            rate.record(&self.shared.config, &name);
        }
        if !self.negotiated && name != "qmp_capabilities" {
            let error = QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return self.refuse(id, &name, error);
        }
        if let Err(error) = self.async_checks(id.as_ref()) {
            return self.refuse(id, &name, error);
        }
        let offered = self.info.policy().allows_command(&name);
        let Some((command_id, command)) = self.shared.registry.lookup(&name).filter(|_| offered)
        else {
            let error =
                QmpError::command_not_found(format!("The command {name} has not been found"));
            return self.refuse(id, &name, error);
        };
        if let Some(reason) = command.disabled() {
            let desc = match reason {
                Some(reason) => format!("Command {name} has been disabled: {reason}"),
                None => format!("Command {name} has been disabled"),
            };
            return self.refuse(id, &name, QmpError::command_not_found(desc));
        }
        if oob && !command.allow_oob {
            let error = QmpError::generic(format!("The command {name} does not support OOB"));
            return self.refuse(id, &name, error);
        }
        match &command.kind {
            Dispatcher::Builtin(builtin) => {
                let builtin = *builtin;
                self.answer_builtin(command_id, builtin, id, arguments);
                None
            }
            Dispatcher::Handler(_) => Some(self.start_handler(command_id, id, oob, arguments)),
        }
    }

    /// Runs a built-in command and queues its answer.
    fn answer_builtin(
        &mut self,
        command_id: CommandId,
        builtin: Builtin,
        id: Option<Id>,
        arguments: Map<String, Value>,
    ) {
        let result = self.builtin(builtin, arguments);
        let command = self.shared.registry.command(command_id);
        let (outcome, error) = match &result {
            Ok(_) => (observe::Outcome::Ok, None),
            Err(error) => (observe::Outcome::Error, Some(error)),
        };
        let metrics = Some(command.metrics());
        observe::command_finished(&self.info, &command.name, metrics, None, outcome, error);
        match result {
            Ok(value) => self.output.push_back(Message::Return {
                command: None,
                id,
                value,
            }),
            Err(error) => self.push_error(id, error),
        }
    }

    /// Records a handler's request in flight and calls the handler with its return.
    fn start_handler(
        &mut self,
        command_id: CommandId,
        id: Option<Id>,
        oob: bool,
        arguments: Map<String, Value>,
    ) -> Ticket {
        // Borrowed field by field: the registry lives in `shared`, the table in `in_flight`.
        let shared = &self.shared;
        let command = shared.registry.command(command_id);
        let Dispatcher::Handler(handler) = &command.kind else {
            unreachable!("start_handler is called for handlers only");
        };
        let settlement = Settlement::default();
        let ticket = self.in_flight.insert(NewEntry {
            id,
            command: command_id,
            settlement: settlement.clone(),
            oob,
            silent_success: command.silent_success,
            indexed: self.async_mode,
        });
        if let Some(after) = shared.config.timeout_for(&command.name) {
            let deadlines = self.deadlines.get_or_insert_with(Default::default);
            let key = deadlines.insert(ticket, after);
            if let Some(entry) = self.in_flight.get_mut(ticket) {
                entry.deadline = Some(key);
            }
        }
        let outbox = self
            .outbox
            .clone()
            .expect("a closed session dispatches nothing");
        let request = RequestContext::new(
            Arc::clone(&self.info),
            Arc::clone(shared),
            command_id,
            settlement.clone(),
        );
        let ret = QmpReturn::new(outbox, ticket, command_id, settlement, Arc::clone(shared));
        let span = tracing::debug_span!("command", client = self.client, cmd = %command.name);
        let _entered = span.enter();
        // A panicking handler drops `ret` while unwinding, which answers the client.
        let call =
            std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(arguments, request, ret)));
        if call.is_err() {
            tracing::error!("command handler panicked");
        }
        ticket
    }

    /// Answers a request refused before it ran, and records it.
    fn refuse(&mut self, id: Option<Id>, name: &str, error: QmpError) -> Option<Ticket> {
        let outcome = observe::Outcome::Refused;
        let metrics = self.shared.registry.metrics_of(name);
        observe::command_finished(&self.info, name, metrics, None, outcome, Some(&error));
        self.push_error(id, error);
        None
    }

    /// The async capability's rules: an id is required and must not match one in flight.
    fn async_checks(&self, id: Option<&Id>) -> Result<(), QmpError> {
        if !self.async_mode {
            return Ok(());
        }
        let Some(id) = id else {
            return Err(QmpError::generic(
                "QMP input lacks member 'id', required by capability 'async'",
            ));
        };
        if self.in_flight.has_id(id.key()) {
            return Err(QmpError::generic(format!(
                "QMP input member 'id' {} is already in use by a command in flight",
                id.key()
            )));
        }
        Ok(())
    }

    fn builtin(
        &mut self,
        builtin: Builtin,
        arguments: Map<String, Value>,
    ) -> Result<Bytes, QmpError> {
        let value = match builtin {
            Builtin::QmpCapabilities => self.negotiate(arguments)?,
            Builtin::QueryVersion => {
                no_args(arguments)?;
                return Ok(self.version_json.clone());
            }
            Builtin::QueryCommands => {
                no_args(arguments)?;
                let policy = self.info.policy();
                let names = self
                    .shared
                    .registry
                    .commands()
                    .filter(|c| c.enabled && policy.allows_command(c.name));
                Value::Array(
                    names
                        .map(|c| serde_json::json!({ "name": c.name }))
                        .collect(),
                )
            }
            Builtin::QueryQmpSchema => {
                no_args(arguments)?;
                return Ok(self.info.policy().schema_json(&self.shared.registry));
            }
            Builtin::QueryAsyncCommands => {
                no_args(arguments)?;
                let rows: Vec<InFlightRow<'_>> = self
                    .in_flight
                    .iter()
                    .map(|(_, e)| row(e, &self.shared.registry))
                    .collect();
                return Ok(Bytes::from(
                    serde_json::to_vec(&rows).expect("rows serialize"),
                ));
            }
            Builtin::AsyncCommandCancel => self.cancel_by_id(arguments)?,
            Builtin::GetFd => {
                fd::commands::getfd(&mut self.fds, &self.info.fds, arguments)?;
                Value::Object(Map::new())
            }
            Builtin::CloseFd => {
                fd::commands::closefd(&self.info.fds, arguments)?;
                Value::Object(Map::new())
            }
            Builtin::AddFd => {
                let info = fd::commands::add_fd(&mut self.fds, &self.shared.fdsets, arguments)?;
                return Ok(Bytes::from(serde_json::to_vec(&info).expect("serializes")));
            }
            Builtin::RemoveFd => {
                fd::commands::remove_fd(&self.shared.fdsets, arguments)?;
                Value::Object(Map::new())
            }
            Builtin::QueryFdsets => {
                let sets = fd::commands::query_fdsets(&self.shared.fdsets, arguments)?;
                return Ok(Bytes::from(serde_json::to_vec(&sets).expect("serializes")));
            }
            Builtin::QueryJobs => {
                no_args(arguments)?;
                return Ok(Bytes::from(
                    serde_json::to_vec(&self.shared.jobs.query()).expect("rows serialize"),
                ));
            }
            Builtin::JobVerb(verb) => {
                job_verb(&self.shared.jobs, verb, arguments)?;
                Value::Object(Map::new())
            }
        };
        Ok(Bytes::from(
            serde_json::to_vec(&value).expect("a Value always serializes"),
        ))
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
        self.info.set_capabilities(Capabilities {
            oob: self.oob,
            r#async: self.async_mode,
        });
        self.negotiated = true;
        self.subscribe();
        tracing::debug!(
            client = self.client,
            oob = self.oob,
            r#async = self.async_mode,
            "capabilities negotiated"
        );
        Ok(Value::Object(Map::new()))
    }

    /// Events start flowing to this client, if the dialect has events.
    fn subscribe(&mut self) {
        if let (true, Some(outbox)) = (self.shared.config.dialect.events, &self.outbox) {
            let policy = self.info.policy();
            let filter = (!policy.is_full()).then(|| policy.clone());
            self.events = Some(self.shared.events.subscribe(outbox.clone(), filter));
        }
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
        let id_key = canonical_key(&id);
        // A reply committed first (`ok_unless_cancelled`) wins: it is on its way, so the
        // command counts as replied already.
        let won = self.in_flight.find_by_id(&id_key).filter(|&ticket| {
            self.in_flight
                .get(ticket)
                .is_some_and(|entry| entry.settlement.cancel())
        });
        let taken = won.and_then(|ticket| Some((ticket, self.in_flight.take(ticket)?)));
        let Some((ticket, entry)) = taken else {
            return Err(QmpError::generic(format!(
                "No command with id {id_key} is in flight"
            )));
        };
        entry.settlement.stop();
        self.forget_deadline(&entry);
        let outcome = observe::Outcome::Cancelled;
        let command = record_end(&self.info, &self.shared.registry, &entry, outcome, None);
        tracing::debug!(client = self.client, cmd = %command.name, "command cancelled by the client");
        let error = QmpError::generic(format!("Command {} has been cancelled", command.name));
        self.push_error(entry.id, error);
        self.left_in_flight(ticket);
        Ok(Value::Object(Map::new()))
    }

    fn push_error(&mut self, id: Option<Id>, error: QmpError) {
        self.output.push_back(Message::Error { id, error });
    }
}

/// A handler's JSON text as shared bytes, without copying it.
fn json_bytes(value: Box<RawValue>) -> Bytes {
    let text: Box<str> = value.into();
    Bytes::from(text.into_boxed_bytes())
}

/// Checks that a built-in taking no arguments got none, without a serde round trip.
fn no_args(arguments: Map<String, Value>) -> Result<(), QmpError> {
    if arguments.is_empty() {
        return Ok(());
    }
    crate::args::decode::<crate::args::NoArgs>(arguments).map(drop)
}

/// `job-pause`, `job-resume`, `job-cancel`, `job-complete`, `job-finalize`, `job-dismiss`:
/// `{"id": ID}` names a job of the server's table, whichever client started it.
fn job_verb(jobs: &JobTable, verb: JobVerb, arguments: Map<String, Value>) -> Result<(), QmpError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct JobIdArgs {
        id: String,
    }
    let JobIdArgs { id } = crate::args::decode(arguments)?;
    let job = jobs.find(&id)?;
    match verb {
        JobVerb::Pause => job.pause(),
        JobVerb::Resume => job.resume(),
        JobVerb::Cancel => job.cancel(),
        JobVerb::Complete => job.complete(),
        JobVerb::Finalize => job.finalize(),
        JobVerb::Dismiss => job.dismiss(),
        JobVerb::SetSpeed | JobVerb::Change => unreachable!("no built-in for {verb}"),
    }
}

/// One row of `query-async-commands`. The id is the request's own text, so any id the
/// client could send can be listed. `status` and the progress come from the request's
/// tracking core, the one a job has: the same fields as in `query-jobs`.
#[derive(serde::Serialize)]
struct InFlightRow<'a> {
    command: &'a str,
    #[serde(rename = "elapsed-ms")]
    elapsed_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Box<RawValue>>,
    oob: bool,
    status: JobStatus,
    #[serde(rename = "current-progress", skip_serializing_if = "Option::is_none")]
    current_progress: Option<u64>,
    #[serde(rename = "total-progress", skip_serializing_if = "Option::is_none")]
    total_progress: Option<u64>,
}

/// Records the end of a request that was in flight (its counter, latency and audit line);
/// returns its command.
fn record_end<'r>(
    client: &ClientInfo,
    registry: &'r Registry,
    entry: &in_flight::Entry,
    outcome: observe::Outcome,
    error: Option<&QmpError>,
) -> &'r crate::registry::Entry {
    let command = registry.command(entry.command);
    let metrics = Some(command.metrics());
    observe::command_finished(
        client,
        &command.name,
        metrics,
        Some(entry.started),
        outcome,
        error,
    );
    command
}

fn row<'a>(entry: &'a in_flight::Entry, registry: &'a Registry) -> InFlightRow<'a> {
    let core = entry.settlement.core();
    let progress = core.reported_progress();
    InFlightRow {
        command: &registry.command(entry.command).name,
        elapsed_ms: entry.started.elapsed().as_millis() as u64,
        id: entry.id.as_ref().map(Id::to_raw_value),
        oob: entry.oob,
        status: core.status(),
        current_progress: progress.map(|(current, _)| current),
        total_progress: progress.map(|(_, total)| total),
    }
}

/// The session's rules, driven synchronously without sockets: frames in, messages out.
#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::tests_support::*;
    use crate::qmp_return::QmpReturn;

    fn error(id: Option<Value>, desc: &str) -> Value {
        let mut reply = json!({"error": {"class": "GenericError", "desc": desc}});
        if let Some(id) = id {
            reply["id"] = id;
        }
        reply
    }

    #[test]
    fn negotiation_comes_first_and_once() {
        let mut h = Harness::new(|b| b);
        h.send(&json!({"execute": "echo", "id": 1}));
        assert_eq!(
            h.output(),
            [json!({"id": 1, "error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})]
        );
        h.send(&json!({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}));
        assert_eq!(
            h.output(),
            [error(
                None,
                "Parameter 'null' does not accept value 'bogus'"
            )]
        );
        h.send(&json!({"execute": "qmp_capabilities"}));
        h.send(&json!({"execute": "qmp_capabilities"}));
        assert_eq!(
            h.output(),
            [
                json!({"return": {}}),
                json!({"error": {"class": "CommandNotFound",
                    "desc": "Capabilities negotiation is already complete, command ignored"}})
            ]
        );
    }

    #[test]
    fn a_legacy_client_is_suspended_while_its_command_runs() {
        let mut h = Harness::negotiated(&[], |b| b);
        let rest = h.feed(r#"{"execute":"park","id":1}{"execute":"echo","id":2}"#);
        assert!(
            rest > 0,
            "the second request is not decoded while the first runs"
        );
        assert!(!h.session.wants_input());
        assert_eq!(h.output(), Vec::<Value>::new());
        h.release(0, json!("one"));
        assert_eq!(h.output(), [json!({"return": "one", "id": 1})]);
        assert!(h.session.wants_input());
        h.feed(r#"{"execute":"echo","id":2}"#);
        assert_eq!(h.output(), [json!({"return": {}, "id": 2})]);
    }

    #[test]
    fn legacy_oob_queues_eight_and_exec_oob_overtakes() {
        let mut h = Harness::negotiated(&["oob"], |b| b);
        for i in 0..9 {
            h.send(&json!({"execute": "park", "id": i}));
        }
        // One running, eight queued: QEMU's queue is full.
        assert!(!h.session.wants_input());
        assert_eq!(h.parked.lock().unwrap().len(), 1);
        h.release(0, json!(0));
        assert_eq!(h.output(), [json!({"return": 0, "id": 0})]);
        assert_eq!(h.parked.lock().unwrap().len(), 1, "the next one started");
        assert!(h.session.wants_input());
    }

    #[test]
    fn async_ids_are_required_and_unique_by_canonical_key() {
        let mut h = Harness::negotiated(&["async"], |b| b);
        h.send(&json!({"execute": "echo"}));
        assert_eq!(
            h.output(),
            [error(
                None,
                "QMP input lacks member 'id', required by capability 'async'"
            )]
        );
        h.feed(r#"{"execute":"park","id":{"a":1,"b":[2]}}"#);
        h.feed(r#"{"execute":"park","id":{ "b" : [2], "a" : 1 }}"#);
        let out = h.output();
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0]["error"]["desc"],
            r#"QMP input member 'id' {"a":1,"b":[2]} is already in use by a command in flight"#
        );
        h.release(0, json!("done"));
        assert_eq!(
            h.output(),
            [json!({"return": "done", "id": {"a": 1, "b": [2]}})]
        );
    }

    #[test]
    fn cancel_answers_the_command_and_discards_its_late_reply() {
        let mut h = Harness::negotiated(&["async"], |b| b);
        h.send(&json!({"execute": "park", "id": "a"}));
        h.send(&json!({"execute": "async-command-cancel", "arguments": {"id": "a"}, "id": "c"}));
        assert_eq!(
            h.output(),
            [
                error(Some(json!("a")), "Command park has been cancelled"),
                json!({"return": {}, "id": "c"})
            ]
        );
        assert!(h.parked.lock().unwrap()[0].is_cancelled());
        h.release(0, json!("late"));
        assert_eq!(
            h.output(),
            Vec::<Value>::new(),
            "a cancelled reply goes nowhere"
        );
        h.send(&json!({"execute": "async-command-cancel", "arguments": {"id": "a"}, "id": "d"}));
        assert_eq!(
            h.output(),
            [error(
                Some(json!("d")),
                "No command with id \"a\" is in flight"
            )]
        );
    }

    #[test]
    fn at_the_cap_control_commands_run_and_one_request_waits() {
        let mut h = Harness::negotiated(&["async", "oob"], |b| b.max_in_flight(2));
        h.send(&json!({"execute": "park", "id": 1}));
        h.send(&json!({"execute": "park", "id": 2}));
        assert!(h.session.wants_input(), "one frame of lookahead at the cap");
        h.send(&json!({"execute": "query-async-commands", "id": "q"}));
        let listing = h.output();
        assert_eq!(listing[0]["id"], "q");
        assert_eq!(listing[0]["return"].as_array().unwrap().len(), 2);
        h.send(&json!({"exec-oob": "echo", "id": "oob"}));
        assert_eq!(h.output(), [json!({"return": {}, "id": "oob"})]);
        // An ordinary request takes the lookahead slot and waits there.
        h.send(&json!({"execute": "park", "id": 3}));
        assert!(!h.session.wants_input());
        assert_eq!(h.parked.lock().unwrap().len(), 2);
        h.release(0, json!(1));
        assert_eq!(h.output(), [json!({"return": 1, "id": 1})]);
        assert_eq!(
            h.parked.lock().unwrap().len(),
            2,
            "the waiting request started"
        );
        assert!(h.session.wants_input());
    }

    #[test]
    fn the_retained_budget_pauses_reading_but_admits_a_lone_big_id() {
        let mut h = Harness::negotiated(&["async"], |b| b.max_retained(64));
        let big = "x".repeat(1000);
        h.send(&json!({"execute": "park", "id": big}));
        assert_eq!(
            h.parked.lock().unwrap().len(),
            1,
            "a lone id is always admitted"
        );
        h.send(&json!({"execute": "park", "id": 2}));
        assert_eq!(
            h.parked.lock().unwrap().len(),
            1,
            "over the budget: it waits"
        );
        assert!(!h.session.wants_input());
        h.release(0, json!(null));
        h.output();
        assert_eq!(h.parked.lock().unwrap().len(), 1, "the waiting one started");
        assert!(h.session.wants_input());
    }

    #[test]
    fn close_cancels_everything_in_flight() {
        let mut h = Harness::negotiated(&["async"], |b| b);
        h.send(&json!({"execute": "park", "id": 1}));
        h.send(&json!({"execute": "park", "id": 2}));
        assert!(h.session.has_pending());
        h.session.close();
        assert!(!h.session.has_pending());
        let parked = h.parked.lock().unwrap();
        assert!(parked.iter().all(QmpReturn::is_cancelled));
        assert!(
            parked
                .iter()
                .all(|ret| ret.cancellation_token().is_cancelled())
        );
        drop(parked);
        h.release(0, json!(1));
        assert_eq!(h.output(), Vec::<Value>::new());
    }

    #[test]
    fn events_flow_only_after_negotiation() {
        let mut h = Harness::new(|b| b);
        h._server.events().emit("EARLY", None);
        assert_eq!(h.output(), Vec::<Value>::new());
        h.send(&json!({"execute": "qmp_capabilities"}));
        h._server.events().emit("STOP", None);
        let out = h.output();
        assert_eq!(out[0], json!({"return": {}}));
        assert_eq!(out[1]["event"], "STOP");
        assert!(out[1]["timestamp"]["seconds"].is_u64());
    }
}

/// A session with a `park` command (deferred, parks its return) and an `echo` command, fed
/// text and read back as JSON.
#[cfg(test)]
mod tests_support {
    use std::sync::Mutex;

    use bytes::BytesMut;
    use serde_json::json;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::wire::{Limits, LineEnding, QmpCodec};
    use crate::{Command, Registry, Server, ServerBuilder};

    /// Returns parked by the `park` command, in arrival order.
    pub(super) type Parked = Arc<Mutex<Vec<QmpReturn>>>;

    pub(super) struct Harness {
        pub(super) session: Session,
        pub(super) outbox: mpsc::UnboundedReceiver<Outgoing>,
        pub(super) codec: QmpCodec,
        pub(super) parked: Parked,
        pub(super) _server: Server,
    }

    impl Harness {
        pub(super) fn new(configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Harness {
            let parked: Parked = Arc::default();
            let keep = Arc::clone(&parked);
            let mut registry = Registry::builder();
            registry
                .add(Command::raw("park", move |_, _, ret: QmpReturn| {
                    keep.lock().unwrap().push(ret)
                }))
                .unwrap()
                .add(
                    Command::raw("echo", |args: Map<String, Value>, _, ret: QmpReturn| {
                        ret.ok(&args)
                    })
                    .allow_oob(),
                )
                .unwrap();
            let server = configure(Server::builder(registry.build())).build();
            let (tx, outbox) = mpsc::unbounded_channel();
            let info = Arc::new(crate::context::ClientInfo::new(
                0,
                None,
                crate::Policy::full(),
            ));
            let session = Session::new(Arc::clone(server.shared()), info, tx);
            let mut harness = Harness {
                session,
                outbox,
                codec: QmpCodec::new(Limits::default(), LineEnding::Lf),
                parked,
                _server: server,
            };
            let greeting = harness.output();
            assert!(greeting[0].get("QMP").is_some(), "{greeting:?}");
            harness
        }

        pub(super) fn negotiated(
            caps: &[&str],
            configure: impl FnOnce(ServerBuilder) -> ServerBuilder,
        ) -> Self {
            let mut harness = Harness::new(configure);
            harness.send(&json!({"execute": "qmp_capabilities", "arguments": {"enable": caps}}));
            assert_eq!(harness.output(), [json!({"return": {}})]);
            harness
        }

        /// Feeds raw input text, frame by frame, as the connection would while the session
        /// wants input; returns how many bytes were left undecoded.
        pub(super) fn feed(&mut self, text: &str) -> usize {
            let mut input = BytesMut::from(text.as_bytes());
            while self.session.wants_input() {
                match self.codec.decode(&mut input).unwrap() {
                    Some(frame) => self.session.on_frame(frame),
                    None => break,
                }
                self.deliver();
            }
            input.len()
        }

        pub(super) fn send(&mut self, request: &Value) {
            assert_eq!(self.feed(&request.to_string()), 0, "not taken: {request}");
        }

        /// Hands every outbox message to the session.
        pub(super) fn deliver(&mut self) {
            while let Ok(message) = self.outbox.try_recv() {
                self.session.on_outgoing(message);
            }
        }

        /// Everything the session has to say now, as JSON values.
        pub(super) fn output(&mut self) -> Vec<Value> {
            self.deliver();
            let mut bytes = BytesMut::new();
            while let Some(message) = self.session.next_output() {
                self.codec.encode(message, &mut bytes).unwrap();
            }
            bytes[..]
                .split(|&b| b == b'\n')
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_slice(line).unwrap())
                .collect()
        }

        /// Everything the session has to say now, as text (for ids serde_json cannot hold).
        pub(super) fn output_text(&mut self) -> String {
            self.deliver();
            let mut bytes = BytesMut::new();
            while let Some(message) = self.session.next_output() {
                self.codec.encode(message, &mut bytes).unwrap();
            }
            String::from_utf8(bytes.to_vec()).unwrap()
        }

        pub(super) fn release(&mut self, index: usize, value: Value) {
            let ret = self.parked.lock().unwrap().remove(index);
            ret.ok(&value);
        }
    }
}

/// Regressions for ids the session once compared through serde_json.
#[cfg(test)]
mod id_regressions {
    use super::tests_support::*;
    use serde_json::json;

    #[test]
    fn a_legacy_cancel_of_minus_zero_finds_the_command() {
        // serde_json read `-0` as `-0.0`, so the key never matched.
        let mut h = Harness::negotiated(&["oob"], |b| b);
        h.feed(r#"{"execute":"park","id":-0}"#);
        h.feed(r#"{"exec-oob":"async-command-cancel","arguments":{"id":-0},"id":"c"}"#);
        let out = h.output();
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0]["error"]["desc"], "Command park has been cancelled");
        assert_eq!(out[1], json!({"return": {}, "id": "c"}));
    }

    #[test]
    fn ids_nested_deeper_than_serde_jsons_limit_are_listed_and_cancellable() {
        let mut h = Harness::negotiated(&["async"], |b| b);
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        h.feed(&format!(r#"{{"execute":"park","id":{deep}}}"#));
        h.feed(r#"{"execute":"query-async-commands","id":"q"}"#);
        let listing = h.output_text();
        assert!(listing.contains(&format!(r#""id":{deep}"#)), "{listing}");
        h.feed(&format!(
            r#"{{"execute":"async-command-cancel","arguments":{{"id":{deep}}},"id":"c"}}"#
        ));
        let out = h.output_text();
        assert!(out.contains("Command park has been cancelled"), "{out}");
    }

    #[test]
    fn overflowing_ids_are_echoed_listed_and_kept_apart() {
        let mut h = Harness::negotiated(&["async"], |b| b);
        h.feed(r#"{"execute":"park","id":1e400}"#);
        h.feed(r#"{"execute":"park","id":2e400}"#);
        assert_eq!(
            h.parked.lock().unwrap().len(),
            2,
            "1e400 and 2e400 are two ids"
        );
        h.feed(r#"{"execute":"query-async-commands","id":"q"}"#);
        let listing = h.output_text();
        assert!(
            listing.contains(r#""id":1e400"#) && listing.contains(r#""id":2e400"#),
            "{listing}"
        );
        h.release(0, json!(1));
        assert!(h.output_text().contains(r#""id": 1e400"#));
    }
}
