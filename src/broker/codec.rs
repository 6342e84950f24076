//! Framing and packet translation: bytes from a client ⇄ one normalized [`Packet`] enum
//! for both MQTT 3.1.1 and 5.0.
//!
//! Decoding uses rumqttc's codecs (`mqttbytes::v4` and `v5::mqttbytes::v5`); the version
//! comes from the CONNECT's protocol level, read here before either codec sees it. On
//! top of the codecs this module frames packets (variable byte integers in their
//! shortest form), checks UTF-8 topics, and decodes what rumqttc's v5 decoder cannot: a
//! DISCONNECT without reason code or properties, and AUTH; `strict` checks the rest of
//! what the specifications require (`docs/conformance.md`). Encoding of the small server
//! packets is done here by hand (a few bytes each); PUBLISH and the v5 CONNACK use
//! rumqttc's writers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

pub use rumqttc::v5::mqttbytes::v5::{ConnAckProperties, PublishProperties};

/// Protocol version of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// Why a connection's input cannot be processed; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
}

impl CodecError {
    /// The MQTT 5 DISCONNECT (or CONNACK) reason code for it.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::Malformed(_) => 0x81,
            CodecError::Protocol(_) => 0x82,
            CodecError::UnsupportedProtocol { .. } => 0x84,
            CodecError::TooLarge(_) => 0x95,
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(e.to_string())
}

/// A CONNECT, either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// 3.1.1 clean session / 5.0 clean start.
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5 session expiry interval in seconds (3.1.1: 0 with clean session, else never).
    pub session_expiry: u32,
    /// How many QoS 1/2 messages the client accepts in flight (default 65535).
    pub receive_maximum: u16,
    /// Largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: how many topic aliases the client accepts from us.
    pub topic_alias_max: u16,
    /// MQTT 5 enhanced authentication method (not supported: refused).
    pub auth_method: Option<String>,
}

/// A will message from a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
    /// MQTT 5 will delay interval in seconds.
    pub delay: u32,
}

/// A PUBLISH, either direction, either version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    /// Empty when a v5 client sent only a topic alias (resolved by the connection).
    pub topic: String,
    pub pkid: u16,
    pub payload: Bytes,
    pub properties: Option<PublishProperties>,
}

/// One filter of a SUBSCRIBE with its options (v5 options are false/0 for 3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only for a new subscription, 2: never.
    pub retain_handling: u8,
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck(u16),
    /// Packet id and reason code (v5: >= 0x80 means the client refused the message).
    PubRec(u16, u8),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        /// MQTT 5 subscription identifier.
        id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
    /// A packet only a server may send (CONNACK, SUBACK, …): a protocol violation.
    ServerOnly(&'static str),
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    ConnAck {
        session_present: bool,
        code: u8,
        properties: Option<ConnAckProperties>,
    },
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    /// `reason`: 0, or (MQTT 5) 0x92 for a PUBREL of an unknown packet identifier.
    PubComp {
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    Disconnect {
        reason: u8,
    },
}

/// Reads a fixed header: (header length, remaining length), or None when more bytes are
/// needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let Some((len, n)) = var_int(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    Ok(Some((1 + n, len)))
}

