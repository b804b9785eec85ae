//! Memory under hostile input (issue: reliability under hostile load): the server-wide
//! budget with backpressure, buffers given back after a large value, the per-client budget
//! for retained ids, and large values parsed off the runtime's workers.

use std::time::{Duration, Instant};

use qmp_dispatcher::config::MEMORY_FLOOR;
use qmp_tests::{Client, TIMEOUT, TestServer};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const MIB: usize = 1 << 20;

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

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
    let grown = rss().saturating_sub(before);
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

#[tokio::test]
async fn buffers_shrink_back_after_a_large_value() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    let big = "y".repeat(4 * MIB);
    client.execute("echo", json!({ "s": big }), json!(1)).await;
    let reply = client.recv().await;
    assert_eq!(reply["return"]["s"].as_str().map(str::len), Some(4 * MIB));
    client.execute("query-version", json!({}), json!(2)).await;
    client.recv().await;
    server
        .wait_stats("an idle client's buffers back to small", |s| {
            s.memory <= MEMORY_FLOOR
        })
        .await;
}

#[tokio::test]
async fn retained_ids_are_budgeted_per_client() {
    let server = TestServer::start_with(|b| b.max_retained(4 * MIB)).await;
    let mut client = server.negotiated(&["async"]).await;
    let hold = |i: usize| {
        (
            json!({ "key": format!("k{i}") }),
            json!(format!("{i}{}", "z".repeat(MIB))),
        )
    };
    // Four ids fill the budget; a fifth is read ahead and waits for room.
    for i in 0..5 {
        let (arguments, id) = hold(i);
        client.execute("hold", arguments, id).await;
    }
    server.holds.wait_parked("k3").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.holds.parked(), 4, "the fifth waits");
    server.holds.release("k0", json!(0));
    server.holds.wait_parked("k4").await;
    assert_eq!(server.holds.parked(), 4);
    for key in ["k1", "k2", "k3", "k4"] {
        server.holds.release(key, json!(0));
    }
    for _ in 0..5 {
        assert!(client.recv().await.get("return").is_some());
    }
    server
        .wait_stats("nothing retained", |s| {
            s.in_flight == 0 && s.memory <= 2 * MEMORY_FLOOR
        })
        .await;
}

/// Two clients sending 60 MiB requests in a loop must not stall a third one's round trips:
/// the large values are parsed off the worker threads. Reports the probe's p99 and worst
/// case; asserts bounds generous enough for a loaded 2-core CI machine (measured here: p99
/// 6 ms, max 18 ms with the offloading; without it one stall lasts as long as a parse,
/// about 0.5 s for 30 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_do_not_stall_other_clients() {
    let server = TestServer::start().await;
    let socket = server.socket.clone();
    let mut flooders = Vec::new();
    for _ in 0..2 {
        let socket = socket.clone();
        flooders.push(tokio::spawn(async move {
            let mut client = Client::connect(&socket).await;
            client.greeting().await;
            client.negotiate(&[]).await;
            let big = "w".repeat(60 * MIB);
            let request = format!(r#"{{"execute":"nope","arguments":{{"s":"{big}"}},"id":1}}"#);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                client.send(&request).await;
                client.recv().await;
            }
        }));
    }
    let mut probe = server.negotiated(&[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rtts = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        let start = Instant::now();
        probe.execute("query-version", json!({}), json!(1)).await;
        probe.recv().await;
        rtts.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for flooder in flooders {
        tokio::time::timeout(TIMEOUT, flooder)
            .await
            .unwrap()
            .unwrap();
    }
    rtts.sort();
    let p99 = rtts[rtts.len() * 99 / 100];
    let max = *rtts.last().unwrap();
    eprintln!(
        "probe round trips: {} samples, p99 {p99:?}, max {max:?}",
        rtts.len()
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    assert!(max < Duration::from_millis(400), "max {max:?}");
}
