//! A Sparkplug B payload, read from its Protobuf message (`sparkplug_b.proto` beside this
//! file) into what the decoder works with: the payload's `timestamp` and `seq`, and each
//! metric as sent. A metric's value stays raw here, since how to read it depends on its
//! datatype, which a DATA message usually leaves to the birth ([`value`] reads it once
//! the datatype is known).
//!
//! Fields are matched by their number in the schema, which is the wire format.

use bytes::Bytes;
use jaq_json::Val;
use prost_reflect::{DynamicMessage, EnumDescriptor, Value};

use super::super::{float, int};

/// The Sparkplug B datatypes this module reads values of, by their number in `DataType`.
pub mod datatype {
    pub const INT8: u32 = 1;
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const BOOLEAN: u32 = 11;
    pub const DATE_TIME: u32 = 13;
    pub const INT8_ARRAY: u32 = 22;
    pub const INT16_ARRAY: u32 = 23;
    pub const INT32_ARRAY: u32 = 24;
    pub const INT64_ARRAY: u32 = 25;
    pub const UINT8_ARRAY: u32 = 26;
    pub const UINT16_ARRAY: u32 = 27;
    pub const UINT32_ARRAY: u32 = 28;
    pub const UINT64_ARRAY: u32 = 29;
    pub const FLOAT_ARRAY: u32 = 30;
    pub const DOUBLE_ARRAY: u32 = 31;
    pub const BOOLEAN_ARRAY: u32 = 32;
    pub const STRING_ARRAY: u32 = 33;
    pub const DATE_TIME_ARRAY: u32 = 34;
}

use datatype::*;

/// One payload: `Payload` in the schema.
#[derive(Debug, Default)]
pub struct Payload {
    /// When it was sent, ms since the epoch.
    pub timestamp: Option<u64>,
    pub seq: Option<u64>,
    pub metrics: Vec<Metric>,
}

/// One metric as sent: `Payload.Metric`.
#[derive(Debug, Default, Clone)]
pub struct Metric {
    pub name: Option<String>,
    pub alias: Option<u64>,
    /// When the value was taken, ms since the epoch.
    pub timestamp: Option<u64>,
    pub datatype: Option<u32>,
    pub is_historical: bool,
    pub is_transient: bool,
    pub is_null: bool,
    /// The properties (a `PropertySet`) as an object, when there are any.
    pub properties: Option<Val>,
    pub value: Raw,
}

/// A value as sent: which field of the `value` oneof was set, with what.
#[derive(Debug, Default, Clone)]
pub enum Raw {
    /// None (or an extension value, which the schema cannot read).
    #[default]
    None,
    Int(u32),
    Long(u64),
    Float(f32),
    Double(f64),
    Bool(bool),
    Text(String),
    Bytes(Bytes),
    /// A value already read: a DataSet (its columns carry their types) as its rows, a
    /// property set as an object.
    Ready(Val),
    Template(Template),
}

/// A Template value: a definition (in a birth) or an instance, and its member metrics.
#[derive(Debug, Clone)]
pub struct Template {
    pub is_definition: bool,
    pub metrics: Vec<Metric>,
}

impl Payload {
    /// Reads a decoded `Payload` message.
    pub fn read(mut msg: DynamicMessage) -> Result<Payload, String> {
        let mut payload = Payload::default();
        for (field, v) in msg.take_fields() {
            match field.number() {
                1 => payload.timestamp = v.as_u64(),
                2 => payload.metrics = messages(v).map(Metric::read).collect::<Result<_, _>>()?,
                3 => payload.seq = v.as_u64(),
                _ => {}
            }
        }
        Ok(payload)
    }
}

impl Metric {
    fn read(mut msg: DynamicMessage) -> Result<Metric, String> {
        let mut m = Metric::default();
        for (field, v) in msg.take_fields() {
            match (field.number(), v) {
                (1, Value::String(s)) => m.name = Some(s),
                (2, v) => m.alias = v.as_u64(),
                (3, v) => m.timestamp = v.as_u64(),
                (4, v) => m.datatype = v.as_u32(),
                (5, v) => m.is_historical = v.as_bool() == Some(true),
                (6, v) => m.is_transient = v.as_bool() == Some(true),
                (7, v) => m.is_null = v.as_bool() == Some(true),
                (9, Value::Message(set)) => m.properties = Some(property_set(set)),
                (10..=16, v) => m.value = Raw::scalar(v),
                (17, Value::Message(set)) => m.value = Raw::Ready(data_set(set)?),
                (18, Value::Message(t)) => m.value = Raw::Template(Template::read(t)?),
                _ => {}
            }
        }
        Ok(m)
    }
}

