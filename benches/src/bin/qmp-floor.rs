//! The "floor": the least work any correct QMP server can do, as a baseline for qmp-bench.
//!
//! Run with `cargo run --release -p qmp-benches --bin qmp-floor -- --unix /tmp/floor.sock`.
//! Every request is really parsed with serde_json; every reply is `{"return": {}}` with the id
//! echoed. `x-delay` with `{"ms": N}` replies after N ms without holding up other requests.

use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

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
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
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

/// Appends the reply to one request to `out`, or hands it to a timer task for `x-delay`.
fn answer(value: &[u8], out: &mut Vec<u8>, delayed: &mpsc::UnboundedSender<Vec<u8>>) {
    let request: Request = match serde_json::from_slice(value) {
        Ok(request) => request,
        Err(_) => {
            out.extend_from_slice(
                br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#,
            );
            out.extend_from_slice(b"\r\n");
            return;
        }
    };
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
}

/// Serves one client: greeting, then one reply per JSON value until EOF.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(GREETING);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out).await?;
    out.clear();

    let (delayed_tx, mut delayed_rx) = mpsc::unbounded_channel();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut splitter = Splitter::default();
    loop {
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
                let mut consumed = 0;
                while let Some(range) = splitter.next_value(&buf) {
                    answer(&buf[range.clone()], &mut out, &delayed_tx);
                    consumed = range.end;
                }
                buf.drain(..consumed);
                splitter.consume(consumed);
            }
            Some(reply) = delayed_rx.recv() => out.extend_from_slice(&reply),
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

async fn accept_unix(listener: UnixListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(stream));
    }
}

async fn accept_tcp(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(serve(stream));
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
    runtime.enable_all().build()?.block_on(async {
        let mut listeners = tokio::task::JoinSet::new();
        for path in &cli.unix {
            let _ = std::fs::remove_file(path);
            listeners.spawn(accept_unix(UnixListener::bind(path)?));
        }
        for addr in &cli.tcp {
            listeners.spawn(accept_tcp(TcpListener::bind(addr).await?));
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
    fn returns_stray_top_level_bytes_for_the_parser_to_reject() {
        assert_eq!(split_all(b" 1 {}"), [&b"1"[..], b"{}"]);
    }
}
