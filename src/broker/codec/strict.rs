//! What the specifications require of a client's packets beyond what rumqttc's decoders
//! check (each statement is listed in `docs/conformance.md`):
//! - on the raw frame: the reserved fixed-header flags, the length of the packets whose
//!   length is fixed, the CONNECT's flags and layout (nothing after the fields its flags
//!   announce), the reserved bits and values of subscription options, and the MQTT 5
//!   properties (one of each but user properties; values in range; no U+0000 in a
//!   string), which the decoder would otherwise ignore, keep the last of, or take
//!   whatever they are;
//! - on the decoded packet: DUP on a QoS 0 PUBLISH, packet identifier 0, U+0000 in the
//!   CONNECT's strings, a response topic that is not a topic name, and the DISCONNECT
//!   reason codes a client may send.
//!
//! Variable byte integers in their shortest form are checked where they are read
//! (`codec::var_int`, which frames every packet and walks every property block here).
//! A frame too short to walk passes here: the decoder then refuses it.
//!
//! The cost on the PUBLISH path is a walk of the properties already there (without an
//! allocation) and a `memchr` over each string property; topic names are checked once,
//! by the connection (`topic::validate_topic_name`); payloads are never read.

use super::{CodecError, Packet, Version, fixed_header, malformed, var_int};
use crate::topic::validate_topic_name;