impl Template {
    fn read(mut msg: DynamicMessage) -> Result<Template, String> {
        let mut t = Template {
            is_definition: false,
            metrics: Vec::new(),
        };
        for (field, v) in msg.take_fields() {
            match field.number() {
                2 => t.metrics = messages(v).map(Metric::read).collect::<Result<_, _>>()?,
                5 => t.is_definition = v.as_bool() == Some(true),
                _ => {}
            }
        }
        Ok(t)
    }
}

impl Raw {
    /// A scalar of a `value` oneof (int, long, float, double, boolean, string or bytes).
    fn scalar(v: Value) -> Raw {
        match v {
            Value::U32(i) => Raw::Int(i),
            Value::U64(l) => Raw::Long(l),
            Value::F32(f) => Raw::Float(f),
            Value::F64(d) => Raw::Double(d),
            Value::Bool(b) => Raw::Bool(b),
            Value::String(s) => Raw::Text(s),
            Value::Bytes(b) => Raw::Bytes(b),
            _ => Raw::None,
        }
    }
}

/// The messages of a repeated message field.
fn messages(v: Value) -> impl Iterator<Item = DynamicMessage> {
    let items = match v {
        Value::List(items) => items,
        _ => Vec::new(),
    };
    items.into_iter().filter_map(|v| match v {
        Value::Message(m) => Some(m),
        _ => None,
    })
}

