//! The decoder's rows of `docs/conformance.md`, in raw bytes: each packet that breaks a
//! statement is refused with the reason code the table names, and the same packet
//! without the fault decodes, so that no case passes because its packet was refused for
//! something else. Each case names its statement; where 3.1.1 and 5.0 number it
//! differently, the version of the case says which.

use bytes::{BufMut, BytesMut};

use crate::broker::codec::tests::frame_of;
use crate::broker::codec::{CodecError, Packet, Version, decode, put_len, take_frame};
use Version::{V5, V311};

/// Frames and decodes `bytes`, which hold one whole packet.
fn read(bytes: &[u8], version: Version) -> Result<Packet, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let frame = take_frame(&mut buf, 1 << 20)?.expect("a whole packet");
    assert!(buf.is_empty(), "one packet in {bytes:?}");
    decode(frame, version)
}

/// Each case's bad packet is refused with `code`, its good one decodes.
fn refused_with(code: u8, cases: &[(&str, Version, Vec<u8>, Vec<u8>)]) {
    for (what, version, bad, good) in cases {
        let refused = read(bad, *version);
        assert!(
            matches!(&refused, Err(e) if e.reason_code() == code),
            "{what} ({version:?}): {refused:?}"
        );
        let accepted = read(good, *version);
        assert!(
            accepted.is_ok(),
            "{what} ({version:?}), without the fault: {accepted:?}"
        );
    }
}

/// A packet: `byte1`, the remaining length, `body`.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(byte1);
    put_len(&mut b, body.len());
    b.put_slice(body);
    b.to_vec()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A length-prefixed string (or binary data).
fn s(bytes: &[u8]) -> Vec<u8> {
    cat(&[&(bytes.len() as u16).to_be_bytes(), bytes])
}

/// An MQTT 5 property block: its length, then `props`.
fn props(props: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_len(&mut b, props.len());
    b.put_slice(props);
    b.to_vec()
}

/// A CONNECT with `flags` and keep alive 10, then (MQTT 5) the property block `props`,
/// then `payload` as it is.
fn connect(version: Version, flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let level = if version == V5 { 5 } else { 4 };
    let props = if version == V5 { props } else { &[][..] };
    packet(
        0x10,
        &cat(&[&s(b"MQTT"), &[level, flags, 0, 10], props, payload]),
    )
}

/// A QoS 0 PUBLISH to `topic` with (MQTT 5) the property block `props`, payload "p".
fn publish(version: Version, topic: &[u8], props: &[u8]) -> Vec<u8> {
    let props = if version == V5 { props } else { &[][..] };
    packet(0x30, &cat(&[&s(topic), props, b"p"]))
}

/// A SUBSCRIBE (packet identifier 1) of `filter` with `options`, and (MQTT 5) `props`.
fn subscribe(version: Version, props: &[u8], filter: &[u8], options: u8) -> Vec<u8> {
    let props = if version == V5 { props } else { &[][..] };
    packet(0x82, &cat(&[&[0, 1], props, &s(filter), &[options]]))
}

/// An UNSUBSCRIBE (packet identifier 1) of `filter`, with (MQTT 5) `props`.
fn unsubscribe(version: Version, props: &[u8], filter: &[u8]) -> Vec<u8> {
    let props = if version == V5 { props } else { &[][..] };
    packet(0xA2, &cat(&[&[0, 1], props, &s(filter)]))
}

