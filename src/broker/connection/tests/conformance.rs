//! The connection's rows of `docs/conformance.md`: what needs the session's state (the
//! order of packets, packet identifiers in flight, topic aliases, the session expiry),
//! and the checks made with the broker's own settings (filters, topic names, the
//! CONNECT's refusal). Each test sends raw bytes, asserts the close and the MQTT 5
//! reason code, that nothing was routed, and that a bystander connection is still
//! served; and shows the packet without the fault accepted.

use super::*;

/// A connected MQTT 5 client that must outlive every refusal in a test.
async fn bystander(b: &TestBroker) -> Client {
    b.connect(Version::V5, Hello::new("bystander")).await
}

/// The client is told `reason` (MQTT 5) or nothing (3.1.1), and closed.
async fn closed_with(mut c: Client, reason: u8) {
    if c.version == Version::V5 {
        assert_eq!(c.recv().await, Got::Disconnect { reason });
    }
    c.closed().await;
}

/// A packet of `byte1` and `body` (shorter than 128 bytes).
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "one length byte");
    [&[byte1, body.len() as u8][..], body].concat()
}

/// A length-prefixed string.
fn s(text: &str) -> Vec<u8> {
    [&(text.len() as u16).to_be_bytes()[..], text.as_bytes()].concat()
}

/// A SUBSCRIBE of `filters`, each with its options byte.
fn subscribe(version: Version, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0); // no properties
    }
    for (filter, options) in filters {
        body.extend(s(filter));
        body.push(*options);
    }
    packet(0x82, &body)
}

/// An UNSUBSCRIBE of `filters`.
fn unsubscribe(version: Version, pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0);
    }
    for filter in filters {
        body.extend(s(filter));
    }
    packet(0xA2, &body)
}

/// [MQTT-3.1.0-1]: a first packet other than CONNECT closes the connection; nothing is
/// answered (there is no CONNACK to refuse with).
#[tokio::test]
async fn a_packet_before_the_connect_closes_the_connection_unanswered() {
    let mut b = broker("").await;
    let firsts: [&[u8]; 3] = [
        &[0xC0, 0],
        &publish(Version::V311, "t/a", 0, 0, None),
        &subscribe(Version::V311, 1, &[("t/#", 0)]),
    ];
    for first in firsts {
        let mut c = b.open(Version::V311);
        c.send(first).await;
        c.closed().await;
    }
    b.no_message();
    bystander(&b).await.ping().await;
}

/// [MQTT-3.1.0-2]: a second CONNECT is a protocol error.
#[tokio::test]
async fn a_second_connect_is_a_protocol_error() {
    let b = broker("").await;
    let mut other = bystander(&b).await;
    for version in [Version::V5, Version::V311] {
        let mut c = b.connect(version, Hello::new("twice")).await;
        c.send(&Hello::new("twice").bytes(version)).await;
        closed_with(c, 0x82).await;
        other.ping().await;
    }
}

/// [MQTT-3.1.4-5] (3.1.1), [MQTT-3.1.4-6] (5.0): what follows a refused CONNECT is not
/// processed, even when it came in the same read; after an accepted one it is.
#[tokio::test]
async fn nothing_after_a_refused_connect_is_processed() {
    let hash = crate::broker::auth::hash_password("right");
    let mut b = broker(&format!(
        "  allow_anonymous: false\n  users: [{{ username: u, password_hash: \"{hash}\" }}]"
    ))
    .await;
    for (version, refused) in [(Version::V5, 0x86), (Version::V311, 0x04)] {
        for (password, code) in [("wrong", refused), ("right", 0)] {
            let hello = Hello {
                login: Some(("u", password)),
                ..Hello::new("c")
            };
            let mut c = b.open(version);
            let topic = format!("after/{password}");
            c.send(&[hello.bytes(version), publish(version, &topic, 1, 1, None)].concat())
                .await;
            assert!(matches!(c.recv().await, Got::ConnAck { code: got, .. } if got == code));
            if code == 0 {
                assert_eq!(&*b.message().await.topic, topic);
                continue;
            }
            c.closed().await;
            b.no_message();
        }
    }
}