/// The strings of a repeated string field.
fn strings(v: Value) -> Vec<String> {
    match v {
        Value::List(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                _ => String::new(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A metric's value read as its datatype says (`None`: not known). A value of another
/// kind than the datatype's is read as what it is.
pub fn value(raw: Raw, datatype: Option<u32>) -> Result<Val, String> {
    let dt = datatype.unwrap_or(0);
    Ok(match raw {
        Raw::None => Val::Null,
        // Int8, Int16 and Int32 travel as the 32 bits of their two's complement.
        Raw::Int(i) if matches!(dt, INT8 | INT16 | INT32) => int(i128::from(i as i32)),
        Raw::Int(i) => int(i128::from(i)),
        Raw::Long(l) if matches!(dt, INT8 | INT16 | INT32 | INT64) => int(i128::from(l as i64)),
        Raw::Long(l) if dt == DATE_TIME => date_time(l as i64),
        Raw::Long(l) => int(i128::from(l)),
        // Display gives the shortest decimal that reads back as the same f32.
        Raw::Float(f) => float(f.to_string().parse().unwrap_or(f64::NAN)),
        Raw::Double(d) => float(d),
        Raw::Bool(b) => Val::Bool(b),
        Raw::Text(s) => Val::from(s),
        Raw::Bytes(b) if (INT8_ARRAY..=DATE_TIME_ARRAY).contains(&dt) => array(dt, &b)?,
        Raw::Bytes(b) => Val::byte_str(b),
        Raw::Ready(v) => v,
        // Flattened by the caller; what is left (a template in a data set) is null.
        Raw::Template(_) => Val::Null,
    })
}

/// A DateTime (ms since the epoch) as RFC 3339 UTC text, as the other decoders write
/// timestamps (fractional seconds only when not zero); one beyond RFC 3339 stays a number.
pub fn date_time(ms: i64) -> Val {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => Val::from(t.to_string()),
        Err(_) => int(i128::from(ms)),
    }
}

/// A packed array (Sparkplug 3.0): its values, little-endian; a BooleanArray is a 4-byte
/// count, then the booleans one bit each, the first in the highest bit; a StringArray
/// is strings each ended by a 0 byte.
fn array(dt: u32, b: &[u8]) -> Result<Val, String> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> Val) -> Result<Val, String> {
        if !b.len().is_multiple_of(N) {
            return Err(format!(
                "{} bytes are not a whole number of {N}-byte values",
                b.len()
            ));
        }
        Ok(b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks of N")))
            .collect())
    }
    match dt {
        INT8_ARRAY => each(b, |[x]| int(i128::from(x as i8))),
        INT16_ARRAY => each(b, |x| int(i128::from(i16::from_le_bytes(x)))),
        INT32_ARRAY => each(b, |x| int(i128::from(i32::from_le_bytes(x)))),
        INT64_ARRAY => each(b, |x| int(i128::from(i64::from_le_bytes(x)))),
        UINT8_ARRAY => each(b, |[x]| int(i128::from(x))),
        UINT16_ARRAY => each(b, |x| int(i128::from(u16::from_le_bytes(x)))),
        UINT32_ARRAY => each(b, |x| int(i128::from(u32::from_le_bytes(x)))),
        UINT64_ARRAY => each(b, |x| int(i128::from(u64::from_le_bytes(x)))),
        FLOAT_ARRAY => each(b, |x| {
            float(
                f32::from_le_bytes(x)
                    .to_string()
                    .parse()
                    .unwrap_or(f64::NAN),
            )
        }),
        DOUBLE_ARRAY => each(b, |x| float(f64::from_le_bytes(x))),
        DATE_TIME_ARRAY => each(b, |x| date_time(i64::from_le_bytes(x))),
        BOOLEAN_ARRAY => {
            let (count, bits) = b
                .split_at_checked(4)
                .ok_or("a BooleanArray without its count")?;
            let count = u32::from_le_bytes(count.try_into().expect("4 bytes")) as usize;
            if count.div_ceil(8) != bits.len() {
                return Err(format!(
                    "a BooleanArray of {count} values in {} bytes",
                    bits.len()
                ));
            }
            Ok((0..count)
                .map(|i| Val::Bool(bits[i / 8] & (0x80 >> (i % 8)) != 0))
                .collect())
        }
        STRING_ARRAY => {
            let text = b.strip_suffix(&[0]).unwrap_or(b);
            if text.is_empty() {
                return Ok(Val::Arr(Default::default()));
            }
            text.split(|&c| c == 0)
                .map(|s| {
                    std::str::from_utf8(s)
                        .map(|s| Val::from(s.to_string()))
                        .map_err(|e| format!("a StringArray that is not UTF-8: {e}"))
                })
                .collect()
        }
        _ => Err(format!("datatype {dt} is not an array")),
    }
}

/// A DataSet's rows, each an object of its values by column name, each value read as its
/// column's type.
fn data_set(mut msg: DynamicMessage) -> Result<Val, String> {
    let (mut columns, mut types, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (field, v) in msg.take_fields() {
        match field.number() {
            2 => columns = strings(v),
            3 => {
                if let Value::List(items) = v {
                    types = items.iter().map(|t| t.as_u32().unwrap_or(0)).collect();
                }
            }
            4 => rows = messages(v).collect(),
            _ => {}
        }
    }
    rows.into_iter()
        .map(|mut row| {
            let elements = row.take_field_by_number(1).map(messages);
            let cells = elements.into_iter().flatten().zip(&columns).enumerate();
            let cells = cells.map(|(i, (mut element, column))| {
                let raw = element
                    .take_fields()
                    .find(|(f, _)| (1..=6).contains(&f.number()))
                    .map_or(Raw::None, |(_, v)| Raw::scalar(v));
                Ok((
                    Val::from(column.clone()),
                    value(raw, types.get(i).copied())?,
                ))
            });
            Ok(Val::obj(cells.collect::<Result<_, String>>()?))
        })
        .collect()
}

/// A PropertySet as an object: each key with its value, read as its `type` says; a
/// nested PropertySet is an object, a PropertySetList an array of objects.
fn property_set(mut msg: DynamicMessage) -> Val {
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for (field, v) in msg.take_fields() {
        match field.number() {
            1 => keys = strings(v),
            2 => values = messages(v).collect(),
            _ => {}
        }
    }
    let entries = keys.into_iter().zip(values).map(|(k, mut pv)| {
        let (mut datatype, mut raw, mut is_null) = (None, Raw::None, false);
        for (field, v) in pv.take_fields() {
            match (field.number(), v) {
                (1, v) => datatype = v.as_u32(),
                (2, v) => is_null = v.as_bool() == Some(true),
                (3..=8, v) => raw = Raw::scalar(v),
                (9, Value::Message(set)) => raw = Raw::Ready(property_set(set)),
                (10, Value::Message(mut list)) => {
                    let sets = list.take_field_by_number(1).map(messages);
                    raw = Raw::Ready(sets.into_iter().flatten().map(property_set).collect());
                }
                _ => {}
            }
        }
        let v = match is_null {
            true => Val::Null,
            // Property values are scalars: nothing here can fail.
            false => value(raw, datatype).unwrap_or(Val::Null),
        };
        (Val::from(k), v)
    });
    Val::obj(entries.collect())
}

/// A datatype's name as `DataType` has it (`Float`, `Int64`, ...), or its number when the
/// schema does not name it.
pub fn datatype_name(types: &EnumDescriptor, datatype: u32) -> Val {
    match i32::try_from(datatype)
        .ok()
        .and_then(|n| types.get_value(n))
    {
        Some(v) => Val::from(v.name().to_string()),
        None => int(i128::from(datatype)),
    }
}

/// A payload or metric timestamp (ms since the epoch) as RFC 3339 text.
pub fn timestamp(ms: u64) -> Val {
    match i64::try_from(ms) {
        Ok(ms) => date_time(ms),
        Err(_) => int(i128::from(ms)),
    }
}
