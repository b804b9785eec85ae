//! Limits against hostile or broken clients: a client that floods requests without reading
//! its replies cannot grow the server's memory (reading from it pauses at
//! `output_high_water`), and does not slow other clients down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qmp_tests::{TestServer, rss};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Requests the flooder would send if never stopped (each draws a ~4 KiB reply): 80 MiB.
const FLOOD_REQUESTS: u64 = 20_000;

/// Floods echo requests (each ~4 KiB, as is its reply) without ever reading, counting bytes
/// the server accepted; returns when a write blocks for good (the task is then aborted).
async fn flood(stream: UnixStream, caps: &'static str, sent: Arc<AtomicU64>) {
    let (_reader, mut writer) = stream.into_split();
    let negotiate =
        format!(r#"{{"execute":"qmp_capabilities","arguments":{{"enable":[{caps}]}}}}"#);
    writer.write_all(negotiate.as_bytes()).await.unwrap();
    let pad = "p".repeat(4000);
    for i in 0..FLOOD_REQUESTS {
        let request = format!(r#"{{"execute":"echo","arguments":{{"pad":"{pad}"}},"id":{i}}}"#);
        if writer.write_all(request.as_bytes()).await.is_err() {
            return;
        }
        sent.fetch_add(request.len() as u64, Ordering::Relaxed);
    }
}

/// Waits until `sent` stops moving for `quiet`, or fails after a deadline.
async fn wait_until_stalled(sent: &AtomicU64, quiet: Duration) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = sent.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = sent.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(Instant::now() < deadline, "the flood never stalled");
    }
}

async fn a_flooding_client_is_throttled(caps: &'static str) {
    let high_water = 256 << 10;
    let server = TestServer::start_with(|b| b.output_high_water(high_water)).await;
    // Warm up the allocator and the test client's code paths before the baseline.
    let mut healthy = server.negotiated(&["async"]).await;
    for i in 0..50 {
        healthy.execute("echo", json!({"i": i}), json!(i)).await;
        healthy.recv().await;
    }
    let baseline = rss();

    let sent = Arc::new(AtomicU64::new(0));
    let stream = UnixStream::connect(&server.socket).await.unwrap();
    let flooder = tokio::spawn(flood(stream, caps, Arc::clone(&sent)));
    let accepted = wait_until_stalled(&sent, Duration::from_millis(300)).await;
    let grown = rss().saturating_sub(baseline);
    let attempted = FLOOD_REQUESTS * 4000;
    eprintln!(
        "flood ({caps}): server accepted {} KiB of {} KiB before pausing; RSS +{} KiB",
        accepted >> 10,
        attempted >> 10,
        grown >> 10
    );
    // What the server took is its high-water mark of output plus socket buffers in both
    // directions and one read buffer: a few MiB, not the flood.
    assert!(
        accepted < 16 << 20,
        "the server kept reading: {accepted} bytes"
    );
    assert!(grown < 20 << 20, "RSS grew by {grown} bytes");
    assert_eq!(server.server.stats().clients, 2);

    // Others are not slowed: round trips still complete promptly.
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let started = Instant::now();
        healthy.execute("echo", json!({"i": i}), json!(i)).await;
        assert_eq!(healthy.recv().await, json!({"return": {"i": i}, "id": i}));
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a round trip took {slowest:?} next to the flooder"
    );

    flooder.abort();
    let _ = flooder.await;
    drop(healthy);
    server
        .wait_stats("the flooder is gone", |s| {
            s.clients == 0 && s.in_flight == 0 && s.live_returns == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_client_flooding_without_reading_cannot_grow_the_server() {
    a_flooding_client_is_throttled("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_client_flooding_without_reading_cannot_grow_the_server() {
    a_flooding_client_is_throttled(r#""async""#).await;
}

#[tokio::test]
async fn a_client_over_max_clients_waits_until_a_slot_frees() {
    let server = TestServer::start_with(|b| b.max_clients(2)).await;
    let first = server.negotiated(&[]).await;
    let _second = server.negotiated(&[]).await;
    // Connecting succeeds (the kernel queues it) but nobody serves it yet.
    let mut third = server.connect().await;
    third.expect_silence(200).await;
    assert_eq!(server.server.stats().clients, 2);
    drop(first);
    third.greeting().await;
    third.negotiate(&[]).await;
}

#[tokio::test]
async fn the_socket_is_created_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = qmp_tests::Scratch::new();
    let path = scratch.path("qmp.sock");
    let _listener = qmp_dispatcher::bind_unix(&path, 0o600).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    // A stale socket from an earlier run is replaced; a regular file is left alone.
    drop(_listener);
    let _again = qmp_dispatcher::bind_unix(&path, 0o600).expect("rebind over a stale socket");
    let file = scratch.path("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    assert!(qmp_dispatcher::bind_unix(&file, 0o600).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

/// A reply larger than `max_pending_output` still reaches a client that reads: the limit
/// polices events a client does not read, not the replies it asked for.
#[tokio::test]
async fn a_reading_client_gets_a_reply_larger_than_max_pending_output() {
    let server = TestServer::start_with(|b| b.max_pending_output(64 * 1024)).await;
    let mut client = server.negotiated(&[]).await;
    let pad = "x".repeat(100 * 1024);
    client.execute("echo", json!({"pad": pad}), json!(1)).await;
    assert_eq!(client.recv().await["id"], json!(1));
}

/// A client disconnected for not reading its events gets whole lines only: the server
/// finishes the line it had begun before closing (it used to stop mid-JSON). Over TCP, whose
/// writes stop at any byte when the window fills.
#[tokio::test]
async fn a_client_dropped_for_not_reading_gets_whole_lines() {
    use tokio::io::AsyncReadExt;
    let registry = qmp_dispatcher::Registry::builder().build();
    let server = qmp_dispatcher::Server::builder(registry)
        .max_pending_output(64 << 10)
        .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = server.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(br#"{"execute":"qmp_capabilities"}"#)
        .await
        .unwrap();
    let deadline = Instant::now() + qmp_tests::TIMEOUT;
    while server.events().receivers() == 0 {
        assert!(Instant::now() < deadline, "never negotiated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pad = "p".repeat(997);
    // Far more than the socket buffers and the pending-output limit together, paced so that
    // the connection writes between batches and the window fills part-way through a line.
    for n in 0..6000 {
        server
            .events()
            .emit("BIG", Some(json!({ "n": n, "pad": pad })));
        if n % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The connection sees its output pass the limit and, before closing, waits (up to a
    // second) to finish the line it had begun; only now does the client read, to EOF.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received = Vec::new();
    tokio::time::timeout(qmp_tests::TIMEOUT, stream.read_to_end(&mut received))
        .await
        .expect("EOF in time")
        .expect("read");
    assert!(received.len() > 64 << 10, "only {} bytes", received.len());
    assert!(
        received.ends_with(b"\r\n"),
        "cut mid-line: ...{:?}",
        String::from_utf8_lossy(&received[received.len().saturating_sub(60)..])
    );
    for line in received.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let _: serde_json::Value = serde_json::from_slice(line).expect("a whole JSON line");
    }
    server.shutdown();
}
