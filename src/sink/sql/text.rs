//! A record's values as the text a database reads for a column ([`to_text`]), by the
//! column's [`Class`]; short texts are kept inline ([`Text`]).

use std::fmt;

use crate::config::sinks::sql::TimeUnit;

/// How a value is turned into text for a column (public for `benches/pipeline.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Bool,
    Timestamp,
    Date,
    /// JSON stored as its text (PostgreSQL `json`): written as serde_json writes the
    /// value, so what is stored does not depend on how a record was made.
    Json,
    /// JSON the database parses and keeps in its own form (PostgreSQL `jsonb`: keys
    /// sorted and made unique, whitespace dropped): JSON text a record kept from its
    /// payload ([`crate::record::Json`]) is written as it is, unparsed.
    Jsonb,
    Array,
    /// Text, numbers and everything the database converts from text.
    Plain,
}

/// A column value's text: borrowed from its record, kept inline when it is short (a
/// number, a time: no allocation), or made.
#[derive(Debug, Clone)]
pub enum Text<'v> {
    Borrowed(&'v str),
    Inline(Inline),
    Owned(String),
}

/// Up to [`Inline::CAPACITY`] bytes of text, held without an allocation.
#[derive(Debug, Clone, Copy)]
pub struct Inline {
    len: u8,
    buf: [u8; Inline::CAPACITY],
}

impl Inline {
    /// Room for any integer or float serde_json writes, and RFC 3339 to the nanosecond.
    const CAPACITY: usize = 30;
}

impl fmt::Write for Inline {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len as usize + s.len();
        let room = self.buf.get_mut(self.len as usize..end).ok_or(fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end as u8;
        Ok(())
    }
}

impl Text<'_> {
    /// `value` as `Display` writes it: inline when it fits.
    pub fn display(value: impl fmt::Display) -> Text<'static> {
        let mut inline = Inline {
            len: 0,
            buf: [0; Inline::CAPACITY],
        };
        match fmt::Write::write_fmt(&mut inline, format_args!("{value}")) {
            Ok(()) => Text::Inline(inline),
            Err(_) => Text::Owned(value.to_string()),
        }
    }

    /// The same text, owning what it borrowed.
    pub fn into_static(self) -> Text<'static> {
        match self {
            Text::Borrowed(s) => Text::Owned(s.to_string()),
            Text::Inline(i) => Text::Inline(i),
            Text::Owned(s) => Text::Owned(s),
        }
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            // Whole `str`s only were written into it.
            Text::Inline(i) => std::str::from_utf8(&i.buf[..i.len as usize]).expect("UTF-8"),
            Text::Owned(s) => s,
        }
    }
}

impl<'v> From<&'v str> for Text<'v> {
    fn from(s: &'v str) -> Self {
        Text::Borrowed(s)
    }
}

/// A JSON value as the text a database reads for a column of `class` (public for
/// `benches/pipeline.rs`): timestamps as RFC 3339, JSON as JSON text, arrays as
/// PostgreSQL array literals.
pub fn to_text(
    v: &serde_json::Value,
    class: Class,
    unit: Option<TimeUnit>,
) -> Result<Option<Text<'_>>, String> {
    use serde_json::Value as J;
    // serde_json writes a value into bytes faster than through `Display`.
    let json = |v| Text::Owned(serde_json::to_string(v).expect("a JSON value serializes"));
    Ok(Some(match (v, class) {
        (J::Null, _) => return Ok(None),
        (_, Class::Json | Class::Jsonb) => json(v),
        (J::Number(n), Class::Timestamp | Class::Date) => epoch_to_rfc3339(n, unit)?,
        (J::String(s), _) => Text::Borrowed(s),
        (J::Bool(b), _) => Text::Borrowed(if *b { "true" } else { "false" }),
        (J::Number(n), Class::Bool) => return Err(format!("expected a boolean, got {n}")),
        (J::Number(n), _) => match (n.as_f64(), n.is_f64()) {
            // 12.0 into an integer column is 12.
            (Some(f), true) if f.fract() == 0.0 && f.abs() < 9.0e15 => Text::display(f as i64),
            _ => Text::display(n),
        },
        (J::Array(_), Class::Array) => Text::Owned(pg_array(v)),
        (J::Array(_) | J::Object(_), _) => json(v),
    }))
}

