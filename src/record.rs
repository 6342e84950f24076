//! The record: what a rule makes of a message, and what a sink writes. It is a JSON value.
//!
//! The common record is an object whose keys the rule's transform names
//! (`{device: .vars.device, temp: .payload.temp}`). Such a record keeps only its values:
//! the keys are the rule's, made once when the rule compiles and shared by every record
//! it makes ([`Keys`]). So no key is allocated, compared or freed per message, and the
//! values sit in one `Vec` instead of a tree of nodes. A sink reads a record through
//! [`Record::entries`] and [`Record::get`] whatever its form. A record serializes exactly
//! as the equal `serde_json::Value` does, keys in the same (sorted) order, so what a sink
//! writes does not depend on how the rule made the record.
//!
//! **JSON kept as text.** A value the rule takes whole from a JSON payload
//! (`body: .payload`) can be kept as the payload's text ([`Json`]), checked to parse
//! when the rule ran but made into a value only when something reads it as one. A
//! database that parses and normalizes JSON itself (PostgreSQL's `jsonb`) takes the text
//! as it is, so on the database path the payload is never made into a map, serialized
//! again and freed (BENCHMARKS.md, "The database path"). Everything else reads the value,
//! so it serializes, compares and shows exactly as before.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytestring::ByteString;
use serde::Serialize;
use serde_json::Value;

/// One record.
#[derive(Debug, Clone)]
pub struct Record(Repr);

#[derive(Debug, Clone)]
enum Repr {
    /// Any JSON value (what jq emitted, a dead letter, a replayed record).
    Value(Value),
    /// An object: `values[i]` is the value of `keys[i]`.
    Object { keys: Arc<Keys>, values: Vec<Slot> },
}

/// A value of an object record with shared keys.
#[derive(Debug, Clone)]
pub enum Slot {
    Value(Value),
    Json(Json),
}

impl From<Value> for Slot {
    fn from(v: Value) -> Slot {
        Slot::Value(v)
    }
}

/// JSON text that serde_json reads (checked by whoever made it), and its value, made
/// when first asked for. See the module docs.
#[derive(Debug, Clone)]
pub struct Json {
    /// Shared bytes: a payload kept whole is its message's buffer, not a copy.
    text: ByteString,
    value: OnceLock<Value>,
}

impl Json {
    /// `text`, which the caller checked is JSON serde_json reads: a `Value` made from it
    /// is the value this stands for.
    pub fn checked(text: ByteString) -> Json {
        Json {
            text,
            value: OnceLock::new(),
        }
    }

    /// The text, as it was given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The value the text stands for.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| parse(&self.text))
    }

    /// [`Json::value`], taken.
    pub fn into_value(self) -> Value {
        self.value.into_inner().unwrap_or_else(|| parse(&self.text))
    }
}

fn parse(checked: &str) -> Value {
    serde_json::from_str(checked).expect("the text was checked to be JSON")
}

/// A value of a record, as [`Record::entries`] gives it: a value, or JSON text that is
/// made into one when read as one (it derefs to the value).
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Value(&'a Value),
    Json(&'a Json),
}

impl<'a> Field<'a> {
    /// The value.
    pub fn value(self) -> &'a Value {
        match self {
            Field::Value(v) => v,
            Field::Json(j) => j.value(),
        }
    }

    /// The JSON text the value is kept as, when it is kept as text.
    pub fn json_text(self) -> Option<&'a str> {
        match self {
            Field::Value(_) => None,
            Field::Json(j) => Some(j.text()),
        }
    }
}

impl std::ops::Deref for Field<'_> {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.value()
    }
}

impl<'a> From<&'a Slot> for Field<'a> {
    fn from(slot: &'a Slot) -> Field<'a> {
        match slot {
            Slot::Value(v) => Field::Value(v),
            Slot::Json(j) => Field::Json(j),
        }
    }
}

impl Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Field::from(self).value().serialize(s)
    }
}

