//! The Prometheus side of the metrics: installs the process-wide recorder that the
//! components' `metrics::counter!`/`gauge!`/`histogram!` calls record to, describes every
//! metric (the `# HELP` lines; `docs/metrics.md` lists the same names), sets the
//! histograms' buckets, and renders the text format for `/metrics`.
//!
//! The recorder is installed once per process, only when the admin server is on (without
//! it the components' metric calls cost next to nothing), and kept for the process's
//! life: a second `app::run` in the same process (tests) shares it. Its histograms keep
//! their samples until drained, so [`upkeep`] drains them every few seconds.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// How often histogram samples are drained into their buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Bucket bounds (seconds) for the latency histograms: 100 µs to 30 s.
const SECONDS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Bucket bounds (records) for batch sizes, up to the largest `batch.max_rows` in use.
const RECORDS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Every metric mqbridge records: (name, kind, unit, help). Kept in step with
/// `docs/metrics.md` by a test.
pub const METRICS: &[(&str, Kind, Unit, &str)] = &[
    // Process.
    (
        "mqbridge_build_info",
        Kind::Gauge,
        Unit::Count,
        "Always 1; the version in the `version` label.",
    ),
    (
        "mqbridge_process_resident_memory_bytes",
        Kind::Gauge,
        Unit::Bytes,
        "Resident memory of the process (refreshed every 5 s).",
    ),
    (
        "mqbridge_process_open_fds",
        Kind::Gauge,
        Unit::Count,
        "Open file descriptors of the process (refreshed every 5 s).",
    ),
    // Config.
    (
        "mqbridge_config_reload_failures_total",
        Kind::Counter,
        Unit::Count,
        "Config reloads (SIGHUP or a change of the file) that failed; the previous config kept running.",
    ),
    (
        "mqbridge_config_last_reload_success",
        Kind::Gauge,
        Unit::Count,
        "1 when the last config reload succeeded (or none was tried), 0 when it failed.",
    ),
    // Source.
    (
        "mqbridge_source_connected",
        Kind::Gauge,
        Unit::Count,
        "1 while the source can take messages: connected to the external broker, or the embedded broker listening.",
    ),
    (
        "mqbridge_source_messages_received_total",
        Kind::Counter,
        Unit::Count,
        "Messages taken from the external broker, by QoS.",
    ),
    (
        "mqbridge_source_qos0_dropped_total",
        Kind::Counter,
        Unit::Count,
        "QoS 0 messages dropped because the pipeline was full.",
    ),
    (
        "mqbridge_source_overflows_total",
        Kind::Counter,
        Unit::Count,
        "Connections ended because the broker sent past the window and max_buffered while the pipeline was full.",
    ),
    (
        "mqbridge_source_acks_pending",
        Kind::Gauge,
        Unit::Count,
        "QoS 1/2 messages taken and not yet acknowledged upstream.",
    ),
    (
        "mqbridge_source_oldest_unsettled_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "Age of the oldest message taken and not yet settled (0 when none); it holds back the acknowledgements after it.",
    ),
    // Embedded broker.
    (
        "mqbridge_broker_connections",
        Kind::Gauge,
        Unit::Count,
        "Open client connections to the embedded broker.",
    ),
    (
        "mqbridge_broker_sessions",
        Kind::Gauge,
        Unit::Count,
        "Embedded broker sessions, connected or offline.",
    ),
    (
        "mqbridge_broker_subscriptions",
        Kind::Gauge,
        Unit::Count,
        "Subscriptions over every embedded broker session.",
    ),
    (
        "mqbridge_broker_queued_messages",
        Kind::Gauge,
        Unit::Count,
        "Messages waiting in the embedded broker's session queues.",
    ),
    (
        "mqbridge_broker_retained_messages",
        Kind::Gauge,
        Unit::Count,
        "Topics with a retained message in the embedded broker.",
    ),
    (
        "mqbridge_broker_messages_received_total",
        Kind::Counter,
        Unit::Count,
        "PUBLISH packets the embedded broker's clients sent.",
    ),
    (
        "mqbridge_broker_messages_sent_total",
        Kind::Counter,
        Unit::Count,
        "PUBLISH packets the embedded broker sent to subscribers.",
    ),
    (
        "mqbridge_broker_messages_dropped_total",
        Kind::Counter,
        Unit::Count,
        "Messages the embedded broker dropped, by reason: queue_full, offline_qos0, expired, too_large, acl.",
    ),
    (
        "mqbridge_broker_connections_refused_total",
        Kind::Counter,
        Unit::Count,
        "CONNECTs refused because max_connections clients were connected.",
    ),
    (
        "mqbridge_broker_connections_rate_limited_total",
        Kind::Counter,
        Unit::Count,
        "Connections closed as soon as accepted: their address exceeded connection_rate_per_ip.",
    ),
    (
        "mqbridge_broker_connections_timed_out_total",
        Kind::Counter,
        Unit::Count,
        "Connections closed by a deadline, by timeout: connect (connect_timeout), keepalive, send (send_timeout).",
    ),
    // Spool.
    (
        "mqbridge_spool_bytes",
        Kind::Gauge,
        Unit::Bytes,
        "Bytes in the spool's segment files.",
    ),
    (
        "mqbridge_spool_max_bytes",
        Kind::Gauge,
        Unit::Bytes,
        "spool.max_bytes: acknowledgements stop once the spool reaches it.",
    ),
    (
        "mqbridge_spool_fsync_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time of each group commit's write and fdatasync.",
    ),
    (
        "mqbridge_spool_records",
        Kind::Gauge,
        Unit::Count,
        "Records in the spool not yet settled (written or dead-lettered by every sink).",
    ),
    (
        "mqbridge_spool_oldest_record_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "Age of the oldest unsettled record in the spool, from when its message was received.",
    ),
    // Rules.
    (
        "mqbridge_rule_messages_matched_total",
        Kind::Counter,
        Unit::Count,
        "Messages whose topic matched one of the rule's filters.",
    ),
    (
        "mqbridge_rule_messages_filtered_total",
        Kind::Counter,
        Unit::Count,
        "Matched messages the rule's filter left out.",
    ),
    (
        "mqbridge_rule_records_total",
        Kind::Counter,
        Unit::Count,
        "Records the rule emitted (each goes to every sink in its `to`).",
    ),
    (
        "mqbridge_rule_errors_total",
        Kind::Counter,
        Unit::Count,
        "Messages the rule could not process (dead-lettered), by stage: decode, filter, transform or evaluation.",
    ),
    (
        "mqbridge_rule_evaluation_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time to decode, filter and transform one matched message.",
    ),
    (
        "mqbridge_sparkplug_seq_gaps_total",
        Kind::Counter,
        Unit::Count,
        "Sparkplug B messages whose seq did not follow the last one from their edge node.",
    ),
    (
        "mqbridge_sparkplug_rebirths_requested_total",
        Kind::Counter,
        Unit::Count,
        "Rebirth requests (NCMD Node Control/Rebirth) sent to Sparkplug B edge nodes.",
    ),
    // Sinks.
    (
        "mqbridge_sink_records_written_total",
        Kind::Counter,
        Unit::Count,
        "Records the sink wrote.",
    ),
    (
        "mqbridge_sink_records_retried_total",
        Kind::Counter,
        Unit::Count,
        "Record writes that failed transiently and will be tried again.",
    ),
    (
        "mqbridge_sink_records_dead_lettered_total",
        Kind::Counter,
        Unit::Count,
        "Records given up on and sent to the dead letter.",
    ),
    (
        "mqbridge_sink_queue_depth",
        Kind::Gauge,
        Unit::Count,
        "Records waiting in the sink's queue (all lanes).",
    ),
    (
        "mqbridge_sink_batch_size",
        Kind::Histogram,
        Unit::Count,
        "Records per write.",
    ),
    (
        "mqbridge_sink_write_seconds",
        Kind::Histogram,
        Unit::Seconds,
        "Time per write (one batch, or a retry round of it).",
    ),
    (
        "mqbridge_sink_healthy",
        Kind::Gauge,
        Unit::Count,
        "1 unless the sink's last write failed transiently (it is retrying).",
    ),
];

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("mqbridge_sink_batch_size".into()),
                        RECORDS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics stays empty");
            }
            describe();
            metrics::gauge!("mqbridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }
}

/// Drains histogram samples every [`UPKEEP_EVERY`] until `stop`.
pub async fn upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                handle.run_upkeep();
                super::process::record();
            }
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented_and_named_by_the_conventions() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md"))
            .unwrap();
        for &(name, kind, _, _) in METRICS {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
            assert!(name.starts_with("mqbridge_"), "{name}");
            assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}");
        }
        let documented = doc.matches("| `mqbridge_").count();
        assert_eq!(
            documented,
            METRICS.len(),
            "docs/metrics.md lists other metrics"
        );
    }
}