/// Fixed headers and framing: reserved flags, reserved packet types, variable byte
/// integers in their shortest form, the packets of one length only.
#[test]
fn fixed_headers_and_lengths_that_break_the_rules_are_malformed() {
    #[rustfmt::skip]
    let cases = [
        ("[MQTT-2.2.2-2] [MQTT-3.6.1-1] PUBREL flags", V311, vec![0x60, 2, 0, 1], vec![0x62, 2, 0, 1]),
        ("[MQTT-2.1.3-1] [MQTT-3.6.1-1] PUBREL flags", V5, vec![0x63, 2, 0, 1], vec![0x62, 2, 0, 1]),
        ("[MQTT-3.8.1-1] SUBSCRIBE flags", V311,
            packet(0x80, &[0, 1, 0, 1, b't', 0]), packet(0x82, &[0, 1, 0, 1, b't', 0])),
        ("[MQTT-3.10.1-1] UNSUBSCRIBE flags", V5,
            packet(0xA0, &[0, 1, 0, 0, 1, b't']), packet(0xA2, &[0, 1, 0, 0, 1, b't'])),
        ("[MQTT-3.14.1-1] DISCONNECT flags", V311, vec![0xE1, 0], vec![0xE0, 0]),
        ("[MQTT-3.14.1-1] DISCONNECT flags", V5, vec![0xE8, 0], vec![0xE0, 0]),
        ("[MQTT-3.15.1-1] AUTH flags", V5, vec![0xF2, 0], vec![0xF0, 0]),
        ("[MQTT-2.2.2-1] PINGREQ flags", V311, vec![0xC1, 0], vec![0xC0, 0]),
        ("[MQTT-2.1.3-1] PUBACK flags", V5, vec![0x42, 2, 0, 1], vec![0x40, 2, 0, 1]),
        ("[MQTT-3.3.1-4] PUBLISH with QoS 3", V311,
            vec![0x36, 5, 0, 1, b't', 0, 1], vec![0x34, 5, 0, 1, b't', 0, 1]),
        ("[MQTT-3.3.1-4] PUBLISH with QoS 3", V5,
            vec![0x36, 6, 0, 1, b't', 0, 1, 0], vec![0x34, 6, 0, 1, b't', 0, 1, 0]),
        ("packet type 0 (reserved)", V5, vec![0x00, 0], vec![0xC0, 0]),
        ("packet type 15 (reserved in 3.1.1)", V311, vec![0xF0, 0], vec![0xE0, 0]),
        ("[MQTT-1.5.5-1] remaining length 3 in two bytes", V311,
            vec![0x30, 0x83, 0x00, 0, 1, b't'], vec![0x30, 3, 0, 1, b't']),
        ("[MQTT-1.5.5-1] property length 0 in two bytes", V5,
            vec![0x30, 5, 0, 1, b't', 0x80, 0x00], vec![0x30, 4, 0, 1, b't', 0]),
        ("[MQTT-1.5.5-1] subscription identifier 1 in two bytes", V5,
            subscribe(V5, &[3, 0x0B, 0x81, 0x00], b"t", 1), subscribe(V5, &[2, 0x0B, 1], b"t", 1)),
        ("PINGREQ with a body", V5, vec![0xC0, 1, 0], vec![0xC0, 0]),
        ("DISCONNECT with a body (3.1.1)", V311, vec![0xE0, 1, 0], vec![0xE0, 0]),
        ("PUBACK longer than its packet identifier (3.1.1)", V311,
            vec![0x40, 3, 0, 1, 0], vec![0x40, 2, 0, 1]),
    ];
    refused_with(0x81, &cases);
}

