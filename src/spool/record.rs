//! One spooled message on disk: a length- and checksum-framed record.
//!
//! ```text
//! u32 body length | u32 CRC-32C of the body | body
//! body: u64 seq | i64 received_at (µs since the epoch) | u8 qos | u8 flags
//!       | str topic | str source | [str client_id] | [str content_type]
//!       | [str response_topic] | [bytes correlation_data]
//!       | u32 user property count | (str, str)* | bytes payload
//! ```
//! Integers are little-endian; `str` and `bytes` are a u32 length and the bytes; the
//! bracketed fields are present when their `flags` bit is set. A record whose checksum
//! does not match (a write torn by a crash) ends the readable part of a segment.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use bytestring::ByteString;

use crate::delivery::Ack;
use crate::message::{Message, Properties};

/// Bytes before the body: length and checksum.
pub const HEADER: usize = 8;

/// Largest body a reader accepts; anything longer is a corrupt length.
pub const MAX_BODY: usize = 1 << 30;

/// CRC-32C (Castagnoli, as iSCSI and ext4 use): the CPU's own instruction where it has
/// one (SSE 4.2, ARMv8). Slice-by-16 tables still took 2.5% of a spooled PostgreSQL
/// run's CPU (BENCHMARKS.md, "The database path").
fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

const RETAIN: u8 = 1;
const CLIENT_ID: u8 = 1 << 1;
const CONTENT_TYPE: u8 = 1 << 2;
const RESPONSE_TOPIC: u8 = 1 << 3;
const CORRELATION: u8 = 1 << 4;

