//! The unit of work: one MQTT message as a source received it, with the handle that
//! acknowledges it upstream once every record made from it has settled.

use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;

use crate::delivery::Ack;

/// MQTT 5 properties that rules may read. Empty for MQTT 3.1.1 sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// UTF-8 in shared bytes: a copy (the watchdog's, each record's origin) is a
    /// reference count, and a topic read from the spool is a slice of its record.
    pub topic: ByteString,
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
    /// Publishing client, when the source knows it (the embedded broker does; shared by
    /// a connection's messages).
    pub client_id: Option<Arc<str>>,
    /// When the source received it.
    pub received_at: jiff::Timestamp,
    /// Name of the source (e.g. `broker`), for logs and dead letters.
    pub source: Arc<str>,
    /// Settles the message upstream; see [`Ack`].
    pub ack: Ack,
}

impl Message {
    /// A message with no upstream to acknowledge (used by `mqbridge try` and tests).
    pub fn detached(topic: impl Into<ByteString>, payload: impl Into<Bytes>, qos: u8) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain: false,
            properties: Properties::default(),
            client_id: None,
            received_at: jiff::Timestamp::now(),
            source: Arc::from("detached"),
            ack: Ack::detached(),
        }
    }
}

/// A message's stable id: hex of the first 16 bytes of SHA-256 over topic and payload.
/// A redelivered message gets the same id, so sinks can use it to drop duplicates
/// (webhook `Idempotency-Key`, a database conflict key). Two identical payloads on the
/// same topic share an id: put a sequence number or timestamp in the payload if they are
/// distinct events.
pub fn message_id(topic: &str, payload: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(topic.as_bytes());
    h.update([0u8]);
    h.update(payload);
    hex::encode(&h.finalize()[..16])
}