/// [MQTT-1.5.3-1] (3.1.1), [MQTT-1.5.4-1] (5.0): ill-formed UTF-8, surrogates included,
/// in any string; [MQTT-1.5.3-2], [MQTT-1.5.4-2]: U+0000 in any string (topic names and
/// filters: the connection's tests). rumqttc's `String::from_utf8` refuses the first,
/// `strict` the second.
#[test]
fn ill_formed_utf8_and_u0000_in_strings_are_malformed() {
    let (x, w, p) = (s(b"x"), s(b"w"), s(b"p"));
    let surrogate: &[u8] = &[0xED, 0xA0, 0x80];
    let prop = |id: u8, value: &[u8]| props(&cat(&[&[id], &s(value)]));
    let user = |k: &[u8], v: &[u8]| props(&cat(&[&[0x26], &s(k), &s(v)]));
    let puback = |props: &[u8]| packet(0x40, &cat(&[&[0, 1, 0x10], props]));
    let disconnect = |props: &[u8]| packet(0xE0, &cat(&[&[0x00], props]));
    #[rustfmt::skip]
    let cases = [
        ("[MQTT-1.5.3-1] [MQTT-3.3.2-1] ill-formed topic name", V311,
            publish(V311, &[0xC3, 0x28], &[]), publish(V311, &[0xC3, 0xA9], &[])),
        ("[MQTT-1.5.4-1] [MQTT-3.3.2-1] a surrogate in a topic name", V5,
            publish(V5, surrogate, &[0]), publish(V5, &[0xE2, 0x82, 0xAC], &[0])),
        ("[MQTT-3.1.3-4] ill-formed client identifier", V311,
            connect(V311, 0x02, &[], &s(&[0xFF])), connect(V311, 0x02, &[], &x)),
        ("[MQTT-3.1.3-11] (3.1.1) ill-formed user name", V311,
            connect(V311, 0x82, &[], &cat(&[&x, &s(&[0xC0, 0x80])])),
            connect(V311, 0x82, &[], &cat(&[&x, &s(b"u")]))),
        ("[MQTT-3.1.3-12] (5.0) a surrogate in the user name", V5,
            connect(V5, 0x82, &[0], &cat(&[&x, &s(surrogate)])),
            connect(V5, 0x82, &[0], &cat(&[&x, &s(b"u")]))),
        ("[MQTT-3.1.3-10] (3.1.1) ill-formed will topic", V311,
            connect(V311, 0x06, &[], &cat(&[&x, &s(&[0xC3, 0x28]), &p])),
            connect(V311, 0x06, &[], &cat(&[&x, &w, &p]))),
        ("[MQTT-3.1.3-11] (5.0) ill-formed will topic", V5,
            connect(V5, 0x06, &[0], &cat(&[&x, &[0], &s(&[0xC3, 0x28]), &p])),
            connect(V5, 0x06, &[0], &cat(&[&x, &[0], &w, &p]))),
        ("[MQTT-3.8.3-1] ill-formed topic filter", V311,
            subscribe(V311, &[], &[0xFF], 0), subscribe(V311, &[], b"t", 0)),
        ("[MQTT-3.10.3-1] a surrogate in an UNSUBSCRIBE's filter", V5,
            unsubscribe(V5, &[0], surrogate), unsubscribe(V5, &[0], b"t")),
        ("[MQTT-3.3.2-19] ill-formed content type", V5,
            publish(V5, b"t", &prop(0x03, &[0xFF])), publish(V5, b"t", &prop(0x03, b"a"))),
        ("[MQTT-1.5.7-1] ill-formed user property value", V5,
            disconnect(&user(b"k", &[0xFF])), disconnect(&user(b"k", b"v"))),
        ("[MQTT-1.5.3-2] U+0000 in the client identifier", V311,
            connect(V311, 0x02, &[], &s(b"a\0")), connect(V311, 0x02, &[], &s(b"a"))),
        ("[MQTT-1.5.4-2] U+0000 in the user name", V5,
            connect(V5, 0x82, &[0], &cat(&[&x, &s(b"u\0")])),
            connect(V5, 0x82, &[0], &cat(&[&x, &s(b"u")]))),
        ("[MQTT-1.5.3-2] U+0000 in the will topic", V311,
            connect(V311, 0x06, &[], &cat(&[&x, &s(b"w\0"), &p])),
            connect(V311, 0x06, &[], &cat(&[&x, &w, &p]))),
        ("[MQTT-1.5.4-2] U+0000 in a content type", V5,
            publish(V5, b"t", &prop(0x03, b"a\0")), publish(V5, b"t", &prop(0x03, b"a"))),
        ("[MQTT-1.5.4-2] U+0000 in a response topic", V5,
            publish(V5, b"t", &prop(0x08, b"r\0")), publish(V5, b"t", &prop(0x08, b"r"))),
        ("[MQTT-1.5.4-2] U+0000 in a reason string", V5,
            puback(&prop(0x1F, b"\0")), puback(&prop(0x1F, b"ok"))),
        ("[MQTT-1.5.4-2] U+0000 in an authentication method", V5,
            connect(V5, 0x02, &prop(0x15, b"m\0"), &x), connect(V5, 0x02, &prop(0x15, b"m"), &x)),
        ("[MQTT-1.5.7-1] U+0000 in a user property's name", V5,
            connect(V5, 0x02, &user(b"k\0", b"v"), &x), connect(V5, 0x02, &user(b"k", b"v"), &x)),
        ("[MQTT-1.5.7-1] U+0000 in a will's user property value", V5,
            connect(V5, 0x06, &[0], &cat(&[&x, &user(b"k", b"\0"), &w, &p])),
            connect(V5, 0x06, &[0], &cat(&[&x, &user(b"k", b""), &w, &p]))),
        ("[MQTT-1.5.7-1] U+0000 in a SUBSCRIBE's user property", V5,
            subscribe(V5, &user(b"\0", b"v"), b"t", 0), subscribe(V5, &user(b"k", b"v"), b"t", 0)),
    ];
    refused_with(0x81, &cases);
}

