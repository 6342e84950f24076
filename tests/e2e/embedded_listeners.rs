//! The embedded broker's TLS and WebSocket listeners with rumqttc clients: MQTT over TLS
//! (a private CA made with openssl), over `ws://…/mqtt` and over `wss://…/mqtt`, all
//! reaching the same subscribers and the rules.

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