/// A CONNECT at fault is refused: an MQTT 5 client gets a CONNACK with the reason code,
/// a 3.1.1 client only the close ([MQTT-3.1.4-1]: no CONNACK for a CONNECT that does not
/// conform). The same CONNECT without the fault connects.
#[tokio::test]
async fn a_connect_at_fault_is_refused_with_its_reason_code() {
    let b = broker("").await;
    let mut other = bystander(&b).await;
    // The CONNECT's flags byte, after the fixed header (2 bytes) and "MQTT" and level.
    const FLAGS: usize = 9;
    let with_will = Hello {
        will: Some("w"),
        ..Hello::new("c")
    };
    fn flags(hello: Hello<'static>, set: u8) -> impl Fn(Version) -> BytesMut {
        move |v| {
            let mut bytes = hello.bytes(v);
            bytes[FLAGS] |= set;
            bytes
        }
    }
    let trailing = |v: Version| {
        let mut bytes = Hello::new("c").bytes(v);
        bytes[1] += 1;
        bytes.extend_from_slice(&[0]);
        bytes
    };
    let v5_properties = |props: v5::ConnectProperties| {
        move |_: Version| {
            let c = v5::Connect {
                keep_alive: 0,
                client_id: "c".into(),
                clean_start: true,
                properties: Some(props.clone()),
            };
            let mut buf = BytesMut::new();
            v5::Packet::Connect(c, None, None)
                .write(&mut buf, None)
                .unwrap();
            buf
        }
    };
    let receive_maximum_0 = v5::ConnectProperties {
        receive_maximum: Some(0),
        ..v5::ConnectProperties::new()
    };
    let auth_method = v5::ConnectProperties {
        authentication_method: Some("SCRAM-SHA-1".into()),
        ..v5::ConnectProperties::new()
    };
    let password_only = |v: Version| {
        let mut c = v4::Connect::new("c");
        c.set_login("", "pw");
        let mut buf = BytesMut::new();
        v4::Packet::Connect(c).write(&mut buf, usize::MAX).unwrap();
        assert_eq!(buf[FLAGS], 0x42, "{v:?}: a password without a user name");
        buf
    };
    type Build<'a> = Box<dyn Fn(Version) -> BytesMut + 'a>;
    #[rustfmt::skip]
    let cases: Vec<(&str, &[Version], Build, u8)> = vec![
        ("[MQTT-3.1.2-3] the reserved flag", &[Version::V5, Version::V311],
            Box::new(flags(Hello::new("c"), 0x01)) as Build, 0x81),
        ("[MQTT-3.1.2-11] (5.0), [MQTT-3.1.2-13] (3.1.1) will QoS without a will",
            &[Version::V5, Version::V311], Box::new(flags(Hello::new("c"), 0x08)) as Build, 0x81),
        ("[MQTT-3.1.2-12] (5.0), [MQTT-3.1.2-14] (3.1.1) will QoS 3",
            &[Version::V5, Version::V311], Box::new(flags(with_will, 0x18)) as Build, 0x81),
        ("[MQTT-3.1.4-1] a byte after the last field", &[Version::V5, Version::V311],
            Box::new(trailing) as Build, 0x81),
        ("[MQTT-1.5.4-2] U+0000 in the client identifier", &[Version::V5, Version::V311],
            Box::new(|v| Hello::new("c\0").bytes(v)) as Build, 0x81),
        ("[MQTT-3.1.2-22] a password without a user name", &[Version::V311],
            Box::new(password_only) as Build, 0x81),
        ("receive maximum 0", &[Version::V5], Box::new(v5_properties(receive_maximum_0)) as Build, 0x82),
        ("[MQTT-4.12.0-1] an authentication method (enhanced authentication)", &[Version::V5],
            Box::new(v5_properties(auth_method)) as Build, 0x8C),
    ];
    for (what, versions, build, code) in &cases {
        for &version in *versions {
            let mut c = b.open(version);
            c.send(&build(version)).await;
            if version == Version::V5 {
                assert!(
                    matches!(c.recv().await, Got::ConnAck { code: got, .. } if got == *code),
                    "{what}"
                );
            }
            c.closed().await;
            other.ping().await;
        }
    }
    for hello in [Hello::new("c"), with_will] {
        for version in [Version::V5, Version::V311] {
            b.connect(version, hello).await.ping().await;
        }
    }
}

/// [MQTT-4.12.0-7]: with no authentication method in the CONNECT (and mqbridge accepts
/// no other), an AUTH is a protocol error.
#[tokio::test]
async fn an_auth_packet_is_a_protocol_error() {
    let b = broker("").await;
    let mut other = bystander(&b).await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.ping().await;
    c.send(&[0xF0, 2, 0x19, 0]).await;
    closed_with(c, 0x82).await;
    other.ping().await;
}

