//! The server's structure as embedders see it: the client limit over every way of serving,
//! the accept loop's error handling, handler work under `Server::wait`, event settings made
//! by the builder only, and the dialect's line ending on every message.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use qmp_dispatcher::wire::LineEnding;
use qmp_dispatcher::{
    ByteStream, Command, Dialect, Events, NoArgs, QmpReturn, Registry, Server, Throttle,
};
use qmp_tests::{TIMEOUT, TestServer};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

fn registry() -> Registry {
    Registry::builder().build()
}

async fn read_json_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Vec<u8> {
    let mut line = Vec::new();
    tokio::time::timeout(TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .expect("a line in time")
        .expect("read");
    line
}

#[tokio::test]
async fn max_clients_counts_connections_handed_in_directly() {
    let server = Server::builder(registry()).max_clients(1).build();
    let (first, first_server_end) = tokio::io::duplex(4096);
    server.spawn_connection(ByteStream(first_server_end));
    let mut first = BufReader::new(first);
    assert!(read_json_line(&mut first).await.starts_with(b"{\"QMP\""));

    let (second, second_server_end) = tokio::io::duplex(4096);
    let serving = server.clone();
    let second_task = tokio::spawn(async move {
        serving
            .serve_connection(ByteStream(second_server_end))
            .await
    });
    let mut second = BufReader::new(second);
    let mut line = Vec::new();
    let waited = tokio::time::timeout(
        Duration::from_millis(200),
        second.read_until(b'\n', &mut line),
    )
    .await;
    assert!(waited.is_err(), "the second client waits for the slot");
    assert_eq!(server.stats().clients, 1);

    drop(first);
    assert!(read_json_line(&mut second).await.starts_with(b"{\"QMP\""));
    server.shutdown();
    second_task.await.unwrap();
    tokio::time::timeout(TIMEOUT, server.wait()).await.unwrap();
}

/// A listener that fails as told, then accepts from a real one.
struct FailingListener {
    errors: Vec<i32>,
    attempts: Arc<AtomicUsize>,
}

impl tokio_util::net::Listener for FailingListener {
    type Io = UnixStream;
    type Addr = ();

    fn poll_accept(&mut self, _: &mut Context<'_>) -> Poll<io::Result<(UnixStream, ())>> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let errno = self.errors.remove(0);
        Poll::Ready(Err(io::Error::from_raw_os_error(errno)))
    }

    fn local_addr(&self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn transient_accept_errors_are_retried_and_others_reach_the_caller() {
    let server = Server::builder(registry()).build();
    let attempts = Arc::new(AtomicUsize::new(0));
    let listener = FailingListener {
        errors: vec![libc_errno::EMFILE, libc_errno::EMFILE, libc_errno::EBADF],
        attempts: Arc::clone(&attempts),
    };
    let started = Instant::now();
    let result = tokio::time::timeout(TIMEOUT, server.serve(listener))
        .await
        .expect("the loop ends on a fatal error");
    let error = result.expect_err("EBADF is not transient");
    assert_eq!(error.raw_os_error(), Some(libc_errno::EBADF));
    assert_eq!(attempts.load(Ordering::Relaxed), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "it paused between retries"
    );
}

/// Descriptor exhaustion makes every accept fail at once; the warning must not flood the
/// log (it used to be one line per 50 ms retry, ~270 MB a day).
#[tokio::test]
async fn repeated_accept_errors_warn_once_per_period() {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Server::builder(registry()).build();
    let mut errors = vec![libc_errno::EMFILE; 8];
    errors.push(libc_errno::EBADF);
    let listener = FailingListener {
        errors,
        attempts: Arc::default(),
    };
    let _ = tokio::time::timeout(TIMEOUT, server.serve(listener)).await;
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings = log.matches("accept failed; retrying").count();
    assert_eq!(warnings, 1, "{log}");
    assert!(log.contains("no longer accepting"), "{log}");
}

/// Error numbers, spelled out (the workspace has no libc dependency in tests).
mod libc_errno {
    pub const EBADF: i32 = 9;
    pub const EMFILE: i32 = 24;
}

#[tokio::test]
async fn wait_returns_only_when_handler_work_has_ended() {
    let finished = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&finished);
    let mut builder = Registry::builder();
    builder
        .add(Command::deferred(
            "stubborn",
            move |_: NoArgs, _, ret: QmpReturn| {
                let flag = Arc::clone(&flag);
                // Blocking work that notices cancellation only after a while.
                ret.spawn_blocking(move |ret| {
                    std::thread::sleep(Duration::from_millis(300));
                    flag.store(true, Ordering::Release);
                    ret.ok(&json!({}));
                });
            },
        ))
        .unwrap();
    let server = Server::builder(builder.build()).build();
    let test = TestServer::serve(server, Default::default());
    let mut client = test.negotiated(&[]).await;
    client.execute("stubborn", json!({}), json!(1)).await;
    test.wait_stats("the work running", |s| s.handler_tasks == 1)
        .await;
    test.server.shutdown();
    tokio::time::timeout(TIMEOUT, test.server.wait())
        .await
        .unwrap();
    assert!(
        finished.load(Ordering::Acquire),
        "wait() returned while handler work was still running"
    );
    assert_eq!(test.server.stats().handler_tasks, 0);
}

#[tokio::test]
async fn the_builders_throttle_applies_to_a_handle_made_beforehand() {
    let events = Events::new();
    let server = Server::builder(registry())
        .throttle(
            "RTC_CHANGE",
            Throttle {
                period: Duration::from_secs(60),
                key: None,
            },
        )
        .events(events.clone())
        .build();
    let test = TestServer::serve(server, Default::default());
    let mut client = test.negotiated(&[]).await;
    for offset in 0..3 {
        events.emit("RTC_CHANGE", Some(json!({ "offset": offset })));
    }
    assert_eq!(client.recv().await["data"]["offset"], 0);
    client.expect_silence(200).await;
}

#[tokio::test]
async fn every_message_honours_the_dialects_line_ending() {
    let server = Server::builder(registry())
        .dialect(Dialect::QMP.with_line_ending(LineEnding::Lf))
        .build();
    let test = TestServer::serve(server, Default::default());
    let stream = UnixStream::connect(&test.socket).await.unwrap();
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut lines = vec![read_json_line(&mut reader).await];
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"nope\"}")
        .await
        .unwrap();
    lines.push(read_json_line(&mut reader).await);
    lines.push(read_json_line(&mut reader).await);
    test.server.events().emit("STOP", None);
    lines.push(read_json_line(&mut reader).await);
    for line in &lines {
        assert!(
            line.ends_with(b"}\n"),
            "not LF-terminated: {:?}",
            String::from_utf8_lossy(line)
        );
        let _: Value = serde_json::from_slice(line).unwrap();
    }
}
