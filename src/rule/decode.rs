//! How a payload becomes the `payload` value that filters and transforms see: the
//! rule's `decode` ([`Decode`]) and [`decode`], which reads one payload.
//!
//! JSON goes straight into a jq value (no intermediate `serde_json::Value`); text and
//! bytes share the payload's buffer. The binary formats, [`cbor`] and [`msgpack`], are
//! read item by item into the same JSON-like value, through the helpers below, so
//! that both map numbers, byte strings, map keys and nesting the same way:
//!
//! - integers are numbers when they fit in an i64 or a u64, else their decimal text;
//! - NaN and the infinities (which JSON cannot hold) are null;
//! - byte strings are jq byte strings, as `decode: bytes` gives (base64 when written
//!   out as JSON);
//! - map keys that are not text become text: numbers as their decimal text, byte
//!   strings as their base64, anything else as its JSON text; of duplicate keys the
//!   last value wins (as for JSON);
//! - arrays and maps nest at most [`MAX_DEPTH`] levels deep, as JSON does.
//!
//! A payload that is not exactly one well-formed item is an error: the message is
//! dead-lettered with it.
//!
//! [`protobuf`] (feature `protobuf`) reads a payload against a message type compiled when
//! the config loads, so a rule's compiled decode is a [`Decoder`], not just a [`Decode`].
//! [`sparkplug`] (Sparkplug B, feature `protobuf` too) makes one value per metric and
//! remembers what births announced, so it reads messages in arrival order
//! ([`Decoder::observe`]) and may ask the pipeline to publish a command ([`Observed`]).

mod cbor;
mod msgpack;
#[cfg(feature = "protobuf")]
mod protobuf;
#[cfg(feature = "protobuf")]
mod sparkplug;

use base64::Engine as _;
use bytes::Bytes;
use jaq_json::{Num, Val};
use serde::{Deserialize, Serialize};

/// How a payload is turned into the `payload` value that filters and transforms see.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Decode {
    /// JSON document (nesting limited to 128 levels).
    #[default]
    Json,
    /// UTF-8 text.
    Text,
    /// Raw bytes (a jq byte string; base64 when written out as JSON).
    Bytes,
    /// One CBOR item (RFC 8949), read as JSON: integers beyond i64/u64 and bignums
    /// (tags 2, 3) that do not fit become decimal strings; NaN and infinities become
    /// null; byte strings as `bytes` gives them; map keys that are not text become text
    /// (numbers as decimals, byte strings as base64, others as JSON text), the last of
    /// duplicate keys wins; tags other than 2 and 3 are dropped (tag 0 gives its
    /// date/time string, tag 1 its epoch seconds as a number); undefined is null; other
    /// simple values are their number. Nesting limited to 128 levels.
    Cbor,
    /// One MessagePack value, read as JSON like `cbor`; the timestamp extension (type
    /// -1) becomes an RFC 3339 UTC string (with fractional seconds only when not zero),
    /// other extensions `{"ext": type, "data": bytes}`. Nesting limited to 128 levels.
    Msgpack,
}

/// As written in the config: `json`, `text`, `bytes`, `cbor` or `msgpack`.
impl std::fmt::Display for Decode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decode::Json => "json",
            Decode::Text => "text",
            Decode::Bytes => "bytes",
            Decode::Cbor => "cbor",
            Decode::Msgpack => "msgpack",
        })
    }
}

#[cfg(feature = "protobuf")]
pub use sparkplug::Sparkplug;

/// A rule's compiled `decode`: a format [`Decode`] names, a Protobuf message type, or
/// Sparkplug B.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoder {
    Named(Decode),
    /// `decode: { protobuf: ... }`: the message type, compiled when the config loads.
    #[cfg(feature = "protobuf")]
    Protobuf(prost_reflect::MessageDescriptor),
    /// `decode: sparkplug_b`, with what it remembers of the edge nodes (shared by the
    /// rule's copies).
    #[cfg(feature = "protobuf")]
    SparkplugB(std::sync::Arc<Sparkplug>),
}

/// What a decoder made of a payload: one value, or (Sparkplug B) one per record to make.
#[derive(Debug)]
pub enum Decoded {
    One(Val),
    Each(Vec<Val>),
}

/// What a decoder that reads messages in arrival order (Sparkplug B) made of one.
#[derive(Debug)]
pub struct Observed {
    /// One value per record to make, or why the message cannot be read.
    pub payloads: Result<Vec<Val>, String>,
    /// A `seq` that did not follow the last one.
    pub gap: Option<Gap>,
    /// A message to publish to the broker mqbridge reads from (a rebirth request).
    pub command: Option<Command>,
}

impl Observed {
    /// Records (or an error) and nothing else.
    pub fn records(payloads: Result<Vec<Val>, String>) -> Observed {
        Observed {
            payloads,
            gap: None,
            command: None,
        }
    }
}

/// A gap in an edge node's `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// `{group}/{edge node}`.
    pub node: String,
    pub expected: u8,
    pub got: u8,
}

/// A message a decoder asks to publish: QoS 0, not retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Why, for the log.
    pub why: String,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::Named(Decode::default())
    }
}

