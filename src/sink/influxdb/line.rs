//! A record as one point in InfluxDB's line protocol:
//! `measurement[,tag=value…] field=value[,field=value…] timestamp`.
//!
//! Escaping, as the line protocol specifies it (the same in 1.x and 2.x):
//! - measurement: commas and spaces get a backslash;
//! - tag keys, tag values and field keys: commas, equals signs and spaces;
//! - string field values are double-quoted, with `"` and `\` escaped (line breaks are
//!   allowed inside the quotes);
//! - integers carry the `i` suffix, floats none, booleans are `true`/`false`.
//!
//! What line protocol cannot carry fails the record, with the reason, rather than being
//! written as something else: a line break in a measurement, tag or field key, or tag
//! value; a backslash at the end of one of those or before a character that is escaped
//! (or another backslash), which InfluxDB 1.x and 2.x read differently; a measurement
//! starting with `#` (a comment line); the key `time`; a record with no field; a
//! timestamp that is missing, unreadable or outside what InfluxDB stores (1677 to 2262).
//! A tag whose value renders empty is left out (line protocol has no empty tag value).

use std::fmt::Write as _;

use serde_json::Value;

use crate::config::sinks::influxdb::{Integers, Precision, Settings, TimeUnit, TimestampConfig};
use crate::record::Record;
use crate::rule::template::Template;
use crate::sink::{Origin, SinkError};

/// InfluxDB's earliest and latest timestamps, in nanoseconds (1.x's `models.MinNanoTime`
/// and `MaxNanoTime`; 2.x has the same).
const MIN_NANOS: i128 = i64::MIN as i128 + 2;
const MAX_NANOS: i128 = i64::MAX as i128 - 1;

/// The sink's mapping from a record to a point, compiled with the config.
pub struct Lines {
    measurement: Template,
    tags: Vec<(String, Template)>,
    fields: Option<Vec<String>>,
    integers: Integers,
    timestamp: Option<TimestampConfig>,
    precision: Precision,
}

impl Lines {
    pub fn new(s: &Settings) -> Lines {
        Lines {
            measurement: s.measurement.clone(),
            tags: s.tags.clone(),
            fields: s.fields.clone(),
            integers: s.integers,
            timestamp: s.timestamp.clone(),
            precision: s.precision,
        }
    }

    /// The point of `record` as one line (no trailing newline); a record that cannot be
    /// one fails permanently, saying why.
    pub fn line(&self, origin: &Origin, record: &Record) -> Result<String, SinkError> {
        self.point(origin, record)
            .map_err(|e| SinkError::permanent(format!("line protocol: {e}")))
    }

    fn point(&self, origin: &Origin, record: &Record) -> Result<String, String> {
        let ctx = origin.template_context(record);
        let mut out = String::with_capacity(128);
        let measurement = self
            .measurement
            .render(&ctx)
            .map_err(|e| format!("measurement template: {e}"))?;
        if measurement.is_empty() {
            return Err("the measurement renders empty".into());
        }
        if measurement.starts_with('#') {
            return Err(format!(
                "measurement {measurement:?}: a line starting with # is a comment"
            ));
        }
        escape(&mut out, &measurement, MEASUREMENT)
            .map_err(|e| format!("measurement {measurement:?}: {e}"))?;
        for (key, value) in &self.tags {
            let value = value
                .render(&ctx)
                .map_err(|e| format!("tags.{key} template: {e}"))?;
            if value.is_empty() {
                continue;
            }
            out.push(',');
            escape(&mut out, key, KEY).map_err(|e| format!("tag key {key:?}: {e}"))?;
            out.push('=');
            escape(&mut out, &value, KEY).map_err(|e| format!("tags.{key} {value:?}: {e}"))?;
        }
        let Some(entries) = record.entries() else {
            return Err("the record is not a JSON object, so it has no fields".into());
        };
        let mut written = 0;
        let mut field = |out: &mut String, key: &str, value: &Value| -> Result<(), String> {
            out.push(if written == 0 { ' ' } else { ',' });
            escape(out, key, KEY).map_err(|e| format!("field key {key:?}: {e}"))?;
            out.push('=');
            field_value(out, value, self.integers).map_err(|e| format!("field {key}: {e}"))?;
            written += 1;
            Ok(())
        };
        match &self.fields {
            Some(keys) => {
                for key in keys {
                    match record.get(key) {
                        None | Some(Value::Null) => {}
                        Some(v) => field(&mut out, key, v)?,
                    }
                }
                if written == 0 {
                    return Err(format!(
                        "no fields: none of {} is in the record",
                        keys.join(", ")
                    ));
                }
            }
            None => {
                let ts_key = self.timestamp.as_ref().map(|t| t.key.as_str());
                for (key, v) in entries {
                    let v = v.value();
                    let skipped = Some(key) == ts_key
                        || key == "time"
                        || self.tags.iter().any(|(t, _)| t == key)
                        || !matches!(v, Value::Number(_) | Value::Bool(_) | Value::String(_));
                    if !skipped {
                        field(&mut out, key, v)?;
                    }
                }
                if written == 0 {
                    return Err(
                        "no fields: the record has no number, boolean or string besides its tags and timestamp"
                            .into(),
                    );
                }
            }
        }
        let nanos = match &self.timestamp {
            None => origin.received_at.as_nanosecond(),
            Some(t) => timestamp(t, record.get(&t.key)).map_err(|e| format!("timestamp: {e}"))?,
        };
        if !(MIN_NANOS..=MAX_NANOS).contains(&nanos) {
            return Err(
                "timestamp: outside the times InfluxDB stores (1677-09-21 to 2262-04-11)".into(),
            );
        }
        let _ = write!(out, " {}", nanos.div_euclid(self.precision.nanos()));
        Ok(out)
    }
}

