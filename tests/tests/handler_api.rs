//! The handler API over real sockets: registry state and the request context (capabilities,
//! peer credentials, declared events), `IntoReply`'s one rule for `()`, blocking commands
//! and their bound, commands written as types, and what the schema says about them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qmp_dispatcher::{
    Command, Context, NoArgs, QmpCommand, QmpError, QmpReturn, RegisterError, Registry, Server,
    async_trait,
};
use qmp_handlers::demo::{self, DemoOptions};
use qmp_tests::{Client, Holds, TestServer, error_reply, return_reply};
use serde_json::{Value, json};

/// The embedder's state in these tests.
#[derive(Default)]
struct Vm {
    balloon: Mutex<u64>,
    /// Blocking calls running now, and the most seen at once.
    blocking_now: AtomicUsize,
    blocking_peak: AtomicUsize,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct BalloonArgs {
    value: u64,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

/// A command that is a type with state of its own.
#[derive(Default)]
struct Balloon {
    calls: AtomicUsize,
}

#[async_trait]
impl QmpCommand<Vm> for Balloon {
    type Arguments = BalloonArgs;
    type Returns = Value;

    async fn run(&self, args: BalloonArgs, cx: Context<Vm>) -> Result<Value, QmpError> {
        let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::task::yield_now().await;
        *cx.state().balloon.lock().unwrap() = args.value;
        Ok(json!({ "calls": calls }))
    }
}

fn registry() -> Result<Registry, RegisterError> {
    let mut registry = Registry::with_state(Vm::default());
    registry
        .event_without_data("STOP")?
        .event_without_data("RESUME")?
        .add(Command::new("balloon", Balloon::default()))?
        .add(Command::sync(
            "query-balloon",
            |_: NoArgs, cx: &Context<Vm>| {
                Ok(json!({ "actual": *cx.state().balloon.lock().unwrap() }))
            },
        ))?
        .add(Command::sync("whoami", |_: NoArgs, cx: &Context<Vm>| {
            let client = cx.client();
            let peer = client.peer().map(|p| json!([p.uid, p.gid, p.pid]));
            let caps = client.capabilities();
            Ok(json!({
                "peer": peer,
                "oob": caps.oob,
                "async": caps.r#async,
                "command": cx.command(),
            }))
        }))?
        .add(
            Command::sync("stop", |_: NoArgs, cx: &Context<Vm>| {
                cx.emit("STOP", None);
                Ok(())
            })
            .emits("STOP"),
        )?
        // Emits an event it did not declare: sent, and flagged.
        .add(Command::sync(
            "sneaky-resume",
            |_: NoArgs, cx: &Context<Vm>| {
                cx.emit("RESUME", None);
                Ok(())
            },
        ))?
        .add(Command::deferred(
            "unit-ok",
            |_: NoArgs, _, ret: QmpReturn| ret.ok(&()),
        ))?
        .add(Command::sync(
            "query-blocking-peak",
            |_: NoArgs, cx: &Context<Vm>| Ok(cx.state().blocking_peak.load(Ordering::SeqCst)),
        ))?
        .add(
            Command::blocking("x-block", |args: SleepArgs, cx: Context<Vm>| {
                let vm = cx.state();
                let now = vm.blocking_now.fetch_add(1, Ordering::SeqCst) + 1;
                vm.blocking_peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(args.ms));
                vm.blocking_now.fetch_sub(1, Ordering::SeqCst);
                Ok(json!({ "slept": args.ms }))
            })
            .max_concurrent(2),
        )?;
    registry.try_build()
}

fn start() -> TestServer {
    let server = Server::builder(registry().expect("registry")).build();
    TestServer::serve(server, Holds::default())
}

async fn call(client: &mut Client, command: &str, arguments: Value, id: u64) -> Value {
    client.execute(command, arguments, json!(id)).await;
    client.recv_reply().await
}

#[tokio::test]
async fn handlers_share_the_registry_state_and_stateful_commands_keep_theirs() {
    let server = start();
    let mut client = server.negotiated(&[]).await;
    let reply = call(&mut client, "balloon", json!({"value": 512}), 1).await;
    assert_eq!(reply, return_reply(json!({"calls": 1}), json!(1)));
    let reply = call(&mut client, "balloon", json!({"value": 1024}), 2).await;
    assert_eq!(reply, return_reply(json!({"calls": 2}), json!(2)));
    let reply = call(&mut client, "query-balloon", json!({}), 3).await;
    assert_eq!(reply, return_reply(json!({"actual": 1024}), json!(3)));
    // The type's `Arguments` decode with QEMU's texts.
    let reply = call(&mut client, "balloon", json!({"value": "x"}), 4).await;
    let text = "Invalid parameter type for 'value', expected: integer";
    assert_eq!(reply, error_reply(Some(json!(4)), "GenericError", text));
}

#[tokio::test]
async fn the_request_context_knows_the_client() {
    let server = start();
    let (uid, gid) = qmp_tests::own_ids();
    let me = (uid, gid, std::process::id() as i64);
    let mut plain = server.negotiated(&[]).await;
    let reply = call(&mut plain, "whoami", json!({}), 1).await;
    assert_eq!(
        reply["return"],
        json!({"peer": [me.0, me.1, me.2], "oob": false, "async": false, "command": "whoami"})
    );
    let mut both = server.negotiated(&["oob", "async"]).await;
    let reply = call(&mut both, "whoami", json!({}), 1).await;
    assert_eq!(reply["return"]["oob"], json!(true));
    assert_eq!(reply["return"]["async"], json!(true));
}

#[tokio::test]
async fn unit_is_answered_as_an_empty_object_whichever_way_it_is_sent() {
    let server = start();
    let mut client = server.negotiated(&[]).await;
    // `ret.ok(&())` once sent `{"return": null}`, which QEMU never sends.
    let reply = call(&mut client, "unit-ok", json!({}), 1).await;
    assert_eq!(reply, return_reply(json!({}), json!(1)));
    let reply = call(&mut client, "stop", json!({}), 2).await;
    assert_eq!(reply, return_reply(json!({}), json!(2)));
}

#[tokio::test]
async fn events_a_command_did_not_declare_are_sent_and_flagged() {
    let server = start();
    let mut client = server.negotiated(&[]).await;
    client.execute("stop", json!({}), json!(1)).await;
    assert_eq!(client.recv().await["event"], json!("STOP"));
    assert_eq!(client.recv().await, return_reply(json!({}), json!(1)));
    assert_eq!(server.server.stats().undeclared_events, 0);

    server.allow_undeclared_events(1);
    client.execute("sneaky-resume", json!({}), json!(2)).await;
    assert_eq!(client.recv().await["event"], json!("RESUME"));
    assert_eq!(client.recv().await, return_reply(json!({}), json!(2)));
    assert_eq!(server.server.stats().undeclared_events, 1);
}

#[test]
fn a_command_naming_an_undeclared_event_does_not_build() {
    let mut registry = Registry::builder();
    registry
        .add(Command::sync("stop", |_: NoArgs, _| Ok(())).emits("STOP"))
        .unwrap();
    assert_eq!(
        registry.try_build().err(),
        Some(RegisterError::UndeclaredEvent {
            command: "stop".into(),
            event: "STOP".into(),
        })
    );
}

#[tokio::test]
async fn blocking_commands_run_within_their_bound_and_a_waiting_one_can_be_cancelled() {
    let server = start();
    let mut client = server.negotiated(&["async"]).await;
    for id in 1..=5 {
        client
            .execute("x-block", json!({"ms": 150}), json!(id))
            .await;
    }
    // The fifth waits for a slot; cancelled there, it never runs.
    client
        .execute("async-command-cancel", json!({"id": 5}), json!("c"))
        .await;
    let mut replies = Vec::new();
    while replies.len() < 6 {
        replies.push(client.recv_reply().await);
    }
    let cancelled = error_reply(
        Some(json!(5)),
        "GenericError",
        "Command x-block has been cancelled",
    );
    assert!(replies.contains(&cancelled), "{replies:?}");
    assert!(replies.contains(&return_reply(json!({}), json!("c"))));
    for id in 1..=4 {
        assert!(replies.contains(&return_reply(json!({"slept": 150}), json!(id))));
    }
    server
        .wait_stats("handler work done", |s| {
            s.handler_tasks == 0 && s.in_flight == 0
        })
        .await;
    let reply = call(&mut client, "query-blocking-peak", json!({}), 6).await;
    assert_eq!(
        reply,
        return_reply(json!(2), json!(6)),
        "at most max_concurrent(2) blocking calls at once, and the cancelled one never ran"
    );
}

#[tokio::test]
async fn the_schema_marks_out_of_order_commands_and_declared_events() {
    let server = start();
    let mut client = server.negotiated(&[]).await;
    let reply = call(&mut client, "query-qmp-schema", json!({}), 1).await;
    let entries = reply["return"].as_array().expect("schema").clone();
    let features = |name: &str| -> Vec<String> {
        let entry = entries
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"));
        entry["features"]
            .as_array()
            .map(|f| f.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(features("balloon"), ["async"]);
    assert_eq!(features("x-block"), ["async"]);
    assert_eq!(features("unit-ok"), ["async"]);
    assert!(features("query-balloon").is_empty());
    assert_eq!(features("stop"), ["emits-STOP"]);
    assert!(features("query-commands").is_empty());
}

#[tokio::test]
async fn the_demo_declares_every_event_its_commands_emit() {
    let demo = demo::build(&DemoOptions::default(), || {}).expect("demo builds");
    let server = TestServer::serve(demo.server, Holds::default());
    let mut client = server.negotiated(&[]).await;
    for (id, command) in ["stop", "cont", "system_powerdown", "quit"]
        .iter()
        .enumerate()
    {
        client.execute(command, json!({}), json!(id)).await;
        // Each emits one event, then replies.
        assert!(client.recv().await.get("event").is_some(), "{command}");
        assert_eq!(client.recv().await, return_reply(json!({}), json!(id)));
    }
    assert_eq!(server.server.stats().undeclared_events, 0);
}
