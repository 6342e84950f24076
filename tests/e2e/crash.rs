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

    let bridge = ChildBridge::start_subscribed(&cfg_path).await;

    // Hold SQLite's write lock so nothing can settle, publish, and wait until the bridge
    // is retrying: the messages are in mqbridge's hands, unacknowledged.
    let lock = sqlite_lock(&db).await;
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

    let bridge = ChildBridge::start_subscribed(&cfg_path).await;
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
    kill_9_five_times_during_20k_messages(false).await;
}

/// The same with the spool: messages are acknowledged once on mqbridge's disk, so every
/// kill also finds records in the spool that the sinks have not taken yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_during_20k_messages_with_the_spool_loses_nothing() {
    kill_9_five_times_during_20k_messages(true).await;
}

/// A `spool:` line for a config in `dir` (an empty line without one).
fn spool_in(dir: &std::path::Path, spool: bool) -> String {
    if spool {
        format!("spool: {{ path: {} }}", dir.join("spool").display())
    } else {
        String::new()
    }
}

async fn kill_9_five_times_during_20k_messages(spool: bool) {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, NUMBERED_TABLES).await;
    let source = format!(
        "broker: {{ url: \"mqtt://127.0.0.1:{}\", client_id: crash-5, protocol: 5, receive_maximum: 200 }}\n{}",
        broker.port,
        spool_in(dir.path(), spool)
    );
    let path = numbered_bridge(dir.path(), &source, &db, "crash");
    let bridge = ChildBridge::start_subscribed(&path).await;

    const N: i64 = 20_000;
    let acked = Acked::default();
    let (_, bridge) = tokio::join!(
        publish_numbered_resending(broker.port, "crash", N, 4, Duration::from_secs(120), &acked),
        kill_9_at_random_moments(bridge, &path, &db, N)
    );
    assert_numbered_stored_once(&db, N, Duration::from_secs(120)).await;
    drop(bridge);
}

/// Issue 5's crash scenario, embedded-broker mode: 4 devices publish 20,000 numbered QoS 1
/// messages to mqbridge itself while it is killed with SIGKILL 5 times and restarted on
/// the same port. Its PUBACK means "stored", so every message a device saw acknowledged
/// is in both tables, and the devices publish again whatever was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_five_times_during_20k_messages_loses_nothing() {
    embedded_kill_9_five_times_during_20k_messages(false).await;
}

/// The same with the spool: a device's PUBACK then means "in the spool".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_five_times_during_20k_messages_with_the_spool_loses_nothing() {
    embedded_kill_9_five_times_during_20k_messages(true).await;
}

async fn embedded_kill_9_five_times_during_20k_messages(spool: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, NUMBERED_TABLES).await;
    let port = free_port();
    let source = format!(
        r#"
embedded:
  listen: 127.0.0.1:{port}
  allow_anonymous: true
  persistence: {{ path: {state}, flush_interval: 50ms }}
{spool}"#,
        state = dir.path().join("broker.db").display(),
        spool = spool_in(dir.path(), spool),
    );
    let path = numbered_bridge(dir.path(), &source, &db, "devices");
    let bridge = ChildBridge::start(&path);
    bridge
        .wait_for_log("embedded broker listening", Duration::from_secs(20))
        .await;

    const N: i64 = 20_000;
    const PUBLISHERS: i64 = 4;
    let acked = Acked::default();
    let (stats, bridge) = tokio::join!(
        publish_numbered_resending(
            port,
            "devices",
            N,
            PUBLISHERS,
            Duration::from_secs(180),
            &acked
        ),
        kill_9_at_random_moments(bridge, &path, &db, N)
    );
    println!(
        "publishers: {} connections, {} PUBLISH packets for {N} messages",
        stats.connections, stats.publishes
    );
    assert!(
        stats.connections > PUBLISHERS as u64,
        "the kills never cut a publisher's connection: {stats:?}"
    );
    assert_numbered_stored_once(&db, N, Duration::from_secs(60)).await;
    drop(bridge);
}

/// Kills `bridge` with SIGKILL 5 times and starts it again from `config` each time, as a
/// supervisor would; returns the last one. Kill number k comes at a random moment (up to
/// 300 ms) after the `keyed` table of `db` holds k/6 of the `n` messages, so that every
/// kill lands mid-stream. When that count stops short (messages were lost), it stops
/// killing, so that the tally can say how many.
async fn kill_9_at_random_moments(
    mut bridge: ChildBridge,
    config: &std::path::Path,
    db: &str,
    n: i64,
) -> ChildBridge {
    for k in 1..=5 {
        let reached = within(Duration::from_secs(20), async || {
            (pg_count(db, "SELECT count(*)::text FROM keyed").await? >= k * n / 6).then_some(())
        })
        .await;
        if reached.is_none() {
            println!(
                "{k}/6 of the messages never stored: stopped killing after {} kills",
                k - 1
            );
            break;
        }
        // A random moment to strike (not a wait for something to happen).
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 300)).await;
        bridge.kill9();
        bridge = ChildBridge::start(config);
    }
    bridge
}
