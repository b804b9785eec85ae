//! What is measured: the scenarios of issues #5 and #16, the rows each adds to the report,
//! and their goals.

use serde_json::Value;

/// Commands in flight per client in the sweep.
pub const SWEEP_DEPTH: usize = 8;
/// QEMU serves one client per monitor: above this many clients QSD is not started.
pub const QSD_MAX_CLIENTS: usize = 1000;
/// The slow command of the deferred and legacy scenarios.
pub const DELAY_10MS: &str = r#"{"execute":"x-delay","arguments":{"ms":10}}"#;
/// The command held in flight by the memory scenario: far longer than the measurement.
pub const DELAY_HOLD: &str = r#"{"execute":"x-delay","arguments":{"ms":120000}}"#;
/// An immediate command every target implements.
pub const IMMEDIATE: &str = r#"{"execute":"query-version"}"#;

/// A server under test.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Target {
    Demo,
    Floor,
    Qsd,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Demo => "qmp-demo",
            Target::Floor => "qmp-floor",
            Target::Qsd => "qemu-storage-daemon",
        }
    }
}

/// What a scenario measures: one qmp-bench mode, or the in-process registry run.
#[derive(Clone)]
pub enum Measure {
    /// Throughput and latency: `clients` each keep `depth` commands in flight.
    Load {
        clients: usize,
        depth: usize,
        command: &'static str,
        /// Whether clients negotiate `async` (on targets that offer it).
        async_clients: bool,
        seconds: f64,
        /// `TOKIO_WORKER_THREADS` for the server; `None`: one per core.
        worker_threads: Option<usize>,
    },
    /// Server RSS per idle, negotiated client, at each step (one growing set of clients).
    Idle { steps: Vec<usize> },
    /// Server RSS per command held in flight.
    Held { clients: usize, depth: usize },
    /// Legacy clients paused behind a slow command: idle CPU, then departures.
    Paused {
        clients: usize,
        idle_seconds: f64,
        departures: usize,
    },
    /// One event at a time to `clients`, `events` times.
    Broadcast { clients: usize, events: usize },
    /// `rate` events/s to `clients` for `seconds`.
    Storm {
        clients: usize,
        rate: f64,
        seconds: f64,
    },
    /// The registry at 10,000 commands against 10, in process (the dispatcher alone).
    Registry { rounds: usize },
}

/// How a cell's number is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Commands per second.
    Rate,
    Kib,
    /// Percent of one core.
    PercentCore,
    Millis,
    Micros,
    /// A ratio measured within the target itself.
    Times,
    Count,
}

/// Where a row's number comes from in one run's JSON.
#[derive(Clone)]
pub enum Metric {
    /// A JSON pointer into qmp-bench's output, e.g. `/steps/1/kib_per_client`.
    Pointer(String),
    /// Server CPU time ÷ commands, in µs.
    CpuPerCommand,
}

impl Metric {
    pub fn of(&self, run: &Value) -> Option<f64> {
        match self {
            Metric::Pointer(pointer) => run.pointer(pointer)?.as_f64(),
            Metric::CpuPerCommand => {
                Some(run["server_cpu_seconds"].as_f64()? * 1e6 / run["commands"].as_f64()?.max(1.0))
            }
        }
    }
}

fn field(name: &str) -> Metric {
    Metric::Pointer(format!("/{name}"))
}

/// A goal from the issues, checked against the demo's value or its ratio to the floor.
#[derive(Clone, Copy)]
pub enum Goal {
    None,
    /// demo ÷ floor at least this (throughput).
    FloorRatioAtLeast(f64),
    /// demo ÷ floor at least the first, demo ÷ QSD at least the second.
    FloorAndQsdRatio(f64, f64),
    /// demo ÷ floor at most this (a cost: CPU, time).
    FloorRatioAtMost(f64),
    /// The demo's value at most this, in the row's unit.
    AtMost(f64),
}

