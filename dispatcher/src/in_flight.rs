//! The per-client table of dispatched commands that have not replied yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::value::RawValue;
use slab::Slab;
use tokio_util::sync::CancellationToken;

use crate::qmp_return::{Settlement, Ticket};

/// One command in flight.
#[derive(Debug)]
pub(crate) struct Entry {
    seq: u64,
    /// The raw id to echo in the reply.
    pub(crate) id: Option<Box<RawValue>>,
    /// The id in canonical form, for duplicate detection and cancel by id.
    pub(crate) id_key: Option<String>,
    pub(crate) command: Arc<str>,
    pub(crate) started: Instant,
    /// A child of the connection's token: cancelled by `async-command-cancel` or disconnect.
    pub(crate) cancel: CancellationToken,
    /// Shared with the request's `QmpReturn`: a cancel must win it before it counts.
    pub(crate) settlement: Settlement,
    /// Sent with `exec-oob`: its reply may overtake in-band replies.
    pub(crate) oob: bool,
    /// QAPI `success-response: false`: success sends nothing.
    pub(crate) silent_success: bool,
    /// Listed in the id index (async clients, whose ids are unique).
    indexed: bool,
}

/// Slab of a client's in-flight commands, with an index by id for async clients.
#[derive(Debug)]
pub(crate) struct InFlight {
    entries: Slab<Entry>,
    by_id: HashMap<String, usize>,
    next_seq: u64,
    /// The server-wide total in `Stats`, kept in step with `entries` here and nowhere else.
    total: Arc<AtomicUsize>,
}

/// What to record for a newly dispatched command.
pub(crate) struct NewEntry {
    pub(crate) id: Option<Box<RawValue>>,
    pub(crate) id_key: Option<String>,
    pub(crate) command: Arc<str>,
    pub(crate) cancel: CancellationToken,
    pub(crate) settlement: Settlement,
    pub(crate) oob: bool,
    pub(crate) silent_success: bool,
    /// Index by id: true for async clients, whose in-flight ids are unique.
    pub(crate) indexed: bool,
}

impl InFlight {
    /// An empty table whose entries also count in the server-wide `total`.
    pub(crate) fn new(total: Arc<AtomicUsize>) -> Self {
        InFlight {
            entries: Slab::new(),
            by_id: HashMap::new(),
            next_seq: 0,
            total,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True if an async command with this canonical id is in flight.
    pub(crate) fn has_id(&self, id_key: &str) -> bool {
        self.by_id.contains_key(id_key)
    }

    pub(crate) fn insert(&mut self, new: NewEntry) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        let indexed_key = new.id_key.clone().filter(|_| new.indexed);
        let key = self.entries.insert(Entry {
            seq,
            id: new.id,
            id_key: new.id_key,
            command: new.command,
            started: Instant::now(),
            cancel: new.cancel,
            settlement: new.settlement,
            oob: new.oob,
            silent_success: new.silent_success,
            indexed: new.indexed,
        });
        if let Some(id_key) = indexed_key {
            self.by_id.insert(id_key, key);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Ticket { key, seq }
    }

    /// Removes and returns the entry a completion belongs to; `None` when it was cancelled
    /// (or the slot now belongs to a newer command).
    pub(crate) fn take(&mut self, ticket: Ticket) -> Option<Entry> {
        match self.entries.get(ticket.key) {
            Some(entry) if entry.seq == ticket.seq => {}
            _ => return None,
        }
        let entry = self.entries.remove(ticket.key);
        if let (true, Some(id_key)) = (entry.indexed, &entry.id_key) {
            self.by_id.remove(id_key);
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        Some(entry)
    }

    /// The command with this canonical id, whatever mode it was sent in.
    pub(crate) fn find_by_id(&self, id_key: &str) -> Option<Ticket> {
        let key = match self.by_id.get(id_key) {
            Some(&key) => key,
            None => {
                self.entries
                    .iter()
                    .find(|(_, e)| e.id_key.as_deref() == Some(id_key))?
                    .0
            }
        };
        Some(Ticket {
            key,
            seq: self.entries[key].seq,
        })
    }

    /// The entry of a ticket still in flight.
    pub(crate) fn get(&self, ticket: Ticket) -> Option<&Entry> {
        self.entries
            .get(ticket.key)
            .filter(|entry| entry.seq == ticket.seq)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Ticket, &Entry)> {
        self.entries
            .iter()
            .map(|(key, e)| (Ticket { key, seq: e.seq }, e))
    }

    /// Cancels and forgets everything: the client is gone.
    pub(crate) fn cancel_all(&mut self) {
        self.total.fetch_sub(self.entries.len(), Ordering::Relaxed);
        for entry in self.entries.drain() {
            // The client is gone either way; a reply committed first merely keeps its effect.
            entry.settlement.cancel();
            entry.cancel.cancel();
        }
        self.by_id.clear();
    }
}
