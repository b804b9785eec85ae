//! Jobs over real sockets, against qemu-storage-daemon 10.0.2's recordings
//! (`tests/data/qemu-10.0-jobs/`).
//!
//! The replays send the recorded client's job requests verbatim (`query-jobs`, `job-*`, with
//! the recorded ids) and stand in for the block jobs with the demo's `x-delay` (a backup or
//! a mirror: `x-delay` with the same `job-id` and `auto-*`, `ready` for a mirror, a long
//! `ms` for a throttled one) or a job-only `blockdev-create` of this file. A second,
//! watching client gets the `JOB_STATUS_CHANGE` events; after each request its statuses are
//! compared with what QEMU's watching client got for that request, status by status, and
//! the reply with QEMU's reply.

use std::collections::HashMap;
use std::time::Duration;

use qmp_dispatcher::{
    Command, Context, JobDriver, JobHandle, JobOptions, QmpError, Registry, Server,
};
use qmp_handlers::misc;
use qmp_tests::{Client, Holds, TestServer, data_dir, error_reply};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// How long a step waits for its events.
const STEP: Duration = Duration::from_secs(5);
/// Quiet time after a step: events beyond the expected ones would show up by then.
const SETTLE: Duration = Duration::from_millis(30);
/// `ms` of a job that stands in for a throttled (`speed: 1`) block job: it never ends by
/// itself within a test.
const FOREVER_MS: u64 = 600_000;

// ---------------------------------------------------------------------------------------
// The server: the demo's x-delay plus a job-only blockdev-create.

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct CreateArgs {
    job_id: Option<String>,
    options: Value,
}

/// A `blockdev-create` job: QEMU's type `create`, always auto-finalized, dismissed by hand,
/// progress 0 → 1; fails on QEMU's text for a directory that does not exist.
struct CreateJob {
    filename: String,
}

impl JobDriver for CreateJob {
    async fn run(&mut self, job: &JobHandle) -> Result<(), QmpError> {
        job.set_total_progress(1);
        job.set_progress(1);
        if self.filename.starts_with("/nonexistent-dir/") {
            return Err(QmpError::generic(format!(
                "Could not create '{}': No such file or directory",
                self.filename
            )));
        }
        Ok(())
    }
}

fn blockdev_create() -> Command {
    Command::sync("blockdev-create", |a: CreateArgs, cx: &Context<()>| {
        let filename = a.options["filename"].as_str().unwrap_or_default();
        let options = JobOptions::new("create").id(a.job_id).auto_dismiss(false);
        cx.start_public_job(
            options,
            CreateJob {
                filename: filename.to_string(),
            },
        )
    })
    .emits("JOB_STATUS_CHANGE")
}

fn server() -> TestServer {
    let mut registry = Registry::builder();
    registry
        .add(misc::x_delay())
        .unwrap()
        .add(blockdev_create())
        .unwrap();
    TestServer::serve(Server::builder(registry.build()).build(), Holds::default())
}

// ---------------------------------------------------------------------------------------
// A watching client: every JOB_STATUS_CHANGE it gets, as (id, status).

struct Watcher {
    events: mpsc::UnboundedReceiver<(String, String)>,
}

impl Watcher {
    async fn connect(server: &TestServer) -> Watcher {
        let stream = UnixStream::connect(&server.socket).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        lines.next_line().await.unwrap().expect("greeting");
        write
            .write_all(br#"{"execute": "qmp_capabilities"}"#)
            .await
            .unwrap();
        assert_eq!(
            lines.next_line().await.unwrap().as_deref(),
            Some(r#"{"return": {}}"#)
        );
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _write = write;
            while let Ok(Some(line)) = lines.next_line().await {
                let message: Value = serde_json::from_str(&line).unwrap();
                assert!(message.get("event").is_some(), "a watcher gets events only");
                if message["event"] == "JOB_STATUS_CHANGE" {
                    let data = &message["data"];
                    assert_eq!(data.as_object().unwrap().len(), 2, "{message}");
                    let id = data["id"].as_str().unwrap().to_string();
                    let status = data["status"].as_str().unwrap().to_string();
                    if tx.send((id, status)).is_err() {
                        return;
                    }
                }
            }
        });
        Watcher { events }
    }