/// One line of the main table.
#[derive(Clone)]
pub struct Row {
    pub label: String,
    pub metric: Metric,
    pub unit: Unit,
    pub goal: Goal,
    /// Targets this row does not apply to though the scenario does.
    pub not_applicable: Vec<(Target, &'static str)>,
}

impl Row {
    fn new(label: impl Into<String>, metric: Metric, unit: Unit, goal: Goal) -> Self {
        Row {
            label: label.into(),
            metric,
            unit,
            goal,
            not_applicable: Vec::new(),
        }
    }
}

/// A scenario: one measurement per target and round, reported as one or more rows.
pub struct Scenario {
    /// The name `--only` selects it by.
    pub key: &'static str,
    pub label: String,
    pub measure: Measure,
    /// Targets that cannot run it, with the reason.
    pub not_applicable: Vec<(Target, &'static str)>,
    /// Rows of the main table. Load scenarios also get a row in the latency table.
    pub rows: Vec<Row>,
    /// For load scenarios: the goal on server CPU per command.
    pub cpu_goal: Goal,
}

impl Scenario {
    pub fn not_applicable_to(&self, target: Target) -> Option<&'static str> {
        self.not_applicable
            .iter()
            .find(|(na, _)| *na == target)
            .map(|&(_, reason)| reason)
    }

    pub fn is_load(&self) -> bool {
        matches!(self.measure, Measure::Load { .. })
    }