/// Checks the raw frame of one packet, before it is decoded.
pub(super) fn frame(frame: &[u8], version: Version) -> Result<(), CodecError> {
    let byte1 = *frame.first().ok_or_else(|| malformed("empty frame"))?;
    let kind = byte1 >> 4;
    fixed_header_flags(kind, byte1 & 0x0f)?;
    let Some((header, remaining)) = fixed_header(frame)? else {
        return Ok(());
    };
    if let Some(len) = fixed_length(kind, version)
        && remaining != len
    {
        return Err(malformed(format!(
            "packet type {kind} of remaining length {remaining}, not {len}"
        )));
    }
    let body = frame.get(header..).unwrap_or_default();
    let connect_blocks = if kind == 1 {
        Some(connect(body, version)?)
    } else {
        None
    };
    if kind == 8 {
        subscription_options(body, version)?;
    }
    if version == Version::V5 {
        let blocks = connect_blocks.unwrap_or_else(|| property_blocks(body, byte1));
        for start in blocks.into_iter().flatten() {
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
        Packet::Publish(p) => response_topic(p.properties.as_ref()),
        // [MQTT-2.3.1-1] (3.1.1), [MQTT-2.2.1-3] (5.0): rumqttc checks PUBLISH itself.
        Packet::Subscribe { pkid: 0, .. } => Err(malformed("SUBSCRIBE with packet identifier 0")),
        Packet::Unsubscribe { pkid: 0, .. } => {
            Err(malformed("UNSUBSCRIBE with packet identifier 0"))
        }
        Packet::Connect(c) => {
            // [MQTT-1.5.3-2] (3.1.1), [MQTT-1.5.4-2] (5.0); a v5 CONNECT's properties
            // were checked on the frame, a password is binary data.
            let strings = [
                Some(c.client_id.as_str()),
                c.username.as_deref(),
                c.will.as_ref().map(|w| w.topic.as_str()),
            ];
            if strings.into_iter().flatten().any(|s| s.contains('\0')) {
                return Err(malformed("U+0000 in a string of the CONNECT"));
            }
            response_topic(c.will.as_ref().and_then(|w| w.properties.as_ref()))
        }
        _ => Ok(()),
    }
}

/// [MQTT-3.3.2-14]: a response topic (a PUBLISH's or a will's) is a topic name, without
/// wildcards (nor empty, [MQTT-4.7.3-1]).
fn response_topic(properties: Option<&super::PublishProperties>) -> Result<(), CodecError> {
    match properties.and_then(|p| p.response_topic.as_deref()) {
        Some(topic) => validate_topic_name(topic)
            .map_err(|e| CodecError::Protocol(format!("response topic: {e} [MQTT-3.3.2-14]"))),
        None => Ok(()),
    }
}

/// [MQTT-3.14.2-1]: a DISCONNECT's reason code is one of MQTT 5's (else the packet is
/// malformed), and one that table 3-10 lets a client send (else a protocol error).
pub(super) fn disconnect_reason(code: u8) -> Result<u8, CodecError> {
    match code {
        0x00 | 0x04 | 0x80..=0x83 | 0x90 | 0x93..=0x99 => Ok(code),
        0x87 | 0x89 | 0x8B | 0x8D..=0x8F | 0x9A..=0xA2 => Err(CodecError::Protocol(format!(
            "DISCONNECT reason code {code:#04x} is one only a server sends [MQTT-3.14.2-1]"
        ))),
        _ => Err(malformed(format!(
            "DISCONNECT reason code {code:#04x} is not one of MQTT 5's [MQTT-3.14.2-1]"
        ))),
    }
}

/// Reserved fixed-header flags: [MQTT-2.2.2-1] and [MQTT-2.2.2-2] (3.1.1), [MQTT-2.1.3-1]
/// (5.0), and for each packet [MQTT-3.6.1-1] (PUBREL), [MQTT-3.8.1-1] (SUBSCRIBE),
/// [MQTT-3.10.1-1] (UNSUBSCRIBE), [MQTT-3.14.1-1] (DISCONNECT), [MQTT-3.15.1-1] (AUTH);
/// [MQTT-3.3.1-4] a PUBLISH's QoS is not 3.
fn fixed_header_flags(kind: u8, flags: u8) -> Result<(), CodecError> {
    let expected = match kind {
        3 if flags & 0b0110 == 0b0110 => return Err(malformed("PUBLISH with QoS 3")),
        3 => flags, // PUBLISH: dup, qos, retain
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(malformed(format!(
            "invalid fixed header flags {flags:#06b} for packet type {kind}"
        )));
    }
    Ok(())
}

/// The remaining length of the packets that have one length only (their "Remaining
/// Length field" sections): PINGREQ has no body; in 3.1.1, DISCONNECT has none either
/// and PUBACK, PUBREC, PUBREL, PUBCOMP hold only a packet identifier. rumqttc ignores
/// what follows.
fn fixed_length(kind: u8, version: Version) -> Option<usize> {
    match (kind, version) {
        (12, _) | (14, Version::V311) => Some(0),
        (4..=7, Version::V311) => Some(2),
        _ => None,
    }
}

/// Where the property blocks of an MQTT 5 packet other than CONNECT start in its body;
/// None where the body ends first or has none.
fn property_blocks(body: &[u8], byte1: u8) -> [Option<usize>; 2] {
    let block = match byte1 >> 4 {
        // PUBLISH: the topic, the packet identifier at QoS 1 and 2.
        3 => string_end(body, 0).map(|topic| {
            if byte1 & 0b0110 != 0 {
                topic + 2
            } else {
                topic
            }
        }),
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet identifier, and the properties only
        // after a reason code.
        4..=7 if body.len() > 3 => Some(3),
        // SUBSCRIBE, UNSUBSCRIBE: the packet identifier.
        8 | 10 => Some(2),
        // DISCONNECT, AUTH: the properties only after a reason code.
        14 | 15 if body.len() > 1 => Some(1),
        _ => None,
    };
    [block, None]
}

/// A CONNECT's flags and layout: [MQTT-3.1.2-3] the reserved flag is 0; in 3.1.1 a
/// password comes with a user name [MQTT-3.1.2-22]; and nothing follows the fields the
/// flags announce, so a will, user name or password whose flag is 0 is absent: 3.1.1
/// [MQTT-3.1.2-11], [MQTT-3.1.2-18], [MQTT-3.1.2-20]; 5.0 [MQTT-3.1.2-16],
/// [MQTT-3.1.2-18] (rumqttc checks the will's QoS and retain flags). Returns where its
/// MQTT 5 property blocks start, its own and its will's.
fn connect(body: &[u8], version: Version) -> Result<[Option<usize>; 2], CodecError> {
    let Some(name) = string_end(body, 0) else {
        return Ok([None, None]);
    };
    let Some(&flags) = body.get(name + 1) else {
        return Ok([None, None]);
    };
    if flags & 1 != 0 {
        return Err(malformed("CONNECT reserved flag is set [MQTT-3.1.2-3]"));
    }
    if version == Version::V311 && flags & 0b1100_0000 == 0b0100_0000 {
        return Err(malformed("password without a user name [MQTT-3.1.2-22]"));
    }
    // Protocol level, flags and keep alive, then the properties.
    let own = name + 4;
    let Some(layout) = connect_layout(body, version, flags, own)? else {
        return Ok([None, None]);
    };
    if layout.end < body.len() {
        return Err(malformed(format!(
            "{} bytes after the CONNECT's last field (flags {flags:#010b})",
            body.len() - layout.end
        )));
    }
    Ok([(version == Version::V5).then_some(own), layout.will])
}

/// Where a CONNECT's fields are, from its properties (at `props`) on.
struct ConnectLayout {
    /// The will's properties (MQTT 5).
    will: Option<usize>,
    /// The end of the last field.
    end: usize,
}

/// The CONNECT's layout, or None when the body ends before a field's length does.
fn connect_layout(
    body: &[u8],
    version: Version,
    flags: u8,
    props: usize,
) -> Result<Option<ConnectLayout>, CodecError> {
    let properties_end = |at: usize| -> Result<Option<usize>, CodecError> {
        Ok(match version {
            Version::V311 => Some(at),
            Version::V5 => {
                var_int(body.get(at..).unwrap_or_default())?.map(|(len, n)| at + n + len)
            }
        })
    };
    let Some(client_id) = properties_end(props)? else {
        return Ok(None);
    };
    let Some(mut at) = string_end(body, client_id) else {
        return Ok(None);
    };
    let mut will = None;
    if flags & 0b100 != 0 {
        will = (version == Version::V5).then_some(at);
        let Some(topic) = properties_end(at)? else {
            return Ok(None);
        };
        let Some(payload) = string_end(body, topic) else {
            return Ok(None);
        };
        let Some(end) = string_end(body, payload) else {
            return Ok(None);
        };
        at = end;
    }
    // The user name, then the password.
    for flag in [0b1000_0000, 0b0100_0000] {
        if flags & flag != 0 {
            let Some(end) = string_end(body, at) else {
                return Ok(None);
            };
            at = end;
        }
    }
    Ok(Some(ConnectLayout { will, end: at }))
}

/// Each subscription's options byte: its reserved bits are 0, [MQTT-3.8.3-4] (3.1.1:
/// all but the QoS bits, and a QoS of 3, which rumqttc refuses), [MQTT-3.8.3-5] (5.0:
/// bits 6 and 7); in MQTT 5 a QoS or a retain handling of 3 is a protocol error
/// (3.8.3.1). rumqttc's decoders ignore the reserved bits, and call the rest malformed.
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
        let Some(&o) = body.get(filter) else {
            break;
        };
        if o & reserved != 0 {
            return Err(malformed(format!(
                "reserved bits set in subscription options {o:#010b}"
            )));
        }
        if version == Version::V5 && (o & 0b11 == 3 || (o >> 4) & 0b11 == 3) {
            return Err(CodecError::Protocol(format!(
                "QoS or retain handling 3 in subscription options {o:#010b}"
            )));
        }
        at = filter + 1;
    }
    Ok(())
}

