//! `qmp-demo`'s `screendump` against targets that block: FIFOs without a reader or whose
//! reader never reads, cancels racing completion, and shutdown with a dump stuck.
//!
//! Like `demo.rs`, these run the `qmp-demo` binary found next to this test's executable
//! (`cargo build -p qmp-handlers` first, or `cargo test --workspace`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qmp_tests::{Client, Scratch, error_reply, return_reply};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Time for the demo to bind its socket, or to exit once told to.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the demo's 1920x1080 PPM: header plus RGB.
const PPM_SIZE: u64 = b"P6\n1920 1080\n255\n".len() as u64 + 1920 * 1080 * 3;
/// Threads the demo may add beyond its idle count: its blocking bound (2) plus slack for
/// tokio's own. A thread pinned per dump blows well past it.
const THREAD_SLACK: u64 = 6;

/// `target/<profile>/qmp-demo`, built by the qmp-handlers package.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps")
        .join("qmp-demo");
    assert!(
        binary.exists(),
        "{}: run `cargo build -p qmp-handlers` (same profile) first",
        binary.display()
    );
    binary
}

/// A running `qmp-demo`; dropping it kills the process before the directory goes.
struct Demo {
    child: Child,
    qmp: PathBuf,
    log: PathBuf,
    scratch: Scratch,
}

impl Demo {
    async fn start() -> Self {
        let scratch = Scratch::new();
        let qmp = scratch.path("qmp.sock");
        let log = scratch.path("demo.log");
        let mut child = Command::new(demo_binary())
            .arg("--qmp")
            .arg(format!("unix:{}", qmp.display()))
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qmp-demo");
        let start = Instant::now();
        while !qmp.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("qmp-demo exited with {status}");
            }
            assert!(start.elapsed() < PROCESS_TIMEOUT, "qmp-demo did not bind");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Demo {
            child,
            qmp,
            log,
            scratch,
        }
    }

    /// A client with `async` negotiated.
    async fn client(&self) -> Client {
        let mut client = Client::connect(&self.qmp).await;
        client.greeting().await;
        client.negotiate(&["oob", "async"]).await;
        client
    }

    /// A FIFO in the scratch directory.
    fn fifo(&self, name: &str) -> PathBuf {
        let path = self.scratch.path(name);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", path.display());
        path
    }

    /// A field of `/proc/PID/status` in its own unit (kB for memory).
    fn status(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A reader that holds `fifo` open and never reads. Read-write, so opening does not wait
/// for a writer (Linux semantics); the demo sees a reader all the same.
fn idle_reader(fifo: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo)
        .expect("open FIFO")
}

async fn screendump(client: &mut Client, filename: &Path, id: Value) {
    client
        .execute("screendump", json!({"filename": filename}), id)
        .await;
}

/// A screendump that succeeds within `limit` and writes a complete PPM.
async fn dump_ok(client: &mut Client, filename: &Path, limit: Duration) {
    let start = Instant::now();
    screendump(client, filename, json!("ok")).await;
    let reply = tokio::time::timeout(limit, client.recv_reply())
        .await
        .unwrap_or_else(|_| panic!("screendump did not answer within {limit:?}"));
    assert_eq!(reply, return_reply(json!({}), json!("ok")));
    assert_eq!(std::fs::metadata(filename).unwrap().len(), PPM_SIZE);
    eprintln!("screendump to a file: {:?}", start.elapsed());
}

#[tokio::test]
async fn fifo_without_reader_fails_at_once_and_pins_nothing() {
    let demo = Demo::start().await;
    let mut client = demo.client().await;
    let fifo = demo.fifo("no-reader");
    // Warm up: the first dump starts the blocking threads and allocates the usual buffers.
    dump_ok(&mut client, &demo.scratch.path("warm.ppm"), PROCESS_TIMEOUT).await;
    let threads = demo.status("Threads");
    let rss = demo.status("VmRSS");

    let desc = format!(
        "failed to open file '{}': No such device or address",
        fifo.display()
    );
    for i in 0..20 {
        screendump(&mut client, &fifo, json!(i)).await;
        let reply = tokio::time::timeout(Duration::from_secs(2), client.recv_reply())
            .await
            .expect("screendump to a FIFO without reader did not answer at once");
        assert_eq!(reply, error_reply(Some(json!(i)), "GenericError", &desc));
    }
    let (threads_now, rss_now) = (demo.status("Threads"), demo.status("VmRSS"));
    assert!(
        threads_now <= threads + THREAD_SLACK,
        "threads {threads} -> {threads_now}"
    );
    // Each pinned snapshot would hold ~6 MB; 20 of them are far past this.
    assert!(
        rss_now < rss + 48 * 1024,
        "VmRSS {rss} kB -> {rss_now} kB after 20 failed dumps"
    );
    dump_ok(
        &mut client,
        &demo.scratch.path("after.ppm"),
        PROCESS_TIMEOUT,
    )
    .await;
}

