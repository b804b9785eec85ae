//! The `async` capability: many commands in flight, replies as they complete, ids
//! mandatory and unique, the in-flight cap, and per-client tracking and cancellation.

use std::time::{Duration, Instant};

use qmp_tests::{TestServer, error_reply, return_reply};
use serde_json::json;

#[tokio::test]
async fn replies_come_back_as_commands_complete() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    for key in ["a", "b", "c"] {
        client
            .execute("hold", json!({"key": key}), json!(key))
            .await;
    }
    client
        .execute("echo", json!({"quick": true}), json!("quick"))
        .await;
    // The quick command is not held up by the three deferred ones.
    assert_eq!(
        client.recv().await,
        return_reply(json!({"quick": true}), json!("quick"))
    );
    for key in ["c", "a", "b"] {
        server.holds.wait_parked(key).await;
        server.holds.release(key, json!(key));
        assert_eq!(client.recv().await, return_reply(json!(key), json!(key)));
    }
}

#[tokio::test]
async fn concurrent_delays_take_as_long_as_the_slowest() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    let started = Instant::now();
    for i in 0..100u64 {
        let ms = 300 - (i * 3);
        client.execute("x-delay", json!({"ms": ms}), json!(i)).await;
    }
    let mut order = Vec::new();
    for _ in 0..100 {
        let reply = client.recv().await;
        assert_eq!(reply["return"], json!({}));
        order.push(reply["id"].as_u64().unwrap());
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "took {elapsed:?}; the sum of delays is 15 s"
    );
    assert_ne!(
        order,
        (0..100).collect::<Vec<_>>(),
        "replies should come out of order"
    );
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..100).collect::<Vec<_>>(),
        "one reply per request"
    );
}

#[tokio::test]
async fn async_requests_need_an_id() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    client.send(br#"{"execute":"echo"}"#).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            None,
            "GenericError",
            "QMP input lacks member 'id', required by capability 'async'"
        )
    );
}

#[tokio::test]
async fn a_duplicate_in_flight_id_is_rejected() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    client
        .execute("hold", json!({"key": "k"}), json!({"n": 1}))
        .await;
    server.holds.wait_parked("k").await;
    client.send(br#"{"execute":"echo","id":{ "n" : 1 }}"#).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!({"n": 1})),
            "GenericError",
            "QMP input member 'id' {\"n\":1} is already in use by a command in flight"
        )
    );
    server.holds.release("k", json!("first"));
    assert_eq!(
        client.recv().await,
        return_reply(json!("first"), json!({"n": 1}))
    );
    // Once answered, the id is free again.
    client.execute("echo", json!({}), json!({"n": 1})).await;
    assert_eq!(
        client.recv().await,
        return_reply(json!({}), json!({"n": 1}))
    );
}

#[tokio::test]
async fn ids_are_per_client() {
    let server = TestServer::start().await;
    let mut a = server.negotiated(&["async"]).await;
    let mut b = server.negotiated(&["async"]).await;
    a.execute("hold", json!({"key": "a"}), json!(1)).await;
    server.holds.wait_parked("a").await;
    b.execute("echo", json!({"b": true}), json!(1)).await;
    assert_eq!(b.recv().await, return_reply(json!({"b": true}), json!(1)));
    server.holds.release("a", json!("a"));
    assert_eq!(a.recv().await, return_reply(json!("a"), json!(1)));
}

