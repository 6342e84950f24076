//! The embedded broker's persistence (`embedded.persistence`): retained messages and
//! persistent sessions (subscriptions, queued and unacknowledged messages) survive a
//! graceful restart and a `kill -9`.

use std::time::Duration;

use crate::embedded::{
    V4, config, offline_subscriber, raw_connect, raw_read_packets, raw_subscribe, start,
};
use crate::util::*;

fn persistent(port: u16, state: &std::path::Path) -> String {
    config(
        port,
        &format!(
            "  persistence: {{ path: {}, flush_interval: 50ms }}",
            state.display()
        ),
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("broker.db");
    let port = free_port();
    let yaml = persistent(port, &state);
    let bridge = start(port, &yaml).await;

    // A persistent session subscribed to jobs/#, then offline.
    offline_subscriber(port, "keeper", "jobs/#").await;
    // A second persistent session gets the messages but never acknowledges them.
    let mut raw = raw_connect(port, "slacker", false, None).await;
    raw_subscribe(&mut raw, "jobs/#");

    let mut p = V4::connect(port, "producer", true, None).await;
    p.client
        .publish("status/d1", rumqttc::QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    for i in 0..3 {
        p.client
            .publish(format!("jobs/{i}"), rumqttc::QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    }
    let got = raw_read_packets(&mut raw, 3, Duration::from_secs(5));
    assert_eq!(got.len(), 3, "{got:?}");

    bridge.stop().await.unwrap();
    drop(raw);
    let bridge = start(port, &yaml).await;

    // The retained message is back.
    let mut watcher = V4::connect(port, "watcher", true, None).await;
    watcher
        .client
        .subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let r = watcher.publish_msg().await;
    assert_eq!(
        (r.topic.as_str(), &r.payload[..], r.retain),
        ("status/d1", &b"online"[..], true)
    );

    // The offline session's queue is back, in order, and its subscription still works.
    let mut keeper = V4::connect(port, "keeper", false, None).await;
    let mut topics = Vec::new();
    for _ in 0..3 {
        topics.push(keeper.publish_msg().await.topic);
    }
    assert_eq!(topics, ["jobs/0", "jobs/1", "jobs/2"]);
    p = V4::connect(port, "producer", true, None).await;
    p.client
        .publish("jobs/after", rumqttc::QoS::AtLeastOnce, false, "y")
        .await
        .unwrap();
    assert_eq!(keeper.publish_msg().await.topic, "jobs/after");

    // The unacknowledged messages of the other session are resent with DUP.
    let mut slacker = V4::connect(port, "slacker", false, None).await;
    for i in 0..3 {
        let m = slacker.publish_msg().await;
        assert!(m.dup, "resent with DUP: {m:?}");
        assert_eq!(m.topic, format!("jobs/{i}"));
    }
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_state_survives_kill_9_after_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("broker.db");
    let port = free_port();
    let cfg = dir.path().join("mqbridge.yaml");
    std::fs::write(&cfg, persistent(port, &state)).unwrap();
    let bridge = ChildBridge::start(&cfg);
    bridge
        .wait_for_log("embedded broker listening", Duration::from_secs(20))
        .await;
    offline_subscriber(port, "keeper", "jobs/#").await;
    let mut p = V4::connect(port, "producer", true, None).await;
    p.client
        .publish("status/d1", rumqttc::QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    p.client
        .publish("jobs/1", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    // Wait for a flush to have written both, then crash.
    eventually(Duration::from_secs(10), "the state flushed", async || {
        let queued = sqlite_count(&state, "session_messages").await;
        let retained = sqlite_count(&state, "retained").await;
        (queued == 1 && retained == 1).then_some(())
    })
    .await;
    bridge.kill9();

    let bridge = ChildBridge::start(&cfg);
    bridge
        .wait_for_log("embedded broker listening", Duration::from_secs(20))
        .await;
    let mut keeper = V4::connect(port, "keeper", false, None).await;
    assert_eq!(keeper.publish_msg().await.topic, "jobs/1");
    let mut watcher = V4::connect(port, "watcher", true, None).await;
    watcher
        .client
        .subscribe("status/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(&watcher.publish_msg().await.payload[..], b"online");
    drop(bridge);
}

/// A will waiting for its delay (MQTT 5) when mqbridge stops is saved with its session,
/// and published after the restart, its delay counted from the restart: to subscribers
/// and to the rules (the broker's timer task, started by `serve`, holds the hand-off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_pending_will_survives_a_restart() {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties, Packet};

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("broker.db");
    let wills = dir.path().join("wills.db");
    sqlite_create(&wills, "CREATE TABLE wills (device TEXT, state TEXT)").await;
    let port = free_port();
    let rest = format!(
        r#"sinks:
  wills: {{ type: sqlite, path: {}, table: wills }}
rules:
  - name: wills
    from: ["gone/{{device}}"]
    transform: '{{device: .vars.device, state: .payload.state}}'
    to: [wills]"#,
        wills.display()
    );
    let yaml = config(
        port,
        &format!(
            "  persistence: {{ path: {}, flush_interval: 50ms }}",
            state.display()
        ),
        &rest,
    );
    let bridge = start(port, &yaml).await;

    // A device with a 3 s will delay and a session that outlives its connection, lost.
    let mut opts = rumqttc::v5::MqttOptions::new("d1", "127.0.0.1", port);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(600));
    opts.set_last_will(LastWill::new(
        "gone/d1",
        r#"{"state": "offline"}"#,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(3),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    ));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            rumqttc::v5::Event::Incoming(Packet::ConnAck(_))
        ) {}
    })
    .await
    .expect("connected");
    drop((client, eventloop)); // the connection closes without a DISCONNECT
    eventually(Duration::from_secs(10), "the will saved", async || {
        (sqlite_count(&state, "session_wills").await == 1).then_some(())
    })
    .await;
    bridge.stop().await.unwrap();
    assert_eq!(sqlite_count(&wills, "wills").await, 0, "not published yet");

    let restarted = std::time::Instant::now();
    let bridge = start(port, &yaml).await;
    let mut watcher = V4::connect(port, "watcher", true, None).await;
    watcher
        .subscribe_acked("gone/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let will = watcher.publish_msg().await;
    let waited = restarted.elapsed();
    assert_eq!(will.topic, "gone/d1");
    assert!(
        waited >= Duration::from_millis(2500),
        "published {waited:?} after the restart, not before its delay"
    );
    eventually(
        Duration::from_secs(10),
        "the will in the rules' table",
        async || (sqlite_count(&wills, "wills").await == 1).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the will gone from the state",
        async || (sqlite_count(&state, "session_wills").await == 0).then_some(()),
    )
    .await;
    bridge.stop().await.unwrap();
}
