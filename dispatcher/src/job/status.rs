//! QEMU's job states and verbs, and its two tables: which state may follow which
//! (`JobSTT` in QEMU's `job.c`) and which verb each state accepts (`JobVerbTable`).

use std::fmt;

/// The state of a job (QAPI `JobStatus`), spelled on the wire in lower case.
///
/// QEMU also has `undefined`, the state of a job that is not created yet; no job is ever
/// seen in it, so it has no variant here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Created, not started yet.
    Created,
    /// Working.
    Running,
    /// Paused by a client (`job-pause`) while running.
    Paused,
    /// Its work is done up to a point where it can be completed (`job-complete`), and it
    /// keeps it so meanwhile: a mirror in sync.
    Ready,
    /// Paused by a client while ready.
    Standby,
    /// Its work is done; waiting for the other jobs of its transaction (here, none).
    Waiting,
    /// Waiting for `job-finalize` (when not finalized automatically).
    Pending,
    /// Failed or cancelled; undoing its work.
    Aborting,
    /// Finished, successfully or not; kept until `job-dismiss` (when not dismissed
    /// automatically), so its end can still be queried.
    Concluded,
    /// Gone: dismissed and removed from the job table.
    Null,
}

/// Every state, in QEMU's order (the order of the tables' columns).
#[cfg(test)]
pub(crate) const ALL_STATUSES: [JobStatus; 10] = [
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

impl JobStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// The state's bit in the tables' rows.
    const fn bit(self) -> u16 {
        1 << self as u16
    }

    /// The compact form kept in an atomic (see `core`).
    pub(crate) const fn to_u8(self) -> u8 {
        self as u8
    }

    /// The inverse of [`to_u8`](Self::to_u8).
    pub(crate) const fn from_u8(value: u8) -> JobStatus {
        match value {
            0 => JobStatus::Created,
            1 => JobStatus::Running,
            2 => JobStatus::Paused,
            3 => JobStatus::Ready,
            4 => JobStatus::Standby,
            5 => JobStatus::Waiting,
            6 => JobStatus::Pending,
            7 => JobStatus::Aborting,
            8 => JobStatus::Concluded,
            _ => JobStatus::Null,
        }
    }

    /// Whether QEMU's state transition table allows going from `self` to `next`.
    pub fn may_become(self, next: JobStatus) -> bool {
        transitions_from(self) & next.bit() != 0
    }

    /// Whether a job in this state accepts `verb` (QEMU's verb table). A refusal reads
    /// `Job 'ID' in state 'STATE' cannot accept command verb 'VERB'`.
    pub fn accepts(self, verb: JobVerb) -> bool {
        verb_states(verb) & self.bit() != 0
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states that may follow each state: QEMU's `JobSTT`, one row per state.
const fn transitions_from(status: JobStatus) -> u16 {
    use JobStatus::*;
    const fn set(states: &[JobStatus]) -> u16 {
        let mut bits = 0;
        let mut i = 0;
        while i < states.len() {
            bits |= states[i].bit();
            i += 1;
        }
        bits
    }
    match status {
        Created => set(&[Running, Aborting, Null]),
        Running => set(&[Paused, Ready, Waiting, Aborting]),
        Paused => set(&[Running]),
        Ready => set(&[Standby, Waiting, Aborting]),
        Standby => set(&[Ready]),
        Waiting => set(&[Pending, Aborting]),
        Pending => set(&[Aborting, Concluded]),
        Aborting => set(&[Aborting, Concluded]),
        Concluded => set(&[Null]),
        Null => 0,
    }
}

/// What a client may ask of a job (QAPI `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed` in QEMU; no command of this crate uses it, kept for the table.
    SetSpeed,
    /// `job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
    /// `block-job-change` in QEMU; kept for the table.
    Change,
}

impl JobVerb {
    /// The name in refusals (QAPI's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states that accept each verb: QEMU's `JobVerbTable`, one row per verb.
const fn verb_states(verb: JobVerb) -> u16 {
    use JobStatus::*;
    // created, running, paused, ready, standby: the states in which the work is alive.
    const ALIVE: u16 = Created.bit() | Running.bit() | Paused.bit() | Ready.bit() | Standby.bit();
    match verb {
        JobVerb::Cancel => ALIVE | Waiting.bit() | Pending.bit(),
        JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => ALIVE,
        JobVerb::Complete => Ready.bit() | Standby.bit(),
        JobVerb::Finalize => Pending.bit(),
        JobVerb::Dismiss => Concluded.bit(),
    }
}

/// `Job '<id>' in state '<state>' cannot accept command verb '<verb>'`, QEMU's refusal.
pub(crate) fn verb_refused(id: &str, status: JobStatus, verb: JobVerb) -> String {
    format!("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    /// QEMU's `JobSTT` as printed in `job.c`, columns U, C, R, P, Y, S, W, D, X, E, N; the
    /// `undefined` row and column are dropped (nothing is ever in that state).
    const QEMU_STT: [[u8; 10]; 10] = [
        /* C */ [0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
        /* R */ [0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
        /* P */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        /* Y */ [0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        /* S */ [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        /* W */ [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        /* D */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        /* X */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ];

    /// QEMU's `JobVerbTable`, same columns.
    const QEMU_VERBS: [(JobVerb, [u8; 10]); 8] = [
        (JobVerb::Cancel, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
        (JobVerb::Pause, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (JobVerb::Resume, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (JobVerb::SetSpeed, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (JobVerb::Complete, [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]),
        (JobVerb::Finalize, [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
        (JobVerb::Dismiss, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        (JobVerb::Change, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    ];

    #[test]
    fn the_transition_table_is_qemus() {
        for (row, from) in ALL_STATUSES.iter().enumerate() {
            for (column, to) in ALL_STATUSES.iter().enumerate() {
                assert_eq!(
                    from.may_become(*to),
                    QEMU_STT[row][column] == 1,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn the_verb_table_is_qemus() {
        for (verb, row) in QEMU_VERBS {
            for (column, status) in ALL_STATUSES.iter().enumerate() {
                assert_eq!(status.accepts(verb), row[column] == 1, "{verb} in {status}");
            }
        }
    }

    /// Section B.3's observations of qemu-storage-daemon 10.0.2 (✓ = accepted; the
    /// `resume` column is the verb table's answer, before the not-paused check).
    #[test]
    fn the_verb_table_agrees_with_the_recorded_observations() {
        let observed: [(JobStatus, JobVerb, bool); 16] = [
            (Running, JobVerb::Pause, true),
            (Running, JobVerb::Complete, false),
            (Running, JobVerb::Finalize, false),
            (Running, JobVerb::Dismiss, false),
            (Running, JobVerb::Cancel, true),
            (Paused, JobVerb::Complete, false),
            (Ready, JobVerb::Pause, true),
            (Ready, JobVerb::Complete, true),
            (Ready, JobVerb::Finalize, false),
            (Ready, JobVerb::Dismiss, false),
            (Standby, JobVerb::Complete, true),
            (Pending, JobVerb::Pause, false),
            (Pending, JobVerb::Complete, false),
            (Pending, JobVerb::Dismiss, false),
            (Concluded, JobVerb::Finalize, false),
            (Concluded, JobVerb::Cancel, false),
        ];
        for (status, verb, accepted) in observed {
            assert_eq!(status.accepts(verb), accepted, "{verb} in {status}");
        }
        assert!(Pending.accepts(JobVerb::Finalize));
        assert!(Concluded.accepts(JobVerb::Dismiss));
        assert!(!Concluded.accepts(JobVerb::Pause));
    }

    #[test]
    fn refusal_text_and_wire_names() {
        assert_eq!(
            verb_refused("b1", Running, JobVerb::Finalize),
            "Job 'b1' in state 'running' cannot accept command verb 'finalize'"
        );
        for status in ALL_STATUSES {
            assert_eq!(JobStatus::from_u8(status.to_u8()), status);
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
    }
}
