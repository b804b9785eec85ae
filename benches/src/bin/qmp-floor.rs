//! The "floor": the least work any correct QMP server can do, as a baseline for qmp-bench.
//!
//! Run with `cargo run --release -p qmp-benches --bin qmp-floor -- --unix /tmp/floor.sock`.
//! Every request is really parsed with serde_json; every reply is `{"return": {}}` with the id
//! echoed. `x-delay` with `{"ms": N}` replies after N ms without holding up other requests.
//! With `--events`, `stop` and `cont` also send `STOP` and `RESUME` to every client that has
//! sent `qmp_capabilities`, in QEMU's format: the least work a broadcast can be. With
//! `--max-clients N`, further connections wait in the listen backlog until one ends.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, broadcast, mpsc};

const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "floor"}, "capabilities": ["oob", "async"]}}"#;

#[derive(Parser)]
#[command(about = "Minimal QMP server: the floor any QMP server is measured against")]
struct Cli {
    /// Listen on this Unix socket path (replaced if it exists).
    #[arg(long)]
    unix: Vec<std::path::PathBuf>,
    /// Listen on this TCP address, e.g. 127.0.0.1:4444.
    #[arg(long)]
    tcp: Vec<String>,
    /// Tokio worker threads (default: one per core, or TOKIO_WORKER_THREADS).
    #[arg(long)]
    threads: Option<usize>,
    /// Event mode: `stop` and `cont` broadcast `STOP` and `RESUME` to every negotiated client.
    #[arg(long)]
    events: bool,
    /// Clients served at once; more wait in the listen backlog (as with qmp-demo).
    #[arg(long)]
    max_clients: Option<usize>,
}

/// Events a client may have queued before it is disconnected: qmp-demo's default queue.
const EVENT_QUEUE: usize = 4096;

/// An event line, shared by every client it goes to.
type EventLine = Arc<[u8]>;

/// What the connections share.
struct Shared {
    /// Where `stop` and `cont` send their events; `None` without `--events`.
    events: Option<broadcast::Sender<EventLine>>,
}

impl Shared {
    /// Sends `{"timestamp": ..., "event": NAME}` to every negotiated client.
    fn emit(&self, name: &str) {
        let Some(events) = &self.events else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"{name}\"}}\r\n",
            now.as_secs(),
            now.subsec_micros()
        );
        // No receivers is not an error: nobody has negotiated yet.
        let _ = events.send(line.into_bytes().into());
    }
}

/// The members of a request the floor looks at; anything else is parsed and ignored.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    execute: Option<&'a RawValue>,
    #[serde(rename = "exec-oob", borrow)]
    exec_oob: Option<&'a RawValue>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DelayArgs {
    ms: u64,
}

/// Splits a byte stream into top-level JSON values without relying on newlines.
///
/// Counts braces and brackets outside strings; a value is complete when the depth returns to 0.
/// Bytes outside any object or array are skipped (whitespace) or returned as a one-byte value
/// so that the parser rejects them.
#[derive(Default)]
struct Splitter {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Offset in the buffer where the value being scanned starts, if one has started.
    start: Option<usize>,
    /// Offset up to which the buffer has been scanned.
    scanned: usize,
}

impl Splitter {
    /// Returns the byte range of the next complete value in `buf`, if any.
    fn next_value(&mut self, buf: &[u8]) -> Option<std::ops::Range<usize>> {
        while self.scanned < buf.len() {
            let pos = self.scanned;
            let byte = buf[pos];
            self.scanned += 1;
            if self.in_string {
                match (self.escaped, byte) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.start.get_or_insert(pos);
                    self.depth += 1;
                }
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return self.start.take().map(|start| start..pos + 1);
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ if self.depth == 0 => return Some(pos..pos + 1),
                _ => {}
            }
        }
        None
    }

    /// Forgets the first `consumed` bytes, which the caller drops from its buffer.
    fn consume(&mut self, consumed: usize) {
        self.scanned -= consumed;
        if let Some(start) = self.start.as_mut() {
            *start -= consumed;
        }
    }
}

