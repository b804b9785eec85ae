//! The checks behind the fuzz targets in `fuzz/`, shared with `tests/fuzz_regressions.rs` so
//! that every input a fuzzer ever found is replayed on stable Rust in CI.
//!
//! Each check takes the raw fuzzer input and panics on a violated property. The first input
//! byte seeds how the rest is split into chunks (or clients), so a fuzzer explores framing
//! as well as content.

use std::sync::Once;
use std::time::Duration;

use bytes::BytesMut;
use qmp_dispatcher::wire::{Frame, JsonDecoder, Limits};
use qmp_dispatcher::{ByteStream, Command, NoArgs, QmpError, QmpReturn, Registry, Server};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{FUTURE_PANIC, HANDLER_PANIC, Holds};

/// Virtual time a session may take after its input ended before it counts as hung. Time is
/// paused and auto-advanced, so this costs no real time; the longest command sleeps an hour.
const HANG_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Small limits, so the fuzzer reaches every limit error with short inputs.
pub const SMALL_LIMITS: Limits = Limits {
    max_nesting: 16,
    max_tokens: 256,
    max_bytes: 1024,
};

/// Deterministic chunk lengths from one seed byte: the seed picks a maximum chunk length
/// (1, 3, 16 or 512 bytes) and a xorshift sequence the lengths themselves.
pub struct Splits {
    state: u32,
    max: usize,
}

impl Splits {
    /// The splits for this seed byte.
    pub fn new(seed: u8) -> Self {
        Splits {
            state: 0x9E37_79B9 ^ (u32::from(seed) << 8 | u32::from(seed)),
            max: [1, 3, 16, 512][usize::from(seed & 3)],
        }
    }

    /// The next pseudo-random number.
    pub fn next_u32(&mut self) -> u32 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        self.state
    }

    /// The next chunk length, at least 1.
    pub fn next_len(&mut self) -> usize {
        1 + self.next_u32() as usize % self.max
    }

    /// Cuts `data` into chunks.
    pub fn chunks<'a>(&mut self, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        while !data.is_empty() {
            let (chunk, rest) = data.split_at(self.next_len().min(data.len()));
            chunks.push(chunk);
            data = rest;
        }
        chunks
    }
}

/// A frame in comparable form.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedFrame {
    /// A value and the raw text of its `id`.
    Value(Value, Option<String>),
    /// An error reply's text.
    Error(String),
}

impl From<Frame> for DecodedFrame {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Value(parsed) => {
                DecodedFrame::Value(parsed.value, parsed.id.map(|id| id.text().to_owned()))
            }
            // A split request compares as the value it would have been.
            Frame::Request(request) => DecodedFrame::from(Frame::Value(request.into_parsed())),
            Frame::Error(desc) => DecodedFrame::Error(desc),
        }
    }
}

/// Decodes `chunks` as the connection task does (decode until it needs more, append the
/// next chunk; at the end decode with EOF until nothing is left), checking after every call
/// that the decoder holds no more than one value's worth of input.
pub fn decode_chunks(limits: Limits, chunks: &[&[u8]]) -> Vec<DecodedFrame> {
    decode_chunks_with(JsonDecoder::new(limits), limits, chunks)
}

/// [`decode_chunks`] with a decoder that splits request objects, as the server's does.
pub fn decode_requests(limits: Limits, chunks: &[&[u8]]) -> Vec<DecodedFrame> {
    decode_chunks_with(JsonDecoder::new(limits).split_requests(), limits, chunks)
}

fn decode_chunks_with(
    mut decoder: JsonDecoder,
    limits: Limits,
    chunks: &[&[u8]],
) -> Vec<DecodedFrame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(frame) = decoder.decode(&mut buf) {
            frames.push(frame.into());
        }
        assert!(
            buf.len() <= limits.max_bytes,
            "the decoder keeps {} bytes, over the {}-byte value limit",
            buf.len(),
            limits.max_bytes
        );
    }
    while let Some(frame) = decoder.decode_eof(&mut buf) {
        frames.push(frame.into());
    }
    assert!(buf.is_empty(), "bytes left after EOF");
    assert!(decoder.is_idle(), "decoder not idle after EOF");
    frames
}

/// The decoder fuzz check: no panic, bounded buffering, and the same frames whatever the
/// split, under QEMU's limits and under small ones.
pub fn check_decoder(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    for limits in [SMALL_LIMITS, Limits::default()] {
        let whole = decode_chunks(limits, &[stream]);
        let split = decode_chunks(limits, &Splits::new(seed).chunks(stream));
        assert_eq!(whole, split, "frames depend on how the input was split");
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(
            whole,
            decode_chunks(limits, &bytewise),
            "frames differ when fed byte by byte"
        );
        assert_eq!(
            whole,
            decode_requests(limits, &[stream]),
            "frames differ when request objects are split"
        );
    }
}

