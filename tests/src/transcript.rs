//! Recorded QEMU conversations (`tests/data/qemu-10.0/*.jsonl`) as typed records, plus
//! the small pieces a replayer needs: hex decoding and SHA-256 for truncated payloads.

use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where the QEMU 10.0 transcripts live: `tests/data/qemu-10.0`.
pub fn corpus_dir() -> PathBuf {
    crate::data_dir("qemu-10.0")
}

/// A payload or line as recorded: the bytes, or a prefix of them when the recorder cut it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The recorded bytes (only a prefix when `full` is `Some`).
    pub bytes: Vec<u8>,
    /// For a cut record: the full length and the SHA-256 (hex) of the full bytes.
    pub full: Option<(usize, String)>,
}

impl Payload {
    /// True when the recorder kept only a prefix.
    pub fn is_truncated(&self) -> bool {
        self.full.is_some()
    }

    /// Whether `candidate` is the full payload this record stands for.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        match &self.full {
            None => candidate == self.bytes.as_slice(),
            Some((len, sha)) => candidate.len() == *len && sha256_hex(candidate) == *sha,
        }
    }
}

/// One step of a recorded conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Connection `conn` is opened.
    Connect {
        /// The connection's name (`c0`, `c1`, ...).
        conn: String,
    },
    /// The client writes these bytes (in one `send`).
    Send {
        /// The connection.
        conn: String,
        /// The bytes.
        payload: Payload,
    },
    /// The server writes one line (with its `"\r\n"`), `count` times in a row.
    Recv {
        /// The connection.
        conn: String,
        /// The line, ending included.
        line: Payload,
        /// Identical consecutive copies.
        count: usize,
    },
    /// Nothing arrives on `conn` for `ms` milliseconds.
    Silence {
        /// The connection.
        conn: String,
        /// How long QEMU stayed silent.
        ms: u64,
    },
    /// The server closes `conn`.
    Eof {
        /// The connection.
        conn: String,
    },
    /// The client shuts down its sending side.
    ShutdownWrite {
        /// The connection.
        conn: String,
    },
    /// The client closes `conn`.
    Close {
        /// The connection.
        conn: String,
    },
    /// A remark by the recorder (Recv-Q readings, FIFO releases, surviving nodes).
    Note {
        /// The remark.
        text: String,
    },
}

/// A whole transcript file.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// The file name, e.g. `18-argument-errors.jsonl`.
    pub file: String,
    /// The first line: case name, summary, server, monitors.
    pub meta: Value,
    /// Everything after the first line, in order.
    pub records: Vec<Record>,
}

impl Transcript {
    /// Loads `file` from [`corpus_dir`].
    pub fn load(file: &str) -> Self {
        let path = corpus_dir().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Self::parse(file, &text)
    }

    /// Parses the JSON-lines text of a transcript.
    pub fn parse(file: &str, text: &str) -> Self {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let meta: Value = serde_json::from_str(lines.next().expect("empty transcript"))
            .expect("metadata line is JSON");
        let records = lines
            .enumerate()
            .map(|(i, line)| {
                let record: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{file} record {i}: {e}"));
                parse_record(&record).unwrap_or_else(|| panic!("{file} record {i}: {record}"))
            })
            .collect();
        Transcript {
            file: file.to_string(),
            meta,
            records,
        }
    }

    /// Every `*.jsonl` file of the corpus, sorted.
    pub fn corpus_files() -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
            .expect("corpus directory")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".jsonl"))
            .collect();
        files.sort();
        files
    }
}

fn parse_record(record: &Value) -> Option<Record> {
    let conn = || record.get("conn")?.as_str().map(str::to_string);
    let payload = || -> Option<Payload> {
        let bytes = match record.get("hex").and_then(Value::as_str) {
            Some(hex) => hex_decode(hex)?,
            None => record.get("data")?.as_str()?.as_bytes().to_vec(),
        };
        let full = if record.get("truncated").and_then(Value::as_bool) == Some(true) {
            let len = record.get("len")?.as_u64()? as usize;
            let sha = record.get("sha256")?.as_str()?.to_string();
            Some((len, sha))
        } else {
            None
        };
        Some(Payload { bytes, full })
    };
    // The recorder marks a cut `recv` line with a trailing "...".
    let cut_line = || -> Option<Payload> {
        let mut line = payload()?;
        if line.is_truncated() && line.bytes.ends_with(b"...") {
            line.bytes.truncate(line.bytes.len() - 3);
        }
        Some(line)
    };
    Some(match record.get("dir")?.as_str()? {
        "connect" => Record::Connect { conn: conn()? },
        "send" => Record::Send {
            conn: conn()?,
            payload: payload()?,
        },
        "recv" => Record::Recv {
            conn: conn()?,
            line: cut_line()?,
            count: record.get("count").and_then(Value::as_u64).unwrap_or(1) as usize,
        },
        "silence" => Record::Silence {
            conn: conn()?,
            ms: record.get("ms")?.as_u64()?,
        },
        "eof" => Record::Eof { conn: conn()? },
        "shutdown-wr" => Record::ShutdownWrite { conn: conn()? },
        "close" => Record::Close { conn: conn()? },
        "note" => Record::Note {
            text: record.get("data")?.as_str()?.to_string(),
        },
        _ => return None,
    })
}

/// Decodes lowercase or uppercase hex.
pub fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    hex::decode(hex).ok()
}

/// SHA-256 of `data` as lowercase hex, the form the recorder writes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex_decode("7bff0a"), Some(vec![0x7b, 0xff, 0x0a]));
        assert_eq!(hex_decode("7"), None);
    }
}
