//! Starting a fresh server per measurement and running qmp-bench against it (or, for the
//! registry, measuring in process).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::scenarios::{DELAY_HOLD, Measure, QSD_MAX_CLIENTS, Scenario, Target};
use crate::{BoxError, Cli};

/// How long a freshly started server may take to listen on all its sockets.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Threads of a tokio runtime (workers and blocking threads) are named this by default.
const TOKIO_THREAD_NAME: &str = "tokio-rt-worker";

/// A started server; killed (it is our own child) and its sockets removed when dropped.
pub struct Spawned {
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

/// How to start a server for one measurement.
#[derive(Clone, Copy, Default)]
struct Setup {
    /// Clients the measurement connects (QSD gets one monitor per client).
    clients: usize,
    /// Commands one client keeps in flight.
    max_in_flight: usize,
    /// Start the demo and the floor with exactly `clients` client slots (paused runs
    /// observe departures through the limit).
    exact_client_limit: bool,
    /// `TOKIO_WORKER_THREADS` for the server.
    worker_threads: Option<usize>,
    /// The floor's event mode (`stop` and `cont` emit).
    events: bool,
}

impl Measure {
    fn setup(&self) -> Setup {
        let base = Setup::default();
        match *self {
            Measure::Load {
                clients,
                depth,
                worker_threads,
                ..
            } => Setup {
                clients,
                max_in_flight: depth,
                worker_threads,
                ..base
            },
            Measure::Idle { ref steps } => Setup {
                clients: steps.iter().copied().max().unwrap_or(1),
                max_in_flight: 1,
                ..base
            },
            Measure::Held { clients, depth } => Setup {
                clients,
                max_in_flight: depth,
                ..base
            },
            Measure::Paused { clients, .. } => Setup {
                clients,
                max_in_flight: 1,
                exact_client_limit: true,
                ..base
            },
            Measure::Broadcast { clients, .. } | Measure::Storm { clients, .. } => Setup {
                // The controller is one more client.
                clients: clients + 1,
                max_in_flight: 128,
                events: true,
                ..base
            },
            Measure::Registry { .. } => base,
        }
    }
}

/// Everything a run needs to start servers and load.
pub struct Runner {
    pub cli: Cli,
    /// Rounds of each throughput scenario.
    pub rounds: usize,
    pub work_dir: PathBuf,
    pub results: std::fs::File,
}

/// What one target produced in one scenario: every run's JSON, and the failures.
#[derive(Default, Clone)]
pub struct Runs {
    pub samples: Vec<Value>,
    pub failures: Vec<String>,
    pub not_applicable: Option<&'static str>,
}

impl Runner {
    /// Starts `target` with one socket (QSD: one monitor per client, as QEMU serves one
    /// client per monitor) and waits until every socket accepts connections.
    fn spawn(&self, target: Target, setup: Setup) -> Result<Spawned, BoxError> {
        let socket = |name: &str| self.work_dir.join(name);
        let client_limit = if setup.exact_client_limit {
            setup.clients
        } else {
            (setup.clients + 16).max(1024)
        };
        let (mut command, sockets) = match target {
            Target::Demo => {
                let path = socket("demo.sock");
                let mut command = Command::new(self.cli.bin_dir.join("qmp-demo"));
                command
                    .arg("--qmp")
                    .arg(format!("unix:{}", path.display()))
                    .arg("--max-in-flight")
                    .arg(setup.max_in_flight.max(128).to_string())
                    .arg("--max-clients")
                    .arg(client_limit.to_string())
                    .env("RUST_LOG", "error");
                (command, vec![path])
            }
            Target::Floor => {
                let path = socket("floor.sock");
                let mut command = Command::new(self.cli.bin_dir.join("qmp-floor"));
                command.arg("--unix").arg(&path);
                if setup.exact_client_limit {
                    command.arg("--max-clients").arg(client_limit.to_string());
                }
                if setup.events {
                    command.arg("--events");
                }
                (command, vec![path])
            }
            Target::Qsd => {
                let mut command = Command::new(&self.cli.qsd);
                let mut sockets = Vec::with_capacity(setup.clients);
                for index in 0..setup.clients.clamp(1, QSD_MAX_CLIENTS) {
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
        // Set or not for every target alike: a value left in our own environment would
        // otherwise reach the servers.
        match setup.worker_threads {
            Some(threads) => command.env("TOKIO_WORKER_THREADS", threads.to_string()),
            None => command.env_remove("TOKIO_WORKER_THREADS"),
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
        if let Measure::Registry { rounds } = *measure {
            return Ok(registry_json(rounds));
        }
        let setup = measure.setup();
        let server = self.spawn(target, setup)?;
        let pid = server.child.id();
        // Verified rather than trusted: the runtime reads TOKIO_WORKER_THREADS itself.
        let threads = runtime_threads(pid);
        if let Some(wanted) = setup
            .worker_threads
            .filter(|&wanted| threads != Some(wanted))
        {
            return Err(format!(
                "{} runs {threads:?} tokio threads, not the {wanted} TOKIO_WORKER_THREADS asks for",
                target.name()
            )
            .into());
        }
        let mut bench = Command::new(self.cli.bin_dir.join("qmp-bench"));
        bench.arg("--json").arg("--pid").arg(pid.to_string());
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
                ..
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
            Measure::Idle { ref steps } => {
                let steps: Vec<String> = steps
                    .iter()
                    .filter(|&&clients| target != Target::Qsd || clients <= QSD_MAX_CLIENTS)
                    .map(usize::to_string)
                    .collect();
                bench
                    .args(["--idle-clients", &steps.join(",")])
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
            Measure::Paused {
                clients,
                idle_seconds,
                departures,
            } => {
                // Legacy clients: QEMU suspends a legacy client's monitor while its
                // command runs, so the server stops reading them.
                bench
                    .args(["--paused-clients", &clients.to_string()])
                    .args(["--idle-seconds", &idle_seconds.to_string()])
                    .args(["--departures", &departures.to_string()])
                    .arg("--caps=");
            }
            Measure::Broadcast { clients, events } => {
                bench
                    .args(["--event-clients", &clients.to_string()])
                    .args(["--events", &events.to_string()])
                    .arg(format!("--caps={}", caps(true)));
            }
            Measure::Storm {
                clients,
                rate,
                seconds,
            } => {
                bench
                    .args(["--event-clients", &clients.to_string()])
                    .args(["--event-rate", &rate.to_string()])
                    .args(["--duration", &seconds.to_string()])
                    .arg(format!("--caps={}", caps(true)));
            }
            Measure::Registry { .. } => unreachable!("measured in process above"),
        }
        let output = bench.stdin(Stdio::null()).output()?;
        drop(server);
        let mut json: Value = match serde_json::from_slice(&output.stdout) {
            Ok(json) if output.status.success() => json,
            // A storm whose clients missed events still says what happened.
            Ok(json) if matches!(measure, Measure::Storm { .. }) => json,
            _ => return Err(String::from_utf8_lossy(&output.stderr).trim().into()),
        };
        json["server_tokio_threads"] = threads.into();
        Ok(json)
    }

    /// Runs `scenario` on every target, alternating them round by round.
    pub fn run_scenario(
        &mut self,
        scenario: &Scenario,
        targets: &[Target],
    ) -> Result<BTreeMap<Target, Runs>, BoxError> {
        let rounds = match scenario.measure {
            Measure::Load { .. } => self.rounds,
            _ => self.cli.memory_rounds,
        }
        .max(1);
        let mut runs: BTreeMap<Target, Runs> = BTreeMap::new();
        let runnable: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|target| {
                let reason = scenario.not_applicable_to(*target);
                runs.entry(*target).or_default().not_applicable = reason;
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
                let entry = runs.entry(target).or_default();
                match self.measure(target, &scenario.measure) {
                    Ok(json) => {
                        eprintln!("{}", brief(&json));
                        let record = serde_json::json!({
                            "scenario": scenario.key,
                            "label": scenario.label,
                            "target": target.name(),
                            "round": round,
                            "result": json,
                        });
                        writeln!(self.results, "{record}")?;
                        entry.samples.push(json);
                    }
                    Err(err) => {
                        eprintln!("FAILED: {err}");
                        entry.failures.push(err.to_string());
                    }
                }
            }
        }
        Ok(runs)
    }
}

/// The registry ratios, measured here with the dispatcher linked in.
fn registry_json(rounds: usize) -> Value {
    let ratios = qmp_benches::registry::interleaved_ratios(rounds, rounds / 10);
    serde_json::json!({
        "rounds": ratios.rounds,
        "ns_per_command": [
            ratios.ns_per_command(0),
            ratios.ns_per_command(1),
            ratios.ns_per_command(2),
        ],
        "all_of_10k_ratio": ratios.all_of_10k(),
        "ten_of_10k_ratio": ratios.ten_of_10k(),
    })
}

/// Threads of process `pid` named like tokio's (its workers, and any blocking threads).
fn runtime_threads(pid: u32) -> Option<usize> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(Result::ok)
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.trim() == TOKIO_THREAD_NAME)
            })
            .count(),
    )
}

