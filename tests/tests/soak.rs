//! Soak and chaos: hundreds of clients issue immediate and deferred commands, start jobs
//! (and the same work as deferred commands), pause, resume, cancel and dismiss them, and
//! leave at awkward moments. Afterwards the server must be back to nothing (no clients,
//! nothing in flight, no live returns, no tasks, no jobs once the survivors are cleared)
//! with its memory back near the baseline, and every reply a surviving client got must have
//! been its own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use qmp_dispatcher::{
    Command, Context, JobDriver, JobHandle, JobOptions, QmpError, QmpReturn, Registry, Server,
};
use qmp_tests::{Client, Holds, TestServer, rss, test_commands};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Clients in the chaos round.
const CLIENTS: u64 = 300;
/// Requests each client sends at most.
const MAX_REQUESTS: u64 = 24;
/// Clients of the warm-up round, which grows the allocator's pools before the baseline.
const WARM_UP_CLIENTS: u64 = 60;
/// How much the resident set may have grown after the chaos round, once everything is gone.
const RSS_SLACK: u64 = 20 << 20;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct JobArgs {
    ms: u64,
    job_id: Option<String>,
    auto_dismiss: Option<bool>,
}

/// Sleeps `ms` in steps, with pause points between them.
struct Sleep(u64);

impl JobDriver for Sleep {
    async fn run(&mut self, job: &JobHandle) -> Result<(), QmpError> {
        job.set_total_progress(self.0);
        for step in 0..self.0 {
            job.pause_point().await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
                () = job.cancelled() => return Ok(()),
            }
            job.set_progress(step + 1);
        }
        Ok(())
    }
}

/// The test commands, plus `x-job`: a job with `job-id`, a deferred command without.
fn soak_server() -> TestServer {
    let holds = Holds::default();
    let mut registry = Registry::builder();
    test_commands(&mut registry, &holds);
    registry
        .add(
            Command::deferred("x-job", |a: JobArgs, cx: Context<()>, ret: QmpReturn| {
                let options = JobOptions::new("x-job")
                    .id(a.job_id)
                    .auto_dismiss(a.auto_dismiss.unwrap_or(true));
                cx.start_job(options, Sleep(a.ms), ret);
            })
            .emits("JOB_STATUS_CHANGE"),
        )
        .unwrap();
    TestServer::serve(Server::builder(registry.build()).build(), holds)
}

/// A small deterministic generator, one per client, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// How a client's session ends.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Reads every reply, checks them, half-closes and waits for EOF.
    Graceful,
    /// Half-closes with commands in flight, then reads every reply.
    HalfClose,
    /// Sends half a JSON object and drops the connection.
    MidRequest,
    /// Stops reading replies and drops the connection with commands in flight.
    MidReply,
    /// Drops the connection right after sending, deferred commands in flight.
    InFlight,
}

/// One client's work: its requests (with ids naming the client), then its fate. Returns
/// how many replies it checked.
async fn chaos_client(server: &TestServer, c: u64, seed: u64) -> usize {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let fate = match rng.below(5) {
        0 => Fate::Graceful,
        1 => Fate::HalfClose,
        2 => Fate::MidRequest,
        3 => Fate::MidReply,
        _ => Fate::InFlight,
    };
    let async_mode = rng.below(3) != 0;
    let mut client = server
        .negotiated(if async_mode { &["async"] } else { &[] })
        .await;
    let requests = 1 + rng.below(MAX_REQUESTS);
    // What each id should get back: `Some(arguments)` for echo, `None` for anything else.
    let mut expected = Vec::new();
    let mut batch = Vec::new();
    for i in 0..requests {
        let id = format!("c{c}-{i}");
        let request = match rng.below(9) {
            0 | 1 => {
                let arguments =
                    json!({"client": c, "i": i, "pad": "x".repeat(rng.below(200) as usize)});
                expected.push((id.clone(), Some(arguments.clone())));
                json!({"execute": "echo", "arguments": arguments, "id": id})
            }
            2 | 3 => {
                expected.push((id.clone(), None));
                json!({"execute": "x-delay", "arguments": {"ms": rng.below(30)}, "id": id})
            }
            4 => {
                expected.push((id.clone(), None));
                json!({"execute": "hold", "arguments": {"key": id}, "id": id})
            }
            6 => {
                // A job (ids of all clients share one space) or the same as a deferred command.
                expected.push((id.clone(), None));
                let mut arguments = json!({"ms": rng.below(30)});
                if rng.below(3) != 0 {
                    arguments["job-id"] = json!(format!("j{}", rng.below(CLIENTS)));
                    arguments["auto-dismiss"] = json!(rng.below(3) != 0);
                }
                json!({"execute": "x-job", "arguments": arguments, "id": id})
            }
            7 => {
                // A job verb on anyone's job: any outcome.
                expected.push((id.clone(), None));
                let verbs = [
                    "job-pause",
                    "job-resume",
                    "job-cancel",
                    "job-dismiss",
                    "job-complete",
                ];
                let verb = verbs[rng.below(verbs.len() as u64) as usize];
                let job = format!("j{}", rng.below(CLIENTS));
                json!({"execute": verb, "arguments": {"id": job}, "id": id})
            }
            8 => {
                expected.push((id.clone(), None));
                json!({"execute": "query-jobs", "id": id})
            }
            _ => {
                // Cancels an earlier request of this client (in flight or not, any outcome).
                let target = format!("c{c}-{}", rng.below(i + 1));
                expected.push((id.clone(), None));
                json!({"execute": "async-command-cancel", "arguments": {"id": target}, "id": id})
            }
        };
        batch.extend(serde_json::to_vec(&request).unwrap());
    }
    client.send(&batch).await;
    let checked = match fate {
        Fate::Graceful => {
            let replies = read_replies(&mut client, c, &expected).await;
            client.shutdown_write().await;
            client.expect_eof_after_events().await;
            replies
        }
        Fate::HalfClose => {
            client.shutdown_write().await;
            let replies = read_replies(&mut client, c, &expected).await;
            client.expect_eof_after_events().await;
            replies
        }
        Fate::MidRequest => {
            client
                .send(br#"{"execute": "echo", "arguments": {"half": "#)
                .await;
            0
        }
        Fate::MidReply => {
            let _ = client.recv().await;
            0
        }
        Fate::InFlight => 0,
    };
    drop(client);
    checked
}

/// Reads one reply per expected id, in any order; checks each is this client's own.
async fn read_replies(client: &mut Client, c: u64, expected: &[(String, Option<Value>)]) -> usize {
    let mut seen = HashSet::new();
    for _ in expected {
        let reply = client.recv_reply().await;
        let id = reply["id"]
            .as_str()
            .unwrap_or_else(|| panic!("client {c}: reply without a string id: {reply}"));
        assert!(
            seen.insert(id.to_string()),
            "client {c}: two replies for {id}"
        );
        let (_, arguments) = expected
            .iter()
            .find(|(expected_id, _)| expected_id == id)
            .unwrap_or_else(|| panic!("client {c} got someone else's reply: {reply}"));
        if let Some(arguments) = arguments {
            assert_eq!(&reply["return"], arguments, "client {c}: wrong echo");
        }
    }
    seen.len()
}

/// Answers parked `hold`s after a random 0-20 ms, like devices finishing their work.
async fn release_holds_at_random(server: Arc<TestServer>) {
    let mut rng = Rng(0x5EED);
    let mut pending: Vec<(Instant, String, QmpReturn)> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = Instant::now();
        for (key, ret) in server.holds.take_all() {
            pending.push((now + Duration::from_millis(rng.below(20)), key, ret));
        }
        let (due, later) = pending.into_iter().partition(|(at, _, _)| *at <= now);
        pending = later;
        let due: Vec<(Instant, String, QmpReturn)> = due;
        for (_, key, ret) in due {
            // A cancelled or departed command's reply goes nowhere.
            ret.ok(&json!({"released": key}));
        }
    }
}

