//! Sinks: where records go. Each sink implements [`Sink::write`] for one batch and says
//! what became of each record ([`Outcome`]); the [`driver`] around it owns the bounded
//! queue, batching, per-record retries, rate limiting, panics and dead-lettering, so
//! every sink gets the same delivery behaviour.
//!
//! Adding a sink type: a module with a `Config` declared through [`sink_config!`] (which
//! adds the settings every sink shares), an implementation of [`SinkSpec`] for it, and a
//! variant in [`SinkConfig`].

pub mod driver;
pub mod file;
pub mod migrate;
pub mod postgres;
pub mod republish;
pub mod retry;
pub mod sqlite;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::config::{BrokerPlan, units};
use crate::delivery::Ack;

/// Where one record came from: kept for templates and dead letters.
#[derive(Debug)]
pub struct Origin {
    /// Stable id of the message: the same when the broker redelivers it (see [`message_id`]).
    pub id: String,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub vars: Vec<(String, String)>,
    pub received_at: jiff::Timestamp,
    pub rule: Arc<str>,
    pub source: Arc<str>,
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

impl Origin {
    /// The origin of records a rule made from `msg`, with the rule's topic captures.
    pub fn from_message(
        msg: &crate::message::Message,
        rule: &Arc<str>,
        vars: Vec<(String, String)>,
    ) -> Origin {
        Origin {
            id: message_id(&msg.topic, &msg.payload),
            topic: msg.topic.clone(),
            payload: msg.payload.clone(),
            qos: msg.qos,
            retain: msg.retain,
            vars,
            received_at: msg.received_at,
            rule: Arc::clone(rule),
            source: Arc::clone(&msg.source),
        }
    }

