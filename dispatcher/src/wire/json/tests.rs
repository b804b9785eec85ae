//! Decoder tests: byte-level framing, QEMU error texts and recovery, limits, raw ids,
//! and replay of recorded QEMU transcripts.

use bytes::BytesMut;
use serde_json::{Value, json};

use super::{Frame, Id, JsonDecoder, Limits, canonical_key};

/// A frame reduced to something comparable: `V:<value as JSON>` or `E:<desc>`.
fn show(f: Frame) -> String {
    match f {
        Frame::Value(v) => format!("V:{}", v.value),
        Frame::Request(r) => show(Frame::Value(r.into_parsed())),
        Frame::Error(e) => format!("E:{e}"),
    }
}

fn drain(dec: &mut JsonDecoder, buf: &mut BytesMut, out: &mut Vec<String>) {
    while let Some(f) = dec.decode(buf) {
        out.push(show(f));
    }
}

/// Frames for `input` fed in one piece, checking that byte-at-a-time feeding, a few
/// irregular splits and a decoder that splits request objects give the same frames.
fn run_with(input: &[u8], limits: Limits) -> Vec<String> {
    let mut reference = None;
    for (chunk, split_requests) in [
        (usize::MAX, false),
        (usize::MAX, true),
        (1, false),
        (2, true),
        (3, false),
        (7, false),
    ] {
        let mut dec = JsonDecoder::new(limits);
        if split_requests {
            dec = dec.split_requests();
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let step = chunk.min(input.len().max(1));
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            drain(&mut dec, &mut buf, &mut out);
        }
        match &reference {
            None => reference = Some(out),
            Some(r) => assert_eq!(r, &out, "split {chunk} differs for {input:?}"),
        }
    }
    reference.unwrap_or_default()
}

fn run(input: &[u8]) -> Vec<String> {
    run_with(input, Limits::default())
}

fn e(desc: &str) -> String {
    format!("E:JSON parse error, {desc}")
}

fn v(value: Value) -> String {
    format!("V:{value}")
}

