//! Rules: which messages (topic filters), how to read them (decode), which to keep
//! (filter), what to make of them (transform), and where the records go (sinks).
//!
//! A [`Rule`] is compiled from config once; [`Rule::evaluate`] is pure and synchronous,
//! so `mqbridge try` and the live pipeline run exactly the same code. It stops a jq
//! program that runs past its time limit (see [`jq`]): a runaway program is a failed
//! evaluation, not a stuck thread.

mod decode;
pub mod jq;
pub mod picks;
pub mod template;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use jaq_json::Val;
use smallvec::{SmallVec, smallvec};

use crate::message::Message;
use crate::record::Record;
use crate::topic::{Captures, TopicFilter};
use decode::Decoded;
#[cfg(feature = "protobuf")]
pub use decode::Sparkplug;
pub use decode::{Command, Decode, Decoder, Gap, Observed, decode};
use jq::{Deadline, JqProgram};

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub from: Vec<TopicFilter>,
    pub decode: Decoder,
    pub filter: Option<JqProgram>,
    pub transform: Option<JqProgram>,
    /// Indices into the pipeline's sink list.
    pub to: Vec<usize>,
    /// Whether a JSON payload the transform takes whole is kept as its text
    /// ([`Picks::record_from_text`](picks::Picks::record_from_text)): when every sink
    /// of the rule is PostgreSQL's, which writes that text to a `jsonb` column as it is.
    /// Any other sink reads the value, which would parse the payload a second time.
    pub keeps_payload_text: bool,
}

/// A message's records from one rule: most rules make one, kept inline.
pub type Records = SmallVec<[Record; 1]>;

/// What a rule made of one message.
#[derive(Debug, PartialEq)]
pub enum Evaluation {
    /// Zero or more records (a transform may emit a stream).
    Records(Records),
    /// The filter said no.
    Filtered,
    /// Decode, filter or transform failed: the message goes to the dead letter.
    Failed { stage: &'static str, error: String },
}

impl Rule {
    /// The named captures of the first filter that matches `topic`, or None; then the
    /// variables the decoder reads from the topic (Sparkplug B's), except those named
    /// like a capture.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<Captures<'_, 't>> {
        let mut vars = self.from.iter().find_map(|f| f.captures(topic))?;
        for (name, value) in self.decode.vars(topic) {
            if !vars.iter().any(|(n, _)| *n == name) {
                vars.push((name, value));
            }
        }
        Some(vars)
    }

    /// Runs decode, filter and transform for a message that matched with `vars`; filter
    /// and transform together may run for `limit`. A decoder that keeps state reads the
    /// message against it without changing it (see [`Rule::evaluate_observed`]).
    pub fn evaluate(&self, msg: &Message, vars: &[(&str, &str)], limit: Duration) -> Evaluation {
        if let Some(record) = self.picked_from_json(msg, vars) {
            return Evaluation::Records(smallvec![record]);
        }
        let deadline = Deadline::after(limit);
        match self.decode.decode(&msg.topic, &msg.payload) {
            Ok(Decoded::One(payload)) => self.run(msg, vars, payload, deadline),
            Ok(Decoded::Each(payloads)) => self.run_each(msg, vars, payloads, deadline),
            Err(error) => Evaluation::Failed {
                stage: "decode",
                error,
            },
        }
    }

    /// The common rule on its fast path: a JSON payload, no filter, and a transform that
    /// only picks paths ([`picks`]), read by serde_json straight into the record. None
    /// when the rule is not such a one, or the payload is not JSON, or a path cannot be
    /// walked: [`Rule::evaluate`] then reads it the usual way, and says why it fails.
    fn picked_from_json(&self, msg: &Message, vars: &[(&str, &str)]) -> Option<Record> {
        if self.filter.is_some() || !matches!(self.decode, Decoder::Named(Decode::Json)) {
            return None;
        }
        let picks = self.transform.as_ref()?.picks()?;
        if self.keeps_payload_text
            && let Some(record) = picks.record_from_text(msg, vars)
        {
            return Some(record);
        }
        let payload = serde_json::from_slice(&msg.payload).ok()?;
        picks.record_from_json(msg, vars, payload)
    }

    /// [`Rule::evaluate`] for a message its decoder already read, in arrival order
    /// ([`Decoder::observe`]): filter and transform run on each of its payloads.
    pub fn evaluate_observed(
        &self,
        msg: &Message,
        vars: &[(&str, &str)],
        payloads: Result<Vec<Val>, String>,
        limit: Duration,
    ) -> Evaluation {
        match payloads {
            Ok(payloads) => self.run_each(msg, vars, payloads, Deadline::after(limit)),
            Err(error) => Evaluation::Failed {
                stage: "decode",
                error,
            },
        }
    }