/// The CONNECT: its flags, the fields they announce (no more, no fewer), the will's QoS.
#[test]
fn connects_whose_flags_and_fields_disagree_are_malformed() {
    let (x, u, pw) = (s(b"x"), s(b"u"), s(b"pw"));
    let will4 = cat(&[&x, &s(b"w"), &s(b"p")]);
    let will5 = cat(&[&x, &[0], &s(b"w"), &s(b"p")]);
    #[rustfmt::skip]
    let cases = [
        ("[MQTT-3.1.2-3] the reserved flag", V311,
            connect(V311, 0x03, &[], &x), connect(V311, 0x02, &[], &x)),
        ("[MQTT-3.1.2-3] the reserved flag", V5,
            connect(V5, 0x03, &[0], &x), connect(V5, 0x02, &[0], &x)),
        ("[MQTT-3.1.2-13] will QoS without a will", V311,
            connect(V311, 0x0A, &[], &x), connect(V311, 0x02, &[], &x)),
        ("[MQTT-3.1.2-11] will QoS without a will", V5,
            connect(V5, 0x12, &[0], &x), connect(V5, 0x02, &[0], &x)),
        ("[MQTT-3.1.2-15] will retain without a will", V311,
            connect(V311, 0x22, &[], &x), connect(V311, 0x02, &[], &x)),
        ("[MQTT-3.1.2-13] will retain without a will", V5,
            connect(V5, 0x22, &[0], &x), connect(V5, 0x02, &[0], &x)),
        ("[MQTT-3.1.2-14] will QoS 3", V311,
            connect(V311, 0x1E, &[], &will4), connect(V311, 0x16, &[], &will4)),
        ("[MQTT-3.1.2-12] will QoS 3", V5,
            connect(V5, 0x1E, &[0], &will5), connect(V5, 0x16, &[0], &will5)),
        ("[MQTT-3.1.2-22] a password without a user name", V311,
            connect(V311, 0x42, &[], &cat(&[&x, &pw])), connect(V311, 0xC2, &[], &cat(&[&x, &u, &pw]))),
        ("[MQTT-3.1.2-11] a will's fields with the will flag 0", V311,
            connect(V311, 0x02, &[], &will4), connect(V311, 0x06, &[], &will4)),
        ("[MQTT-3.1.2-18] a user name with its flag 0", V311,
            connect(V311, 0x02, &[], &cat(&[&x, &u])), connect(V311, 0x82, &[], &cat(&[&x, &u]))),
        ("[MQTT-3.1.2-16] a user name with its flag 0", V5,
            connect(V5, 0x02, &[0], &cat(&[&x, &u])), connect(V5, 0x82, &[0], &cat(&[&x, &u]))),
        ("[MQTT-3.1.2-20] a password with its flag 0", V311,
            connect(V311, 0x82, &[], &cat(&[&x, &u, &pw])),
            connect(V311, 0xC2, &[], &cat(&[&x, &u, &pw]))),
        // MQTT 5 allows a password without a user name.
        ("[MQTT-3.1.2-18] a password with its flag 0", V5,
            connect(V5, 0x02, &[0], &cat(&[&x, &pw])), connect(V5, 0x42, &[0], &cat(&[&x, &pw]))),
        ("[MQTT-3.1.3-3] no client identifier", V311,
            connect(V311, 0x02, &[], &[]), connect(V311, 0x02, &[], &x)),
        ("[MQTT-3.1.2-19] a user name flag without a user name", V311,
            connect(V311, 0x82, &[], &x), connect(V311, 0x82, &[], &cat(&[&x, &u]))),
        ("[MQTT-3.1.2-17] a user name flag without a user name", V5,
            connect(V5, 0x82, &[0], &x), connect(V5, 0x82, &[0], &cat(&[&x, &u]))),
        ("[MQTT-3.1.2-21] a password flag without a password", V311,
            connect(V311, 0xC2, &[], &cat(&[&x, &u])), connect(V311, 0xC2, &[], &cat(&[&x, &u, &pw]))),
        ("[MQTT-3.1.2-19] a password flag without a password", V5,
            connect(V5, 0x42, &[0], &x), connect(V5, 0x42, &[0], &cat(&[&x, &pw]))),
        ("[MQTT-3.1.2-9] a will flag without a will", V5,
            connect(V5, 0x06, &[0], &x), connect(V5, 0x06, &[0], &will5)),
    ];
    refused_with(0x81, &cases);
}