impl From<Decode> for Decoder {
    fn from(how: Decode) -> Decoder {
        Decoder::Named(how)
    }
}

/// The format's name, `protobuf` and the message type's full name, or `sparkplug_b`.
impl std::fmt::Display for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decoder::Named(how) => how.fmt(f),
            #[cfg(feature = "protobuf")]
            Decoder::Protobuf(message) => write!(f, "protobuf {}", message.full_name()),
            #[cfg(feature = "protobuf")]
            Decoder::SparkplugB(s) => s.fmt(f),
        }
    }
}

impl Decoder {
    /// Decodes the payload of a message on `topic`; the error says why it cannot be
    /// read. A decoder that keeps state (Sparkplug B) reads against it without changing
    /// it: the pipeline reads through [`Decoder::observe`].
    #[cfg_attr(not(feature = "protobuf"), allow(unused_variables))]
    pub fn decode(&self, topic: &str, payload: &Bytes) -> Result<Decoded, String> {
        match self {
            Decoder::Named(how) => decode(*how, payload).map(Decoded::One),
            #[cfg(feature = "protobuf")]
            Decoder::Protobuf(message) => protobuf::decode(message, payload)
                .map(Decoded::One)
                .map_err(|e| {
                    format!(
                        "payload is not a valid Protobuf {}: {e}",
                        message.full_name()
                    )
                }),
            #[cfg(feature = "protobuf")]
            Decoder::SparkplugB(s) => s.peek(topic, payload).map(Decoded::Each),
        }
    }

    /// Whether this decoder reads messages in arrival order, through
    /// [`Decoder::observe`].
    pub fn in_order(&self) -> bool {
        match self {
            #[cfg(feature = "protobuf")]
            Decoder::SparkplugB(_) => true,
            _ => false,
        }
    }

    /// For a decoder that reads messages in arrival order ([`Decoder::in_order`]): reads
    /// the payload of a message on `topic`, updating what it remembers. None for others.
    #[cfg_attr(not(feature = "protobuf"), allow(unused_variables))]
    pub fn observe(&self, topic: &str, payload: &Bytes) -> Option<Observed> {
        match self {
            #[cfg(feature = "protobuf")]
            Decoder::SparkplugB(s) => Some(s.observe(topic, payload)),
            _ => None,
        }
    }

    /// The variables the decoder reads from a topic (Sparkplug B's group, message type,
    /// edge node and device), added to the rule's own captures.
    #[cfg_attr(not(feature = "protobuf"), allow(unused_variables))]
    pub fn vars<'t>(&self, topic: &'t str) -> Vec<(&'static str, &'t str)> {
        match self {
            #[cfg(feature = "protobuf")]
            Decoder::SparkplugB(_) => sparkplug::vars(topic),
            _ => Vec::new(),
        }
    }

    /// Takes over what `earlier` (this rule's decoder before a config reload) remembers.
    #[cfg_attr(not(feature = "protobuf"), allow(unused_variables))]
    pub fn carry_over(&self, earlier: &Decoder) {
        #[cfg(feature = "protobuf")]
        if let (Decoder::SparkplugB(now), Decoder::SparkplugB(before)) = (self, earlier) {
            now.carry_over(before);
        }
    }
}

/// Decodes a payload per the rule's `decode`; the error says why it cannot be read.
pub fn decode(how: Decode, payload: &Bytes) -> Result<Val, String> {
    match how {
        Decode::Json => serde_json::from_slice::<Val>(payload)
            .map_err(|e| format!("payload is not valid JSON: {e}")),
        Decode::Text => std::str::from_utf8(payload)
            .map(|_| Val::utf8_str(payload.clone()))
            .map_err(|e| format!("payload is not valid UTF-8: {e}")),
        Decode::Bytes => Ok(Val::byte_str(payload.clone())),
        Decode::Cbor => {
            cbor::decode(payload).map_err(|e| format!("payload is not valid CBOR: {e}"))
        }
        Decode::Msgpack => {
            msgpack::decode(payload).map_err(|e| format!("payload is not valid MessagePack: {e}"))
        }
    }
}

/// How deep arrays and maps may nest in a binary payload: as deep as in a JSON one
/// (serde_json's limit), so that no payload can exhaust the stack.
const MAX_DEPTH: usize = 128;

/// The depth inside one more array or map, or the error when that is too deep.
fn nested(depth: usize, at: usize) -> Result<usize, String> {
    if depth >= MAX_DEPTH {
        return Err(format!(
            "nested deeper than {MAX_DEPTH} levels at byte {at}"
        ));
    }
    Ok(depth + 1)
}

/// How many elements to make room for before reading them: a count read from the
/// payload is a claim, not a promise, so at most a few.
fn room(count: usize) -> usize {
    count.min(1024)
}

/// An integer: a number when it fits in an i64 or a u64, else its decimal text.
fn int(i: i128) -> Val {
    if i64::try_from(i).is_ok() || u64::try_from(i).is_ok() {
        Val::Num(Num::from_integral(i))
    } else {
        Val::from(i.to_string())
    }
}

