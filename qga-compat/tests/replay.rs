//! Replays the recorded qemu-ga 7.2 transcripts against the agent: replies compared as JSON
//! values, 0xFF placement and `\n` endings byte for byte, deliberate deviations listed below.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{Scratch, TIMEOUT, qga72_builder, read_line, transcripts_dir};
use qmp_qga::SerialPort;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where our agent deliberately answers differently from qemu-ga 7.2. `expected` is the
/// transcript's line; `ours` is what we send instead (`None`: no line at all). Mirrored in
/// docs/qga.md.
struct Deviation {
    case: &'static str,
    /// The record's line number in its transcript (the metadata line is 1).
    line: usize,
    expected: &'static str,
    ours: Option<&'static str>,
}

const DEVIATIONS: &[Deviation] = &[
    // The echoed id keeps the client's spelling of a number; qemu-ga re-formats it with
    // %.17g (wire/json decoder: the id is echoed as its raw text).
    Deviation {
        case: "id-member",
        line: 16,
        expected: r#"{"return": {}, "id": 1000}"#,
        ours: Some(r#"{"return": {}, "id": 1e3}"#),
    },
    // A number that overflows a double is echoed as spelled, like any id; qemu-ga writes
    // `inf`, which is not JSON (wire/json decoder: the id's own text).
    Deviation {
        case: "id-member",
        line: 52,
        expected: r#"{"return": {}, "id": inf}"#,
        ours: Some(r#"{"return": {}, "id": 1e400}"#),
    },
    // Several unexpected arguments: qemu-ga names the first in GLib hash-table order,
    // serde the first in sorted order (dispatcher args module).
    Deviation {
        case: "argument-errors",
        line: 20,
        expected: r#"{"error": {"class": "GenericError", "desc": "Parameter 'b' is unexpected"}}"#,
        ours: Some(
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'a' is unexpected"}}"#,
        ),
    },
    // Limit errors do not cascade: one error, then the rest of the oversized value is
    // skipped until its brackets balance, and a lexical error (the host's 0xFF) inside that
    // rest ends the skipping silently (wire/json decoder, like newer upstream QEMU).
    Deviation {
        case: "huge-input",
        line: 12,
        expected: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ours: None,
    },
    Deviation {
        case: "huge-input",
        line: 17,
        expected: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ours: None,
    },
    Deviation {
        case: "huge-input",
        line: 21,
        expected: r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
        ours: None,
    },
    Deviation {
        case: "huge-input",
        line: 22,
        expected: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ours: None,
    },
    Deviation {
        case: "huge-input",
        line: 29,
        expected: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'aaaa"#,
        ours: None,
    },
    Deviation {
        case: "huge-input",
        line: 32,
        expected: r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"}\uFFFD'"}}"#,
        ours: Some(
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ),
    },
];

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

struct Conn {
    reader: Reader,
    writer: Option<Writer>,
    pending: Vec<u8>,
}

/// One transcript's records after the metadata line.
struct Transcript {
    case: String,
    meta: Value,
    records: Vec<Value>,
}

fn load(path: &Path) -> Transcript {
    let text = std::fs::read_to_string(path).expect("read transcript");
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let meta = lines.next().expect("metadata line");
    Transcript {
        case: meta["case"].as_str().unwrap().to_string(),
        meta,
        records: lines.collect(),
    }
}