/// Commands for fuzzing sessions: [`crate::test_commands`], whose `x-delay` sleeps at most an
/// hour (so a session that outlives `HANG_AFTER` is hung, not slow) and whose panics carry
/// messages [`install_panic_filter`] recognises.
pub fn fuzz_registry(holds: &Holds) -> Registry {
    let mut builder = Registry::builder();
    crate::test_commands(&mut builder, holds);
    builder.build()
}

/// Lets the fuzz commands' deliberate panics unwind quietly while every other panic still
/// reaches the previous hook (libFuzzer's aborts, which is how it notices a crash).
pub fn install_panic_filter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if message == HANDLER_PANIC || message == FUTURE_PANIC {
                return;
            }
            previous(info);
        }));
    });
}

/// A runtime like the one the checks need: one thread, paused time (sleeps cost nothing and
/// a hang shows up as a timeout at once).
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Answers every parked `hold` a little after it parks (so cancellations get a chance).
async fn release_holds(holds: Holds) {
    loop {
        let parked = holds.notify.notified();
        if holds.parked() == 0 {
            parked.await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let returns: Vec<QmpReturn> = holds
            .parked
            .lock()
            .unwrap()
            .drain()
            .map(|(_, r)| r)
            .collect();
        for ret in returns {
            ret.ok(&json!({"released": true}));
        }
    }
}

/// Writes `chunks` then half-closes, while reading everything the other side says.
async fn converse<S>(stream: S, chunks: &[&[u8]]) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        for chunk in chunks {
            if writer.write_all(chunk).await.is_err() {
                return;
            }
            // Let the server see each chunk on its own.
            tokio::task::yield_now().await;
        }
        let _ = writer.shutdown().await;
    };
    let read = async {
        let mut output = Vec::new();
        let _ = reader.read_to_end(&mut output).await;
        output
    };
    let ((), output) = tokio::join!(write, read);
    output
}

/// A server with [`fuzz_registry`]'s commands and small limits, so limits, backpressure and
/// the in-flight cap are all reached by short inputs.
pub fn fuzz_server(holds: &Holds) -> Server {
    Server::builder(fuzz_registry(holds))
        .limits(Limits {
            max_nesting: 32,
            max_tokens: 1024,
            max_bytes: 4096,
        })
        .max_in_flight(4)
        .output_high_water(512)
        .build()
}

/// Serves one client of `server` over an in-memory stream in a paused-time runtime: writes
/// `chunks`, half-closes and reads to the end, while parked `hold`s are released. Panics if
/// the session hangs, or leaves commands in flight or `QmpReturn`s alive. Returns the output.
pub fn serve_chunks(server: &Server, holds: &Holds, chunks: &[&[u8]]) -> Vec<u8> {
    paused_runtime().block_on(async {
        let releaser = tokio::spawn(release_holds(holds.clone()));
        let (client_end, server_end) = tokio::io::duplex(256);
        let serving = server.clone();
        let connection =
            tokio::spawn(async move { serving.serve_connection(ByteStream(server_end)).await });
        let output = tokio::time::timeout(HANG_AFTER, converse(client_end, chunks))
            .await
            .expect("the session hung after its input ended");
        connection.await.expect("the connection task panicked");
        // Cancelled handlers wind down on their own tasks.
        tokio::time::sleep(Duration::from_secs(1)).await;
        releaser.abort();
        let stats = server.stats();
        assert_eq!(
            (stats.clients, stats.in_flight, stats.live_returns),
            (0, 0, 0),
            "the session left state behind: {stats:?}"
        );
        output
    })
}

/// The session fuzz check: serves one client of [`fuzz_server`] the input in seeded chunks,
/// then half-closes. Every output line must be a complete JSON object, the first the greeting
/// and the others replies, exactly one per input frame; the session must end, and leave
/// nothing in flight and no `QmpReturn` alive.
pub fn check_session(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    install_panic_filter();
    let holds = Holds::default();
    let server = fuzz_server(&holds);
    let expected_replies = decode_chunks(server.config().limits, &[stream]).len();
    let output = serve_chunks(&server, &holds, &Splits::new(seed).chunks(stream));
    let replies = session_replies(&output);
    assert_eq!(
        replies.len(),
        expected_replies,
        "one reply per input frame expected"
    );
}

/// Checks a QMP session's output (complete CRLF lines, the greeting, then replies only) and
/// returns the replies.
pub fn session_replies(output: &[u8]) -> Vec<Map<String, Value>> {
    let lines = split_lines(output, b"\r\n");
    let (greeting, replies) = lines.split_first().expect("no greeting");
    assert!(json_object(greeting).contains_key("QMP"), "no greeting");
    replies
        .iter()
        .map(|line| {
            let reply = json_object(line);
            assert!(
                reply.contains_key("return") != reply.contains_key("error"),
                "not a reply: {reply:?}"
            );
            reply
        })
        .collect()
}

