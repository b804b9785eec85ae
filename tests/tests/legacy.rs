//! Clients that did not negotiate `async` see exactly QEMU: one in-band command at a time,
//! replies in order, reading suspended behind a running command, OOB replies overtaking.

use qmp_tests::{TestServer, error_reply, return_reply};
use serde_json::json;

#[tokio::test]
async fn replies_stay_in_order_behind_a_slow_deferred_command() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .send(
            br#"{"execute":"hold","arguments":{"key":"slow"},"id":1}{"execute":"echo","id":2}{]{"execute":"nope","id":3}"#,
        )
        .await;
    server.holds.wait_parked("slow").await;
    client.expect_silence(150).await;
    server.holds.release("slow", json!({"done": true}));
    assert_eq!(
        client.recv().await,
        return_reply(json!({"done": true}), json!(1))
    );
    assert_eq!(client.recv().await, return_reply(json!({}), json!(2)));
    assert_eq!(client.recv().await["error"]["class"], "GenericError");
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!(3)),
            "CommandNotFound",
            "The command nope has not been found"
        )
    );
}

#[tokio::test]
async fn without_oob_nothing_past_a_running_command_is_read() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client.send(br#"{"execute":"hold","arguments":{"key":"a"},"id":1}{"execute":"hold","arguments":{"key":"b"},"id":2}"#).await;
    server.holds.wait_parked("a").await;
    client.expect_silence(100).await;
    assert_eq!(
        server.holds.parked(),
        1,
        "the second command must not start while the first runs"
    );
    assert_eq!(server.server.stats().in_flight, 1);
    server.holds.release("a", json!(1));
    assert_eq!(client.recv().await, return_reply(json!(1), json!(1)));
    server.holds.wait_parked("b").await;
    server.holds.release("b", json!(2));
    assert_eq!(client.recv().await, return_reply(json!(2), json!(2)));
}

#[tokio::test]
async fn exec_oob_overtakes_a_running_in_band_command() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["oob"]).await;
    client
        .send(
            br#"{"execute":"hold","arguments":{"key":"blocker"},"id":"blocked"}{"execute":"echo","id":"in-band"}{ 'id': 'err-2' }{"exec-oob":"oob-echo","id":"oob"}{"exec-oob":"echo","id":"oob-err"}"#,
        )
        .await;
    server.holds.wait_parked("blocker").await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!("oob")));
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("oob-err")),
            "GenericError",
            "The command echo does not support OOB"
        )
    );
    client.expect_silence(100).await;
    server.holds.release("blocker", json!({}));
    assert_eq!(
        client.recv().await,
        return_reply(json!({}), json!("blocked"))
    );
    assert_eq!(
        client.recv().await,
        return_reply(json!({}), json!("in-band"))
    );
    assert_eq!(client.recv().await["id"], json!("err-2"));
}

#[tokio::test]
async fn with_oob_reading_stops_once_eight_requests_are_queued() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["oob"]).await;
    let mut burst = String::from(r#"{"execute":"hold","arguments":{"key":"blocker"},"id":0}"#);
    for i in 1..=7 {
        burst.push_str(&format!(r#"{{"execute":"echo","id":{i}}}"#));
    }
    client.send(&burst).await;
    server.holds.wait_parked("blocker").await;
    // 1 running + 7 queued: an exec-oob is still read and answered at once.
    client.send(br#"{"exec-oob":"oob-echo","id":"oob7"}"#).await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!("oob7")));
    // An 8th queued request fills the queue; the next exec-oob waits behind the blocker.
    client
        .send(br#"{"execute":"echo","id":8}{"exec-oob":"oob-echo","id":"oob8"}"#)
        .await;
    client.expect_silence(150).await;
    server.holds.release("blocker", json!({}));
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(client.recv().await["id"].clone());
    }
    assert_eq!(ids[0], json!(0));
    // The exec-oob is read once the queue drains, so it may overtake any queued echo, but
    // the in-band replies keep their order.
    let in_band: Vec<_> = ids.iter().filter(|id| id.is_number()).cloned().collect();
    assert_eq!(in_band, (0..=8).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(ids.contains(&json!("oob8")));
}

#[tokio::test]
async fn a_legacy_oob_client_can_cancel_its_running_command() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["oob"]).await;
    client.send(br#"{"execute":"hold","arguments":{"key":"long"},"id":"long"}{"execute":"echo","id":"next"}"#).await;
    server.holds.wait_parked("long").await;
    client
        .send(br#"{"exec-oob":"async-command-cancel","arguments":{"id":"long"},"id":"c"}"#)
        .await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("long")),
            "GenericError",
            "Command hold has been cancelled"
        )
    );
    assert_eq!(client.recv().await, return_reply(json!({}), json!("c")));
    server.holds.wait_cancelled("long").await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!("next")));
}
