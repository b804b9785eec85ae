//! qmp-compare: qmp-demo, qmp-floor and qemu-storage-daemon side by side, in one run.
//!
//! Run with `scripts/bench-compare` (builds, then runs this). Every scenario runs each
//! target `--rounds` times, alternating targets (a different one first each round), on a
//! freshly started server per measurement; the median is reported. The load itself is
//! `qmp-bench`, run as a child process with `--pid` so it samples the server's CPU time and
//! memory; the registry row is measured in process. At the end a table of values and ratios
//! is printed and written with its chart to `target/qmp-compare/` (`--out`); only with
//! `--update-docs` are `docs/performance.svg` and the generated block of
//! `docs/performance.md` replaced.
//!
//! The open-file limit is raised first (soft to hard, and the hard limit too where that is
//! allowed), so that the servers started here inherit it; idle-client steps that still do
//! not fit are left out and the report says so.

mod report;
mod runner;
mod scenarios;
mod svg;

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;

use report::median_of;
use scenarios::{Measure, Metric, Scenario, Sizes, Target, grouped};

type BoxError = Box<dyn Error + Send + Sync>;

/// Marks the generated part of docs/performance.md.
const DOC_BEGIN: &str = "<!-- qmp-compare:begin -->";
const DOC_END: &str = "<!-- qmp-compare:end -->";
/// Descriptors each process keeps besides its clients (listeners, pipes, /proc files).
const SPARE: u64 = qmp_benches::nofile::SPARE_DESCRIPTORS;

#[derive(Parser)]
#[command(
    about = "Side-by-side benchmark of qmp-demo, qmp-floor and qemu-storage-daemon",
    after_help = "Scenarios for --only: seq, async8, async64, deferred, legacy, threads1, \
                  threads2, sweep, idle, held, paused, broadcast, storm, registry."
)]
struct Cli {
    /// Seconds per throughput measurement (the sweep uses half). Default 2, --quick 0.5.
    #[arg(long)]
    seconds: Option<f64>,
    /// Measurements per target and throughput scenario; the median is reported. Default 3,
    /// --quick 1.
    #[arg(long)]
    rounds: Option<usize>,
    /// Measurements per target of the other scenarios (memory, paused, events).
    #[arg(long, default_value_t = 1)]
    memory_rounds: usize,
    /// A quick look (under a minute): one round of 0.5 s, scaled-down clients
    /// (idle up to 10,000, paused and events 1,000), a 2 s storm, no 10,000-client sweep
    /// point. Explicit options still win.
    #[arg(long)]
    quick: bool,
    /// Where qmp-bench, qmp-floor and qmp-demo are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The qemu-storage-daemon binary; `none` leaves it out.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: String,
    /// Idle-client steps, one growing set of clients per target (QSD: up to 1,000). Steps
    /// beyond the open-file limit are left out, and one at the largest multiple of 1,000
    /// that fits is measured instead. Default 1000,10000,100000; --quick 1000,10000.
    #[arg(long, value_delimiter = ',')]
    idle_clients: Vec<usize>,
    /// Clients of the memory-per-command scenario.
    #[arg(long, default_value_t = 10)]
    held_clients: usize,
    /// Commands each of `--held-clients` holds in flight. Default 10,000; --quick 1,000.
    #[arg(long)]
    held_depth: Option<usize>,
    /// Paused legacy clients (each behind an `x-delay` of 60 s), one scenario per count.
    /// Default 1000,10000; --quick 1000.
    #[arg(long, value_delimiter = ',')]
    paused_clients: Vec<usize>,
    /// Seconds over which paused clients' idle server CPU is measured.
    #[arg(long, default_value_t = 3.0)]
    idle_seconds: f64,
    /// Departures timed per paused scenario.
    #[arg(long, default_value_t = 10)]
    departures: usize,
    /// Clients of the one-event broadcast. Default 10,000; --quick 1,000.
    #[arg(long)]
    broadcast_clients: Option<usize>,
    /// Events broadcast one at a time (alternately STOP and RESUME).
    #[arg(long, default_value_t = 20)]
    broadcast_events: usize,
    /// Clients of the event storm. Default 1,000: the 10,000 × 1,000 events/s is
    /// ten million deliveries a second, which the load generator on these two cores cannot
    /// read; give 10000 to try.
    #[arg(long)]
    storm_clients: Option<usize>,
    /// Events per second of the storm.
    #[arg(long, default_value_t = 1000.0)]
    storm_rate: f64,
    /// Seconds of the storm. Default 10; --quick 2.
    #[arg(long)]
    storm_seconds: Option<f64>,
    /// Rounds of each registry case (interleaved). Default 1500; --quick 300.
    #[arg(long)]
    registry_rounds: Option<usize>,
    /// Client counts of the throughput sweep drawn in the chart. Default
    /// 1,4,16,64,1000,10000; --quick 1,4,16,64,1000.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Run only these scenarios (comma-separated; see the list below).
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

impl Cli {
    /// Throughput rounds, with --quick's default.
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }
}

