use super::*;
use proptest::prelude::*;

fn frame_of(bytes: &[u8]) -> BytesMut {
    let mut buf = BytesMut::from(bytes);
    take_frame(&mut buf, 1 << 20).unwrap().unwrap()
}

fn v4_bytes(p: v4::Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    p.write(&mut buf, usize::MAX).unwrap();
    buf
}

fn v5_bytes(p: v5::Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    p.write(&mut buf, None).unwrap();
    buf
}

#[test]
fn connect_v311_round_trip() {
    let mut c = v4::Connect::new("dev-1");
    c.keep_alive = 30;
    c.clean_session = false;
    c.set_login("user", "pw");
    c.last_will = Some(v4::LastWill::new(
        "dead",
        "bye",
        rumqttc::mqttbytes::QoS::AtLeastOnce,
        true,
    ));
    let frame = frame_of(&v4_bytes(v4::Packet::Connect(c)));
    assert_eq!(detect_version(&frame), Ok(Version::V311));
    let Packet::Connect(c) = decode(frame, Version::V311).unwrap() else {
        panic!()
    };
    assert_eq!(c.client_id, "dev-1");
    assert!(!c.clean_start);
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.username.as_deref(), Some("user"));
    assert_eq!(c.password.as_deref(), Some("pw"));
    let w = c.will.unwrap();
    assert_eq!((w.topic.as_str(), w.qos, w.retain), ("dead", 1, true));
    assert_eq!(c.session_expiry, u32::MAX);
}

#[test]
fn connect_v5_round_trip() {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    props.receive_maximum = Some(5);
    props.max_packet_size = Some(1000);
    let c = v5::Connect {
        keep_alive: 10,
        client_id: String::new(),
        clean_start: true,
        properties: Some(props),
    };
    let frame = frame_of(&v5_bytes(v5::Packet::Connect(c, None, None)));
    assert_eq!(detect_version(&frame), Ok(Version::V5));
    let Packet::Connect(c) = decode(frame, Version::V5).unwrap() else {
        panic!()
    };
    assert_eq!(c.session_expiry, 60);
    assert_eq!(c.receive_maximum, 5);
    assert_eq!(c.max_packet_size, Some(1000));
    assert!(c.client_id.is_empty());
}

#[test]
fn unsupported_protocol_and_reserved_flag() {
    // MQIsdp level 3 (MQTT 3.1).
    let mut b = vec![0x10, 0];
    b.extend_from_slice(&[0, 6]);
    b.extend_from_slice(b"MQIsdp");
    b.extend_from_slice(&[3, 2, 0, 10, 0, 1, b'x']);
    b[1] = (b.len() - 2) as u8;
    assert!(matches!(
        detect_version(&b),
        Err(CodecError::UnsupportedProtocol { level: 3, .. })
    ));
    let mut c = v4_bytes(v4::Packet::Connect(v4::Connect::new("x")));
    c[9] |= 1; // reserved connect flag
    assert!(matches!(detect_version(&c), Err(CodecError::Malformed(_))));
    assert!(matches!(
        detect_version(&[0x30, 0]),
        Err(CodecError::Protocol(_))
    ));
}

#[test]
fn publish_both_versions() {
    let mut p = v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::ExactlyOnce, "hi");
    p.pkid = 7;
    p.retain = true;
    let got = decode(frame_of(&v4_bytes(v4::Packet::Publish(p))), Version::V311).unwrap();
    let Packet::Publish(got) = got else { panic!() };
    assert_eq!(
        (got.topic.as_str(), got.qos, got.pkid, got.retain),
        ("a/b", 2, 7, true)
    );

    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("k".into(), "v".into())],
        topic_alias: Some(3),
        ..Default::default()
    };
    let mut p = v5::Publish::new(
        "a/b",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        "hi",
        Some(props),
    );
    p.pkid = 9;
    let Packet::Publish(got) =
        decode(frame_of(&v5_bytes(v5::Packet::Publish(p))), Version::V5).unwrap()
    else {
        panic!()
    };
    let props = got.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.topic_alias, Some(3));

    // Our encoding decodes back.
    for version in [Version::V311, Version::V5] {
        let out = Publish {
            dup: true,
            qos: 1,
            retain: false,
            topic: "x/y".into(),
            pkid: 3,
            payload: Bytes::from_static(b"p"),
            properties: None,
        };
        let mut buf = BytesMut::new();
        encode(&Outgoing::Publish(out.clone()), version, &mut buf).unwrap();
        assert_eq!(
            decode(frame_of(&buf), version).unwrap(),
            Packet::Publish(out)
        );
    }
}