#[tokio::test]
async fn the_in_flight_cap_pauses_reading_and_drops_nothing() {
    let server = TestServer::start_with(|b| b.max_in_flight(4)).await;
    let mut client = server.negotiated(&["async"]).await;
    for i in 0..6 {
        client
            .execute("hold", json!({"key": format!("h{i}")}), json!(i))
            .await;
    }
    client.execute("echo", json!({}), json!("after")).await;
    for i in 0..4 {
        server.holds.wait_parked(&format!("h{i}")).await;
    }
    client.expect_silence(150).await;
    assert_eq!(server.holds.parked(), 4, "reading must pause at the cap");
    server.holds.release("h0", json!(0));
    assert_eq!(client.recv().await, return_reply(json!(0), json!(0)));
    server.holds.wait_parked("h4").await;
    server.holds.release("h1", json!(1));
    assert_eq!(client.recv().await, return_reply(json!(1), json!(1)));
    server.holds.wait_parked("h5").await;
    // h2..h5 fill the cap again: the echo behind them is still unread.
    client.expect_silence(100).await;
    server.holds.release("h2", json!(2));
    assert_eq!(client.recv().await, return_reply(json!(2), json!(2)));
    assert_eq!(client.recv().await, return_reply(json!({}), json!("after")));
    for i in 3..6 {
        server.holds.release(&format!("h{i}"), json!(i));
        assert_eq!(client.recv().await, return_reply(json!(i), json!(i)));
    }
}

#[tokio::test]
async fn query_async_commands_lists_only_the_callers_commands() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    let mut other = server.negotiated(&["async"]).await;
    client
        .execute("hold", json!({"key": "mine"}), json!("mine"))
        .await;
    other
        .execute("hold", json!({"key": "theirs"}), json!("theirs"))
        .await;
    server.holds.wait_parked("mine").await;
    server.holds.wait_parked("theirs").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    client
        .execute("query-async-commands", json!({}), json!("q"))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["id"], "q");
    let list = reply["return"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{reply}");
    assert_eq!(list[0]["id"], "mine");
    assert_eq!(list[0]["command"], "hold");
    assert!(list[0]["elapsed-ms"].as_u64().unwrap() >= 20);
}

#[tokio::test]
async fn async_command_cancel_cancels_the_callers_command() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["oob", "async"]).await;
    let mut other = server.negotiated(&["async"]).await;
    client
        .execute("hold", json!({"key": "c1"}), json!(42))
        .await;
    server.holds.wait_parked("c1").await;
    // Another client cannot cancel it: ids are per client.
    other
        .execute("async-command-cancel", json!({"id": 42}), json!("x"))
        .await;
    assert_eq!(
        other.recv().await,
        error_reply(
            Some(json!("x")),
            "GenericError",
            "No command with id 42 is in flight"
        )
    );
    client
        .send(br#"{"exec-oob":"async-command-cancel","arguments":{"id":42},"id":"cancel"}"#)
        .await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!(42)),
            "GenericError",
            "Command hold has been cancelled"
        )
    );
    assert_eq!(
        client.recv().await,
        return_reply(json!({}), json!("cancel"))
    );
    server.holds.wait_cancelled("c1").await;
    client
        .execute("async-command-cancel", json!({"id": 42}), json!("again"))
        .await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("again")),
            "GenericError",
            "No command with id 42 is in flight"
        )
    );
    client
        .execute("async-command-cancel", json!({}), json!("bad"))
        .await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("bad")),
            "GenericError",
            "Parameter 'id' is missing"
        )
    );
    server
        .wait_stats("nothing in flight", |s| {
            s.in_flight == 0 && s.live_returns == 0
        })
        .await;
}

#[tokio::test]
async fn a_cancelled_async_fn_is_dropped() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    client
        .execute("x-delay", json!({"ms": 60_000}), json!("long"))
        .await;
    server
        .wait_stats("delay in flight", |s| s.in_flight == 1)
        .await;
    client
        .execute("async-command-cancel", json!({"id": "long"}), json!("c"))
        .await;
    assert_eq!(
        client.recv().await["error"]["desc"],
        "Command x-delay has been cancelled"
    );
    assert_eq!(client.recv().await, return_reply(json!({}), json!("c")));
    server
        .wait_stats("the future is gone", |s| {
            s.in_flight == 0 && s.live_returns == 0
        })
        .await;
}
