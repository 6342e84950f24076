//! Messages through a live bridge: rows, republished messages, filters and dead letters.

use std::collections::BTreeSet;
use std::time::Duration;

use rumqttc::QoS;

use crate::util::*;

pub fn config(port: u16, dir: &std::path::Path, client_id: &str) -> String {
    format!(
        r#"
broker:
  url: mqtt://127.0.0.1:{port}
  client_id: {client_id}
  protocol: PROTOCOL
sinks:
  db:
    type: sqlite
    path: {db}
    table: readings
  mirror:
    type: republish
    topic: "processed/{{{{ vars.device }}}}"
  dlq:
    type: file
    path: {dlq}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    filter: '.payload.temp > 10'
    transform: '{{device: .vars.device, seq: .payload.seq, temp: .payload.temp, ts: .received_at}}'
    to: [db, mirror]
dead_letter: {{ sink: dlq }}
"#,
        db = dir.join("t.db").display(),
        dlq = dir.join("dead.jsonl").display(),
    )
    .replace("PROTOCOL", "3.1.1")
}

pub async fn setup() -> (Mosquitto, tempfile::TempDir) {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    sqlite_create(
        &dir.path().join("t.db"),
        "CREATE TABLE readings (device TEXT, seq INTEGER, temp REAL, ts TEXT)",
    )
    .await;
    (broker, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_become_rows_and_republished_messages_mqtt311() {
    rows_and_republished("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_messages_become_rows_and_republished_messages_mqtt5() {
    rows_and_republished("5").await;
}

/// Waits until the bridge stores a probe message, i.e. it has subscribed.
pub async fn wait_subscribed(publisher: &TestClient, db: &std::path::Path) {
    probe_until(
        publisher,
        "sensors/probe/telemetry",
        r#"{"temp": 99, "seq": -1}"#,
        async || sqlite_count(db, "readings").await > 0,
    )
    .await;
}

/// Every message becomes a row, and is republished by two republish sinks (each on a
/// connection of its own to the broker: with one client id they took each other's
/// connection over).
async fn rows_and_republished(protocol: &str) {
    let (broker, dir) = setup().await;
    let db = dir.path().join("t.db");
    let cfg = config(broker.port, dir.path(), "bridge-flow-1")
        .replace("protocol: 3.1.1", &format!("protocol: {protocol}"))
        .replace(
            "  dlq:\n",
            "  copy:\n    type: republish\n    topic: \"copied/{{ vars.device }}\"\n  dlq:\n",
        )
        .replace("to: [db, mirror]", "to: [db, mirror, copy]");
    let bridge = InProcess::start(&cfg);
    let mut watcher = TestClient::connect(broker.port, "watcher").await;
    for filter in ["processed/#", "copied/#"] {
        watcher
            .client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    let publisher = TestClient::connect(broker.port, "publisher").await;
    // The bridge subscribes asynchronously: wait until a probe message comes through.
    wait_subscribed(&publisher, &db).await;

    const N: i64 = 500;
    let messages = (0..N).map(|i| {
        (
            format!("sensors/d{}/telemetry", i % 5),
            format!(r#"{{"temp": {}, "seq": {i}}}"#, 20 + i % 7),
        )
    });
    publisher.publish_all(messages).await;

    let all_rows = "SELECT seq FROM readings WHERE seq >= 0 ORDER BY seq";
    eventually(Duration::from_secs(30), "all rows", async || {
        (sqlite_query(&db, all_rows).await.len() as i64 >= N).then_some(())
    })
    .await;
    // Stopped, the bridge writes and republishes nothing more: no duplicate can follow.
    bridge.stop().await.unwrap();
    let seqs = sqlite_query(&db, all_rows).await;
    assert_eq!(
        seqs,
        (0..N).collect::<Vec<_>>(),
        "each message stored exactly once"
    );

    // Each sink's copies, by the first level of the topic.
    let (mut mirrored, mut copied) = (BTreeSet::new(), BTreeSet::new());
    eventually(
        Duration::from_secs(30),
        "all republished messages",
        async || {
            while let Ok((topic, payload)) = watcher.received.try_recv() {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                let device = v["device"].as_str().unwrap();
                let seq = v["seq"].as_i64().unwrap();
                let copies = if topic == format!("processed/{device}") {
                    &mut mirrored
                } else {
                    assert_eq!(topic, format!("copied/{device}"));
                    &mut copied
                };
                if seq >= 0 {
                    copies.insert(seq);
                }
            }
            (mirrored.len() as i64 >= N && copied.len() as i64 >= N).then_some(())
        },
    )
    .await;
    assert_eq!(mirrored, (0..N).collect::<BTreeSet<_>>());
    assert_eq!(copied, (0..N).collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_messages_are_skipped_and_bad_ones_dead_lettered() {
    let (broker, dir) = setup().await;
    let db = dir.path().join("t.db");
    let dlq = dir.path().join("dead.jsonl");
    let bridge = InProcess::start(&config(broker.port, dir.path(), "bridge-flow-2"));
    let publisher = TestClient::connect(broker.port, "publisher2").await;
    wait_subscribed(&publisher, &db).await;

    // Cold readings are filtered out, broken payloads and failing transforms dead-lettered.
    let mut msgs = Vec::new();
    for i in 0..60 {
        let payload = match i % 4 {
            0 => format!(r#"{{"temp": 5, "seq": {i}}}"#), // filtered
            1 => format!(r#"{{"temp": 25, "seq": {i}}}"#), // stored
            2 => format!("not json {i}"),                 // decode error
            _ => format!(r#"{{"temp": "hot", "seq": {i}}}"#), // filter error: string > number is fine in jq, so stored
        };
        msgs.push(("sensors/d1/telemetry".to_string(), payload));
    }
    // A sentinel last: per-topic order means everything before it was processed once it lands.
    msgs.push((
        "sensors/d1/telemetry".to_string(),
        r#"{"temp": 50, "seq": 1000}"#.to_string(),
    ));
    publisher.publish_all(msgs).await;

    eventually(Duration::from_secs(30), "the sentinel row", async || {
        (!sqlite_query(&db, "SELECT seq FROM readings WHERE seq = 1000")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let stored = sqlite_query(
        &db,
        "SELECT seq FROM readings WHERE seq >= 0 AND seq < 1000 ORDER BY seq",
    )
    .await;
    let want: Vec<i64> = (0..60).filter(|i| i % 4 == 1 || i % 4 == 3).collect();
    assert_eq!(stored, want, "filtered messages must not be written");

    eventually(Duration::from_secs(10), "15 dead letters", async || {
        (json_lines(&dlq).len() >= 15).then_some(())
    })
    .await;
    // Stopped, the bridge writes nothing more: the count is final.
    bridge.stop().await.unwrap();
    let letters = json_lines(&dlq);
    assert_eq!(letters.len(), 15);
    for l in &letters {
        assert_eq!(l["rule"], "readings");
        assert_eq!(l["topic"], "sensors/d1/telemetry");
        assert!(
            l["payload"].as_str().unwrap().starts_with("not json"),
            "{l}"
        );
        assert!(
            l["error"]
                .as_str()
                .unwrap()
                .starts_with("decode: payload is not valid JSON"),
            "{l}"
        );
        assert_eq!(l["error_kind"], "permanent");
        assert_eq!(l["qos"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_sink_rejects_are_isolated_and_dead_lettered() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    // seq must be unique: duplicates in a batch make the whole transaction fail, the
    // driver splits it until the bad rows are alone, and every good row still commits.
    sqlite_create(
        &db,
        "CREATE TABLE readings (device TEXT, seq INTEGER UNIQUE, temp REAL, ts TEXT)",
    )
    .await;
    let cfg =
        config(broker.port, dir.path(), "bridge-flow-3").replace("to: [db, mirror]", "to: [db]");
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(broker.port, "publisher3").await;
    wait_subscribed(&publisher, &db).await;
    let mut msgs: Vec<(String, String)> = (0..300)
        .map(|i| {
            (
                "sensors/d2/telemetry".to_string(),
                format!(r#"{{"temp": 30, "seq": {i}}}"#),
            )
        })
        .collect();
    // Three duplicates of earlier sequence numbers, spread through the stream.
    for (at, seq) in [(50, 7), (150, 100), (299, 200)] {
        msgs.insert(
            at,
            (
                "sensors/d2/telemetry".to_string(),
                format!(r#"{{"temp": 30, "seq": {seq}}}"#),
            ),
        );
    }
    publisher.publish_all(msgs).await;
    let dlq = dir.path().join("dead.jsonl");
    eventually(
        Duration::from_secs(30),
        "3 dead letters and 300 rows",
        async || {
            (json_lines(&dlq).len() >= 3 && sqlite_count(&db, "readings").await >= 301)
                .then_some(())
        },
    )
    .await;
    // Stopped, the bridge writes nothing more: the counts are final.
    bridge.stop().await.unwrap();
    let letters = json_lines(&dlq);
    assert_eq!(
        sqlite_query(
            &db,
            "SELECT COUNT(DISTINCT seq) FROM readings WHERE seq >= 0"
        )
        .await,
        vec![300]
    );
    // Only the stream's letters: the probes that proved the subscription all carry seq
    // -1, so on a slow run a second probe is itself a duplicate and is dead-lettered too.
    let letters: Vec<_> = letters
        .into_iter()
        .filter(|l| l["topic"] != "sensors/probe/telemetry")
        .collect();
    assert_eq!(letters.len(), 3, "{letters:#?}");
    for l in &letters {
        assert_eq!(l["sink"], "db");
        assert!(l["error"].as_str().unwrap().contains("UNIQUE"), "{l}");
        assert!(
            [7, 100, 200].contains(&l["record"]["seq"].as_i64().unwrap()),
            "{l}"
        );
    }
}

/// A database another process holds locked when mqbridge starts: the bridge waits for it
/// (saying so in its log) instead of exiting, and stores messages once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_locked_at_startup_is_waited_for() {
    let (broker, dir) = setup().await;
    let db = dir.path().join("t.db");
    let lock = sqlite_lock(&db).await;
    let path = dir.path().join("bridge.yaml");
    std::fs::write(&path, config(broker.port, dir.path(), "bridge-locked")).unwrap();
    let bridge = ChildBridge::start(&path);
    bridge
        .wait_for_log(
            "SQLite database is locked; waiting to open it",
            Duration::from_secs(30),
        )
        .await;
    drop(lock); // rolls back, releases the lock
    let publisher = TestClient::connect(broker.port, "publisher-locked").await;
    // Stored by the bridge that waited (it would have exited with the old behaviour).
    wait_subscribed(&publisher, &db).await;
    drop(bridge);
}
