//! Micro-benchmarks of the dispatcher's streaming JSON decoder
//! (`qmp_dispatcher::wire::JsonDecoder`), with `serde_json` on the same input for scale.
//!
//! Run with `cargo bench -p qmp-benches --bench codec`.
//!
//! - `many_small`: 1,000 small requests in one buffer, split and decoded in one pass: the
//!   common case of a busy pipelining client; `many_small/split_requests` decodes them as
//!   the server's codec does, split into their members without building each object.
//! - `one_big`: one ~1 MiB request (an argument array of 10,000 objects).
//! - `byte_split`: 100 small requests fed one byte at a time, the worst split a socket can
//!   produce; the decoder keeps its state between calls, so this should stay linear.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_main};
use qmp_dispatcher::wire::{Frame, JsonDecoder, Limits};
use serde_json::Value;

/// `count` requests of the shapes a monitor sees most, one per line.
fn small_requests(count: usize) -> Vec<u8> {
    let mut input = Vec::new();
    for id in 0..count {
        let request = match id % 3 {
            0 => format!(r#"{{"execute": "query-status", "id": {id}}}"#),
            1 => format!(r#"{{"execute": "x-delay", "arguments": {{"ms": 10}}, "id": {id}}}"#),
            _ => format!(
                r#"{{"execute": "screendump", "arguments": {{"filename": "/tmp/shot-{id}.ppm", "format": "ppm"}}, "id": "req-{id}"}}"#
            ),
        };
        input.extend_from_slice(request.as_bytes());
        input.extend_from_slice(b"\r\n");
    }
    input
}

/// One request whose arguments hold `items` objects: about 100 bytes each.
fn big_request(items: usize) -> Vec<u8> {
    let mut input = br#"{"execute": "x-bulk", "arguments": {"items": ["#.to_vec();
    for index in 0..items {
        if index > 0 {
            input.push(b',');
        }
        input.extend_from_slice(
            format!(
                r#"{{"node-name": "node{index}", "size": {}, "ratio": 0.{index}, "flags": [true, false, null], "tag": "a\"b"}}"#,
                index * 4096
            )
            .as_bytes(),
        );
    }
    input.extend_from_slice(br#"]}, "id": 1}"#);
    input
}

/// Feeds `input` to a fresh decoder in `chunk`-byte pieces; returns the number of values.
fn decode_chunked(input: &[u8], chunk: usize) -> usize {
    decode_with(JsonDecoder::new(Limits::default()), input, chunk)
}

fn decode_with(mut decoder: JsonDecoder, input: &[u8], chunk: usize) -> usize {
    let mut buf = BytesMut::with_capacity(input.len().min(64 * 1024));
    let mut values = 0;
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = decoder.decode(&mut buf) {
            match frame {
                Frame::Value(value) => {
                    black_box(value);
                    values += 1;
                }
                Frame::Request(request) => {
                    black_box(request);
                    values += 1;
                }
                Frame::Error(error) => panic!("benchmark input rejected: {error}"),
            }
        }
    }
    values
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");

    let small = small_requests(1000);
    group.throughput(Throughput::Bytes(small.len() as u64));
    group.bench_function("many_small/JsonDecoder", |b| {
        b.iter(|| assert_eq!(decode_chunked(black_box(&small), small.len()), 1000));
    });
    group.bench_function("many_small/split_requests", |b| {
        b.iter(|| {
            let decoder = JsonDecoder::new(Limits::default()).split_requests();
            assert_eq!(decode_with(decoder, black_box(&small), small.len()), 1000)
        });
    });
    group.bench_function("many_small/serde_json_lines", |b| {
        b.iter(|| {
            for line in black_box(&small).split(|&byte| byte == b'\n') {
                if line.len() > 1 {
                    black_box(serde_json::from_slice::<Value>(line).unwrap());
                }
            }
        });
    });

    let big = big_request(10_000);
    group.throughput(Throughput::Bytes(big.len() as u64));
    group.bench_function("one_big/JsonDecoder", |b| {
        b.iter(|| assert_eq!(decode_chunked(black_box(&big), 64 * 1024), 1));
    });
    group.bench_function("one_big/serde_json", |b| {
        b.iter(|| black_box(serde_json::from_slice::<Value>(black_box(&big)).unwrap()));
    });

    let split = small_requests(100);
    group.throughput(Throughput::Bytes(split.len() as u64));
    group.bench_function("byte_split/JsonDecoder", |b| {
        b.iter(|| assert_eq!(decode_chunked(black_box(&split), 1), 100));
    });
    group.finish();
}

/// The benchmark group that `criterion_main!` runs.
mod group {
    #![allow(missing_docs)] // criterion_group! defines an undocumented `pub fn`.
    criterion::criterion_group!(benches, super::codec);
}
criterion_main!(group::benches);
