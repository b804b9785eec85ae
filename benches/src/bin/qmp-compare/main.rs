//! qmp-compare: qmp-demo, qmp-floor and qemu-storage-daemon side by side, in one run.
//!
//! Run with `scripts/bench-compare` (builds, raises the fd limit, then runs this). Every
//! scenario runs each target `--rounds` times, alternating targets (a different one first
//! each round), on a freshly started server per measurement; the median is reported. The
//! load itself is `qmp-bench`, run as a child process with `--pid` so it samples the
//! server's CPU time and memory. At the end a table of ratios is printed and written with its
//! chart to `target/qmp-compare/` (`--out`); only with `--update-docs` are
//! `docs/performance.svg` and the generated block of `docs/performance.md` replaced.

mod svg;

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

type BoxError = Box<dyn Error + Send + Sync>;

/// How long a freshly started server may take to listen on all its sockets.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Marks the generated part of docs/performance.md.
const DOC_BEGIN: &str = "<!-- qmp-compare:begin -->";
const DOC_END: &str = "<!-- qmp-compare:end -->";
/// Client counts of the throughput sweep drawn in the chart.
const SWEEP_CLIENTS: [usize; 4] = [1, 4, 16, 64];
/// Commands in flight per client in the sweep.
const SWEEP_DEPTH: usize = 8;
/// The slow command of the deferred and legacy scenarios.
const DELAY_10MS: &str = r#"{"execute":"x-delay","arguments":{"ms":10}}"#;
/// The command held in flight by the memory scenario: far longer than the measurement.
const DELAY_HOLD: &str = r#"{"execute":"x-delay","arguments":{"ms":120000}}"#;
/// An immediate command every target implements.
const IMMEDIATE: &str = r#"{"execute":"query-version"}"#;

#[derive(Parser)]
#[command(about = "Side-by-side benchmark of qmp-demo, qmp-floor and qemu-storage-daemon")]
struct Cli {
    /// Seconds per throughput measurement (the sweep uses half).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Measurements per target and scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measurements per target of the memory scenarios.
    #[arg(long, default_value_t = 1)]
    memory_rounds: usize,
    /// Where qmp-bench, qmp-floor and qmp-demo are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The qemu-storage-daemon binary; `none` leaves it out.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: String,
    /// Idle clients of the memory-per-client scenario.
    #[arg(long, default_value_t = 1000)]
    idle_clients: usize,
    /// Clients of the memory-per-command scenario.
    #[arg(long, default_value_t = 10)]
    held_clients: usize,
    /// Commands each of `--held-clients` holds in flight.
    #[arg(long, default_value_t = 10_000)]
    held_depth: usize,
    /// Run only these scenarios (comma-separated): seq, async8, async64, deferred, legacy,
    /// sweep, idle, held.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Directory for the chart (performance.svg) and table (performance-table.md) of a run.
    #[arg(long, default_value = "target/qmp-compare")]
    out: PathBuf,
    /// Also replace docs/performance.svg and the generated block of docs/performance.md
    /// (in `--docs`).
    #[arg(long)]
    update_docs: bool,
    /// The directory `--update-docs` writes to.
    #[arg(long, default_value = "docs")]
    docs: PathBuf,
    /// What the default is now; accepted so that older command lines still run.
    #[arg(long, hide = true, conflicts_with = "update_docs")]
    no_docs: bool,
    /// Every measurement as JSON lines.
    #[arg(long, default_value = "target/qmp-compare/results.jsonl")]
    results: PathBuf,
}

/// A server under test.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Demo,
    Floor,
    Qsd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Demo => "qmp-demo",
            Target::Floor => "qmp-floor",
            Target::Qsd => "qemu-storage-daemon",
        }
    }
}

/// What a scenario measures.
#[derive(Clone)]
enum Measure {
    /// Throughput and latency: `clients` each keep `depth` commands in flight.
    Load {
        clients: usize,
        depth: usize,
        command: &'static str,
        /// Whether clients negotiate `async` (on targets that offer it).
        async_clients: bool,
        seconds: f64,
    },
    /// Server RSS per idle, negotiated client.
    Idle { clients: usize },
    /// Server RSS per command held in flight.
    Held { clients: usize, depth: usize },
}

