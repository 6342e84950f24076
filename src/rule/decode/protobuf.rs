//! `decode: { protobuf: ... }`: one Protobuf message of the type the rule names (compiled
//! when the config loads, see `config::protobuf`), decoded by prost-reflect and mapped
//! into the value jq sees. What is particular to Protobuf:
//!
//! - field names are as written in the schema (not the camelCase of Protobuf's JSON);
//! - a field is present when the schema cannot tell it from absent (a proto3 scalar
//!   without `optional`, a repeated field, a map), with its default when the payload
//!   does not carry it: a reading of 0 is 0, not missing. A field that has presence (a
//!   message, a proto3 `optional`, a `oneof` member, a proto2 field) appears only when
//!   the payload sets it, so `.payload.x` is then null;
//! - enums are their value's name; a number the schema does not name stays a number;
//! - 32-bit integers are numbers; 64-bit ones are numbers when a double holds them
//!   exactly (|v| ≤ 2^53), else their decimal text (Protobuf's JSON mapping makes every
//!   64-bit integer text; we only do so where a JSON reader could lose digits);
//! - `float` is the shortest decimal that reads back as the same float (0.1, not
//!   0.10000000149011612); NaN and the infinities are null, as for the other formats;
//! - bytes are jq byte strings, as `decode: bytes` gives them;
//! - nested messages are objects, repeated fields arrays, maps objects (keys as text,
//!   in sorted order);
//! - unknown fields are dropped;
//! - three kinds of well-known types read as the value they stand for: a
//!   `google.protobuf.Timestamp` as RFC 3339 UTC text (fractional seconds only when not
//!   zero, as for MessagePack timestamps), a `Duration` as its seconds (a number), a
//!   wrapper (`DoubleValue`, `StringValue`, ...) as the value it wraps. A timestamp
//!   beyond what RFC 3339 can write stays a message, as do the other well-known types.
//!
//! Nesting is bounded by prost's decoder (100 levels), below the JSON limit.

use bytes::Bytes;
use jaq_json::Val;
use prost_reflect::{DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, Value};

use super::{float, int};

/// Reads `payload` as one message of type `desc`.
pub(super) fn decode(desc: &MessageDescriptor, payload: &Bytes) -> Result<Val, String> {
    let msg = DynamicMessage::decode(desc.clone(), payload.clone()).map_err(|e| {
        let e = e.to_string();
        // The caller says what failed to decode.
        match e.strip_prefix("failed to decode Protobuf message: ") {
            Some(why) => why.to_string(),
            None => e,
        }
    })?;
    Ok(message(&msg))
}

/// A message as an object, its fields in the schema's order (or, for some well-known
/// types, the value it stands for).
fn message(msg: &DynamicMessage) -> Val {
    if let Some(v) = well_known(msg) {
        return v;
    }
    let desc = msg.descriptor();
    let fields = desc
        .fields()
        .filter(|f| !f.supports_presence() || msg.has_field(f))
        .map(|f| {
            let v = value(&msg.get_field(&f), &f.kind());
            (Val::from(f.name().to_string()), v)
        });
    Val::obj(fields.collect())
}

/// One value of a field of kind `kind` (for a list or map, of its elements or values).
fn value(v: &Value, kind: &Kind) -> Val {
    match v {
        Value::Bool(b) => Val::Bool(*b),
        Value::I32(i) => int(i128::from(*i)),
        Value::U32(u) => int(i128::from(*u)),
        Value::I64(i) => int53(i128::from(*i)),
        Value::U64(u) => int53(i128::from(*u)),
        // Display gives the shortest decimal that reads back as the same f32.
        Value::F32(f) => float(f.to_string().parse().unwrap_or(f64::NAN)),
        Value::F64(f) => float(*f),
        Value::String(s) => Val::from(s.clone()),
        Value::Bytes(b) => Val::byte_str(b.clone()),
        Value::EnumNumber(n) => match kind.as_enum().and_then(|e| e.get_value(*n)) {
            Some(named) => Val::from(named.name().to_string()),
            None => int(i128::from(*n)),
        },
        Value::Message(m) => message(m),
        Value::List(items) => items.iter().map(|v| value(v, kind)).collect(),
        Value::Map(entries) => {
            let kind = match kind.as_message() {
                Some(entry) => entry.map_entry_value_field().kind(),
                None => kind.clone(),
            };
            let mut entries: Vec<_> = entries.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let entries = entries
                .into_iter()
                .map(|(k, v)| (Val::from(map_key(k)), value(v, &kind)));
            Val::obj(entries.collect())
        }
    }
}

