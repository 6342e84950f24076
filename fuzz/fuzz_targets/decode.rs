//! Arbitrary bytes from a client through the embedded broker's input path: framing, the
//! CONNECT version check, and the decoder for both protocol versions. Nothing may panic,
//! and a PUBLISH that decodes must survive our encoder and decode to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

// The codec as the broker has it: `src/broker/codec.rs` and its submodules, and the
// topic rules its strict checks call (as `crate::topic`).
#[path = "../../src/broker"]
#[allow(dead_code)]
mod broker {
    pub mod codec;
}
#[path = "../../src/topic.rs"]
#[allow(dead_code)]
mod topic;

use broker::codec::{self, Outgoing, Packet, Version};

/// The broker's default `max_packet_size` order of magnitude; small enough to stay fast.
const MAX_PACKET: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // As a connection does: the first frame decides the version.
    let mut version = None;
    while let Ok(Some(frame)) = codec::take_frame(&mut buf, MAX_PACKET) {
        let v = *version.get_or_insert_with(|| {
            codec::detect_version(&frame).unwrap_or(Version::V311)
        });
        for v in [v, other(v)] {
            if let Ok(Packet::Publish(p)) = codec::decode(frame.clone(), v) {
                roundtrip(p, v);
            }
        }
    }
});

fn other(v: Version) -> Version {
    match v {
        Version::V311 => Version::V5,
        Version::V5 => Version::V311,
    }
}

/// Encodes a decoded PUBLISH (as the broker forwards it) and decodes it again.
fn roundtrip(p: codec::Publish, v: Version) {
    if p.topic.is_empty() {
        return; // a v5 topic alias only: the connection resolves it before forwarding
    }
    let mut out = BytesMut::new();
    if codec::encode(&Outgoing::Publish(p.clone()), v, &mut out).is_err() {
        return;
    }
    let frame = codec::take_frame(&mut out, usize::MAX)
        .expect("our own encoding frames")
        .expect("a whole frame");
    match codec::decode(frame, v) {
        Ok(Packet::Publish(q)) => assert_eq!(p, q, "PUBLISH changed through encode/decode"),
        other => panic!("our encoding of {p:?} decodes as {other:?}"),
    }
}