/// A one-line digest of a qmp-bench result for the progress output.
fn brief(json: &Value) -> String {
    let number = |key: &str| json[key].as_f64().unwrap_or(f64::NAN);
    if json.get("commands_per_sec").is_some() {
        format!(
            "{:.0} cmds/s, p50 {:.0} us, p99 {:.0} us",
            number("commands_per_sec"),
            number("p50_us"),
            number("p99_us")
        )
    } else if let Some(steps) = json["steps"].as_array() {
        steps
            .iter()
            .map(|step| {
                format!(
                    "{}: {:.2} KiB",
                    step["clients"],
                    step["kib_per_client"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
            + " per idle client"
    } else if json.get("kib_per_command").is_some() {
        format!(
            "{:.3} KiB per in-flight command ({} early replies)",
            number("kib_per_command"),
            json["early_replies"]
        )
    } else if json.get("paused_clients").is_some() {
        format!(
            "idle CPU {:.2}% of a core; departures noticed in p50 {:.1} ms, max {:.1} ms",
            number("idle_server_cpu_percent"),
            number("departure_ms_p50"),
            number("departure_ms_max")
        )
    } else if json.get("rate").is_some() {
        format!(
            "{} of {} clients got every event in order; last client p99 {:.0} ms behind; \
             {:.2} us CPU per delivery; RSS {} -> {} KiB",
            json["complete_clients"],
            json["event_clients"],
            number("lag_ms_p99"),
            number("us_per_delivery"),
            json["rss_early_kib"],
            json["rss_after_kib"]
        )
    } else if json.get("event_clients").is_some() {
        format!(
            "last client after p50 {:.1} ms; {:.2} us CPU per delivery",
            number("last_client_ms_p50"),
            number("us_per_delivery")
        )
    } else if json.get("all_of_10k_ratio").is_some() {
        format!(
            "all 10,000 ÷ 10: {:.2}×; 10 of 10,000 ÷ 10: {:.2}×",
            number("all_of_10k_ratio"),
            number("ten_of_10k_ratio")
        )
    } else {
        json.to_string()
    }
}
