//! Serving over TCP and over any byte stream, not only Unix sockets.

use qmp_dispatcher::{ByteStream, Registry, Server};
use qmp_tests::{Holds, test_commands};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn server() -> Server {
    let mut registry = Registry::builder();
    test_commands(&mut registry, &Holds::default());
    Server::builder(registry.build()).build()
}

async fn talk<S>(stream: S) -> Vec<Value>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (reader, mut writer) = tokio::io::split(stream);
    let mut lines = BufReader::new(reader).lines();
    writer
        .write_all(br#"{"execute":"qmp_capabilities","arguments":{"enable":["async"]}}{"execute":"x-delay","arguments":{"ms":50},"id":1}{"execute":"echo","arguments":{"a":1},"id":2}"#)
        .await
        .unwrap();
    let mut messages = Vec::new();
    for _ in 0..4 {
        let line = lines.next_line().await.unwrap().expect("a line");
        messages.push(serde_json::from_str(&line).unwrap());
    }
    messages
}

fn assert_session(messages: &[Value]) {
    assert!(messages[0].get("QMP").is_some());
    assert_eq!(messages[1], json!({"return": {}}));
    // The async client's quick echo overtakes the delay.
    assert_eq!(messages[2], json!({"return": {"a": 1}, "id": 2}));
    assert_eq!(messages[3], json!({"return": {}, "id": 1}));
}

#[tokio::test]
async fn serves_tcp_clients() {
    let server = server();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accept = server.clone();
    tokio::spawn(async move { accept.serve_tcp(listener).await });
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    assert_session(&talk(stream).await);
    server.shutdown();
    server.wait().await;
}

// In memory end to end (a duplex pipe, no socket), so paused time is sound: the 50 ms
// `x-delay` fires as soon as the runtime is idle, with no real wait.
#[tokio::test(start_paused = true)]
async fn serves_any_byte_stream() {
    let server = server();
    let (client, server_side) = tokio::io::duplex(4096);
    let serving = server.clone();
    let task = tokio::spawn(async move { serving.serve_connection(ByteStream(server_side)).await });
    assert_session(&talk(client).await);
    server.shutdown();
    task.await.unwrap();
}

#[test]
fn qmp_return_can_move_to_any_thread() {
    fn assert_send_static<T: Send + 'static>() {}
    assert_send_static::<qmp_dispatcher::QmpReturn>();
}
