//! The job life cycle against section B of the recorded QEMU 10.0.2 behaviour: the event
//! sequences of B.1 (with the analogue of each recorded job), the verb refusals of B.3 and
//! the id errors of B.4. A watcher subscribed to the events plays the second client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::table::JobTable;
use super::*;
use crate::error::QmpError;
use crate::events::{Events, Subscription};
use crate::qmp_return::Outgoing;

/// Finalization steps in the order the driver saw them.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<&'static str>>>);

impl Log {
    fn push(&self, step: &'static str) {
        self.0.lock().unwrap().push(step);
    }
    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

enum Work {
    /// Done at once.
    Quick,
    /// Fails at once with this text.
    Fail(&'static str),
    /// Done when the test adds a permit (or cancelled), with a pause point after.
    Gate(Arc<Semaphore>),
    /// Ready at once, then waits for job-complete, as a mirror in sync.
    Mirror,
}

struct TestJob {
    work: Work,
    log: Log,
    prepare_fails: bool,
}

impl JobDriver for TestJob {
    async fn run(&mut self, job: &JobHandle) -> Result<(), QmpError> {
        job.set_total_progress(2);
        job.set_progress(1);
        match &self.work {
            Work::Quick => {}
            Work::Fail(text) => return Err(QmpError::generic(*text)),
            Work::Gate(gate) => {
                tokio::select! {
                    permit = gate.acquire() => permit.unwrap().forget(),
                    () = job.cancelled() => return Ok(()),
                }
                job.pause_point().await;
            }
            Work::Mirror => {
                job.ready().await;
                job.wait_complete().await;
            }
        }
        job.set_progress(2);
        Ok(())
    }

    fn prepare(&mut self) -> Result<(), QmpError> {
        self.log.push("prepare");
        if self.prepare_fails {
            return Err(QmpError::generic("prepare failed"));
        }
        Ok(())
    }
    fn commit(&mut self) {
        self.log.push("commit");
    }
    fn abort(&mut self) {
        self.log.push("abort");
    }
    fn clean(&mut self) {
        self.log.push("clean");
    }
}

/// A table, its tracker, and a watching client.
struct Bench {
    table: JobTable,
    tasks: TaskTracker,
    log: Log,
    rx: mpsc::UnboundedReceiver<Outgoing>,
    _subscription: Subscription,
}

impl Bench {
    fn new() -> Bench {
        let events = Events::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let subscription = events.subscribe(tx, None);
        let tasks = TaskTracker::new();
        Bench {
            table: JobTable::new(events, tasks.clone(), CancellationToken::new()),
            tasks,
            log: Log::default(),
            rx,
            _subscription: subscription,
        }
    }

    fn start(&self, id: &str, work: Work, auto: (bool, bool)) -> Result<(), QmpError> {
        let options = JobOptions::new("x-test")
            .id(Some(id.to_string()))
            .auto_finalize(auto.0)
            .auto_dismiss(auto.1);
        let driver = TestJob {
            work,
            log: self.log.clone(),
            prepare_fails: false,
        };
        self.table.start(options, driver)
    }

    /// The next `n` statuses announced for `id`, waiting for them.
    async fn expect(&mut self, id: &str, statuses: &[&str]) {
        let mut seen = Vec::new();
        while seen.len() < statuses.len() {
            let message = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{id}: got {seen:?}, expected {statuses:?}"))
                .expect("the events handle lives");
            let Outgoing::Event(line) = message else {
                panic!("not an event: {message:?}")
            };
            let event: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(event["event"], "JOB_STATUS_CHANGE");
            assert_eq!(event["data"]["id"], id, "{event}");
            assert_eq!(event["data"].as_object().unwrap().len(), 2, "{event}");
            seen.push(event["data"]["status"].as_str().unwrap().to_string());
        }
        assert_eq!(seen, statuses, "{id}");
    }

    /// Nothing more was announced, even after the jobs' tasks had a chance to run.
    async fn quiet(&mut self) {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(message) = self.rx.try_recv() {
            panic!("unexpected: {message:?}");
        }
    }

    /// What a verb answers, as the error text.
    fn refusal(&self, verb: &str, id: &str) -> String {
        self.verb(verb, id).expect_err(verb).desc
    }

    fn verb(&self, verb: &str, id: &str) -> Result<(), QmpError> {
        let job = self.table.find(id)?;
        match verb {
            "pause" => job.pause(),
            "resume" => job.resume(),
            "cancel" => job.cancel(),
            "complete" => job.complete(),
            "finalize" => job.finalize(),
            "dismiss" => job.dismiss(),
            _ => unreachable!(),
        }
    }

