//! The check behind the `fd_session` fuzz target: random input frames mixed with random fd
//! arrivals on a real Unix socket, and no fd may outlive the server.
//!
//! The first input byte seeds both the split into `sendmsg`s and how many fds (0 to 3 pipe
//! write ends) each one carries. The server has the fd built-ins and a command that takes a
//! named fd, so the fuzzer reaches `getfd`, `add-fd`, `closefd`, `remove-fd`, takes, refusals
//! and disconnects with fds pending.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use qmp_dispatcher::wire::Limits;
use qmp_dispatcher::{Command, Context, FdLimits, Registry, Server};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use crate::fuzz_checks::{Splits, decode_chunks, session_replies};

/// Real time this time: the commands here never wait, so a session that takes this long hung.
const HANG_AFTER: Duration = Duration::from_secs(20);

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FdName {
    fdname: String,
}

/// The fd built-ins, and `x-take` (takes a named fd and drops it).
fn server() -> Server {
    let mut registry = Registry::builder();
    registry
        .fd_commands()
        .expect("fd built-ins")
        .add(Command::sync("x-take", |args: FdName, cx: &Context<()>| {
            cx.take_fd(&args.fdname).map(drop)
        }))
        .expect("x-take");
    Server::builder(registry.build())
        .limits(Limits {
            max_nesting: 32,
            max_tokens: 1024,
            max_bytes: 4096,
        })
        .fd_limits(
            FdLimits::default()
                .per_message(2)
                .pending_per_connection(6)
                .named_per_connection(4)
                .fdsets_per_server(3)
                .fdset_fds_per_server(5),
        )
        .build()
}

/// True once every copy of the pipe's write end is closed.
fn hung_up(read: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).expect("poll");
    fds[0]
        .revents()
        .is_some_and(|e| e.contains(PollFlags::POLLHUP))
}

async fn send(socket: RawFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let mut sent = 0;
    while sent < bytes.len() {
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        let iov = [std::io::IoSlice::new(&bytes[sent..])];
        match sendmsg::<()>(socket, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(_) => return false,
        }
    }
    true
}

/// The check: one reply per input frame, the session ends, and once the server is gone
/// every fd passed to it is closed.
pub fn check_fd_session(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut splits = Splits::new(seed);
    let chunks = splits.chunks(stream);
    let mut probes = Vec::new();
    let server = server();
    let expected = decode_chunks(server.config().limits, &[stream]).len();
    let output = runtime.block_on(async {
        let (client, server_end) = UnixStream::pair().expect("socketpair");
        let serving = server.clone();
        let connection = tokio::spawn(async move { serving.serve_connection(server_end).await });
        let raw = client.as_raw_fd();
        let (mut reader, writer) = client.into_split();
        let read = async {
            let mut output = Vec::new();
            let _ = reader.read_to_end(&mut output).await;
            output
        };
        let write = async {
            for chunk in &chunks {
                // Most messages carry none; some one, a few more than the cap of 2.
                let count = match splits.next_u32() % 8 {
                    0..=4 => 0,
                    5 | 6 => 1,
                    _ => 3,
                };
                let passed: Vec<OwnedFd> = (0..count)
                    .map(|_| {
                        let (read, write) = nix::unistd::pipe().expect("pipe");
                        probes.push(read);
                        write
                    })
                    .collect();
                let borrowed: Vec<BorrowedFd<'_>> = passed.iter().map(|fd| fd.as_fd()).collect();
                if !send(raw, chunk, &borrowed).await {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = nix::sys::socket::shutdown(raw, nix::sys::socket::Shutdown::Write);
        };
        let ((), output) = tokio::time::timeout(HANG_AFTER, async { tokio::join!(write, read) })
            .await
            .expect("the fd session hung");
        drop(writer);
        connection.await.expect("the connection task panicked");
        output
    });
    let replies = session_replies(&output);
    assert_eq!(
        replies.len(),
        expected,
        "one reply per input frame expected"
    );
    // Named and pending fds closed with the connection; fd sets go with the server.
    drop(server);
    drop(runtime);
    for (i, probe) in probes.iter().enumerate() {
        assert!(
            hung_up(probe),
            "passed fd {i} still open after the server is gone"
        );
    }
}
