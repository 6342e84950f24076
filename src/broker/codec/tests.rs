use super::*;
use proptest::prelude::*;

pub(super) fn frame_of(bytes: &[u8]) -> BytesMut {
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
fn unsupported_protocols_and_a_first_packet_not_connect() {
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

/// MQTT 5 lets a DISCONNECT leave out its reason code and properties, which rumqttc
/// refuses.
#[test]
fn a_v5_disconnect_may_leave_out_reason_code_and_properties() {
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

/// A PUBLISH as rumqttc writes it, for comparison with ours.
fn rumqttc_publish(p: &Publish, version: Version) -> BytesMut {
    let mut buf = BytesMut::new();
    match version {
        Version::V311 => {
            let mut out = v4::Publish::from_bytes(
                p.topic.clone(),
                rumqttc::mqttbytes::qos(p.qos).unwrap(),
                p.payload.clone(),
            );
            out.dup = p.dup;
            out.retain = p.retain;
            out.pkid = p.pkid;
            out.write(&mut buf).unwrap();
        }
        Version::V5 => {
            let out = v5::Publish {
                dup: p.dup,
                qos: rumqttc::v5::mqttbytes::qos(p.qos).unwrap(),
                retain: p.retain,
                topic: Bytes::copy_from_slice(p.topic.as_bytes()),
                pkid: p.pkid,
                payload: p.payload.clone(),
                properties: p.properties.clone(),
            };
            out.write(&mut buf).unwrap();
        }
    }
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A PUBLISH is written byte for byte as rumqttc writes it, both versions, with and
    /// without properties, across the remaining length's one- to three-byte forms; and
    /// its computed size is the written one.
    #[test]
    fn publish_is_written_as_rumqttc_writes_it_and_its_size_is_known_before(
        v5 in any::<bool>(),
        qos in 0u8..3,
        dup in any::<bool>(),
        retain in any::<bool>(),
        pkid in 1u16..,
        topic in "[a-z/]{0,40}",
        payload_len in prop_oneof![0usize..200, 16_300usize..16_500],
        alias in proptest::option::of(1u16..10),
        content_type in proptest::option::of("[a-z/]{0,20}"),
    ) {
        let version = if v5 { Version::V5 } else { Version::V311 };
        let properties = (alias.is_some() || content_type.is_some()).then(|| PublishProperties {
            topic_alias: alias,
            content_type,
            ..Default::default()
        });
        let p = Publish {
            dup,
            qos,
            retain,
            topic,
            pkid: if qos > 0 { pkid } else { 0 },
            payload: Bytes::from(vec![7u8; payload_len]),
            properties,
        };
        let mut ours = BytesMut::new();
        encode(&Outgoing::Publish(p.clone()), version, &mut ours).unwrap();
        prop_assert_eq!(&ours[..], &rumqttc_publish(&p, version)[..]);
        prop_assert_eq!(publish_len(&p, version), ours.len());
    }
}

#[test]
fn a_publish_that_cannot_be_written_is_an_error_and_has_no_size() {
    let p = Publish {
        dup: false,
        qos: 1,
        retain: false,
        topic: "t".into(),
        pkid: 0,
        payload: Bytes::new(),
        properties: None,
    };
    let mut buf = BytesMut::new();
    assert!(encode(&Outgoing::Publish(p.clone()), Version::V311, &mut buf).is_err());
    let bad_qos = Publish {
        qos: 3,
        pkid: 1,
        ..p
    };
    assert!(encode(&Outgoing::Publish(bad_qos), Version::V5, &mut buf).is_err());
    assert!(buf.is_empty());
}