    fn status(&self, id: &str) -> JobStatus {
        self.table.find(id).unwrap().status()
    }
}

const DEFAULTS: (bool, bool) = (true, true);
const MANUAL: (bool, bool) = (false, false);

fn refused(id: &str, state: &str, verb: &str) -> String {
    format!("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")
}

/// B.1 `blockdev-create` / `blockdev-backup` with the defaults (the backup's own pause at
/// start is backup's, not the job model's): created, running, waiting, pending, concluded,
/// null; finalized with prepare, commit, clean.
#[tokio::test]
async fn a_job_with_the_defaults_runs_to_null() {
    let mut b = Bench::new();
    b.start("j1", Work::Quick, DEFAULTS).unwrap();
    b.expect("j1", &["created", "running"]).await;
    b.expect("j1", &["waiting", "pending", "concluded", "null"])
        .await;
    assert_eq!(b.log.take(), ["prepare", "commit", "clean"]);
    assert_eq!(b.table.len(), 0);
    assert_eq!(b.table.find("j1").unwrap_err().desc, "Job not found");
    b.quiet().await;
}

/// B.1 `blockdev-backup auto-finalize:false, auto-dismiss:false` (02) and the refusals of
/// B.3 in `pending` and `concluded`.
#[tokio::test]
async fn manual_finalize_and_dismiss() {
    let mut b = Bench::new();
    b.start("b1", Work::Quick, MANUAL).unwrap();
    b.expect("b1", &["created", "running", "waiting", "pending"])
        .await;
    assert_eq!(
        serde_json::to_string(&b.table.query()).unwrap(),
        r#"[{"current-progress":2,"status":"pending","total-progress":2,"type":"x-test","id":"b1"}]"#
    );
    assert_eq!(
        b.refusal("dismiss", "b1"),
        refused("b1", "pending", "dismiss")
    );
    assert_eq!(
        b.refusal("complete", "b1"),
        refused("b1", "pending", "complete")
    );
    assert_eq!(b.refusal("pause", "b1"), refused("b1", "pending", "pause"));
    assert_eq!(
        b.refusal("resume", "b1"),
        "Can't resume a job that was not paused"
    );
    assert!(
        b.log.take().is_empty(),
        "nothing is finalized before job-finalize"
    );

    b.verb("finalize", "b1").unwrap();
    // Synchronous: the event is out before the verb returns (before its reply).
    assert!(matches!(b.rx.try_recv(), Ok(Outgoing::Event(_))));
    assert_eq!(b.log.take(), ["prepare", "commit", "clean"]);
    assert_eq!(b.status("b1"), JobStatus::Concluded);
    assert_eq!(
        b.refusal("finalize", "b1"),
        refused("b1", "concluded", "finalize")
    );
    assert_eq!(
        b.refusal("cancel", "b1"),
        refused("b1", "concluded", "cancel")
    );
    assert_eq!(
        b.refusal("pause", "b1"),
        refused("b1", "concluded", "pause")
    );

    b.verb("dismiss", "b1").unwrap();
    b.expect("b1", &["null"]).await;
    assert_eq!(b.refusal("dismiss", "b1"), "Job not found");
    assert!(b.table.query().is_empty());
    b.quiet().await;
}

/// B.1 job-pause / job-resume of a running job (03), with B.3's refusals in `running` and
/// `paused`.
#[tokio::test]
async fn pause_and_resume_a_running_job() {
    let mut b = Bench::new();
    let gate = Arc::new(Semaphore::new(0));
    b.start("b1", Work::Gate(Arc::clone(&gate)), DEFAULTS)
        .unwrap();
    b.expect("b1", &["created", "running"]).await;
    assert_eq!(
        b.refusal("finalize", "b1"),
        refused("b1", "running", "finalize")
    );
    assert_eq!(
        b.refusal("dismiss", "b1"),
        refused("b1", "running", "dismiss")
    );
    assert_eq!(
        b.refusal("complete", "b1"),
        refused("b1", "running", "complete")
    );
    assert_eq!(
        b.refusal("resume", "b1"),
        "Can't resume a job that was not paused"
    );

    b.verb("pause", "b1").unwrap();
    b.expect("b1", &["paused"]).await;
    assert_eq!(b.table.query()[0].status, JobStatus::Paused);
    assert_eq!(b.refusal("pause", "b1"), "Job is already paused");
    assert_eq!(
        b.refusal("complete", "b1"),
        refused("b1", "paused", "complete")
    );

    // Work that ends while paused waits for the resume.
    gate.add_permits(1);
    b.quiet().await;
    assert_eq!(b.status("b1"), JobStatus::Paused);

    b.verb("resume", "b1").unwrap();
    b.expect("b1", &["running"]).await;
    b.expect("b1", &["waiting", "pending", "concluded", "null"])
        .await;
    b.quiet().await;
}

/// B.1 job-cancel of a running job, with and without auto-dismiss (03): `Operation
/// canceled` in query-jobs, refused again in `concluded`, then dismissed.
#[tokio::test]
async fn cancel_a_running_job() {
    let mut b = Bench::new();
    b.start("b1", Work::Gate(Arc::new(Semaphore::new(0))), DEFAULTS)
        .unwrap();
    b.expect("b1", &["created", "running"]).await;
    b.verb("cancel", "b1").unwrap();
    b.expect("b1", &["aborting", "concluded", "null"]).await;
    assert_eq!(b.log.take(), ["abort", "clean"]);

    b.start("b2", Work::Gate(Arc::new(Semaphore::new(0))), (true, false))
        .unwrap();
    b.expect("b2", &["created", "running"]).await;
    b.verb("cancel", "b2").unwrap();
    b.expect("b2", &["aborting", "concluded"]).await;
    let info = &b.table.query()[0];
    assert_eq!(info.error.as_deref(), Some("Operation canceled"));
    assert_eq!(
        b.refusal("cancel", "b2"),
        refused("b2", "concluded", "cancel")
    );
    b.verb("dismiss", "b2").unwrap();
    b.expect("b2", &["null"]).await;
    b.quiet().await;
}

/// QEMU resumes a paused job it cancels (`job_cancel_async`), so it leaves its pause point
/// (`running`) before aborting.
#[tokio::test]
async fn cancel_a_paused_job() {
    let mut b = Bench::new();
    b.start("b1", Work::Gate(Arc::new(Semaphore::new(0))), DEFAULTS)
        .unwrap();
    b.expect("b1", &["created", "running"]).await;
    b.verb("pause", "b1").unwrap();
    b.verb("cancel", "b1").unwrap();
    b.expect(
        "b1",
        &["paused", "running", "aborting", "concluded", "null"],
    )
    .await;
    b.quiet().await;
}

/// B.1 `blockdev-mirror` with the defaults (04): ready, then job-complete; B.3's refusals
/// in `ready`.
#[tokio::test]
async fn ready_then_complete() {
    let mut b = Bench::new();
    b.start("m1", Work::Mirror, DEFAULTS).unwrap();
    b.expect("m1", &["created", "running", "ready"]).await;
    assert_eq!(
        b.refusal("finalize", "m1"),
        refused("m1", "ready", "finalize")
    );
    assert_eq!(
        b.refusal("dismiss", "m1"),
        refused("m1", "ready", "dismiss")
    );
    assert_eq!(
        b.refusal("resume", "m1"),
        "Can't resume a job that was not paused"
    );
    b.verb("complete", "m1").unwrap();
    b.expect("m1", &["waiting", "pending", "concluded", "null"])
        .await;
    assert_eq!(b.refusal("complete", "m1"), "Job not found");
    b.quiet().await;
}

/// B.1 job-pause of a READY mirror (standby), job-complete in standby (accepted, no
/// effect until resumed), job-resume (04).
#[tokio::test]
async fn standby_and_complete_while_in_standby() {
    let mut b = Bench::new();
    b.start("m1s", Work::Mirror, DEFAULTS).unwrap();
    b.expect("m1s", &["created", "running", "ready"]).await;
    b.verb("pause", "m1s").unwrap();
    b.expect("m1s", &["standby"]).await;
    assert_eq!(b.refusal("pause", "m1s"), "Job is already paused");
    b.verb("complete", "m1s").unwrap();
    b.quiet().await;
    assert_eq!(b.status("m1s"), JobStatus::Standby);
    b.verb("resume", "m1s").unwrap();
    b.expect("m1s", &["ready", "waiting", "pending", "concluded", "null"])
        .await;
    b.quiet().await;
}

/// B.1 mirror `auto-finalize:false, auto-dismiss:false` (04).
#[tokio::test]
async fn ready_complete_finalize_dismiss() {
    let mut b = Bench::new();
    b.start("m2", Work::Mirror, MANUAL).unwrap();
    b.expect("m2", &["created", "running", "ready"]).await;
    b.verb("complete", "m2").unwrap();
    b.expect("m2", &["waiting", "pending"]).await;
    assert_eq!(
        b.refusal("complete", "m2"),
        refused("m2", "pending", "complete")
    );
    b.verb("finalize", "m2").unwrap();
    b.expect("m2", &["concluded"]).await;
    b.verb("dismiss", "m2").unwrap();
    b.expect("m2", &["null"]).await;
    b.quiet().await;
}

/// B.1 job-cancel of a READY mirror (04).
#[tokio::test]
async fn cancel_while_ready() {
    let mut b = Bench::new();
    b.start("m3", Work::Mirror, DEFAULTS).unwrap();
    b.expect("m3", &["created", "running", "ready"]).await;
    b.verb("cancel", "m3").unwrap();
    b.expect("m3", &["aborting", "concluded", "null"]).await;
    assert_eq!(b.log.take(), ["abort", "clean"]);
    b.quiet().await;
}

/// B.1 failing `blockdev-create` (01): created, running, aborting, concluded; the error is
/// the job's.
#[tokio::test]
async fn a_failing_job_aborts_with_its_error() {
    let mut b = Bench::new();
    let text = "Could not create '/nonexistent-dir/x.raw': No such file or directory";
    b.start("jfail", Work::Fail(text), (true, false)).unwrap();
    b.expect("jfail", &["created", "running", "aborting", "concluded"])
        .await;
    assert_eq!(b.log.take(), ["abort", "clean"]);
    assert_eq!(b.table.query()[0].error.as_deref(), Some(text));
    b.verb("dismiss", "jfail").unwrap();
    b.expect("jfail", &["null"]).await;
}

/// A failing prepare aborts the job from `pending` (QEMU's `job_do_finalize`).
#[tokio::test]
async fn a_failing_prepare_aborts() {
    let mut b = Bench::new();
    let driver = TestJob {
        work: Work::Quick,
        log: b.log.clone(),
        prepare_fails: true,
    };
    let options = JobOptions::new("x-test").id(Some("p1".into()));
    b.table.start(options, driver).unwrap();
    b.expect(
        "p1",
        &[
            "created",
            "running",
            "waiting",
            "pending",
            "aborting",
            "concluded",
            "null",
        ],
    )
    .await;
    assert_eq!(b.log.take(), ["prepare", "abort", "clean"]);
}

/// job-cancel in `pending` aborts at once, without preparing.
#[tokio::test]
async fn cancel_while_pending() {
    let mut b = Bench::new();
    b.start("b1", Work::Quick, (false, true)).unwrap();
    b.expect("b1", &["created", "running", "waiting", "pending"])
        .await;
    b.verb("cancel", "b1").unwrap();
    b.expect("b1", &["aborting", "concluded", "null"]).await;
    assert_eq!(b.log.take(), ["abort", "clean"]);
}

/// B.3 in full: for each state a job can rest in, every verb it refuses, with the text.
#[tokio::test]
async fn every_refusal_of_the_verb_table() {
    let b = Bench::new();
    b.start("run", Work::Gate(Arc::new(Semaphore::new(0))), DEFAULTS)
        .unwrap();
    b.start("pau", Work::Gate(Arc::new(Semaphore::new(0))), DEFAULTS)
        .unwrap();
    b.verb("pause", "pau").unwrap();
    b.start("rdy", Work::Mirror, DEFAULTS).unwrap();
    b.start("stb", Work::Mirror, DEFAULTS).unwrap();
    b.start("pen", Work::Quick, MANUAL).unwrap();
    b.start("con", Work::Quick, (true, false)).unwrap();
    // Let every job's task reach its resting state.
    for _ in 0..100 {
        if b.status("rdy") == JobStatus::Ready
            && b.status("stb") == JobStatus::Ready
            && b.status("pen") == JobStatus::Pending
            && b.status("con") == JobStatus::Concluded
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.verb("pause", "stb").unwrap();

    let not_paused = "Can't resume a job that was not paused";
    let expected: [(&str, &str, [Option<&str>; 6]); 6] = [
        // pause, resume, complete, finalize, dismiss, cancel; None = accepted
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
                Some("Job is already paused"),
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
            [
                Some("Job is already paused"),
                None,
                None,
                Some("verb"),
                Some("verb"),
                None,
            ],
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
    let mut checked = 0;
    for (id, state, answers) in expected {
        assert_eq!(b.status(id).as_str(), state, "{id}");
        for (verb, answer) in verbs.iter().zip(answers) {
            let Some(answer) = answer else { continue };
            let text = match answer {
                "verb" => refused(id, state, verb),
                other => other.to_string(),
            };
            assert_eq!(b.refusal(verb, id), text, "{verb} in {state}");
            checked += 1;
        }
    }
    assert_eq!(checked, 23);
    for verb in verbs {
        assert_eq!(b.refusal(verb, "nope"), "Job not found");
    }
    b.table.shut_down();
    b.tasks.close();
    b.tasks.wait().await;
    assert_eq!(b.table.len(), 0);
}

/// B.4's id errors: invalid syntax, in use (even by a concluded job), missing.
#[tokio::test]
async fn id_errors() {
    let mut b = Bench::new();
    assert_eq!(
        b.start("1x", Work::Quick, DEFAULTS).unwrap_err().desc,
        "Invalid job ID '1x'"
    );
    assert_eq!(
        b.start("", Work::Quick, DEFAULTS).unwrap_err().desc,
        "Invalid job ID ''"
    );
    let missing = b.table.start(
        JobOptions::new("x-test"),
        TestJob {
            work: Work::Quick,
            log: b.log.clone(),
            prepare_fails: false,
        },
    );
    assert_eq!(missing.unwrap_err().desc, "Parameter 'job-id' is missing");
    b.start("j1", Work::Quick, (true, false)).unwrap();
    b.expect(
        "j1",
        &["created", "running", "waiting", "pending", "concluded"],
    )
    .await;
    assert_eq!(
        b.start("j1", Work::Quick, DEFAULTS).unwrap_err().desc,
        "Job ID 'j1' already in use"
    );
    b.quiet().await;
}

/// query-jobs lists the newest job first, as QEMU's list does.
#[tokio::test]
async fn query_lists_newest_first() {
    let b = Bench::new();
    for id in ["a", "b", "c"] {
        b.start(id, Work::Gate(Arc::new(Semaphore::new(0))), DEFAULTS)
            .unwrap();
    }
    let ids: Vec<String> = b.table.query().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, ["c", "b", "a"]);
    b.table.shut_down();
}

/// Shutdown leaves no job behind, whatever state each was in.
#[tokio::test]
async fn shutdown_cancels_and_dismisses_everything() {
    let mut b = Bench::new();
    b.start("run", Work::Gate(Arc::new(Semaphore::new(0))), MANUAL)
        .unwrap();
    b.start("pau", Work::Gate(Arc::new(Semaphore::new(0))), MANUAL)
        .unwrap();
    b.verb("pause", "pau").unwrap();
    b.start("pen", Work::Quick, MANUAL).unwrap();
    b.start("con", Work::Quick, (true, false)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.table.shut_down();
    b.tasks.close();
    b.tasks.wait().await;
    assert_eq!(b.table.len(), 0);
    while let Ok(message) = b.rx.try_recv() {
        drop(message);
    }
    // A job started after shutdown aborts at once and leaves nothing either.
    b.start("late", Work::Gate(Arc::new(Semaphore::new(0))), MANUAL)
        .unwrap();
    b.expect(
        "late",
        &["created", "running", "aborting", "concluded", "null"],
    )
    .await;
    assert_eq!(b.table.len(), 0);
}

/// The private face: no events, not listed, answered at conclusion, cancelled by its
/// request's token.
#[tokio::test]
async fn a_private_job_is_silent_and_answers_when_it_concludes() {
    let mut b = Bench::new();
    let answers: Arc<Mutex<Vec<Result<(), QmpError>>>> = Arc::default();
    let start = |work, cancel: CancellationToken| {
        let answers = Arc::clone(&answers);
        let driver = TestJob {
            work,
            log: b.log.clone(),
            prepare_fails: false,
        };
        b.table.start_private(
            JobOptions::new("x-test"),
            driver,
            Arc::new(super::core::Core::new(JobStatus::Running)),
            cancel,
            Box::new(move |outcome| answers.lock().unwrap().push(outcome)),
        )
    };
    let quick = start(Work::Quick, CancellationToken::new());
    let failing = start(Work::Fail("no"), CancellationToken::new());
    let client = CancellationToken::new();
    let gated = start(
        Work::Gate(Arc::new(Semaphore::new(0))),
        client.child_token(),
    );
    let mirror = start(Work::Mirror, CancellationToken::new());
    assert!(b.table.query().is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(gated.status(), JobStatus::Running);
    assert_eq!(gated.core.reported_progress(), Some((1, 2)));
    client.cancel(); // the client leaves
    b.tasks.close();
    b.tasks.wait().await;
    assert_eq!(quick.status(), JobStatus::Null);
    assert_eq!(failing.status(), JobStatus::Null);
    assert_eq!(gated.status(), JobStatus::Null);
    assert_eq!(mirror.status(), JobStatus::Null, "nobody could complete it");
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    assert_eq!(
        answers,
        [
            Ok(()),
            Err(QmpError::generic("no")),
            Ok(()),
            Err(QmpError::generic("Operation canceled"))
        ]
    );
    b.quiet().await;
}
