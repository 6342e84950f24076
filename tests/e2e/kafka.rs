//! The `kafka` sink against a real Kafka-API broker (Tansu): messages published into the
//! embedded broker come out of a topic keyed by device, each device's records in one
//! partition and in order, with the rendered headers and a `message-id`; a record the
//! broker refuses is dead-lettered without holding up the others. The outage test
//! freezes the broker (SIGSTOP) for 30 s while 10,000 messages stream in.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

/// mqbridge with its embedded broker on `port`: `sensors/{device}/telemetry` as
/// `{device, seq}` records to the kafka sink (brokers `bootstrap`, `extra` added to its
/// settings), topic `telemetry` keyed by device; dead letters to a file in `dir`.
fn config(dir: &Path, port: u16, bootstrap: &str, extra: &str) -> String {
    format!(
        r#"
embedded: {{ listen: "127.0.0.1:{port}", allow_anonymous: true }}
spool: {{ path: {spool} }}
sinks:
  events:
    type: kafka
    brokers: ["{bootstrap}"]
    topic: telemetry
    key: "{{{{ vars.device }}}}"
    headers: {{ Device: "{{{{ vars.device }}}}", Rule: "{{{{ rule }}}}" }}
    compression: lz4
    {extra}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: forward
    from: ["sensors/{{device}}/telemetry"]
    transform: '.payload + {{device: .vars.device}}'
    to: [events]
dead_letter: {{ sink: dlq }}
shutdown_timeout: 5s
"#,
        spool = dir.join("spool").display(),
        dlq = dir.join("dead.jsonl").display(),
    )
}

/// Per device, the seqs received in order; checks that each device's records share one
/// partition and carry their key and headers.
fn per_device(received: &[Received]) -> BTreeMap<String, Vec<i64>> {
    let mut seqs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut partitions: BTreeMap<String, i32> = BTreeMap::new();
    // A partition's records in the order it holds them: the reader got them so.
    for r in received {
        let device = r.value["device"].as_str().expect("a device").to_string();
        assert_eq!(r.key, device, "the key");
        assert_eq!(r.header("Device"), Some(device.as_str()));
        assert_eq!(r.header("Rule"), Some("forward"));
        assert!(r.header("message-id").is_some_and(|id| id.len() > 17));
        let p = *partitions.entry(device.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition, "{device}: one key, one partition");
        seqs.entry(device)
            .or_default()
            .push(r.value["seq"].as_i64().expect("a seq"));
    }
    seqs
}