/// What rumqttc's decoder refuses itself, and the rest the earlier tables do not show:
/// packet identifiers, subscription options, properties a packet may not carry, reason
/// codes outside their tables.
#[test]
fn identifiers_options_properties_and_reason_codes_that_break_the_rules_are_malformed() {
    let disconnect = |body: &[u8]| packet(0xE0, body);
    #[rustfmt::skip]
    let cases = [
        ("[MQTT-3.3.1-2] DUP on QoS 0", V311,
            vec![0x38, 3, 0, 1, b't'], vec![0x30, 3, 0, 1, b't']),
        ("[MQTT-3.3.1-2] DUP on QoS 0", V5,
            vec![0x38, 4, 0, 1, b't', 0], vec![0x30, 4, 0, 1, b't', 0]),
        ("[MQTT-2.3.1-1] SUBSCRIBE id 0", V311,
            vec![0x82, 6, 0, 0, 0, 1, b't', 0], vec![0x82, 6, 0, 1, 0, 1, b't', 0]),
        ("[MQTT-2.2.1-3] SUBSCRIBE id 0", V5,
            vec![0x82, 7, 0, 0, 0, 0, 1, b't', 0], vec![0x82, 7, 0, 1, 0, 0, 1, b't', 0]),
        ("[MQTT-2.3.1-1] UNSUBSCRIBE id 0", V311,
            vec![0xA2, 5, 0, 0, 0, 1, b't'], vec![0xA2, 5, 0, 1, 0, 1, b't']),
        ("[MQTT-2.2.1-3] UNSUBSCRIBE id 0", V5,
            vec![0xA2, 6, 0, 0, 0, 0, 1, b't'], vec![0xA2, 6, 0, 1, 0, 0, 1, b't']),
        ("[MQTT-2.3.1-1] QoS 1 PUBLISH id 0", V311,
            vec![0x32, 5, 0, 1, b't', 0, 0], vec![0x32, 5, 0, 1, b't', 0, 1]),
        ("[MQTT-2.2.1-3] QoS 1 PUBLISH id 0", V5,
            vec![0x32, 6, 0, 1, b't', 0, 0, 0], vec![0x32, 6, 0, 1, b't', 0, 1, 0]),
        ("[MQTT-3.8.3-4] reserved option bits", V311,
            vec![0x82, 6, 0, 1, 0, 1, b't', 0x05], vec![0x82, 6, 0, 1, 0, 1, b't', 0x01]),
        ("[MQTT-3.8.3-4] reserved option bits, second filter", V311,
            vec![0x82, 10, 0, 1, 0, 1, b'a', 0, 0, 1, b'b', 0x80],
            vec![0x82, 10, 0, 1, 0, 1, b'a', 0, 0, 1, b'b', 0x02]),
        ("[MQTT-3.8.3-5] reserved option bits", V5,
            vec![0x82, 7, 0, 1, 0, 0, 1, b't', 0x40], vec![0x82, 7, 0, 1, 0, 0, 1, b't', 0x2e]),
        ("[MQTT-3.8.3-5] reserved option bits, after properties", V5,
            vec![0x82, 9, 0, 1, 2, 0x0B, 7, 0, 1, b't', 0x81],
            vec![0x82, 9, 0, 1, 2, 0x0B, 7, 0, 1, b't', 0x01]),
        ("[MQTT-3.8.3-4] QoS 3 in options", V311,
            vec![0x82, 6, 0, 1, 0, 1, b't', 0x03], vec![0x82, 6, 0, 1, 0, 1, b't', 0x02]),
        ("[MQTT-3.8.3-3] SUBSCRIBE without filters", V311,
            vec![0x82, 2, 0, 1], vec![0x82, 6, 0, 1, 0, 1, b't', 0]),
        ("[MQTT-3.8.3-2] SUBSCRIBE without filters", V5,
            vec![0x82, 3, 0, 1, 0], vec![0x82, 7, 0, 1, 0, 0, 1, b't', 0]),
        ("a property a SUBSCRIBE may not carry (topic alias)", V5,
            subscribe(V5, &props(&[0x23, 0, 1]), b"t", 1), subscribe(V5, &props(&[0x0B, 1]), b"t", 1)),
        ("a property a PUBLISH may not carry (session expiry)", V5,
            publish(V5, b"t", &props(&[0x11, 0, 0, 0, 1])), publish(V5, b"t", &props(&[0x02, 0, 0, 0, 1]))),
        ("a property only a server sends (maximum QoS in a CONNECT)", V5,
            connect(V5, 0x02, &props(&[0x24, 1]), &s(b"x")), connect(V5, 0x02, &props(&[0x17, 1]), &s(b"x"))),
        ("an unknown property", V5,
            publish(V5, b"t", &props(&[0x7F, 0])), publish(V5, b"t", &props(&[0x01, 0]))),
        // Found by the fuzzer: the decoder read the value from the payload.
        ("a property cut short by its block's length", V5,
            publish(V5, b"t", &cat(&[&props(&[0x01]), &[0x70]])), publish(V5, b"t", &props(&[0x01, 0]))),
        ("a string property cut short by its block's length", V5,
            publish(V5, b"t", &cat(&[&props(&[0x03, 0, 2, b'a']), b"b"])),
            publish(V5, b"t", &props(&[0x03, 0, 2, b'a', b'b']))),
        ("[MQTT-3.4.2-1] a PUBACK reason code outside its table", V5,
            vec![0x40, 3, 0, 1, 0x05], vec![0x40, 3, 0, 1, 0x10]),
        ("[MQTT-3.5.2-1] a PUBREC reason code outside its table", V5,
            vec![0x50, 3, 0, 1, 0x01], vec![0x50, 3, 0, 1, 0x80]),
        ("[MQTT-3.6.2-1] a PUBREL reason code outside its table", V5,
            vec![0x62, 3, 0, 1, 0x80], vec![0x62, 3, 0, 1, 0x92]),
        ("[MQTT-3.7.2-1] a PUBCOMP reason code outside its table", V5,
            vec![0x70, 3, 0, 1, 0x10], vec![0x70, 3, 0, 1, 0x92]),
        ("[MQTT-3.14.2-1] a DISCONNECT reason code outside its table", V5,
            disconnect(&[0x05]), disconnect(&[0x80])),
        ("[MQTT-3.14.2-1] a DISCONNECT reason code outside its table, with properties", V5,
            disconnect(&[0x05, 0]), disconnect(&[0x04, 0])),
    ];
    refused_with(0x81, &cases);
}

