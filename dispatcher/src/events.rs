//! Events: emitted from anywhere, timestamped once, broadcast to every negotiated client,
//! optionally rate-limited like QEMU's throttled events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;
use slab::Slab;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::DEFAULT_EVENT_QUEUE;
use crate::policy::Policy;
use crate::qmp_return::Outgoing;
use crate::wire::encode;

/// How one event name is rate-limited.
#[derive(Debug, Clone)]
pub struct Throttle {
    /// At most one event per period (per key); QEMU uses one second.
    pub period: Duration,
    /// A member of `data` whose value separates independent streams (QEMU keys
    /// `VSERPORT_CHANGE` by `id`, `QUORUM_REPORT_BAD` by `node-name`).
    pub key: Option<String>,
}

/// A throttled stream: event name and the value of its key member.
type ThrottleSlot = (String, Option<String>);

/// A handle to emit events; cheap to clone, usable from any thread.
///
/// Every server has one, configured by its builder ([`crate::ServerBuilder::event_queue`],
/// [`crate::ServerBuilder::throttle`]); get it with [`crate::Server::events`]. Handlers
/// built before the server can be given a handle made with [`Events::new`] and passed to
/// [`crate::ServerBuilder::events`]: the builder's settings then apply to that handle.
#[derive(Clone)]
pub struct Events {
    hub: Arc<Hub>,
    /// One slot per throttled (name, key) whose timer is running: the event to send when it
    /// fires, if a newer one arrived meanwhile (only the last survives, as in QEMU).
    pending: Arc<Mutex<HashMap<ThrottleSlot, Option<Bytes>>>>,
    runtime: Option<tokio::runtime::Handle>,
}

/// Where events can be emitted: the server's [`Events`] handle (unchecked), or a request's
/// [`RequestContext`](crate::RequestContext), which checks them against the command's
/// [`emits`](crate::Command::emits) declaration. Code shared between commands and other
/// sources of events (a signal handler, a device) takes `&impl Emit`.
pub trait Emit {
    /// Emits `name` with optional `data` to every negotiated client.
    fn emit(&self, name: &str, data: Option<Value>);

    /// Emits an event whose data is any serializable value.
    fn emit_data<T: Serialize>(&self, name: &str, data: &T)
    where
        Self: Sized,
    {
        self.emit(name, serde_json::to_value(data).ok());
    }
}

impl Emit for Events {
    fn emit(&self, name: &str, data: Option<Value>) {
        Events::emit(self, name, data)
    }
}

/// The negotiated clients events go to. Each event is pushed into every client's outbox, the
/// same FIFO its replies travel through.
struct Hub {
    subscribers: Mutex<Slab<Subscriber>>,
    /// Set once, by the builder of the server that uses this handle.
    settings: OnceLock<EventSettings>,
    /// Events emitted from a command's context that the command did not declare.
    undeclared: AtomicUsize,
}

/// What the server builder decides about events.
#[derive(Debug, Clone)]
pub(crate) struct EventSettings {
    /// Events one client may have queued before it counts as lagging.
    pub(crate) capacity: usize,
    /// Rate limits by event name.
    pub(crate) throttles: HashMap<String, Throttle>,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            capacity: DEFAULT_EVENT_QUEUE,
            throttles: HashMap::new(),
        }
    }
}

struct Subscriber {
    outbox: UnboundedSender<Outgoing>,
    /// The events this client's policy offers; `None` for all.
    filter: Option<Policy>,
    queued: Arc<AtomicUsize>,
    lagged: Arc<AtomicBool>,
}

/// A client's registration for events; unregisters on drop.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    key: usize,
    queued: Arc<AtomicUsize>,
}

impl Subscription {
    /// The connection wrote one event out of its outbox.
    pub(crate) fn delivered(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
    }
}

impl Events {
    /// A handle for a server that is not built yet, for handlers that must emit events
    /// and are made before it; give it to [`crate::ServerBuilder::events`]. Until then it has
    /// no receivers and emitting is a no-op.
    pub fn new() -> Self {
        Events {
            hub: Arc::new(Hub {
                subscribers: Mutex::new(Slab::new()),
                settings: OnceLock::new(),
                undeclared: AtomicUsize::new(0),
            }),
            pending: Arc::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    /// Applies the builder's settings; a handle serves one server's settings only.
    pub(crate) fn configure(&self, settings: EventSettings) {
        if self.hub.settings.set(settings).is_err() {
            tracing::warn!(
                "an Events handle was given to a second server; keeping the first one's settings"
            );
        }
    }

    fn settings(&self) -> &EventSettings {
        static DEFAULT: OnceLock<EventSettings> = OnceLock::new();
        self.hub
            .settings
            .get()
            .unwrap_or_else(|| DEFAULT.get_or_init(EventSettings::default))
    }

    /// Registers a client's outbox for every event from now on (no replay).
    pub(crate) fn subscribe(
        &self,
        outbox: UnboundedSender<Outgoing>,
        filter: Option<Policy>,
    ) -> Subscription {
        let queued = Arc::new(AtomicUsize::new(0));
        let subscriber = Subscriber {
            outbox,
            filter,
            queued: Arc::clone(&queued),
            lagged: Arc::new(AtomicBool::new(false)),
        };
        let key = self
            .hub
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subscriber);
        Subscription {
            hub: Arc::clone(&self.hub),
            key,
            queued,
        }
    }

    /// Emits `{"timestamp": ..., "event": name, "data": data}` to every client that has
    /// completed negotiation. Clients still negotiating never see it, and it is not replayed
    /// to clients that negotiate later.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let mut line = BytesMut::with_capacity(96);
        encode::event(&mut line, name, data.as_ref(), SystemTime::now());
        let line = line.freeze();
        match self.settings().throttles.get(name) {
            None => self.send(name, line),
            Some(throttle) => self.emit_throttled(name, throttle, data.as_ref(), line),
        }
    }

