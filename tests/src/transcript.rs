//! Recorded QEMU conversations (`shared/conformance/qemu-10.0/*.jsonl`) as typed records, plus
//! the small pieces a replayer needs: hex decoding and SHA-256 for truncated payloads.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where the QEMU 10.0 transcripts live, relative to this crate (CI clones `shared/` beside
/// the repository, as on the development machines).
pub const CORPUS_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/conformance/qemu-10.0"
);

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
    /// Loads `file` from [`CORPUS_DIR`].
    pub fn load(file: &str) -> Self {
        let path = Path::new(CORPUS_DIR).join(file);
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
        let mut files: Vec<String> = std::fs::read_dir(PathBuf::from(CORPUS_DIR))
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
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// SHA-256 of `data` as lowercase hex (enough to check reconstructed payloads; not for
/// anything secret).
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for (k, wi) in K.iter().zip(w) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(*k)
                .wrapping_add(wi);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, add) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(add);
        }
    }
    h.iter().map(|word| format!("{word:08x}")).collect()
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