    /// A throughput scenario: one row of commands/s.
    fn load(
        key: &'static str,
        label: String,
        measure: Measure,
        not_applicable: Vec<(Target, &'static str)>,
        goal: Goal,
        cpu_goal: Goal,
    ) -> Self {
        Scenario {
            key,
            rows: vec![Row::new(
                label.clone(),
                field("commands_per_sec"),
                Unit::Rate,
                goal,
            )],
            label,
            measure,
            not_applicable,
            cpu_goal,
        }
    }
}

/// Sizes the run uses, resolved from the command line, `--quick` and the open-file limit.
pub struct Sizes {
    pub seconds: f64,
    pub idle_steps: Vec<usize>,
    /// Idle steps asked for but beyond the open-file limit, with the reason.
    pub idle_skipped: Option<String>,
    pub held_clients: usize,
    pub held_depth: usize,
    pub paused: Vec<usize>,
    pub idle_seconds: f64,
    pub departures: usize,
    pub broadcast_clients: usize,
    pub broadcast_events: usize,
    pub storm_clients: usize,
    pub storm_rate: f64,
    pub storm_seconds: f64,
    pub registry_rounds: usize,
    pub sweep: Vec<usize>,
}

/// Number with thousands separators: `10000` as `10,000`.
pub fn grouped(value: usize) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The scenarios, in report order.
pub fn scenarios(sizes: &Sizes) -> Vec<Scenario> {
    let seconds = sizes.seconds;
    let no_delay = vec![(Target::Qsd, "QSD has no x-delay")];
    let no_events = vec![(Target::Qsd, "QSD has no stop/cont")];
    let load = |clients, depth, command, async_clients, worker_threads| Measure::Load {
        clients,
        depth,
        command,
        async_clients,
        seconds,
        worker_threads,
    };
    let mut list = vec![
        Scenario::load(
            "seq",
            "(a) 1 client, sequential query-version".into(),
            load(1, 1, IMMEDIATE, false, None),
            vec![],
            Goal::FloorRatioAtLeast(0.95),
            Goal::None,
        ),
        Scenario::load(
            "async8",
            "(b) 8 clients × 8 in flight, query-version".into(),
            load(8, 8, IMMEDIATE, true, None),
            vec![],
            Goal::FloorAndQsdRatio(0.7, 20.0),
            Goal::FloorRatioAtMost(1.25),
        ),
        Scenario::load(
            "async64",
            "(c) 64 clients × 16 in flight, query-version".into(),
            load(64, 16, IMMEDIATE, true, None),
            vec![],
            Goal::None,
            Goal::FloorRatioAtMost(1.25),
        ),
        Scenario::load(
            "deferred",
            "(d) 100 async clients × 100 in flight, x-delay 10 ms".into(),
            load(100, 100, DELAY_10MS, true, None),
            no_delay.clone(),
            Goal::None,
            Goal::FloorRatioAtMost(1.25),
        ),
        Scenario::load(
            "legacy",
            "(e) 8 legacy clients × 8 pipelined, x-delay 10 ms".into(),
            load(8, 8, DELAY_10MS, false, None),
            no_delay.clone(),
            Goal::None,
            Goal::None,
        ),
    ];
    // (b) and (c) on 1 and 2 runtime worker threads (TOKIO_WORKER_THREADS, for the demo
    // and the floor alike; QSD has no such setting).
    for (letter, clients, depth) in [("b", 8, 8), ("c", 64, 16)] {
        for threads in [1, 2] {
            list.push(Scenario::load(
                if threads == 1 { "threads1" } else { "threads2" },
                format!(
                    "({letter}) {clients} × {depth}, {threads} worker thread{}",
                    if threads == 1 { "" } else { "s" }
                ),
                load(clients, depth, IMMEDIATE, true, Some(threads)),
                vec![(Target::Qsd, "no worker-thread setting")],
                Goal::None,
                Goal::None,
            ));
        }
    }
    let idle_rows = sizes
        .idle_steps
        .iter()
        .enumerate()
        .map(|(index, &clients)| {
            let largest = index + 1 == sizes.idle_steps.len();
            let mut row = Row::new(
                format!("(f) KiB per idle client, {} clients", grouped(clients)),
                Metric::Pointer(format!("/steps/{index}/kib_per_client")),
                Unit::Kib,
                if largest {
                    Goal::AtMost(8.0)
                } else {
                    Goal::None
                },
            );
            if clients > QSD_MAX_CLIENTS {
                row.not_applicable = vec![(Target::Qsd, "one monitor per client")];
            }
            row
        })
        .collect();
    list.push(Scenario {
        key: "idle",
        label: "(f) idle clients".into(),
        measure: Measure::Idle {
            steps: sizes.idle_steps.clone(),
        },
        not_applicable: vec![],
        rows: idle_rows,
        cpu_goal: Goal::None,
    });
    list.push(Scenario {
        key: "held",
        label: "(f) in-flight x-delay".into(),
        measure: Measure::Held {
            clients: sizes.held_clients,
            depth: sizes.held_depth,
        },
        not_applicable: no_delay.clone(),
        rows: vec![Row::new(
            format!(
                "(f) KiB per in-flight x-delay ({} = {} clients × {})",
                grouped(sizes.held_clients * sizes.held_depth),
                sizes.held_clients,
                grouped(sizes.held_depth)
            ),
            field("kib_per_command"),
            Unit::Kib,
            Goal::AtMost(0.6),
        )],
        cpu_goal: Goal::None,
    });
    for &clients in &sizes.paused {
        let n = grouped(clients);
        list.push(Scenario {
            key: "paused",
            label: format!("(g) {n} paused legacy clients"),
            measure: Measure::Paused {
                clients,
                idle_seconds: sizes.idle_seconds,
                departures: sizes.departures,
            },
            not_applicable: no_delay.clone(),
            rows: vec![
                Row::new(
                    format!("(g) {n} paused clients (x-delay 60 s running), idle server CPU"),
                    field("idle_server_cpu_percent"),
                    Unit::PercentCore,
                    if clients >= 10_000 {
                        Goal::AtMost(1.0)
                    } else {
                        Goal::None
                    },
                ),
                Row::new(
                    format!("(g) {n} paused clients, a departure noticed after (p50)"),
                    field("departure_ms_p50"),
                    Unit::Millis,
                    Goal::AtMost(50.0),
                ),
                Row::new(
                    format!("(g) {n} paused clients, a departure noticed after (max)"),
                    field("departure_ms_max"),
                    Unit::Millis,
                    Goal::AtMost(50.0),
                ),
            ],
            cpu_goal: Goal::None,
        });
    }
    let n = grouped(sizes.broadcast_clients);
    list.push(Scenario {
        key: "broadcast",
        label: format!("(h) one event to {n} clients"),
        measure: Measure::Broadcast {
            clients: sizes.broadcast_clients,
            events: sizes.broadcast_events,
        },
        not_applicable: no_events.clone(),
        rows: vec![
            Row::new(
                format!("(h) one event to {n} clients: last client has it after (p50)"),
                field("last_client_ms_p50"),
                Unit::Millis,
                Goal::FloorRatioAtMost(1.5),
            ),
            Row::new(
                format!("(h) one event to {n} clients: server CPU per delivery"),
                field("us_per_delivery"),
                Unit::Micros,
                Goal::FloorRatioAtMost(1.5),
            ),
        ],
        cpu_goal: Goal::None,
    });
    let n = grouped(sizes.storm_clients);
    let storm = format!(
        "(i) storm, {}/s × {:.0} s to {n} clients",
        grouped(sizes.storm_rate as usize),
        sizes.storm_seconds
    );
    list.push(Scenario {
        key: "storm",
        label: storm.clone(),
        measure: Measure::Storm {
            clients: sizes.storm_clients,
            rate: sizes.storm_rate,
            seconds: sizes.storm_seconds,
        },
        not_applicable: no_events,
        rows: vec![
            Row::new(
                format!("{storm}: clients missing an event or out of order"),
                Metric::Pointer("/missing_clients".into()),
                Unit::Count,
                Goal::AtMost(0.0),
            ),
            Row::new(
                format!("{storm}: last client behind by (p99)"),
                field("lag_ms_p99"),
                Unit::Millis,
                Goal::None,
            ),
            Row::new(
                format!("{storm}: server CPU per delivery"),
                field("us_per_delivery"),
                Unit::Micros,
                Goal::FloorRatioAtMost(1.5),
            ),
            Row::new(
                format!("{storm}: RSS growth after the first second"),
                field("rss_growth_kib"),
                Unit::Kib,
                Goal::None,
            ),
            Row::new(
                format!("{storm}: RSS growth over the second half"),
                field("rss_growth_second_half_kib"),
                Unit::Kib,
                Goal::None,
            ),
        ],
        cpu_goal: Goal::None,
    });
    let dispatcher_only = vec![
        (Target::Floor, "dispatcher only"),
        (Target::Qsd, "dispatcher only"),
    ];
    list.push(Scenario {
        key: "registry",
        label: "(j) registry".into(),
        measure: Measure::Registry {
            rounds: sizes.registry_rounds,
        },
        not_applicable: dispatcher_only,
        rows: vec![
            Row::new(
                "(j) registry of 10,000: cycling through all ÷ through 10 of 10 (in process)",
                field("all_of_10k_ratio"),
                Unit::Times,
                Goal::AtMost(1.2),
            ),
            Row::new(
                "(j) registry of 10,000: 10 of them used ÷ 10 of 10 (in process)",
                field("ten_of_10k_ratio"),
                Unit::Times,
                Goal::None,
            ),
        ],
        cpu_goal: Goal::None,
    });
    list
}

/// The sweep behind the throughput chart: async clients × 8 in flight (QSD: pipelined,
/// up to [`QSD_MAX_CLIENTS`]).
pub fn sweep_scenarios(sizes: &Sizes) -> Vec<Scenario> {
    sizes
        .sweep
        .iter()
        .map(|&clients| Scenario {
            key: "sweep",
            label: format!("sweep {} × {SWEEP_DEPTH}", grouped(clients)),
            measure: Measure::Load {
                clients,
                depth: SWEEP_DEPTH,
                command: IMMEDIATE,
                async_clients: true,
                seconds: sizes.seconds / 2.0,
                worker_threads: None,
            },
            not_applicable: if clients > 64 {
                vec![(Target::Qsd, "one monitor per client")]
            } else {
                vec![]
            },
            rows: vec![],
            cpu_goal: Goal::None,
        })
        .collect()
}