    /// Filter and transform on each of several payloads (one message's): the records of
    /// all, the first failure, or Filtered when the filter left every one out.
    fn run_each(
        &self,
        msg: &Message,
        vars: &[(&str, &str)],
        payloads: Vec<Val>,
        deadline: Deadline,
    ) -> Evaluation {
        let mut records = Records::new();
        let mut kept = payloads.is_empty();
        for payload in payloads {
            match self.run(msg, vars, payload, deadline) {
                Evaluation::Records(r) => {
                    kept = true;
                    records.extend(r);
                }
                Evaluation::Filtered => {}
                failed @ Evaluation::Failed { .. } => return failed,
            }
        }
        match kept {
            true => Evaluation::Records(records),
            false => Evaluation::Filtered,
        }
    }

    /// Filter and transform on one decoded payload.
    fn run(
        &self,
        msg: &Message,
        vars: &[(&str, &str)],
        payload: Val,
        deadline: Deadline,
    ) -> Evaluation {
        // The context jq programs run on, made when one needs it.
        let mut ctx = None;
        if let Some(filter) = &self.filter {
            let ctx = ctx.insert(context(msg, vars, payload.clone()));
            match filter.test(ctx.clone(), deadline) {
                Ok(true) => {}
                Ok(false) => return Evaluation::Filtered,
                Err(error) => {
                    return Evaluation::Failed {
                        stage: "filter",
                        error: error.to_string(),
                    };
                }
            }
        }
        let Some(t) = &self.transform else {
            return Evaluation::Records(smallvec![default_record(msg, &payload).into()]);
        };
        if let Some(record) = t.picks().and_then(|p| p.record(msg, vars, &payload)) {
            return Evaluation::Records(smallvec![record]);
        }
        let ctx = ctx.unwrap_or_else(|| context(msg, vars, payload));
        match t.run(ctx, deadline) {
            Ok(out) => Evaluation::Records(out.iter().map(|v| jq::to_json(v).into()).collect()),
            Err(error) => Evaluation::Failed {
                stage: "transform",
                error: error.to_string(),
            },
        }
    }
}

/// A context key: static text, so making one copies nothing.
fn key(k: &'static str) -> Val {
    Val::utf8_str(Bytes::from_static(k.as_bytes()))
}

/// A string from borrowed text (a topic segment, a variable, a property).
pub fn text(s: &str) -> Val {
    Val::utf8_str(Bytes::copy_from_slice(s.as_bytes()))
}

/// The keys of the value filters and transforms run on (DESIGN.md §2), in its order.
const CONTEXT: [&str; 11] = [
    "topic",
    "segments",
    "vars",
    "payload",
    "raw",
    "qos",
    "retain",
    "properties",
    "client_id",
    "received_at",
    "timestamp_ms",
];

/// The value filters and transforms run on (DESIGN.md §2): `topic`, `segments`, `vars`,
/// `payload`, `raw`, `qos`, `retain`, `properties`, `client_id`, `received_at`,
/// `timestamp_ms`.
pub fn context(msg: &Message, vars: &[(&str, &str)], payload: Val) -> Val {
    Val::obj(
        CONTEXT
            .iter()
            .map(|&name| (key(name), context_field(msg, vars, &payload, name)))
            .collect(),
    )
}