/// [MQTT-4.3.3-11] (5.0), [MQTT-4.3.3-2] (3.1.1): every PUBREL is answered; for an
/// identifier whose PUBREC has not gone out, MQTT 5's PUBCOMP says 0x92 (packet
/// identifier not found), and the exchange in progress is left alone.
#[tokio::test]
async fn a_pubrel_for_an_unknown_packet_identifier_gets_pubcomp_0x92() {
    let mut b = broker("").await;
    for (version, client_id, unknown) in [(Version::V5, "c5", 0x92), (Version::V311, "c3", 0)] {
        let mut c = b.connect(version, Hello::new(client_id)).await;
        c.send(&pubrel(9)).await;
        assert_eq!(
            c.recv().await,
            Got::PubComp {
                pkid: 9,
                reason: unknown
            }
        );
        // A PUBREL before the PUBREC: not yet known either.
        c.send(&publish(version, "t/a", 2, 7, None)).await;
        let msg = b.message().await;
        c.send(&pubrel(7)).await;
        assert_eq!(
            c.recv().await,
            Got::PubComp {
                pkid: 7,
                reason: unknown
            }
        );
        msg.ack.settle();
        assert_eq!(c.recv().await, Got::PubRec { pkid: 7, reason: 0 });
        c.send(&pubrel(7)).await;
        assert_eq!(c.recv().await, Got::PubComp { pkid: 7, reason: 0 });
        c.ping().await;
    }
}

/// [MQTT-3.14.4-3]: only a DISCONNECT with reason 0x00 discards the will; a reason code a
/// client may not send [MQTT-3.14.2-1] is refused (0x82: one only a server sends; 0x81:
/// none of MQTT 5's), the DISCONNECT not taken as one, so the will goes out too.
#[tokio::test]
async fn a_disconnect_keeps_the_will_unless_its_reason_is_0() {
    let mut b = broker("").await;
    let with_will = Hello {
        will: Some("will/c"),
        ..Hello::new("c")
    };
    for (reason, refused) in [
        (0x00, None),
        (0x80, None),
        (0x8E, Some(0x82)),
        (0x05, Some(0x81)),
    ] {
        let mut c = b.connect(Version::V5, with_will).await;
        c.send(&[0xE0, 1, reason]).await;
        match refused {
            Some(code) => closed_with(c, code).await,
            None => c.closed().await,
        }
        if reason == 0x00 {
            b.no_message();
        } else {
            assert_eq!(&*b.message().await.topic, "will/c", "reason {reason:#04x}");
        }
    }
}

/// 5.0 3.14.2.2.2 (no statement number): a session expiry set on the DISCONNECT after 0
/// on the CONNECT is a protocol error, and the DISCONNECT is not a valid one (the will
/// goes out). From a non-zero expiry it may change.
#[tokio::test]
async fn a_session_expiry_raised_from_0_on_disconnect_is_a_protocol_error() {
    let mut b = broker("").await;
    let disconnect_with_expiry_10 = [0xE0, 7, 0x00, 5, 0x11, 0, 0, 0, 10];
    let zero = Hello {
        will: Some("will/zero"),
        ..Hello::new("zero")
    };
    let mut c = b.connect(Version::V5, zero).await;
    c.send(&disconnect_with_expiry_10).await;
    closed_with(c, 0x82).await;
    assert_eq!(&*b.message().await.topic, "will/zero");
    assert!(!b.shared.lock().sessions.contains_key("zero"));

    let sixty = Hello {
        will: Some("will/sixty"),
        session_expiry: Some(60),
        ..Hello::new("sixty")
    };
    let mut c = b.connect(Version::V5, sixty).await;
    c.send(&disconnect_with_expiry_10).await;
    c.closed().await;
    b.no_message();
    assert_eq!(b.shared.lock().sessions["sixty"].expiry, 10);
}

/// Filters in a SUBSCRIBE or UNSUBSCRIBE: the wildcard rules ([MQTT-4.7.1-2],
/// [MQTT-4.7.1-3] in 3.1.1; [MQTT-4.7.1-1], [MQTT-4.7.1-2] in 5.0), not empty
/// [MQTT-4.7.3-1], no U+0000 [MQTT-4.7.3-2] (0x81), an MQTT 5 share name
/// ([MQTT-4.8.2-1], [MQTT-4.8.2-2]), no local on a shared subscription [MQTT-3.8.3-4]
/// (5.0). A packet with one such filter is not applied at all.
#[tokio::test]
async fn filters_the_specifications_refuse_close_the_connection() {
    let b = broker("").await;
    let mut other = bystander(&b).await;
    let no_local = 0b0100 | 1;
    #[rustfmt::skip]
    let cases: Vec<(Version, Vec<u8>, u8)> = vec![
        (Version::V5, subscribe(Version::V5, 1, &[("a/#/b", 1)]), 0x82),
        (Version::V311, subscribe(Version::V311, 1, &[("a/#/b", 1)]), 0x82),
        (Version::V5, subscribe(Version::V5, 1, &[("a+", 1)]), 0x82),
        (Version::V311, subscribe(Version::V311, 1, &[("", 1)]), 0x82),
        (Version::V5, subscribe(Version::V5, 1, &[("a/\0", 1)]), 0x81),
        (Version::V5, subscribe(Version::V5, 1, &[("$share//a", 1)]), 0x82),
        (Version::V5, subscribe(Version::V5, 1, &[("$share/g/a", no_local)]), 0x82),
        (Version::V5, unsubscribe(Version::V5, 1, &["a#"]), 0x82),
        (Version::V311, unsubscribe(Version::V311, 1, &["a/\0"]), 0x81),
        // The first filter is valid, and not applied.
        (Version::V311, subscribe(Version::V311, 1, &[("ok/1", 1), ("a#", 1)]), 0x82),
    ];
    for (version, bytes, reason) in cases {
        let hello = Hello {
            persistent: true,
            ..Hello::new("c")
        };
        let mut c = b.connect(version, hello).await;
        c.send(&bytes).await;
        closed_with(c, reason).await;
        other.ping().await;
        if version == Version::V311 {
            let subscriptions = b.shared.lock().sessions["c"].subscriptions.len();
            assert_eq!(subscriptions, 0, "{bytes:?}");
        }
    }
    for version in [Version::V5, Version::V311] {
        let mut c = b.connect(version, Hello::new("ok")).await;
        c.send(&subscribe(version, 2, &[("a/+/#", 1), ("$share/g/a", 1)]))
            .await;
        assert_eq!(
            c.recv().await,
            Got::SubAck {
                pkid: 2,
                codes: vec![1, 1]
            }
        );
        // "$share/" means nothing in 3.1.1: "$share//a" is a filter, one not served.
        if version == Version::V311 {
            c.send(&subscribe(version, 3, &[("$share//a", 1)])).await;
            assert_eq!(
                c.recv().await,
                Got::SubAck {
                    pkid: 3,
                    codes: vec![0x80]
                }
            );
        }
        c.ping().await;
    }
}

