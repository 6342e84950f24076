//! The embedded broker's limits and counters: `max_connections`, publishes refused by the
//! ACL (read through `Broker::stats`), `session_expiry` (offline 3.1.1 persistent
//! sessions expire; MQTT 5 clients get at most it), `max_connecting` (connections
//! before their CONNECT), and the figures published on `$SYS`.

use std::io::Read;
use std::time::Duration;

use mqbridge::source::Source;
use mqbridge::source::intake::Handoff;
use rumqttc::mqttbytes::v4;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::embedded::{V4, config, offline_subscriber, raw_connack_code, raw_send_connect};
use crate::util::*;

/// The embedded broker on its own (no rules, its messages settled at once) on `port`
/// with the `embedded:` `settings`, so that a test sees every connection it makes and can
/// read the broker's stats.
struct Alone {
    broker: mqbridge::broker::Broker,
    stop: CancellationToken,
    done: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), std::convert::Infallible>>,
}

async fn alone(port: u16, settings: &str) -> Alone {
    let plan = mqbridge::config::parse(&config(port, settings, ""), "t.yaml", |_| None)
        .unwrap()
        .embedded
        .unwrap();
    let broker = mqbridge::broker::Broker::open(plan).await.unwrap();
    let (tx, mut rx) = mpsc::channel::<mqbridge::message::Message>(64);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            m.ack.settle();
        }
    });
    let (stop, done) = (CancellationToken::new(), CancellationToken::new());
    let listening = broker.clone().listen().await.unwrap();
    let task = tokio::spawn(listening.run(Handoff::new(tx), stop.clone(), done.clone()));
    Alone {
        broker,
        stop,
        done,
        task,
    }
}

impl Alone {
    async fn stop(self) {
        self.stop.cancel();
        self.done.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_max_connections_and_refused_publishes_are_counted() {
    let port = free_port();
    let running = alone(
        port,
        "  max_connections: 2\n  acl:\n    - { username: \"*\", action: deny, publish: [\"secret/#\"] }",
    )
    .await;
    wait_listening(port, "the broker to listen").await;
    let idle = async || (running.broker.stats().connections == 0).then_some(());
    eventually(Duration::from_secs(10), "the probe to go", idle).await;

    let a = V4::connect(port, "a", true, None).await;
    let mut b = V4::connect(port, "b", true, None).await;
    let mut third = raw_send_connect(port, v4::Connect::new("c"));
    assert_eq!(raw_connack_code(&mut third), 3, "3.1.1: server unavailable");
    let mut rest = Vec::new();
    let _ = third.read_to_end(&mut rest); // closed by the broker
    assert_eq!(running.broker.stats().connections_refused, 1);

    a.client.disconnect().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "a's connection to end",
        async || (running.broker.stats().connections == 1).then_some(()),
    )
    .await;
    let _c = V4::connect(port, "c", true, None).await;

    // A publish the ACL refuses is acknowledged (3.1.1 cannot refuse), dropped and counted.
    b.client
        .publish("secret/x", rumqttc::QoS::AtLeastOnce, false, "no")
        .await
        .unwrap();
    b.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    b.client
        .publish("open/x", rumqttc::QoS::AtLeastOnce, false, "yes")
        .await
        .unwrap();
    b.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    let stats = running.broker.stats();
    assert_eq!(
        (stats.publish_denied, stats.connections),
        (1, 2),
        "{stats:?}"
    );

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_offline_311_sessions_expire() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("broker.db");
    let port = free_port();
    let yaml = config(
        port,
        &format!(
            "  session_expiry: 1s\n  persistence: {{ path: {}, flush_interval: 20ms }}",
            state.display()
        ),
        "",
    );
    let bridge = crate::embedded::start(port, &yaml).await;
    offline_subscriber(port, "keeper", "jobs/#").await;
    // The state file shows the session kept, then dropped once it expired.
    eventually(Duration::from_secs(10), "the session saved", async || {
        (sqlite_count(&state, "sessions").await == 1).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the session expired", async || {
        (sqlite_count(&state, "sessions").await == 0).then_some(())
    })
    .await;
    let mut c = v4::Connect::new("keeper");
    c.clean_session = false;
    let mut s = raw_send_connect(port, c);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "accepted, no session present");
    drop(s);

