//! Paused connections: clients each with one slow command running, whose reading the
//! server has paused (a legacy client behind its command, as QEMU suspends the monitor).
//! Measures the server's CPU while they idle, and how long it takes the server to notice
//! that one of them has gone.
//!
//! A departure is observed over the wire through the client limit: the server is started
//! with `--max-clients` equal to the paused clients, so a further connection waits in the
//! listen backlog without a greeting. When a paused client closes, the server can only
//! admit (and greet) the waiting one once it has noticed the departure and freed the
//! slot, so close-to-greeting is the time to notice, plus one accept and one write.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::many::{self, Handshake};
use super::{BoxError, Outcome, Server, Target, settled_rss_kib};

/// How long the first waiting connection must stay without a greeting for the server to
/// count as at its client limit.
const LIMIT_CHECK: Duration = Duration::from_millis(300);
/// How long a departure may take to be noticed before the run gives up.
const DEPARTURE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between departures, so each starts from a quiet server.
const BETWEEN_DEPARTURES: Duration = Duration::from_millis(50);

/// The settings of a paused-connections run.
pub(crate) struct Paused {
    pub(crate) clients: usize,
    /// The request without its closing `}`, to which `"id":N}` is appended.
    pub(crate) request_prefix: Vec<u8>,
    pub(crate) idle: Duration,
    pub(crate) departures: usize,
}

/// Sends the slow request on `stream`.
async fn start_command(
    stream: &mut Box<dyn super::Stream>,
    prefix: &[u8],
    id: usize,
) -> Result<(), BoxError> {
    let mut request = prefix.to_vec();
    write!(request, "{id}}}")?;
    stream.write_all(&request).await?;
    Ok(())
}

/// Bytes that have arrived on `stream` without waiting: a reply to a command that should
/// still be running.
async fn arrived_unasked(stream: &mut Box<dyn super::Stream>) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::ZERO, stream.read(&mut byte)).await,
        Ok(Ok(_))
    )
}

/// Runs the measurement: connect, start one command per client, idle, then departures.
pub(crate) async fn measure(
    settings: &Paused,
    targets: &[Target],
    shake: Arc<Handshake>,
    server: &Server,
) -> Result<Outcome, BoxError> {
    let mut conns = many::open_many(settings.clients, 0, targets, &shake).await?;
    for (id, stream) in conns.iter_mut().enumerate() {
        start_command(stream, &settings.request_prefix, id).await?;
    }
    // The server has read and started every command once its memory stops growing.
    let rss_kib = settled_rss_kib(server).await?;

    let cpu_before = server.cpu_seconds()?;
    let idle_started = Instant::now();
    tokio::time::sleep(settings.idle).await;
    let idle_seconds = idle_started.elapsed().as_secs_f64();
    let idle_cpu = server.cpu_seconds()? - cpu_before;
    let mut unexpected_replies = 0;
    for stream in &mut conns {
        if arrived_unasked(stream).await {
            unexpected_replies += 1;
        }
    }

    let mut departures_ms = Vec::with_capacity(settings.departures);
    let mut line = Vec::with_capacity(512);
    for departure in 0..settings.departures {
        let target = &targets[departure % targets.len()];
        let mut waiting = many::connect_retrying(target).await?;
        if departure == 0
            && tokio::time::timeout(LIMIT_CHECK, waiting.read_u8())
                .await
                .is_ok()
        {
            return Err(format!(
                "the server greeted a client beyond the {} paused ones: start it with \
                 --max-clients {} so that a departure can be observed",
                settings.clients, settings.clients
            )
            .into());
        }
        let Some(leaving) = conns.pop() else {
            return Err("no paused client left to depart".into());
        };
        let closed = Instant::now();
        drop(leaving);
        let greeted =
            tokio::time::timeout(DEPARTURE_TIMEOUT, many::read_line(&mut waiting, &mut line))
                .await
                .map_err(|_| {
                    format!(
                        "the server did not notice a departed client within {} s",
                        DEPARTURE_TIMEOUT.as_secs()
                    )
                })?;
        let noticed = closed.elapsed();
        greeted?;
        departures_ms.push(noticed.as_secs_f64() * 1000.0);
        // The newcomer takes the departed client's place: negotiated and paused in turn.
        waiting.write_all(&shake.negotiate).await?;
        many::read_line(&mut waiting, &mut line).await?;
        start_command(
            &mut waiting,
            &settings.request_prefix,
            settings.clients + departure,
        )
        .await?;
        conns.insert(0, waiting);
        tokio::time::sleep(BETWEEN_DEPARTURES).await;
    }
    drop(conns);

    let mut sorted = departures_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * q).round() as usize])
    };
    let percent = idle_cpu / idle_seconds * 100.0;
    let json = serde_json::json!({
        "paused_clients": settings.clients,
        "rss_kib": rss_kib,
        "idle_seconds": idle_seconds,
        "idle_server_cpu_seconds": idle_cpu,
        "idle_server_cpu_percent": percent,
        "unexpected_replies": unexpected_replies,
        "departures": departures_ms.len(),
        "departure_ms": departures_ms,
        "departure_ms_p50": quantile(0.5),
        "departure_ms_max": quantile(1.0),
    });
    let ms = |value: Option<f64>| value.map_or("-".into(), |v| format!("{v:.1} ms"));
    let line = format!(
        "{} paused clients: idle server CPU {percent:.2}% of a core over {idle_seconds:.1} s; \
         {} departures noticed in p50 {}, max {}; {unexpected_replies} unexpected replies",
        settings.clients,
        departures_ms.len(),
        ms(quantile(0.5)),
        ms(quantile(1.0)),
    );
    Ok(Outcome::of(json, line))
}