/// What a request asked of the connection beyond its reply.
#[derive(PartialEq, Eq)]
enum Asked {
    Nothing,
    /// `qmp_capabilities`: from now on the client gets events.
    Negotiated,
}

/// Appends the reply to one request to `out`, or hands it to a timer task for `x-delay`.
fn answer(
    value: &[u8],
    out: &mut Vec<u8>,
    delayed: &mpsc::UnboundedSender<Vec<u8>>,
    shared: &Shared,
) -> Asked {
    let request: Request = match serde_json::from_slice(value) {
        Ok(request) => request,
        Err(_) => {
            out.extend_from_slice(
                br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#,
            );
            out.extend_from_slice(b"\r\n");
            return Asked::Nothing;
        }
    };
    let name = request.execute.or(request.exec_oob).map(RawValue::get);
    // As in QEMU, the event goes out before the reply.
    match name {
        Some(r#""stop""#) => shared.emit("STOP"),
        Some(r#""cont""#) => shared.emit("RESUME"),
        _ => {}
    }
    // The reply goes straight into `out`; only a delayed one is split off into its own Vec.
    let reply_start = out.len();
    let command = request.execute.or(request.exec_oob);
    if command.is_none() {
        out.extend_from_slice(
            br#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}"#,
        );
    } else {
        out.extend_from_slice(br#"{"return": {}"#);
    }
    if let Some(id) = request.id {
        out.extend_from_slice(br#", "id": "#);
        out.extend_from_slice(id.get().as_bytes());
    }
    out.extend_from_slice(b"}\r\n");

    let delay = match (command.map(RawValue::get), request.arguments) {
        (Some(r#""x-delay""#), Some(args)) => serde_json::from_str::<DelayArgs>(args.get()).ok(),
        _ => None,
    };
    if let Some(DelayArgs { ms }) = delay {
        let reply = out.split_off(reply_start);
        let delayed = delayed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            // The connection may be gone by now; then the reply has nobody to go to.
            let _ = delayed.send(reply);
        });
    }
    if name == Some(r#""qmp_capabilities""#) {
        Asked::Negotiated
    } else {
        Asked::Nothing
    }
}

/// The next event for a negotiated client; pending for ever before negotiation.
async fn next_event(
    events: &mut Option<broadcast::Receiver<EventLine>>,
) -> Result<EventLine, broadcast::error::RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves one client: greeting, then one reply per JSON value until EOF. A client that
/// falls more than [`EVENT_QUEUE`] events behind is disconnected, as qmp-demo does.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(GREETING);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await?;
    out.clear();

    let (delayed_tx, mut delayed_rx) = mpsc::unbounded_channel();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut splitter = Splitter::default();
    let mut events = None;
    loop {
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
                let mut consumed = 0;
                while let Some(range) = splitter.next_value(&buf) {
                    let asked = answer(&buf[range.clone()], &mut out, &delayed_tx, &shared);
                    if asked == Asked::Negotiated && events.is_none() {
                        events = shared.events.as_ref().map(broadcast::Sender::subscribe);
                    }
                    consumed = range.end;
                }
                buf.drain(..consumed);
                splitter.consume(consumed);
            }
            Some(reply) = delayed_rx.recv() => out.extend_from_slice(&reply),
            event = next_event(&mut events) => match event {
                Ok(line) => out.extend_from_slice(&line),
                Err(_) => return Ok(()),
            },
        }
        // Batch every event already queued into the same write.
        if let Some(events) = events.as_mut() {
            loop {
                match events.try_recv() {
                    Ok(line) => out.extend_from_slice(&line),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => return Ok(()),
                    Err(_) => break,
                }
            }
        }
        // Batch every delayed reply that is ready into the same write.
        while let Ok(reply) = delayed_rx.try_recv() {
            out.extend_from_slice(&reply);
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
}

/// A client slot, taken before accepting (so that clients beyond `--max-clients` wait in
/// the backlog) and held by the client's task; `None` without a limit.
async fn slot(slots: &Option<Arc<Semaphore>>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots {
        Some(slots) => Arc::clone(slots).acquire_owned().await.ok(),
        None => None,
    }
}

async fn accept_unix(
    listener: UnixListener,
    shared: Arc<Shared>,
    slots: Option<Arc<Semaphore>>,
) -> std::io::Result<()> {
    loop {
        let slot = slot(&slots).await;
        let (stream, _) = listener.accept().await?;
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = serve(stream, shared).await;
            drop(slot);
        });
    }
}

async fn accept_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Option<Arc<Semaphore>>,
) -> std::io::Result<()> {
    loop {
        let slot = slot(&slots).await;
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = serve(stream, shared).await;
            drop(slot);
        });
    }
}

fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    if cli.unix.is_empty() && cli.tcp.is_empty() {
        eprintln!("qmp-floor: give at least one --unix PATH or --tcp ADDR");
        std::process::exit(2);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads);
    }
    let shared = Arc::new(Shared {
        events: cli.events.then(|| broadcast::channel(EVENT_QUEUE).0),
    });
    let slots = cli
        .max_clients
        .map(|max| Arc::new(Semaphore::new(max.max(1))));
    runtime.enable_all().build()?.block_on(async {
        let mut listeners = tokio::task::JoinSet::new();
        for path in &cli.unix {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            listeners.spawn(accept_unix(listener, Arc::clone(&shared), slots.clone()));
        }
        for addr in &cli.tcp {
            let listener = TcpListener::bind(addr).await?;
            listeners.spawn(accept_tcp(listener, Arc::clone(&shared), slots.clone()));
        }
        tokio::select! {
            Some(result) = listeners.join_next() => result.expect("listener task panicked"),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::Splitter;

    fn split_all(input: &[u8]) -> Vec<&[u8]> {
        let mut splitter = Splitter::default();
        std::iter::from_fn(|| splitter.next_value(input))
            .map(|range| &input[range])
            .collect()
    }

    #[test]
    fn splits_values_without_newlines_and_ignores_braces_in_strings() {
        let input = br#"{"a":"}{\"}"}  [1,{}]{"b":"\\"}"#;
        assert_eq!(
            split_all(input),
            [&br#"{"a":"}{\"}"}"#[..], b"[1,{}]", br#"{"b":"\\"}"#]
        );
    }

    #[test]
    fn continues_a_value_split_across_reads() {
        let mut splitter = Splitter::default();
        let mut buf = br#"{"execute":"q"}{"exe"#.to_vec();
        assert_eq!(splitter.next_value(&buf), Some(0..15));
        assert_eq!(splitter.next_value(&buf), None);
        buf.drain(..15);
        splitter.consume(15);
        buf.extend_from_slice(br#"cute":"x"}"#);
        assert_eq!(splitter.next_value(&buf), Some(0..buf.len()));
    }

    #[test]
    fn events_are_the_bytes_the_dispatcher_writes_but_for_the_timestamp() {
        let shared = super::Shared {
            events: Some(tokio::sync::broadcast::channel(4).0),
        };
        let mut events = shared.events.as_ref().unwrap().subscribe();
        shared.emit("STOP");
        let line = events.try_recv().unwrap();
        let mut theirs = bytes::BytesMut::new();
        qmp_dispatcher::wire::encode::event(
            &mut theirs,
            "STOP",
            None,
            std::time::SystemTime::now(),
        );
        theirs.extend_from_slice(b"\r\n");
        let digitless = |text: &[u8]| -> Vec<u8> {
            text.iter()
                .copied()
                .filter(|b| !b.is_ascii_digit())
                .collect()
        };
        assert_eq!(
            String::from_utf8(digitless(&line)).unwrap(),
            String::from_utf8(digitless(&theirs)).unwrap()
        );
    }

    #[test]
    fn returns_stray_top_level_bytes_for_the_parser_to_reject() {
        assert_eq!(split_all(b" 1 {}"), [&b"1"[..], b"{}"]);
    }
}