/// What a Timestamp, a Duration or a wrapper stands for; None for other messages.
fn well_known(msg: &DynamicMessage) -> Option<Val> {
    let int_field = |name: &str| msg.get_field_by_name(name)?.as_i64();
    let nanos = || msg.get_field_by_name("nanos")?.as_i32();
    match msg.descriptor().full_name() {
        "google.protobuf.Timestamp" => {
            let time = jiff::Timestamp::new(int_field("seconds")?, nanos()?).ok()?;
            Some(Val::from(time.to_string()))
        }
        "google.protobuf.Duration" => match (int_field("seconds")?, nanos()?) {
            (seconds, 0) => Some(int53(i128::from(seconds))),
            (seconds, nanos) => Some(float(seconds as f64 + f64::from(nanos) / 1e9)),
        },
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            let field = msg.descriptor().get_field_by_name("value")?;
            Some(value(&msg.get_field(&field), &field.kind()))
        }
        _ => None,
    }
}

/// A map key as text.
fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(i) => i.to_string(),
        MapKey::I64(i) => i.to_string(),
        MapKey::U32(u) => u.to_string(),
        MapKey::U64(u) => u.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

/// The largest integer magnitude every integer up to which a double holds exactly.
const MAX_EXACT: i128 = 1 << 53;