    /// The context string templates render against: `id`, `topic`, `segments`, `vars`, `qos`,
    /// `retain`, `received_at`, `timestamp_ms`, `rule` and the `record` itself.
    pub fn template_context(&self, record: &serde_json::Value) -> serde_json::Value {
        let vars: serde_json::Map<String, serde_json::Value> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        serde_json::json!({
            "id": self.id,
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

impl Delivery {
    /// A record from a QoS 1 message on `topic` with nothing to acknowledge (tests,
    /// benchmarks, dry runs).
    pub fn detached(topic: &str, record: serde_json::Value) -> Delivery {
        let msg = crate::message::Message::detached(topic, record.to_string(), 1);
        let origin = Origin::from_message(&msg, &Arc::from("detached"), Vec::new());
        msg.ack.settle();
        Delivery {
            record,
            origin: Arc::new(origin),
            ack: Ack::detached(),
        }
    }
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The sink or the way to it is unwell (connection, timeout, busy): retry.
    Transient,
    /// This data cannot be written as it is (constraint, type, bad request): dead letter.
    Permanent,
    /// The code handling it panicked (a bug): retried a few times in case it was passing,
    /// then dead-lettered.
    Panic,
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

/// What became of one record of a [`Sink::write`].
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Written: the record settles.
    Delivered,
    /// Not written; the error's kind says whether it is retried or dead-lettered.
    Failed(SinkError),
    /// Not attempted, to keep its topic in order: an earlier record of the same topic in
    /// this batch failed transiently. Sent again with that one, without counting an attempt.
    HeldBack,
}

impl Outcome {
    /// Ok when delivered, else why not (a held-back record as a transient error).
    pub fn result(self) -> Result<(), SinkError> {
        match self {
            Outcome::Delivered => Ok(()),
            Outcome::Failed(e) => Err(e),
            Outcome::HeldBack => Err(SinkError::transient(
                "held back behind a failure of its topic",
            )),
        }
    }
}

/// A destination for records.
///
/// `write` returns one [`Outcome`] per record of the batch, in the batch's order. A sink
/// that can only fail a batch as a whole (one transaction, one request) reports that
/// failure for every record ([`all`]); one that can find the bad records isolates them
/// ([`isolate`]). **Order**: once a record has failed transiently, no later record of the
/// same topic in the batch may be delivered (report it [`Outcome::HeldBack`] or failed):
/// the driver sends the failures again, in order, and the topic must stay in order.
pub trait Sink: Send + Sync + 'static {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>>;
}

/// The outcomes of a write that succeeded or failed as a whole.
pub fn all(records: usize, result: Result<(), SinkError>) -> Vec<Outcome> {
    match result {
        Ok(()) => vec![Outcome::Delivered; records],
        Err(e) => vec![Outcome::Failed(e); records],
    }
}

/// Per-record outcomes from a write that can only fail as a whole (one transaction): a
/// part that fails permanently is halved until the bad records are alone, so that the
/// others are written and only those are dead-lettered. After a transient failure the
/// rest of the batch is held back (not attempted), which keeps every topic in order.
pub async fn isolate<'a, T, F, Fut>(items: &'a [T], mut write: F) -> Vec<Outcome>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: std::future::Future<Output = Result<(), SinkError>>,
{
    let mut out = vec![Outcome::HeldBack; items.len()];
    // Parts still to write, as (start, end), the next one last.
    let mut parts = vec![(0, items.len())];
    while let Some((start, end)) = parts.pop() {
        match write(&items[start..end]).await {
            Ok(()) => out[start..end].fill(Outcome::Delivered),
            Err(e) if e.kind == ErrorKind::Permanent && end - start > 1 => {
                let mid = start + (end - start) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            Err(e) => {
                let transient = e.kind != ErrorKind::Permanent;
                out[start..end].fill(Outcome::Failed(e));
                if transient {
                    break; // the parts after this one stay held back
                }
            }
        }
    }
    out
}

/// Prepares each record for writing (rendering, conversion); a record that cannot be
/// prepared fails permanently on its own. `write` gets the prepared ones, in order, and
/// returns their outcomes; the result has one outcome per record of `batch`.
pub async fn prepared<'b, T, Fut>(
    batch: &'b [Delivery],
    mut prepare: impl FnMut(&'b Delivery) -> Result<T, SinkError>,
    write: impl FnOnce(Vec<T>) -> Fut,
) -> Vec<Outcome>
where
    Fut: std::future::Future<Output = Vec<Outcome>>,
{
    let mut out: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    for d in batch {
        match prepare(d) {
            Ok(item) => {
                items.push(item);
                out.push(None);
            }
            Err(e) => out.push(Some(Outcome::Failed(e))),
        }
    }
    let mut written = if items.is_empty() {
        Vec::new()
    } else {
        write(items).await
    }
    .into_iter();
    out.into_iter()
        .map(|o| {
            o.or_else(|| written.next()).unwrap_or_else(|| {
                Outcome::Failed(SinkError::transient("sink bug: an outcome is missing"))
            })
        })
        .collect()
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

/// Settings every sink has, whatever its type (added to each `Config` by [`sink_config!`]).
#[derive(Debug, Clone, Copy)]
pub struct Common {
    pub batch: BatchConfig,
    pub retry: retry::RetryConfig,
    pub queue: usize,
    pub concurrency: usize,
    pub rate_limit: Option<RateLimit>,
}

/// `rate_limit:` of a sink: records per second, with bursts up to one second's worth.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
}

pub(crate) fn default_queue() -> usize {
    10_000
}

pub(crate) fn default_concurrency() -> usize {
    1
}

/// Declares a sink's `Config` struct with the fields every sink shares appended:
/// `batch`, `retry`, `queue`, `concurrency` and `rate_limit`.
macro_rules! sink_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// How records are grouped into writes.
            #[serde(default)]
            pub batch: $crate::sink::BatchConfig,
            /// Retries of transient failures.
            #[serde(default)]
            pub retry: $crate::sink::retry::RetryConfig,
            /// Records waiting for this sink before the source is held back.
            #[serde(default = "crate::sink::default_queue")]
            pub queue: usize,
            /// Batches written at the same time. Records are split into this many lanes by
            /// topic, so the messages of one topic still arrive in order.
            #[serde(default = "crate::sink::default_concurrency")]
            pub concurrency: usize,
            /// Upper bound on records written per second.
            #[serde(default)]
            pub rate_limit: Option<$crate::sink::RateLimit>,
        }

        impl $crate::sink::HasCommon for $name {
            fn common(&self) -> $crate::sink::Common {
                $crate::sink::Common {
                    batch: self.batch,
                    retry: self.retry,
                    queue: self.queue,
                    concurrency: self.concurrency,
                    rate_limit: self.rate_limit,
                }
            }
        }
    };
}
pub(crate) use sink_config;

/// Access to the shared settings (implemented by [`sink_config!`]).
pub trait HasCommon {
    fn common(&self) -> Common;
}

/// What is needed to open a sink.
pub struct OpenContext<'a> {
    pub name: &'a str,
    /// The external broker, for sinks that publish to it.
    pub broker: Option<&'a BrokerPlan>,
    /// The embedded broker, for sinks that publish into it in-process.
    pub embedded: Option<&'a crate::broker::Broker>,
    /// Where sinks run jq programs (the postgres sink's `columns:`).
    pub eval: &'a crate::eval_pool::EvalPool,
}

/// A sink type's config: validation, descriptions for `check`/`try`, and opening.
pub trait SinkSpec: HasCommon + Send + Sync {
    /// Problems as (field, message); pure, no I/O.
    fn validate(&self) -> Vec<(&'static str, String)>;
    /// Problems in fields whose path is only known at run time, such as a map entry
    /// (`headers.Authorization`), as (field, message); most sinks have none.
    fn validate_entries(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// One line for `mqbridge check`.
    fn describe(&self) -> String;
    /// What writing `record` would do, for `mqbridge try` (no side effects).
    fn would(&self, origin: &Origin, record: &serde_json::Value) -> String;
    /// Connects / opens files and returns the sink.
    fn open<'a>(&'a self, ctx: OpenContext<'a>) -> BoxFuture<'a, anyhow::Result<Arc<dyn Sink>>>;
}

/// One entry of `sinks:`, by `type`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Postgres(postgres::Config),
    Sqlite(sqlite::Config),
    Republish(republish::Config),
    File(file::Config),
    Webhook(webhook::Config),
}

impl SinkConfig {
    pub fn spec(&self) -> &dyn SinkSpec {
        match self {
            SinkConfig::Postgres(c) => c,
            SinkConfig::Sqlite(c) => c,
            SinkConfig::Republish(c) => c,
            SinkConfig::File(c) => c,
            SinkConfig::Webhook(c) => c,
        }
    }
}