/// `given` unless empty, else the --quick or full default.
fn list_or(given: &[usize], quick: bool, quick_default: &[usize], full: &[usize]) -> Vec<usize> {
    if !given.is_empty() {
        given.to_vec()
    } else if quick {
        quick_default.to_vec()
    } else {
        full.to_vec()
    }
}

/// The sizes of this run: the options, --quick's defaults, and what the open-file limit
/// allows (`limit`: the soft limit now in force, inherited by every server started here).
fn sizes(cli: &Cli, limit: u64) -> Sizes {
    let quick = cli.quick;
    let pick = |given: Option<usize>, quick_value: usize, full: usize| {
        given.unwrap_or(if quick { quick_value } else { full })
    };
    let fits = |clients: usize| clients as u64 + SPARE <= limit;
    let wanted = list_or(
        &cli.idle_clients,
        quick,
        &[1000, 10_000],
        &[1000, 10_000, 100_000],
    );
    let mut idle_steps: Vec<usize> = wanted.iter().copied().filter(|&n| fits(n)).collect();
    let skipped: Vec<usize> = wanted.iter().copied().filter(|&n| !fits(n)).collect();
    let mut idle_skipped = None;
    if !skipped.is_empty() {
        let largest = (limit.saturating_sub(SPARE) / 1000 * 1000) as usize;
        if idle_steps.last().is_none_or(|&last| largest > last) && largest > 0 {
            idle_steps.push(largest);
        }
        idle_skipped = Some(format!(
            "Idle clients: {} not measured: the open-file limit is {limit} (hard; raising \
             it needs CAP_SYS_RESOURCE), so at most {} clients fit in each process; the \
             largest step is {} instead.",
            skipped
                .iter()
                .map(|&n| grouped(n))
                .collect::<Vec<_>>()
                .join(", "),
            grouped(limit.saturating_sub(SPARE) as usize),
            idle_steps.last().map_or("none".into(), |&n| grouped(n)),
        ));
    }
    let paused = list_or(&cli.paused_clients, quick, &[1000], &[1000, 10_000]);
    Sizes {
        seconds: cli.seconds.unwrap_or(if quick { 0.5 } else { 2.0 }),
        idle_steps,
        idle_skipped,
        held_clients: cli.held_clients,
        held_depth: pick(cli.held_depth, 1000, 10_000),
        paused: paused.into_iter().filter(|&n| fits(n + 1)).collect(),
        idle_seconds: cli.idle_seconds,
        departures: cli.departures,
        broadcast_clients: pick(cli.broadcast_clients, 1000, 10_000),
        broadcast_events: cli.broadcast_events,
        storm_clients: pick(cli.storm_clients, 1000, 1000),
        storm_rate: cli.storm_rate,
        storm_seconds: cli.storm_seconds.unwrap_or(if quick { 2.0 } else { 10.0 }),
        registry_rounds: pick(cli.registry_rounds, 300, 1500),
        sweep: list_or(
            &cli.sweep,
            quick,
            &[1, 4, 16, 64, 1000],
            &[1, 4, 16, 64, 1000, 10_000],
        )
        .into_iter()
        .filter(|&n| fits(n))
        .collect(),
    }
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

/// The most clients any scenario of this run asks for (one process's share), before the
/// open-file limit is taken into account.
fn most_clients(cli: &Cli) -> u64 {
    let sizes = sizes(cli, u64::MAX);
    let lists = [&sizes.idle_steps, &sizes.paused, &sizes.sweep];
    let listed = lists.iter().flat_map(|list| list.iter().copied()).max();
    let single = [sizes.broadcast_clients, sizes.storm_clients]
        .into_iter()
        .max();
    // The paused scenarios' waiting connection and the event scenarios' controller.
    (listed.max(single).unwrap_or(0) + 1) as u64
}

fn run(cli: Cli) -> Result<(), BoxError> {
    let started = Instant::now();
    let invocation = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    // Raised here, before any server starts, so that every server inherits it; what does
    // not fit is scaled down in `sizes`.
    let limit = match qmp_benches::nofile::raise_to(most_clients(&cli) + SPARE) {
        Ok(limit) => limit,
        Err(err) => {
            eprintln!("qmp-compare: {err}; scaling down to the limit instead");
            qmp_benches::nofile::current()
        }
    };
    let sizes = sizes(&cli, limit);
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
    let main_scenarios: Vec<Scenario> = scenarios::scenarios(&sizes)
        .into_iter()
        .filter(|scenario| wanted(scenario.key))
        .collect();
    let sweep = if wanted("sweep") {
        scenarios::sweep_scenarios(&sizes)
    } else {
        Vec::new()
    };
    eprintln!(
        "qmp-compare: {} scenarios{} on {}; open-file limit {limit}; every measurement goes \
         to {}",
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
    let mut notes = Vec::new();
    if let (Some(note), true) = (&sizes.idle_skipped, wanted("idle")) {
        eprintln!("qmp-compare: {note}");
        notes.push(note.clone());
    }
    let mut runner = runner::Runner {
        cli,
        rounds: 0,
        work_dir,
        results,
    };
    runner.rounds = runner.cli.rounds();

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
    let table = report::report(&main_scenarios, &main_results, &notes);
    println!("{table}");
    println!("Run took {elapsed:.0} s.");

    let chart = chart(
        &targets,
        &sizes,
        &main_scenarios,
        &main_results,
        &sweep_results,
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

/// The chart: throughput and KiB per idle client against clients (one axis from 1 to the
/// largest count measured), and latency bars of the load scenarios.
fn chart(
    targets: &[Target],
    sizes: &Sizes,
    scenarios: &[Scenario],
    results: &[std::collections::BTreeMap<Target, runner::Runs>],
    sweep_results: &[std::collections::BTreeMap<Target, runner::Runs>],
) -> String {
    let names: Vec<&str> = targets.iter().map(|target| target.name()).collect();
    let mut client_axis: Vec<usize> = sizes
        .sweep
        .iter()
        .chain(&sizes.idle_steps)
        .copied()
        .collect();
    client_axis.sort_unstable();
    client_axis.dedup();
    let rate = Metric::Pointer("/commands_per_sec".into());
    let throughput: Vec<svg::Series<'_>> = targets
        .iter()
        .map(|&target| svg::Series {
            name: target.name(),
            points: sizes
                .sweep
                .iter()
                .zip(sweep_results)
                .filter_map(|(&clients, row)| Some((clients, median_of(row.get(&target)?, &rate)?)))
                .collect(),
        })
        .collect();
    let idle = scenarios
        .iter()
        .zip(results)
        .find(|(scenario, _)| matches!(scenario.measure, Measure::Idle { .. }));
    let memory: Vec<svg::Series<'_>> = targets
        .iter()
        .map(|&target| svg::Series {
            name: target.name(),
            points: idle
                .and_then(|(_, row)| row.get(&target))
                .map(|runs| {
                    sizes
                        .idle_steps
                        .iter()
                        .enumerate()
                        .filter_map(|(index, &clients)| {
                            let metric = Metric::Pointer(format!("/steps/{index}/kib_per_client"));
                            let step_clients = Metric::Pointer(format!("/steps/{index}/clients"));
                            // QSD's steps stop at 1,000: match by count, not position.
                            (median_of(runs, &step_clients)? as usize == clients)
                                .then(|| median_of(runs, &metric))
                                .flatten()
                                .map(|kib| (clients, kib))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let p50 = Metric::Pointer("/p50_us".into());
    let p99 = Metric::Pointer("/p99_us".into());
    let latency: Vec<svg::LatencyGroup<'_>> = scenarios
        .iter()
        .zip(results)
        .filter(|(scenario, _)| {
            matches!(
                scenario.measure,
                Measure::Load {
                    worker_threads: None,
                    ..
                }
            )
        })
        .map(|(scenario, row)| svg::LatencyGroup {
            label: scenario.label.split(' ').next().unwrap_or(scenario.key),
            bars: targets
                .iter()
                .map(|target| {
                    let runs = row.get(target)?;
                    Some((median_of(runs, &p50)?, median_of(runs, &p99)?))
                })
                .collect(),
        })
        .collect();
    svg::render(
        "qmp-demo vs qmp-floor vs qemu-storage-daemon (one qmp-compare run)",
        &names,
        &svg::Lines {
            throughput: &throughput,
            memory: &memory,
            client_axis: &client_axis,
            depth: scenarios::SWEEP_DEPTH,
        },
        &latency,
    )
}