/// A 64-bit integer: a number when a double holds it exactly, else its decimal text.
fn int53(i: i128) -> Val {
    if i.abs() <= MAX_EXACT {
        int(i)
    } else {
        Val::from(i.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost::Message as _;
    use serde_json::{Value as Json, json};

    const SCHEMA: &str = r#"
        syntax = "proto3";
        package test;
        enum Unit { UNIT_UNSPECIFIED = 0; CELSIUS = 1; }
        message Inner { string name = 1; }
        message Reading {
          string device_id = 1;
          double temp = 2;
          float ratio = 3;
          int64 big = 4;
          uint64 huge = 5;
          sint32 small = 6;
          bool ok = 7;
          bytes fw = 8;
          Unit unit = 9;
          Inner inner = 10;
          repeated int32 samples = 11;
          map<string, int64> counters = 12;
          map<int32, Unit> units = 13;
          optional int32 maybe = 14;
          oneof choice { string text = 15; int32 number = 16; }
          repeated Inner inners = 17;
        }
    "#;

    /// The `test.Reading` descriptor, compiled by protox from a file in a temp dir.
    fn reading() -> MessageDescriptor {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("test.proto"), SCHEMA).unwrap();
        let pool = protox::Compiler::new([dir.path()])
            .unwrap()
            .open_file("test.proto")
            .unwrap()
            .descriptor_pool();
        pool.get_message_by_name("test.Reading").unwrap()
    }

    /// A payload: the message `fields` (as proto3 JSON) describes, encoded by prost-reflect.
    fn encode(desc: &MessageDescriptor, fields: Json) -> Bytes {
        let msg = DynamicMessage::deserialize(desc.clone(), fields).unwrap();
        Bytes::from(msg.encode_to_vec())
    }

    fn read(desc: &MessageDescriptor, payload: &Bytes) -> Json {
        crate::rule::jq::to_json(&decode(desc, payload).unwrap())
    }

    #[test]
    fn fields_read_by_their_schema_names() {
        let desc = reading();
        let payload = encode(
            &desc,
            json!({
                "device_id": "d1", "temp": 21.5, "ratio": 0.1, "big": "-9007199254740992",
                "huge": "18446744073709551615", "small": -3, "ok": true, "fw": "AJ+S",
                "unit": "CELSIUS", "inner": {"name": "x"}, "samples": [1, 2],
                "counters": {"b": "9007199254740993", "a": 1}, "units": {"7": 1, "-1": 5},
                "maybe": 0, "number": 4, "inners": [{"name": "y"}, {}]
            }),
        );
        assert_eq!(
            read(&desc, &payload),
            json!({
                "device_id": "d1", "temp": 21.5, "ratio": 0.1, "big": -9_007_199_254_740_992_i64,
                "huge": "18446744073709551615", "small": -3, "ok": true, "fw": "AJ+S",
                "unit": "CELSIUS", "inner": {"name": "x"}, "samples": [1, 2],
                "counters": {"a": 1, "b": "9007199254740993"}, "units": {"-1": 5, "7": "CELSIUS"},
                "maybe": 0, "number": 4, "inners": [{"name": "y"}, {"name": ""}]
            })
        );
    }

    #[test]
    fn defaults_are_present_unless_the_field_has_presence() {
        let desc = reading();
        assert_eq!(
            read(&desc, &Bytes::new()),
            json!({
                "device_id": "", "temp": 0.0, "ratio": 0.0, "big": 0, "huge": 0, "small": 0,
                "ok": false, "fw": "", "unit": "UNIT_UNSPECIFIED", "samples": [],
                "counters": {}, "units": {}, "inners": []
            })
        );
    }

    #[test]
    fn timestamps_durations_and_wrappers_are_the_values_they_stand_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("wkt.proto"),
            r#"syntax = "proto3";
               import "google/protobuf/timestamp.proto";
               import "google/protobuf/duration.proto";
               import "google/protobuf/wrappers.proto";
               message Event {
                 google.protobuf.Timestamp at = 1;
                 google.protobuf.Timestamp before_1970 = 2;
                 google.protobuf.Duration took = 3;
                 google.protobuf.Duration whole = 4;
                 google.protobuf.DoubleValue temp = 5;
                 google.protobuf.UInt64Value unset = 6;
                 google.protobuf.StringValue name = 7;
               }"#,
        )
        .unwrap();
        let desc = protox::Compiler::new([dir.path()])
            .unwrap()
            .open_file("wkt.proto")
            .unwrap()
            .descriptor_pool()
            .get_message_by_name("Event")
            .unwrap();
        let payload = encode(
            &desc,
            json!({
                "at": "2026-12-02T16:45:28Z", "before_1970": "1969-12-31T23:59:59.5Z",
                "took": "1.5s", "whole": "-60s", "temp": 0, "name": "x"
            }),
        );
        assert_eq!(
            read(&desc, &payload),
            json!({
                "at": "2026-12-02T16:45:28Z", "before_1970": "1969-12-31T23:59:59.5Z",
                "took": 1.5, "whole": -60, "temp": 0.0, "name": "x"
            })
        );
    }

    #[test]
    fn unknown_enum_numbers_stay_numbers() {
        let desc = reading();
        // Field 9 (unit), varint 42.
        assert_eq!(
            read(&desc, &Bytes::from_static(&[0x48, 42]))["unit"],
            json!(42)
        );
    }

    #[test]
    fn non_finite_floats_are_null() {
        let desc = reading();
        let mut msg = DynamicMessage::new(desc.clone());
        msg.set_field_by_name("temp", Value::F64(f64::NAN));
        msg.set_field_by_name("ratio", Value::F32(f32::INFINITY));
        let payload = Bytes::from(msg.encode_to_vec());
        let read = read(&desc, &payload);
        assert_eq!(
            (&read["temp"], &read["ratio"]),
            (&json!(null), &json!(null))
        );
    }

    #[test]
    fn a_payload_that_is_not_the_message_is_an_error() {
        let desc = reading();
        // Field 1 (a string) claiming 100 bytes, with 1.
        let err = decode(&desc, &Bytes::from_static(&[0x0a, 100, b'x'])).unwrap_err();
        assert!(err.contains("buffer underflow"), "{err}");
        // Field 2 (a double) as a varint.
        let err = decode(&desc, &Bytes::from_static(&[0x10, 1])).unwrap_err();
        assert!(err.contains("wire type"), "{err}");
    }

    #[test]
    fn any_bytes_are_a_value_or_an_error_never_a_panic() {
        use proptest::prelude::*;
        let desc = reading();
        proptest!(|(payload in proptest::collection::vec(any::<u8>(), 0..256))| {
            let _ = decode(&desc, &Bytes::from(payload));
        });
    }
}
