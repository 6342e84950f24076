//! One dead letter as the `file` sink wrote it (the JSON of
//! [`dead_letter_record`](crate::sink::driver::dead_letter_record)), read back: its id,
//! the message it carries rebuilt, and the origin its record had.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;

use crate::delivery::Ack;
use crate::message::{Message, Properties};
use crate::sink::Origin;
use crate::sink::driver::letter_id;
use crate::topic::Vars;

/// Why a line is not a dead letter that can be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LetterError {
    #[error("not a dead letter: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{field} is not an RFC 3339 time: {error}")]
    Time {
        field: &'static str,
        error: jiff::Error,
    },
    #[error("payload is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("unknown payload_encoding {0:?} (expected utf8 or base64)")]
    Encoding(String),
    #[error("qos {0} is not 0, 1 or 2")]
    Qos(u8),
}

/// The fields of a dead letter that replay reads (the others are for people).
#[derive(Debug, Deserialize)]
struct Fields {
    message_id: String,
    topic: String,
    payload: String,
    payload_encoding: String,
    qos: u8,
    #[serde(default)]
    retain: bool,
    source: String,
    rule: String,
    sink: Option<String>,
    #[serde(default)]
    error: String,
    last_attempt_at: String,
    received_at: String,
    #[serde(default)]
    record: serde_json::Value,
}

/// A parsed dead letter.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Hex SHA-256 of the letter's exact line (without its line feed): what the sidecar
    /// records once it is replayed.
    pub id: String,
    pub message_id: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub source: Arc<str>,
    pub rule: Arc<str>,
    /// The sink that failed the record; None when the rule itself failed.
    pub sink: Option<String>,
    /// Why it was dead-lettered.
    pub error: String,
    pub last_attempt_at: jiff::Timestamp,
    pub received_at: jiff::Timestamp,
    /// The record the sink failed (null when the rule failed).
    pub record: serde_json::Value,
}

impl Letter {
    /// Parses one line of a dead-letter file (without its line feed).
    pub fn parse(line: &str) -> Result<Letter, LetterError> {
        let f: Fields = serde_json::from_str(line)?;
        let time = |field: &'static str, text: &str| {
            text.parse::<jiff::Timestamp>()
                .map_err(|error| LetterError::Time { field, error })
        };
        if f.qos > 2 {
            return Err(LetterError::Qos(f.qos));
        }
        Ok(Letter {
            id: letter_id(line),
            payload: decode_payload(&f.payload, &f.payload_encoding)?,
            last_attempt_at: time("last_attempt_at", &f.last_attempt_at)?,
            received_at: time("received_at", &f.received_at)?,
            message_id: f.message_id,
            topic: f.topic,
            qos: f.qos,
            retain: f.retain,
            source: Arc::from(f.source),
            rule: Arc::from(f.rule),
            sink: f.sink,
            error: f.error,
            record: f.record,
        })
    }

    /// The message as it was received, to run through its rule again (with no upstream to
    /// acknowledge; MQTT 5 properties and the client id are not in a dead letter).
    pub fn message(&self) -> Message {
        Message {
            topic: self.topic.as_str().into(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            properties: Properties::default(),
            client_id: None,
            received_at: self.received_at,
            source: Arc::clone(&self.source),
            ack: Ack::detached(),
        }
    }

    /// The origin of the letter's record: the original message id (so the webhook's
    /// `Idempotency-Key` is the original one), topic, payload, times, rule and source;
    /// `vars` are the rule's topic captures, which the letter does not keep.
    pub fn origin(&self, vars: Vars) -> Origin {
        Origin {
            id: self.message_id.clone().into(),
            topic: self.topic.as_str().into(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            vars,
            received_at: self.received_at,
            rule: Arc::clone(&self.rule),
            source: Arc::clone(&self.source),
        }
    }
}

/// The payload bytes of `text` as [`payload_text`](crate::rule::payload_text) wrote them.
pub fn decode_payload(text: &str, encoding: &str) -> Result<Bytes, LetterError> {
    match encoding {
        "utf8" => Ok(Bytes::copy_from_slice(text.as_bytes())),
        "base64" => Ok(base64::engine::general_purpose::STANDARD
            .decode(text)?
            .into()),
        other => Err(LetterError::Encoding(other.to_string())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::sink::ErrorKind;
    use crate::sink::driver::{Failure, dead_letter_record};

    /// A letter line exactly as the driver makes it.
    pub(crate) fn letter_line(
        topic: &str,
        payload: &[u8],
        sink: Option<&str>,
        record: serde_json::Value,
    ) -> String {
        let mut msg = Message::detached(topic, payload.to_vec(), 1);
        msg.retain = true;
        msg.source = Arc::from("broker");
        let origin = Origin::from_message(&msg, &Arc::from("r"), Vars::default());
        msg.ack.settle();
        let failure = Failure {
            sink,
            kind: ErrorKind::Permanent,
            error: "nope",
            attempts: 1,
            first_attempt: jiff::Timestamp::now(),
        };
        dead_letter_record(&origin, &record.into(), &failure).to_string()
    }

    #[test]
    fn a_letter_gives_back_the_message_and_its_id() {
        let line = letter_line("a/b", b"{\"t\": 1}", Some("db"), json!({"t": 1}));
        let l = Letter::parse(&line).unwrap();
        assert_eq!(l.id, letter_id(&line));
        assert_eq!(l.id.len(), 64);
        assert_eq!(&l.payload[..], b"{\"t\": 1}");
        assert_eq!(l.sink.as_deref(), Some("db"));
        assert_eq!(&*l.rule, "r");
        assert!(l.retain);
        assert_eq!(&*l.source, "broker");
        assert_eq!(l.record, json!({"t": 1}));
        let msg = l.message();
        assert_eq!(
            l.message_id,
            crate::message::message_id(&msg.topic, &msg.payload)
        );
        assert_eq!(msg.received_at, l.received_at);
        msg.ack.settle();
    }

    #[test]
    fn binary_payloads_come_back_from_base64() {
        let bytes = [0xff, 0x00, 0xfe, b'x'];
        let line = letter_line("bin", &bytes, None, serde_json::Value::Null);
        assert!(line.contains("\"payload_encoding\":\"base64\""), "{line}");
        let l = Letter::parse(&line).unwrap();
        assert_eq!(&l.payload[..], &bytes);
        assert_eq!(l.sink, None);
        assert_eq!(l.message_id, crate::message::message_id("bin", &bytes));
    }

    #[test]
    fn bad_letters_say_why() {
        assert!(matches!(
            Letter::parse("not json"),
            Err(LetterError::Json(_))
        ));
        assert!(matches!(
            decode_payload("%%%", "base64"),
            Err(LetterError::Base64(_))
        ));
        assert!(matches!(
            decode_payload("x", "hex"),
            Err(LetterError::Encoding(_))
        ));
        let line = letter_line("t", b"x", None, serde_json::Value::Null)
            .replace("\"received_at\":\"", "\"received_at\":\"yesterday ");
        assert!(matches!(
            Letter::parse(&line),
            Err(LetterError::Time {
                field: "received_at",
                ..
            })
        ));
    }

    #[test]
    fn the_origin_keeps_the_original_message_id() {
        let line = letter_line("dev/1", b"{}", Some("hook"), json!({}));
        let l = Letter::parse(&line).unwrap();
        let o = l.origin(Vars::new(&[("device", "1")]));
        assert_eq!(o.id(), crate::message::message_id("dev/1", b"{}"));
        assert_eq!(o.received_at, l.received_at);
        assert_eq!(&*o.rule, "r");
    }
}
