//! The embedded broker with real clients: rumqttc (3.1.1 and 5), mosquitto_pub/sub and a
//! raw TCP socket, against mqbridge started in-process on a free port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use tokio::sync::mpsc;

use crate::util::*;

/// An embedded-broker config on `port`; `extra` is appended to the `embedded:` block.
pub(crate) fn config(port: u16, extra: &str, rest: &str) -> String {
    format!(
        "embedded:\n  listen: 127.0.0.1:{port}\n  allow_anonymous: true\n{extra}\n{rest}\nshutdown_timeout: 5s\n"
    )
}

pub(crate) async fn start(port: u16, yaml: &str) -> InProcess {
    let bridge = InProcess::start(yaml);
    wait_listening(port, "the broker to listen").await;
    bridge
}

/// Events of a rumqttc 3.1.1 client, polled on their own task.
pub(crate) struct V4 {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<rumqttc::Packet>,
}

impl V4 {
    pub async fn connect(port: u16, id: &str, clean: bool, will: Option<rumqttc::LastWill>) -> V4 {
        Self::connect_as(port, id, clean, will, None).await
    }

    async fn connect_as(
        port: u16,
        id: &str,
        clean: bool,
        will: Option<rumqttc::LastWill>,
        login: Option<(&str, &str)>,
    ) -> V4 {
        Self::try_connect_as(port, id, clean, will, login)
            .await
            .unwrap_or_else(|code| panic!("{id}: connection refused: {code:?}"))
    }

    /// Connects, or returns the CONNACK's return code when the broker refuses.
    pub async fn try_connect_as(
        port: u16,
        id: &str,
        clean: bool,
        will: Option<rumqttc::LastWill>,
        login: Option<(&str, &str)>,
    ) -> Result<V4, rumqttc::ConnectReturnCode> {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(clean);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some(w) = will {
            opts.set_last_will(w);
        }
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        // The CONNACK first: a refusal ends the event loop with its code.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
                .await
                .expect("a CONNACK in time")
            {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
                Err(e) => panic!("{id}: connecting failed: {e}"),
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break, // tests reconnect explicitly
                }
            }
        });
        Ok(V4 { client, events })
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe_acked(&mut self, filter: &str, qos: rumqttc::QoS) -> rumqttc::Packet {
        self.client.subscribe(filter, qos).await.unwrap();
        self.expect(|p| matches!(p, rumqttc::Packet::SubAck(_)))
            .await
    }

    /// The next packet satisfying `want` (others are skipped), within 10 s.
    pub async fn expect(&mut self, want: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let p = self.events.recv().await.expect("connection alive");
                if want(&p) {
                    return p;
                }
            }
        })
        .await
        .expect("expected packet in time")
    }

    /// Publishes a probe (QoS 0) to `topic`, which this client subscribed to, and returns
    /// the packets that arrived before the probe came back (keepalive answers left out).
    /// The broker handles a connection's packets in order and writes to a client in
    /// order, so whatever it had routed or sent to this client before it read the probe
    /// is in the answer: the proof that the path works, for a check that something did
    /// not arrive.
    pub async fn until_probe(&mut self, topic: &str) -> Vec<rumqttc::Packet> {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, false, "probe")
            .await
            .unwrap();
        let mut before = Vec::new();
        loop {
            match self.expect(|_| true).await {
                rumqttc::Packet::Publish(p) if p.topic == topic && &p.payload[..] == b"probe" => {
                    return before;
                }
                rumqttc::Packet::PingResp => {}
                other => before.push(other),
            }
        }
    }

    pub async fn publish_msg(&mut self) -> rumqttc::Publish {
        match self
            .expect(|p| matches!(p, rumqttc::Packet::Publish(_)))
            .await
        {
            rumqttc::Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }
}

/// Events of a rumqttc MQTT 5 client.
struct V5 {
    client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
}