/// The variable byte integer `bytes` start with: its value and its length in bytes;
/// None when `bytes` end first. It uses the fewest bytes its value needs [MQTT-1.5.5-1]
/// (the same encoding as 3.1.1's remaining length): a last byte of 0 after others is
/// refused.
fn var_int(bytes: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = bytes.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(malformed(
                    "variable byte integer longer than its value needs [MQTT-1.5.5-1]",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(malformed("variable byte integer longer than 4 bytes"))
}

/// Takes one whole frame off `buf` when it holds one. `max` bounds the whole packet.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, CodecError> {
    let Some((header, remaining)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header + remaining;
    if total > max {
        return Err(CodecError::TooLarge(total));
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(buf.split_to(total)))
}

/// The protocol of a first frame, which must be a CONNECT (its flags `decode` checks).
pub fn detect_version(frame: &[u8]) -> Result<Version, CodecError> {
    if frame.first() != Some(&0x10) {
        return Err(CodecError::Protocol("first packet is not CONNECT".into()));
    }
    let (header, _) = fixed_header(frame)?.ok_or_else(|| malformed("short CONNECT"))?;
    let mut rest = &frame[header..];
    if rest.len() < 2 {
        return Err(malformed("short CONNECT"));
    }
    let name_len = rest.get_u16() as usize;
    if rest.len() < name_len + 1 {
        return Err(malformed("short CONNECT"));
    }
    let name = String::from_utf8_lossy(&rest[..name_len]).into_owned();
    let level = rest[name_len];
    match (name.as_str(), level) {
        ("MQTT", 4) => Ok(Version::V311),
        ("MQTT", 5) => Ok(Version::V5),
        _ => Err(CodecError::UnsupportedProtocol { name, level }),
    }
}

/// Decodes one frame from [`take_frame`].
pub fn decode(frame: BytesMut, version: Version) -> Result<Packet, CodecError> {
    strict::frame(&frame, version)?;
    let packet = match version {
        Version::V311 => decode_v4(frame),
        Version::V5 => decode_v5(frame),
    }?;
    strict::packet(&packet)?;
    Ok(packet)
}

fn qos4(q: rumqttc::mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

fn decode_v4(mut frame: BytesMut) -> Result<Packet, CodecError> {
    let packet = v4::Packet::read(&mut frame, usize::MAX).map_err(malformed)?;
    Ok(match packet {
        v4::Packet::Connect(c) => {
            let will = c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
                properties: None,
                delay: 0,
            });
            let (username, password) = match c.login {
                Some(l) => (
                    Some(l.username).filter(|u| !u.is_empty()),
                    Some(l.password).filter(|p| !p.is_empty()),
                ),
                None => (None, None),
            };
            Packet::Connect(Box::new(Connect {
                version: Version::V311,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                username,
                password,
                will,
                session_expiry: if c.clean_session { 0 } else { u32::MAX },
                receive_maximum: u16::MAX,
                max_packet_size: None,
                topic_alias_max: 0,
                auth_method: None,
            }))
        }
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Packet::PubRec(a.pkid, 0),
        v4::Packet::PubRel(a) => Packet::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Packet::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.path,
                    qos: qos4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
            id: None,
        },
        v4::Packet::Unsubscribe(u) => {
            if u.topics.is_empty() {
                return Err(CodecError::Protocol("UNSUBSCRIBE without filters".into()));
            }
            Packet::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            }
        }
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::Disconnect => Packet::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => Packet::ServerOnly("CONNACK"),
        v4::Packet::SubAck(_) => Packet::ServerOnly("SUBACK"),
        v4::Packet::UnsubAck(_) => Packet::ServerOnly("UNSUBACK"),
        v4::Packet::PingResp => Packet::ServerOnly("PINGRESP"),
    })
}

fn utf8(bytes: Bytes, what: &str) -> Result<String, CodecError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