/// One key of the [`context`], made on its own (null for a key it does not have, as jq
/// reads a missing key): what a path-picking transform takes ([`picks`]).
pub fn context_field(msg: &Message, vars: &[(&str, &str)], payload: &Val, name: &str) -> Val {
    let opt = |s: Option<&str>| s.map(text).unwrap_or(Val::Null);
    match name {
        "topic" => text(&msg.topic),
        "segments" => msg.topic.split('/').map(text).collect(),
        "vars" => Val::obj(vars.iter().map(|(k, v)| (text(k), text(v))).collect()),
        "payload" => payload.clone(),
        "raw" => match std::str::from_utf8(&msg.payload) {
            Ok(_) => Val::utf8_str(msg.payload.clone()),
            Err(_) => Val::Null,
        },
        "qos" => Val::from(msg.qos as isize),
        "retain" => Val::Bool(msg.retain),
        "properties" => {
            let p = &msg.properties;
            let user = p.user_properties.iter().map(|(k, v)| (text(k), text(v)));
            let correlation = p
                .correlation_data
                .as_ref()
                .map(|b| Val::byte_str(b.clone()));
            Val::obj(
                [
                    (key("user_properties"), Val::obj(user.collect())),
                    (key("content_type"), opt(p.content_type.as_deref())),
                    (key("response_topic"), opt(p.response_topic.as_deref())),
                    (key("correlation_data"), correlation.unwrap_or(Val::Null)),
                ]
                .into_iter()
                .collect(),
            )
        }
        "client_id" => opt(msg.client_id.as_deref()),
        "received_at" => Val::from(rfc3339(msg.received_at)),
        "timestamp_ms" => Val::from(msg.received_at.as_millisecond() as isize),
        _ => Val::Null,
    }
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-26T03:00:00.123Z`.
pub fn rfc3339(t: jiff::Timestamp) -> String {
    format!("{t:.3}")
}

/// The record of a rule without `transform`: the columns of the default
/// `mqbridge_messages` table (`message_id` is stable across redeliveries).
fn default_record(msg: &Message, payload: &Val) -> serde_json::Value {
    let payload = jq::to_json(payload);
    serde_json::json!({
        "message_id": crate::message::message_id(&msg.topic, &msg.payload),
        "topic": &*msg.topic,
        "payload": payload,
        "qos": msg.qos,
        "retain": msg.retain,
        "received_at": rfc3339(msg.received_at),
    })
}

/// Payload as JSON text when it is UTF-8, else base64; used by dead letters and `try`.
pub fn payload_text(payload: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(payload) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            "base64",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(filter: Option<&str>, transform: Option<&str>, decode: Decode) -> Rule {
        Rule {
            name: Arc::from("r"),
            from: vec![TopicFilter::parse("sensors/{device}/telemetry").unwrap()],
            decode: decode.into(),
            filter: filter.map(|f| JqProgram::compile(f).unwrap()),
            transform: transform.map(|t| JqProgram::compile(t).unwrap()),
            to: vec![],
            keeps_payload_text: false,
        }
    }

    fn eval(r: &Rule, topic: &str, payload: &[u8]) -> Evaluation {
        let msg = Message::detached(topic, payload.to_vec(), 1);
        let vars = r.matches(topic).expect("matches");
        let vars: Vec<_> = vars.into_iter().collect();
        let ev = r.evaluate(&msg, &vars, Duration::from_secs(2));
        msg.ack.settle();
        ev
    }

    #[test]
    fn transform_sees_vars_and_payload() {
        let r = rule(
            Some(".payload.temp != null"),
            Some("{device: .vars.device, temp: .payload.temp, level: .segments[2]}"),
            Decode::Json,
        );
        assert_eq!(
            eval(&r, "sensors/d7/telemetry", br#"{"temp": 20.5}"#),
            Evaluation::Records(smallvec![
                json!({"device": "d7", "temp": 20.5, "level": "telemetry"}).into()
            ])
        );
        assert_eq!(
            eval(&r, "sensors/d7/telemetry", br#"{"hum": 3}"#),
            Evaluation::Filtered
        );
    }

    #[test]
    fn transform_may_emit_many_or_none() {
        let r = rule(None, Some(".payload[] | {v: .}"), Decode::Json);
        assert_eq!(
            eval(&r, "sensors/a/telemetry", b"[1,2]"),
            Evaluation::Records(smallvec![json!({"v": 1}).into(), json!({"v": 2}).into()])
        );
        assert_eq!(
            eval(&r, "sensors/a/telemetry", b"[]"),
            Evaluation::Records(smallvec![])
        );
    }

    #[test]
    fn failures_name_their_stage() {
        let r = rule(None, Some("{t: (.payload.temp + 1)}"), Decode::Json);
        assert!(matches!(
            eval(&r, "sensors/a/telemetry", b"{not json"),
            Evaluation::Failed {
                stage: "decode",
                ..
            }
        ));
        assert!(matches!(
            eval(&r, "sensors/a/telemetry", br#"{"temp": "hot"}"#),
            Evaluation::Failed {
                stage: "transform",
                ..
            }
        ));
        let r = rule(None, None, Decode::Text);
        assert!(matches!(
            eval(&r, "sensors/a/telemetry", &[0xff, 0xfe]),
            Evaluation::Failed {
                stage: "decode",
                ..
            }
        ));
    }

    #[test]
    fn default_record_and_decodings() {
        let r = rule(None, None, Decode::Text);
        let Evaluation::Records(recs) = eval(&r, "sensors/a/telemetry", b"hello") else {
            panic!()
        };
        assert_eq!(recs[0]["payload"], json!("hello"));
        assert_eq!(recs[0]["topic"], json!("sensors/a/telemetry"));
        assert_eq!(recs[0]["qos"], json!(1));
        let r = rule(None, Some("{p: .payload, raw: .raw}"), Decode::Bytes);
        assert_eq!(
            eval(&r, "sensors/a/telemetry", &[0, 159, 146]),
            Evaluation::Records(smallvec![json!({"p": "AJ+S", "raw": null}).into()])
        );
    }

    #[test]
    fn deep_nesting_is_a_decode_error_not_a_crash() {
        let r = rule(None, None, Decode::Json);
        let deep = "[".repeat(100_000);
        assert!(matches!(
            eval(&r, "sensors/a/telemetry", deep.as_bytes()),
            Evaluation::Failed {
                stage: "decode",
                ..
            }
        ));
    }
}
