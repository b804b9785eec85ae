//! Events to many clients. A controller client alternates `stop` and `cont`, which emit
//! `STOP` and `RESUME` to every negotiated client (qmp-demo, like QEMU; qmp-floor with
//! `--events`); every other client only reads, checking that it gets each event once and in
//! order (the names alternate, starting with `STOP`).
//!
//! Two runs: a broadcast run sends one event, waits until every client has it, and repeats
//! (time until the last client has it, server CPU per delivery); a storm sends events at a
//! fixed rate for a while (every client gets every event, in order? how far behind does the
//! last client fall? does the server's RSS stay flat?).

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::many::{self, Handshake};
use super::{BoxError, Outcome, Server, Stream, Target};

/// What an event line carries before its name, as QEMU (and the dispatcher) spell it.
const EVENT_KEY: &[u8] = br#""event": ""#;
/// How often RSS is sampled during a storm.
const STORM_RSS_INTERVAL: Duration = Duration::from_millis(250);
/// The storm's sender wakes this often and sends the events due since its last turn.
const STORM_TICK: Duration = Duration::from_millis(5);
/// Read buffer of one event client.
const CLIENT_BUFFER: usize = 4096;

/// The command that emits event `index`, and the event's name.
fn command_and_name(index: usize) -> (&'static str, &'static [u8]) {
    if index % 2 == 0 {
        ("stop", b"STOP\"")
    } else {
        ("cont", b"RESUME\"")
    }
}

/// What the clients have received, per event index.
struct Tally {
    /// Clients that have event `i`.
    arrived: Vec<AtomicU32>,
    /// Latest arrival of event `i` at any client, in ns since `epoch`.
    last_ns: Vec<AtomicU64>,
    /// Clients that have every event of the run, in order.
    complete: AtomicUsize,
    /// Clients that got an event out of order, twice, or one not sent.
    out_of_order: AtomicUsize,
    /// Clients whose connection ended (the server disconnects clients that lag).
    disconnected: AtomicUsize,
    /// Woken when an event has reached every client.
    everyone: Notify,
    clients: u32,
    epoch: Instant,
    /// How long every client may take to get one event before the run fails.
    timeout: Duration,
}

impl Tally {
    fn new(events: usize, clients: usize, epoch: Instant, timeout: Duration) -> Self {
        Tally {
            arrived: (0..events).map(|_| AtomicU32::new(0)).collect(),
            last_ns: (0..events).map(|_| AtomicU64::new(0)).collect(),
            complete: AtomicUsize::new(0),
            out_of_order: AtomicUsize::new(0),
            disconnected: AtomicUsize::new(0),
            everyone: Notify::new(),
            clients: clients as u32,
            epoch,
            timeout,
        }
    }

    /// Waits until every client has event `index`.
    async fn wait_for_everyone(&self, index: usize) -> Result<(), BoxError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let notified = self.everyone.notified();
            if self.arrived[index].load(Ordering::Acquire) >= self.clients {
                return Ok(());
            }
            if self.disconnected.load(Ordering::Relaxed) > 0 {
                return Err(format!(
                    "{} event clients were disconnected",
                    self.disconnected.load(Ordering::Relaxed)
                )
                .into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // Woken by the last arrival, or every 100 ms to look at disconnections.
            if tokio::time::timeout(left.min(Duration::from_millis(100)), notified)
                .await
                .is_err()
                && left.is_zero()
            {
                return Err(format!(
                    "event {index} reached {} of {} clients within {:.1} s",
                    self.arrived[index].load(Ordering::Relaxed),
                    self.clients,
                    self.timeout.as_secs_f64()
                )
                .into());
            }
        }
    }
}

