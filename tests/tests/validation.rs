//! Request validation in QEMU's order with QEMU's texts, and handler outcomes.

use qmp_tests::{TestServer, error_reply, return_reply};
use serde_json::json;

#[tokio::test]
async fn envelope_and_lookup_errors() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["oob"]).await;
    let cases: Vec<(&[u8], serde_json::Value)> = vec![
        (
            b"[1,2]",
            error_reply(None, "GenericError", "QMP input must be a JSON object"),
        ),
        (
            b"\"str\"\n",
            error_reply(None, "GenericError", "QMP input must be a JSON object"),
        ),
        (
            br#"{"id":4}"#,
            error_reply(
                Some(json!(4)),
                "GenericError",
                "QMP input lacks member 'execute'",
            ),
        ),
        (
            br#"{}"#,
            error_reply(None, "GenericError", "QMP input lacks member 'execute'"),
        ),
        (
            br#"{"execute":true,"id":1}"#,
            error_reply(
                Some(json!(1)),
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
        ),
        (
            br#"{"execute":"echo","arguments":[],"id":2}"#,
            error_reply(
                Some(json!(2)),
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            br#"{"execute":"no-such","arguments":1,"id":3}"#,
            error_reply(
                Some(json!(3)),
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            br#"{"execute":"echo","bogus":1,"id":5}"#,
            error_reply(
                Some(json!(5)),
                "GenericError",
                "QMP input member 'bogus' is unexpected",
            ),
        ),
        (
            br#"{"execute":"echo","ID":5}"#,
            error_reply(None, "GenericError", "QMP input member 'ID' is unexpected"),
        ),
        (
            br#"{"execute":"Echo","id":6}"#,
            error_reply(
                Some(json!(6)),
                "CommandNotFound",
                "The command Echo has not been found",
            ),
        ),
        (
            br#"{"execute":"","id":6}"#,
            error_reply(
                Some(json!(6)),
                "CommandNotFound",
                "The command  has not been found",
            ),
        ),
        (
            br#"{"execute":"disabled-cmd","id":7}"#,
            error_reply(
                Some(json!(7)),
                "CommandNotFound",
                "Command disabled-cmd has been disabled: for testing",
            ),
        ),
        (
            br#"{"exec-oob":"echo","id":8}"#,
            error_reply(
                Some(json!(8)),
                "GenericError",
                "The command echo does not support OOB",
            ),
        ),
        (
            br#"{"exec-oob":"echo","execute":"echo","id":9}"#,
            error_reply(
                Some(json!(9)),
                "GenericError",
                "QMP input member 'execute' clashes with 'exec-oob'",
            ),
        ),
        (
            br#"{"execute":"fail","id":10}"#,
            error_reply(Some(json!(10)), "DeviceNotFound", "Device 'nope' not found"),
        ),
        (
            br#"{"execute":"fail","arguments":{"x":1},"id":11}"#,
            error_reply(
                Some(json!(11)),
                "GenericError",
                "Parameter 'x' is unexpected",
            ),
        ),
        (
            br#"{"execute":"hold","arguments":{},"id":12}"#,
            error_reply(
                Some(json!(12)),
                "GenericError",
                "Parameter 'key' is missing",
            ),
        ),
        (
            br#"{"execute":"hold","arguments":{"key":1},"id":13}"#,
            error_reply(
                Some(json!(13)),
                "GenericError",
                "Invalid parameter type for 'key', expected: string",
            ),
        ),
        (
            br#"{"execute":"x-delay","arguments":{"ms":"x"},"id":14}"#,
            error_reply(
                Some(json!(14)),
                "GenericError",
                "Invalid parameter type for 'ms', expected: integer",
            ),
        ),
    ];
    for (input, expected) in cases {
        client.send(input).await;
        assert_eq!(
            client.recv().await,
            expected,
            "input {}",
            String::from_utf8_lossy(input)
        );
    }
}

#[tokio::test]
async fn ids_of_every_type_are_echoed_verbatim() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    for id in [
        r#""s""#,
        "1",
        "1.0",
        "-0",
        "1e3",
        "18446744073709551616",
        "null",
        "false",
        "[]",
        "{}",
        r#"{"b":1,"a":[1,null]}"#,
    ] {
        client
            .send(format!(r#"{{"execute":"echo","id":{id}}}"#))
            .await;
        let line = client.recv_line().await;
        let expected = format!("{{\"return\": {{}}, \"id\": {id}}}\r\n");
        assert_eq!(String::from_utf8(line).unwrap(), expected);
    }
    // Escapes inside strings are normalised; the id is the same JSON value.
    for (sent, echoed) in [
        (r#""\u00e9""#, "\"é\""),
        (r#"'single'"#, r#""single""#),
        (r#""a\/b""#, r#""a/b""#),
    ] {
        client
            .send(format!(r#"{{"execute":"echo","id":{sent}}}"#))
            .await;
        let line = client.recv_line().await;
        assert_eq!(
            String::from_utf8(line).unwrap(),
            format!("{{\"return\": {{}}, \"id\": {echoed}}}\r\n")
        );
    }
}

#[tokio::test]
async fn a_panicking_handler_becomes_an_error_and_the_server_carries_on() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&["async"]).await;
    let mut other = server.negotiated(&[]).await;
    client.execute("panic", json!({}), json!("p")).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("p")),
            "GenericError",
            "Command panic failed: its handler panicked"
        )
    );
    client.execute("async-panic", json!({}), json!("ap")).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("ap")),
            "GenericError",
            "Command async-panic failed: its handler panicked"
        )
    );
    client
        .execute("echo", json!({"a": 1}), json!("after"))
        .await;
    assert_eq!(
        client.recv().await,
        return_reply(json!({"a": 1}), json!("after"))
    );
    other.execute("echo", json!({}), json!(1)).await;
    assert_eq!(other.recv().await, return_reply(json!({}), json!(1)));
    server
        .wait_stats("no leaked returns", |s| {
            s.in_flight == 0 && s.live_returns == 0
        })
        .await;
}