/// Where the length-prefixed string (or binary data) at `at` ends.
fn string_end(body: &[u8], at: usize) -> Option<usize> {
    let len = body.get(at..at + 2)?;
    Some(at + 2 + u16::from_be_bytes([len[0], len[1]]) as usize)
}

/// One property block: each property at most once (user properties excepted), values
/// in their range, no U+0000 in a string [MQTT-1.5.4-2] (a user property's name and
/// value both, [MQTT-1.5.7-1]; their UTF-8 the decoder checks). "It is a Protocol Error
/// to include … more than once" and "a value other than 0 or 1" are in each property's
/// description (MQTT 5.0, 3.1.2.11 and after). A property the packet type does not
/// allow, or an unknown one, rumqttc refuses.
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
            // Unknown: the decoder refuses it.
            _ => return Ok(()),
        };
        // A property cut short by its block's length: rumqttc would read its value from
        // what follows the block (found by `cargo fuzz run decode`).
        let Some(value) = size.and_then(|s| rest.get(..s)) else {
            return Err(malformed(format!(
                "property {id:#04x} runs past the end of its property block"
            )));
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
            // The UTF-8 strings (correlation and authentication data are binary).
            (0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F, _) if value[2..].contains(&0) => {
                return Err(malformed(format!("U+0000 in string property {id:#04x}")));
            }
            (0x26, _) => {
                let key = 2 + u16::from_be_bytes([value[0], value[1]]) as usize;
                if value[2..key].contains(&0) || value[key + 2..].contains(&0) {
                    return Err(malformed("U+0000 in a user property"));
                }
            }
            _ => {}
        }
        props = &rest[value.len()..];
    }
    Ok(())
}

#[cfg(test)]
mod tests;
