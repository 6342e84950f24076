//! The embedded broker's TLS and WebSocket listeners with rumqttc clients: MQTT over TLS
//! (a private CA made with openssl), over `ws://…/mqtt` and over `wss://…/mqtt`, all
//! reaching the same subscribers and the rules; and client certificates (mutual TLS) on
//! both TLS transports, naming the user the ACL then applies to.

use std::path::Path;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;

use crate::embedded::config;
use crate::util::*;

/// A rumqttc 3.1.1 client on `transport`; returns once connected.
async fn client(
    mut opts: MqttOptions,
    transport: Transport,
) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(transport);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("test client: {e}");
                    break;
                }
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("connected in time");
    assert!(
        matches!(first, Some(Packet::ConnAck(ref a)) if a.code == rumqttc::ConnectReturnCode::Success),
        "{first:?}"
    );
    (client, rx)
}

async fn next_publish(rx: &mut mpsc::UnboundedReceiver<Packet>) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await.expect("connection alive") {
                Packet::Publish(p) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("a message in time")
}

async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Packet>, want: fn(&Packet) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !want(&rx.recv().await.expect("connection alive")) {}
    })
    .await
    .expect("the packet in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_serves_tls_websocket_and_secure_websocket() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let d = dir.path().display();
    let (port, tls_port, ws_port, wss_port) = (free_port(), free_port(), free_port(), free_port());
    let db = dir.path().join("m.db");
    let yaml = config(
        port,
        &format!(
            "  tls: {{ listen: 127.0.0.1:{tls_port}, cert_file: {d}/server.pem, key_file: {d}/server.key }}\n  websocket: {{ listen: 127.0.0.1:{ws_port} }}"
        ),
        &format!(
            "sinks:\n  db: {{ type: sqlite, path: {}, table: mqbridge_messages, migrate: true }}\nrules:\n  - {{ name: all, from: ['t/#'], decode: text, to: [db] }}",
            db.display()
        ),
    );
    let bridge = crate::embedded::start(port, &yaml).await;

    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let tls = || {
        Transport::tls_with_config(TlsConfiguration::Simple {
            ca: ca.clone(),
            alpn: None,
            client_auth: None,
        })
    };
    let (sub, mut sub_rx) = client(MqttOptions::new("tls-sub", "localhost", tls_port), tls()).await;
    sub.subscribe("t/#", QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut sub_rx, |p| matches!(p, Packet::SubAck(_))).await;

    let (ws, mut ws_rx) = client(
        MqttOptions::new("ws-pub", format!("ws://127.0.0.1:{ws_port}/mqtt"), ws_port),
        Transport::Ws,
    )
    .await;
    ws.publish("t/ws", QoS::AtLeastOnce, false, "over websocket")
        .await
        .unwrap();
    wait_for(&mut ws_rx, |p| matches!(p, Packet::PubAck(_))).await;
    let m = next_publish(&mut sub_rx).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("t/ws", &b"over websocket"[..])
    );

    // And the other way: published over TLS, received over WebSocket.
    ws.subscribe("back/#", QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut ws_rx, |p| matches!(p, Packet::SubAck(_))).await;
    sub.publish("back/1", QoS::AtLeastOnce, false, vec![7u8; 100_000])
        .await
        .unwrap();
    let m = next_publish(&mut ws_rx).await;
    assert_eq!((m.topic.as_str(), m.payload.len()), ("back/1", 100_000));

    // The PUBACK above came after the row was stored.
    assert_eq!(sqlite_count(&db, "mqbridge_messages").await, 1);

    // Only /mqtt is served.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
        .await
        .unwrap();
    let refused =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{ws_port}/other"), tcp).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404)
        }
        other => panic!("expected 404, got {other:?}"),
    }
    bridge.stop().await.unwrap();

    // wss only (the certificate of `tls`, no TLS listener of its own).
    let port = free_port();
    let yaml = config(
        port,
        &format!(
            "  tls: {{ listen: [], cert_file: {d}/server.pem, key_file: {d}/server.key }}\n  websocket: {{ listen: 127.0.0.1:{wss_port}, tls: true }}"
        ),
        "",
    );
    let bridge = crate::embedded::start(port, &yaml).await;
    let (wss, mut wss_rx) = client(
        MqttOptions::new(
            "wss-c",
            format!("wss://localhost:{wss_port}/mqtt"),
            wss_port,
        ),
        Transport::wss_with_config(TlsConfiguration::Simple {
            ca: ca.clone(),
            alpn: None,
            client_auth: None,
        }),
    )
    .await;
    wss.subscribe("s/#", QoS::AtLeastOnce).await.unwrap();
    wait_for(&mut wss_rx, |p| matches!(p, Packet::SubAck(_))).await;
    wss.publish("s/1", QoS::AtLeastOnce, false, "secure")
        .await
        .unwrap();
    assert_eq!(&next_publish(&mut wss_rx).await.payload[..], b"secure");
    bridge.stop().await.unwrap();
}

/// TLS trusting the test CA, with the client certificate `cert` of `dir` (`device`: CN
/// `device-7` from the broker's CA; `stranger`: the same CN from another CA) or none.
fn tls_as(dir: &Path, cert: Option<&str>) -> TlsConfiguration {
    let read = |file: &str| std::fs::read(dir.join(file)).unwrap();
    TlsConfiguration::Simple {
        ca: read("ca.pem"),
        alpn: None,
        client_auth: cert.map(|c| (read(&format!("{c}.pem")), read(&format!("{c}.key")))),
    }
}

