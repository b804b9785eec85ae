//! Registry size measured end to end, in process: a [`Server`] with many commands serves one
//! async client over `tokio::io::duplex` (no socket), which pipelines [`PIPELINED`] requests
//! per round and reads the replies.
//!
//! Shared by the criterion benchmark (`benches/dispatch.rs`) and by `qmp-compare`, which
//! reports [`interleaved_ratios`]: the three cases timed round by round in turn, so that the
//! noise of a shared machine falls on all of them alike.

use std::time::{Duration, Instant};

use qmp_dispatcher::{ByteStream, Command, NoArgs, QmpError, Registry, Server};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Requests pipelined per round.
pub const PIPELINED: usize = 256;

/// The cases compared: (commands registered, names the requests cycle through). The third
/// tells the table's size from the working set of entries touched.
pub const CASES: [(usize, usize); 3] = [(10, 10), (10_000, 10_000), (10_000, 10)];

/// A server with `commands` registered commands besides the built-ins, each answering `{}`.
pub fn server_with(commands: usize) -> Server {
    let mut registry = Registry::builder();
    for index in 0..commands {
        registry
            .add(Command::sync(command_name(index), |_: NoArgs, _| {
                Ok::<_, QmpError>(json!({}))
            }))
            .expect("names are unique");
    }
    Server::builder(registry.build())
        .max_in_flight(PIPELINED * 2)
        .build()
}

/// Fixed-width names, so every request has the same length whatever the registry size.
pub fn command_name(index: usize) -> String {
    format!("x-bench-{index:05}")
}

/// The client end of a served duplex stream, negotiated with `async`.
pub struct Client {
    stream: DuplexStream,
    buf: Vec<u8>,
    /// `PIPELINED` requests, cycling through the registered names batch after batch.
    batches: Vec<Vec<u8>>,
    next_batch: usize,
}

impl Client {
    /// Connects to `server`; requests cycle through the first `names_used` commands.
    pub async fn connect(server: &Server, names_used: usize) -> Self {
        let (client, served) = tokio::io::duplex(256 * 1024);
        server.spawn_connection(ByteStream(served));
        let mut this = Client {
            stream: client,
            buf: Vec::with_capacity(64 * 1024),
            batches: Vec::new(),
            next_batch: 0,
        };
        this.read_lines(1).await; // greeting
        this.stream
            .write_all(br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["async"]}}"#)
            .await
            .expect("write to the duplex");
        this.read_lines(1).await;
        let batch_count = names_used.div_ceil(PIPELINED).max(1);
        let mut id = 0;
        for _ in 0..batch_count {
            let mut batch = Vec::new();
            for _ in 0..PIPELINED {
                let name = command_name(id % names_used);
                batch.extend_from_slice(format!(r#"{{"execute":"{name}","id":{id}}}"#).as_bytes());
                id += 1;
            }
            this.batches.push(batch);
        }
        this
    }

    /// Reads until `lines` more newline-terminated messages have arrived.
    async fn read_lines(&mut self, mut lines: usize) {
        while lines > 0 {
            self.buf.clear();
            let read = self.stream.read_buf(&mut self.buf).await.expect("read");
            assert!(read > 0, "server closed the connection");
            lines = lines.saturating_sub(self.buf.iter().filter(|&&b| b == b'\n').count());
        }
    }

    /// Pipelines one batch and waits for all its replies.
    pub async fn round(&mut self) {
        let batch = std::mem::take(&mut self.batches[self.next_batch]);
        let (stream_read, mut stream_write) = tokio::io::split(&mut self.stream);
        let write = async {
            stream_write.write_all(&batch).await.expect("write");
        };
        let read = async {
            let mut stream_read = stream_read;
            let mut buf = std::mem::take(&mut self.buf);
            let mut lines = PIPELINED;
            while lines > 0 {
                buf.clear();
                let read = stream_read.read_buf(&mut buf).await.expect("read");
                assert!(read > 0, "server closed the connection");
                lines = lines.saturating_sub(buf.iter().filter(|&&b| b == b'\n').count());
            }
            buf
        };
        let ((), buf) = tokio::join!(write, read);
        self.buf = buf;
        self.batches[self.next_batch] = batch;
        self.next_batch = (self.next_batch + 1) % self.batches.len();
    }
}

/// Median time per round of each of [`CASES`], and the ratios to the first.
#[derive(Debug, Clone)]
pub struct Ratios {
    /// Median time of one round of [`PIPELINED`] requests, per case, in [`CASES`] order.
    pub median_round: [Duration; 3],
    /// Rounds timed per case.
    pub rounds: usize,
}

impl Ratios {
    /// Cycling through all 10,000 commands ÷ cycling through 10 of 10.
    pub fn all_of_10k(&self) -> f64 {
        self.median_round[1].as_secs_f64() / self.median_round[0].as_secs_f64()
    }

    /// 10 of 10,000 registered ÷ 10 of 10.
    pub fn ten_of_10k(&self) -> f64 {
        self.median_round[2].as_secs_f64() / self.median_round[0].as_secs_f64()
    }

    /// Time per command of case `index`, in nanoseconds.
    pub fn ns_per_command(&self, index: usize) -> f64 {
        self.median_round[index].as_secs_f64() * 1e9 / PIPELINED as f64
    }
}

/// Times `rounds` rounds of each case in turn (case 1, 2, 3, 1, 2, 3, ...) after `warm_up`
/// rounds of each, on a current-thread runtime, and returns the medians. Interleaving puts
/// the machine's noise on every case alike, so the ratios hold where absolute times swing.
pub fn interleaved_ratios(rounds: usize, warm_up: usize) -> Ratios {
    let rounds = rounds.max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let servers: Vec<Server> = CASES.iter().map(|&(n, _)| server_with(n)).collect();
    let mut clients: Vec<Client> = runtime.block_on(async {
        let mut clients = Vec::new();
        for (server, &(_, used)) in servers.iter().zip(&CASES) {
            clients.push(Client::connect(server, used).await);
        }
        clients
    });
    let mut times: [Vec<Duration>; 3] = Default::default();
    runtime.block_on(async {
        for round in 0..warm_up + rounds {
            for (client, times) in clients.iter_mut().zip(times.iter_mut()) {
                let start = Instant::now();
                client.round().await;
                if round >= warm_up {
                    times.push(start.elapsed());
                }
            }
        }
    });
    drop(clients);
    for server in &servers {
        server.shutdown();
    }
    runtime.block_on(async {
        for server in &servers {
            let _ = tokio::time::timeout(Duration::from_secs(5), server.wait()).await;
        }
    });
    let median_round = times.map(|mut times| {
        times.sort();
        times[times.len() / 2]
    });
    Ratios {
        median_round,
        rounds,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn interleaved_ratios_compare_every_case_with_the_first() {
        let ratios = super::interleaved_ratios(3, 1);
        assert_eq!(ratios.rounds, 3);
        for ratio in [ratios.all_of_10k(), ratios.ten_of_10k()] {
            assert!(ratio.is_finite() && ratio > 0.0, "{ratios:?}");
        }
    }
}