fn decode_v5(mut frame: BytesMut) -> Result<Packet, CodecError> {
    match frame[0] {
        // rumqttc refuses a DISCONNECT without reason code or without properties, which
        // MQTT 5 allows.
        0xE0 if frame.len() <= 3 => {
            return Ok(Packet::Disconnect {
                reason: strict::disconnect_reason(frame.get(2).copied().unwrap_or(0))?,
                session_expiry: None,
            });
        }
        // rumqttc's decoder has no AUTH; its properties are checked (`strict`), and
        // whatever it says, the connection refuses it (no CONNECT names a method).
        0xF0 => return Ok(Packet::Auth),
        _ => {}
    }
    let packet = v5::Packet::read(&mut frame, None).map_err(malformed)?;
    Ok(match packet {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.unwrap_or_default();
            let will = match will {
                Some(w) => {
                    let wp = w.properties.clone();
                    Some(Will {
                        topic: utf8(w.topic, "will topic")?,
                        payload: w.message,
                        qos: qos5(w.qos),
                        retain: w.retain,
                        delay: wp.as_ref().and_then(|p| p.delay_interval).unwrap_or(0),
                        properties: wp.map(|p| PublishProperties {
                            payload_format_indicator: p.payload_format_indicator,
                            message_expiry_interval: p.message_expiry_interval,
                            topic_alias: None,
                            response_topic: p.response_topic,
                            correlation_data: p.correlation_data,
                            user_properties: p.user_properties,
                            subscription_identifiers: Vec::new(),
                            content_type: p.content_type,
                        }),
                    })
                }
                None => None,
            };
            let (username, password) = match login {
                Some(l) => (
                    Some(l.username).filter(|u| !u.is_empty()),
                    Some(l.password).filter(|p| !p.is_empty()),
                ),
                None => (None, None),
            };
            if props.receive_maximum == Some(0) {
                return Err(CodecError::Protocol("receive maximum 0".into()));
            }
            if props.max_packet_size == Some(0) {
                return Err(CodecError::Protocol("maximum packet size 0".into()));
            }
            if props.authentication_data.is_some() && props.authentication_method.is_none() {
                return Err(CodecError::Protocol(
                    "authentication data without an authentication method".into(),
                ));
            }
            Packet::Connect(Box::new(Connect {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                username,
                password,
                will,
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
                max_packet_size: props.max_packet_size,
                topic_alias_max: props.topic_alias_max.unwrap_or(0),
                auth_method: props.authentication_method,
            }))
        }
        // A client must not send subscription identifiers [MQTT-3.3.4-6]; refusing them
        // also avoids rumqttc's decoder, which counts each one's type byte twice and then
        // reads the properties that follow as payload (found by fuzz/decode).
        v5::Packet::Publish(p)
            if p.properties
                .as_ref()
                .is_some_and(|pp| !pp.subscription_identifiers.is_empty()) =>
        {
            return Err(CodecError::Protocol(
                "PUBLISH from a client with a subscription identifier".into(),
            ));
        }
        v5::Packet::Publish(p) => Packet::Publish(Publish {
            dup: p.dup,
            qos: qos5(p.qos),
            retain: p.retain,
            topic: utf8(p.topic, "topic name")?,
            pkid: p.pkid,
            payload: p.payload,
            properties: p.properties,
        }),
        v5::Packet::PubAck(a) => Packet::PubAck(a.pkid),
        v5::Packet::PubRec(a) => {
            let failed = !matches!(
                a.reason,
                v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
            );
            Packet::PubRec(a.pkid, if failed { 0x80 } else { 0 })
        }
        v5::Packet::PubRel(a) => Packet::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Packet::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            id: s.properties.as_ref().and_then(|p| p.id),
            filters: s
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.path,
                    qos: qos5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(CodecError::Protocol("UNSUBSCRIBE without filters".into()));
            }
            Packet::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            }
        }
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: strict::disconnect_reason(d.reason_code as u8)?,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Packet::Auth,
        v5::Packet::ConnAck(_) => Packet::ServerOnly("CONNACK"),
        v5::Packet::SubAck(_) => Packet::ServerOnly("SUBACK"),
        v5::Packet::UnsubAck(_) => Packet::ServerOnly("UNSUBACK"),
        v5::Packet::PingResp(_) => Packet::ServerOnly("PINGRESP"),
    })
}

