//! The per-client table of dispatched commands that have not replied yet.

use crate::counter::SpreadCounter;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashTable;
use slab::Slab;

use crate::qmp_return::{Settlement, Ticket};
use crate::registry::CommandId;
use crate::wire::Id;

/// One command in flight.
#[derive(Debug)]
pub(crate) struct Entry {
    seq: u64,
    /// The request's id: echoed in the reply, and its key compared for async clients.
    /// Stored here only; the id index refers to it by slab key.
    pub(crate) id: Option<Id>,
    pub(crate) command: CommandId,
    pub(crate) started: Instant,
    /// Shared with the request's `QmpReturn`: a cancel must win it before it counts, and
    /// its stop signal tells the handler (`async-command-cancel`, a deadline, disconnect).
    pub(crate) settlement: Settlement,
    /// Sent with `exec-oob`: its reply may overtake in-band replies.
    pub(crate) oob: bool,
    /// QAPI `success-response: false`: success sends nothing.
    pub(crate) silent_success: bool,
    /// Listed in the id index (async clients, whose ids are unique).
    indexed: bool,
    /// Its place in the session's deadline queue, if a timeout applies.
    pub(crate) deadline: Option<tokio_util::time::delay_queue::Key>,
}

/// Slab of a client's in-flight commands, with an index by id key for async clients.
#[derive(Debug)]
pub(crate) struct InFlight {
    entries: Slab<Entry>,
    /// Slab keys of indexed entries, hashed by their id key; the key text lives in the
    /// entry alone, so an id is held once however large it is. Keys are `u32`: five bytes
    /// a bucket with its control byte, not nine.
    by_id: HashTable<u32>,
    /// foldhash, randomly seeded: ids are the client's choice, and this is several times
    /// cheaper than SipHash on the short ids clients send.
    hasher: hashbrown::DefaultHashBuilder,
    next_seq: u64,
    /// Bytes of ids held by `entries`, for the client's retained budget.
    retained: usize,
    /// The server-wide total in `Stats`, kept in step with `entries` here and nowhere else.
    total: Arc<SpreadCounter>,
    /// The same total for the metrics recorder (`qmp_commands_in_flight`).
    gauge: metrics::Gauge,
}

/// What to record for a newly dispatched command.
pub(crate) struct NewEntry {
    pub(crate) id: Option<Id>,
    pub(crate) command: CommandId,
    pub(crate) settlement: Settlement,
    pub(crate) oob: bool,
    pub(crate) silent_success: bool,
    /// Index by id: true for async clients, whose in-flight ids are unique.
    pub(crate) indexed: bool,
}

impl InFlight {
    /// An empty table whose entries also count in the server-wide `total`.
    pub(crate) fn new(total: Arc<SpreadCounter>) -> Self {
        InFlight {
            entries: Slab::new(),
            by_id: HashTable::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            next_seq: 0,
            retained: 0,
            total,
            gauge: crate::observe::in_flight_gauge(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of ids the table holds.
    pub(crate) fn retained(&self) -> usize {
        self.retained
    }

    /// The slab key of the indexed entry whose id has this key.
    fn find(&self, id_key: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(id_key);
        let entries = &self.entries;
        self.by_id
            .find(hash, |&key| key_of(&entries[key as usize]) == Some(id_key))
            .map(|&key| key as usize)
    }

    /// True if an async command with this id key is in flight.
    pub(crate) fn has_id(&self, id_key: &str) -> bool {
        !self.by_id.is_empty() && self.find(id_key).is_some()
    }

    /// The entry of `ticket`, to change.
    pub(crate) fn get_mut(&mut self, ticket: Ticket) -> Option<&mut Entry> {
        self.entries
            .get_mut(ticket.key)
            .filter(|entry| entry.seq == ticket.seq)
    }

    pub(crate) fn insert(&mut self, new: NewEntry) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.retained += new.id.as_ref().map_or(0, Id::heap_size);
        let key = self.entries.insert(Entry {
            seq,
            id: new.id,
            command: new.command,
            started: Instant::now(),
            settlement: new.settlement,
            oob: new.oob,
            silent_success: new.silent_success,
            indexed: new.indexed,
            deadline: None,
        });
        self.gauge.increment(1.0);
        if let Some(id_key) = key_of(&self.entries[key]) {
            let hash = self.hasher.hash_one(id_key);
            let (entries, hasher) = (&self.entries, &self.hasher);
            // A slab key is below the in-flight limit, far below 2^32.
            let slot = u32::try_from(key).expect("fewer than 2^32 in flight");
            self.by_id.insert_unique(hash, slot, |&k| {
                hasher.hash_one(key_of(&entries[k as usize]).expect("indexed entries have ids"))
            });
        }
        self.total.add(1);
        Ticket { key, seq }
    }

    /// Removes and returns the entry a completion belongs to; `None` when it was cancelled
    /// (or the slot now belongs to a newer command).
    pub(crate) fn take(&mut self, ticket: Ticket) -> Option<Entry> {
        match self.entries.get(ticket.key) {
            Some(entry) if entry.seq == ticket.seq => {}
            _ => return None,
        }
        if let Some(id_key) = key_of(&self.entries[ticket.key]) {
            let hash = self.hasher.hash_one(id_key);
            if let Ok(found) = self.by_id.find_entry(hash, |&k| k as usize == ticket.key) {
                found.remove();
            }
        }
        let entry = self.entries.remove(ticket.key);
        self.retained -= entry.id.as_ref().map_or(0, Id::heap_size);
        self.total.add(-1);
        self.gauge.decrement(1.0);
        Some(entry)
    }

    /// The command with this id key, whatever mode it was sent in (legacy entries are not
    /// indexed: they are searched, as a legacy client has few in flight).
    pub(crate) fn find_by_id(&self, id_key: &str) -> Option<Ticket> {
        let key = match self.find(id_key) {
            Some(key) => key,
            None => {
                self.entries
                    .iter()
                    .find(|(_, e)| e.id.as_ref().map(Id::key) == Some(id_key))?
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
    pub(crate) fn cancel_all(&mut self, mut each: impl FnMut(&Entry)) {
        self.total.add(-(self.entries.len() as isize));
        self.gauge.decrement(self.entries.len() as f64);
        for entry in self.entries.drain() {
            // The client is gone either way; a reply committed first merely keeps its effect.
            entry.settlement.cancel();
            entry.settlement.stop();
            each(&entry);
        }
        self.by_id.clear();
        self.retained = 0;
    }
}

/// The id key an entry is indexed by, if it is indexed.
fn key_of(entry: &Entry) -> Option<&str> {
    entry.id.as_ref().filter(|_| entry.indexed).map(Id::key)
}
