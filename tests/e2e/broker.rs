//! The broker connection: MQTT 5 properties, resubscribing after a broker restart, TLS
//! with a private CA, and password authentication.

use std::process::Command;
use std::time::Duration;

use crate::flow::{config, setup, wait_subscribed};
use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_reach_the_rules() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    sqlite_create(
        &db,
        "CREATE TABLE props (seq INTEGER, ct TEXT, site TEXT, rt TEXT)",
    )
    .await;
    let cfg = format!(
        r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: bridge-props, protocol: 5 }}
sinks: {{ db: {{ type: sqlite, path: {db}, table: props }} }}
rules:
  - name: props
    from: "v5/#"
    transform: '{{seq: .payload.seq, ct: .properties.content_type, site: .properties.user_properties.site, rt: .properties.response_topic}}'
    to: db
"#,
        port = broker.port,
        db = db.display()
    );
    let bridge = InProcess::start(&cfg);
    let port = broker.port.to_string();
    eventually(
        Duration::from_secs(20),
        "a v5 message with properties",
        async || {
            let status = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    "mqttv5",
                    "-q",
                    "1",
                    "-t",
                    "v5/x",
                ])
                .args(["-D", "publish", "content-type", "application/json"])
                .args(["-D", "publish", "user-property", "site", "plant-7"])
                .args(["-D", "publish", "response-topic", "replies/x"])
                .args(["-m", r#"{"seq": 1}"#])
                .status()
                .expect("mosquitto_pub");
            assert!(status.success());
            (sqlite_count(&db, "props").await > 0).then_some(())
        },
    )
    .await;
    let row: Vec<(i64, String, String, String)> = {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query_as("SELECT seq, ct, site, rt FROM props LIMIT 1")
            .fetch_all(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(
        row[0],
        (
            1,
            "application/json".into(),
            "plant-7".into(),
            "replies/x".into()
        )
    );
    bridge.stop().await.unwrap();
}

async fn resubscribes_after_broker_restart(protocol: &str) {
    let (mut broker, dir) = setup().await;
    let db = dir.path().join("t.db");
    let cfg = config(broker.port, dir.path(), "bridge-restart")
        .replace("protocol: 3.1.1", &format!("protocol: {protocol}"));
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(broker.port, "restart-publisher").await;
    wait_subscribed(&publisher, &db).await;

    // The new broker knows nothing of the bridge: it must reconnect and subscribe again.
    broker.restart().await;
    let mut seq = 0;
    eventually(
        Duration::from_secs(30),
        "a message after the broker restart",
        async || {
            seq += 1;
            publisher
                .publish_all([(
                    "sensors/r/telemetry".to_string(),
                    format!(r#"{{"temp": 50, "seq": {seq}}}"#),
                )])
                .await;
            (!sqlite_query(&db, "SELECT seq FROM readings WHERE seq > 0")
                .await
                .is_empty())
            .then_some(())
        },
    )
    .await;
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_broker_restart_mqtt311() {
    resubscribes_after_broker_restart("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_broker_restart_mqtt5() {
    resubscribes_after_broker_restart("5").await;
}

/// Issue 5's broker-restart scenario: 4 publishers send numbered QoS 1 messages to a
/// Mosquitto with persistence while mqbridge (persistent session, fixed client id) stores
/// them; Mosquitto is stopped gracefully (it saves its sessions) and started again twice:
/// once while the publishers are a third of the way through, once when mqbridge has
/// stored two thirds. The bridge reconnects and resumes its session, the publishers
/// publish again what was not acknowledged, and nothing is lost (20,000 messages, about 3 s
/// here). The table without a key gets many duplicates, often more than the messages:
/// after a session resumes, Mosquitto 2.0.11 stops holding to the bridge's window (receive
/// maximum, or `max_inflight_messages` for 3.1.1) and sends it its whole backlog, all of
/// which the next restart redelivers.
async fn broker_restarted_mid_stream_loses_nothing(protocol: &str) {
    let mut broker = Mosquitto::start_persistent().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, NUMBERED_TABLES).await;
    let source = format!(
        "broker: {{ url: \"mqtt://127.0.0.1:{}\", client_id: restart-bridge, protocol: {protocol} }}",
        broker.port
    );
    let path = numbered_bridge(dir.path(), &source, &db, "restart");
    let bridge = ChildBridge::start_subscribed(&path).await;

    const N: i64 = 20_000;
    const PUBLISHERS: i64 = 4;
    let port = broker.port;
    let acked = Acked::default();
    // The bridge's "connected to broker" log lines, one per connection.
    let connects = || -> Vec<String> {
        let log = bridge.log.lock().unwrap();
        let lines = log.iter().filter(|l| l.contains("connected to broker"));
        lines.cloned().collect()
    };
    let restarts = async {
        eventually(
            Duration::from_secs(60),
            "a third of the messages acknowledged",
            async || (acked.get() >= N / 3).then_some(()),
        )
        .await;
        broker.restart_gracefully().await;
        // When this never happens (messages were lost), the tally below says how many. The
        // deadline is for that case only: a busy machine took more than 20 s to get here
        // (no loss), and the second restart must not be skipped for that.
        let back = within(Duration::from_secs(120), async || {
            (connects().len() == 2
                && pg_count(&db, "SELECT count(*)::text FROM keyed").await? >= 2 * N / 3)
                .then_some(())
        })
        .await;
        match back {
            Some(()) => broker.restart_gracefully().await,
            None => println!("two thirds never stored after the first restart"),
        }
    };
    let (stats, ()) = tokio::join!(
        publish_numbered_resending(
            port,
            "restart",
            N,
            PUBLISHERS,
            Duration::from_secs(120),
            &acked
        ),
        restarts
    );
    println!(
        "publishers: {} connections, {} PUBLISH packets for {N} messages",
        stats.connections, stats.publishes
    );
    assert!(
        stats.connections > PUBLISHERS as u64,
        "the first restart cut no publisher's connection: {stats:?}"
    );
    assert_numbered_stored_once(&db, N, Duration::from_secs(60)).await;
    // The first connection and one after each restart, each finding its session. All may
    // be stored before the bridge is back from the second restart (its reconnect backs
    // off while the broker is starting), so the third connection is waited for.
    let connects = within(Duration::from_secs(30), async || {
        let connects = connects();
        (connects.len() >= 3).then_some(connects)
    })
    .await
    .unwrap_or_else(connects);
    assert!(
        connects.len() == 3
            && connects[1..]
                .iter()
                .all(|l| l.contains("session_present=true")),
        "the bridge should have resumed its session after each restart: {connects:#?}"
    );
    drop(bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_stream_loses_nothing_mqtt311() {
    broker_restarted_mid_stream_loses_nothing("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_stream_loses_nothing_mqtt5() {
    broker_restarted_mid_stream_loses_nothing("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_password_from_a_file() {
    let tls_port = free_port();
    let broker = Mosquitto::start_with(|dir, port| {
        make_certs(dir);
        run_ok(Command::new("mosquitto_passwd").current_dir(dir).args([
            "-c",
            "-b",
            "passwd",
            "bridge",
            "s3cret pass",
        ]));
        format!(
            "per_listener_settings true\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n\
             listener {tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwd\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            d = dir.display()
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    sqlite_create(
        &db,
        "CREATE TABLE readings (device TEXT, seq INTEGER, temp REAL, ts TEXT)",
    )
    .await;
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, "s3cret pass\n").unwrap();
    let cfg = config(tls_port, dir.path(), "bridge-tls").replace(
        &format!("url: mqtt://127.0.0.1:{tls_port}"),
        &format!(
            "url: mqtts://bridge@localhost:{tls_port}\n  ca_file: {}\n  password_file: {}",
            broker.dir.path().join("ca.pem").display(),
            secret.display()
        ),
    );
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(broker.port, "tls-publisher").await;
    wait_subscribed(&publisher, &db).await;
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_pass_within_max_packet_size() {
    let (broker, dir) = setup().await;
    let db = dir.path().join("t.db");
    let bridge = InProcess::start(&config(broker.port, dir.path(), "bridge-large"));
    let publisher = TestClient::connect(broker.port, "large-publisher").await;
    wait_subscribed(&publisher, &db).await;
    // A 3 MiB JSON payload (rumqttc's own default limit is 10 KiB).
    let big = "x".repeat(3 << 20);
    publisher
        .publish_all([(
            "sensors/big/telemetry".to_string(),
            format!(r#"{{"temp": 42, "seq": 1, "blob": "{big}"}}"#),
        )])
        .await;
    eventually(
        std::time::Duration::from_secs(30),
        "the large message",
        async || {
            (!sqlite_query(&db, "SELECT seq FROM readings WHERE seq = 1")
                .await
                .is_empty())
            .then_some(())
        },
    )
    .await;
    bridge.stop().await.unwrap();
}
