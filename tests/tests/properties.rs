//! Property tests: framing does not depend on how input is split, async clients get exactly
//! one reply per request keyed by id, legacy clients get replies in request order.

use std::collections::HashMap;

use proptest::prelude::*;
use qmp_dispatcher::wire::Limits;
use qmp_tests::Holds;
use qmp_tests::fuzz_checks::{self, DecodedFrame};
use serde_json::{Map, Value, json};

/// One request of a generated sequence, sent with id `n` (its position).
#[derive(Debug, Clone)]
enum Request {
    Echo(Map<String, Value>),
    Fail,
    Unknown,
    Delay(u64),
    Hold,
    Panic,
    Forget,
    QueryVersion,
}

impl Request {
    fn to_json(&self, id: Value) -> Value {
        let (command, arguments) = match self {
            Request::Echo(arguments) => ("echo", Value::Object(arguments.clone())),
            Request::Fail => ("fail", json!({})),
            Request::Unknown => ("no-such-command", json!({})),
            Request::Delay(ms) => ("x-delay", json!({ "ms": ms })),
            Request::Hold => ("hold", json!({ "key": id.to_string() })),
            Request::Panic => ("panic", json!({})),
            Request::Forget => ("forget", json!({})),
            Request::QueryVersion => ("query-version", json!({})),
        };
        json!({"execute": command, "arguments": arguments, "id": id})
    }

    /// Checks `reply` is what this request should get.
    fn check_reply(&self, reply: &Map<String, Value>) {
        match self {
            Request::Echo(arguments) => {
                assert_eq!(reply.get("return"), Some(&Value::Object(arguments.clone())))
            }
            Request::Delay(_) => assert_eq!(reply.get("return"), Some(&json!({}))),
            Request::Hold => assert_eq!(reply.get("return"), Some(&json!({"released": true}))),
            Request::QueryVersion => assert!(reply["return"]["qemu"].is_object()),
            Request::Fail | Request::Unknown | Request::Panic | Request::Forget => {
                assert!(reply.contains_key("error"), "{reply:?}")
            }
        }
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        4 => prop::collection::btree_map("[a-z]{1,6}", scalar(), 0..4)
            .prop_map(|m| Request::Echo(m.into_iter().collect())),
        1 => Just(Request::Fail),
        1 => Just(Request::Unknown),
        2 => (0u64..50).prop_map(Request::Delay),
        1 => Just(Request::Hold),
        1 => Just(Request::Panic),
        1 => Just(Request::Forget),
        1 => Just(Request::QueryVersion),
    ]
}

/// What goes between two requests on the wire.
fn separator() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just("\n"), Just(" \r\n\t")]
}

/// The requests, each followed by a separator, after negotiating `caps`.
fn wire_bytes(caps: &[&str], requests: &[(Request, &str)]) -> Vec<u8> {
    let mut bytes =
        serde_json::to_vec(&json!({"execute": "qmp_capabilities", "arguments": {"enable": caps}}))
            .unwrap();
    for (n, (request, separator)) in requests.iter().enumerate() {
        bytes.extend(serde_json::to_vec(&request.to_json(json!(n))).unwrap());
        bytes.extend(separator.as_bytes());
    }
    bytes
}

/// Cuts `bytes` at the given positions (taken modulo the length).
fn split_at<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        chunks.push(&bytes[from..cut]);
        from = cut;
    }
    chunks
}

/// Serves one client of a fresh fuzz server the given chunks; returns its replies.
fn serve(chunks: &[&[u8]]) -> Vec<Map<String, Value>> {
    fuzz_checks::install_panic_filter();
    let holds = Holds::default();
    let server = fuzz_checks::fuzz_server(&holds);
    let output = fuzz_checks::serve_chunks(&server, &holds, chunks);
    fuzz_checks::session_replies(&output)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_decoder_frames_any_split_the_same(
        requests in prop::collection::vec((request(), separator()), 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..24),
    ) {
        let bytes = wire_bytes(&["async"], &requests);
        let whole = fuzz_checks::decode_chunks(Limits::default(), &[&bytes]);
        let split = fuzz_checks::decode_chunks(Limits::default(), &split_at(&bytes, &cuts));
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(whole.len(), requests.len() + 1);
        for (n, (frame, (request, _))) in whole[1..].iter().zip(&requests).enumerate() {
            let DecodedFrame::Value(value, id) = frame else {
                panic!("not a value: {frame:?}");
            };
            prop_assert_eq!(value, &request.to_json(json!(n)));
            prop_assert_eq!(id.clone(), Some(n.to_string()));
        }
    }

    #[test]
    fn a_legacy_session_replies_the_same_whatever_the_split(
        requests in prop::collection::vec((request(), separator()), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let bytes = wire_bytes(&[], &requests);
        prop_assert_eq!(serve(&[&bytes]), serve(&split_at(&bytes, &cuts)));
    }

    #[test]
    fn a_legacy_client_gets_its_replies_in_request_order(
        requests in prop::collection::vec((request(), separator()), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let bytes = wire_bytes(&[], &requests);
        let replies = serve(&split_at(&bytes, &cuts));
        prop_assert_eq!(replies.len(), requests.len() + 1);
        prop_assert_eq!(Value::Object(replies[0].clone()), json!({"return": {}}));
        for (n, (reply, (request, _))) in replies[1..].iter().zip(&requests).enumerate() {
            prop_assert_eq!(reply.get("id"), Some(&json!(n)), "out of order: {:?}", replies);
            request.check_reply(reply);
        }
    }

    #[test]
    fn an_async_client_gets_exactly_one_reply_per_request_by_id(
        requests in prop::collection::vec((request(), separator()), 0..16),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let bytes = wire_bytes(&["async"], &requests);
        let replies = serve(&split_at(&bytes, &cuts));
        prop_assert_eq!(Value::Object(replies[0].clone()), json!({"return": {}}));
        let mut by_id: HashMap<u64, Map<String, Value>> = HashMap::new();
        for reply in &replies[1..] {
            let id = reply.get("id").and_then(Value::as_u64).expect("a reply with a numeric id");
            prop_assert!(by_id.insert(id, reply.clone()).is_none(), "two replies for id {}", id);
        }
        prop_assert_eq!(by_id.len(), requests.len());
        for (n, (request, _)) in requests.iter().enumerate() {
            request.check_reply(&by_id[&(n as u64)]);
        }
    }
}