    // An MQTT 5 client asking for a longer expiry is granted the configured one, and told.
    let mut opts = rumqttc::v5::MqttOptions::new("five", "127.0.0.1", port);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(100_000));
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(a)) =
                eventloop.poll().await.unwrap()
            {
                return a;
            }
        }
    })
    .await
    .unwrap();
    let granted = connack.properties.and_then(|p| p.session_expiry_interval);
    assert_eq!(granted, Some(1));
    bridge.stop().await.unwrap();
}

/// `max_connecting`: with two connections stuck before their CONNECT, a third is not
/// served until `connect_timeout` has closed them; clients past their CONNECT do not
/// count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_max_connecting_holds_new_connections_until_a_handshake_ends() {
    let port = free_port();
    let running = alone(port, "  max_connecting: 2\n  connect_timeout: 1s").await;
    // A connected client holds no permit.
    let _connected = V4::connect(port, "connected", true, None).await;

    // Before the silent ones connect: their connect_timeout cannot start earlier.
    let started = std::time::Instant::now();
    let mut silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut third = raw_send_connect(port, v4::Connect::new("third"));
    assert_eq!(raw_connack_code(&mut third), 0, "the third is served");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "the third waited for connect_timeout to free a permit ({:?})",
        started.elapsed()
    );
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(s.read(&mut b), Ok(0) | Err(_)),
            "a silent connection was closed"
        );
    }

    running.stop().await;
}

/// `connection_rate_per_ip`: at 0.1 per second (a burst of one), a second connection from
/// the same address within ten seconds is closed before its CONNECT is read; the first
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_connection_rate_per_ip_closes_the_excess_at_once() {
    let port = free_port();
    let running = alone(port, "  connection_rate_per_ip: 0.1").await;
    let mut first = raw_send_connect(port, v4::Connect::new("first"));
    assert_eq!(raw_connack_code(&mut first), 0, "the first is served");
    let mut second = raw_send_connect(port, v4::Connect::new("second"));
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 4];
    assert!(
        matches!(second.read(&mut b), Ok(0) | Err(_)),
        "the second is closed without a CONNACK"
    );
    // The first connection is unaffected.
    let mut ping = [0xC0u8, 0];
    std::io::Write::write_all(&mut first, &ping).unwrap();
    first.read_exact(&mut ping).unwrap();
    assert_eq!(ping, [0xD0, 0], "PINGRESP");

    running.stop().await;
}

/// Matches a PUBLISH of `value` on `topic`.
fn figure(topic: &'static str, value: &'static str) -> impl Fn(&rumqttc::Packet) -> bool {
    move |p| matches!(p, rumqttc::Packet::Publish(m) if m.topic == topic && m.payload == value.as_bytes())
}

