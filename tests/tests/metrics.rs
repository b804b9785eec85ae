//! The dispatcher's metrics through the `metrics` facade: a recorder installed for this
//! test binary (recorders are process-global) sees the numbers of a scripted session.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use qmp_dispatcher::observe::names;
use qmp_tests::{TestServer, return_reply};
use serde_json::json;

/// What the recorder saw so far. A debugging snapshot drains what it reports (counters and
/// gauges start again from zero), so snapshots are added up here.
#[derive(Default)]
struct Totals {
    values: Vec<(CompositeKey, DebugValue)>,
}

impl Totals {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            match self.values.iter_mut().find(|(k, _)| *k == key) {
                None => self.values.push((key, value)),
                Some((_, existing)) => match (existing, value) {
                    (DebugValue::Counter(a), DebugValue::Counter(b)) => *a += b,
                    (DebugValue::Gauge(a), DebugValue::Gauge(b)) => {
                        *a = (a.into_inner() + b.into_inner()).into()
                    }
                    (DebugValue::Histogram(a), DebugValue::Histogram(b)) => a.extend(b),
                    (existing, value) => *existing = value,
                },
            }
        }
    }

    fn value(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.values
            .iter()
            .find(|(key, _)| {
                key.kind() == kind
                    && key.key().name() == name
                    && key.key().labels().count() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, value)| value)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.value(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.value(MetricKind::Gauge, name, &[]) {
            Some(DebugValue::Gauge(g)) => g.into_inner(),
            _ => f64::NAN,
        }
    }
}

#[tokio::test]
async fn a_scripted_session_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");

    let server =
        TestServer::start_with(|b| b.command_timeout("x-delay", Duration::from_millis(30))).await;
    let mut client = server.negotiated(&["async"]).await;
    let mut watcher = server.negotiated(&[]).await;
    for id in 0..3 {
        client.execute("echo", json!({}), json!(id)).await;
        assert_eq!(
            client.recv_reply().await,
            return_reply(json!({}), json!(id))
        );
    }
    client.execute("fail", json!({}), json!("f")).await;
    client.recv_reply().await;
    client
        .execute("x-delay", json!({"ms": 60_000}), json!("t"))
        .await;
    client.recv_reply().await;
    client
        .execute("hold", json!({"key": "h"}), json!("h"))
        .await;
    server.holds.wait_parked("h").await;
    let mut totals = Totals::default();
    totals.take(&snapshotter);
    assert_eq!(totals.gauge(names::CLIENTS_CONNECTED), 2.0);
    assert_eq!(totals.gauge(names::COMMANDS_IN_FLIGHT), 1.0);
    client
        .execute("async-command-cancel", json!({"id": "h"}), json!("c"))
        .await;
    client.recv_reply().await;
    client.recv_reply().await;
    server.server.events().emit("STOP", None);
    watcher.recv().await;

    totals.take(&snapshotter);
    let total = names::COMMANDS_TOTAL;
    assert_eq!(
        totals.counter(total, &[("command", "echo"), ("outcome", "ok")]),
        3
    );
    assert_eq!(
        totals.counter(total, &[("command", "fail"), ("outcome", "error")]),
        1
    );
    assert_eq!(
        totals.counter(total, &[("command", "x-delay"), ("outcome", "timed-out")]),
        1
    );
    assert_eq!(
        totals.counter(total, &[("command", "hold"), ("outcome", "cancelled")]),
        1
    );
    assert_eq!(
        totals.counter(total, &[("command", "qmp_capabilities"), ("outcome", "ok")]),
        2
    );
    assert_eq!(
        totals.counter(names::EVENTS_SENT, &[]),
        2,
        "STOP to both clients"
    );
    assert_eq!(totals.gauge(names::COMMANDS_IN_FLIGHT), 0.0);
    match totals.value(
        MetricKind::Histogram,
        names::COMMAND_DURATION,
        &[("command", "echo")],
    ) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 3),
        other => panic!("no echo latencies: {other:?}"),
    }
    drop((client, watcher));
    server.wait_stats("clients gone", |s| s.clients == 0).await;
    totals.take(&snapshotter);
    assert_eq!(totals.gauge(names::CLIENTS_CONNECTED), 0.0);
}