#[tokio::test]
async fn dumps_to_a_stalled_fifo_pin_no_thread_and_starve_no_one() {
    let demo = Demo::start().await;
    let mut bystander = demo.client().await;
    dump_ok(
        &mut bystander,
        &demo.scratch.path("warm.ppm"),
        PROCESS_TIMEOUT,
    )
    .await;
    let threads = demo.status("Threads");

    let fifo = demo.fifo("stalled");
    let reader = idle_reader(&fifo);
    // Three clients with ten dumps each into a pipe nobody drains.
    let mut attackers = Vec::new();
    for _ in 0..3 {
        let mut client = demo.client().await;
        for i in 0..10 {
            screendump(&mut client, &fifo, json!(i)).await;
        }
        attackers.push(client);
    }
    // Give every dump time to reach its write and block there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let busy = demo.status("Threads");
    assert!(
        busy <= threads + THREAD_SLACK,
        "30 stalled dumps hold threads: {threads} -> {busy}"
    );
    // Someone else's dump still goes through while they wait.
    dump_ok(
        &mut bystander,
        &demo.scratch.path("during.ppm"),
        Duration::from_secs(5),
    )
    .await;

    // Half the attackers cancel, half disconnect.
    for (n, mut client) in attackers.into_iter().enumerate() {
        if n % 2 == 0 {
            for i in 0..10 {
                client
                    .send_json(&json!({"exec-oob": "async-command-cancel",
                                        "arguments": {"id": i}, "id": format!("c{i}")}))
                    .await;
            }
            let mut cancelled = 0;
            let mut acked = 0;
            for _ in 0..20 {
                let reply = client.recv_reply().await;
                if reply == return_reply(json!({}), reply["id"].clone()) {
                    acked += 1;
                } else {
                    assert_eq!(
                        reply["error"]["desc"], "Command screendump has been cancelled",
                        "{reply}"
                    );
                    cancelled += 1;
                }
            }
            assert_eq!((cancelled, acked), (10, 10));
        }
        drop(client);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = demo.status("Threads");
    assert!(
        after <= threads + THREAD_SLACK,
        "threads {threads} -> {after}"
    );
    dump_ok(
        &mut bystander,
        &demo.scratch.path("after.ppm"),
        Duration::from_secs(5),
    )
    .await;
    drop(reader);
}

#[tokio::test]
async fn sigterm_ends_the_demo_with_a_dump_stuck() {
    let mut demo = Demo::start().await;
    let fifo = demo.fifo("stuck");
    let _reader = idle_reader(&fifo);
    let mut client = demo.client().await;
    screendump(&mut client, &fifo, json!("stuck")).await;
    // The dump has opened the FIFO and is waiting to write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .execute("query-status", json!({}), json!("alive"))
        .await;
    assert_eq!(client.recv_reply().await["id"], "alive");

    let pid = demo.child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(killed.success());
    let start = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(8), demo.child.wait())
        .await
        .unwrap_or_else(|_| panic!("qmp-demo still running after SIGTERM:\n{}", demo.log()))
        .unwrap();
    assert!(status.success(), "qmp-demo exited with {status}");
    assert!(!demo.qmp.exists(), "socket left behind");
    eprintln!("exit after SIGTERM: {:?}", start.elapsed());
}

#[tokio::test]
async fn a_cancel_racing_completion_never_leaves_a_complete_file() {
    let demo = Demo::start().await;
    let mut client = demo.client().await;
    // How long a warm dump takes here, to aim the cancels around its end.
    let mut took = Duration::MAX;
    for _ in 0..4 {
        let start = Instant::now();
        dump_ok(
            &mut client,
            &demo.scratch.path("timing.ppm"),
            PROCESS_TIMEOUT,
        )
        .await;
        took = took.min(start.elapsed());
    }
    let (mut cancelled, mut completed) = (0, 0);
    for round in 0..200u32 {
        let path = demo.scratch.path(&format!("race-{round}.ppm"));
        // From 30% to 130% of a dump's duration.
        let delay = took.mul_f64(0.3 + f64::from(round) / 200.0);
        screendump(&mut client, &path, json!(round)).await;
        tokio::time::sleep(delay).await;
        client
            .send_json(&json!({"exec-oob": "async-command-cancel",
                                "arguments": {"id": round}, "id": "cancel"}))
            .await;
        let mut dump_reply = None;
        let mut cancel_reply = None;
        while dump_reply.is_none() || cancel_reply.is_none() {
            let reply = client.recv_reply().await;
            if reply["id"] == "cancel" {
                cancel_reply = Some(reply);
            } else {
                assert_eq!(reply["id"], round, "{reply}");
                dump_reply = Some(reply);
            }
        }
        let (dump_reply, cancel_reply) = (dump_reply.unwrap(), cancel_reply.unwrap());
        if dump_reply.get("return").is_some() {
            completed += 1;
            assert_eq!(std::fs::metadata(&path).unwrap().len(), PPM_SIZE);
            assert_eq!(
                cancel_reply,
                error_reply(
                    Some(json!("cancel")),
                    "GenericError",
                    &format!("No command with id {round} is in flight")
                )
            );
        } else {
            cancelled += 1;
            assert_eq!(
                dump_reply["error"]["desc"], "Command screendump has been cancelled",
                "{dump_reply}"
            );
            assert_eq!(cancel_reply, return_reply(json!({}), json!("cancel")));
            // The handler removes the file once it notices, within a chunk's time.
            let deadline = Instant::now() + Duration::from_secs(2);
            while path.exists() {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: answered cancelled, but {} stays ({} bytes)",
                    path.display(),
                    std::fs::metadata(&path).map_or(0, |m| m.len())
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    eprintln!("a dump took {took:?}; {cancelled} cancelled, {completed} completed");
}