#[test]
fn subscribe_options_v5() {
    let mut f = v5::Filter::new("a/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    f.nolocal = true;
    f.preserve_retain = true;
    f.retain_forward_rule = v5::RetainForwardRule::Never;
    let props = v5::SubscribeProperties {
        id: Some(42),
        user_properties: vec![],
    };
    let mut s = v5::Subscribe::new(f, Some(props));
    s.pkid = 5;
    let got = decode(frame_of(&v5_bytes(v5::Packet::Subscribe(s))), Version::V5).unwrap();
    assert_eq!(
        got,
        Packet::Subscribe {
            pkid: 5,
            id: Some(42),
            filters: vec![SubscribeFilter {
                filter: "a/#".into(),
                qos: 1,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            }],
        }
    );
}

#[test]
fn zero_length_v5_disconnect_and_bad_flags() {
    assert_eq!(
        decode(frame_of(&[0xE0, 0]), Version::V5).unwrap(),
        Packet::Disconnect {
            reason: 0,
            session_expiry: None
        }
    );
    assert_eq!(
        decode(frame_of(&[0xE0, 1, 0x04]), Version::V5).unwrap(),
        Packet::Disconnect {
            reason: 4,
            session_expiry: None
        }
    );
    // SUBSCRIBE must carry flags 0b0010.
    assert!(matches!(
        decode(frame_of(&[0x80, 2, 0, 1]), Version::V311),
        Err(CodecError::Malformed(_))
    ));
    // PUBLISH QoS 3.
    assert!(decode(frame_of(&[0x36, 5, 0, 1, b'a', 0, 1]), Version::V311).is_err());
}

#[test]
fn oversized_frames_are_refused_before_reading_them() {
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(
        take_frame(&mut buf, 1000),
        Err(CodecError::TooLarge(2_097_155))
    );
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF][..]);
    assert!(matches!(
        take_frame(&mut buf, 1000),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn server_packets_encode() {
    let cases: Vec<(Outgoing, Version, Vec<u8>)> = vec![
        (
            Outgoing::ConnAck {
                session_present: true,
                code: 0,
                properties: None,
            },
            Version::V311,
            vec![0x20, 2, 1, 0],
        ),
        (
            Outgoing::PubAck {
                pkid: 1,
                reason: 0x87,
            },
            Version::V5,
            vec![0x40, 3, 0, 1, 0x87],
        ),
        (
            Outgoing::PubAck {
                pkid: 1,
                reason: 0x87,
            },
            Version::V311,
            vec![0x40, 2, 0, 1],
        ),
        (
            Outgoing::SubAck {
                pkid: 2,
                codes: vec![1, 0x80],
            },
            Version::V311,
            vec![0x90, 4, 0, 2, 1, 0x80],
        ),
        (
            Outgoing::SubAck {
                pkid: 2,
                codes: vec![0x87],
            },
            Version::V5,
            vec![0x90, 4, 0, 2, 0, 0x87],
        ),
        (
            Outgoing::UnsubAck {
                pkid: 2,
                codes: vec![0],
            },
            Version::V311,
            vec![0xB0, 2, 0, 2],
        ),
        (
            Outgoing::Disconnect { reason: 0x8E },
            Version::V5,
            vec![0xE0, 1, 0x8E],
        ),
    ];
    for (packet, version, want) in cases {
        let mut buf = BytesMut::new();
        encode(&packet, version, &mut buf).unwrap();
        assert_eq!(&buf[..], &want[..], "{packet:?} {version:?}");
    }
    // A v5 CONNACK with properties is readable by rumqttc's client decoder.
    let mut buf = BytesMut::new();
    let props = ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(10),
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: Some("id-1".into()),
        topic_alias_max: None,
        reason_string: None,
        user_properties: vec![],
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    };
    encode(
        &Outgoing::ConnAck {
            session_present: false,
            code: 0x86,
            properties: Some(props),
        },
        Version::V5,
        &mut buf,
    )
    .unwrap();
    assert_eq!(buf[3], 0x86);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Garbage never panics the decoder, whatever the version.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = detect_version(&buf);
        while let Ok(Some(frame)) = take_frame(&mut buf, 1 << 16) {
            let _ = detect_version(&frame);
            let _ = decode(frame.clone(), Version::V311);
            let _ = decode(frame, Version::V5);
        }
    }

    /// Valid packet headers with random bodies: the decoders see plausible frames.
    #[test]
    fn random_bodies_never_panic(kind in 1u8..16, flags in 0u8..16, body in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = vec![(kind << 4) | flags];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 { b |= 0x80; }
            bytes.push(b);
            if len == 0 { break; }
        }
        bytes.extend_from_slice(&body);
        let frame = frame_of(&bytes);
        let _ = detect_version(&frame);
        let _ = decode(frame.clone(), Version::V311);
        let _ = decode(frame, Version::V5);
    }
}