/// `$SYS/broker/…` on `sys_interval`: the figures reach the users the ACL lets read
/// them, follow the broker's state, and reach no one else; a client cannot publish there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sys_topics_reach_whom_the_acl_allows_and_no_client_can_publish_there() {
    let port = free_port();
    let hash = mqbridge::broker::auth::hash_password("ops-secret");
    let running = alone(
        port,
        &format!(
            "  sys_interval: 100ms\n  users:\n    - {{ username: ops, password_hash: \"{hash}\" }}\n  acl:\n    - {{ username: ops, action: allow, subscribe: [\"$SYS/#\"] }}\n    - {{ username: \"*\", action: deny, subscribe: [\"$SYS/#\"] }}"
        ),
    )
    .await;
    // `alone` returns once the listener is bound.
    let mut ops = V4::try_connect_as(port, "ops", true, None, Some(("ops", "ops-secret")))
        .await
        .unwrap();
    ops.subscribe_acked("probe/ops", rumqttc::QoS::AtMostOnce)
        .await;
    ops.subscribe_acked("$SYS/broker/#", rumqttc::QoS::AtMostOnce)
        .await;
    // The retained figures at once (the version among them), then the next round's.
    let version = match ops
        .expect(|p| matches!(p, rumqttc::Packet::Publish(m) if m.topic == "$SYS/broker/version"))
        .await
    {
        rumqttc::Packet::Publish(m) => String::from_utf8(m.payload.to_vec()).unwrap(),
        _ => unreachable!(),
    };
    assert!(version.starts_with("mqbridge version "), "{version}");
    ops.expect(figure("$SYS/broker/clients/connected", "1"))
        .await;

    // Another client: the figure follows. It may not read `$SYS`, and a filter that
    // does not start with `$` never matches there.
    let mut dev = V4::connect(port, "dev", true, None).await;
    ops.expect(figure("$SYS/broker/clients/connected", "2"))
        .await;
    match dev
        .subscribe_acked("$SYS/#", rumqttc::QoS::AtMostOnce)
        .await
    {
        rumqttc::Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            [rumqttc::SubscribeReasonCode::Failure],
            "the ACL refuses it"
        ),
        other => panic!("{other:?}"),
    }
    dev.subscribe_acked("#", rumqttc::QoS::AtMostOnce).await;
    // dev publishes to `$SYS`: acknowledged (3.1.1 cannot refuse) and dropped.
    dev.client
        .publish(
            "$SYS/broker/version",
            rumqttc::QoS::AtLeastOnce,
            true,
            "fake",
        )
        .await
        .unwrap();
    dev.expect(|p| matches!(p, rumqttc::Packet::PubAck(_)))
        .await;
    // A round of figures after all that (the uptime moves every second) ...
    let uptime = |p: &rumqttc::Packet| matches!(p, rumqttc::Packet::Publish(m) if m.topic == "$SYS/broker/uptime" && &m.payload[..] != b"0 seconds");
    ops.expect(uptime).await;
    // ... reached ops but not dev, and the fake version reached no one.
    let dev_got = dev.until_probe("probe/dev").await;
    assert!(
        !dev_got
            .iter()
            .any(|p| matches!(p, rumqttc::Packet::Publish(m) if m.topic.starts_with("$SYS"))),
        "{dev_got:?}"
    );
    let ops_got = ops.until_probe("probe/ops").await;
    assert!(
        !ops_got
            .iter()
            .any(|p| matches!(p, rumqttc::Packet::Publish(m) if &m.payload[..] == b"fake")),
        "{ops_got:?}"
    );
    assert_eq!(running.broker.stats().publish_denied, 1);

    running.stop().await;
}

/// A client whose input never stops (QoS 0 to a topic nobody reads, written from a thread
/// of its own) does not keep the broker from its other clients: a QoS 1 publisher beside
/// it has each of its messages acknowledged. Before the reads took from tokio's task
/// budget, the flooding connection's task never gave its worker back, and the publisher
/// waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_flooding_client_does_not_starve_the_others() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let port = free_port();
    let running = alone(port, "").await;
    let mut flood = crate::embedded::raw_connect(port, "flood", true, None).await;
    let mut batch = bytes::BytesMut::new();
    while batch.len() < 64 << 10 {
        v4::Publish::new("flood/x", rumqttc::QoS::AtMostOnce, vec![b'f'; 100])
            .write(&mut batch)
            .unwrap();
    }
    let flooding = Arc::new(AtomicBool::new(true));
    let flooder = std::thread::spawn({
        let flooding = Arc::clone(&flooding);
        move || {
            while flooding.load(Ordering::Relaxed) && flood.write_all(&batch).is_ok() {}
        }
    });
    let steady = tokio::task::spawn_blocking(move || {
        let mut c = v4::Connect::new("steady");
        c.keep_alive = 60;
        let mut s = crate::embedded::raw_send_connect(port, c);
        let got = crate::embedded::raw_read_packets(&mut s, 1, Duration::from_secs(10));
        if !matches!(&got[..], [v4::Packet::ConnAck(_)]) {
            return Err(format!("CONNACK expected, got {got:?}"));
        }
        for pkid in 1..=50u16 {
            let mut p = v4::Publish::new("steady/x", rumqttc::QoS::AtLeastOnce, "x");
            p.pkid = pkid;
            let mut buf = bytes::BytesMut::new();
            p.write(&mut buf).unwrap();
            s.write_all(&buf).map_err(|e| e.to_string())?;
            match &crate::embedded::raw_read_packets(&mut s, 1, Duration::from_secs(10))[..] {
                [v4::Packet::PubAck(a)] if a.pkid == pkid => {}
                other => return Err(format!("PUBACK {pkid} expected, got {other:?}")),
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    flooding.store(false, Ordering::Relaxed);
    flooder.join().unwrap();
    if let Err(e) = steady {
        panic!("the publisher beside the flood: {e}");
    }
    running.stop().await;
}