/// One event client: reads until its connection ends or it is aborted, tallying events.
async fn read_events(mut stream: Box<dyn Stream>, tally: Arc<Tally>) {
    let mut buf = Vec::with_capacity(CLIENT_BUFFER);
    let mut received = 0usize;
    let mut in_order = true;
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                tally.disconnected.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
        }
        let now_ns = tally.epoch.elapsed().as_nanos() as u64;
        let mut start = 0;
        while let Some(len) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + len];
            start += len + 1;
            let Some(at) = many::find(line, EVENT_KEY) else {
                continue;
            };
            let name = &line[at + EVENT_KEY.len()..];
            let index = received;
            received += 1;
            if index >= tally.arrived.len() || !name.starts_with(command_and_name(index).1) {
                if in_order {
                    in_order = false;
                    tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            tally.last_ns[index].fetch_max(now_ns, Ordering::Relaxed);
            // Counted before the arrival that may wake the controller, which reads it as
            // soon as the last event has reached everyone.
            if in_order && received == tally.arrived.len() {
                tally.complete.fetch_add(1, Ordering::Relaxed);
            }
            if tally.arrived[index].fetch_add(1, Ordering::AcqRel) + 1 == tally.clients {
                tally.everyone.notify_one();
            }
        }
        buf.drain(..start);
        if buf.capacity() - buf.len() < CLIENT_BUFFER / 4 {
            buf.reserve(CLIENT_BUFFER);
        }
    }
}

/// The controller: a negotiated client that sends the commands and reads their replies.
struct Controller {
    writer: tokio::io::WriteHalf<Box<dyn Stream>>,
    replies: tokio::task::JoinHandle<Result<u64, BoxError>>,
}

impl Controller {
    async fn open(target: &Target, shake: &Handshake) -> Result<Self, BoxError> {
        let mut stream = many::connect_retrying(target).await?;
        many::handshake(&mut stream, shake).await?;
        let (mut reader, writer) = tokio::io::split(stream);
        // Counts successful replies; events to the controller are read and skipped so that
        // it never lags.
        let replies = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut ok = 0u64;
            loop {
                if reader.read_buf(&mut buf).await? == 0 {
                    return Ok(ok);
                }
                let mut start = 0;
                while let Some(len) = buf[start..].iter().position(|&b| b == b'\n') {
                    let line = &buf[start..start + len];
                    start += len + 1;
                    if many::contains(line, br#""error""#) {
                        return Err(format!(
                            "the controller's command failed: {}",
                            String::from_utf8_lossy(line)
                        )
                        .into());
                    }
                    if many::contains(line, br#""return""#) {
                        ok += 1;
                    }
                }
                buf.drain(..start);
            }
        });
        Ok(Controller { writer, replies })
    }

    /// Sends the commands of events `range`, in one write.
    async fn send(&mut self, range: std::ops::Range<usize>) -> Result<(), BoxError> {
        let mut out = Vec::with_capacity(range.len() * 40);
        for index in range {
            write!(
                out,
                r#"{{"execute":"{}","id":{index}}}"#,
                command_and_name(index).0
            )?;
        }
        self.writer.write_all(&out).await?;
        Ok(())
    }

    /// Closes the connection; returns the replies counted, or the first error.
    async fn finish(mut self) -> Result<u64, BoxError> {
        let _ = self.writer.shutdown().await;
        drop(self.writer);
        match tokio::time::timeout(Duration::from_secs(5), &mut self.replies).await {
            Ok(joined) => joined?,
            Err(_) => {
                self.replies.abort();
                Err("the controller's replies did not end".into())
            }
        }
    }
}

/// Connects `clients` event clients (each on its own reading task) and the controller.
async fn connect(
    settings: &EventRun<'_>,
    events: usize,
) -> Result<(Arc<Tally>, tokio::task::JoinSet<()>, Controller), BoxError> {
    let EventRun {
        clients,
        targets,
        shake,
        timeout,
        ..
    } = *settings;
    let streams = many::open_many(clients, 0, targets, shake).await?;
    let controller = Controller::open(&targets[0], shake).await?;
    let tally = Arc::new(Tally::new(events, clients, Instant::now(), timeout));
    let mut readers = tokio::task::JoinSet::new();
    for stream in streams {
        readers.spawn(read_events(stream, Arc::clone(&tally)));
    }
    Ok((tally, readers, controller))
}

/// What both event runs are given.
pub(crate) struct EventRun<'a> {
    /// Clients that only read events (the controller comes on top).
    pub(crate) clients: usize,
    pub(crate) targets: &'a [Target],
    pub(crate) shake: &'a Arc<Handshake>,
    pub(crate) server: &'a Server,
    /// How long every client may take to get one event.
    pub(crate) timeout: Duration,
}