    /// The next `n` statuses, then a quiet moment with nothing more.
    async fn take(&mut self, n: usize, what: &str) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(STEP, self.events.recv()).await {
                Ok(Some(event)) => got.push(event),
                _ => panic!("{what}: got only {got:?}, expected {n} events"),
            }
        }
        tokio::time::sleep(SETTLE).await;
        while let Ok(event) = self.events.try_recv() {
            got.push(event);
        }
        got
    }

    /// The statuses of job `id`, until it reaches `last`.
    async fn until(&mut self, id: &str, last: &str) -> Vec<String> {
        let mut got = Vec::new();
        loop {
            let (job, status) = tokio::time::timeout(STEP, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("{id}: got {got:?}, waiting for {last}"))
                .expect("watcher alive");
            if job == id {
                got.push(status.clone());
                if status == last {
                    return got;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The recordings, as steps: each request of the commanding client c0, its reply, and the
// JOB_STATUS_CHANGE events the watching client c1 got until c0's next request.

struct Step {
    request: Value,
    reply: Option<Value>,
    events: Vec<(String, String)>,
}

fn steps(file: &str) -> Vec<Step> {
    let text = std::fs::read_to_string(data_dir("qemu-10.0-jobs").join(file)).unwrap();
    let mut steps: Vec<Step> = Vec::new();
    for line in text.lines().skip(1) {
        let record: Value = serde_json::from_str(line).unwrap();
        let Some(data) = record["data"].as_str() else {
            continue;
        };
        // Truncated lines (query-named-block-nodes, query-block-jobs) are not compared.
        let Ok(message) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        match (record["conn"].as_str(), record["dir"].as_str()) {
            (Some("c0"), Some("send")) => steps.push(Step {
                request: message,
                reply: None,
                events: Vec::new(),
            }),
            (Some("c0"), Some("recv")) if message.get("event").is_none() => {
                if let Some(step) = steps.last_mut() {
                    step.reply = Some(message);
                }
            }
            (Some("c1"), Some("recv")) if message["event"] == "JOB_STATUS_CHANGE" => {
                let data = &message["data"];
                steps.last_mut().unwrap().events.push((
                    data["id"].as_str().unwrap().to_string(),
                    data["status"].as_str().unwrap().to_string(),
                ));
            }
            _ => {}
        }
    }
    steps
}

/// Every status QEMU's watcher saw for job `id` in a recording.
fn recorded_sequence(file: &str, id: &str) -> Vec<String> {
    steps(file)
        .into_iter()
        .flat_map(|step| step.events)
        .filter(|(job, _)| job == id)
        .map(|(_, status)| status)
        .collect()
}

/// What a request becomes here: the same, the demo's stand-in, or nothing (block-layer
/// commands without a job analogue).
fn translate(request: &Value) -> Option<Value> {
    let command = request["execute"].as_str()?;
    let arguments = &request["arguments"];
    let stand_in = |ready: bool| {
        let mut args = json!({
            "ms": if arguments.get("speed").is_some() { FOREVER_MS } else { 0 },
            "job-id": arguments["job-id"],
        });
        for member in ["auto-finalize", "auto-dismiss"] {
            if let Some(value) = arguments.get(member) {
                args[member] = value.clone();
            }
        }
        if ready {
            args["ready"] = json!(true);
        }
        json!({"execute": "x-delay", "arguments": args, "id": request["id"]})
    };
    match command {
        "query-jobs" | "job-pause" | "job-resume" | "job-cancel" | "job-complete"
        | "job-finalize" | "job-dismiss" | "blockdev-create" => Some(request.clone()),
        // Its target is busy: a block-layer refusal, not a job's.
        "blockdev-backup" if request["id"] == "bk-same-target" => None,
        "blockdev-backup" => Some(stand_in(false)),
        // block-job-cancel of m4 (complete without pivot) has no job-* analogue.
        "blockdev-mirror" if request["id"] == "mi4" => None,
        "blockdev-mirror" => Some(stand_in(true)),
        _ => None,
    }
}

/// QEMU's watcher statuses for a step, minus what only block jobs do: a backup pauses
/// itself once as it starts (`created, running, paused, running`), and a failed
/// `blockdev-backup` makes the running backup pause and resume twice (the reference's
/// "surprises" 8).
fn expected_events(step: &Step) -> Vec<(String, String)> {
    let mut events = step.events.clone();
    if step.request["execute"] == "blockdev-backup" {
        let failed = step
            .reply
            .as_ref()
            .is_some_and(|r| r.get("error").is_some());
        if failed {
            return Vec::new();
        }
        let statuses: Vec<&str> = events.iter().map(|(_, s)| s.as_str()).collect();
        if statuses.starts_with(&["created", "running", "paused", "running"]) {
            events.drain(2..4);
        }
    }
    events
}

/// A `query-jobs` row as compared: the stand-ins' type is `x-delay`, and their progress is
/// in milliseconds, so only its presence is compared for them.
fn normalize_jobs(reply: &Value) -> Value {
    let mut reply = reply.clone();
    if let Some(rows) = reply["return"].as_array_mut() {
        for row in rows {
            if matches!(row["type"].as_str(), Some("backup" | "mirror")) {
                row["type"] = json!("x-delay");
            }
            if row["type"] == "x-delay" {
                assert!(row["current-progress"].is_u64(), "{row}");
                assert!(row["total-progress"].is_u64(), "{row}");
                row["current-progress"] = json!("n");
                row["total-progress"] = json!("n");
            }
        }
    }
    reply
}

/// Replays a recording's job requests; returns how many steps were compared.
async fn replay(file: &str) -> usize {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut client = server.negotiated(&[]).await;
    let mut compared = 0;
    for step in steps(file) {
        let Some(request) = translate(&step.request) else {
            continue;
        };
        let what = format!("{file} {}", step.request["id"]);
        client.send_json(&request).await;
        let reply = client.recv_reply().await;
        let recorded = step.reply.clone().expect("every request was answered");
        if request["execute"] == "query-jobs" {
            assert_eq!(normalize_jobs(&reply), normalize_jobs(&recorded), "{what}");
        } else {
            assert_eq!(reply, recorded, "{what}");
        }
        let expected = expected_events(&step);
        let got = watcher.take(expected.len(), &what).await;
        assert_eq!(got, expected, "{what}: the watcher's statuses");
        compared += 1;
    }
    assert_eq!(server.server.stats().jobs, 0, "{file} leaves no job");
    compared
}

#[tokio::test]
async fn blockdev_create_lifecycle_and_id_errors_as_recorded() {
    // 01: created/running/waiting/pending/concluded, dismiss, the duplicate (of a concluded
    // job), invalid and missing ids, verbs refused in `concluded`, a failing job's error.
    assert_eq!(replay("01-blockdev-create-lifecycle.jsonl").await, 19);
}

#[tokio::test]
async fn manual_finalize_and_dismiss_as_recorded() {
    // 02: auto-finalize and auto-dismiss off; the refusals in `pending` and `concluded`.
    assert_eq!(replay("02-backup-manual-lifecycle.jsonl").await, 14);
}

#[tokio::test]
async fn a_running_job_as_recorded() {
    // 03: refusals while running, pause twice, resume when not paused, unknown ids, a
    // duplicate id, cancel with and without auto-dismiss.
    assert_eq!(replay("03-running-job-errors.jsonl").await, 28);
}

#[tokio::test]
async fn ready_standby_complete_and_cancel_as_recorded() {
    // 04: ready → complete, pause in ready (standby), complete in standby, manual
    // finalize/dismiss after ready, cancel while ready, complete refused while running.
    assert_eq!(replay("04-mirror-ready-complete.jsonl").await, 29);
}

#[tokio::test]
async fn default_jobs_as_recorded() {
    assert_eq!(replay("05-events-broadcast-unnegotiated.jsonl").await, 2);
}

/// The whole sequence of each recorded job that has an `x-delay` analogue, status by
/// status (backup's own pause at start removed), from a watcher's point of view.
#[tokio::test]
async fn whole_sequences_match_the_recordings() {
    type Verbs = &'static [(&'static str, &'static str)];
    // (recording, job, x-delay arguments, [(verb, the state the recording sent it in)])
    let cases: [(&str, &str, Value, Verbs); 5] = [
        // A backup with the defaults.
        (
            "05-events-broadcast-unnegotiated.jsonl",
            "b1",
            json!({"ms": 20}),
            &[],
        ),
        // auto-finalize/auto-dismiss off: finalize, then dismiss.
        (
            "02-backup-manual-lifecycle.jsonl",
            "b1",
            json!({"ms": 20, "auto-finalize": false, "auto-dismiss": false}),
            &[("job-finalize", "pending"), ("job-dismiss", "concluded")],
        ),
        // A mirror: ready, then complete.
        (
            "04-mirror-ready-complete.jsonl",
            "m1",
            json!({"ms": 20, "ready": true}),
            &[("job-complete", "ready")],
        ),
        // A mirror paused while ready (standby), completed in standby, resumed.
        (
            "04-mirror-ready-complete.jsonl",
            "m1s",
            json!({"ms": 20, "ready": true}),
            &[
                ("job-pause", "ready"),
                ("job-complete", "standby"),
                ("job-resume", "standby"),
            ],
        ),
        // A mirror cancelled while ready.
        (
            "04-mirror-ready-complete.jsonl",
            "m3",
            json!({"ms": 20, "ready": true}),
            &[("job-cancel", "ready")],
        ),
    ];
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut client = server.negotiated(&[]).await;
    for (file, id, mut args, verbs) in cases {
        let mut expected = recorded_sequence(file, id);
        if expected.starts_with(&["created", "running", "paused", "running"].map(String::from)) {
            expected.drain(2..4);
        }
        args["job-id"] = json!(id);
        client.execute("x-delay", args, json!("start")).await;
        assert_eq!(
            client.recv_reply().await,
            json!({"return": {}, "id": "start"})
        );
        let mut got = Vec::new();
        for (verb, state) in verbs {
            if got.last().map(String::as_str) != Some(*state) {
                got.extend(watcher.until(id, state).await);
            }
            client.execute(verb, json!({"id": id}), json!(verb)).await;
            assert_eq!(client.recv_reply().await, json!({"return": {}, "id": verb}));
        }
        got.extend(watcher.until(id, "null").await);
        assert_eq!(got, expected, "{file} {id}");
    }
}

// ---------------------------------------------------------------------------------------
// The rest of the model, over the wire.

async fn call(client: &mut Client, command: &str, arguments: Value) -> Value {
    client.execute(command, arguments, json!("c")).await;
    client.recv_reply().await
}

async fn start(client: &mut Client, arguments: Value) {
    let reply = call(client, "x-delay", arguments).await;
    assert_eq!(reply, json!({"return": {}, "id": "c"}));
}

fn refused(id: &str, state: &str, verb: &str) -> String {
    format!("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")
}

/// Every refusal of QEMU's state × verb table, for each state a job rests in.
#[tokio::test]
async fn every_refusal_of_the_verb_table() {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut c = server.negotiated(&[]).await;
    start(&mut c, json!({"ms": FOREVER_MS, "job-id": "run"})).await;
    start(&mut c, json!({"ms": FOREVER_MS, "job-id": "pau"})).await;
    call(&mut c, "job-pause", json!({"id": "pau"})).await;
    start(&mut c, json!({"ms": 0, "job-id": "rdy", "ready": true})).await;
    start(&mut c, json!({"ms": 0, "job-id": "stb", "ready": true})).await;
    start(
        &mut c,
        json!({"ms": 0, "job-id": "pen", "auto-finalize": false}),
    )
    .await;
    start(
        &mut c,
        json!({"ms": 0, "job-id": "con", "auto-dismiss": false}),
    )
    .await;
    watcher.until("rdy", "ready").await;
    watcher.until("stb", "ready").await;
    watcher.until("pen", "pending").await;
    watcher.until("con", "concluded").await;
    call(&mut c, "job-pause", json!({"id": "stb"})).await;
    watcher.until("stb", "standby").await;

    let not_paused = "Can't resume a job that was not paused";
    let paused = "Job is already paused";
    // pause, resume, complete, finalize, dismiss, cancel; None = accepted
    let table: [(&str, &str, [Option<&str>; 6]); 6] = [
        (
            "run",
            "running",
            [
                None,
                Some(not_paused),
                Some("verb"),
                Some("verb"),
                Some("verb"),
                None,
            ],
        ),
        (
            "pau",
            "paused",
            [
                Some(paused),
                None,
                Some("verb"),
                Some("verb"),
                Some("verb"),
                None,
            ],
        ),
        (
            "rdy",
            "ready",
            [
                None,
                Some(not_paused),
                None,
                Some("verb"),
                Some("verb"),
                None,
            ],
        ),
        (
            "stb",
            "standby",
            [Some(paused), None, None, Some("verb"), Some("verb"), None],
        ),
        (
            "pen",
            "pending",
            [
                Some("verb"),
                Some(not_paused),
                Some("verb"),
                None,
                Some("verb"),
                None,
            ],
        ),
        (
            "con",
            "concluded",
            [
                Some("verb"),
                Some(not_paused),
                Some("verb"),
                Some("verb"),
                None,
                Some("verb"),
            ],
        ),
    ];
    let verbs = [
        "pause", "resume", "complete", "finalize", "dismiss", "cancel",
    ];
    let mut refusals = 0;
    for (id, state, answers) in table {
        for (verb, answer) in verbs.iter().zip(answers) {
            let Some(answer) = answer else { continue };
            let desc = match answer {
                "verb" => refused(id, state, verb),
                other => other.to_string(),
            };
            let reply = call(&mut c, &format!("job-{verb}"), json!({"id": id})).await;
            assert_eq!(
                reply,
                error_reply(Some(json!("c")), "GenericError", &desc),
                "{verb} {state}"
            );
            refusals += 1;
        }
    }
    assert_eq!(refusals, 23);
    for verb in verbs {
        let reply = call(&mut c, &format!("job-{verb}"), json!({"id": "nope"})).await;
        assert_eq!(
            reply,
            error_reply(Some(json!("c")), "GenericError", "Job not found")
        );
    }
    // Refusals change nothing: no event went out for them.
    tokio::time::sleep(SETTLE).await;
    assert!(watcher.events.try_recv().is_err());
    let reply = call(&mut c, "job-pause", json!({})).await;
    assert_eq!(
        reply,
        error_reply(
            Some(json!("c")),
            "GenericError",
            "Parameter 'id' is missing"
        )
    );
    server.server.shutdown();
    server.server.wait().await;
    assert_eq!(server.server.stats().jobs, 0);
}

/// `Invalid job ID` follows QEMU's syntax: a letter, then letters, digits, `-`, `.`, `_`.
#[tokio::test]
async fn job_ids_follow_qemus_syntax() {
    let server = server();
    let mut c = server.negotiated(&[]).await;
    for bad in ["1x", "", "-a", "a b", "é"] {
        let reply = call(&mut c, "x-delay", json!({"ms": 0, "job-id": bad})).await;
        let desc = format!("Invalid job ID '{bad}'");
        assert_eq!(reply, error_reply(Some(json!("c")), "GenericError", &desc));
    }
    start(&mut c, json!({"ms": 0, "job-id": "A-b.c_9"})).await;
}

/// A job lives in the server: its client leaves, another client still sees it and
/// dismisses it.
#[tokio::test]
async fn a_job_outlives_its_client_and_another_dismisses_it() {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut creator = server.negotiated(&["async"]).await;
    start(
        &mut creator,
        json!({"ms": 100, "job-id": "j1", "auto-dismiss": false}),
    )
    .await;
    drop(creator);
    assert_eq!(
        watcher.until("j1", "concluded").await,
        ["created", "running", "waiting", "pending", "concluded"]
    );
    let mut other = server.negotiated(&[]).await;
    let listed = call(&mut other, "query-jobs", json!({})).await;
    assert_eq!(
        listed["return"],
        json!([{"current-progress": 100, "status": "concluded", "total-progress": 100,
                "type": "x-delay", "id": "j1"}])
    );
    assert_eq!(
        call(&mut other, "job-dismiss", json!({"id": "j1"})).await,
        json!({"return": {}, "id": "c"})
    );
    assert_eq!(watcher.until("j1", "null").await, ["null"]);
    assert_eq!(server.server.stats().jobs, 0);
}

/// One command, two faces: without `job-id` a deferred command (listed with its status and
/// progress by its own client, no events, the reply at the end); with it a job (the reply at
/// once, events to everyone).
#[tokio::test]
async fn the_two_faces_of_x_delay() {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut c = server.negotiated(&["async"]).await;
    c.execute("x-delay", json!({"ms": 400}), json!("deferred"))
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.execute("query-async-commands", json!({}), json!("q"))
        .await;
    let listing = c.recv_reply().await;
    let rows = listing["return"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{listing}");
    let row = &rows[0];
    assert_eq!(row["command"], "x-delay");
    assert_eq!(row["status"], "running");
    assert_eq!(row["total-progress"], 400);
    let current = row["current-progress"].as_u64().unwrap();
    assert!((50..400).contains(&current), "{row}");
    assert!(
        call(&mut c, "query-jobs", json!({})).await["return"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        c.recv_reply().await,
        json!({"return": {}, "id": "deferred"})
    );
    tokio::time::sleep(SETTLE).await;
    assert!(
        watcher.events.try_recv().is_err(),
        "a deferred command is never broadcast"
    );

    // The same command as a job: the reply comes first, the rest as events.
    start(&mut c, json!({"ms": 50, "job-id": "j"})).await;
    assert_eq!(
        watcher.until("j", "null").await,
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );

    // A job is not the caller's command in flight: query-async-commands does not list it.
    start(&mut c, json!({"ms": FOREVER_MS, "job-id": "j2"})).await;
    let listing = call(&mut c, "query-async-commands", json!({})).await;
    assert_eq!(listing["return"], json!([]));
    call(&mut c, "job-cancel", json!({"id": "j2"})).await;
    watcher.until("j2", "null").await;

    // The deferred face is cancelled with its client, and fails with the job's error.
    c.execute("x-delay", json!({"ms": 0, "fail": "it failed"}), json!("f"))
        .await;
    assert_eq!(
        c.recv_reply().await,
        error_reply(Some(json!("f")), "GenericError", "it failed")
    );
    c.execute("x-delay", json!({"ms": FOREVER_MS}), json!("long"))
        .await;
    server
        .wait_stats("the deferred job in flight", |s| s.in_flight == 1)
        .await;
    drop(c);
    server
        .wait_stats("nothing left", |s| {
            s.in_flight == 0 && s.live_returns == 0 && s.handler_tasks == 0 && s.jobs == 0
        })
        .await;
}

/// A failing job aborts with its own error; query-jobs keeps it until dismissed.
#[tokio::test]
async fn a_failing_job_keeps_its_error_until_dismissed() {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut c = server.negotiated(&[]).await;
    start(
        &mut c,
        json!({"ms": 10, "job-id": "f", "fail": "disk on fire", "auto-dismiss": false}),
    )
    .await;
    assert_eq!(
        watcher.until("f", "concluded").await,
        ["created", "running", "aborting", "concluded"]
    );
    let listed = call(&mut c, "query-jobs", json!({})).await;
    assert_eq!(listed["return"][0]["error"], "disk on fire");
    call(&mut c, "job-dismiss", json!({"id": "f"})).await;
    assert_eq!(watcher.until("f", "null").await, ["null"]);
}

/// Shutdown with jobs in every state and a deferred x-delay in flight: everything is
/// cancelled, aborted or dismissed, and nothing is left.
#[tokio::test]
async fn shutdown_with_jobs_running_leaves_nothing() {
    let server = server();
    let mut watcher = Watcher::connect(&server).await;
    let mut c = server.negotiated(&["async"]).await;
    start(
        &mut c,
        json!({"ms": FOREVER_MS, "job-id": "run", "auto-dismiss": false}),
    )
    .await;
    start(&mut c, json!({"ms": FOREVER_MS, "job-id": "pau"})).await;
    call(&mut c, "job-pause", json!({"id": "pau"})).await;
    start(&mut c, json!({"ms": 0, "job-id": "rdy", "ready": true})).await;
    start(
        &mut c,
        json!({"ms": 0, "job-id": "pen", "auto-finalize": false}),
    )
    .await;
    start(
        &mut c,
        json!({"ms": 0, "job-id": "con", "auto-dismiss": false}),
    )
    .await;
    watcher.until("rdy", "ready").await;
    watcher.until("pen", "pending").await;
    watcher.until("con", "concluded").await;
    c.execute("x-delay", json!({"ms": FOREVER_MS}), json!("deferred"))
        .await;
    server
        .wait_stats("five jobs, one deferred", |s| {
            s.jobs == 5 && s.in_flight == 1
        })
        .await;
    server.server.shutdown();
    tokio::time::timeout(STEP, server.server.wait())
        .await
        .expect("shutdown waits for the jobs' work, which ends");
    let stats = server.server.stats();
    assert_eq!(
        (
            stats.jobs,
            stats.live_returns,
            stats.in_flight,
            stats.handler_tasks
        ),
        (0, 0, 0, 0),
        "{stats:?}"
    );
    let mut job_events: HashMap<String, Vec<String>> = HashMap::new();
    while let Ok(Some((id, status))) =
        tokio::time::timeout(Duration::from_millis(200), watcher.events.recv()).await
    {
        job_events.entry(id).or_default().push(status);
    }
    // Those the watcher could still see end in null (the watcher itself may be closed
    // before the last ones).
    for (id, statuses) in job_events {
        assert!(
            statuses.iter().all(
                |s| ["aborting", "concluded", "null", "running", "ready"].contains(&s.as_str())
            ),
            "{id}: {statuses:?}"
        );
    }
}