#[test]
fn client_publish_with_subscription_identifiers_is_refused() {
    // Found by fuzz/decode: PUBLISH a/b QoS 1 with properties [sub id 11, user property
    // k=v]; rumqttc's decoder would end the properties early and put k=v in the payload.
    let frame = frame_of(&[
        0x32, 18, 0, 3, b'a', b'/', b'b', 0, 1, 9, 0x0b, 11, 0x26, 0, 1, b'k', 0, 1, b'v', b'x',
    ]);
    assert!(matches!(
        decode(frame, Version::V5),
        Err(CodecError::Protocol(_))
    ));
}

/// What the decoder enforces on top of rumqttc's decoders (`docs/conformance.md`): each
/// violation, in raw bytes, is refused as malformed (0x81), and the same packet without
/// it decodes, so each case shows the check and not some other fault.
#[test]
fn violations_are_malformed_and_the_packets_without_them_decode() {
    use Version::{V5, V311};
    #[rustfmt::skip]
    let cases: &[(&str, Version, &[u8], &[u8])] = &[
        ("[MQTT-3.3.1-2] DUP on QoS 0", V311,
            &[0x38, 3, 0, 1, b't'], &[0x30, 3, 0, 1, b't']),
        ("[MQTT-3.3.1-2] DUP on QoS 0", V5,
            &[0x38, 4, 0, 1, b't', 0], &[0x30, 4, 0, 1, b't', 0]),
        ("[MQTT-2.3.1-1] SUBSCRIBE id 0", V311,
            &[0x82, 6, 0, 0, 0, 1, b't', 0], &[0x82, 6, 0, 1, 0, 1, b't', 0]),
        ("[MQTT-2.2.1-3] SUBSCRIBE id 0", V5,
            &[0x82, 7, 0, 0, 0, 0, 1, b't', 0], &[0x82, 7, 0, 1, 0, 0, 1, b't', 0]),
        ("[MQTT-2.3.1-1] UNSUBSCRIBE id 0", V311,
            &[0xA2, 5, 0, 0, 0, 1, b't'], &[0xA2, 5, 0, 1, 0, 1, b't']),
        ("[MQTT-2.2.1-3] UNSUBSCRIBE id 0", V5,
            &[0xA2, 6, 0, 0, 0, 0, 1, b't'], &[0xA2, 6, 0, 1, 0, 0, 1, b't']),
        ("[MQTT-2.3.1-1] QoS 1 PUBLISH id 0", V311,
            &[0x32, 5, 0, 1, b't', 0, 0], &[0x32, 5, 0, 1, b't', 0, 1]),
        ("[MQTT-2.2.1-3] QoS 1 PUBLISH id 0", V5,
            &[0x32, 6, 0, 1, b't', 0, 0, 0], &[0x32, 6, 0, 1, b't', 0, 1, 0]),
        ("[MQTT-3.8.3-4] reserved option bits", V311,
            &[0x82, 6, 0, 1, 0, 1, b't', 0x05], &[0x82, 6, 0, 1, 0, 1, b't', 0x01]),
        ("[MQTT-3.8.3-4] reserved option bits, second filter", V311,
            &[0x82, 10, 0, 1, 0, 1, b'a', 0, 0, 1, b'b', 0x80],
            &[0x82, 10, 0, 1, 0, 1, b'a', 0, 0, 1, b'b', 0x02]),
        ("[MQTT-3.8.3-5] reserved option bits", V5,
            &[0x82, 7, 0, 1, 0, 0, 1, b't', 0x40], &[0x82, 7, 0, 1, 0, 0, 1, b't', 0x2e]),
        ("[MQTT-3.8.3-5] reserved option bits, after properties", V5,
            &[0x82, 9, 0, 1, 2, 0x0B, 7, 0, 1, b't', 0x81],
            &[0x82, 9, 0, 1, 2, 0x0B, 7, 0, 1, b't', 0x01]),
        ("[MQTT-3.8.3-4] QoS 3 in options", V311,
            &[0x82, 6, 0, 1, 0, 1, b't', 0x03], &[0x82, 6, 0, 1, 0, 1, b't', 0x02]),
        ("[MQTT-3.8.3-3] SUBSCRIBE without filters", V311,
            &[0x82, 2, 0, 1], &[0x82, 6, 0, 1, 0, 1, b't', 0]),
        ("[MQTT-3.8.3-2] SUBSCRIBE without filters", V5,
            &[0x82, 3, 0, 1, 0], &[0x82, 7, 0, 1, 0, 0, 1, b't', 0]),
    ];
    for (what, version, bad, good) in cases {
        let refused = decode(frame_of(bad), *version);
        assert!(
            matches!(&refused, Err(e) if e.reason_code() == 0x81),
            "{what} ({version:?}): {refused:?}"
        );
        let accepted = decode(frame_of(good), *version);
        assert!(
            accepted.is_ok(),
            "{what} ({version:?}) without the fault: {accepted:?}"
        );
    }
}

