//! The delivery promise across process death: a message the broker handed to mqbridge is
//! acknowledged only after it is stored, so killing mqbridge loses nothing.

use std::time::Duration;

use crate::util::*;

fn config(port: u16, db: &std::path::Path, protocol: &str) -> String {
    format!(
        r#"
broker:
  url: mqtt://127.0.0.1:{port}
  client_id: bridge-crash
  protocol: {protocol}
sinks:
  db: {{ type: sqlite, path: {db}, table: readings }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, seq: .payload.seq}}'
    to: [db]
shutdown_timeout: 5s
"#,
        db = db.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_before_settle_then_restart_loses_nothing_mqtt311() {
    kill_9_before_settle_then_restart_loses_nothing("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_before_settle_then_restart_loses_nothing_mqtt5() {
    kill_9_before_settle_then_restart_loses_nothing("5").await;
}

async fn kill_9_before_settle_then_restart_loses_nothing(protocol: &str) {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    sqlite_create(&db, "CREATE TABLE readings (device TEXT, seq INTEGER)").await;
    let cfg_path = dir.path().join("bridge.yaml");
    std::fs::write(&cfg_path, config(broker.port, &db, protocol)).unwrap();

    let bridge = ChildBridge::start(&cfg_path);
    bridge
        .wait_for_log("subscribed", Duration::from_secs(20))
        .await;

    // Hold SQLite's write lock so nothing can settle, publish, and wait until the bridge
    // is retrying: the messages are in mqbridge's hands, unacknowledged.
    let lock = {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    };
    const N: i64 = 200;
    let publisher = TestClient::connect(broker.port, "crash-publisher").await;
    publisher
        .publish_all((0..N).map(|i| {
            (
                format!("sensors/d{}/telemetry", i % 3),
                format!(r#"{{"seq": {i}}}"#),
            )
        }))
        .await;
    bridge
        .wait_for_log("write failed, will retry", Duration::from_secs(30))
        .await;
    bridge.kill9();
    drop(lock); // rolls back, releases the lock
    assert_eq!(sqlite_count(&db, "readings").await, 0);

    // A new process with the same client id resumes the session: the broker redelivers.
    let bridge = ChildBridge::start(&cfg_path);
    let seqs = eventually(
        Duration::from_secs(60),
        "every message after restart",
        async || {
            let seqs = sqlite_query(&db, "SELECT DISTINCT seq FROM readings ORDER BY seq").await;
            (seqs.len() as i64 >= N).then_some(seqs)
        },
    )
    .await;
    assert_eq!(seqs, (0..N).collect::<Vec<_>>());

    // SIGTERM: a graceful exit well within shutdown_timeout.
    let (status, took) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// A graceful stop right after a burst: every stored message must also be acknowledged,
/// or the broker redelivers it to the next run as a duplicate. The sentinel published
/// after the restart lands after any redelivered message (one topic, in order), so once
/// it is stored the row count is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_a_burst_leaves_nothing_unacknowledged() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    sqlite_create(&db, "CREATE TABLE readings (device TEXT, seq INTEGER)").await;
    let cfg_path = dir.path().join("bridge.yaml");
    std::fs::write(&cfg_path, config(broker.port, &db, "5")).unwrap();

    let bridge = ChildBridge::start(&cfg_path);
    bridge
        .wait_for_log("subscribed", Duration::from_secs(20))
        .await;
    const N: i64 = 20_000;
    let publisher = TestClient::connect(broker.port, "burst-publisher").await;
    publisher
        .publish_all((0..N).map(|i| {
            (
                "sensors/d/telemetry".to_string(),
                format!(r#"{{"seq": {i}}}"#),
            )
        }))
        .await;
    eventually(Duration::from_secs(60), "the burst stored", async || {
        (sqlite_count(&db, "readings").await >= N).then_some(())
    })
    .await;
    let (status, _) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success());

    let bridge = ChildBridge::start(&cfg_path);
    publisher
        .publish_all([(
            "sensors/d/telemetry".to_string(),
            r#"{"seq": -1}"#.to_string(),
        )])
        .await;
    eventually(Duration::from_secs(30), "the sentinel", async || {
        (!sqlite_query(&db, "SELECT seq FROM readings WHERE seq = -1")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(
        sqlite_count(&db, "readings").await,
        N + 1,
        "messages were redelivered: their acks were lost"
    );
    drop(bridge);
}

/// Issue 5's crash scenario, external-broker mode: 20,000 QoS 1 messages from 4
/// publishers while mqbridge is killed with SIGKILL 5 times at random moments (and
/// restarted, as a supervisor would). Prints `sent / stored / lost / duplicates`; lost
/// must be 0 everywhere, duplicates 0 in the table with a conflict key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_20k_messages_loses_nothing() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE keyed (seq int PRIMARY KEY); CREATE TABLE raw (seq int)",
    )
    .await;
    let path = dir.path().join("bridge.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: crash-5, protocol: 5, receive_maximum: 200 }}
sinks:
  keyed: {{ type: postgres, url: "{db}", table: keyed, on_conflict: {{ key: [seq], action: ignore }}, batch: {{ max_rows: 200 }} }}
  raw: {{ type: postgres, url: "{db}", table: raw, batch: {{ max_rows: 200 }} }}
rules:
  - {{ name: r, from: "crash/#", transform: '{{seq: .payload.seq}}', to: [keyed, raw] }}
"#,
            port = broker.port
        ),
    )
    .unwrap();
    let mut bridge = ChildBridge::start(&path);
    bridge
        .wait_for_log("subscribed", Duration::from_secs(20))
        .await;

    const N: i64 = 20_000;
    // Publishers and the killer run side by side (joined, not spawned: the test client's
    // futures are not Send).
    let publishers = publish_numbered(broker.port, "crash-pub", 4, N, Duration::ZERO, |p, _| {
        format!("crash/p{p}")
    });
    let killer = async {
        for _ in 0..5 {
            // A random moment to strike (not a wait for something to happen).
            tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 600)).await;
            bridge.kill9();
            bridge = ChildBridge::start(&path);
        }
        bridge
    };
    let (_, bridge) = tokio::join!(publishers, killer);
    eventually(
        Duration::from_secs(120),
        "every message stored",
        async || (pg_count(&db, "SELECT count(*)::text FROM keyed").await? >= N).then_some(()),
    )
    .await;
    let stored = pg_count(&db, "SELECT count(DISTINCT seq)::text FROM raw")
        .await
        .unwrap();
    let raw_rows = pg_count(&db, "SELECT count(*)::text FROM raw")
        .await
        .unwrap();
    let keyed_rows = pg_count(&db, "SELECT count(*)::text FROM keyed")
        .await
        .unwrap();
    println!(
        "sent {N} / stored {stored} / lost {} / duplicates {} (table without key), {} (table with conflict key)",
        N - stored,
        raw_rows - stored,
        keyed_rows - N
    );
    assert_eq!(stored, N, "lost messages");
    assert_eq!(keyed_rows, N, "duplicates in the table with a conflict key");
    drop(bridge);
}
