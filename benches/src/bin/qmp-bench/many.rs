//! Many compact clients: up to 100,000 connections, each read its greeting, negotiated, and
//! then held as a bare stream (no task, no buffer) or handed to a caller's task.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BoxError, HANDSHAKE_TIMEOUT, Stream, Target, connect_io};

/// Handshakes in progress at once: below the listen backlog (mio listens with 1024), so a
/// connect is not refused with EAGAIN while the server catches up with accepting.
const CONCURRENT_HANDSHAKES: usize = 256;
/// A greeting or a negotiation reply longer than this is not one.
const MAX_HANDSHAKE_LINE: usize = 4096;

/// What every client sends after the greeting, and whether there is a greeting at all.
pub(crate) struct Handshake {
    /// `qmp_capabilities` with the capabilities to enable, serialised.
    pub(crate) negotiate: Vec<u8>,
    /// Guest-agent style: no greeting, no negotiation.
    pub(crate) no_greeting: bool,
}

impl Handshake {
    pub(crate) fn new(caps: &[String], no_greeting: bool) -> Self {
        let negotiate = serde_json::json!({
            "execute": "qmp_capabilities",
            "arguments": { "enable": caps },
        });
        Handshake {
            negotiate: negotiate.to_string().into_bytes(),
            no_greeting,
        }
    }
}

/// Connects to `target`, retrying while the listen backlog is full (EAGAIN on a Unix
/// socket) for up to the handshake timeout.
pub(crate) async fn connect_retrying(target: &Target) -> Result<Box<dyn Stream>, BoxError> {
    let started = Instant::now();
    loop {
        match connect_io(target).await {
            Ok(stream) => return Ok(stream),
            Err(err)
                if err.kind() == ErrorKind::WouldBlock && started.elapsed() < HANDSHAKE_TIMEOUT =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Err(err) => return Err(format!("cannot connect to {target}: {err}").into()),
        }
    }
}

/// Reads one line (up to `\n`) into `line`, which is cleared first. Nothing after the line
/// may have been sent yet: the peer waits for our next message.
pub(crate) async fn read_line(
    stream: &mut Box<dyn Stream>,
    line: &mut Vec<u8>,
) -> Result<(), BoxError> {
    line.clear();
    while !line.ends_with(b"\n") {
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err("handshake line too long".into());
        }
        if stream.read_buf(line).await? == 0 {
            return Err("server closed the connection during the handshake".into());
        }
    }
    Ok(())
}

/// Reads the greeting, negotiates and checks the reply.
pub(crate) async fn handshake(
    stream: &mut Box<dyn Stream>,
    handshake: &Handshake,
) -> Result<(), BoxError> {
    if handshake.no_greeting {
        return Ok(());
    }
    let mut line = Vec::with_capacity(512);
    let exchange = async {
        read_line(stream, &mut line).await?;
        if !contains(&line, br#""QMP""#) {
            return Err(format!(
                "expected a greeting, got {}",
                String::from_utf8_lossy(&line)
            )
            .into());
        }
        stream.write_all(&handshake.negotiate).await?;
        read_line(stream, &mut line).await?;
        if !contains(&line, br#""return""#) {
            return Err(format!(
                "qmp_capabilities failed: {}",
                String::from_utf8_lossy(&line)
            )
            .into());
        }
        Ok::<_, BoxError>(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err("no greeting or negotiation reply within 10 s".into()),
    }
}

/// Opens `count` connections, client `i` on `targets[(first + i) % targets.len()]`, each
/// greeted and negotiated, with at most [`CONCURRENT_HANDSHAKES`] under way at once.
pub(crate) async fn open_many(
    count: usize,
    first: usize,
    targets: &[Target],
    shake: &Arc<Handshake>,
) -> Result<Vec<Box<dyn Stream>>, BoxError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT_HANDSHAKES.min(count) {
        let next = Arc::clone(&next);
        let shake = Arc::clone(shake);
        let targets = targets.to_vec();
        workers.spawn(async move {
            let mut opened = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return Ok::<_, BoxError>(opened);
                }
                let target = &targets[(first + index) % targets.len()];
                let mut stream = connect_retrying(target).await?;
                handshake(&mut stream, &shake).await?;
                opened.push(stream);
            }
        });
    }
    let mut streams = Vec::with_capacity(count);
    while let Some(result) = workers.join_next().await {
        streams.append(&mut result??);
    }
    Ok(streams)
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}