/// One row of the report.
struct Scenario {
    key: &'static str,
    label: String,
    measure: Measure,
    /// Targets that cannot run it, with the reason.
    not_applicable: Vec<(Target, &'static str)>,
    /// The goal from issue #5, checked against the demo's ratio or value.
    goal: Goal,
}

/// A target of issue #5.
#[derive(Clone, Copy)]
enum Goal {
    None,
    /// demo ÷ floor throughput at least this.
    FloorRatio(f64),
    /// demo ÷ floor at least the first, demo ÷ QSD at least the second.
    FloorAndQsdRatio(f64, f64),
    /// The demo's value (KiB) at most this.
    AtMostKib(f64),
}

/// The medians of one target in one scenario.
#[derive(Default, Clone)]
struct Summary {
    /// Commands/s, or KiB for memory scenarios.
    value: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    cpu_us_per_command: Option<f64>,
    errors: u64,
    failures: Vec<String>,
    not_applicable: Option<&'static str>,
}

/// A started server; killed (it is our own child) and its sockets removed when dropped.
struct Spawned {
    child: Child,
    sockets: Vec<PathBuf>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Everything a run needs to start servers and load.
struct Runner {
    cli: Cli,
    work_dir: PathBuf,
    results: std::fs::File,
}

impl Runner {
    /// Starts `target` with one socket (QSD: one monitor per client, as QEMU serves one
    /// client per monitor) and waits until every socket accepts connections.
    fn spawn(
        &self,
        target: Target,
        clients: usize,
        max_in_flight: usize,
    ) -> Result<Spawned, BoxError> {
        let socket = |name: &str| self.work_dir.join(name);
        let (mut command, sockets) = match target {
            Target::Demo => {
                let path = socket("demo.sock");
                let mut command = Command::new(self.cli.bin_dir.join("qmp-demo"));
                command
                    .arg("--qmp")
                    .arg(format!("unix:{}", path.display()))
                    .arg("--max-in-flight")
                    .arg(max_in_flight.max(128).to_string())
                    .arg("--max-clients")
                    .arg((clients + 16).max(1024).to_string())
                    .env("RUST_LOG", "error");
                (command, vec![path])
            }
            Target::Floor => {
                let path = socket("floor.sock");
                let mut command = Command::new(self.cli.bin_dir.join("qmp-floor"));
                command.arg("--unix").arg(&path);
                (command, vec![path])
            }
            Target::Qsd => {
                let mut command = Command::new(&self.cli.qsd);
                let mut sockets = Vec::with_capacity(clients);
                for index in 0..clients.max(1) {
                    let path = socket(&format!("q{index}.sock"));
                    command
                        .arg("--chardev")
                        .arg(format!(
                            "socket,path={},server=on,wait=off,id=m{index}",
                            path.display()
                        ))
                        .arg("--monitor")
                        .arg(format!("chardev=m{index}"));
                    sockets.push(path);
                }
                (command, sockets)
            }
        };
        for path in &sockets {
            let _ = std::fs::remove_file(path);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", target.name()))?;
        let mut spawned = Spawned { child, sockets };
        let started = Instant::now();
        for path in &spawned.sockets {
            // A probe connection shows the server listens; QEMU frees the monitor's one
            // client slot when the probe closes.
            while UnixStream::connect(path).is_err() {
                if let Some(status) = spawned.child.try_wait()? {
                    return Err(format!("{} exited with {status}", target.name()).into());
                }
                if started.elapsed() > STARTUP_TIMEOUT {
                    return Err(format!("{} did not listen in time", target.name()).into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(spawned)
    }

    /// Runs one measurement of `measure` on a fresh `target`; returns qmp-bench's JSON.
    fn measure(&self, target: Target, measure: &Measure) -> Result<Value, BoxError> {
        let (clients, max_in_flight) = match *measure {
            Measure::Load { clients, depth, .. } => (clients, depth),
            Measure::Idle { clients } => (clients, 1),
            Measure::Held { clients, depth } => (clients, depth),
        };
        let server = self.spawn(target, clients, max_in_flight)?;
        let mut bench = Command::new(self.cli.bin_dir.join("qmp-bench"));
        bench
            .arg("--json")
            .arg("--pid")
            .arg(server.child.id().to_string());
        for socket in &server.sockets {
            bench.arg("--unix").arg(socket);
        }
        let offers_async = target != Target::Qsd;
        let caps = |async_clients: bool| {
            if async_clients && offers_async {
                "async"
            } else {
                ""
            }
        };
        match *measure {
            Measure::Load {
                clients,
                depth,
                command,
                async_clients,
                seconds,
            } => {
                let caps = caps(async_clients);
                bench
                    .args(["--clients", &clients.to_string()])
                    .args(["--depth", &depth.to_string()])
                    .args(["--command", command])
                    .args(["--duration", &seconds.to_string()])
                    .arg(format!("--caps={caps}"));
                if caps.is_empty() && depth > 1 {
                    bench.arg("--pipeline-legacy");
                }
            }
            Measure::Idle { clients } => {
                bench
                    .args(["--idle-clients", &clients.to_string()])
                    .arg(format!("--caps={}", caps(true)));
            }
            Measure::Held { clients, depth } => {
                bench
                    .arg("--hold-in-flight")
                    .args(["--clients", &clients.to_string()])
                    .args(["--depth", &depth.to_string()])
                    .args(["--command", DELAY_HOLD])
                    .arg(format!("--caps={}", caps(true)));
            }
        }
        let output = bench.stdin(Stdio::null()).output()?;
        drop(server);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().into());
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Runs `scenario` on every target, alternating them round by round, and summarises.
    fn run_scenario(
        &mut self,
        scenario: &Scenario,
        targets: &[Target],
    ) -> Result<BTreeMap<Target, Summary>, BoxError> {
        let rounds = match scenario.measure {
            Measure::Load { .. } => self.cli.rounds,
            Measure::Idle { .. } | Measure::Held { .. } => self.cli.memory_rounds,
        }
        .max(1);
        let mut samples: BTreeMap<Target, Vec<Value>> = BTreeMap::new();
        let mut summaries: BTreeMap<Target, Summary> = BTreeMap::new();
        let runnable: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|target| {
                let reason = scenario
                    .not_applicable
                    .iter()
                    .find(|(na, _)| na == target)
                    .map(|&(_, reason)| reason);
                summaries.entry(*target).or_default().not_applicable = reason;
                reason.is_none()
            })
            .collect();
        for round in 0..rounds {
            for offset in 0..runnable.len() {
                let target = runnable[(round + offset) % runnable.len()];
                eprint!(
                    "  {} round {} {:<20} ",
                    scenario.key,
                    round + 1,
                    target.name()
                );
                match self.measure(target, &scenario.measure) {
                    Ok(json) => {
                        eprintln!("{}", brief(&json));
                        let record = serde_json::json!({
                            "scenario": scenario.key,
                            "target": target.name(),
                            "round": round,
                            "result": json,
                        });
                        use std::io::Write as _;
                        writeln!(self.results, "{record}")?;
                        samples.entry(target).or_default().push(json);
                    }
                    Err(err) => {
                        eprintln!("FAILED: {err}");
                        summaries
                            .entry(target)
                            .or_default()
                            .failures
                            .push(err.to_string());
                    }
                }
            }
        }
        for (target, runs) in samples {
            let summary = summaries.entry(target).or_default();
            let field = |name: &str| -> Option<f64> {
                median(runs.iter().filter_map(|run| run[name].as_f64()).collect())
            };
            match scenario.measure {
                Measure::Load { .. } => {
                    summary.value = field("commands_per_sec");
                    summary.p50_us = field("p50_us");
                    summary.p99_us = field("p99_us");
                    summary.cpu_us_per_command = median(
                        runs.iter()
                            .filter_map(|run| {
                                Some(
                                    run["server_cpu_seconds"].as_f64()? * 1e6
                                        / run["commands"].as_f64()?.max(1.0),
                                )
                            })
                            .collect(),
                    );
                    summary.errors = runs.iter().filter_map(|r| r["errors"].as_u64()).sum();
                }
                Measure::Idle { .. } => summary.value = field("kib_per_client"),
                Measure::Held { .. } => {
                    summary.value = field("kib_per_command");
                    summary.errors = runs
                        .iter()
                        .filter_map(|r| r["early_replies"].as_u64())
                        .sum();
                }
            }
        }
        Ok(summaries)
    }
}

/// A one-line digest of a qmp-bench result for the progress output.
fn brief(json: &Value) -> String {
    if let Some(rate) = json["commands_per_sec"].as_f64() {
        format!(
            "{rate:.0} cmds/s, p50 {:.0} us, p99 {:.0} us",
            json["p50_us"].as_f64().unwrap_or(0.0),
            json["p99_us"].as_f64().unwrap_or(0.0)
        )
    } else if let Some(kib) = json["kib_per_client"].as_f64() {
        format!("{kib:.2} KiB per idle client")
    } else if let Some(kib) = json["kib_per_command"].as_f64() {
        format!(
            "{kib:.3} KiB per in-flight command ({} early replies)",
            json["early_replies"]
        )
    } else {
        json.to_string()
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// The scenarios of issue #5, in report order.
fn scenarios(cli: &Cli) -> Vec<Scenario> {
    let seconds = cli.seconds;
    let no_delay = vec![(Target::Qsd, "QSD has no x-delay")];
    vec![
        Scenario {
            key: "seq",
            label: "(a) 1 client, sequential query-version".into(),
            measure: Measure::Load {
                clients: 1,
                depth: 1,
                command: IMMEDIATE,
                async_clients: false,
                seconds,
            },
            not_applicable: vec![],
            goal: Goal::FloorRatio(0.85),
        },
        Scenario {
            key: "async8",
            label: "(b) 8 clients × 8 in flight, query-version".into(),
            measure: Measure::Load {
                clients: 8,
                depth: 8,
                command: IMMEDIATE,
                async_clients: true,
                seconds,
            },
            not_applicable: vec![],
            goal: Goal::FloorAndQsdRatio(0.7, 20.0),
        },
        Scenario {
            key: "async64",
            label: "(c) 64 clients × 16 in flight, query-version".into(),
            measure: Measure::Load {
                clients: 64,
                depth: 16,
                command: IMMEDIATE,
                async_clients: true,
                seconds,
            },
            not_applicable: vec![],
            goal: Goal::None,
        },
        Scenario {
            key: "deferred",
            label: "(d) 100 async clients × 100 in flight, x-delay 10 ms".into(),
            measure: Measure::Load {
                clients: 100,
                depth: 100,
                command: DELAY_10MS,
                async_clients: true,
                seconds,
            },
            not_applicable: no_delay.clone(),
            goal: Goal::None,
        },
        Scenario {
            key: "legacy",
            label: "(e) 8 legacy clients × 8 pipelined, x-delay 10 ms".into(),
            measure: Measure::Load {
                clients: 8,
                depth: 8,
                command: DELAY_10MS,
                async_clients: false,
                seconds,
            },
            not_applicable: no_delay.clone(),
            goal: Goal::None,
        },
        Scenario {
            key: "idle",
            label: format!("(f) KiB per idle client ({} clients)", cli.idle_clients),
            measure: Measure::Idle {
                clients: cli.idle_clients,
            },
            not_applicable: vec![],
            goal: Goal::AtMostKib(16.0),
        },
        Scenario {
            key: "held",
            label: format!(
                "(f) KiB per in-flight x-delay ({} = {} clients × {})",
                cli.held_clients * cli.held_depth,
                cli.held_clients,
                cli.held_depth
            ),
            measure: Measure::Held {
                clients: cli.held_clients,
                depth: cli.held_depth,
            },
            not_applicable: no_delay,
            goal: Goal::AtMostKib(2.0),
        },
    ]
}

/// The sweep behind the throughput chart: async clients × 8 in flight (QSD: pipelined).
fn sweep_scenarios(cli: &Cli) -> Vec<Scenario> {
    SWEEP_CLIENTS
        .iter()
        .map(|&clients| Scenario {
            key: "sweep",
            label: format!("sweep {clients} × {SWEEP_DEPTH}"),
            measure: Measure::Load {
                clients,
                depth: SWEEP_DEPTH,
                command: IMMEDIATE,
                async_clients: true,
                seconds: cli.seconds / 2.0,
            },
            not_applicable: vec![],
            goal: Goal::None,
        })
        .collect()
}

fn format_rate(rate: f64) -> String {
    let whole = format!("{:.0}", rate);
    let mut grouped = String::new();
    for (index, digit) in whole.chars().enumerate() {
        if index > 0 && (whole.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// A cell of the main table.
fn cell(summary: &Summary, memory: bool) -> String {
    if let Some(reason) = summary.not_applicable {
        return format!("n/a ({reason})");
    }
    match summary.value {
        Some(kib) if memory => format!("{kib:.2} KiB"),
        Some(rate) => format!("{}/s", format_rate(rate)),
        None if !summary.failures.is_empty() => "failed".into(),
        None => "–".into(),
    }
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn format_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
}

fn goal_text(goal: Goal, demo: Option<f64>, vs_floor: Option<f64>, vs_qsd: Option<f64>) -> String {
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "unmeasured",
    };
    match goal {
        Goal::None => String::new(),
        Goal::FloorRatio(min) => {
            format!("≥ {min}× floor: {}", verdict(vs_floor.map(|r| r >= min)))
        }
        Goal::FloorAndQsdRatio(floor, qsd) => format!(
            "≥ {floor}× floor: {}; ≥ {qsd}× QSD: {}",
            verdict(vs_floor.map(|r| r >= floor)),
            verdict(vs_qsd.map(|r| r >= qsd))
        ),
        Goal::AtMostKib(max) => format!("≤ {max} KiB: {}", verdict(demo.map(|v| v <= max))),
    }
}

fn micros(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Some(v) => format!("{v:.0} µs"),
        None => "–".into(),
    }
}

/// The Markdown report: ratios, then latency and server CPU per command.
fn report(scenarios: &[Scenario], results: &[BTreeMap<Target, Summary>]) -> String {
    let empty = Summary::default();
    let get = |row: &BTreeMap<Target, Summary>, target| row.get(&target).unwrap_or(&empty).clone();
    let mut table = String::new();
    table.push_str(
        "| scenario | qmp-demo | qmp-floor | qemu-storage-daemon | demo ÷ floor | demo ÷ QSD | goal |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for (scenario, row) in scenarios.iter().zip(results) {
        let memory = matches!(
            scenario.measure,
            Measure::Idle { .. } | Measure::Held { .. }
        );
        let (demo, floor, qsd) = (
            get(row, Target::Demo),
            get(row, Target::Floor),
            get(row, Target::Qsd),
        );
        let vs_floor = ratio(demo.value, floor.value);
        let vs_qsd = ratio(demo.value, qsd.value);
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            scenario.label,
            cell(&demo, memory),
            cell(&floor, memory),
            cell(&qsd, memory),
            format_ratio(vs_floor),
            format_ratio(vs_qsd),
            goal_text(scenario.goal, demo.value, vs_floor, vs_qsd)
        );
    }
    table.push_str(
        "\nLatency p50 / p99 and server CPU per command (CPU time of the server process ÷ \
         commands; on 2 shared cores the steadier measure of server cost):\n\n\
         | scenario | qmp-demo | qmp-floor | qemu-storage-daemon |\n|---|---:|---:|---:|\n",
    );
    for (scenario, row) in scenarios.iter().zip(results) {
        if !matches!(scenario.measure, Measure::Load { .. }) {
            continue;
        }
        let cells: Vec<String> = [Target::Demo, Target::Floor, Target::Qsd]
            .into_iter()
            .map(|target| {
                let summary = get(row, target);
                if summary.not_applicable.is_some() {
                    return "n/a".into();
                }
                if summary.value.is_none() {
                    return "–".into();
                }
                let errors = if summary.errors > 0 {
                    format!("; {} errors", summary.errors)
                } else {
                    String::new()
                };
                format!(
                    "{} / {}; {:.1} µs CPU/cmd{errors}",
                    micros(summary.p50_us),
                    micros(summary.p99_us),
                    summary.cpu_us_per_command.unwrap_or(f64::NAN)
                )
            })
            .collect();
        let _ = writeln!(table, "| {} | {} |", scenario.label, cells.join(" | "));
    }
    let failures: Vec<String> = scenarios
        .iter()
        .zip(results)
        .flat_map(|(scenario, row)| {
            row.iter().flat_map(move |(target, summary)| {
                summary.failures.iter().map(move |failure| {
                    format!("- {} on {}: {failure}", scenario.key, target.name())
                })
            })
        })
        .collect();
    if !failures.is_empty() {
        table.push_str("\nFailed measurements:\n\n");
        table.push_str(&failures.join("\n"));
        table.push('\n');
    }
    table
}

/// First line of a command's output, or `unknown`.
fn command_line_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8(out.stdout)
                .ok()?
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Machine, versions and date, for the docs.
fn machine_note(cli: &Cli) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_default();
    let qsd = if cli.qsd == "none" {
        "not run".into()
    } else {
        command_line_output(&cli.qsd, &["--version"])
    };
    let commit = command_line_output("git", &["describe", "--always", "--dirty"]);
    let date = command_line_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    format!(
        "{date}, commit {commit}; {cores} cores ({cpu}), Linux {kernel}, shared with the load \
         generator; {qsd}"
    )
}

/// Replaces the generated block of `doc`, between [`DOC_BEGIN`] and [`DOC_END`].
fn update_doc(doc: &Path, block: &str) -> Result<(), BoxError> {
    let text = std::fs::read_to_string(doc)
        .map_err(|err| format!("cannot read {}: {err}", doc.display()))?;
    let (Some(begin), Some(end)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        return Err(format!(
            "{} lacks the {DOC_BEGIN} / {DOC_END} markers",
            doc.display()
        )
        .into());
    };
    let updated = format!("{}{DOC_BEGIN}\n{block}{}", &text[..begin], &text[end..]);
    std::fs::write(doc, updated)?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("qmp-compare: {err}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<(), BoxError> {
    let started = Instant::now();
    let invocation = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let mut targets = vec![Target::Demo, Target::Floor];
    if cli.qsd != "none" {
        targets.push(Target::Qsd);
    }
    let work_dir = std::env::temp_dir().join(format!("qmp-compare.{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    if let Some(parent) = cli.results.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let results = std::fs::File::create(&cli.results)?;
    let wanted = |key: &str| cli.only.is_empty() || cli.only.iter().any(|only| only == key);
    let main_scenarios: Vec<Scenario> = scenarios(&cli)
        .into_iter()
        .filter(|scenario| wanted(scenario.key))
        .collect();
    let sweep = if wanted("sweep") {
        sweep_scenarios(&cli)
    } else {
        Vec::new()
    };
    eprintln!(
        "qmp-compare: {} scenarios{} on {}; every measurement goes to {}",
        main_scenarios.len(),
        if sweep.is_empty() {
            ""
        } else {
            " and the client sweep"
        },
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        cli.results.display()
    );
    let mut runner = Runner {
        cli,
        work_dir,
        results,
    };

    let mut main_results = Vec::new();
    for scenario in &main_scenarios {
        eprintln!("{}", scenario.label);
        main_results.push(runner.run_scenario(scenario, &targets)?);
    }
    let mut sweep_results = Vec::new();
    for scenario in &sweep {
        eprintln!("{}", scenario.label);
        sweep_results.push(runner.run_scenario(scenario, &targets)?);
    }
    let _ = std::fs::remove_dir_all(&runner.work_dir);

    let elapsed = started.elapsed().as_secs_f64();
    let table = report(&main_scenarios, &main_results);
    println!("{table}");
    println!("Run took {elapsed:.0} s.");

    let names: Vec<&str> = targets.iter().map(|target| target.name()).collect();
    let throughput: Vec<svg::Series<'_>> = targets
        .iter()
        .map(|&target| svg::Series {
            name: target.name(),
            points: SWEEP_CLIENTS
                .iter()
                .zip(&sweep_results)
                .filter_map(|(&clients, row)| Some((clients, row.get(&target)?.value?)))
                .collect(),
        })
        .collect();
    let latency: Vec<svg::LatencyGroup<'_>> = main_scenarios
        .iter()
        .zip(&main_results)
        .filter(|(scenario, _)| matches!(scenario.measure, Measure::Load { .. }))
        .map(|(scenario, row)| svg::LatencyGroup {
            label: scenario.label.split(' ').next().unwrap_or(scenario.key),
            bars: targets
                .iter()
                .map(|target| {
                    let summary = row.get(target)?;
                    Some((summary.p50_us?, summary.p99_us?))
                })
                .collect(),
        })
        .collect();
    let chart = svg::render(
        "qmp-demo vs qmp-floor vs qemu-storage-daemon (one qmp-compare run)",
        &names,
        &throughput,
        &SWEEP_CLIENTS,
        &latency,
    );
    std::fs::create_dir_all(&runner.cli.out)?;
    let svg_path = runner.cli.out.join("performance.svg");
    std::fs::write(&svg_path, &chart)?;
    let block = format!(
        "Produced by `scripts/bench-compare{}` in {elapsed:.0} s on {}.\n\n{table}\n",
        if invocation.is_empty() {
            String::new()
        } else {
            format!(" {invocation}")
        },
        machine_note(&runner.cli),
    );
    let table_path = runner.cli.out.join("performance-table.md");
    std::fs::write(&table_path, &block)?;
    eprintln!("wrote {} and {}", svg_path.display(), table_path.display());
    if !runner.cli.update_docs {
        return Ok(());
    }
    std::fs::create_dir_all(&runner.cli.docs)?;
    let svg_path = runner.cli.docs.join("performance.svg");
    std::fs::write(&svg_path, chart)?;
    update_doc(&runner.cli.docs.join("performance.md"), &block)?;
    eprintln!(
        "updated {} and the table in {}",
        svg_path.display(),
        runner.cli.docs.join("performance.md").display()
    );
    Ok(())
}