/// MQTT 5's protocol errors in a packet's own content (0x82): a property twice (user
/// properties excepted) or out of its range, and the statements whose breach the
/// specification calls a protocol error.
#[test]
fn protocol_errors_in_a_packets_content_are_0x82() {
    let publish_qos1 = |props: &[u8]| packet(0x32, &cat(&[&[0, 1, b't', 0, 9], props]));
    let puback = |props: &[u8]| packet(0x40, &cat(&[&[0, 1, 0x10], props]));
    let disconnect = |body: &[u8]| packet(0xE0, body);
    let prop = |id: u8, value: &[u8]| cat(&[&[id], &s(value)]);
    let (x, w, p) = (s(b"x"), s(b"w"), s(b"p"));
    let with_will = |will_props: &[u8]| connect(V5, 0x06, &[0], &cat(&[&x, will_props, &w, &p]));
    #[rustfmt::skip]
    let cases = [
        ("payload format indicator twice", V5,
            publish(V5, b"t", &props(&[0x01, 0, 0x01, 0])), publish(V5, b"t", &props(&[0x01, 0]))),
        ("payload format indicator 2", V5,
            publish(V5, b"t", &props(&[0x01, 2])), publish(V5, b"t", &props(&[0x01, 1]))),
        ("content type twice, after a packet identifier", V5,
            publish_qos1(&props(&cat(&[&prop(0x03, b"a"), &prop(0x03, b"b")]))),
            publish_qos1(&props(&prop(0x03, b"a")))),
        ("subscription identifier 0", V5,
            subscribe(V5, &props(&[0x0B, 0]), b"t", 1), subscribe(V5, &props(&[0x0B, 5]), b"t", 1)),
        ("subscription identifier twice", V5,
            subscribe(V5, &props(&[0x0B, 1, 0x0B, 2]), b"t", 1), subscribe(V5, &props(&[0x0B, 1]), b"t", 1)),
        ("session expiry twice", V5,
            connect(V5, 0x02, &props(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]), &x),
            connect(V5, 0x02, &props(&[0x11, 0, 0, 0, 1]), &x)),
        ("request problem information 2", V5,
            connect(V5, 0x02, &props(&[0x17, 2]), &x), connect(V5, 0x02, &props(&[0x17, 0]), &x)),
        ("will delay twice, in the will's properties", V5,
            with_will(&props(&[0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1])),
            with_will(&props(&[0x18, 0, 0, 0, 1]))),
        ("reason string twice on a PUBACK", V5,
            puback(&props(&cat(&[&prop(0x1F, b"a"), &prop(0x1F, b"b")]))),
            puback(&props(&prop(0x1F, b"a")))),
        ("reason string twice on a DISCONNECT", V5,
            disconnect(&cat(&[&[0], &props(&cat(&[&prop(0x1F, b"a"), &prop(0x1F, b"b")]))])),
            disconnect(&cat(&[&[0], &props(&prop(0x1F, b"a"))]))),
        ("receive maximum 0", V5,
            connect(V5, 0x02, &props(&[0x21, 0, 0]), &x), connect(V5, 0x02, &props(&[0x21, 0, 1]), &x)),
        ("maximum packet size 0", V5,
            connect(V5, 0x02, &props(&[0x27, 0, 0, 0, 0]), &x),
            connect(V5, 0x02, &props(&[0x27, 0, 0, 0, 1]), &x)),
        ("authentication data without an authentication method", V5,
            connect(V5, 0x02, &props(&prop(0x16, b"d")), &x),
            connect(V5, 0x02, &props(&cat(&[&prop(0x15, b"m"), &prop(0x16, b"d")])), &x)),
        ("[MQTT-3.3.2-14] a response topic with a wildcard", V5,
            publish(V5, b"t", &props(&prop(0x08, b"r/#"))), publish(V5, b"t", &props(&prop(0x08, b"r/x")))),
        ("[MQTT-4.7.3-1] an empty response topic", V5,
            publish(V5, b"t", &props(&prop(0x08, b""))), publish(V5, b"t", &props(&prop(0x08, b"r")))),
        ("[MQTT-3.3.2-14] a will's response topic with a wildcard", V5,
            with_will(&props(&prop(0x08, b"+"))), with_will(&props(&prop(0x08, b"r")))),
        ("[MQTT-3.3.4-6] a client's PUBLISH with a subscription identifier", V5,
            // Found by fuzz/decode: rumqttc's decoder would end these properties early
            // and put k=v in the payload.
            publish_qos1(&props(&[0x0B, 11, 0x26, 0, 1, b'k', 0, 1, b'v'])),
            publish_qos1(&props(&[0x26, 0, 1, b'k', 0, 1, b'v']))),
        ("QoS 3 in subscription options (3.8.3.1)", V5,
            subscribe(V5, &[0], b"t", 0x03), subscribe(V5, &[0], b"t", 0x02)),
        ("retain handling 3 in subscription options (3.8.3.1)", V5,
            subscribe(V5, &[0], b"t", 0x30), subscribe(V5, &[0], b"t", 0x20)),
        ("[MQTT-3.10.3-2] UNSUBSCRIBE without filters", V311,
            vec![0xA2, 2, 0, 1], unsubscribe(V311, &[], b"t")),
        ("[MQTT-3.10.3-2] UNSUBSCRIBE without filters", V5,
            vec![0xA2, 3, 0, 1, 0], unsubscribe(V5, &[0], b"t")),
        ("[MQTT-3.14.2-1] a DISCONNECT reason code only a server sends", V5,
            disconnect(&[0x8E]), disconnect(&[0x00])),
        ("[MQTT-3.14.2-1] a DISCONNECT reason code only a server sends, with properties", V5,
            disconnect(&[0x87, 0]), disconnect(&[0x98, 0])),
    ];
    refused_with(0x82, &cases);
    // User properties may repeat, even with the same name.
    let users = cat(&[&[0x26], &s(b"k"), &s(b"v"), &[0x26], &s(b"k"), &s(b"w")]);
    assert!(read(&publish(V5, b"t", &props(&users)), V5).is_ok());
}