fn distinct_seqs(received: &[Received]) -> HashSet<i64> {
    received
        .iter()
        .filter_map(|r| r.value["seq"].as_i64())
        .filter(|s| *s >= 0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_topic_keyed_and_in_order_and_a_refused_one_is_dead_lettered() {
    const DEVICES: i64 = 4;
    const N: i64 = 400;
    let tansu = Tansu::start().await;
    tansu.create_topic("telemetry", 3);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _bridge = InProcess::start(&config(
        dir.path(),
        port,
        &tansu.bootstrap(),
        "batch: { max_rows: 50 }",
    ));
    wait_listening(port, "the broker to listen").await;
    let publisher = TestClient::connect(port, "devices").await;
    // One record over the producer's message limit (1,000,000 bytes) but within the
    // embedded broker's (1 MiB), between the others of its topic.
    let blob = "x".repeat(1_010_000);
    let mut messages: Vec<(String, String)> = (0..N)
        .map(|i| {
            (
                format!("sensors/d{}/telemetry", i % DEVICES),
                format!(r#"{{"seq": {i}}}"#),
            )
        })
        .collect();
    messages.insert(
        (N / 2) as usize,
        (
            "sensors/d0/telemetry".into(),
            format!(r#"{{"seq": -1, "blob": "{blob}"}}"#),
        ),
    );
    publisher.publish_all(messages).await;

    let mut reader = tansu.reader("telemetry", 3);
    let all = reader
        .read_until(Duration::from_secs(30), |r| {
            distinct_seqs(r).len() as i64 == N
        })
        .await;
    assert!(
        all,
        "{} of {N} records read",
        distinct_seqs(&reader.received).len()
    );
    let seqs = per_device(&reader.received);
    assert_eq!(seqs.len() as i64, DEVICES);
    for d in 0..DEVICES {
        let want: Vec<i64> = (0..N).filter(|i| i % DEVICES == d).collect();
        // Nothing went wrong: every record exactly once, in order.
        assert_eq!(seqs[&format!("d{d}")], want, "d{d}");
    }
    let ids: HashSet<&str> = reader
        .received
        .iter()
        .filter_map(|r| r.header("message-id"))
        .collect();
    assert_eq!(ids.len() as i64, N, "each record has an id of its own");

    let dead = eventually(Duration::from_secs(20), "the dead letter", async || {
        let lines = json_lines(&dir.path().join("dead.jsonl"));
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["error"].as_str().unwrap_or_default();
    assert!(reason.contains("kafka"), "{reason}");
    assert!(reason.to_lowercase().contains("size"), "{reason}");
}

/// Issue 15's outage: 10,000 numbered QoS 1 messages from 4 devices stream into the
/// embedded broker over about 40 s; meanwhile the Kafka broker is frozen (SIGSTOP) for
/// 30 s, then resumed (SIGCONT). Tansu keeps its topics in memory, so it is frozen rather
/// than restarted.
///
/// What the broker has not acknowledged stays in mqbridge's spool and sink queue: the
/// client retries it until `timeout` (5 s here), then mqbridge's retries send it again.
/// So the topic must hold every message, and each device's first copies in order; a
/// record whose acknowledgment was lost can be there twice (at least once), with the same
/// `message-id`, and the duplicates are counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_frozen_for_30s_loses_nothing_and_keeps_each_device_in_order() {
    const DEVICES: i64 = 4;
    const N: i64 = 10_000;
    let tansu = Tansu::start().await;
    tansu.create_topic("telemetry", 3);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bridge = InProcess::start(&config(
        dir.path(),
        port,
        &tansu.bootstrap(),
        "batch: { max_rows: 200 }\n    concurrency: 2\n    timeout: 5s\n    retry: { initial_delay: 50ms, max_delay: 1s }",
    ));
    wait_listening(port, "the broker to listen").await;
    let mut reader = tansu.reader("telemetry", 3);

    let started = Instant::now();
    let publishing = publish_numbered(port, "dev", DEVICES, N, Duration::from_secs(40), |p, _| {
        format!("sensors/d{p}/telemetry")
    });
    let outage = async {
        // Some of the stream through first, so that the outage cuts it in the middle.
        let mut probe = tansu.reader("telemetry", 3);
        assert!(
            probe
                .read_until(Duration::from_secs(30), |r| r.len() >= 1_000)
                .await,
            "1,000 records in the topic"
        );
        tansu.signal("STOP");
        println!("kafka frozen after {:?}", started.elapsed());
        // The outage itself: a deliberate wait.
        tokio::time::sleep(Duration::from_secs(30)).await;
        tansu.signal("CONT");
        println!("kafka resumed after {:?}", started.elapsed());
    };
    tokio::join!(publishing, outage);
    println!("all published after {:?}", started.elapsed());
    let all = reader
        .read_until(Duration::from_secs(120), |r| {
            distinct_seqs(r).len() as i64 == N
        })
        .await;
    println!("all read after {:?}", started.elapsed());
    bridge.stop().await.unwrap();

    let tally = Tally::of_seqs(
        N,
        reader
            .received
            .iter()
            .filter_map(|r| r.value["seq"].as_i64()),
    );
    println!("{tally}");
    assert!(all, "{tally}");
    assert_eq!(tally.lost, 0, "{tally}");
    let seqs = per_device(&reader.received);
    let mut duplicates = 0;
    for d in 0..DEVICES {
        let want: Vec<i64> = (d * N / DEVICES..(d + 1) * N / DEVICES).collect();
        duplicates += assert_in_order(&format!("d{d}"), &seqs[&format!("d{d}")], &want);
    }
    assert_eq!(duplicates as i64, tally.duplicates);
    // A copy carries the id of its first: a consumer can drop it.
    let mut ids = BTreeMap::new();
    for r in &reader.received {
        let id = r.header("message-id").unwrap();
        let seq = r.value["seq"].as_i64().unwrap();
        assert_eq!(*ids.entry(id.to_string()).or_insert(seq), seq, "{id}");
    }
    assert_eq!(ids.len() as i64, N);
    assert!(json_lines(&dir.path().join("dead.jsonl")).is_empty());
}
