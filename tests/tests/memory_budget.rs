//! The server-wide memory budget with backpressure, measured in `Stats::memory` and in this
//! process's RSS. Alone in its test binary: other tests in the same process would move RSS.

use std::time::Duration;

use qmp_dispatcher::config::MEMORY_FLOOR;
use qmp_tests::{TestServer, rss};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const MIB: usize = 1 << 20;

/// Writes an unterminated string as long as the server reads it, up to `total` bytes.
async fn stream_unterminated(socket: &std::path::Path, total: usize) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    stream
        .write_all(br#"{"execute":"echo","arguments":{"s":""#)
        .await
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        // Once the server stops reading, the write stalls: that is the backpressure.
        match tokio::time::timeout(Duration::from_millis(300), stream.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    stream
}

#[tokio::test]
async fn the_server_wide_budget_stops_reading_and_others_are_still_served() {
    let budget = 8 * MIB;
    let server = TestServer::start_with(|b| b.max_memory(budget)).await;
    let attackers = 6;
    let before = rss();
    let mut streams = Vec::new();
    for _ in 0..attackers {
        streams.push(stream_unterminated(&server.socket, 8 * MIB).await);
    }
    let held = server.server.stats().memory;
    // A connection reads no more once the budget is spent; the read in progress at that
    // moment can at most double its buffer.
    let bound = 2 * (budget + (attackers + 1) * MEMORY_FLOOR);
    assert!(held <= bound, "held {held} bytes, bound {bound}");
    assert!(
        held >= budget,
        "the attackers did reach the budget ({held} bytes)"
    );
    // The process as a whole grew by no more than the formula, plus allocator slack and the
    // test's own buffers; without the budget the six would hold 48 MiB of strings.
    let grown = rss().saturating_sub(before) as usize;
    assert!(
        grown <= bound + 16 * MIB,
        "RSS grew by {grown} bytes, bound {bound}"
    );

    let mut polite = server.negotiated(&[]).await;
    polite.execute("query-version", json!({}), json!(1)).await;
    assert_eq!(polite.recv().await["id"], 1);

    drop(streams);
    server
        .wait_stats("the attackers' memory given back", |s| {
            s.clients == 1 && s.memory <= 2 * MEMORY_FLOOR
        })
        .await;
}