/// Runs `clients` chaotic clients at once; returns how many replies survivors checked.
async fn run_round(server: &Arc<TestServer>, clients: u64, seed: u64) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let server = Arc::clone(server);
        tasks.spawn(async move { chaos_client(&server, c, seed + c).await });
    }
    let mut checked = 0;
    while let Some(done) = tasks.join_next().await {
        checked += done.expect("a client task panicked");
    }
    checked
}

async fn wait_until_clean(server: &TestServer) {
    server
        .wait_stats("a clean server", |s| {
            s.clients == 0 && s.in_flight == 0 && s.live_returns == 0 && s.connection_tasks == 0
        })
        .await;
    clear_jobs(server).await;
}

/// Jobs outlive their clients by design: resume, cancel and dismiss what the round left
/// (paused, running, concluded), until the table is empty.
async fn clear_jobs(server: &TestServer) {
    let mut client = server.negotiated(&[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.execute("query-jobs", json!({}), json!("q")).await;
        let listing = client.recv_reply().await;
        let jobs = listing["return"].as_array().unwrap().clone();
        if jobs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "jobs left: {listing}");
        for job in jobs {
            let verb = match job["status"].as_str().unwrap() {
                "concluded" => "job-dismiss",
                "pending" | "running" | "paused" | "ready" | "standby" => "job-cancel",
                _ => continue,
            };
            client
                .execute(verb, json!({"id": job["id"]}), json!("v"))
                .await;
            client.recv_reply().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(client);
    server
        .wait_stats("no jobs, nothing left", |s| {
            s.jobs == 0
                && s.clients == 0
                && s.in_flight == 0
                && s.live_returns == 0
                && s.handler_tasks == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_chaotic_clients_leave_nothing_behind() {
    let started = Instant::now();
    let server = Arc::new(soak_server());
    let releaser = tokio::spawn(release_holds_at_random(Arc::clone(&server)));
    let soak = async {
        run_round(&server, WARM_UP_CLIENTS, 1_000_000).await;
        wait_until_clean(&server).await;
        let baseline = rss();
        let checked = run_round(&server, CLIENTS, 0).await;
        wait_until_clean(&server).await;
        (baseline, checked)
    };
    let (baseline, checked) = tokio::time::timeout(Duration::from_secs(30), soak)
        .await
        .expect("the soak round took over 30 s");
    releaser.abort();
    let after = rss();
    eprintln!(
        "soak: {CLIENTS} clients, {checked} replies checked, RSS {} KiB -> {} KiB, {:?}",
        baseline >> 10,
        after >> 10,
        started.elapsed()
    );
    assert!(checked > 0, "no client survived to check its replies");
    assert!(
        after < baseline + RSS_SLACK,
        "RSS grew from {} KiB to {} KiB",
        baseline >> 10,
        after >> 10
    );
    // Still serving.
    let mut client = server.negotiated(&["async"]).await;
    client.execute("echo", json!({}), json!("after")).await;
    assert_eq!(client.recv().await, json!({"return": {}, "id": "after"}));
}
