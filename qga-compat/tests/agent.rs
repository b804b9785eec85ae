//! The agent's own behaviour beyond the transcripts: parser state across clients, filters
//! switched at run time, silent successes, deferred handlers, and serial ports on a pty.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Scratch, TIMEOUT, qga72_builder, read_line};
use qmp_dispatcher::{Command, NoArgs, QmpReturn, Transport};
use qmp_qga::{GuestAgent, ParserState, SerialPort};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// A raw client: bytes out, lines in.
struct Client<R, W> {
    reader: R,
    writer: W,
    pending: Vec<u8>,
}

impl Client<tokio::net::unix::OwnedReadHalf, tokio::net::unix::OwnedWriteHalf> {
    async fn connect(path: &Path) -> Self {
        let (reader, writer) = UnixStream::connect(path).await.unwrap().into_split();
        Client {
            reader,
            writer,
            pending: Vec::new(),
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Client<R, W> {
    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    async fn line(&mut self) -> Vec<u8> {
        read_line(&mut self.reader, &mut self.pending, TIMEOUT)
            .await
            .expect("a reply line")
    }

    async fn recv(&mut self) -> Value {
        let line = self.line().await;
        assert!(line.ends_with(b"\n") && !line.ends_with(b"\r\n"));
        serde_json::from_slice(&line).unwrap()
    }

    async fn expect_silence(&mut self, ms: u64) {
        let line = read_line(
            &mut self.reader,
            &mut self.pending,
            Duration::from_millis(ms),
        )
        .await;
        assert_eq!(line.map(|l| String::from_utf8_lossy(&l).into_owned()), None);
    }

    /// The host side of qemu-ga's handshake: 0xFF + guest-sync-delimited, then skip to the
    /// sentinel and read the line after it.
    async fn sync_delimited(&mut self, id: i64) {
        let mut request = vec![0xFF];
        request.extend_from_slice(
            format!(r#"{{"execute":"guest-sync-delimited","arguments":{{"id":{id}}}}}"#).as_bytes(),
        );
        self.send(request).await;
        loop {
            let line = self.line().await;
            if let Some(at) = line.iter().position(|&b| b == 0xFF) {
                let reply: Value = serde_json::from_slice(&line[at + 1..]).unwrap();
                if reply == json!({ "return": id }) {
                    return;
                }
            }
        }
    }
}

fn serve_unix(agent: &GuestAgent, scratch: &Scratch) -> std::path::PathBuf {
    let path = scratch.path("qga.sock");
    let listener = qmp_dispatcher::bind_unix(&path, 0o600).unwrap();
    let agent = agent.clone();
    tokio::spawn(async move { agent.serve_unix(listener).await });
    path
}

fn error(id: Option<Value>, class: &str, desc: &str) -> Value {
    let mut reply = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

#[tokio::test]
async fn parser_state_survives_reconnects() {
    let agent = qga72_builder().build().unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);

    // qemu-ga case 22: a request cut short by one client is finished by the next.
    let mut c1 = Client::connect(&path).await;
    c1.send(r#"{"execute":"guest-sync","arguments":{"id":3}"#)
        .await;
    drop(c1);
    let mut c2 = Client::connect(&path).await;
    c2.send("}").await;
    assert_eq!(c2.recv().await, json!({"return": 3}));

    // A stale half object swallows the next client's request...
    c2.send(r#"{"execute":"guest-ping","#).await;
    drop(c2);
    let mut c3 = Client::connect(&path).await;
    c3.send(r#"{"execute":"guest-sync","arguments":{"id":4}}"#)
        .await;
    c3.expect_silence(200).await;
    // ...until the host's 0xFF flushes it: one error for the 0xFF, then the sentinel reply.
    c3.sync_delimited(5).await;
    c3.send(r#"{"execute":"guest-ping","id":"ok"}"#).await;
    assert_eq!(c3.recv().await, json!({"return": {}, "id": "ok"}));
    agent.server().shutdown();
}

#[tokio::test]
async fn reset_on_connect_drops_half_read_requests() {
    let agent = qga72_builder()
        .parser_state(ParserState::ResetOnConnect)
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut c1 = Client::connect(&path).await;
    c1.send(r#"{"execute":"guest-sync","arguments":{"id":3}"#)
        .await;
    drop(c1);
    let mut c2 = Client::connect(&path).await;
    c2.send("}").await;
    assert_eq!(
        c2.recv().await,
        error(None, "GenericError", "JSON parse error, expecting value")
    );
    c2.send(r#"{"execute":"guest-sync","arguments":{"id":6}}"#)
        .await;
    assert_eq!(c2.recv().await, json!({"return": 6}));
    agent.server().shutdown();
}

/// A deferred `hold` command whose reply the test sends.
fn hold_command(parked: Arc<Mutex<Option<QmpReturn>>>) -> Command {
    Command::deferred("hold", move |_: NoArgs, _, ret: QmpReturn| {
        *parked.lock().unwrap() = Some(ret);
    })
}

async fn wait_parked(parked: &Arc<Mutex<Option<QmpReturn>>>) -> QmpReturn {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(ret) = parked.lock().unwrap().take() {
                return ret;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("hold was called")
}

#[tokio::test]
async fn deferred_handlers_keep_the_agent_sequential() {
    let parked = Arc::new(Mutex::new(None));
    let agent = GuestAgent::builder()
        .command(hold_command(Arc::clone(&parked)))
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut client = Client::connect(&path).await;
    client
        .send(r#"{"execute":"hold","id":1}{"execute":"guest-ping","id":2}"#)
        .await;
    let ret = wait_parked(&parked).await;
    // Nothing after a request is processed until its reply is written.
    client.expect_silence(150).await;
    ret.ok(&json!("done"));
    assert_eq!(client.recv().await, json!({"return": "done", "id": 1}));
    assert_eq!(client.recv().await, json!({"return": {}, "id": 2}));
    agent.server().shutdown();
}

#[tokio::test]
async fn a_reply_to_a_departed_client_is_not_given_to_the_next() {
    let parked = Arc::new(Mutex::new(None));
    let agent = GuestAgent::builder()
        .command(hold_command(Arc::clone(&parked)))
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut c1 = Client::connect(&path).await;
    c1.send(r#"{"execute":"hold","id":"old"}"#).await;
    let ret = wait_parked(&parked).await;
    drop(c1);
    // The next client waits in the backlog while the command runs.
    let mut c2 = Client::connect(&path).await;
    c2.send(r#"{"execute":"guest-ping","id":"new"}"#).await;
    c2.expect_silence(100).await;
    ret.ok(&json!("late"));
    assert_eq!(c2.recv().await, json!({"return": {}, "id": "new"}));
    c2.expect_silence(100).await;
    agent.server().shutdown();
}

#[tokio::test]
async fn silent_success_sends_nothing_but_errors_are_answered() {
    let agent = GuestAgent::builder()
        .command(Command::sync("guest-shutdown", |_: NoArgs, _| Ok(())).no_success_response())
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut client = Client::connect(&path).await;
    client
        .send(r#"{"execute":"guest-shutdown","id":1}{"execute":"guest-ping","id":2}"#)
        .await;
    assert_eq!(client.recv().await, json!({"return": {}, "id": 2}));
    client
        .send(r#"{"execute":"guest-shutdown","arguments":{"mode":"x"},"id":3}"#)
        .await;
    assert_eq!(
        client.recv().await,
        error(
            Some(json!(3)),
            "GenericError",
            "Parameter 'mode' is unexpected"
        )
    );
    agent.server().shutdown();
}

async fn enabled_flags(
    client: &mut Client<impl AsyncRead + Unpin, impl AsyncWrite + Unpin>,
) -> Vec<(String, bool)> {
    client.send(r#"{"execute":"guest-info"}"#).await;
    let info = client.recv().await;
    info["return"]["supported_commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["enabled"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn frozen_state_switches_on_and_off() {
    let agent = qga72_builder().block(["guest-get-osinfo"]).build().unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut client = Client::connect(&path).await;

    agent.set_frozen(true);
    assert!(agent.is_frozen());
    client.send(r#"{"execute":"guest-get-time","id":1}"#).await;
    assert_eq!(
        client.recv().await,
        error(
            Some(json!(1)),
            "CommandNotFound",
            "Command guest-get-time has been disabled: the agent is in frozen state"
        )
    );
    // Blocked and frozen: no reason, as in 7.2.
    client
        .send(r#"{"execute":"guest-get-osinfo","id":2}"#)
        .await;
    assert_eq!(
        client.recv().await,
        error(
            Some(json!(2)),
            "CommandNotFound",
            "Command guest-get-osinfo has been disabled"
        )
    );
    client
        .send(r#"{"execute":"guest-fsfreeze-status","id":3}"#)
        .await;
    assert_eq!(client.recv().await, json!({"return": "thawed", "id": 3}));
    let enabled: Vec<String> = enabled_flags(&mut client)
        .await
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        enabled,
        [
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-status",
            "guest-info",
            "guest-ping",
            "guest-sync",
            "guest-sync-delimited"
        ]
    );

    agent.set_frozen(false);
    client.send(r#"{"execute":"guest-get-time","id":4}"#).await;
    assert_eq!(
        client.recv().await,
        json!({"return": common::STUB_TIME, "id": 4})
    );
    let flags = enabled_flags(&mut client).await;
    let disabled: Vec<&str> = flags
        .iter()
        .filter(|(_, on)| !on)
        .map(|(name, _)| name.as_str())
        .collect();
    // Still blocked, and still unsupported on this "platform".
    assert_eq!(disabled, ["guest-get-devices", "guest-get-osinfo"]);
    agent.server().shutdown();
}

#[tokio::test]
async fn allow_list_disables_everything_else() {
    let agent = qga72_builder()
        .allow([
            "guest-sync-delimited",
            "guest-sync",
            "guest-ping",
            "guest-get-time",
        ])
        .block(["guest-get-time"])
        .build()
        .unwrap();
    let scratch = Scratch::new();
    let path = serve_unix(&agent, &scratch);
    let mut client = Client::connect(&path).await;
    client.send(r#"{"execute":"guest-ping"}"#).await;
    assert_eq!(client.recv().await, json!({"return": {}}));
    client.send(r#"{"execute":"guest-info"}"#).await;
    assert_eq!(
        client.recv().await,
        error(
            None,
            "CommandNotFound",
            "Command guest-info has been disabled: the command is not allowed"
        )
    );
    client.send(r#"{"execute":"guest-get-time"}"#).await;
    assert_eq!(
        client.recv().await,
        error(
            None,
            "CommandNotFound",
            "Command guest-get-time has been disabled"
        )
    );
    agent.server().shutdown();
}

/// A pty pair in raw mode: the master's file and the slave's path.
fn raw_pty() -> (std::fs::File, std::path::PathBuf) {
    use nix::sys::termios;
    use std::os::fd::AsRawFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut attrs = termios::tcgetattr(&pty.slave).unwrap();
    // No echo and no line editing, so the bytes pass unchanged both ways.
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &attrs).unwrap();
    let slave_path =
        std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    (std::fs::File::from(pty.master), slave_path)
}

fn host(port: SerialPort) -> Client<impl AsyncRead + Unpin, impl AsyncWrite + Unpin> {
    let (reader, writer) = port.split();
    Client {
        reader,
        writer,
        pending: Vec::new(),
    }
}

#[tokio::test]
async fn serial_port_survives_host_hang_up_and_reconnect() {
    // The agent holds the master, as a guest holds its end of a virtio-serial port; the
    // host opens the slave path, hangs up and comes back, with no connect or accept.
    let (master, slave_path) = raw_pty();
    let agent = qga72_builder().build().unwrap();
    let serving = agent.clone();
    let port = SerialPort::from_file(master).unwrap();
    tokio::spawn(async move { serving.serve_stream(port).await });

    let mut first = host(SerialPort::open(&slave_path).unwrap());
    first.sync_delimited(11).await;
    // Leave half a request behind, then hang up.
    first
        .send(r#"{"execute":"guest-sync","arguments":{"id":12}"#)
        .await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(250)).await;

    // The agent kept reading (EIO/EOF: wait 100 ms, read again) and kept its parser.
    let mut second = host(SerialPort::open(&slave_path).unwrap());
    second.send("}").await;
    assert_eq!(second.recv().await, json!({"return": 12}));
    second.sync_delimited(13).await;
    second
        .send(r#"{"execute":"guest-ping","id":"after"}"#)
        .await;
    assert_eq!(second.recv().await, json!({"return": {}, "id": "after"}));
    agent.server().shutdown();
}

#[tokio::test]
async fn serve_serial_opens_a_tty_path() {
    // The agent opens the slave path (qemu-ga's isa-serial); the host holds the master.
    let (master, slave_path) = raw_pty();
    let agent = GuestAgent::builder().build().unwrap();
    let serving = agent.clone();
    tokio::spawn(async move { serving.serve_serial(&slave_path).await });
    // The agent flushes pending input when it opens the port: let it open first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut host = host(SerialPort::from_file(master).unwrap());
    host.send(b"\xff").await;
    assert_eq!(
        host.recv().await,
        error(None, "GenericError", "JSON parse error, stray '\u{FFFD}'")
    );
    host.sync_delimited(21).await;
    agent.server().shutdown();
}
