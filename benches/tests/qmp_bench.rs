//! qmp-bench as a process, against a qmp-floor it spawns: short runs (under a second) that
//! check what the tool reports and how it exits.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_qmp-bench");
const FLOOR: &str = env!("CARGO_BIN_EXE_qmp-floor");
/// No run here may take longer, however broken the tool.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// A socket path unique to this test process and call.
fn socket() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "qmp-bench-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// `qmp-bench --spawn qmp-floor --unix SOCKET ARGS...`, without a terminal.
fn bench_on_floor(args: &[&str]) -> Command {
    let socket = socket();
    let mut command = Command::new(BENCH);
    command
        .arg("--spawn")
        // The floor holds none of our pipes: a qmp-bench that leaves it behind cannot
        // keep `wait_with_output` from returning.
        .arg(format!("{FLOOR} --unix {} 2>/dev/null", socket.display()))
        .arg("--unix")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end, killing it after [`RUN_TIMEOUT`].
fn finish(mut command: Command) -> Output {
    let child = command.spawn().expect("spawn qmp-bench");
    wait(child, RUN_TIMEOUT)
}

fn wait(mut child: std::process::Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("qmp-bench still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn json_has_the_settings_and_percentiles_of_a_clean_run() {
    let output = finish(bench_on_floor(&[
        "--clients",
        "2",
        "--depth",
        "4",
        "--caps",
        "async",
        "--duration",
        "0.5",
        "--json",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json(&output);
    let settings = &result["settings"];
    assert_eq!(settings["command"], r#"{"execute":"query-version"}"#);
    assert_eq!(settings["caps"], serde_json::json!(["async"]));
    assert_eq!(settings["clients"], 2);
    assert_eq!(settings["depth"], 4);
    assert_eq!(settings["duration_s"], 0.5);
    assert!(
        settings["targets"][0]
            .as_str()
            .unwrap()
            .starts_with("unix:/")
    );
    assert_eq!(result["errors"], 0);
    assert!(result["commands"].as_u64().unwrap() > 0);
    let percentiles: Vec<f64> = ["p50_us", "p90_us", "p99_us", "p99_9_us", "max_us"]
        .iter()
        .map(|key| {
            result[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key}: {result}"))
        })
        .collect();
    assert!(
        percentiles.windows(2).all(|w| w[0] <= w[1]),
        "{percentiles:?}"
    );
    assert!(result["server_cpu_seconds"].as_f64().is_some(), "{result}");
    // Sampled during the run: the floor is a few MB, never zero.
    assert!(
        result["server_peak_rss_kib"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert_eq!(result["interrupted"], false);
}

#[test]
fn failing_commands_are_counted_apart_and_fail_the_run() {
    // The floor answers a request without `execute` with an error.
    let output = finish(bench_on_floor(&[
        "--caps",
        "async",
        "--depth",
        "2",
        "--duration",
        "0.3",
        "--json",
        "--command",
        r#"{"nothing":1}"#,
    ]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let result = json(&output);
    assert!(result["errors"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["errors"], result["commands"]);
    assert_eq!(result["ok"], 0);
    // No successful command, so no latency figures rather than the failures' latency.
    assert!(
        result["p50_us"].is_null() && result["max_us"].is_null(),
        "{result}"
    );
    let err = stderr(&output);
    assert!(
        err.contains("FAILED") && err.contains("lacks member 'execute'"),
        "{err}"
    );
}

#[test]
fn zero_clients_or_depth_are_rejected() {
    for flag in ["--clients", "--depth"] {
        let output = finish(bench_on_floor(&[flag, "0", "--duration", "0.2"]));
        assert!(!output.status.success(), "{flag} 0 accepted");
        let err = stderr(&output);
        assert!(err.contains(flag) && err.contains("at least 1"), "{err}");
        assert!(output.stdout.is_empty());
    }
}

#[test]
fn a_connection_error_names_the_path() {
    let missing = socket();
    let mut command = Command::new(BENCH);
    command
        .arg("--unix")
        .arg(&missing)
        .args(["--duration", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = finish(command);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("cannot connect to unix:{}", missing.display())),
        "{err}"
    );
}

#[test]
fn sigint_mid_run_prints_the_results_so_far() {
    let mut command = bench_on_floor(&["--caps", "async", "--duration", "30", "--json"]);
    let child = command.spawn().expect("spawn qmp-bench");
    std::thread::sleep(Duration::from_millis(700));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let start = Instant::now();
    let output = wait(child, Duration::from_secs(10));
    eprintln!("exit {:?} after SIGINT", start.elapsed());
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["interrupted"], true);
    assert!(result["commands"].as_u64().unwrap() > 0, "{result}");
    assert!(result["seconds"].as_f64().unwrap() < 10.0, "{result}");
    assert!(stderr(&output).contains("interrupted"));
}

#[test]
fn no_progress_when_stderr_is_not_a_terminal() {
    // Long enough for a progress line or two, were it shown.
    let output = finish(bench_on_floor(&["--caps", "async", "--duration", "1.3"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(!err.contains("replies") && !err.contains('\r'), "{err:?}");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.contains("cmds/s") && out.contains("p99.9"), "{out}");
}

/// `qmp-bench --spawn "qmp-floor --unix SOCKET FLOOR_ARGS..." --unix SOCKET ARGS...`.
fn bench_on_floor_with(floor_args: &str, args: &[&str]) -> Command {
    let socket = socket();
    let mut command = Command::new(BENCH);
    command
        .arg("--spawn")
        .arg(format!(
            "{FLOOR} --unix {} {floor_args} 2>/dev/null",
            socket.display()
        ))
        .arg("--unix")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn idle_steps_report_each_count_of_one_growing_set() {
    let output = finish(bench_on_floor(&[
        "--idle-clients",
        "20,50",
        "--caps",
        "async",
        "--json",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json(&output);
    let steps = result["steps"].as_array().expect("steps");
    let clients: Vec<u64> = steps
        .iter()
        .map(|s| s["clients"].as_u64().unwrap())
        .collect();
    assert_eq!(clients, [20, 50]);
    for step in steps {
        assert!(step["kib_per_client"].as_f64().is_some(), "{result}");
        assert!(step["rss_after_kib"].as_u64().unwrap() > 0, "{result}");
    }
    // The last step is also given at the top level, as before steps existed.
    assert_eq!(result["idle_clients"], 50);
    assert_eq!(result["kib_per_client"], steps[1]["kib_per_client"]);
}

#[test]
fn paused_clients_report_idle_cpu_and_time_their_departures() {
    let output = finish(bench_on_floor_with(
        "--max-clients 12",
        &[
            "--paused-clients",
            "12",
            "--idle-seconds",
            "0.2",
            "--departures",
            "3",
            "--json",
        ],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["paused_clients"], 12);
    assert_eq!(result["departures"], 3);
    assert_eq!(result["departure_ms"].as_array().unwrap().len(), 3);
    assert!(result["departure_ms_max"].as_f64().is_some(), "{result}");
    assert!(
        result["idle_server_cpu_percent"].as_f64().is_some(),
        "{result}"
    );
    // The floor answers x-delay after 60 s: nothing may have come back yet.
    assert_eq!(result["unexpected_replies"], 0);
}

#[test]
fn paused_clients_need_a_server_at_its_client_limit() {
    // Without --max-clients the floor greets the probe at once: a departure could not be
    // told from that, so the run refuses rather than report nonsense.
    let output = finish(bench_on_floor(&[
        "--paused-clients",
        "3",
        "--idle-seconds",
        "0.1",
    ]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--max-clients 3"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn every_event_client_gets_each_broadcast_in_order() {
    let output = finish(bench_on_floor_with(
        "--events",
        &[
            "--event-clients",
            "15",
            "--events",
            "6",
            "--caps",
            "async",
            "--json",
        ],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["complete_clients"], 15);
    assert_eq!(result["out_of_order_clients"], 0);
    assert_eq!(result["replies"], 6);
    assert!(result["us_per_delivery"].as_f64().is_some(), "{result}");
    assert!(result["last_client_ms_max"].as_f64().is_some(), "{result}");
}

#[test]
fn a_storm_checks_every_client_and_samples_rss() {
    let output = finish(bench_on_floor_with(
        "--events",
        &[
            "--event-clients",
            "10",
            "--event-rate",
            "200",
            "--duration",
            "0.6",
            "--caps",
            "async",
            "--json",
        ],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let result = json(&output);
    assert_eq!(result["events"], 120);
    assert_eq!(result["complete_clients"], 10);
    assert_eq!(result["missing_clients"], 0);
    assert_eq!(result["disconnected_clients"], 0);
    assert!(!result["rss_samples"].as_array().unwrap().is_empty());
    assert!(result["lag_ms_max"].as_f64().is_some(), "{result}");
}

#[test]
fn without_events_mode_the_floor_sends_none_and_the_run_fails() {
    // `stop` and `cont` answer, but no event comes: the run must not pass as delivered.
    let output = finish(bench_on_floor(&[
        "--event-clients",
        "2",
        "--events",
        "1",
        "--event-timeout",
        "0.5",
        "--caps",
        "async",
    ]));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("reached 0 of 2 clients"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn too_few_open_files_is_said_before_connecting() {
    // `ulimit -n` in sh lowers the hard limit too, which qmp-bench cannot raise back
    // unless privileged (then it raises it and the run simply succeeds).
    let socket = socket();
    let script = format!(
        "ulimit -n 200 && exec {BENCH} --spawn '{FLOOR} --unix {0} 2>/dev/null' --unix {0} \
         --idle-clients 1000 --caps async",
        socket.display()
    );
    let mut command = Command::new("sh");
    command
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = finish(command);
    if output.status.success() {
        eprintln!("privileged: the hard limit was raised; nothing to check");
        return;
    }
    let err = stderr(&output);
    assert!(
        err.contains("open files needed") && err.contains("hard limit is 200"),
        "{err}"
    );
}
