//! Who may do what, for how long, and what happened (issue 15), over real sockets:
//! per-listener policies seen through `query-commands`, `query-qmp-schema`, refused commands
//! and filtered events; a policy chosen from peer credentials; deadlines for legacy and async
//! clients; rate limits as backpressure; the audit trail.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmp_dispatcher::config::RateLimit;
use qmp_dispatcher::{Policy, Registry, Server, ServerBuilder};
use qmp_tests::{Client, Holds, Scratch, error_reply, return_reply, test_commands};
use serde_json::{Value, json};

/// A test server with the test commands on two listeners: full, and under `policy`.
struct TwoListeners {
    server: Server,
    full: std::path::PathBuf,
    limited: std::path::PathBuf,
    _scratch: Scratch,
}

fn start(policy: Policy, configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> TwoListeners {
    let holds = Holds::default();
    let mut registry = Registry::builder();
    test_commands(&mut registry, &holds);
    registry.event_without_data("STOP").unwrap();
    let server = configure(Server::builder(registry.build())).build();
    let scratch = Scratch::new();
    let full = scratch.path("full.sock");
    let limited = scratch.path("limited.sock");
    let listener = qmp_dispatcher::bind_unix(&full, 0o600).unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let listener = qmp_dispatcher::bind_unix(&limited, 0o600).unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve_with_policy(listener, policy).await });
    TwoListeners {
        server,
        full,
        limited,
        _scratch: scratch,
    }
}

async fn call(client: &mut Client, command: &str, arguments: Value, id: u64) -> Value {
    client.execute(command, arguments, json!(id)).await;
    client.recv_reply().await
}