#[test]
fn simple_values_and_concatenation() {
    assert_eq!(
        run(br#"{"execute":"a"}{"execute":"b"}  [1, 2.5, "x"]"#),
        vec![
            v(json!({"execute":"a"})),
            v(json!({"execute":"b"})),
            v(json!([1, 2.5, "x"]))
        ]
    );
    assert_eq!(
        run(b"{\"a\":\r\n\t{\"b\":[true,false,null]}}"),
        vec![v(json!({"a":{"b":[true,false,null]}}))]
    );
    assert_eq!(run(br#""str""#), vec![v(json!("str"))]);
}

#[test]
fn whitespace_only_gives_nothing() {
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(&b"   \r\n\t\n \r\n"[..]);
    assert!(dec.decode(&mut buf).is_none());
    assert!(dec.is_idle());
    assert!(dec.decode_eof(&mut buf).is_none());
}

#[test]
fn lookahead_scalars() {
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(&b"42"[..]);
    assert!(dec.decode(&mut buf).is_none());
    assert!(!dec.is_idle());
    buf.extend_from_slice(b"\n");
    assert_eq!(show(dec.decode(&mut buf).unwrap()), v(json!(42)));
    assert!(dec.decode(&mut buf).is_none());
    assert!(dec.is_idle());

    buf.extend_from_slice(b"null");
    assert!(dec.decode(&mut buf).is_none());
    assert_eq!(show(dec.decode_eof(&mut buf).unwrap()), v(json!(null)));
    assert!(dec.decode_eof(&mut buf).is_none());

    // The lookahead byte is not consumed by the scalar's frame.
    let mut buf = BytesMut::from(&b"7{\"a\":1}"[..]);
    assert_eq!(show(dec.decode(&mut buf).unwrap()), v(json!(7)));
    assert_eq!(&buf[..], b"{\"a\":1}");
    assert_eq!(show(dec.decode(&mut buf).unwrap()), v(json!({"a":1})));

    // `123` then 0xFF: the number, then the stray byte.
    assert_eq!(run(b"123\xff"), vec![v(json!(123)), e("stray '\u{FFFD}'")]);
    assert_eq!(
        run(b"1.5e3 -0 0 -1.0E+2 "),
        vec![v(json!(1500.0)), v(json!(0)), v(json!(0)), v(json!(-100.0))]
    );
}

#[test]
fn decode_leaves_following_bytes() {
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(&br#"{"a":1} {"b":2}@@"#[..]);
    assert_eq!(show(dec.decode(&mut buf).unwrap()), v(json!({"a":1})));
    assert_eq!(&buf[..], br#" {"b":2}@@"#);
    assert_eq!(show(dec.decode(&mut buf).unwrap()), v(json!({"b":2})));
    assert_eq!(&buf[..], b"@@");
    assert_eq!(show(dec.decode(&mut buf).unwrap()), e("stray '@'"));
    assert_eq!(&buf[..], b"@");
}

#[test]
fn eof_drops_partial_values() {
    for partial in [&b"{\"a\":1"[..], b"[1,", b"\"abc", b"1.", b"{\"a\":12"] {
        let mut dec = JsonDecoder::default();
        let mut buf = BytesMut::from(partial);
        assert!(dec.decode_eof(&mut buf).is_none(), "{partial:?}");
        assert!(dec.is_idle());
        assert!(buf.is_empty());
    }
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(&b"nul"[..]);
    assert_eq!(
        show(dec.decode_eof(&mut buf).unwrap()),
        e("invalid keyword 'nul'")
    );
}

#[test]
fn grammar_errors() {
    let cases: &[(&[u8], &[&str])] = &[
        (b"{ \"execute\": }", &["expecting value"]),
        (b"{]", &["expecting value"]),
        (b"{\"a\":1,}", &["expecting value"]),
        (b"[1,]", &["expecting value"]),
        (b"}", &["expecting value"]),
        (b"]", &["expecting value"]),
        (b"[}]", &["expecting value", "expecting value"]),
        (b"{,}", &["expecting value"]),
        (b"{\"execute\" \"x\"}", &["missing : in object pair"]),
        (b"{\"a\"}", &["missing : in object pair"]),
        (b"{\"a\":1 \"b\":2}", &["expected separator in dict"]),
        (b"{\"a\":1]", &["expected separator in dict"]),
        (b"[1 2]", &["expected separator in list"]),
        (b"{1:2}", &["key is not a string in object"]),
        (b"{{}:2}", &["key is not a string in object"]),
        (b"{[1 2]:2}", &["expected separator in list"]),
        (b"{\"a\":1,\"a\":2}", &["duplicate key"]),
        (b"{\"a\":{\"b\":1,\"b\":[]}}", &["duplicate key"]),
        (b"{\"a\":1,\"a\":[1 2]}", &["expected separator in list"]),
        (b"nul ", &["invalid keyword 'nul'"]),
        (b"[truee]", &["invalid keyword 'truee'"]),
        // The lexer cuts these into two tokens; the parser must see two values too.
        (b"[1-2]", &["expected separator in list"]),
        (b"[1e5e5]", &["expected separator in list"]),
        (b"[1.5-0]", &["expected separator in list"]),
    ];
    for (input, errs) in cases {
        let mut input = input.to_vec();
        input.extend_from_slice(b"\n{\"probe\":1}");
        let mut want: Vec<String> = errs.iter().map(|d| e(d)).collect();
        want.push(v(json!({"probe":1})));
        assert_eq!(run(&input), want, "{}", String::from_utf8_lossy(&input));
    }
    assert_eq!(
        run(br#"{"a":1}}"#),
        vec![v(json!({"a":1})), e("expecting value")]
    );
}

#[test]
fn lexical_errors_and_recovery() {
    let cases: &[(&[u8], &[&str])] = &[
        (b"{\xff", &["stray '\u{FFFD}'"]),
        (b"\xff\n", &["stray '\u{FFFD}'"]),
        (b"\xfe\n", &["stray '\u{FFFD}'"]),
        (
            b"\xff\xff\xff",
            &["stray '\u{FFFD}'", "stray '\u{FFFD}'", "stray '\u{FFFD}'"],
        ),
        (b"{\x01", &["stray '\u{1}'"]),
        (b"\x1b", &["stray '\u{1b}'"]),
        (b"\x00\n", &["stray ''"]),
        (b"\"ab\x00cd\"\n", &["stray '\"ab'"]),
        (b"{'bad \xff", &["stray ''bad \u{FFFD}'"]),
        (b"{'execute': 'x', 'id':'\n", &["stray ''\n'"]),
        (b"%p\n", &["stray '%'"]),
        (b"True\n", &["stray 'T'"]),
        (b"#comment\n", &["stray '#'"]),
        (b"+1 \n", &["stray '+'"]),
        (b"01", &["stray '01'"]),
        (b"1.\n", &["stray '1.\n'"]),
        (b"-\n", &["stray '-\n'"]),
        (b"1e+x", &["stray '1e+x'"]),
        (b"\xef\xbb\xbf{\"a\":1}", &["stray '\u{FFFD}'"]),
        (b"@\x01\n", &["stray '@'", "stray '\u{1}'"]),
        (b"{\"execute\":\"q\" @ }", &["stray '@'", "expecting value"]),
        (b"{\"id\":\"a\tb\"}", &["stray '\"a\t'", "expecting value"]),
        (b"\"\xc3\n", &["stray '\"\u{FFFD}\n'"]),
    ];
    for (input, errs) in cases {
        let mut input = input.to_vec();
        input.extend_from_slice(b"\n{\"probe\":1}");
        let got = run(&input);
        let mut want: Vec<String> = errs.iter().map(|d| e(d)).collect();
        // The BOM case recovers at `{`, so its value is seen.
        if input.starts_with(b"\xef") {
            want.push(v(json!({"a":1})));
        }
        want.push(v(json!({"probe":1})));
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&input));
    }
    // Cascade from an error inside a string (qga case 04).
    assert_eq!(
        run(b"{\"execute\":\"guest-pi\xffng\",\"id\":\"x\"}"),
        vec![
            e("stray '\"guest-pi\u{FFFD}'"),
            e("expecting value"),
            v(json!("id")),
            e("expecting value"),
            v(json!("x")),
            e("expecting value"),
        ]
    );
    assert_eq!(
        run(b"{\"a\":1}junk{\"b\":2}"),
        vec![
            v(json!({"a":1})),
            e("invalid keyword 'junk'"),
            v(json!({"b":2}))
        ]
    );
    // An unbalanced object swallows later values until a control byte resyncs.
    assert_eq!(
        run(b"{\"a\":1 {\"b\":2}\x1b{\"c\":3}"),
        vec![e("stray '\u{1b}'"), v(json!({"c":3}))]
    );
}

#[test]
fn strings_utf8_and_escapes() {
    let ok: &[(&[u8], &str)] = &[
        (b"\"\xc3\xa9\xe2\x82\xac\"", "é€"),
        (b"\"\xef\xbb\xbfbom\"", "\u{FEFF}bom"),
        (b"\"a\xc0\x80b\"", "a\0b"),
        (b"\"\\u0000\"", "\0"),
        (b"\"\\ud83d\\ude00\"", "😀"),
        (
            b"\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\'\"",
            "\"\\/\u{8}\u{c}\n\r\t'",
        ),
        (b"'it\\'s \"q\"'", "it's \"q\""),
        (b"\"\xf0\x9f\x98\x80\"", "😀"),
    ];
    for (input, want) in ok {
        assert_eq!(run(input), vec![v(json!(want))], "{input:?}");
    }
    let bad: &[(&[u8], &str)] = &[
        (b"\"\xc3(\"", "invalid UTF-8 sequence in string"),
        (b"\"\xc0\xaf\"", "invalid UTF-8 sequence in string"),
        (b"\"\xed\xa0\x80\"", "invalid UTF-8 sequence in string"),
        (b"\"\xf4\x90\x80\x80\"", "invalid UTF-8 sequence in string"),
        (b"\"\xe2\x82\"", "invalid UTF-8 sequence in string"),
        (b"\"\xe9\"", "invalid UTF-8 sequence in string"),
        (b"\"\xef\xbf\xbe\"", "invalid UTF-8 sequence in string"),
        (b"\"\\x41\"", "invalid escape sequence in string"),
        (b"\"a\\qb\"", "invalid escape sequence in string"),
        (b"\"\\ud800\"", "\\ud800 is not a valid Unicode character"),
        (b"\"\\udc00x\"", "\\udc00 is not a valid Unicode character"),
        (
            b"\"\\ud800\\u0041\"",
            "\\ud800 is not a valid Unicode character",
        ),
        (b"\"\\u12\"", "\\u12\" is not a valid Unicode character"),
        (b"\"a\\u00\"", "\\u00\" is not a valid Unicode character"),
        (b"\"\\uFFFE\"", "\\uFFFE is not a valid Unicode character"),
        (
            b"\"\\ud83f\\udffe\"",
            "\\ud83f\\udffe is not a valid Unicode character",
        ),
    ];
    for (input, desc) in bad {
        assert_eq!(run(input), vec![e(desc)], "{input:?}");
    }
}

#[test]
fn numbers_like_qemu() {
    assert_eq!(
        run(b"[9223372036854775807,9223372036854775808,18446744073709551615,18446744073709551616,-9223372036854775809,-0,-0.0,1e400]"),
        vec![v(json!([
            i64::MAX,
            9223372036854775808u64,
            u64::MAX,
            18446744073709551616.0,
            -9223372036854775809.0,
            0,
            -0.0,
            null
        ]))]
    );
}

fn id_of(input: &[u8]) -> Option<String> {
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(input);
    match dec.decode(&mut buf) {
        Some(Frame::Value(p)) => p.id.map(|r| r.text().to_owned()),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn raw_id_text() {
    assert_eq!(
        id_of(br#"{"execute":"x","id":"__qmp#00001"}"#).as_deref(),
        Some(r#""__qmp#00001""#)
    );
    assert_eq!(id_of(br#"{"id": 1.0}"#).as_deref(), Some("1.0"));
    assert_eq!(id_of(br#"{"id":-0}"#).as_deref(), Some("-0"));
    assert_eq!(id_of(br#"{"id":1e3}"#).as_deref(), Some("1e3"));
    assert_eq!(id_of(br#"{"id":1E+2}"#).as_deref(), Some("1E+2"));
    assert_eq!(id_of(b"{'id':'it\\'s'}").as_deref(), Some(r#""it's""#));
    assert_eq!(
        id_of(b"{\"id\" : { \"b\" : 1 , \"a\" : [ 2, 'x', null, [ ] ] }, \"execute\":\"q\"}")
            .as_deref(),
        Some(r#"{"b":1,"a":[2,"x",null,[]]}"#)
    );
    assert_eq!(
        id_of(br#"{"id":"a\/b\u00e9"}"#).as_deref(),
        Some("\"a/b\u{e9}\"")
    );
    assert_eq!(
        id_of(b"{\"id\":\"\xc3\xa9\xc0\x80\"}").as_deref(),
        Some("\"é\\u0000\"")
    );
    assert_eq!(id_of(br#"{"id":true}"#).as_deref(), Some("true"));
    assert_eq!(
        id_of(b"{\"id\":[\"a\\/\\u00e9\", 'b\\'c', 1.50]}").as_deref(),
        Some("[\"a/\u{e9}\",\"b'c\",1.50]")
    );
    assert_eq!(id_of(br#"{"ID":1}"#), None);
    assert_eq!(id_of(br#"{"a":{"id":1}}"#), None);
    assert_eq!(id_of(br#"[{"id":1}]"#), None);
}

#[test]
fn nesting_limit() {
    let deep = |n: usize| {
        let mut s = b"{\"execute\":\"x\",\"id\":".to_vec();
        s.extend(std::iter::repeat_n(b'[', n - 1));
        s.extend(std::iter::repeat_n(b']', n - 1));
        s.extend_from_slice(b"}{\"probe\":1}");
        s
    };
    // Default limits: 1024 levels (the object counts) are accepted, 1025 are not.
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(&deep(1024)[..]);
    let mut out = Vec::new();
    drain(&mut dec, &mut buf, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out[0].starts_with("V:{\"execute\""));
    let mut buf = BytesMut::from(&deep(1025)[..]);
    let mut out = Vec::new();
    drain(&mut dec, &mut buf, &mut out);
    assert_eq!(
        out,
        vec![
            "E:JSON nesting depth limit exceeded".to_string(),
            v(json!({"probe":1}))
        ]
    );

    let small = Limits {
        max_nesting: 3,
        ..Limits::default()
    };
    assert_eq!(
        run_with(b"[[[]]] [[[[\"]\"]]]] 5 ", small),
        vec![
            v(json!([[[]]])),
            "E:JSON nesting depth limit exceeded".into(),
            v(json!(5)),
        ]
    );
}

#[test]
fn token_count_limit() {
    let lim = Limits {
        max_tokens: 5,
        ..Limits::default()
    };
    // [1,2] is 5 tokens; [1,2,3] is 7.
    assert_eq!(
        run_with(b"[1,2] [1,2,3] {\"a\":[1,{}]} 7 ", lim),
        vec![
            v(json!([1, 2])),
            "E:JSON token count limit exceeded".into(),
            "E:JSON token count limit exceeded".into(),
            v(json!(7)),
        ]
    );
}

#[test]
fn token_size_limit() {
    let lim = Limits {
        max_bytes: 10,
        ..Limits::default()
    };
    // Nine bytes are fine, ten are not (QEMU: token bytes + 1 > limit).
    assert_eq!(
        run_with(b"\"1234567\" \"12345678\" 1", lim),
        vec![
            v(json!("1234567")),
            "E:JSON token size limit exceeded".into(),
        ]
    );
    assert_eq!(
        run_with(
            b"{\"a\":\"xxxxxxxxxxxxxxxxxxxxxxxxx]}\"} [1] \"yyyyyyyyyyyyyyyyyyyyyyyy\"[2]",
            lim
        ),
        vec![
            "E:JSON token size limit exceeded".into(),
            v(json!([1])),
            "E:JSON token size limit exceeded".into(),
            v(json!([2]))
        ]
    );
    // Memory stays bounded while a huge value is skipped.
    let mut dec = JsonDecoder::new(lim);
    let mut buf = BytesMut::from(&b"[\""[..]);
    let mut out = Vec::new();
    for _ in 0..1000 {
        buf.extend_from_slice(b"zzzzzzzzzz");
        drain(&mut dec, &mut buf, &mut out);
        assert!(buf.len() <= 20);
    }
    buf.extend_from_slice(b"\"]{}");
    drain(&mut dec, &mut buf, &mut out);
    assert_eq!(
        out,
        vec!["E:JSON token size limit exceeded".to_string(), v(json!({}))]
    );
    // A lexical error ends the skipping silently; the lexer then recovers as usual.
    assert_eq!(
        run_with(b"[\"aaaaaaaaaaaaaaaaaaaa\" [ \xff{}", lim),
        vec!["E:JSON token size limit exceeded".to_string(), v(json!({}))]
    );
}

/// Replays the client bytes of one connection of a QEMU transcript and checks that the
/// frames line up with the server's replies.
fn replay(path: &str) {
    let full = format!("{}/../tests/data/{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{full}: {err}"));
    let mut lines = text.lines();
    lines.next();
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut want = Vec::new();
    let mut conn = None;
    for line in lines {
        let rec: Value = serde_json::from_str(line).unwrap();
        let Some(c) = rec["conn"].as_str() else {
            continue;
        };
        if *conn.get_or_insert_with(|| c.to_owned()) != c {
            continue;
        }
        match rec["dir"].as_str() {
            Some("send") => {
                let bytes = match rec["hex"].as_str() {
                    Some(hex) => (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                        .collect(),
                    None => rec["data"].as_str().unwrap().as_bytes().to_vec(),
                };
                buf.extend_from_slice(&bytes);
                while let Some(f) = dec.decode(&mut buf) {
                    got.push(match f {
                        Frame::Value(_) | Frame::Request(_) => "value".to_string(),
                        Frame::Error(d) => d,
                    });
                }
            }
            Some("recv") => {
                let reply: Value = serde_json::from_str(rec["data"].as_str().unwrap()).unwrap();
                if reply.get("QMP").is_some() || reply.get("event").is_some() {
                    continue;
                }
                let desc = reply["error"]["desc"].as_str().unwrap_or("");
                let item =
                    if desc.starts_with("JSON parse error") || desc.ends_with("limit exceeded") {
                        desc.to_string()
                    } else {
                        "value".to_string()
                    };
                for _ in 0..rec["count"].as_u64().unwrap_or(1) {
                    want.push(item.clone());
                }
            }
            _ => {}
        }
    }
    assert!(want.len() >= 2, "{path}: too few replies");
    assert_eq!(got, want, "{path}");
}

#[test]
fn transcripts() {
    for path in [
        "qemu-10.0/20-json-syntax-errors.jsonl",
        "qemu-10.0/21-json-lexical-errors.jsonl",
        "qemu-10.0/22-invalid-utf8.jsonl",
        "qemu-10.0/23-whitespace-only.jsonl",
        "qemu-10.0/25-lookahead-scalars.jsonl",
        "qemu-ga-7.2/04-sentinel-input.jsonl",
        "qemu-ga-7.2/06-garbage-before-sync-no-ff.jsonl",
        "qemu-ga-7.2/17-framing-lookahead.jsonl",
        "qemu-ga-7.2/18-lexical-errors.jsonl",
        "qemu-ga-7.2/19-syntax-errors.jsonl",
    ] {
        replay(path);
    }
}

/// Random JSON-ish input: never panics, and any split gives the same frames.
#[test]
fn random_input_is_split_invariant() {
    const ALPHABET: &[u8] =
        b"{}[]:,\"'\\ \n\t01-.eE+anulltrux\x00\x01\x1b\xc0\x80\xc3\xa9\xed\xff\xfe%@";
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let limits = Limits {
        max_nesting: 4,
        max_tokens: 12,
        max_bytes: 24,
    };
    for _ in 0..3000 {
        let n = (rnd() % 40) as usize;
        let input: Vec<u8> = (0..n)
            .map(|_| ALPHABET[(rnd() % ALPHABET.len() as u64) as usize])
            .collect();
        run_with(&input, limits);
        run(&input);
        let mut dec = JsonDecoder::new(limits);
        let mut buf = BytesMut::from(&input[..]);
        while dec.decode_eof(&mut buf).is_some() {}
        assert!(dec.is_idle() && buf.is_empty());
    }
}

/// Per-request cost against `serde_json::from_slice::<Value>` on a typical request (best of
/// several interleaved rounds, since the build machine is shared). Run with
/// `cargo test -p qmp-dispatcher --release --lib -- --ignored --nocapture speed`.
#[test]
#[ignore]
fn speed() {
    use std::hint::black_box;
    use std::time::{Duration, Instant};
    let req: &[u8] = br#"{"execute":"query-status","id":"__qmp#00001"}"#;
    const N: u32 = 200_000;
    let mut many = BytesMut::new();
    for _ in 0..1000 {
        many.extend_from_slice(req);
    }
    let (mut ours, mut serde, mut stream) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut dec = JsonDecoder::default();
    for _ in 0..15 {
        let t = Instant::now();
        for _ in 0..N {
            let mut buf = BytesMut::from(black_box(req));
            black_box(dec.decode(&mut buf));
        }
        ours = ours.min(t.elapsed() / N);
        let t = Instant::now();
        for _ in 0..N {
            let buf = BytesMut::from(black_box(req));
            black_box(serde_json::from_slice::<Value>(&buf).ok());
        }
        serde = serde.min(t.elapsed() / N);
        let t = Instant::now();
        for _ in 0..N / 1000 {
            let mut buf = many.clone();
            while let Some(f) = dec.decode(&mut buf) {
                black_box(f);
            }
        }
        stream = stream.min(t.elapsed() / N);
    }
    println!(
        "decode: {ours:?}/request, serde_json::from_slice: {serde:?}/request, \
         pipelined stream: {stream:?}/request"
    );
}

/// Timings for bigger inputs (best of several runs), with `serde_json` for comparison:
/// `cargo test -p qmp-dispatcher --release --lib -- --ignored --nocapture speed`.
#[test]
#[ignore]
fn speed_big() {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    fn best(runs: u32, iters: u32, mut f: impl FnMut()) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..runs {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            best = best.min(t.elapsed() / iters);
        }
        best
    }
    fn ours(input: &[u8], chunk: usize) -> usize {
        let mut dec = JsonDecoder::default();
        let mut buf = BytesMut::with_capacity(input.len());
        let mut n = 0;
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(f) = dec.decode(&mut buf) {
                assert!(matches!(f, Frame::Value(_)));
                n += 1;
                black_box(f);
            }
        }
        n
    }
    let args: &[u8] = br#"{"execute":"device_add","arguments":{"driver":"virtio-net-pci","id":"net0","bus":"pci.0","addr":"0x5","mac":"52:54:00:12:34:56","vectors":4,"disable-legacy":true},"id":"__qmp#00002"}"#;
    let mut big = br#"{"execute":"x","arguments":{"data":""#.to_vec();
    big.resize(big.len() + (1 << 20), b'a');
    big.extend_from_slice(br#""}}"#);
    let mut nested = vec![b'['; 1000];
    nested.extend(std::iter::repeat_n(b']', 1000));
    let cases: [(&str, &[u8], u32); 3] = [
        ("request with arguments", args, 100_000),
        ("1 MiB string", &big, 100),
        ("1000-deep array", &nested, 10_000),
    ];
    for (name, input, iters) in cases {
        assert_eq!(ours(input, usize::MAX), 1);
        let one = best(7, iters, || {
            black_box(ours(black_box(input), usize::MAX));
        });
        let chunked = best(7, iters, || {
            black_box(ours(black_box(input), 4096));
        });
        let serde = best(7, iters, || {
            let buf = BytesMut::from(black_box(input));
            black_box(serde_json::from_slice::<Value>(&buf).ok());
        });
        println!(
            "{name}: decode {one:?}, in 4 KiB pieces {chunked:?}, serde_json::from_slice {serde:?}"
        );
    }
}

/// Random, mostly well-formed requests (some mutated): the single-pass path, taken when a
/// whole value is in the buffer, gives the same frames and ids as the general path, which
/// is all that byte-at-a-time feeding uses.
#[test]
fn whole_buffer_matches_byte_at_a_time() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    const KEYS: &[&str] = &[
        r#""id""#,
        r#""execute""#,
        r#""arguments""#,
        r#""a""#,
        r#""é""#,
        r#""x\ny""#,
        "'id'",
        r#""i\u0064""#,
    ];
    const SCALARS: &[&str] = &[
        r#""plain""#,
        r#""__qmp#00001""#,
        r#""esc\"\\\/\b\f\n\r\t""#,
        r#""\u00e9\ud83d\ude00""#,
        "\"caf\u{e9}\"",
        r#""a\u0000b""#,
        r#""\ud800""#,
        r#""\q""#,
        "\"\x7f\"",
        "'sq'",
        "0",
        "-0",
        "12",
        "-3.5",
        "1e3",
        "1E+2",
        "0.5e-3",
        "1e400",
        "-1.0",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551616",
        "-9223372036854775809",
        "true",
        "false",
        "null",
        "nul",
        "[]",
        "{}",
        r#""a long plain string, longer than 8 bytes""#,
    ];
    const WS: &[&str] = &["", "", "", " ", "\n", "\t", " \r\n "];
    fn value(rnd: &mut impl FnMut(usize) -> usize, depth: usize, out: &mut String) {
        out.push_str(WS[rnd(WS.len())]);
        match rnd(if depth == 0 { 1 } else { 4 }) {
            0 => out.push_str(SCALARS[rnd(SCALARS.len())]),
            1 => {
                out.push('[');
                for k in 0..rnd(4) {
                    if k > 0 {
                        out.push(',');
                    }
                    value(rnd, depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for k in 0..rnd(4) {
                    if k > 0 {
                        out.push(',');
                    }
                    out.push_str(WS[rnd(WS.len())]);
                    out.push_str(KEYS[rnd(KEYS.len())]);
                    out.push_str(WS[rnd(WS.len())]);
                    out.push(':');
                    value(rnd, depth - 1, out);
                }
                out.push('}');
            }
        }
        out.push_str(WS[rnd(WS.len())]);
    }
    let frames = |input: &[u8], limits: Limits, step: usize, split_requests: bool| {
        let mut dec = JsonDecoder::new(limits);
        if split_requests {
            dec = dec.split_requests();
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            while let Some(mut f) = dec.decode(&mut buf) {
                if let Frame::Request(request) = f {
                    f = Frame::Value(request.into_parsed());
                }
                out.push(match f {
                    Frame::Value(v) => format!(
                        "V:{} id:{:?}",
                        v.value,
                        v.id.map(|r| (r.text().to_owned(), r.key().to_owned()))
                    ),
                    Frame::Error(e) => format!("E:{e}"),
                    Frame::Request(_) => unreachable!("turned into a value above"),
                });
            }
        }
        out
    };
    const ALPHABET: &[u8] = b"{}[]:,\"'\\ 01-.eEx\x00\xc3\xff";
    let mut values = 0;
    for round in 0..20_000 {
        let mut text = String::new();
        for _ in 0..1 + rnd(3) {
            text.push('{');
            text.push_str(r#""execute":"x","id":"#);
            value(&mut rnd, 3, &mut text);
            text.push(',');
            text.push_str(KEYS[rnd(KEYS.len())]);
            text.push(':');
            value(&mut rnd, 3, &mut text);
            text.push('}');
        }
        let mut input = text.into_bytes();
        if round % 3 == 0 {
            let at = rnd(input.len());
            match rnd(3) {
                0 => input[at] = ALPHABET[rnd(ALPHABET.len())],
                1 => {
                    input.remove(at);
                }
                _ => input.insert(at, ALPHABET[rnd(ALPHABET.len())]),
            }
        }
        let limits = if round % 2 == 0 {
            Limits::default()
        } else {
            Limits {
                max_nesting: 1 + rnd(5),
                max_tokens: 1 + rnd(40),
                max_bytes: 1 + rnd(120),
            }
        };
        let whole = frames(&input, limits, usize::MAX, false);
        values += whole.iter().filter(|f| f.starts_with("V:")).count();
        assert_eq!(
            whole,
            frames(&input, limits, 1, false),
            "for {:?}",
            String::from_utf8_lossy(&input)
        );
        assert_eq!(
            whole,
            frames(&input, limits, usize::MAX, true),
            "split requests differ for {:?}",
            String::from_utf8_lossy(&input)
        );
    }
    assert!(values > 10_000, "only {values} values");
}

/// The `id` of a number too big for a double keeps its own spelling in the echo text.
#[test]
fn id_echo_keeps_overflowing_numbers() {
    assert_eq!(
        id_of(br#"{"execute":"x","id":1e400}"#).as_deref(),
        Some("1e400")
    );
    assert_eq!(id_of(br#"{"id":-1E999999}"#).as_deref(), Some("-1E999999"));
    assert_eq!(
        id_of(br#"{"id":[1e400, {"b": 2e400}]}"#).as_deref(),
        Some(r#"[1e400,{"b":2e400}]"#)
    );
    let digits = "9".repeat(100_000);
    let input = format!(r#"{{"execute":"x","id":{digits}}}"#);
    assert_eq!(id_of(input.as_bytes()), Some(digits));
}

/// Ids nest as deep as QEMU allows (serde_json's own parser stops at 128).
#[test]
fn id_echo_of_deep_nesting() {
    for depth in [200, 1023] {
        let text = format!(
            "{}0{}",
            "[{\"a\":".repeat(depth / 2),
            "}]".repeat(depth / 2)
        );
        let input = format!(r#"{{"execute":"x","id": {text}}}"#);
        assert_eq!(
            id_of(input.as_bytes()).as_deref(),
            Some(&text[..]),
            "{depth}"
        );
    }
}

/// The parsed id of the first frame of `input`.
fn parsed_id(input: &[u8]) -> Id {
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::from(input);
    match dec.decode(&mut buf) {
        Some(Frame::Value(p)) => p.id.expect("an id"),
        other => panic!("unexpected {other:?}"),
    }
}

/// The canonical key of the id in `{"id":<id>}`, through the single-pass path and
/// through the streaming path (byte at a time), which must agree.
fn key_of(id: &str) -> String {
    let input = format!(r#"{{"execute":"x","id":{id}}}"#);
    let whole = parsed_id(input.as_bytes());
    let mut dec = JsonDecoder::default();
    let mut buf = BytesMut::new();
    let mut split = None;
    for &b in input.as_bytes() {
        buf.extend_from_slice(&[b]);
        if let Some(Frame::Value(p)) = dec.decode(&mut buf) {
            split = p.id;
        }
    }
    let split = split.expect("an id byte by byte");
    assert_eq!(whole.text(), split.text(), "{id}");
    assert_eq!(whole.key(), split.key(), "{id}");
    whole.key().to_owned()
}

#[test]
fn id_keys_compare_values() {
    let same: &[(&str, &str)] = &[
        (r#"{"a":1,"b":2}"#, r#"{ "b" : 2, "a" : 1 }"#),
        ("1.0", "1.00"),
        ("-0", "0"),
        (r#""\u0041""#, r#""A""#),
        ("'A'", r#""A""#),
        ("1e2", "100.0"),
        (
            "[1.50, {\"y\":[], \"x\":{\"d\":0,\"c\":-0}}]",
            "[1.5,{\"x\":{\"c\":0,\"d\":0},\"y\":[]}]",
        ),
        ("1e400", "1e400"),
        ("18446744073709551616", "1.8446744073709552e19"),
    ];
    for (a, b) in same {
        assert_eq!(key_of(a), key_of(b), "{a} vs {b}");
    }
    let different: &[(&str, &str)] = &[
        ("1", "1.0"),
        ("1e400", "2e400"),
        ("1e400", "1E400"),
        (r#""1""#, "1"),
        ("[1,2]", "[2,1]"),
        (r#"{"a":1}"#, r#"{"a":1.0}"#),
        ("null", r#""null""#),
    ];
    for (a, b) in different {
        assert_ne!(key_of(a), key_of(b), "{a} vs {b}");
    }
    assert_eq!(key_of(r#"{ "b" : 2, "a" : 1 }"#), r#"{"a":1,"b":2}"#);
    assert_eq!(key_of("-0"), "0");
    assert_eq!(key_of("1.00"), "1.0");
    assert_eq!(key_of("1e400"), "1e400");
    assert_eq!(key_of(r#""\u0041\n""#), r#""A\n""#);
}

#[test]
fn id_text_and_key_storage() {
    // -0 is echoed as spelled; its key is 0, stored separately.
    let id = parsed_id(br#"{"execute":"x","id":-0}"#);
    assert_eq!((id.text(), id.key()), ("-0", "0"));
    assert_eq!(id.heap_size(), 3);
    // The common case: text and key are one string.
    let id = parsed_id(br#"{"execute":"x","id":"__qmp#00001"}"#);
    assert_eq!(id.key(), id.text());
    assert_eq!(id.heap_size(), 13);
    let id = parsed_id(br#"{"id":{"a":[1,{"b":2}],"c":null}}"#);
    assert_eq!(id.key(), id.text());
    assert_eq!(id.heap_size(), id.text().len());
    // A 100000-digit integer is held once, in its own spelling.
    let digits = "7".repeat(100_000);
    let id = parsed_id(format!(r#"{{"id":{digits}}}"#).as_bytes());
    assert_eq!(id.text(), digits);
    assert_eq!(id.key(), digits);
    assert_eq!(id.heap_size(), 100_000);
    // Deref gives the echo text.
    let text: &str = &id;
    assert_eq!(text.len(), 100_000);
    assert_eq!(id.to_raw_value().get(), digits);
}

#[test]
fn id_keys_of_deep_ids() {
    let deep = format!("{}0{}", "[{\"k\":".repeat(100), "}]".repeat(100));
    assert_eq!(key_of(&deep), deep);
    let value: Value = {
        let mut v = json!(0);
        for _ in 0..500 {
            v = json!([{ "k": v }]);
        }
        v
    };
    // 1000 levels: beyond serde_json's own recursion limit of 128.
    let text = format!("{}0{}", "[{\"k\":".repeat(500), "}]".repeat(500));
    assert_eq!(canonical_key(&value), text);
    let input = format!(r#"{{"id":{text}}}"#);
    assert_eq!(parsed_id(input.as_bytes()).key(), text);
}

/// `canonical_key` of the parsed value is the id's key, for ids without overflowing
/// numbers.
#[test]
fn canonical_key_matches_id_key() {
    let ids = [
        "0",
        "-0",
        "-0.0",
        "12",
        "1.0",
        "1.50",
        "1e3",
        "1E+2",
        "0.5e-3",
        "-1.0",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "true",
        "false",
        "null",
        r#""plain""#,
        r#""esc\"\\\/\b\f\n\r\t""#,
        r#""\u00e9\ud83d\ude00\u0001\u007f""#,
        "'sq\\'s'",
        "\"caf\u{e9}\"",
        "[]",
        "{}",
        r#"[1,[2,[3,{}]]]"#,
        r#"{"z":1,"a":{"y":[true,null],"b":"x"},"m":[]}"#,
        r#"{"b":1,"a":2,"\u0000":3,"\n":4,"é":5,"e":6}"#,
        r#"{"ba":1,"b":2,"a\"":3,"a":4}"#,
    ];
    for id in ids {
        let input = format!(r#"{{"execute":"x","id":{id}}}"#);
        let mut dec = JsonDecoder::default();
        let mut buf = BytesMut::from(input.as_bytes());
        let Some(Frame::Value(p)) = dec.decode(&mut buf) else {
            panic!("{id}");
        };
        let id_key = p.id.as_ref().expect("an id").key().to_owned();
        assert_eq!(canonical_key(&p.value["id"]), id_key, "{id}");
        // And the key is what serde_json writes for the value (maps are sorted here).
        assert_eq!(
            serde_json::to_string(&p.value["id"]).unwrap(),
            id_key,
            "{id}"
        );
    }
}

/// A fixed decoding workload for instruction counts, which a shared machine does not
/// disturb: `ICOUNT=str|num|noid|args|big ICOUNT_N=10000 valgrind --tool=callgrind <test
/// binary> --ignored --exact wire::json::tests::icount` (subtract a run with `ICOUNT_N=0`).
#[test]
#[ignore]
fn icount() {
    let which = std::env::var("ICOUNT").unwrap_or_default();
    let req: &[u8] = match which.as_str() {
        "args" => br#"{"execute":"device_add","arguments":{"driver":"virtio-net-pci","id":"net0","bus":"pci.0","addr":"0x5","mac":"52:54:00:12:34:56","vectors":4,"disable-legacy":true},"id":"__qmp#00002"}"#,
        "noid" => br#"{"execute":"query-status","arguments":{"a":"__qmp#00001"}}"#,
        "num" => br#"{"execute":"query-status","id":12345}"#,
        "big" => {
            let mut big = br#"{"execute":"x","arguments":{"data":""#.to_vec();
            big.resize(big.len() + (1 << 20), b'a');
            big.extend_from_slice(br#""}}"#);
            big.leak()
        }
        _ => br#"{"execute":"query-status","id":"__qmp#00001"}"#,
    };
    let n: u32 = std::env::var("ICOUNT_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let mut dec = JsonDecoder::default();
    for _ in 0..n {
        let mut buf = BytesMut::from(std::hint::black_box(req));
        std::hint::black_box(dec.decode(&mut buf));
    }
}