impl V5 {
    async fn connect(port: u16, id: &str, login: Option<(&str, &str)>) -> V5 {
        let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                if let rumqttc::v5::Event::Incoming(p) = ev
                    && tx.send(p).is_err()
                {
                    break;
                }
            }
        });
        V5 { client, events }
    }

    async fn expect(
        &mut self,
        want: impl Fn(&rumqttc::v5::mqttbytes::v5::Packet) -> bool,
    ) -> rumqttc::v5::mqttbytes::v5::Packet {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let p = self.events.recv().await.expect("connection alive");
                if want(&p) {
                    return p;
                }
            }
        })
        .await
        .expect("expected packet in time")
    }
}

use rumqttc::v5::mqttbytes::v5::Packet as P5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_pub_sub_across_versions_with_qos2() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;

    let mut sub4 = V4::connect(port, "sub4", true, None).await;
    sub4.subscribe_acked("room/+/temp", rumqttc::QoS::ExactlyOnce)
        .await;
    let mut pub5 = V5::connect(port, "pub5", None).await;
    pub5.expect(|p| matches!(p, P5::ConnAck(_))).await;
    pub5.client
        .subscribe("room/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    pub5.expect(|p| matches!(p, P5::SubAck(_))).await;

    // A v5 QoS 2 publish reaches the 3.1.1 subscriber at QoS 2 and the v5 one at QoS 1.
    pub5.client
        .publish(
            "room/1/temp",
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            false,
            "21.5",
        )
        .await
        .unwrap();
    // Its own copy (subscribed to room/#) and the PUBCOMP, in either order.
    let (mut own, mut completed) = (None, false);
    while own.is_none() || !completed {
        match pub5
            .expect(|p| matches!(p, P5::PubComp(_) | P5::Publish(_)))
            .await
        {
            P5::Publish(p) => own = Some(p),
            _ => completed = true,
        }
    }
    let own = own.unwrap();
    assert_eq!(&own.topic[..], b"room/1/temp");
    assert_eq!(own.qos, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    let got = sub4.publish_msg().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.qos),
        ("room/1/temp", &b"21.5"[..], rumqttc::QoS::ExactlyOnce)
    );

    // And back: a 3.1.1 QoS 1 publish to the v5 subscriber.
    sub4.client
        .publish("room/2/hum", rumqttc::QoS::AtLeastOnce, false, "40")
        .await
        .unwrap();
    sub4.expect(|p| matches!(p, rumqttc::Packet::PubAck(_)))
        .await;
    match pub5.expect(|p| matches!(p, P5::Publish(_))).await {
        P5::Publish(p) => assert_eq!(&p.payload[..], b"40"),
        _ => unreachable!(),
    }
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_retained_set_replace_clear_and_wills() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    let mut p = V4::connect(port, "retainer", true, None).await;
    for payload in ["one", "two"] {
        p.client
            .publish("status/a", rumqttc::QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
        p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    }
    let mut s = V4::connect(port, "late", true, None).await;
    s.client
        .subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = s.publish_msg().await;
    assert!(got.retain);
    assert_eq!(&got.payload[..], b"two", "the newest retained message");
    p.client
        .publish("status/a", rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    let cleared = s.publish_msg().await;
    assert!(cleared.payload.is_empty());
    let mut s2 = V4::connect(port, "later", true, None).await;
    s2.subscribe_acked("status/#", rumqttc::QoS::AtLeastOnce)
        .await;
    let before = s2.until_probe("status/probe").await;
    assert!(before.is_empty(), "cleared, nothing retained: {before:?}");

    // Will: sent when the connection drops, not after DISCONNECT.
    let will = || {
        Some(rumqttc::LastWill::new(
            "status/gone",
            "bye",
            rumqttc::QoS::AtLeastOnce,
            false,
        ))
    };
    raw_disconnect(raw_connect(port, "polite", true, will()).await);
    let mut raw = raw_connect(port, "rude", true, will()).await;
    raw.flush().unwrap();
    drop(raw); // connection lost without DISCONNECT
    let got = s2.publish_msg().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("status/gone", &b"bye"[..])
    );
    // The polite connection had ended before the rude one began.
    let before = s2.until_probe("status/probe").await;
    assert!(
        before.is_empty(),
        "one will only (the rude one): {before:?}"
    );
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_persistent_session_queues_and_redelivers() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    offline_subscriber(port, "keeper", "jobs/#").await;

    let mut p = V4::connect(port, "producer", true, None).await;
    for i in 0..3 {
        p.client
            .publish(format!("jobs/{i}"), rumqttc::QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        p.expect(|p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    }

    // Back online, a raw client that receives but never acknowledges: the broker must
    // resend the unacknowledged messages with DUP on the next connection.
    let mut raw = raw_connect(port, "keeper", false, None).await;
    let first = raw_read_packets(&mut raw, 4, Duration::from_secs(5));
    let publishes: Vec<_> = first
        .iter()
        .filter_map(|p| match p {
            v4::Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(publishes.len(), 3, "{first:?}");
    assert!(publishes.iter().all(|p| !p.dup));
    raw_hang_up(raw);
    let mut again = V4::connect(port, "keeper", false, None).await;
    let mut topics = Vec::new();
    for _ in 0..3 {
        let p = again.publish_msg().await;
        assert!(p.dup, "redelivered with DUP");
        topics.push(p.topic);
    }
    assert_eq!(topics, ["jobs/0", "jobs/1", "jobs/2"]);
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_acl_and_passwords() {
    let port = free_port();
    let hash = mqbridge::broker::auth::hash_password("s3cret");
    let extra = format!(
        r##"  users: [{{ username: dev, password_hash: "{hash}" }}, {{ username: ops, password_hash: "{hash}" }}]
  acl:
    - {{ username: dev, action: allow, publish: ["dev/#"], subscribe: ["dev/#"] }}
    - {{ username: ops, action: allow, subscribe: ["#"] }}
    - {{ username: "*", action: deny, publish: ["#"], subscribe: ["#"] }}"##
    );
    let bridge = start(
        port,
        &config(port, &extra, "").replace("allow_anonymous: true", "allow_anonymous: false"),
    )
    .await;

    // Wrong password: 3.1.1 0x04, 5.0 0x86; anonymous: 0x05 / 0x87.
    let mut raw = raw_connect_login(port, "bad", Some(("dev", "nope")));
    assert_eq!(raw_connack_code(&mut raw), 0x04);
    let mut raw = raw_connect_login(port, "anon", None);
    assert_eq!(raw_connack_code(&mut raw), 0x05);
    let mut opts = rumqttc::v5::MqttOptions::new("bad5", "127.0.0.1", port);
    opts.set_credentials("dev", "nope");
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 10);
    match eventloop.poll().await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => assert_eq!(
            code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Right password: the ACL decides per filter and per topic. `ops` may read everything.
    let mut ops = V4::connect_as(port, "ops", true, None, Some(("ops", "s3cret"))).await;
    ops.subscribe_acked("#", rumqttc::QoS::AtLeastOnce).await;
    let mut dev = V5::connect(port, "dev5", Some(("dev", "s3cret"))).await;
    dev.expect(|p| matches!(p, P5::ConnAck(c) if c.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success)).await;
    dev.client
        .subscribe_many([
            rumqttc::v5::mqttbytes::v5::Filter::new(
                "dev/#",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            ),
            rumqttc::v5::mqttbytes::v5::Filter::new(
                "other/#",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            ),
        ])
        .await
        .unwrap();
    match dev.expect(|p| matches!(p, P5::SubAck(_))).await {
        P5::SubAck(s) => {
            use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as C;
            assert_eq!(
                s.return_codes,
                vec![
                    C::Success(rumqttc::v5::mqttbytes::QoS::AtLeastOnce),
                    C::NotAuthorized
                ]
            );
        }
        _ => unreachable!(),
    }
    dev.client
        .publish(
            "other/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "no",
        )
        .await
        .unwrap();
    match dev.expect(|p| matches!(p, P5::PubAck(_))).await {
        P5::PubAck(a) => assert_eq!(
            a.reason,
            rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized
        ),
        _ => unreachable!(),
    }
    dev.client
        .publish(
            "dev/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "yes",
        )
        .await
        .unwrap();
    match dev.expect(|p| matches!(p, P5::Publish(_))).await {
        P5::Publish(p) => assert_eq!(&p.payload[..], b"yes"),
        _ => unreachable!(),
    }
    // Published after the refused one on the same connection: had that one been routed,
    // it would have reached `ops` first.
    assert_eq!(
        ops.publish_msg().await.topic,
        "dev/x",
        "the refused one never arrives"
    );

    // 3.1.1: a refused subscription is 0x80.
    let mut dev4 = V4::connect_as(port, "dev4", true, None, Some(("dev", "s3cret"))).await;
    dev4.client
        .subscribe("secret/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    match dev4
        .expect(|p| matches!(p, rumqttc::Packet::SubAck(_)))
        .await
    {
        rumqttc::Packet::SubAck(s) => {
            assert_eq!(s.return_codes, vec![rumqttc::SubscribeReasonCode::Failure])
        }
        _ => unreachable!(),
    }
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_malformed_input_closes_only_that_connection() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    let mut good = V4::connect(port, "good", true, None).await;
    good.subscribe_acked("ok", rumqttc::QoS::AtLeastOnce).await;

    let garbage: [&[u8]; 5] = [
        b"\xff\xff\xff\xff\xff\xff",   // invalid packet type and length
        b"\x30\x05\x00\x03a+b",        // PUBLISH with a wildcard topic
        b"\x30\x06\x00\x02\xc3\x28ab", // PUBLISH with invalid UTF-8
        b"\x82\x04\x00\x01\x00\x00",   // SUBSCRIBE with no filter
        b"\x30\xff\xff\xff\x7f",       // 256 MiB PUBLISH announced
    ];
    for bytes in garbage {
        let mut raw = raw_connect(port, "bad", true, None).await;
        raw.write_all(bytes).unwrap();
        let mut rest = Vec::new();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = raw.read_to_end(&mut rest);
        assert!(
            n.is_ok(),
            "closed by the broker for {bytes:?}, not timed out: {n:?}"
        );
    }
    // Garbage before any CONNECT, too.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(raw.read_to_end(&mut Vec::new()).is_ok());

    good.client
        .publish("ok", rumqttc::QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(&good.publish_msg().await.payload[..], b"still here");
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_puback_waits_for_the_sqlite_commit() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // The rule writes to two databases; `seen` is never locked and shows when the
    // message has reached the sinks.
    let (db, seen) = (dir.path().join("t.db"), dir.path().join("seen.db"));
    for path in [&db, &seen] {
        sqlite_create(
            path,
            "CREATE TABLE readings (device TEXT, seq INTEGER, client TEXT)",
        )
        .await;
    }
    let rest = format!(
        r#"sinks:
  db: {{ type: sqlite, path: {db}, table: readings }}
  seen: {{ type: sqlite, path: {seen}, table: readings }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, seq: .payload.seq, client: .client_id}}'
    to: [db, seen]"#,
        db = db.display(),
        seen = seen.display()
    );
    let bridge = start(port, &config(port, "", &rest)).await;
    let lock = sqlite_lock(&db).await;
    let mut p = V4::connect(port, "sensor-7", true, None).await;
    p.subscribe_acked("echo/sensor-7", rumqttc::QoS::AtMostOnce)
        .await;
    p.client
        .publish(
            "sensors/d1/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"seq": 1}"#,
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the row in seen.db", async || {
        (sqlite_count(&seen, "readings").await == 1).then_some(())
    })
    .await;
    // The message reached the sinks, and whatever the broker had sent the publisher
    // arrives before the probe: the PUBACK still waits for the locked database.
    let before = p.until_probe("echo/sensor-7").await;
    assert!(
        before.is_empty(),
        "PUBACK before the row was stored: {before:?}"
    );
    drop(lock);
    p.expect(|e| matches!(e, rumqttc::Packet::PubAck(_))).await;
    assert_eq!(
        sqlite_query(&db, "SELECT seq FROM readings").await,
        vec![1],
        "the row is committed when the PUBACK arrives"
    );
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_serves_mosquitto_clients() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "m/#"])
        .args(["-q", "2", "-v", "-W", "30", "-V", "mqttv5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let (lines, _reader) = collect_lines(sub.stdout.take().unwrap());
    let publish = |topic: &str, version: &str, qos: &str| {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
            .args(["-m", "hello", "-q", qos, "-V", version])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // mosquitto_sub gives no sign when it has subscribed: probe until one arrives.
    eventually(
        Duration::from_secs(10),
        "mosquitto_sub to subscribe",
        async || {
            publish("m/probe", "mqttv5", "1");
            let lines = lines.lock().unwrap();
            lines
                .iter()
                .any(|l| l.starts_with("m/probe "))
                .then_some(())
        },
    )
    .await;
    for (version, qos) in [("mqttv311", "1"), ("mqttv5", "2")] {
        publish(&format!("m/{version}"), version, qos);
    }
    let got = eventually(Duration::from_secs(10), "both messages", async || {
        let lines = lines.lock().unwrap();
        let got: Vec<String> = lines
            .iter()
            .filter(|l| !l.starts_with("m/probe "))
            .cloned()
            .collect();
        (got.len() >= 2).then_some(got)
    })
    .await;
    assert_eq!(got, ["m/mqttv311 hello", "m/mqttv5 hello"]);
    sub.kill().unwrap();
    sub.wait().unwrap();
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_keepalive_and_client_ids() {
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    let mut watcher = V4::connect(port, "watcher", true, None).await;
    watcher
        .client
        .subscribe("gone/+", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    watcher
        .expect(|p| matches!(p, rumqttc::Packet::SubAck(_)))
        .await;

    // Keepalive 1 s and silence: closed after 1.5 s, and the will goes out.
    let mut c = v4::Connect::new("sleepy");
    c.keep_alive = 1;
    c.last_will = Some(rumqttc::LastWill::new(
        "gone/sleepy",
        "timeout",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let mut s = raw_send_connect(port, c);
    assert_eq!(raw_connack_code(&mut s), 0);
    let started = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        s.read_to_end(&mut Vec::new()).is_ok(),
        "closed, not timed out"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(&watcher.publish_msg().await.payload[..], b"timeout");

    // PINGREQ keeps a connection alive.
    let mut c = v4::Connect::new("awake");
    c.keep_alive = 1;
    let mut s = raw_send_connect(port, c);
    assert_eq!(raw_connack_code(&mut s), 0);
    // Pacing, not waiting: four pings 0.6 s apart outlast 1.5 × the keepalive.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        s.write_all(&[0xC0, 0]).unwrap();
        let mut pong = [0u8; 2];
        s.read_exact(&mut pong).unwrap();
        assert_eq!(pong, [0xD0, 0]);
    }

    // An empty client id: refused (0x02) without clean session, assigned with it.
    let mut c = v4::Connect::new("");
    c.clean_session = false;
    assert_eq!(raw_connack_code(&mut raw_send_connect(port, c)), 0x02);
    let c = v4::Connect::new("");
    assert_eq!(raw_connack_code(&mut raw_send_connect(port, c)), 0x00);
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_slow_subscriber_does_not_hold_up_publishers() {
    let port = free_port();
    let bridge = start(port, &config(port, "  max_queued_messages: 10", "")).await;
    // Subscribes, then never reads: its socket buffers fill, then its queue (10).
    let mut stuck = raw_connect(port, "stuck", true, None).await;
    raw_subscribe(&mut stuck, "load/#");

    let mut p = V4::connect(port, "firehose", true, None).await;
    let payload = vec![b'x'; 4096];
    let started = std::time::Instant::now();
    for i in 0..2000 {
        p.client
            .publish(
                format!("load/{}", i % 10),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
    }
    for _ in 0..2000 {
        p.expect(|e| matches!(e, rumqttc::Packet::PubAck(_))).await;
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // The stuck subscriber got its window's worth (max_inflight, 100 by default), not 8 MB.
    let got = raw_read_packets(&mut stuck, 5000, Duration::from_secs(2));
    let publishes = got
        .iter()
        .filter(|p| matches!(p, v4::Packet::Publish(_)))
        .count();
    assert_eq!(
        publishes, 100,
        "messages delivered to a client that acked none"
    );
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_republish_reaches_subscribers_in_process() {
    let port = free_port();
    let rest = r#"sinks:
  mirror: { type: republish, topic: "processed/{{ vars.device }}", qos: 1 }
rules:
  - name: mirror
    from: ["raw/{device}"]
    transform: '{device: .vars.device, doubled: (.payload.v * 2), by: .client_id}'
    to: [mirror]"#;
    let bridge = start(port, &config(port, "", rest)).await;
    let mut sub = V5::connect(port, "dash", None).await;
    sub.expect(|p| matches!(p, P5::ConnAck(_))).await;
    sub.client
        .subscribe("processed/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    sub.expect(|p| matches!(p, P5::SubAck(_))).await;
    let mut p = V4::connect(port, "dev-9", true, None).await;
    p.client
        .publish("raw/d9", rumqttc::QoS::AtLeastOnce, false, r#"{"v": 21}"#)
        .await
        .unwrap();
    p.expect(|e| matches!(e, rumqttc::Packet::PubAck(_))).await;
    match sub.expect(|p| matches!(p, P5::Publish(_))).await {
        P5::Publish(m) => {
            assert_eq!(&m.topic[..], b"processed/d9");
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"device": "d9", "doubled": 42, "by": "dev-9"})
            );
        }
        _ => unreachable!(),
    }
    bridge.stop().await.unwrap();
}

/// Python paho-mqtt (2.x), MQTT 5 and 3.1.1 (`MQBRIDGE_TEST_PYTHON` picks the
/// interpreter, default `python3`). Fails when paho-mqtt is missing: scripts/test.sh
/// installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_serves_python_paho() {
    let python = std::env::var("MQBRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_paho = Command::new(&python)
        .args(["-c", "import paho.mqtt.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_paho,
        "{python} has no paho-mqtt: pip install 'paho-mqtt>=2,<3', or run the tests through scripts/test.sh, which installs it"
    );
    let port = free_port();
    let bridge = start(port, &config(port, "", "")).await;
    let script = format!(
        r#"
import paho.mqtt.client as mqtt, queue, threading
got = queue.Queue()
for proto in (mqtt.MQTTv5, mqtt.MQTTv311):
    subscribed = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-sub", protocol=proto)
    sub.on_message = lambda c, u, m: got.put((m.topic, m.payload, m.qos))
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("py/#", qos=2)
    sub.on_subscribe = lambda c, u, mid, rc, p=None: subscribed.set()
    sub.connect("127.0.0.1", {port})
    sub.loop_start()
    # Wait for the SUBACK (a deadline, not a pause): publishing earlier could race it.
    assert subscribed.wait(30), "no SUBACK"
    connected = threading.Event()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="py-pub", protocol=proto)
    pub.on_connect = lambda c, u, f, rc, p=None: connected.set()
    pub.connect("127.0.0.1", {port})
    pub.loop_start()
    assert connected.wait(30), "no CONNACK"
    for qos in (0, 1, 2):
        pub.publish("py/%d" % qos, b"hello", qos=qos).wait_for_publish(30)
    for _ in range(3):
        print(got.get(timeout=30))
    pub.disconnect(); sub.disconnect(); pub.loop_stop(); sub.loop_stop()
"#
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python).args(["-c", &script]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "('py/0', b'hello', 0)",
        "('py/1', b'hello', 1)",
        "('py/2', b'hello', 2)",
    ] {
        assert_eq!(stdout.matches(line).count(), 2, "{stdout}");
    }
    bridge.stop().await.unwrap();
}

// ---- raw 3.1.1 client over a std TcpStream ----

pub(crate) async fn raw_connect(
    port: u16,
    id: &str,
    clean: bool,
    will: Option<rumqttc::LastWill>,
) -> TcpStream {
    let mut c = v4::Connect::new(id);
    c.clean_session = clean;
    c.keep_alive = 60;
    c.last_will = will;
    let mut s = raw_send_connect(port, c);
    assert_eq!(raw_connack_code(&mut s), 0);
    s
}

fn raw_connect_login(port: u16, id: &str, login: Option<(&str, &str)>) -> TcpStream {
    let mut c = v4::Connect::new(id);
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    raw_send_connect(port, c)
}

pub(crate) fn raw_send_connect(port: u16, c: v4::Connect) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut buf = BytesMut::new();
    v4::Packet::Connect(c).write(&mut buf, usize::MAX).unwrap();
    s.write_all(&buf).unwrap();
    s
}

pub(crate) fn raw_connack_code(s: &mut TcpStream) -> u8 {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b[..2], &[0x20, 2], "a CONNACK");
    b[3]
}

/// Subscribes to `filter` at QoS 1 and waits for the SUBACK.
pub(crate) fn raw_subscribe(s: &mut TcpStream, filter: &str) {
    let mut buf = BytesMut::new();
    let mut subscribe = v4::Subscribe::new(filter, rumqttc::QoS::AtLeastOnce);
    // A SUBSCRIBE's packet identifier must not be 0 (the broker closes the connection).
    subscribe.pkid = 1;
    subscribe.write(&mut buf).unwrap();
    s.write_all(&buf).unwrap();
    let ack = raw_read_packets(s, 1, Duration::from_secs(5));
    assert!(matches!(ack[..], [v4::Packet::SubAck(_)]), "{ack:?}");
}

/// Leaves a persistent session subscribed to `filter`, offline (see [`raw_disconnect`]).
pub(crate) async fn offline_subscriber(port: u16, id: &str, filter: &str) {
    let mut s = raw_connect(port, id, false, None).await;
    raw_subscribe(&mut s, filter);
    raw_disconnect(s);
}

/// Sends DISCONNECT and waits until the broker closed the connection: it has ended it by
/// then (the session is offline, the will discarded).
pub(crate) fn raw_disconnect(mut s: TcpStream) {
    s.write_all(&[0xe0, 0]).unwrap();
    raw_closed_by_broker(s);
}

/// Closes the connection without DISCONNECT (a lost connection) and waits until the
/// broker closed its side: it has ended the connection by then (the session is offline,
/// the will sent).
fn raw_hang_up(s: TcpStream) {
    s.shutdown(std::net::Shutdown::Write).unwrap();
    raw_closed_by_broker(s);
}

/// Waits until the broker closes the connection (it does so after ending it: will,
/// session), discarding what it still sends.
fn raw_closed_by_broker(mut s: TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_end(&mut Vec::new())
        .expect("the broker closes the connection in time");
}

/// Reads up to `n` packets (or until `timeout` passes without data).
pub(crate) fn raw_read_packets(s: &mut TcpStream, n: usize, timeout: Duration) -> Vec<v4::Packet> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < n {
        match v4::Packet::read(&mut buf, 1 << 20) {
            Ok(p) => {
                out.push(p);
                continue;
            }
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("bad packet from the broker: {e}"),
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    out
}