/// A float; NaN and the infinities (which JSON cannot hold) are null.
fn float(f: f64) -> Val {
    if f.is_finite() {
        Val::Num(Num::Float(f))
    } else {
        Val::Null
    }
}

/// A map, its keys made text (see [`key`]); of duplicate keys the last value wins.
fn object(entries: Vec<(Val, Val)>) -> Val {
    Val::obj(entries.into_iter().map(|(k, v)| (key(k), v)).collect())
}

/// A map key as text: text as is, a byte string as its base64, anything else (numbers,
/// booleans, null, arrays, maps) as its JSON text.
fn key(k: Val) -> Val {
    match k {
        Val::TStr(_) => k,
        Val::BStr(b) => Val::from(base64::engine::general_purpose::STANDARD.encode(&**b)),
        other => Val::from(super::jq::to_json(&other).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_of(v: &Val) -> serde_json::Value {
        super::super::jq::to_json(v)
    }

    #[test]
    fn integers_beyond_64_bits_are_decimal_text() {
        assert_eq!(json_of(&int(-5)), json!(-5));
        assert_eq!(json_of(&int(u64::MAX.into())), json!(u64::MAX));
        assert_eq!(json_of(&int(i64::MIN.into())), json!(i64::MIN));
        assert_eq!(
            json_of(&int(i128::from(i64::MIN) - 1)),
            json!("-9223372036854775809")
        );
        assert_eq!(
            json_of(&int(i128::from(u64::MAX) + 1)),
            json!("18446744073709551616")
        );
    }

    #[test]
    fn non_finite_floats_are_null() {
        assert_eq!(float(f64::NAN), Val::Null);
        assert_eq!(float(f64::NEG_INFINITY), Val::Null);
        assert_eq!(json_of(&float(1.5)), json!(1.5));
    }

    #[test]
    fn keys_become_text_and_the_last_duplicate_wins() {
        let entries = vec![
            (Val::from(7isize), Val::from(1isize)),
            (Val::byte_str(Bytes::from_static(&[0, 159, 146])), Val::Null),
            (Val::Bool(true), Val::Null),
            (Val::from(1.5), Val::Null),
            ([Val::from(1isize)].into_iter().collect(), Val::Null),
            (Val::from("7".to_string()), Val::from(2isize)),
        ];
        assert_eq!(
            json_of(&object(entries)),
            json!({"7": 2, "AJ+S": null, "true": null, "1.5": null, "[1]": null})
        );
    }

    #[test]
    fn decoders_are_named_as_in_the_config_and_say_what_failed() {
        for (how, name) in [(Decode::Cbor, "cbor"), (Decode::Msgpack, "msgpack")] {
            assert_eq!(how.to_string(), name);
            assert_eq!(serde_json::from_value::<Decode>(json!(name)).unwrap(), how);
        }
        let trailing = Bytes::from_static(&[1, 2]);
        assert!(
            decode(Decode::Cbor, &trailing)
                .unwrap_err()
                .starts_with("payload is not valid CBOR: 1 bytes after")
        );
        assert!(
            decode(Decode::Msgpack, &trailing)
                .unwrap_err()
                .starts_with("payload is not valid MessagePack: 1 bytes after")
        );
    }

    #[test]
    fn any_bytes_are_a_value_or_an_error_never_a_panic() {
        use proptest::prelude::*;
        proptest!(|(payload in proptest::collection::vec(any::<u8>(), 0..512))| {
            let payload = Bytes::from(payload);
            let _ = decode(Decode::Cbor, &payload);
            let _ = decode(Decode::Msgpack, &payload);
        });
    }

    #[test]
    fn nesting_stops_at_the_json_limit() {
        assert_eq!(nested(MAX_DEPTH - 1, 0), Ok(MAX_DEPTH));
        assert!(nested(MAX_DEPTH, 9).unwrap_err().contains("at byte 9"));
    }

    /// In each binary format, arrays of one element nested `MAX_DEPTH` deep read down to
    /// their 0; one level more is refused where it starts, and so is an endless run.
    #[test]
    fn binary_payloads_nest_as_deep_as_json_and_no_deeper() {
        // Each format's marker of an array of one element.
        for (how, array_of_one) in [(Decode::Cbor, 0x81), (Decode::Msgpack, 0x91)] {
            let nest = |levels: usize| {
                let mut payload = vec![array_of_one; levels];
                payload.push(0x00);
                Bytes::from(payload)
            };
            let mut deepest = &json_of(&decode(how, &nest(MAX_DEPTH)).unwrap());
            for _ in 0..MAX_DEPTH {
                deepest = &deepest[0];
            }
            assert_eq!(deepest, &json!(0), "{how}");
            let too_deep = decode(how, &nest(MAX_DEPTH + 1)).unwrap_err();
            assert!(
                too_deep.ends_with("nested deeper than 128 levels at byte 128"),
                "{how}: {too_deep}"
            );
            let endless = decode(how, &Bytes::from(vec![array_of_one; 100_000])).unwrap_err();
            assert!(
                endless.contains("nested deeper than 128 levels"),
                "{how}: {endless}"
            );
        }
    }
}