/// The keys of an object record, shared by the records of one rule: distinct, and in the
/// order `serde_json::Map` keeps them (sorted), so that [`Keys::slot`] finds a key by
/// binary search and a record serializes as its value would.
#[derive(Debug, PartialEq, Eq)]
pub struct Keys(Box<[String]>);

impl Keys {
    /// The distinct `keys`, sorted.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Arc<Keys> {
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        Arc::new(Keys(keys.into_boxed_slice()))
    }

    /// Where `key`'s value sits in a record with these keys.
    pub fn slot(&self, key: &str) -> Option<usize> {
        self.0.binary_search_by(|k| k.as_str().cmp(key)).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Record {
    /// The object with `keys` and their `values`, one for each key, in the keys' order.
    pub fn object(keys: &Arc<Keys>, values: Vec<Slot>) -> Record {
        assert_eq!(keys.len(), values.len(), "one value per key");
        Record(Repr::Object {
            keys: Arc::clone(keys),
            values,
        })
    }

    /// Whether the record is a JSON object.
    pub fn is_object(&self) -> bool {
        matches!(&self.0, Repr::Object { .. } | Repr::Value(Value::Object(_)))
    }

    /// The value of `key` when the record is an object that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match &self.0 {
            Repr::Value(v) => v.get(key),
            Repr::Object { keys, values } => {
                keys.slot(key).map(|i| Field::from(&values[i]).value())
            }
        }
    }

    /// The text, when the record is a JSON string.
    pub fn as_str(&self) -> Option<&str> {
        match &self.0 {
            Repr::Value(v) => v.as_str(),
            Repr::Object { .. } => None,
        }
    }

    /// The keys and values of an object record, in key order; None for any other value.
    pub fn entries(&self) -> Option<Entries<'_>> {
        match &self.0 {
            Repr::Value(Value::Object(map)) => Some(Entries::Map(map.iter())),
            Repr::Value(_) => None,
            Repr::Object { keys, values } => Some(Entries::Slots(keys.0.iter().zip(values))),
        }
    }

    /// The record as a `serde_json::Value` (borrowed when it is one).
    pub fn to_value(&self) -> Cow<'_, Value> {
        match &self.0 {
            Repr::Value(v) => Cow::Borrowed(v),
            Repr::Object { .. } => Cow::Owned(self.clone().into_value()),
        }
    }

    /// The record as a `serde_json::Value`.
    pub fn into_value(self) -> Value {
        match self.0 {
            Repr::Value(v) => v,
            Repr::Object { keys, values } => {
                let values = values.into_iter().map(|slot| match slot {
                    Slot::Value(v) => v,
                    Slot::Json(j) => j.into_value(),
                });
                Value::Object(keys.0.iter().cloned().zip(values).collect())
            }
        }
    }
}

/// [`Record::entries`].
pub enum Entries<'a> {
    Map(serde_json::map::Iter<'a>),
    Slots(std::iter::Zip<std::slice::Iter<'a, String>, std::slice::Iter<'a, Slot>>),
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, Field<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Entries::Map(it) => it.next().map(|(k, v)| (k.as_str(), Field::Value(v))),
            Entries::Slots(it) => it.next().map(|(k, v)| (k.as_str(), Field::from(v))),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Entries::Map(it) => it.size_hint(),
            Entries::Slots(it) => it.size_hint(),
        }
    }
}

impl ExactSizeIterator for Entries<'_> {}

impl From<Value> for Record {
    fn from(v: Value) -> Record {
        Record(Repr::Value(v))
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Repr::Value(v) => v.serialize(s),
            Repr::Object { keys, values } => s.collect_map(keys.0.iter().zip(values)),
        }
    }
}

/// Compact JSON, as `serde_json::Value` shows itself: written straight into the
/// formatter, so `to_string` makes one string, not a second one to copy from.
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// serde_json's output (UTF-8, written a piece at a time) into a formatter.
        struct Into<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl std::io::Write for Into<'_, '_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let s = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
                self.0.write_str(s).map_err(std::io::Error::other)?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        match &self.0 {
            Repr::Value(v) => v.fmt(f),
            Repr::Object { .. } => serde_json::to_writer(Into(f), self).map_err(|_| fmt::Error),
        }
    }
}