/// The record's bytes: `hex` when present, else `data`.
fn bytes_of(record: &Value) -> Vec<u8> {
    match record.get("hex").and_then(Value::as_str) {
        Some(hex) => (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect(),
        None => record["data"].as_str().unwrap_or("").as_bytes().to_vec(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The input behind a truncated `send` record, rebuilt from its length and checked against
/// its sha256.
fn rebuild_send(record: &Value) -> Vec<u8> {
    let len = record["len"].as_u64().unwrap() as usize;
    let want = record["sha256"].as_str().unwrap();
    let candidates: Vec<Vec<u8>> = vec![
        wrap(b"{\"execute\":\"guest-ping\",\"id\":\"", b'A', len, b"\"}"),
        wrap(b"{\"execute\":\"guest-ping\",\"id\":\"", b'a', len, b"\"}"),
        wrap(
            b"{\"execute\":\"guest-sync\",",
            b' ',
            len,
            b"\"arguments\":{\"id\":11}}",
        ),
        vec![b'['; len],
        vec![b'{'; len],
        {
            let mut v = b"[".to_vec();
            v.extend(b"1,".repeat((len - 3) / 2));
            v.extend(b"1]");
            v
        },
    ];
    candidates
        .into_iter()
        .find(|c| c.len() == len && sha256_hex(c) == want)
        .unwrap_or_else(|| panic!("cannot rebuild truncated send of {len} bytes"))
}

fn wrap(head: &[u8], fill: u8, len: usize, tail: &[u8]) -> Vec<u8> {
    let mut v = head.to_vec();
    v.resize(len.saturating_sub(tail.len()).max(head.len()), fill);
    v.extend_from_slice(tail);
    v
}

/// Our compact JSON spaced like QEMU's (`": "`, `", "`), for truncated records that only
/// carry a hash. Member order is ours; it matches QEMU's for the replies involved.
fn qemu_spacing(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + line.len() / 8);
    let (mut in_string, mut escaped) = (false, false);
    for &b in line {
        out.push(b);
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b':' | b',' => out.push(b' '),
                _ => {}
            }
        }
    }
    // Already-spaced separators (the envelope) must not get a second space.
    let text = String::from_utf8_lossy(&out)
        .replace(":  ", ": ")
        .replace(",  ", ", ");
    let mut bytes = text.into_bytes();
    if line.first() == Some(&0xFF) {
        bytes[0] = 0xFF;
    }
    bytes
}

/// Checks one reply line against a `recv` record; returns a description of the mismatch.
fn check_line(case: &str, record: &Value, ours: &[u8]) -> Result<(), String> {
    let show = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned();
    if record.get("truncated").is_some() {
        let want = record["sha256"].as_str().unwrap();
        let spaced = qemu_spacing(ours);
        return if sha256_hex(&spaced) == want && spaced.len() as u64 == record["len"] {
            Ok(())
        } else {
            Err(format!(
                "hash mismatch for truncated reply; ours: {}",
                show(ours)
            ))
        };
    }
    let expected = bytes_of(record);
    if !ours.ends_with(b"\n") || ours.ends_with(b"\r\n") {
        return Err(format!("line ending: {:?}", show(ours)));
    }
    let expected_ff = expected.first() == Some(&0xFF);
    let ours_ff = ours.first() == Some(&0xFF);
    if expected_ff != ours_ff {
        return Err(format!("sentinel placement: ours {:?}", show(ours)));
    }
    let body = |b: &[u8]| {
        let b = if b.first() == Some(&0xFF) { &b[1..] } else { b };
        serde_json::from_slice::<Value>(b)
    };
    match (body(&expected), body(ours)) {
        (Ok(e), Ok(o)) if e == o => Ok(()),
        _ => Err(format!(
            "[{case}] expected {:?}, ours {:?}",
            show(&expected),
            show(ours)
        )),
    }
}

/// The deviation for the record on this line, if any; panics if the transcript no longer
/// says what the deviation expects.
fn deviation(case: &str, line: usize, record: &Value) -> Option<&'static Deviation> {
    let d = DEVIATIONS
        .iter()
        .find(|d| d.case == case && d.line == line)?;
    let expected = String::from_utf8_lossy(&bytes_of(record)).into_owned();
    assert!(
        expected.starts_with(d.expected),
        "{case} line {line}: deviation expects {:?}, transcript has {expected:?}",
        d.expected
    );
    Some(d)
}

