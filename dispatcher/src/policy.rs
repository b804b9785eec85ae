//! Who may do what: the commands and events one monitor offers its clients.
//!
//! QEMU's monitors differ in their command tables; here a [`Policy`] chosen per listener (or
//! per connection, from its peer credentials) narrows the registry for the clients it
//! governs. A command outside the policy does not exist for them: `CommandNotFound`, absent
//! from `query-commands` and `query-qmp-schema`. The same goes for events.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::registry::Registry;

/// A rule over names.
#[derive(Clone)]
enum Rule {
    All,
    Matching(Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl Rule {
    fn allows(&self, name: &str) -> bool {
        match self {
            Rule::All => true,
            Rule::Matching(matches) => matches(name),
        }
    }
}

/// Commands every policy offers, so a client can always negotiate and manage its own
/// `async` commands.
const ALWAYS_OFFERED: [&str; 3] = [
    "qmp_capabilities",
    "query-async-commands",
    "async-command-cancel",
];

/// The commands and events a monitor offers. Cheap to clone.
///
/// ```
/// use qmp_dispatcher::Policy;
///
/// let read_only = Policy::read_only();
/// assert!(read_only.allows_command("query-status"));
/// assert!(read_only.allows_command("qmp_capabilities"));
/// assert!(!read_only.allows_command("quit"));
///
/// let exporter = Policy::commands(|name| name == "query-stats").named("exporter");
/// assert!(exporter.allows_command("query-stats") && !exporter.allows_command("query-status"));
/// assert!(exporter.allows_event("SHUTDOWN"));
/// ```
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    commands: Rule,
    events: Rule,
    /// `query-qmp-schema` under this policy, computed on first use.
    schema: OnceLock<Bytes>,
}

impl Policy {
    /// Everything the registry has: the default.
    pub fn full() -> Self {
        Self::new("full", Rule::All, Rule::All)
    }

    /// A read-only monitor: `query-*` commands only, besides `qmp_capabilities` and the
    /// `async` built-ins (which every policy offers). All events.
    pub fn read_only() -> Self {
        Self::commands(|name| name.starts_with("query-")).named("read-only")
    }

    /// The commands for which `allowed` is true, besides `qmp_capabilities`,
    /// `query-async-commands` and `async-command-cancel`, which every policy offers. All
    /// events.
    pub fn commands(allowed: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self::new("custom", Rule::Matching(Arc::new(allowed)), Rule::All)
    }

    /// The same commands, and only the events for which `allowed` is true.
    pub fn events(self, allowed: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self::new(
            &self.inner.name,
            self.inner.commands.clone(),
            Rule::Matching(Arc::new(allowed)),
        )
    }

    /// The same policy under another name, which the audit trail and the client's log span
    /// show.
    pub fn named(self, name: &str) -> Self {
        Self::new(name, self.inner.commands.clone(), self.inner.events.clone())
    }

    fn new(name: &str, commands: Rule, events: Rule) -> Self {
        Policy {
            inner: Arc::new(Inner {
                name: name.into(),
                commands,
                events,
                schema: OnceLock::new(),
            }),
        }
    }

    /// The policy's name: `full`, `read-only`, `custom`, or what [`named`](Self::named) set.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether clients under this policy may run `command`.
    pub fn allows_command(&self, command: &str) -> bool {
        // The rule first: under the full policy it answers without comparing names.
        self.inner.commands.allows(command) || ALWAYS_OFFERED.contains(&command)
    }

    /// Whether clients under this policy receive `event`.
    pub fn allows_event(&self, event: &str) -> bool {
        self.inner.events.allows(event)
    }

    /// True for [`full`](Self::full)-like policies that filter nothing.
    pub(crate) fn is_full(&self) -> bool {
        matches!(
            (&self.inner.commands, &self.inner.events),
            (Rule::All, Rule::All)
        )
    }

    /// `query-qmp-schema`'s reply under this policy: the registry's own when nothing is
    /// filtered, else computed once from the commands and events this policy offers. A
    /// policy belongs to one registry: the first it is used with.
    pub(crate) fn schema_json(&self, registry: &Registry) -> Bytes {
        if self.is_full() {
            return registry.schema_bytes().clone();
        }
        self.inner
            .schema
            .get_or_init(|| {
                registry.schema_json_filtered(|c| self.allows_command(c), |e| self.allows_event(e))
            })
            .clone()
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::full()
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Policy").field(&self.inner.name).finish()
    }
}
