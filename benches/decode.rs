//! Decoding one PUBLISH, the embedded broker's per-message work before routing: framing,
//! rumqttc's decoder, and the checks of `codec::strict` (`docs/conformance.md`).
//!
//! ```text
//! cargo bench --bench decode     # cargo test only checks each packet decodes
//! ```
//!
//! The packets are a device's telemetry at QoS 1 with a 100-byte payload: in 3.1.1, and
//! in MQTT 5 without properties and with the ones a publisher commonly sets (a content
//! type and two user properties), whose strings the checks read.

use bytes::{BufMut, BytesMut};
use criterion::Criterion;
use mqbridge::broker::codec::{Packet, Version, decode, take_frame};

const TOPIC: &[u8] = b"sensors/site10/d1060/telemetry";

/// A QoS 1 PUBLISH to [`TOPIC`] (packet identifier 7), with the MQTT 5 property block
/// `props` when given, and a 100-byte payload.
fn publish(props: Option<&[u8]>) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u16(TOPIC.len() as u16);
    body.put_slice(TOPIC);
    body.put_u16(7);
    if let Some(props) = props {
        body.put_u8(props.len() as u8);
        body.put_slice(props);
    }
    body.put_slice(&[b'x'; 100]);
    let mut packet = BytesMut::new();
    packet.put_u8(0x32);
    // The remaining length, a variable byte integer (two bytes here).
    let len = body.len();
    assert!((128..16_384).contains(&len));
    packet.put_slice(&[(len % 128) as u8 | 0x80, (len / 128) as u8]);
    packet.put_slice(&body);
    packet
}

/// Content type "application/json" and the user properties site=10 and fw=2.4.1.
fn properties() -> Vec<u8> {
    let string = |s: &str| [&(s.len() as u16).to_be_bytes()[..], s.as_bytes()].concat();
    [
        &[0x03][..],
        &string("application/json"),
        &[0x26],
        &string("site"),
        &string("10"),
        &[0x26],
        &string("fw"),
        &string("2.4.1"),
    ]
    .concat()
}

/// Frames and decodes one packet, as the connection's read loop does.
fn read(bytes: &BytesMut, version: Version) -> Packet {
    let mut buf = bytes.clone();
    let frame = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
    decode(frame, version).unwrap()
}

fn main() {
    let props = properties();
    let cases = [
        ("3.1.1", publish(None), Version::V311),
        ("5.0, no properties", publish(Some(&[])), Version::V5),
        (
            "5.0, content type and 2 user properties",
            publish(Some(&props)),
            Version::V5,
        ),
    ];
    for (_, bytes, version) in &cases {
        assert!(matches!(read(bytes, *version), Packet::Publish(_)));
    }
    let mut c = Criterion::default().configure_from_args();
    for (name, bytes, version) in &cases {
        c.bench_function(&format!("decode PUBLISH QoS 1, {name}"), |b| {
            b.iter(|| read(std::hint::black_box(bytes), *version))
        });
    }
    c.final_summary();
}