/// What gets a backslash in a measurement.
const MEASUREMENT: &[char] = &[',', ' '];
/// What gets a backslash in a tag key, tag value or field key.
const KEY: &[char] = &[',', '=', ' '];

/// Appends `s` with the characters of `special` escaped; fails on what cannot be written.
fn escape(out: &mut String, s: &str, special: &[char]) -> Result<(), String> {
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\r' => return Err("line protocol cannot carry a line break here".into()),
            '\\' => match chars.peek() {
                None => return Err("a backslash at the end cannot be written".into()),
                Some(&next) if next == '\\' || special.contains(&next) => {
                    return Err(format!(
                        "a backslash before {next:?} cannot be written unambiguously"
                    ));
                }
                Some(_) => out.push('\\'),
            },
            c if special.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    Ok(())
}

/// Appends a field's value: a number, boolean or double-quoted string.
fn field_value(out: &mut String, value: &Value, integers: Integers) -> Result<(), String> {
    match value {
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::String(s) => {
            out.push('"');
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        Value::Number(n) => match (integers, n.as_i64()) {
            (Integers::Integer, Some(i)) => {
                let _ = write!(out, "{i}i");
            }
            (Integers::Integer, None) if n.is_u64() => {
                return Err(format!(
                    "{n} is more than InfluxDB's largest integer (2^63 - 1)"
                ));
            }
            _ => {
                let f = n.as_f64().ok_or("not a finite number")?;
                let _ = write!(out, "{f}");
            }
        },
        Value::Null => return Err("null is not a field value".into()),
        Value::Array(_) => return Err("an array is not a field value".into()),
        Value::Object(_) => return Err("an object is not a field value".into()),
    }
    Ok(())
}

/// The point's time in nanoseconds from the record's value of `t.key`.
fn timestamp(t: &TimestampConfig, value: Option<&Value>) -> Result<i128, String> {
    let key = &t.key;
    let per_unit: i128 = match t.unit {
        TimeUnit::S => 1_000_000_000,
        TimeUnit::Ms => 1_000_000,
        TimeUnit::Us => 1_000,
        TimeUnit::Ns => 1,
        TimeUnit::Rfc3339 => {
            return match value {
                Some(Value::String(s)) => s
                    .parse::<jiff::Timestamp>()
                    .map(|ts| ts.as_nanosecond())
                    .map_err(|e| format!("{key} = {s:?} is not an RFC 3339 time: {e}")),
                None | Some(Value::Null) => Err(format!("the record has no {key}")),
                Some(v) => Err(format!(
                    "{key} = {v} is not an RFC 3339 string (for epoch numbers set timestamp.unit: s, ms, us or ns)"
                )),
            };
        }
    };
    match value {
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i) * per_unit)
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u) * per_unit)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN) * per_unit as f64;
                if f.is_finite() && f.abs() < 1e30 {
                    Ok(f.round() as i128)
                } else {
                    Err(format!("{key} = {n} is out of range"))
                }
            }
        }
        None | Some(Value::Null) => Err(format!("the record has no {key}")),
        Some(v) => Err(format!(
            "{key} = {v} is not a number of {} since 1970 (for RFC 3339 strings set timestamp.unit: rfc3339)",
            match t.unit {
                TimeUnit::S => "seconds",
                TimeUnit::Ms => "milliseconds",
                TimeUnit::Us => "microseconds",
                _ => "nanoseconds",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn lines(yaml: &str) -> Lines {
        let cfg: crate::config::sinks::influxdb::Config =
            yaml_serde::from_str(&format!("url: http://h\ndatabase: d\n{yaml}")).unwrap();
        Lines::new(&cfg.compile().unwrap())
    }

    /// The line of `record` from a message received at 1.5 s past the epoch on topic
    /// `sensors/d1` (vars: device = d1).
    fn line(l: &Lines, record: Value) -> Result<String, String> {
        let o = Origin {
            id: "abc".to_string().into(),
            topic: "sensors/d1".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            qos: 1,
            retain: false,
            vars: crate::topic::Vars::new(&[("device", "d1")]),
            received_at: jiff::Timestamp::from_millisecond(1_500).unwrap(),
            rule: Arc::from("r"),
            source: Arc::from("broker"),
        };
        l.line(&o, &record.into()).map_err(|e| e.message)
    }

    #[test]
    fn a_record_becomes_a_point() {
        let l = lines(
            "measurement: \"{{ record.kind }}\"\ntags: { device: \"{{ vars.device }}\", site: \"{{ record.site }}\" }\n",
        );
        assert_eq!(
            line(
                &l,
                json!({"kind": "env", "site": "s1", "temp": 21.5, "n": 3, "ok": true, "fw": "1.2", "x": null, "arr": [1]})
            )
            .unwrap(),
            // Keys in the record's order (sorted); the tags' keys, null and arrays are not fields.
            r#"env,device=d1,site=s1 fw="1.2",kind="env",n=3,ok=true,temp=21.5 1500000000"#
        );
    }

    #[test]
    fn escaping_follows_the_line_protocol() {
        let l = lines(
            "measurement: \"{{ record.m }}\"\ntags: { \"t k=,\": \"{{ record.t }}\" }\nfields: [\"f k=,\", s]\n",
        );
        assert_eq!(
            line(
                &l,
                json!({"m": "cpu load,x=1", "t": "a b,c=d", "f k=,": 1, "s": "say \"hi\"\\ \nnext"})
            )
            .unwrap(),
            "cpu\\ load\\,x=1,t\\ k\\=\\,=a\\ b\\,c\\=d f\\ k\\=\\,=1,s=\"say \\\"hi\\\"\\\\ \nnext\" 1500000000"
        );
        // A backslash that escapes nothing is written as it is.
        assert_eq!(
            line(&l, json!({"m": "a\\b", "t": "c\\d", "s": "x"})).unwrap(),
            "a\\b,t\\ k\\=\\,=c\\d s=\"x\" 1500000000"
        );
    }

    #[test]
    fn what_line_protocol_cannot_carry_fails_the_record() {
        let l = lines("measurement: \"{{ record.m }}\"\ntags: { t: \"{{ record.t }}\" }\n");
        for (record, want) in [
            (
                json!({"m": "a\nb", "v": 1}),
                "measurement \"a\\nb\": line protocol cannot carry a line break",
            ),
            (
                json!({"m": "#m", "v": 1}),
                "a line starting with # is a comment",
            ),
            (json!({"m": "", "v": 1}), "the measurement renders empty"),
            (json!({"m": "m\\", "v": 1}), "a backslash at the end"),
            (json!({"m": "m\\ x", "v": 1}), "a backslash before ' '"),
            (
                json!({"m": "m", "t": "a\\=b", "v": 1}),
                "tags.t \"a\\\\=b\": a backslash before '='",
            ),
            (json!({"m": "m", "t": "a\rb", "v": 1}), "line break"),
            (
                json!({"m": "m", "t": "x", "v": 1, "k\n": 2}),
                "field key \"k\\n\"",
            ),
            (json!(["m"]), "measurement template"),
        ] {
            let err = line(&l, record.clone()).unwrap_err();
            assert!(err.starts_with("line protocol: "), "{err}");
            assert!(err.contains(want), "{record}: {err}");
        }
        // The tag is left out when empty; `time` is never a field.
        assert_eq!(
            line(&l, json!({"m": "m", "t": "", "v": 1, "time": 5})).unwrap(),
            "m m=\"m\",v=1 1500000000"
        );
        let l = lines(
            "measurement: m\ntags: { t: \"{{ record.t }}\" }\ntimestamp: { key: ts, unit: s }\n",
        );
        let err = line(&l, json!({"t": "x", "ts": 1, "o": {"a": 1}, "n": null})).unwrap_err();
        assert!(
            err.ends_with("no fields: the record has no number, boolean or string besides its tags and timestamp"),
            "{err}"
        );
        let l = lines("measurement: m\nfields: [a, b]\n");
        let err = line(&l, json!({"c": 1, "a": null})).unwrap_err();
        assert!(
            err.ends_with("no fields: none of a, b is in the record"),
            "{err}"
        );
        let err = line(&l, json!({"a": {"x": 1}})).unwrap_err();
        assert!(
            err.ends_with("field a: an object is not a field value"),
            "{err}"
        );
        let l = lines("measurement: m\n");
        assert!(
            line(&l, json!("text"))
                .unwrap_err()
                .contains("not a JSON object")
        );
    }

    #[test]
    fn integers_are_floats_unless_asked_for() {
        let l = lines("measurement: m\n");
        assert_eq!(
            line(
                &l,
                json!({"a": 21, "b": 21.5, "c": -3, "d": 1e21, "e": 0.1})
            )
            .unwrap(),
            "m a=21,b=21.5,c=-3,d=1000000000000000000000,e=0.1 1500000000"
        );
        let l = lines("measurement: m\nintegers: integer\n");
        assert_eq!(
            line(&l, json!({"a": 21, "b": 21.5, "c": -3, "d": i64::MAX})).unwrap(),
            format!("m a=21i,b=21.5,c=-3i,d={}i 1500000000", i64::MAX)
        );
        let err = line(&l, json!({"a": u64::MAX})).unwrap_err();
        assert!(
            err.contains("field a: 18446744073709551615 is more than"),
            "{err}"
        );
    }

    #[test]
    fn timestamps_come_from_the_record_in_their_unit() {
        let l = lines("measurement: m\ntimestamp: { key: ts, unit: ms }\nfields: [v]\n");
        assert_eq!(
            line(&l, json!({"ts": 1_700_000_000_123_i64, "v": 1})).unwrap(),
            "m v=1 1700000000123000000"
        );
        let l = lines("measurement: m\ntimestamp: { key: ts, unit: s }\nprecision: ms\n");
        assert_eq!(
            line(&l, json!({"ts": 1_700_000_000.5, "v": 1})).unwrap(),
            "m v=1 1700000000500",
            "a fraction of a second, the timestamp's key not a field"
        );
        let l = lines("measurement: m\ntimestamp: { key: at, unit: rfc3339 }\nprecision: s\n");
        assert_eq!(
            line(&l, json!({"at": "2026-12-01T10:00:00.9+01:00", "v": 1})).unwrap(),
            "m v=1 1796115600"
        );
        // Before 1970, truncated down to the precision.
        assert_eq!(
            line(&l, json!({"at": "1969-12-31T23:59:59.5Z", "v": 1})).unwrap(),
            "m v=1 -1"
        );
        for (record, want) in [
            (json!({"v": 1}), "timestamp: the record has no at"),
            (
                json!({"at": "yesterday", "v": 1}),
                "is not an RFC 3339 time",
            ),
            (json!({"at": 5, "v": 1}), "is not an RFC 3339 string"),
            (
                json!({"at": "2300-01-01T00:00:00Z", "v": 1}),
                "outside the times InfluxDB stores",
            ),
        ] {
            let err = line(&l, record.clone()).unwrap_err();
            assert!(err.contains(want), "{record}: {err}");
        }
        let l = lines("measurement: m\ntimestamp: { key: ts, unit: ns }\n");
        let err = line(&l, json!({"ts": "1700000000", "v": 1})).unwrap_err();
        assert!(err.contains("is not a number of nanoseconds"), "{err}");
        let err = line(&l, json!({"ts": u64::MAX, "v": 1})).unwrap_err();
        assert!(err.contains("outside the times"), "{err}");
    }
}