fn names(reply: &Value) -> Vec<String> {
    let mut names: Vec<String> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_read_only_listener_offers_queries_only() {
    let servers = start(Policy::read_only(), |b| b);
    let mut limited = Client::negotiated(&servers.limited, &["async"]).await;
    let commands = names(&call(&mut limited, "query-commands", json!({}), 1).await);
    assert_eq!(
        commands,
        [
            "async-command-cancel",
            "qmp_capabilities",
            "query-async-commands",
            "query-commands",
            "query-jobs",
            "query-qmp-schema",
            "query-version",
        ]
    );
    // The schema has exactly the same commands.
    let schema = call(&mut limited, "query-qmp-schema", json!({}), 2).await;
    let mut in_schema: Vec<String> = schema["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    in_schema.sort();
    assert_eq!(in_schema, commands);
    // Outside the policy, a command does not exist: QEMU's text for unknown commands.
    let reply = call(&mut limited, "echo", json!({"a": 1}), 3).await;
    let text = "The command echo has not been found";
    assert_eq!(reply, error_reply(Some(json!(3)), "CommandNotFound", text));

    // The full listener of the same server still has everything.
    let mut full = Client::negotiated(&servers.full, &[]).await;
    let all = names(&call(&mut full, "query-commands", json!({}), 1).await);
    assert!(all.contains(&"echo".to_string()) && all.len() > commands.len());
    let reply = call(&mut full, "echo", json!({"a": 1}), 2).await;
    assert_eq!(reply, return_reply(json!({"a": 1}), json!(2)));
}

#[tokio::test]
async fn events_are_filtered_per_listener() {
    let policy = Policy::full()
        .events(|name| name != "STOP")
        .named("no-stop");
    let servers = start(policy, |b| b);
    let mut full = Client::negotiated(&servers.full, &[]).await;
    let mut limited = Client::negotiated(&servers.limited, &[]).await;
    servers.server.events().emit("STOP", None);
    servers.server.events().emit("RESUME", None);
    assert_eq!(full.recv().await["event"], "STOP");
    assert_eq!(full.recv().await["event"], "RESUME");
    assert_eq!(limited.recv().await["event"], "RESUME", "STOP is filtered");
    // ... and the filtered listener's schema has no STOP event.
    let schema = call(&mut limited, "query-qmp-schema", json!({}), 1).await;
    let events: Vec<&Value> = schema["return"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "event")
        .collect();
    assert!(events.iter().all(|e| e["name"] != "STOP"), "{events:?}");
}

#[tokio::test]
async fn the_policy_can_be_chosen_from_peer_credentials() {
    let holds = Holds::default();
    let mut registry = Registry::builder();
    test_commands(&mut registry, &holds);
    let server = Server::builder(registry.build()).build();
    let scratch = Scratch::new();
    let path = scratch.path("q.sock");
    let listener = qmp_dispatcher::bind_unix(&path, 0o600).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let s = server.clone();
    tokio::spawn(async move {
        s.serve_with_policy_for(listener, move |creds| {
            record.lock().unwrap().push(creds);
            // This process is the only peer: pid known, so read-only.
            if creds.is_some_and(|c| c.pid == Some(std::process::id() as i32)) {
                Policy::read_only()
            } else {
                Policy::full()
            }
        })
        .await
    });
    let mut client = Client::negotiated(&path, &[]).await;
    let reply = call(&mut client, "echo", json!({}), 1).await;
    assert_eq!(reply["error"]["class"], "CommandNotFound");
    let creds = seen.lock().unwrap()[0].expect("a Unix peer has credentials");
    assert_eq!(creds.pid, Some(std::process::id() as i32));
}

#[tokio::test]
async fn a_deadline_unblocks_a_legacy_client_and_cancels_the_handler() {
    let servers = start(Policy::full(), |b| {
        b.command_timeout("x-delay", Duration::from_millis(100))
    });
    let mut client = Client::negotiated(&servers.full, &[]).await;
    let started = Instant::now();
    client
        .execute("x-delay", json!({"ms": 60_000}), json!(1))
        .await;
    // Queued behind it, as QEMU queues: it runs once the first times out.
    client
        .execute("echo", json!({"after": true}), json!(2))
        .await;
    let text = "Command x-delay timed out after 100 ms";
    assert_eq!(
        client.recv_reply().await,
        error_reply(Some(json!(1)), "GenericError", text)
    );
    assert_eq!(
        client.recv_reply().await,
        return_reply(json!({"after": true}), json!(2))
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The handler's timer task was dropped with the cancellation.
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers.server.stats().handler_tasks > 0 || servers.server.stats().in_flight > 0 {
        assert!(Instant::now() < deadline, "{:?}", servers.server.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Commands that finish in time are untouched.
    let reply = call(&mut client, "x-delay", json!({"ms": 1}), 3).await;
    assert_eq!(reply, return_reply(json!({}), json!(3)));
}

#[tokio::test]
async fn a_default_deadline_applies_to_async_clients_and_spares_the_rest() {
    let servers = start(Policy::full(), |b| {
        b.default_command_timeout(Duration::from_millis(50))
            .command_timeout("hold", Duration::from_secs(3600))
    });
    let mut client = Client::negotiated(&servers.full, &["async"]).await;
    client
        .execute("x-delay", json!({"ms": 60_000}), json!("a"))
        .await;
    client
        .execute("x-delay", json!({"ms": 60_000}), json!("b"))
        .await;
    client.execute("query-version", json!({}), json!("v")).await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(client.recv_reply().await);
    }
    let text = "Command x-delay timed out after 50 ms";
    assert!(replies.contains(&error_reply(Some(json!("a")), "GenericError", text)));
    assert!(replies.contains(&error_reply(Some(json!("b")), "GenericError", text)));
    assert!(
        replies
            .iter()
            .any(|r| r["id"] == "v" && r.get("return").is_some())
    );
    // Nothing is left in flight, so the ids can be used again.
    let reply = call(&mut client, "query-async-commands", json!({}), 9).await;
    assert_eq!(reply, return_reply(json!([]), json!(9)));
}

#[tokio::test]
async fn over_its_rate_a_client_is_slowed_not_refused() {
    let limit = RateLimit {
        burst: 5,
        per: Duration::from_millis(200),
    };
    let servers = start(Policy::full(), |b| b.rate_limit(limit));
    let mut client = Client::negotiated(&servers.full, &["async"]).await;
    let started = Instant::now();
    for id in 0..15 {
        client.execute("echo", json!({"n": id}), json!(id)).await;
    }
    for id in 0..15 {
        assert_eq!(
            client.recv_reply().await,
            return_reply(json!({"n": id}), json!(id)),
            "every request is answered, in order"
        );
    }
    // 5 at once, then 5 per 200 ms: the last 10 (less the one negotiation used) need at
    // least ~360 ms. A lower bound only: a slow machine cannot make it fail.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// Collects the formatted log lines of one target.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_command_is_audited_without_its_arguments() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter(format!("{}=info", qmp_dispatcher::observe::AUDIT_TARGET))
        .finish();
    // A current-thread test runtime: the server's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let servers = start(Policy::read_only().named("ro"), |b| {
        b.command_timeout("x-delay", Duration::from_millis(20))
    });
    // The other tests of this binary run commands on their threads meanwhile: one that
    // registered the audit callsite while `set_default` ran may have cached it as unwanted
    // (tracing computes a callsite's interest once). Computing it again now, long after any
    // such registration finished, makes this subscriber see every line.
    tracing::callsite::rebuild_interest_cache();
    let mut full = Client::negotiated(&servers.full, &[]).await;
    call(&mut full, "echo", json!({"password": "hunter2"}), 1).await;
    call(&mut full, "fail", json!({}), 2).await;
    call(&mut full, "x-delay", json!({"ms": 10_000}), 3).await;
    let mut limited = Client::negotiated(&servers.limited, &[]).await;
    call(&mut limited, "echo", json!({}), 4).await;
    drop((full, limited));
    tokio::time::sleep(Duration::from_millis(50)).await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let find = |command: &str, outcome: &str| {
        lines.iter().any(|l| {
            l.contains(&format!("command=\"{command}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
    };
    assert!(find("qmp_capabilities", "ok"), "{log}");
    assert!(find("echo", "ok"), "{log}");
    assert!(
        find("fail", "error") && log.contains("class=\"DeviceNotFound\""),
        "{log}"
    );
    assert!(find("x-delay", "timed-out"), "{log}");
    assert!(
        find("echo", "refused") && log.contains("policy=\"ro\""),
        "{log}"
    );
    let (uid, _) = qmp_tests::own_ids();
    assert!(log.contains(&format!("uid={uid}")), "{log}");
    assert!(
        !log.contains("hunter2"),
        "arguments never reach the audit trail: {log}"
    );
}