/// `q`-quantile of `values` (sorted here), if any.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    (!values.is_empty()).then(|| values[((values.len() - 1) as f64 * q).round() as usize])
}

/// Broadcast run: `events` times, one event to all `clients`, waiting for every client to
/// have it before the next.
pub(crate) async fn measure_broadcast(
    settings: &EventRun<'_>,
    events: usize,
) -> Result<Outcome, BoxError> {
    let (clients, server) = (settings.clients, settings.server);
    let (tally, mut readers, mut controller) = connect(settings, events).await?;
    let mut latency_ms = Vec::with_capacity(events);
    let cpu_before = server.cpu_seconds()?;
    let started = Instant::now();
    for index in 0..events {
        let sent_ns = tally.epoch.elapsed().as_nanos() as u64;
        controller.send(index..index + 1).await?;
        tally.wait_for_everyone(index).await?;
        let last = tally.last_ns[index].load(Ordering::Relaxed);
        latency_ms.push(last.saturating_sub(sent_ns) as f64 / 1e6);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds()? - cpu_before;
    let replies = controller.finish().await?;
    readers.abort_all();
    let complete = tally.complete.load(Ordering::Relaxed);
    let out_of_order = tally.out_of_order.load(Ordering::Relaxed);
    // The controller is negotiated too and gets every event.
    let deliveries = (events * (clients + 1)) as f64;
    let us_per_delivery = cpu * 1e6 / deliveries;
    let p50 = quantile(&mut latency_ms, 0.5);
    let max = quantile(&mut latency_ms, 1.0);
    let json = serde_json::json!({
        "event_clients": clients,
        "events": events,
        "replies": replies,
        "seconds": seconds,
        "server_cpu_seconds": cpu,
        "us_per_delivery": us_per_delivery,
        "last_client_ms_p50": p50,
        "last_client_ms_max": max,
        "complete_clients": complete,
        "out_of_order_clients": out_of_order,
    });
    let line = format!(
        "{events} events, one at a time, to {clients} clients: the last client had each after \
         p50 {:.2} ms, max {:.2} ms; server CPU {us_per_delivery:.2} us per delivery; \
         {complete} clients got all in order, {out_of_order} did not",
        p50.unwrap_or(f64::NAN),
        max.unwrap_or(f64::NAN),
    );
    let mut outcome = Outcome::of(json, line);
    if complete != clients || replies != events as u64 {
        outcome.failure = Some(format!(
            "{} of {clients} clients without every event in order ({out_of_order} out of \
             order); {replies} of {events} replies",
            clients - complete.min(clients)
        ));
    }
    Ok(outcome)
}

/// Storm run: `rate` events per second for `duration`, then waits for every client to
/// have all of them.
pub(crate) async fn measure_storm(
    settings: &EventRun<'_>,
    rate: f64,
    duration: Duration,
) -> Result<Outcome, BoxError> {
    let (clients, server) = (settings.clients, settings.server);
    let events = ((rate * duration.as_secs_f64()).round() as usize).max(1);
    let (tally, mut readers, mut controller) = connect(settings, events).await?;
    let mut sent_ns = Vec::with_capacity(events);
    let mut rss_samples: Vec<(f64, u64)> = Vec::new();
    let rss_before = server.memory_kib("VmRSS")?;
    let cpu_before = server.cpu_seconds()?;
    let started = Instant::now();
    let mut next_rss = started;
    let mut ticks = tokio::time::interval(STORM_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while sent_ns.len() < events {
        ticks.tick().await;
        let now = Instant::now();
        let due = ((now - started).as_secs_f64() * rate).floor() as usize;
        let due = due.clamp(sent_ns.len(), events);
        if due > sent_ns.len() {
            let stamp = tally.epoch.elapsed().as_nanos() as u64;
            let from = sent_ns.len();
            sent_ns.resize(due, stamp);
            controller.send(from..due).await?;
        }
        if now >= next_rss {
            rss_samples.push(((now - started).as_secs_f64(), server.memory_kib("VmRSS")?));
            next_rss += STORM_RSS_INTERVAL;
        }
    }
    let send_seconds = started.elapsed().as_secs_f64();
    let drained = tally.wait_for_everyone(events - 1).await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds()? - cpu_before;
    let rss_after = server.memory_kib("VmRSS")?;
    rss_samples.push((seconds, rss_after));
    let replies = controller.finish().await;
    readers.abort_all();

    let complete = tally.complete.load(Ordering::Relaxed);
    let out_of_order = tally.out_of_order.load(Ordering::Relaxed);
    let disconnected = tally.disconnected.load(Ordering::Relaxed);
    let mut lag_ms: Vec<f64> = sent_ns
        .iter()
        .zip(&tally.last_ns)
        .filter(|(_, last)| last.load(Ordering::Relaxed) > 0)
        .map(|(&sent, last)| last.load(Ordering::Relaxed).saturating_sub(sent) as f64 / 1e6)
        .collect();
    let deliveries = (events * (clients + 1)) as f64;
    // RSS once the storm is under way (after its first second) against the end: flat if
    // the server keeps no more per event than it did early on.
    let rss_early = rss_samples
        .iter()
        .find(|(t, _)| *t >= 1.0)
        .map_or(rss_before, |&(_, rss)| rss);
    // And over the second half alone: buffers that grew while clients caught up early on
    // are kept, but steady growth there would be per event (a leak).
    let rss_half = rss_samples
        .iter()
        .find(|(t, _)| *t >= send_seconds / 2.0)
        .map_or(rss_before, |&(_, rss)| rss);
    let rss_peak = rss_samples
        .iter()
        .map(|&(_, rss)| rss)
        .max()
        .unwrap_or(rss_after);
    let json = serde_json::json!({
        "event_clients": clients,
        "events": events,
        "rate": rate,
        "send_seconds": send_seconds,
        "seconds": seconds,
        "server_cpu_seconds": cpu,
        "server_cores": cpu / seconds,
        "us_per_delivery": cpu * 1e6 / deliveries,
        "lag_ms_p50": quantile(&mut lag_ms, 0.5),
        "lag_ms_p99": quantile(&mut lag_ms, 0.99),
        "lag_ms_max": quantile(&mut lag_ms, 1.0),
        "complete_clients": complete,
        "missing_clients": clients - complete.min(clients),
        "out_of_order_clients": out_of_order,
        "disconnected_clients": disconnected,
        "rss_before_kib": rss_before,
        "rss_early_kib": rss_early,
        "rss_peak_kib": rss_peak,
        "rss_after_kib": rss_after,
        "rss_half_kib": rss_half,
        "rss_growth_kib": rss_after as i64 - rss_early as i64,
        "rss_growth_second_half_kib": rss_after as i64 - rss_half as i64,
        "rss_samples": rss_samples,
        "replies": replies.as_ref().ok(),
        "failure": drained
            .as_ref()
            .err()
            .map(ToString::to_string)
            .or_else(|| replies.as_ref().err().map(ToString::to_string)),
    });
    let line = format!(
        "storm of {events} events at {rate}/s to {clients} clients: {complete} clients got \
         every event in order ({out_of_order} out of order, {disconnected} disconnected); \
         the last client was p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms behind; server CPU \
         {:.2} cores, {:.2} us per delivery; RSS {rss_before} -> {rss_early} (1 s) -> \
         {rss_half} (half-way) -> {rss_after} KiB (peak {rss_peak})",
        json["lag_ms_p50"].as_f64().unwrap_or(f64::NAN),
        json["lag_ms_p99"].as_f64().unwrap_or(f64::NAN),
        json["lag_ms_max"].as_f64().unwrap_or(f64::NAN),
        cpu / seconds,
        cpu * 1e6 / deliveries,
    );
    let failure = json["failure"].as_str().map(|e| format!("; {e}"));
    let mut outcome = Outcome::of(json, line);
    if complete != clients || drained.is_err() || replies.is_err() {
        outcome.failure = Some(format!(
            "{} of {clients} clients without every event in order: {out_of_order} out of \
             order, {disconnected} disconnected{}",
            clients - complete.min(clients),
            failure.unwrap_or_default()
        ));
    }
    Ok(outcome)
}
