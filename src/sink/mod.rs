//! Sinks: where records go. Each sink implements [`Sink::write`] for one batch; the
//! [`driver`] around it owns the bounded queue, batching, retries, splitting of failing
//! batches and dead-lettering, so every sink gets the same delivery behaviour.

pub mod driver;
pub mod file;
pub mod republish;
pub mod retry;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::config::units;
use crate::delivery::Ack;

/// Where one record came from: kept for templates and dead letters.
#[derive(Debug)]
pub struct Origin {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub vars: Vec<(String, String)>,
    pub received_at: jiff::Timestamp,
    pub rule: Arc<str>,
    pub source: Arc<str>,
}

impl Origin {
    /// The context string templates render against: `topic`, `segments`, `vars`, `qos`,
    /// `retain`, `received_at`, `timestamp_ms`, `rule` and the `record` itself.
    pub fn template_context(&self, record: &serde_json::Value) -> serde_json::Value {
        let vars: serde_json::Map<String, serde_json::Value> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        serde_json::json!({
            "topic": self.topic,
            "segments": self.topic.split('/').collect::<Vec<_>>(),
            "vars": vars,
            "qos": self.qos,
            "retain": self.retain,
            "received_at": crate::rule::rfc3339(self.received_at),
            "timestamp_ms": self.received_at.as_millisecond(),
            "rule": &*self.rule,
            "record": record,
        })
    }
}

/// One record on its way to one sink, holding a share of its message's settlement.
#[derive(Debug)]
pub struct Delivery {
    pub record: serde_json::Value,
    pub origin: Arc<Origin>,
    pub ack: Ack,
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The sink or the way to it is unwell (connection, timeout, busy): retry.
    Transient,
    /// This data cannot be written as it is (constraint, type, bad request): dead letter.
    Permanent,
}

/// A failed write, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub kind: ErrorKind,
    pub message: String,
    /// A delay the sink asked for (e.g. HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

impl SinkError {
    pub fn transient(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Transient,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A destination for records. `write` stores the whole batch or fails as a whole
/// (one transaction, one request); the driver splits and retries.
pub trait Sink: Send + Sync + 'static {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// How records are grouped into writes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in one write.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// How long a batch may wait for more records once it has one. Whatever is already
    /// queued is always taken at once, so under load batches fill without waiting.
    #[serde(default = "default_max_wait")]
    pub max_wait: units::Duration,
}

fn default_max_rows() -> usize {
    1000
}
fn default_max_wait() -> units::Duration {
    units::Duration(Duration::from_millis(5))
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: default_max_rows(),
            max_wait: default_max_wait(),
        }
    }
}

pub(crate) fn default_queue() -> usize {
    10_000
}