fn put_len(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// An ack: packet id, plus (v5, when not success) the reason code.
fn put_ack(buf: &mut BytesMut, byte1: u8, pkid: u16, reason: u8, version: Version) {
    buf.put_u8(byte1);
    if version == Version::V5 && reason != 0 {
        buf.put_u8(3);
        buf.put_u16(pkid);
        buf.put_u8(reason);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

/// Appends the encoding of `packet` to `buf`.
pub fn encode(packet: &Outgoing, version: Version, buf: &mut BytesMut) -> Result<(), CodecError> {
    match packet {
        Outgoing::ConnAck {
            session_present,
            code,
            properties,
        } => match version {
            Version::V311 => {
                buf.put_u8(0x20);
                buf.put_u8(2);
                buf.put_u8(*session_present as u8);
                buf.put_u8(*code);
            }
            Version::V5 => {
                // Written with rumqttc for the properties, then the code byte patched.
                let ack = v5::ConnAck {
                    session_present: *session_present,
                    code: v5::ConnectReturnCode::Success,
                    properties: properties.clone(),
                };
                let start = buf.len();
                ack.write(buf).map_err(malformed)?;
                let (header, _) = fixed_header(&buf[start..])?.expect("whole CONNACK");
                buf[start + header + 1] = *code;
            }
        },
        Outgoing::Publish(p) => put_publish(buf, p, version)?,
        Outgoing::PubAck { pkid, reason } => put_ack(buf, 0x40, *pkid, *reason, version),
        Outgoing::PubRec { pkid, reason } => put_ack(buf, 0x50, *pkid, *reason, version),
        Outgoing::PubRel { pkid } => put_ack(buf, 0x62, *pkid, 0, version),
        Outgoing::PubComp { pkid, reason } => put_ack(buf, 0x70, *pkid, *reason, version),
        Outgoing::SubAck { pkid, codes } | Outgoing::UnsubAck { pkid, codes } => {
            let suback = matches!(packet, Outgoing::SubAck { .. });
            buf.put_u8(if suback { 0x90 } else { 0xB0 });
            match version {
                Version::V311 if !suback => {
                    put_len(buf, 2);
                    buf.put_u16(*pkid);
                }
                Version::V311 => {
                    put_len(buf, 2 + codes.len());
                    buf.put_u16(*pkid);
                    buf.put_slice(codes);
                }
                Version::V5 => {
                    put_len(buf, 3 + codes.len());
                    buf.put_u16(*pkid);
                    buf.put_u8(0); // no properties
                    buf.put_slice(codes);
                }
            }
        }
        Outgoing::PingResp => buf.put_slice(&[0xD0, 0]),
        Outgoing::Disconnect { reason } => match version {
            Version::V311 => {} // 3.1.1 servers never send DISCONNECT
            Version::V5 => buf.put_slice(&[0xE0, 1, *reason]),
        },
    }
    Ok(())
}

/// A PUBLISH's v5 properties, encoded with their length (None for 3.1.1, or none).
fn publish_properties(p: &Publish, version: Version) -> Result<Option<BytesMut>, CodecError> {
    match (version, &p.properties) {
        (Version::V5, Some(props)) => {
            let mut out = BytesMut::new();
            props.write(&mut out).map_err(malformed)?;
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

/// A PUBLISH's remaining length: what follows its fixed header.
fn publish_remaining(p: &Publish, version: Version, properties: Option<&[u8]>) -> usize {
    let pkid = if p.qos > 0 { 2 } else { 0 };
    let properties = match (version, properties) {
        (Version::V311, _) => 0,
        (Version::V5, Some(props)) => props.len(),
        // A property length of 0.
        (Version::V5, None) => 1,
    };
    2 + p.topic.len() + pkid + properties + p.payload.len()
}

/// Bytes a remaining length takes.
fn len_len(len: usize) -> usize {
    match len {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    }
}

/// The largest remaining length MQTT can encode (see
/// [`MQTT_MAX_REMAINING`](crate::config::units::MQTT_MAX_REMAINING), where the
/// configured sizes are checked against it).
pub const MAX_REMAINING: usize = crate::config::units::MQTT_MAX_REMAINING;

/// Writes a PUBLISH straight from `p`, without copying its topic or payload into another
/// packet type first (it is the packet every subscriber gets).
fn put_publish(buf: &mut BytesMut, p: &Publish, version: Version) -> Result<(), CodecError> {
    if p.qos > 2 {
        return Err(malformed("invalid QoS"));
    }
    if p.qos > 0 && p.pkid == 0 {
        return Err(malformed("packet identifier 0 on a QoS 1 or 2 PUBLISH"));
    }
    if p.topic.len() > u16::MAX as usize {
        return Err(malformed("topic longer than 65,535 bytes"));
    }
    let properties = publish_properties(p, version)?;
    let len = publish_remaining(p, version, properties.as_deref());
    if len > MAX_REMAINING {
        return Err(malformed("PUBLISH larger than MQTT can encode"));
    }
    buf.reserve(1 + len_len(len) + len);
    buf.put_u8(0x30 | (p.dup as u8) << 3 | p.qos << 1 | p.retain as u8);
    put_len(buf, len);
    buf.put_u16(p.topic.len() as u16);
    buf.put_slice(p.topic.as_bytes());
    if p.qos > 0 {
        buf.put_u16(p.pkid);
    }
    match (version, properties) {
        (Version::V311, _) => {}
        (Version::V5, Some(props)) => buf.put_slice(&props),
        (Version::V5, None) => buf.put_u8(0),
    }
    buf.put_slice(&p.payload);
    Ok(())
}

/// Size of the PUBLISH `p` once encoded (for the client's maximum packet size), computed
/// without encoding it (its v5 properties aside); `usize::MAX` when those cannot be.
pub fn publish_len(p: &Publish, version: Version) -> usize {
    match publish_properties(p, version) {
        Ok(properties) => {
            let len = publish_remaining(p, version, properties.as_deref());
            1 + len_len(len) + len
        }
        Err(_) => usize::MAX,
    }
}

mod strict;
#[cfg(test)]
mod tests;