/// Appends `msg` as record number `seq` to `out`.
pub fn encode(seq: u64, msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let p = &msg.properties;
    let flags = [
        (msg.retain, RETAIN),
        (msg.client_id.is_some(), CLIENT_ID),
        (p.content_type.is_some(), CONTENT_TYPE),
        (p.response_topic.is_some(), RESPONSE_TOPIC),
        (p.correlation_data.is_some(), CORRELATION),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .fold(0, |acc, (_, bit)| acc | bit);
    out.put_u64_le(seq);
    out.put_i64_le(msg.received_at.as_microsecond());
    out.put_u8(msg.qos);
    out.put_u8(flags);
    put_bytes(out, msg.topic.as_bytes());
    put_bytes(out, msg.source.as_bytes());
    let client_id = msg.client_id.as_deref();
    for s in [
        client_id,
        p.content_type.as_deref(),
        p.response_topic.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        put_bytes(out, s.as_bytes());
    }
    if let Some(c) = &p.correlation_data {
        put_bytes(out, c);
    }
    out.put_u32_le(p.user_properties.len() as u32);
    for (k, v) in &p.user_properties {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_bytes(out, &msg.payload);
    let body_len = out.len() - start - HEADER;
    let crc = checksum(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.extend_from_slice(b);
}

/// A record's header: the body length, or why it cannot be one.
pub fn body_len(header: &[u8; HEADER]) -> Result<(usize, u32), String> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_BODY {
        return Err(format!("record length {len} is past the limit"));
    }
    Ok((len, crc))
}

/// A decoded record: its number and the message (with a detached ack; the reader
/// attaches the real one).
pub struct Decoded {
    pub seq: u64,
    pub message: Message,
}

/// Checks and decodes a body read after a header with checksum `crc`. `sources` interns
/// source names so records do not each allocate one.
///
/// The topic and the payload (the last field, the body itself with the rest skipped)
/// share the body: splitting the topic off allocates the body's shared header once, in
/// place of a copy of the topic, and later copies of either are reference counts. The
/// other texts are copied out (see [`take`]).
pub fn decode(body: Bytes, crc: u32, names: &mut Names) -> Result<Decoded, String> {
    if checksum(&body) != crc {
        return Err("checksum mismatch".into());
    }
    let mut b = body;
    if b.remaining() < 18 {
        return Err(truncated());
    }
    let seq = b.get_u64_le();
    let received_at = jiff::Timestamp::from_microsecond(b.get_i64_le())
        .map_err(|e| format!("bad receive time: {e}"))?;
    let qos = b.get_u8();
    let flags = b.get_u8();
    let text = |b: &[u8]| utf8(b).map(String::from);
    // A slice of the body, as the payload is (see above).
    let n = bytes_u32(&mut b).ok_or_else(truncated)? as usize;
    if b.remaining() < n {
        return Err(truncated());
    }
    let topic = ByteString::try_from(b.split_to(n)).map_err(not_utf8)?;
    let source = take(&mut b, |name| names.source(name))?;
    let client_id = (flags & CLIENT_ID != 0)
        .then(|| take(&mut b, |id| names.client_id(id)))
        .transpose()?;
    let mut optional = |bit: u8| (flags & bit != 0).then(|| take(&mut b, text)).transpose();
    let content_type = optional(CONTENT_TYPE)?;
    let response_topic = optional(RESPONSE_TOPIC)?;
    let correlation_data = (flags & CORRELATION != 0)
        .then(|| take(&mut b, |c| Ok(Bytes::copy_from_slice(c))))
        .transpose()?;
    let count = bytes_u32(&mut b).ok_or_else(truncated)? as usize;
    let mut user_properties = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let k = take(&mut b, text)?;
        let v = take(&mut b, text)?;
        user_properties.push((k, v));
    }
    let n = bytes_u32(&mut b).ok_or_else(truncated)? as usize;
    if b.remaining() < n {
        return Err(truncated());
    }
    let mut payload = b;
    if payload.len() > n {
        payload.truncate(n);
    }
    Ok(Decoded {
        seq,
        message: Message {
            topic,
            payload,
            qos,
            retain: flags & RETAIN != 0,
            properties: Properties {
                user_properties,
                content_type,
                response_topic,
                correlation_data,
            },
            client_id,
            received_at,
            source,
            ack: Ack::detached(),
        },
    })
}

fn truncated() -> String {
    "record shorter than its fields".into()
}

fn bytes_u32(b: &mut Bytes) -> Option<u32> {
    (b.remaining() >= 4).then(|| b.get_u32_le())
}

/// The names a reader's records repeat, each kept once: the few sources', and the
/// client ids read lately, so that a connection's messages share one `Arc<str>` again
/// after the spool as they did before it.
#[derive(Default)]
pub struct Names {
    sources: Vec<Arc<str>>,
    /// Direct-mapped by a hash of the id: bounded, and a miss costs only the copy.
    client_ids: Vec<Option<Arc<str>>>,
}

/// Slots of [`Names`]'s client ids.
const CLIENT_ID_SLOTS: usize = 256;

impl Names {
    fn source(&mut self, name: &[u8]) -> Result<Arc<str>, String> {
        if let Some(s) = self.sources.iter().find(|s| s.as_bytes() == name) {
            return Ok(Arc::clone(s));
        }
        let s = utf8_shared(name)?;
        self.sources.push(Arc::clone(&s));
        Ok(s)
    }

    fn client_id(&mut self, id: &[u8]) -> Result<Arc<str>, String> {
        if self.client_ids.is_empty() {
            self.client_ids.resize(CLIENT_ID_SLOTS, None);
        }
        // FNV-1a.
        let hash = id.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let slot = &mut self.client_ids[hash as usize % CLIENT_ID_SLOTS];
        if let Some(s) = slot.as_ref().filter(|s| s.as_bytes() == id) {
            return Ok(Arc::clone(s));
        }
        let s = utf8_shared(id)?;
        *slot = Some(Arc::clone(&s));
        Ok(s)
    }
}

fn not_utf8<E>(_: E) -> String {
    "text is not UTF-8".into()
}

fn utf8(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(not_utf8)
}

fn utf8_shared(b: &[u8]) -> Result<Arc<str>, String> {
    utf8(b).map(Arc::from)
}

/// The next length-prefixed field, read by `read` from the body's bytes, which are then
/// skipped.
fn take<T>(b: &mut Bytes, read: impl FnOnce(&[u8]) -> Result<T, String>) -> Result<T, String> {
    let n = bytes_u32(b).ok_or_else(truncated)? as usize;
    let field = b.get(..n).ok_or_else(truncated)?;
    let value = read(field)?;
    b.advance(n);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc_32c() {
        // The catalogue's check value: spools written with any implementation still read.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        // Lengths around the instruction's 8-byte steps.
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 4099] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let mut slow = !0u32;
            for b in &bytes {
                slow ^= u32::from(*b);
                for _ in 0..8 {
                    slow = (slow >> 1) ^ (0x82F6_3B78 & (slow & 1).wrapping_neg());
                }
            }
            assert_eq!(checksum(&bytes), !slow, "{n} bytes");
        }
    }

    fn full_message() -> Message {
        let mut m = Message::detached("sensors/d1/telemetry", &b"{\"temp\": 21.5}"[..], 1);
        m.retain = true;
        m.client_id = Some("dev-1".into());
        m.source = Arc::from("embedded");
        m.properties = Properties {
            user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
            content_type: Some("application/json".into()),
            response_topic: Some("reply/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        };
        m
    }

    fn roundtrip(seq: u64, m: &Message) -> Decoded {
        let mut buf = Vec::new();
        encode(seq, m, &mut buf);
        let header: [u8; HEADER] = buf[..HEADER].try_into().unwrap();
        let (len, crc) = body_len(&header).unwrap();
        assert_eq!(len, buf.len() - HEADER);
        // A body of its own, as the segment reader reads it.
        decode(
            Bytes::from(buf[HEADER..].to_vec()),
            crc,
            &mut Names::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_readers_records_share_their_client_ids() {
        let mut names = Names::default();
        let mut read = |client: &str| {
            let mut m = full_message();
            m.client_id = Some(Arc::from(client));
            let mut buf = Vec::new();
            encode(1, &m, &mut buf);
            let (_, crc) = body_len(&buf[..HEADER].try_into().unwrap()).unwrap();
            let body = Bytes::from(buf[HEADER..].to_vec());
            let m = decode(body, crc, &mut names).unwrap().message;
            (m.client_id.unwrap(), m.source)
        };
        let (a, source_a) = read("sensor-1");
        let (b, source_b) = read("sensor-1");
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&source_a, &source_b));
        // Every other id, however many, is read right, whatever slot it takes.
        let others: Vec<String> = (0..1000).map(|i| format!("device-{i}")).collect();
        for id in &others {
            assert_eq!(&*read(id).0, id.as_str());
        }
        assert_eq!(&*read("sensor-1").0, "sensor-1");
        assert!(names.client_ids.len() == CLIENT_ID_SLOTS);
    }

    #[test]
    fn a_body_cut_short_is_an_error() {
        let mut buf = Vec::new();
        encode(7, &full_message(), &mut buf);
        let body = &buf[HEADER..];
        for end in 0..body.len() {
            let cut = body[..end].to_vec();
            let crc = checksum(&cut);
            let err = decode(Bytes::from(cut), crc, &mut Names::default()).err();
            assert_eq!(
                err.as_deref(),
                Some("record shorter than its fields"),
                "{end}"
            );
        }
    }

    #[test]
    fn every_field_survives_the_round_trip() {
        let m = full_message();
        let d = roundtrip(42, &m);
        assert_eq!(d.seq, 42);
        let r = d.message;
        assert_eq!(r.topic, m.topic);
        assert_eq!(r.payload, m.payload);
        assert_eq!((r.qos, r.retain), (1, true));
        assert_eq!(r.client_id, m.client_id);
        assert_eq!(&*r.source, "embedded");
        assert_eq!(r.properties, m.properties);
        assert_eq!(
            r.received_at.as_microsecond(),
            m.received_at.as_microsecond()
        );

        let bare = Message::detached("t", Bytes::new(), 0);
        let r = roundtrip(0, &bare).message;
        assert_eq!((&*r.topic, r.payload.len()), ("t", 0));
        assert_eq!(r.properties, Properties::default());
        assert_eq!(r.client_id, None);
    }

    #[test]
    fn the_topic_is_a_slice_of_the_body_and_must_be_utf8() {
        let mut buf = Vec::new();
        encode(7, &full_message(), &mut buf);
        let body = Bytes::from(buf[HEADER..].to_vec());
        let span = body.as_ptr_range();
        let d = decode(body.clone(), checksum(&body), &mut Names::default()).unwrap();
        assert!(span.contains(&d.message.topic.as_ptr()), "not copied");
        assert_eq!(&*d.message.topic, "sensors/d1/telemetry");

        // The topic's first byte (after seq, time, qos, flags and its length), made
        // invalid UTF-8 under a checksum that matches: refused, not read as text.
        let mut bad = buf[HEADER..].to_vec();
        assert_eq!(bad[22], b's');
        bad[22] = 0xFF;
        let crc = checksum(&bad);
        let err = decode(Bytes::from(bad), crc, &mut Names::default()).err();
        assert_eq!(err.as_deref(), Some("text is not UTF-8"));
    }

    #[test]
    fn a_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(7, &full_message(), &mut buf);
        let header: [u8; HEADER] = buf[..HEADER].try_into().unwrap();
        let (_, crc) = body_len(&header).unwrap();
        for i in HEADER..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            let err = decode(Bytes::from(bad).slice(HEADER..), crc, &mut Names::default())
                .err()
                .expect("corruption detected");
            assert_eq!(err, "checksum mismatch");
        }
    }
}