/// How the broker refuses a client that must not connect (a ConnAck accepting it fails
/// the test).
async fn refusal(mut opts: MqttOptions, transport: Transport) -> rumqttc::ConnectionError {
    opts.set_transport(transport);
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => panic!("connected: {a:?}"),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("refused in time")
}

/// Refused by the TLS handshake (rustls's alert), not by a CONNACK.
fn assert_tls_refusal(e: &rumqttc::ConnectionError, alert: &str) {
    assert!(
        !matches!(e, rumqttc::ConnectionError::ConnectionRefused(_))
            && e.to_string().contains(alert),
        "expected a TLS alert {alert}, got {e:?}"
    );
}

/// ACL rules that let `device-7` (and only it) publish and subscribe under `d/7/`.
const DEVICE_ACL: &str = r##"  acl:
    - { username: device-7, action: allow, publish: ["d/7/#"], subscribe: ["d/7/#"] }
    - { username: "*", action: deny, publish: ["#"], subscribe: ["#"] }
"##;

/// The certificate's CN is the client's identity: the ACL grants `device-7` its topics
/// (and the message flows), while the CONNECT's username and password are not looked at.
async fn assert_device_7(client: &AsyncClient, rx: &mut mpsc::UnboundedReceiver<Packet>) {
    client.subscribe("d/7/#", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("d/8/#", QoS::AtLeastOnce).await.unwrap();
    for granted in [true, false] {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Packet::SubAck(a) = rx.recv().await.expect("connection alive") {
                    let ok = matches!(
                        a.return_codes[..],
                        [rumqttc::SubscribeReasonCode::Success(_)]
                    );
                    assert_eq!(ok, granted, "{a:?}");
                    return;
                }
            }
        })
        .await
        .expect("a SUBACK in time");
    }
    client
        .publish("d/7/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let m = next_publish(rx).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("d/7/temp", &b"21.5"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_client_certificates_name_the_user_on_mqtts_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    make_client_certs(dir.path());
    let d = dir.path().display();
    let (port, tls_port, wss_port) = (free_port(), free_port(), free_port());
    // No users and no anonymous clients: a certificate is the only way in.
    let yaml = format!(
        "embedded:\n  listen: 127.0.0.1:{port}\n  tls: {{ listen: 127.0.0.1:{tls_port}, cert_file: {d}/server.pem, key_file: {d}/server.key, client_ca_file: {d}/ca.pem, username_from: cn }}\n  websocket: {{ listen: 127.0.0.1:{wss_port}, tls: true }}\n{DEVICE_ACL}shutdown_timeout: 5s\n"
    );
    let bridge = crate::embedded::start(port, &yaml).await;
    let mqtts = |id: &str| {
        let mut opts = MqttOptions::new(id, "localhost", tls_port);
        opts.set_credentials("intruder", "not checked");
        opts
    };
    let wss = |id: &str| MqttOptions::new(id, format!("wss://localhost:{wss_port}/mqtt"), wss_port);

    let (c, mut rx) = client(
        mqtts("dev-tls"),
        Transport::tls_with_config(tls_as(dir.path(), Some("device"))),
    )
    .await;
    assert_device_7(&c, &mut rx).await;
    let (c, mut rx) = client(
        wss("dev-wss"),
        Transport::wss_with_config(tls_as(dir.path(), Some("device"))),
    )
    .await;
    assert_device_7(&c, &mut rx).await;

    // No certificate, or one from another CA (with the same CN): refused at the handshake,
    // on both transports.
    for (cert, alert) in [
        (None, "CertificateRequired"),
        (Some("stranger"), "UnknownCA"),
    ] {
        let e = refusal(
            mqtts("x"),
            Transport::tls_with_config(tls_as(dir.path(), cert)),
        )
        .await;
        assert_tls_refusal(&e, alert);
        let e = refusal(
            wss("x"),
            Transport::wss_with_config(tls_as(dir.path(), cert)),
        )
        .await;
        assert_tls_refusal(&e, alert);
    }
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_optional_client_certificates_fall_back_to_the_password() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    make_client_certs(dir.path());
    let d = dir.path().display();
    let (port, tls_port) = (free_port(), free_port());
    let hash = mqbridge::broker::auth::hash_password("right");
    let yaml = format!(
        "embedded:\n  listen: 127.0.0.1:{port}\n  tls: {{ listen: 127.0.0.1:{tls_port}, cert_file: {d}/server.pem, key_file: {d}/server.key, client_ca_file: {d}/ca.pem, require_client_cert: false, username_from: cn }}\n  users: [{{ username: sensor, password_hash: \"{hash}\" }}]\n{DEVICE_ACL}shutdown_timeout: 5s\n"
    );
    let bridge = crate::embedded::start(port, &yaml).await;
    let opts = |id: &str, login: Option<(&str, &str)>| {
        let mut opts = MqttOptions::new(id, "localhost", tls_port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        opts
    };
    let tls = |cert| Transport::tls_with_config(tls_as(dir.path(), cert));

    // Without a certificate: the password decides.
    client(opts("sensor", Some(("sensor", "right"))), tls(None)).await;
    let e = refusal(opts("sensor", Some(("sensor", "wrong"))), tls(None)).await;
    assert!(
        matches!(
            e,
            rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::BadUserNamePassword
            )
        ),
        "{e:?}"
    );
    // With one: it names the user, no password needed.
    let (c, mut rx) = client(opts("dev", None), tls(Some("device"))).await;
    assert_device_7(&c, &mut rx).await;
    // A certificate presented must still be valid.
    assert_tls_refusal(
        &refusal(opts("x", None), tls(Some("stranger"))).await,
        "UnknownCA",
    );
    bridge.stop().await.unwrap();
}
