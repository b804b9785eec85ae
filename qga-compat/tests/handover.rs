//! The agent's parser state handed from client to client (`ConnectionParts`), including when
//! a client's serving future is abandoned without the client hanging up.

use std::time::Duration;

use qmp_dispatcher::ByteStream;
use qmp_qga::minimal_agent;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

const TIMEOUT: Duration = Duration::from_secs(10);

async fn reply(client: &mut BufReader<DuplexStream>) -> Value {
    let mut line = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_until(b'\n', &mut line))
        .await
        .expect("a reply in time")
        .unwrap();
    serde_json::from_slice(&line).unwrap()
}

/// Regression: with the old hub, a byte-stream client whose `serve_stream` was dropped
/// (here by a timeout) without a hang-up left the shared session's reader waiting on the
/// departed stream, and every later client's `guest-ping` went unanswered.
#[tokio::test]
async fn a_client_abandoned_without_hang_up_does_not_wedge_the_next() {
    let agent = minimal_agent();
    let (abandoned, abandoned_end) = tokio::io::duplex(4096);
    let served = tokio::time::timeout(
        Duration::from_millis(100),
        agent.serve_stream(ByteStream(abandoned_end)),
    )
    .await;
    assert!(served.is_err(), "the first client was still being served");

    let (next, next_end) = tokio::io::duplex(4096);
    let serving = agent.clone();
    let task = tokio::spawn(async move { serving.serve_stream(ByteStream(next_end)).await });
    let mut next = BufReader::new(next);
    next.write_all(br#"{"execute":"guest-ping","id":1}"#)
        .await
        .unwrap();
    assert_eq!(reply(&mut next).await, json!({"return": {}, "id": 1}));
    drop(next);
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
    drop(abandoned);
    agent.server().shutdown();
}

#[tokio::test]
async fn half_a_request_from_one_client_is_finished_by_the_next() {
    let agent = minimal_agent();
    let (first, first_end) = tokio::io::duplex(4096);
    let serving = agent.clone();
    let task = tokio::spawn(async move { serving.serve_stream(ByteStream(first_end)).await });
    let mut first = first;
    first
        .write_all(br#"{"execute":"guest-ping","#)
        .await
        .unwrap();
    drop(first);
    tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();

    let (next, next_end) = tokio::io::duplex(4096);
    let serving = agent.clone();
    tokio::spawn(async move { serving.serve_stream(ByteStream(next_end)).await });
    let mut next = BufReader::new(next);
    next.write_all(br#""id":7}"#).await.unwrap();
    assert_eq!(reply(&mut next).await, json!({"return": {}, "id": 7}));
    agent.server().shutdown();
}