fn epoch_to_rfc3339(
    n: &serde_json::Number,
    unit: Option<TimeUnit>,
) -> Result<Text<'static>, String> {
    let x = n.as_f64().ok_or("not a number")?;
    let ms = match unit {
        Some(TimeUnit::Ms) => x,
        Some(TimeUnit::S) => x * 1000.0,
        None if x.abs() >= 1e11 => x,
        None => x * 1000.0,
    };
    let ts = jiff::Timestamp::from_millisecond(ms as i64)
        .map_err(|e| format!("timestamp out of range: {e}"))?;
    Ok(Text::display(ts))
}

/// A JSON array as a PostgreSQL array literal (`{1,2}`, `{"a","b \"c\""}`, nested arrays).
fn pg_array(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
    match v {
        J::Array(items) => {
            let inner: Vec<String> = items.iter().map(pg_array).collect();
            format!("{{{}}}", inner.join(","))
        }
        J::Null => "NULL".to_string(),
        J::String(s) => quote(s),
        J::Object(_) => quote(&v.to_string()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_as_text() {
        let t = |v: serde_json::Value, c| to_text(&v, c, None).unwrap().map(|t| t.to_string());
        assert_eq!(t(json!(null), Class::Plain), None);
        assert_eq!(t(json!("x"), Class::Plain).as_deref(), Some("x"));
        assert_eq!(t(json!(12.0), Class::Plain).as_deref(), Some("12"));
        assert_eq!(t(json!(12.5), Class::Plain).as_deref(), Some("12.5"));
        assert_eq!(t(json!("x"), Class::Json).as_deref(), Some("\"x\""));
        assert_eq!(
            t(json!({"a": 1}), Class::Json).as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(t(json!(true), Class::Bool).as_deref(), Some("true"));
        assert!(to_text(&json!(1), Class::Bool, None).is_err());
        assert_eq!(
            t(json!(["a", "b\"c", null]), Class::Array).as_deref(),
            Some(r#"{"a","b\"c",NULL}"#)
        );
        assert_eq!(
            t(json!([[1, 2], [3, 4]]), Class::Array).as_deref(),
            Some("{{1,2},{3,4}}")
        );
    }

    #[test]
    fn short_texts_are_kept_inline_and_long_ones_made() {
        // The longest number serde_json writes.
        let n = serde_json::Number::from_f64(-1.797_693_134_862_315_7e308).unwrap();
        assert!(matches!(Text::display(&n), Text::Inline(_)));
        assert_eq!(&*Text::display(&n), "-1.7976931348623157e+308");
        assert_eq!(&*Text::display(i64::MIN), "-9223372036854775808");
        let long = "é".repeat(16);
        assert!(matches!(Text::display(&long), Text::Owned(_)));
        assert_eq!(&*Text::display(&long), long);
        assert_eq!(&*Text::display("ab").into_static(), "ab");
    }

    #[test]
    fn epochs() {
        let t = |v: serde_json::Value, u| {
            to_text(&v, Class::Timestamp, u)
                .unwrap()
                .unwrap()
                .to_string()
        };
        assert_eq!(t(json!(1_700_000_000), None), "2023-11-14T22:13:20Z");
        assert_eq!(
            t(json!(1_700_000_000_123i64), None),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            t(json!(1_700_000_000), Some(TimeUnit::Ms)),
            "1970-01-20T16:13:20Z"
        );
        assert_eq!(
            t(json!("2026-01-01T00:00:00Z"), None),
            "2026-01-01T00:00:00Z"
        );
    }
}