/// [MQTT-1.5.3-3] (3.1.1), [MQTT-1.5.4-3] (5.0): U+FEFF is kept where it is; and the
/// code points the specifications advise against (controls, non-characters) are taken
/// and passed on as they are (`docs/conformance.md` says why).
#[test]
fn a_byte_order_mark_and_disallowed_code_points_are_kept() {
    for topic in ["\u{feff}a/b", "a/\u{1}/\u{9f}/\u{ffff}"] {
        for version in [V311, V5] {
            let content_type = props(&cat(&[&[0x03], &s(topic.as_bytes())]));
            let got = read(&publish(version, topic.as_bytes(), &content_type), version);
            let Ok(Packet::Publish(p)) = got else {
                panic!("{topic:?} ({version:?}): {got:?}")
            };
            assert_eq!(p.topic, topic);
            if version == V5 {
                assert_eq!(p.properties.unwrap().content_type.as_deref(), Some(topic));
            }
        }
    }
}

/// The AUTH packet decodes (rumqttc's decoder has none) for the connection to refuse.
#[test]
fn an_auth_packet_decodes() {
    for auth in [&[0xF0, 0][..], &[0xF0, 2, 0x18, 0]] {
        assert_eq!(decode(frame_of(auth), V5), Ok(Packet::Auth));
    }
}