/// An MQTT 5 packet: `byte1`, then `body` with its remaining length.
fn v5_frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![byte1, body.len() as u8];
    b.extend_from_slice(body);
    b
}

/// A v5 CONNECT with `props` as its properties and, when given, a will with `will_props`.
fn v5_connect(props: &[u8], will_props: Option<&[u8]>) -> Vec<u8> {
    let flags = if will_props.is_some() { 0b110 } else { 0b010 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 10];
    body.extend_from_slice(props);
    body.extend_from_slice(&[0, 1, b'x']);
    if let Some(w) = will_props {
        body.extend_from_slice(w);
        body.extend_from_slice(&[0, 1, b'w', 0, 1, b'p']);
    }
    v5_frame(0x10, &body)
}

/// MQTT 5 property rules (`codec::strict`): a property twice (user properties excepted),
/// or a value out of its range, is a protocol error (0x82); the same packet with the
/// property once, in range, decodes.
#[test]
fn v5_properties_twice_or_out_of_range_are_protocol_errors() {
    let publish = |props: &[u8]| {
        let mut body = vec![0, 1, b't'];
        body.extend_from_slice(props);
        v5_frame(0x30, &body)
    };
    let publish_qos1 = |props: &[u8]| {
        let mut body = vec![0, 1, b't', 0, 9];
        body.extend_from_slice(props);
        v5_frame(0x32, &body)
    };
    let subscribe = |props: &[u8]| {
        let mut body = vec![0, 1];
        body.extend_from_slice(props);
        body.extend_from_slice(&[0, 1, b't', 1]);
        v5_frame(0x82, &body)
    };
    let puback = |props: &[u8]| {
        let mut body = vec![0, 1, 0x10];
        body.extend_from_slice(props);
        v5_frame(0x40, &body)
    };
    let disconnect = |props: &[u8]| {
        let mut body = vec![0x00];
        body.extend_from_slice(props);
        v5_frame(0xE0, &body)
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("payload format indicator twice",
            publish(&[4, 0x01, 0, 0x01, 0]), publish(&[2, 0x01, 0])),
        ("payload format indicator 2",
            publish(&[2, 0x01, 2]), publish(&[2, 0x01, 1])),
        ("content type twice, after a packet identifier",
            publish_qos1(&[8, 0x03, 0, 1, b'a', 0x03, 0, 1, b'b']),
            publish_qos1(&[4, 0x03, 0, 1, b'a'])),
        ("subscription identifier 0",
            subscribe(&[2, 0x0B, 0]), subscribe(&[2, 0x0B, 5])),
        ("subscription identifier twice",
            subscribe(&[4, 0x0B, 1, 0x0B, 2]), subscribe(&[2, 0x0B, 1])),
        ("session expiry twice",
            v5_connect(&[10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], None),
            v5_connect(&[5, 0x11, 0, 0, 0, 1], None)),
        ("request problem information 2",
            v5_connect(&[2, 0x17, 2], None), v5_connect(&[2, 0x17, 0], None)),
        ("will delay twice, in the will's properties",
            v5_connect(&[0], Some(&[10, 0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1])),
            v5_connect(&[0], Some(&[5, 0x18, 0, 0, 0, 1]))),
        ("reason string twice on a PUBACK",
            puback(&[8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b']), puback(&[4, 0x1F, 0, 1, b'a'])),
        ("reason string twice on a DISCONNECT",
            disconnect(&[8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b']),
            disconnect(&[4, 0x1F, 0, 1, b'a'])),
    ];
    for (what, bad, good) in cases {
        let refused = decode(frame_of(&bad), Version::V5);
        assert!(
            matches!(&refused, Err(e) if e.reason_code() == 0x82),
            "{what}: {refused:?}"
        );
        let accepted = decode(frame_of(&good), Version::V5);
        assert!(accepted.is_ok(), "{what}, once and in range: {accepted:?}");
    }
    // User properties may repeat, even with the same name.
    let users = [0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'w'];
    let mut props = vec![users.len() as u8];
    props.extend_from_slice(&users);
    assert!(decode(frame_of(&publish(&props)), Version::V5).is_ok());
}