    /// Counts and logs an event a command emitted without declaring it.
    pub(crate) fn flag_undeclared(&self, command: &str, event: &str) {
        self.hub.undeclared.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            command,
            event,
            "a command emitted an event it does not declare (Command::emits)"
        );
    }

    /// How many events commands emitted without declaring them.
    pub(crate) fn undeclared(&self) -> usize {
        self.hub.undeclared.load(Ordering::Relaxed)
    }

    /// Emits an event whose data is any serializable value.
    pub fn emit_data<T: Serialize>(&self, name: &str, data: &T) {
        self.emit(name, serde_json::to_value(data).ok());
    }

    /// The number of clients currently receiving events.
    pub fn receivers(&self) -> usize {
        self.hub
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn send(&self, name: &str, line: Bytes) {
        let subscribers = self
            .hub
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let capacity = self.settings().capacity.max(1);
        let (mut sent, mut dropped) = (0, 0);
        for (_, subscriber) in subscribers.iter() {
            if subscriber
                .filter
                .as_ref()
                .is_some_and(|policy| !policy.allows_event(name))
            {
                continue;
            }
            if subscriber.queued.fetch_add(1, Ordering::Relaxed) >= capacity {
                subscriber.queued.fetch_sub(1, Ordering::Relaxed);
                dropped += 1;
                // Tell the connection once; it disconnects the client rather than hand it an
                // event stream with holes.
                if !subscriber.lagged.swap(true, Ordering::Relaxed) {
                    let _ = subscriber.outbox.send(Outgoing::Lagged);
                }
                continue;
            }
            let _ = subscriber.outbox.send(Outgoing::Event(line.clone()));
            sent += 1;
        }
        drop(subscribers);
        crate::observe::event_fanned_out(sent, dropped);
    }

    fn emit_throttled(&self, name: &str, throttle: &Throttle, data: Option<&Value>, line: Bytes) {
        let key_value = throttle
            .key
            .as_ref()
            .and_then(|member| data?.get(member))
            .map(Value::to_string);
        let slot = (name.to_string(), key_value);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = pending.get_mut(&slot) {
            *waiting = Some(line);
            return;
        }
        let Some(runtime) = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
        else {
            // No runtime to run the timer on: send unthrottled rather than lose the event.
            drop(pending);
            return self.send(name, line);
        };
        pending.insert(slot.clone(), None);
        drop(pending);
        self.send(name, line);
        let this = self.clone();
        let period = throttle.period;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let mut pending = this.pending.lock().unwrap_or_else(|e| e.into_inner());
                match pending.get_mut(&slot).and_then(Option::take) {
                    Some(line) => {
                        drop(pending);
                        this.send(&slot.0, line);
                    }
                    None => {
                        pending.remove(&slot);
                        return;
                    }
                }
            }
        });
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("receivers", &self.receivers())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_name(message: Outgoing) -> (String, Value) {
        let Outgoing::Event(line) = message else {
            panic!("not an event: {message:?}")
        };
        let v: Value = serde_json::from_slice(&line).unwrap();
        (v["event"].as_str().unwrap().to_string(), v["data"].clone())
    }

    #[tokio::test(start_paused = true)]
    async fn throttled_events_keep_only_the_last_per_period() {
        let mut throttles = HashMap::new();
        throttles.insert(
            "RTC_CHANGE".to_string(),
            Throttle {
                period: Duration::from_secs(1),
                key: None,
            },
        );
        let events = Events::new();
        events.configure(EventSettings {
            capacity: 16,
            throttles,
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _subscription = events.subscribe(tx, None);
        for offset in 0..5 {
            events.emit("RTC_CHANGE", Some(serde_json::json!({"offset": offset})));
        }
        events.emit("STOP", None);
        assert_eq!(event_name(rx.recv().await.unwrap()).1["offset"], 0);
        assert_eq!(event_name(rx.recv().await.unwrap()).0, "STOP");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(event_name(rx.recv().await.unwrap()).1["offset"], 4);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(rx.try_recv().is_err());
        // After the quiet period the next event goes out at once.
        events.emit("RTC_CHANGE", Some(serde_json::json!({"offset": 9})));
        assert_eq!(event_name(rx.recv().await.unwrap()).1["offset"], 9);
    }
}