/// Equal when the JSON values are, whatever their form.
impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        self.to_value() == other.to_value()
    }
}

impl PartialEq<Value> for Record {
    fn eq(&self, other: &Value) -> bool {
        *self.to_value() == *other
    }
}

/// `record["key"]`: the value, or null when the record has no such key (as for a
/// `serde_json::Value`).
impl std::ops::Index<&str> for Record {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        const NULL: Value = Value::Null;
        self.get(key).unwrap_or(&NULL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shared() -> Record {
        let keys = Keys::new(["temp", "device", "body"].map(String::from));
        // In the keys' order: body, device, temp.
        Record::object(
            &keys,
            vec![
                json!({"b": 1, "a": [2]}).into(),
                json!("d1 \"é\" ✓").into(),
                json!(21.5).into(),
            ],
        )
    }

    #[test]
    fn an_object_with_shared_keys_is_the_value_it_stands_for() {
        let value = json!({"device": "d1 \"é\" ✓", "temp": 21.5, "body": {"a": [2], "b": 1}});
        let r = shared();
        assert_eq!(r, value);
        assert_eq!(r.to_string(), value.to_string());
        assert_eq!(
            serde_json::to_vec(&r).unwrap(),
            serde_json::to_vec(&value).unwrap()
        );
        assert_eq!(r.clone().into_value(), value);
        assert_eq!(r, Record::from(value.clone()));
        assert!(r.is_object());
        assert_eq!(r.get("temp"), Some(&json!(21.5)));
        assert_eq!(r["device"], json!("d1 \"é\" ✓"));
        assert_eq!(r.get("nope"), None);
        assert_eq!(r["nope"], Value::Null);
        let from_value = Record::from(value);
        let keys = |r: &Record| {
            r.entries()
                .unwrap()
                .map(|(k, _)| k.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&r), ["body", "device", "temp"]);
        assert_eq!(keys(&r), keys(&from_value));
    }

    #[test]
    fn json_kept_as_text_is_the_value_it_stands_for() {
        let keys = Keys::new(["body", "n"].map(String::from));
        let text = r#"{ "b": [1, "é"], "a": {} }"#;
        let record = || {
            let body = Slot::Json(Json::checked(text.into()));
            Record::object(&keys, vec![body, json!(1).into()])
        };
        let r = record();
        let value = json!({"body": {"a": {}, "b": [1, "é"]}, "n": 1});
        let (_, body) = r.entries().unwrap().next().unwrap();
        assert_eq!(body.json_text(), Some(text), "the text as it was given");
        assert_eq!(*body, value["body"]);
        assert_eq!(r, value);
        assert_eq!(r.to_string(), value.to_string());
        assert_eq!(
            serde_json::to_vec(&r).unwrap(),
            serde_json::to_vec(&value).unwrap()
        );
        assert_eq!(r.get("body"), Some(&value["body"]));
        assert_eq!(record().into_value(), value, "never read, then taken whole");
        assert_eq!(r.into_value(), value, "read, then taken whole");
    }

    #[test]
    fn other_values_are_kept_as_they_are() {
        for v in [json!(null), json!(1), json!("s"), json!([1, {"a": 2}])] {
            let r = Record::from(v.clone());
            assert!(!r.is_object());
            assert!(r.entries().is_none());
            assert_eq!(r.get("a"), None);
            assert_eq!(r.to_string(), v.to_string());
            assert_eq!(r.into_value(), v);
        }
    }

    #[test]
    fn keys_are_distinct_and_sorted() {
        let keys = Keys::new(["b", "a", "b", "c"].map(String::from));
        assert_eq!(keys.len(), 3);
        assert_eq!(
            ["a", "b", "c", "d"].map(|k| keys.slot(k)),
            [Some(0), Some(1), Some(2), None]
        );
    }
}