/// Topic names: no wildcards [MQTT-3.3.2-2] (0x90), not empty without a topic alias
/// (5.0 3.3.2.1: a protocol error), no U+0000 [MQTT-4.7.3-2] (0x81). Nothing is routed.
#[tokio::test]
async fn topic_names_the_specifications_refuse_close_the_connection() {
    let mut b = broker("").await;
    let mut other = bystander(&b).await;
    for (version, topic, reason) in [
        (Version::V5, "a/+", 0x90),
        (Version::V311, "a/#", 0x82),
        (Version::V5, "", 0x82),
        (Version::V311, "", 0x82),
        (Version::V5, "a/\0", 0x81),
    ] {
        let mut c = b.connect(version, Hello::new("c")).await;
        c.send(&publish(version, topic, 1, 1, None)).await;
        closed_with(c, reason).await;
        b.no_message();
        other.ping().await;
    }
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, "a/b", 0, 0, None)).await;
    assert_eq!(&*b.message().await.topic, "a/b");
}

/// [MQTT-3.3.2-7]: topic aliases end with their connection.
#[tokio::test]
async fn topic_aliases_do_not_carry_over_to_a_new_connection() {
    let mut b = broker("").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, "t/a", 0, 0, Some(1))).await;
    assert_eq!(&*b.message().await.topic, "t/a");
    c.send(&[0xE0, 0]).await;
    c.closed().await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, "", 0, 0, Some(1))).await;
    closed_with(c, 0x82).await;
    b.no_message();
}

/// [MQTT-3.2.2-15]: a packet larger than the maximum packet size the server gave is
/// refused from its fixed header (0x95).
#[tokio::test]
async fn a_packet_larger_than_the_maximum_packet_size_is_disconnect_0x95() {
    let mut b = broker("  max_packet_size: 100").await;
    let mut other = bystander(&b).await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, &"a".repeat(90), 0, 0, None))
        .await;
    assert_eq!(b.message().await.topic.len(), 90);
    c.send(&publish(Version::V5, &"a".repeat(100), 0, 0, None))
        .await;
    closed_with(c, 0x95).await;
    b.no_message();
    other.ping().await;
}

/// A packet only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) is a protocol
/// error from a client.
#[tokio::test]
async fn a_packet_only_a_server_sends_is_a_protocol_error() {
    let b = broker("").await;
    let mut other = bystander(&b).await;
    #[rustfmt::skip]
    let cases: [(Version, &[u8]); 8] = [
        (Version::V5, &[0x20, 3, 0, 0, 0]),
        (Version::V5, &[0x90, 4, 0, 1, 0, 0]),
        (Version::V5, &[0xB0, 4, 0, 1, 0, 0]),
        (Version::V5, &[0xD0, 0]),
        (Version::V311, &[0x20, 2, 0, 0]),
        (Version::V311, &[0x90, 3, 0, 1, 0]),
        (Version::V311, &[0xB0, 2, 0, 1]),
        (Version::V311, &[0xD0, 0]),
    ];
    for (version, bytes) in cases {
        let mut c = b.connect(version, Hello::new("c")).await;
        c.ping().await;
        c.send(bytes).await;
        closed_with(c, 0x82).await;
        other.ping().await;
    }
}