async fn replay(transcript: &Transcript) -> Result<(), String> {
    let case = transcript.case.as_str();
    let argv: Vec<&str> = transcript.meta["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let blocked: Vec<String> = argv
        .iter()
        .position(|a| *a == "-b")
        .map(|i| argv[i + 1].split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let agent = qga72_builder()
        .block(blocked)
        .frozen(case == "frozen-state")
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let socket = scratch.path("qga.sock");
    let mut conns: HashMap<String, Conn> = HashMap::new();
    let mut serial_host = None;

    if argv.contains(&"isa-serial") || case.contains("serial") {
        let pty = nix::pty::openpty(None, None).map_err(|e| e.to_string())?;
        let slave_path = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
        ))
        .unwrap();
        let serving = agent.clone();
        tokio::spawn(async move { serving.serve_serial(slave_path).await });
        // Give the agent time to open the port (it flushes pending input when it does).
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(pty.slave);
        serial_host = Some(SerialPort::from_file(std::fs::File::from(pty.master)).unwrap());
    } else {
        let listener = qmp_dispatcher::bind_unix(&socket, 0o600).unwrap();
        let serving = agent.clone();
        tokio::spawn(async move { serving.serve_unix(listener).await });
    }

    // Line numbers in the file: the metadata is line 1.
    let mut line_no = 1;
    for record in &transcript.records {
        line_no += 1;
        let conn_name = record["conn"].as_str().unwrap_or("").to_string();
        let at = format!("{case} record {line_no} ({conn_name})");
        match record["dir"].as_str().unwrap() {
            "connect" => {
                let (reader, writer): (Reader, Writer) = match serial_host.take() {
                    Some(port) => {
                        let (r, w) = qmp_dispatcher::Transport::split(port);
                        (Box::new(r), Box::new(w))
                    }
                    None => {
                        let stream = UnixStream::connect(&socket).await.unwrap();
                        let (r, w) = stream.into_split();
                        (Box::new(r), Box::new(w))
                    }
                };
                conns.insert(
                    conn_name,
                    Conn {
                        reader,
                        writer: Some(writer),
                        pending: Vec::new(),
                    },
                );
            }
            "send" => {
                let bytes = if record.get("truncated").is_some() {
                    rebuild_send(record)
                } else {
                    bytes_of(record)
                };
                let conn = conns.get_mut(&conn_name).unwrap();
                let writer = conn.writer.as_mut().unwrap();
                writer.write_all(&bytes).await.unwrap();
                writer.flush().await.unwrap();
            }
            "recv" => {
                let conn = conns.get_mut(&conn_name).unwrap();
                let count = record.get("count").and_then(Value::as_u64).unwrap_or(1);
                let dev = deviation(case, line_no, record);
                for _ in 0..count {
                    match dev {
                        Some(Deviation { ours: None, .. }) => continue,
                        Some(Deviation {
                            ours: Some(ours), ..
                        }) => {
                            let line = read_line(&mut conn.reader, &mut conn.pending, TIMEOUT)
                                .await
                                .ok_or_else(|| format!("{at}: no reply"))?;
                            // As JSON values, or byte for byte where one is not JSON.
                            let same = match (
                                serde_json::from_slice::<Value>(&line),
                                serde_json::from_str::<Value>(ours),
                            ) {
                                (Ok(a), Ok(b)) => a == b && line.ends_with(b"\n"),
                                _ => line == format!("{ours}\n").as_bytes(),
                            };
                            if !same {
                                return Err(format!(
                                    "{at}: deviation changed: ours {:?}",
                                    String::from_utf8_lossy(&line)
                                ));
                            }
                        }
                        None => {
                            let line = read_line(&mut conn.reader, &mut conn.pending, TIMEOUT)
                                .await
                                .ok_or_else(|| format!("{at}: no reply"))?;
                            check_line(case, record, &line).map_err(|e| format!("{at}: {e}"))?;
                        }
                    }
                }
            }
            "silence" => {
                let conn = conns.get_mut(&conn_name).unwrap();
                let ms = record["ms"].as_u64().unwrap_or(300).min(300);
                if let Some(line) = read_line(
                    &mut conn.reader,
                    &mut conn.pending,
                    Duration::from_millis(ms),
                )
                .await
                {
                    return Err(format!(
                        "{at}: expected silence, got {:?}",
                        String::from_utf8_lossy(&line)
                    ));
                }
                if !conn.pending.is_empty() {
                    return Err(format!("{at}: expected silence, got a partial line"));
                }
            }
            "shutdown-wr" => {
                let conn = conns.get_mut(&conn_name).unwrap();
                conn.writer.as_mut().unwrap().shutdown().await.unwrap();
            }
            "eof" => {
                let conn = conns.get_mut(&conn_name).unwrap();
                let mut byte = [0u8; 1];
                let n = tokio::time::timeout(
                    TIMEOUT,
                    tokio::io::AsyncReadExt::read(&mut conn.reader, &mut byte),
                )
                .await
                .map_err(|_| format!("{at}: no EOF"))?
                .unwrap_or(0);
                if n != 0 || !conn.pending.is_empty() {
                    return Err(format!("{at}: expected EOF"));
                }
            }
            "close" => {
                conns.remove(&conn_name);
            }
            "note" => {}
            other => return Err(format!("{at}: unknown record kind {other}")),
        }
    }
    // Nothing unexpected is left over on any connection.
    for (name, conn) in conns.iter_mut() {
        if let Some(line) = read_line(
            &mut conn.reader,
            &mut conn.pending,
            Duration::from_millis(50),
        )
        .await
        {
            return Err(format!(
                "{case} ({name}): extra reply {:?}",
                String::from_utf8_lossy(&line)
            ));
        }
    }
    agent.server().shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_ga_72_transcripts_replay() {
    let dir = transcripts_dir();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "expected the qemu-ga 7.2 transcripts");
    let mut failures = Vec::new();
    for path in &paths {
        let transcript = load(path);
        if let Err(e) = replay(&transcript).await {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} transcripts differ:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}

#[test]
fn every_deviation_names_a_recv_line() {
    for d in DEVIATIONS {
        let path = std::fs::read_dir(transcripts_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| load(p).case == d.case)
            .unwrap_or_else(|| panic!("no transcript for case {}", d.case));
        let text = std::fs::read_to_string(path).unwrap();
        let line = text.lines().nth(d.line - 1).expect("line exists");
        let record: Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["dir"], "recv", "{} line {}", d.case, d.line);
        assert!(deviation(d.case, d.line, &record).is_some());
    }
}
