//! What the specifications require of a client's packets beyond what rumqttc's decoders
//! check (each statement is listed in `docs/conformance.md`):
//! - on the raw frame: the reserved bits of subscription options, and the MQTT 5
//!   properties (one of each but user properties; values in range), which the decoder
//!   would otherwise keep the last of, or take whatever they are;
//! - on the decoded packet: DUP on a QoS 0 PUBLISH, and packet identifier 0.
//!
//! A frame too short to walk passes here: the decoder then refuses it.

use super::{CodecError, Packet, Version, fixed_header, malformed, var_int};

/// Checks the raw frame of one packet, before it is decoded.
pub(super) fn frame(frame: &[u8], kind: u8, version: Version) -> Result<(), CodecError> {
    let Some((header, _)) = fixed_header(frame)? else {
        return Ok(());
    };
    let body = frame.get(header..).unwrap_or_default();
    if kind == 8 {
        subscription_options(body, version)?;
    }
    if version == Version::V5 {
        for start in property_blocks(body, frame[0]).unwrap_or_default() {
            properties(body.get(start..).unwrap_or_default())?;
        }
    }
    Ok(())
}

/// Checks a decoded packet.
pub(super) fn packet(packet: &Packet) -> Result<(), CodecError> {
    match packet {
        // [MQTT-3.3.1-2] in both versions.
        Packet::Publish(p) if p.qos == 0 && p.dup => {
            Err(malformed("DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]"))
        }
        // [MQTT-2.3.1-1] (3.1.1), [MQTT-2.2.1-3] (5.0): rumqttc checks PUBLISH itself.
        Packet::Subscribe { pkid: 0, .. } => Err(malformed("SUBSCRIBE with packet identifier 0")),
        Packet::Unsubscribe { pkid: 0, .. } => {
            Err(malformed("UNSUBSCRIBE with packet identifier 0"))
        }
        _ => Ok(()),
    }
}

/// The reserved bits of each subscription's options byte must be 0: [MQTT-3.8.3-4]
/// (3.1.1: all but the QoS bits), [MQTT-3.8.3-5] (5.0: bits 6 and 7). rumqttc's decoders
/// ignore them.
fn subscription_options(body: &[u8], version: Version) -> Result<(), CodecError> {
    let (reserved, mut at) = match version {
        Version::V311 => (0b1111_1100, 2),
        // The packet identifier, then the properties.
        Version::V5 => match var_int(body.get(2..).unwrap_or_default())? {
            Some((len, n)) => (0b1100_0000, 2 + n + len),
            None => return Ok(()),
        },
    };
    while let Some(filter) = string_end(body, at) {
        match body.get(filter) {
            Some(o) if o & reserved != 0 => {
                return Err(malformed(format!(
                    "reserved bits set in subscription options {o:#010b}"
                )));
            }
            Some(_) => at = filter + 1,
            None => break,
        }
    }
    Ok(())
}

/// Where the property blocks of an MQTT 5 packet start in its body (the CONNECT has two:
/// its own and its will's); None when the body ends first.
fn property_blocks(body: &[u8], byte1: u8) -> Option<Vec<usize>> {
    Some(match byte1 >> 4 {
        // CONNECT: protocol name, level, flags, keepalive; the payload's client id, then
        // the will's properties when there is a will.
        1 => {
            let name = string_end(body, 0)?;
            let flags = *body.get(name + 1)?;
            let own = name + 4;
            let (len, n) = var_int(body.get(own..)?).ok()??;
            let client_id = string_end(body, own + n + len)?;
            if flags & 0b100 != 0 {
                vec![own, client_id]
            } else {
                vec![own]
            }
        }
        // PUBLISH: the topic, the packet identifier at QoS 1 and 2.
        3 => {
            let topic = string_end(body, 0)?;
            vec![if byte1 & 0b0110 != 0 {
                topic + 2
            } else {
                topic
            }]
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet identifier, and the properties only
        // after a reason code.
        4..=7 if body.len() > 3 => vec![3],
        // SUBSCRIBE, UNSUBSCRIBE: the packet identifier.
        8 | 10 => vec![2],
        // DISCONNECT, AUTH: the properties only after a reason code.
        14 | 15 if body.len() > 1 => vec![1],
        _ => Vec::new(),
    })
}

/// Where the length-prefixed string (or binary data) at `at` ends.
fn string_end(body: &[u8], at: usize) -> Option<usize> {
    let len = body.get(at..at + 2)?;
    Some(at + 2 + u16::from_be_bytes([len[0], len[1]]) as usize)
}

/// One property block: each property at most once (user properties excepted), values
/// in their range. "It is a Protocol Error to include … more than once" and "a value
/// other than 0 or 1" are in each property's description (MQTT 5.0, 3.1.2.11 and after).
/// A property the packet type does not allow, or an unknown one, rumqttc refuses.
fn properties(block: &[u8]) -> Result<(), CodecError> {
    let protocol = |what: String| Err(CodecError::Protocol(what));
    let Some((len, n)) = var_int(block)? else {
        return Ok(());
    };
    let Some(mut props) = block.get(n..n + len) else {
        return Ok(());
    };
    let mut seen = 0u64;
    while let Some((&id, rest)) = props.split_first() {
        let size = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Some(1),
            0x13 | 0x21 | 0x22 | 0x23 => Some(2),
            0x02 | 0x11 | 0x18 | 0x27 => Some(4),
            0x0B => var_int(rest)?.map(|(_, n)| n),
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => string_end(rest, 0),
            0x26 => string_end(rest, 0).and_then(|key| string_end(rest, key)),
            _ => None,
        };
        let Some(value) = size.and_then(|s| rest.get(..s)) else {
            return Ok(());
        };
        if id != 0x26 {
            if seen & (1 << id) != 0 {
                return protocol(format!("property {id:#04x} included more than once"));
            }
            seen |= 1 << id;
        }
        match (id, value) {
            // Payload format indicator, request problem / response information.
            (0x01 | 0x17 | 0x19, [v]) if *v > 1 => {
                return protocol(format!("property {id:#04x} is {v}, not 0 or 1"));
            }
            // Subscription identifier (in a SUBSCRIBE: a client's PUBLISH may not have
            // one at all, which the decoder checks).
            (0x0B, _) if var_int(value)?.is_some_and(|(v, _)| v == 0) => {
                return protocol("subscription identifier 0".into());
            }
            _ => {}
        }
        props = &rest[value.len()..];
    }
    Ok(())
}
