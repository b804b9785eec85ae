//! Disconnects, events, many clients and shutdown.

use std::time::Duration;

use qmp_tests::{TestServer, return_reply};
use serde_json::json;

#[tokio::test]
async fn disconnect_cancels_in_flight_commands_and_leaks_nothing() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    for key in ["d1", "d2", "d3"] {
        client
            .execute("hold", json!({"key": key}), json!(key))
            .await;
    }
    client
        .execute("x-delay", json!({"ms": 60_000}), json!("delay"))
        .await;
    for key in ["d1", "d2", "d3"] {
        server.holds.wait_parked(key).await;
    }
    server
        .wait_stats("four in flight", |s| s.in_flight == 4)
        .await;
    drop(client);
    for key in ["d1", "d2", "d3"] {
        server.holds.wait_cancelled(key).await;
    }
    server
        .wait_stats("a clean server", |s| {
            s.clients == 0 && s.in_flight == 0 && s.live_returns == 0 && s.connection_tasks == 0
        })
        .await;
    // The next client is clean and never sees the departed client's replies.
    let mut next = server.negotiated(&["async"]).await;
    next.execute("echo", json!({}), json!("d1")).await;
    assert_eq!(next.recv().await, return_reply(json!({}), json!("d1")));
    next.expect_silence(100).await;
}

#[tokio::test]
async fn a_legacy_client_that_disconnects_mid_command_gets_it_cancelled() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .send(br#"{"execute":"hold","arguments":{"key":"legacy"},"id":1}{"execute":"echo","id":2}"#)
        .await;
    server.holds.wait_parked("legacy").await;
    drop(client);
    server.holds.wait_cancelled("legacy").await;
    server
        .wait_stats("a clean server", |s| {
            s.clients == 0 && s.in_flight == 0 && s.live_returns == 0
        })
        .await;
}

#[tokio::test]
async fn a_late_reply_after_disconnect_goes_nowhere() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .execute("hold", json!({"key": "late"}), json!("late"))
        .await;
    server.holds.wait_parked("late").await;
    let ret = server.holds.take("late");
    drop(client);
    server.wait_stats("client gone", |s| s.clients == 0).await;
    assert!(ret.is_cancelled());
    let mut next = server.negotiated(&[]).await;
    ret.ok(&json!("stale"));
    next.expect_silence(150).await;
    next.execute("echo", json!({}), json!(1)).await;
    assert_eq!(next.recv().await, return_reply(json!({}), json!(1)));
}

#[tokio::test]
async fn events_reach_negotiated_clients_only_and_flow_during_a_command() {
    let server = TestServer::start().await;
    let mut negotiating = server.connect().await;
    negotiating.greeting().await;
    let mut client = server.negotiated(&[]).await;
    client
        .execute("hold", json!({"key": "busy"}), json!("busy"))
        .await;
    server.holds.wait_parked("busy").await;
    server.server.events().emit("STOP", None);
    server
        .server
        .events()
        .emit("BLOCK_JOB_READY", Some(json!({"device": "j"})));
    let stop = client.recv().await;
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none());
    assert!(stop["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(stop["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    let ready = client.recv().await;
    assert_eq!(ready["data"], json!({"device": "j"}));
    server.holds.release("busy", json!({}));
    assert_eq!(client.recv().await, return_reply(json!({}), json!("busy")));
    // The negotiating client saw nothing, and gets no replay after negotiating.
    negotiating.expect_silence(100).await;
    negotiating.negotiate(&[]).await;
    negotiating.expect_silence(100).await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_others_carry_on() {
    let server = TestServer::start_with(|b| b.max_pending_output(64 * 1024).event_queue(64)).await;
    let _stalled = server.negotiated(&[]).await;
    let mut healthy = server.negotiated(&[]).await;
    let big = "x".repeat(4096);
    let reader = tokio::spawn(async move {
        for _ in 0..2000 {
            assert_eq!(healthy.recv().await["event"], "BIG");
        }
        healthy
    });
    for _ in 0..2000 {
        server
            .server
            .events()
            .emit("BIG", Some(json!({"pad": big})));
        tokio::task::yield_now().await;
    }
    let _healthy = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("healthy client kept up")
        .unwrap();
    server
        .wait_stats("the stalled client is gone", |s| s.clients == 1)
        .await;
}

#[tokio::test]
async fn many_clients_at_once() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for c in 0..50 {
        let socket = server.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = qmp_tests::Client::connect(&socket).await;
            client.greeting().await;
            client
                .negotiate(if c % 2 == 0 { &["async"] } else { &[] })
                .await;
            for i in 0..20 {
                client
                    .execute("echo", json!({"c": c, "i": i}), json!([c, i]))
                    .await;
            }
            for i in 0..20 {
                assert_eq!(
                    client.recv().await,
                    return_reply(json!({"c": c, "i": i}), json!([c, i]))
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    server.wait_stats("all gone", |s| s.clients == 0).await;
}

#[tokio::test]
async fn shutdown_cancels_in_flight_and_closes_every_connection() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    client
        .execute("hold", json!({"key": "s"}), json!("s"))
        .await;
    server.holds.wait_parked("s").await;
    server.server.shutdown();
    server.holds.wait_cancelled("s").await;
    client.expect_eof().await;
    tokio::time::timeout(Duration::from_secs(5), server.server.wait())
        .await
        .expect("connections ended");
    assert_eq!(server.server.stats().in_flight, 0);
    assert!(
        tokio::net::UnixStream::connect(&server.socket)
            .await
            .is_err()
            || server.server.is_shut_down()
    );
}

/// The departure watch starts after a short grace (10 ms) and then waits on the kernel's
/// hang-up edge, not a timer: a client that leaves long after its command started is still
/// noticed, and one that only half-closes keeps its reply.
#[tokio::test]
async fn departures_are_noticed_by_hang_up_long_after_reading_paused() {
    let server = TestServer::start().await;
    let mut leaving = server.negotiated(&[]).await;
    leaving
        .send(br#"{"execute":"hold","arguments":{"key":"gone"},"id":1}{"execute":"echo","id":2}"#)
        .await;
    server.holds.wait_parked("gone").await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(leaving);
    server.holds.wait_cancelled("gone").await;

    let mut half = server.negotiated(&[]).await;
    half.send(br#"{"execute":"hold","arguments":{"key":"half"},"id":3}"#)
        .await;
    server.holds.wait_parked("half").await;
    half.shutdown_write().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    server
        .holds
        .release("half", serde_json::json!({"still": "here"}));
    assert_eq!(
        half.recv_reply().await,
        qmp_tests::return_reply(serde_json::json!({"still": "here"}), serde_json::json!(3))
    );
}
