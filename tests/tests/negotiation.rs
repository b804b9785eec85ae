//! Greeting and capability negotiation, as QEMU does them, plus the async capability.

use qmp_dispatcher::VersionInfo;
use qmp_tests::{TestServer, error_reply};
use serde_json::json;

#[tokio::test]
async fn greeting_offers_oob_and_async_with_the_embedders_version() {
    let server = TestServer::start_with(|b| b.version(VersionInfo::new(9, 2, 1, "demo-1"))).await;
    let mut client = server.connect().await;
    let greeting = client.greeting().await;
    assert_eq!(
        greeting,
        json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 1}, "package": "demo-1"},
                       "capabilities": ["oob", "async"]}})
    );
    // Nothing else is sent before the client speaks.
    client.expect_silence(100).await;
}

#[tokio::test]
async fn only_qmp_capabilities_works_before_negotiation() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    client.greeting().await;
    for (request, id) in [
        (json!({"execute": "query-version", "id": 1}), json!(1)),
        (json!({"execute": "no-such-cmd", "id": "u"}), json!("u")),
        (
            json!({"execute": "query-version", "id": "x", "arguments": {"bad": 1}}),
            json!("x"),
        ),
        (json!({"execute": "disabled-cmd", "id": 2}), json!(2)),
    ] {
        client.send_json(&request).await;
        assert_eq!(
            client.recv().await,
            error_reply(
                Some(id),
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
    }
    // Envelope errors keep their own text.
    client.send(br#"{"execute":"query-version","foo":1}"#).await;
    assert_eq!(
        client.recv().await,
        error_reply(None, "GenericError", "QMP input member 'foo' is unexpected")
    );
    client.send(br#"{"exec-oob":"query-version"}"#).await;
    assert_eq!(
        client.recv().await,
        error_reply(
            None,
            "GenericError",
            "QMP input member 'exec-oob' is unexpected"
        )
    );
}

#[tokio::test]
async fn negotiation_errors_leave_the_client_negotiating() {
    let server = TestServer::start_with(|b| b.offer_oob(false)).await;
    let mut client = server.connect().await;
    client.greeting().await;
    for (arguments, desc) in [
        (
            json!({"enable": ["bogus"]}),
            "Parameter 'null' does not accept value 'bogus'",
        ),
        (
            json!({"enable": ["oob", "bogus", "x"]}),
            "Parameter 'null' does not accept value 'bogus'",
        ),
        (
            json!({"enable": "oob"}),
            "Invalid parameter type for 'enable', expected: array",
        ),
        (
            json!({"enable": null}),
            "Invalid parameter type for 'enable', expected: array",
        ),
        (
            json!({"enable": [1]}),
            "Invalid parameter type for 'enable[0]', expected: string",
        ),
        (json!({"foo": 1}), "Parameter 'foo' is unexpected"),
        (json!({"enable": ["oob"]}), "Capability oob not available"),
    ] {
        client
            .send_json(&json!({"execute": "qmp_capabilities", "arguments": arguments, "id": 7}))
            .await;
        assert_eq!(
            client.recv().await,
            error_reply(Some(json!(7)), "GenericError", desc),
            "{arguments}"
        );
    }
    client
        .send_json(&json!({"execute": "query-version", "id": 8}))
        .await;
    assert_eq!(client.recv().await["error"]["class"], "CommandNotFound");
    client.negotiate(&["async"]).await;
}

#[tokio::test]
async fn negotiating_twice_is_command_not_found() {
    let server = TestServer::start().await;
    let mut client = server.negotiated(&[]).await;
    for arguments in [json!({}), json!({"enable": ["oob"]})] {
        client
            .send_json(&json!({"execute": "qmp_capabilities", "arguments": arguments, "id": 1}))
            .await;
        assert_eq!(
            client.recv().await,
            error_reply(
                Some(json!(1)),
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )
        );
    }
}

#[tokio::test]
async fn negotiation_accepts_every_form_real_clients_send() {
    let server = TestServer::start().await;
    for request in [
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "qmp_capabilities", "arguments": {}}),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": []}}),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["async"]}}),
        json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "async"]}}),
    ] {
        let mut client = server.connect().await;
        client.greeting().await;
        client.send_json(&request).await;
        assert_eq!(client.recv().await, json!({"return": {}}), "{request}");
    }
    let mut client = server.connect().await;
    client.greeting().await;
    client
        .send(br#"{"execute":"qmp_capabilities","id":"__qmp#00000"}"#)
        .await;
    assert_eq!(
        client.recv().await,
        json!({"return": {}, "id": "__qmp#00000"})
    );
}

#[tokio::test]
async fn capabilities_reset_on_reconnect() {
    let server = TestServer::start().await;
    let mut first = server.negotiated(&["oob", "async"]).await;
    first.send(br#"{"exec-oob":"oob-echo","id":1}"#).await;
    assert_eq!(first.recv().await, json!({"return": {}, "id": 1}));
    drop(first);
    let mut second = server.negotiated(&[]).await;
    second.send(br#"{"exec-oob":"oob-echo","id":1}"#).await;
    assert_eq!(
        second.recv().await,
        error_reply(
            Some(json!(1)),
            "GenericError",
            "QMP input member 'exec-oob' is unexpected"
        )
    );
}

#[tokio::test]
async fn builtins_query_version_and_query_commands() {
    let server = TestServer::start_with(|b| b.version(VersionInfo::new(1, 2, 3, "p"))).await;
    let mut client = server.negotiated(&[]).await;
    client.execute("query-version", json!({}), json!("v")).await;
    assert_eq!(
        client.recv().await,
        json!({"return": {"qemu": {"major": 1, "minor": 2, "micro": 3}, "package": "p"}, "id": "v"})
    );
    client
        .execute("query-commands", json!({}), json!("c"))
        .await;
    let reply = client.recv().await;
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-async-commands",
        "async-command-cancel",
        "echo",
        "hold",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(
        !names.contains(&"disabled-cmd"),
        "disabled commands are not listed"
    );
}