#[tokio::test]
async fn a_dropped_qmp_return_still_answers() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client.execute("forget", json!({}), json!("f")).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("f")),
            "GenericError",
            "Command forget completed without a reply"
        )
    );
    // A parked return dropped later answers too.
    client
        .execute("hold", json!({"key": "k"}), json!("h"))
        .await;
    server.holds.wait_parked("k").await;
    drop(server.holds.take("k"));
    assert_eq!(
        client.recv().await,
        error_reply(
            Some(json!("h")),
            "GenericError",
            "Command hold completed without a reply"
        )
    );
}

#[tokio::test]
async fn replies_can_come_from_another_thread() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client.execute("hold", json!({"key": "t"}), json!(1)).await;
    server.holds.wait_parked("t").await;
    let ret = server.holds.take("t");
    std::thread::spawn(move || ret.ok(&json!({"from": "thread"})))
        .join()
        .unwrap();
    assert_eq!(
        client.recv().await,
        return_reply(json!({"from": "thread"}), json!(1))
    );
}

#[tokio::test]
async fn requests_may_be_split_concatenated_and_unterminated() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .send(br#"{"execute":"echo","id":1}{"execute":"echo","id":2}  {"execute""#)
        .await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!(1)));
    assert_eq!(client.recv().await, return_reply(json!({}), json!(2)));
    client.send(br#":"echo","id":3}"#).await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!(3)));
    for byte in br#"{"execute":"echo","arguments":{"s":"a\"}b"},"id":4}"# {
        client.send([*byte]).await;
    }
    assert_eq!(
        client.recv().await,
        return_reply(json!({"s": "a\"}b"}), json!(4))
    );
    // Whitespace alone gets no reply.
    client.send(b"\r\n \n\t\n").await;
    client.expect_silence(100).await;
}

#[tokio::test]
async fn a_parse_error_is_answered_without_id_and_the_stream_recovers() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .send(b"{\"execute\": }\n{\"execute\":\"echo\",\"id\":1}")
        .await;
    assert_eq!(client.recv().await["error"]["class"], "GenericError");
    assert_eq!(client.recv().await, return_reply(json!({}), json!(1)));
}

#[tokio::test]
async fn a_request_followed_by_half_close_is_answered() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    client
        .send(br#"{"execute":"x-delay","arguments":{"ms":50},"id":1}{"execute":"echo","id":2}"#)
        .await;
    client.shutdown_write().await;
    assert_eq!(client.recv().await, return_reply(json!({}), json!(1)));
    assert_eq!(client.recv().await, return_reply(json!({}), json!(2)));
    client.expect_eof().await;
}