/// Splits output into lines ending in `ending`; panics on a trailing partial line.
fn split_lines<'a>(output: &'a [u8], ending: &[u8]) -> Vec<&'a [u8]> {
    let mut lines = Vec::new();
    let mut rest = output;
    while !rest.is_empty() {
        let end = rest
            .windows(ending.len())
            .position(|w| w == ending)
            .unwrap_or_else(|| {
                panic!(
                    "output ends in a partial line: {:?}",
                    String::from_utf8_lossy(rest)
                )
            });
        lines.push(&rest[..end]);
        rest = &rest[end + ending.len()..];
    }
    lines
}

/// An output line as a JSON object. Checked as JSON by `serde_json`, read with the
/// dispatcher's decoder: an echoed id may be a number that overflows a double (`1e400`),
/// valid JSON that a `serde_json::Value` cannot hold.
fn json_object(line: &[u8]) -> Map<String, Value> {
    let valid = serde_json::from_slice::<serde::de::IgnoredAny>(line).map(|_| ());
    let decoded = JsonDecoder::default().decode_eof(&mut BytesMut::from(line));
    match (valid, decoded) {
        (Ok(()), Some(Frame::Value(parsed))) if parsed.value.is_object() => {
            let Value::Object(object) = parsed.value else {
                unreachable!("checked to be an object")
            };
            object
        }
        other => panic!(
            "output line is not a JSON object ({other:?}): {:?}",
            String::from_utf8_lossy(line)
        ),
    }
}

/// The id the closing `guest-sync-delimited` of [`check_guest_agent`] uses.
const FINAL_SYNC_ID: u64 = 424_242;

/// The guest agent fuzz check: the input is split among up to four clients in turn, and a
/// last client sends 0xFF and `guest-sync-delimited`, which must resynchronise whatever the
/// others left behind. Every output line must be JSON (after an optional 0xFF), and the last
/// client's last line the sync's reply.
pub fn check_guest_agent(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    install_panic_filter();
    let mut splits = Splits::new(seed);
    let clients = 1 + (splits.next_u32() % 4) as usize;
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut rest = stream;
    for _ in 1..clients {
        let cut = (splits.next_u32() as usize) % (rest.len() + 1);
        let (segment, tail) = rest.split_at(cut);
        segments.push(segment);
        rest = tail;
    }
    segments.push(rest);
    // The sentinel is the raw byte 0xFF: a lexical error that resets the agent's parser.
    let mut sync = vec![0xFF];
    sync.extend_from_slice(
        format!(r#"{{"execute":"guest-sync-delimited","arguments":{{"id":{FINAL_SYNC_ID}}}}}"#)
            .as_bytes(),
    );

    let agent = qmp_qga::GuestAgent::builder()
        .command(Command::raw(
            "echo",
            |arguments: Map<String, Value>, _, ret: QmpReturn| ret.ok(&arguments),
        ))
        .command(Command::sync(
            "panic",
            |_: NoArgs, _| -> Result<(), QmpError> { panic!("{HANDLER_PANIC}") },
        ))
        .build()
        .expect("unique names");
    let outputs = paused_runtime().block_on(async {
        let mut outputs = Vec::new();
        for segment in segments.iter().copied().chain([sync.as_slice()]) {
            let (client_end, agent_end) = tokio::io::duplex(256);
            let serving = agent.clone();
            let attached =
                tokio::spawn(async move { serving.serve_stream(ByteStream(agent_end)).await });
            let chunks = splits.chunks(segment);
            let output = tokio::time::timeout(HANG_AFTER, converse(client_end, &chunks))
                .await
                .expect("a guest agent client hung");
            attached.await.expect("serve_stream panicked");
            outputs.push(output);
        }
        agent.server().shutdown();
        outputs
    });
    for output in &outputs {
        for line in split_lines(output, b"\n") {
            let line = line.strip_prefix(&[0xFF]).unwrap_or(line);
            let reply = json_object(line);
            assert!(
                reply.contains_key("return") != reply.contains_key("error"),
                "not a reply: {reply:?}"
            );
        }
    }
    let last = outputs.last().expect("the sync client's output");
    let mut expected = vec![0xFF];
    expected.extend_from_slice(format!("{{\"return\": {FINAL_SYNC_ID}}}\n").as_bytes());
    assert!(
        last.ends_with(&expected),
        "the final guest-sync-delimited did not resynchronise: {:?}",
        String::from_utf8_lossy(last)
    );
}
