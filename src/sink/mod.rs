//! Sinks: where records go. Each sink implements [`Sink::write`] for one batch and says
//! what became of each record ([`Outcome`]); the [`driver`] around it owns the bounded
//! queue, batching, per-record retries, rate limiting, panics and dead-lettering, so
//! every sink gets the same delivery behaviour.
//!
//! A sink takes its settings as values from [`config::sinks`](crate::config::sinks)
//! (which validates and describes them, and compiles their templates and programs); here
//! is how each one opens ([`open`]) and what `mqbridge try` shows it would do
//! ([`would`]), both from the same compiled settings. Adding a sink type: its settings
//! there, a module here with the sink, and an arm in [`open`] and [`would`].

pub mod driver;
pub mod file;
pub mod http;
pub mod influxdb;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod migrate;
pub mod mysql;
#[cfg(feature = "nats")]
pub mod nats;
pub mod postgres;
pub mod publish;
pub mod queue;
pub mod republish;
pub mod retry;
pub mod sql;
pub mod sqlite;
pub mod webhook;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use futures::future::BoxFuture;
use serde::Serialize;

use crate::config::sinks::SinkSettings;
use crate::delivery::Ack;
use crate::record::Record;
use crate::topic::Vars;

/// Where one record came from: kept for templates and dead letters.
#[derive(Debug)]
pub struct Origin {
    /// Stable id of the message: the same when the broker redelivers it (see
    /// [`message_id`](crate::message::message_id)). Empty until [`Origin::id`] is first
    /// called (most sinks never ask: it costs a SHA-256 of the payload), or set when it
    /// is known (a replayed dead letter keeps its original message's id).
    pub id: OnceLock<String>,
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub vars: Vars,
    pub received_at: jiff::Timestamp,
    pub rule: Arc<str>,
    pub source: Arc<str>,
}

impl Origin {
    /// The origin of records a rule made from `msg`, with the rule's topic captures.
    pub fn from_message(msg: &crate::message::Message, rule: &Arc<str>, vars: Vars) -> Origin {
        let (topic, payload) = (msg.topic.clone(), msg.payload.clone());
        Origin::taking(msg, topic, payload, rule, vars)
    }

    /// [`Origin::from_message`] with the message's `topic` and `payload` given (taken
    /// out of a message that is not needed any more, instead of copied).
    pub fn taking(
        msg: &crate::message::Message,
        topic: ByteString,
        payload: Bytes,
        rule: &Arc<str>,
        vars: Vars,
    ) -> Origin {
        Origin {
            id: OnceLock::new(),
            topic,
            payload,
            qos: msg.qos,
            retain: msg.retain,
            vars,
            received_at: msg.received_at,
            rule: Arc::clone(rule),
            source: Arc::clone(&msg.source),
        }
    }

    /// The message's stable id.
    pub fn id(&self) -> &str {
        self.id
            .get_or_init(|| crate::message::message_id(&self.topic, &self.payload))
    }

    /// The context string templates render against: `id`, `topic`, `segments`, `vars`, `qos`,
    /// `retain`, `received_at`, `timestamp_ms`, `rule` and the `record` itself. It
    /// borrows the origin and the record: a template renders without a copy of either.
    pub fn template_context<'a>(&'a self, record: &'a Record) -> TemplateContext<'a> {
        TemplateContext {
            origin: self,
            record,
        }
    }
}

/// [`Origin::template_context`]: serialized as the map templates see.
pub struct TemplateContext<'a> {
    origin: &'a Origin,
    record: &'a Record,
}

impl Serialize for TemplateContext<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// The capture variables, as a map.
        /// The topic's levels, as a sequence.
        struct Segments<'a>(&'a str);
        impl Serialize for Segments<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.split('/'))
            }
        }
        let o = self.origin;
        let mut map = s.serialize_map(Some(10))?;
        map.serialize_entry("id", o.id())?;
        map.serialize_entry("topic", &*o.topic)?;
        map.serialize_entry("segments", &Segments(&o.topic))?;
        map.serialize_entry("vars", &o.vars)?;
        map.serialize_entry("qos", &o.qos)?;
        map.serialize_entry("retain", &o.retain)?;
        map.serialize_entry("received_at", &crate::rule::rfc3339(o.received_at))?;
        map.serialize_entry("timestamp_ms", &o.received_at.as_millisecond())?;
        map.serialize_entry("rule", &*o.rule)?;
        map.serialize_entry("record", self.record)?;
        map.end()
    }
}

/// One record on its way to one sink, holding a share of its message's settlement.
#[derive(Debug)]
pub struct Delivery {
    pub record: Record,
    pub origin: Arc<Origin>,
    pub ack: Ack,
}

impl Delivery {
    /// A record from a QoS 1 message on `topic` with nothing to acknowledge (tests,
    /// benchmarks, dry runs).
    pub fn detached(topic: &str, record: impl Into<Record>) -> Delivery {
        let record = record.into();
        let msg = crate::message::Message::detached(topic, record.to_string(), 1);
        let origin = Origin::from_message(&msg, &Arc::from("detached"), Vars::default());
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
pub async fn isolate<'a, T, F, Fut>(items: &'a [T], write: F) -> Vec<Outcome>
where
    F: FnMut(&'a [T]) -> Fut,
    Fut: std::future::Future<Output = Result<(), SinkError>>,
{
    isolate_by(items, |e: &SinkError| e.kind == ErrorKind::Permanent, write).await
}

/// [`isolate`], halving only a part whose failure `split` says may concern some of its
/// records alone (the `influxdb` sink: a 400 may be one bad line, a 404 is the whole
/// database's). A failure that is not split is every record's of that part.
pub async fn isolate_by<'a, T, E, F, Fut>(
    items: &'a [T],
    split: impl Fn(&E) -> bool,
    mut write: F,
) -> Vec<Outcome>
where
    E: Into<SinkError>,
    F: FnMut(&'a [T]) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut out = vec![Outcome::HeldBack; items.len()];
    // Parts still to write, as (start, end), the next one last.
    let mut parts = vec![(0, items.len())];
    while let Some((start, end)) = parts.pop() {
        match write(&items[start..end]).await {
            Ok(()) => out[start..end].fill(Outcome::Delivered),
            Err(e) if end - start > 1 && split(&e) => {
                let mid = start + (end - start) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            Err(e) => {
                let e: SinkError = e.into();
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

/// A record's id, for sinks whose consumers drop duplicates by it (`nats`, `kafka`): its
/// message's id, then a digest of the rule and the record (16 hex digits), so that the
/// records a message yields (through one rule or several) have ids of their own, the
/// same each time they are made again from the message (a broker's redelivery, the spool
/// after a crash, a dead letter's replay). Records equal in content made by one rule from
/// one message share an id: a consumer keeps one.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub fn record_id(origin: &Origin, record: &Record) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(origin.rule.as_bytes());
    h.update([0u8]);
    h.update(record.to_string().as_bytes());
    format!("{}-{}", origin.id(), hex::encode(&h.finalize()[..8]))
}

/// Keeps each topic in order for a sink that pipelines a batch (`nats`, `kafka`): after a
/// record failed transiently, the later records of its topic (`topics[i]` is record i's)
/// are held back, acknowledged or not: they are sent again, in order, after it, and the
/// copies carry the same [`record_id`].
#[cfg(any(feature = "nats", feature = "kafka"))]
pub fn held_back_after_failures(topics: &[&str], mut outcomes: Vec<Outcome>) -> Vec<Outcome> {
    let mut failed: Vec<&str> = Vec::new();
    for (topic, outcome) in topics.iter().zip(outcomes.iter_mut()) {
        let transient = matches!(outcome, Outcome::Failed(e) if e.kind != ErrorKind::Permanent);
        if failed.contains(topic) {
            if !matches!(outcome, Outcome::Failed(e) if e.kind == ErrorKind::Permanent) {
                *outcome = Outcome::HeldBack;
            }
        } else if transient {
            failed.push(topic);
        }
    }
    outcomes
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

/// What opening a sink may need from the app.
#[derive(Clone, Copy)]
pub struct OpenContext<'a> {
    /// Makes the publisher a republish sink publishes through, one per sink (the app
    /// wires it to the embedded broker, or to a connection to the external broker); None
    /// when there is no broker to publish to.
    pub publisher: Option<&'a (dyn Fn() -> Arc<dyn publish::Publish> + Sync)>,
    /// Where sinks run jq programs (the postgres sink's `columns:`).
    pub eval: &'a crate::eval_pool::EvalPool,
}

/// Why a sink could not be opened: each sink type's own reasons, or a republish sink
/// with no broker to publish to.
///
/// Sinks' errors quote their cause in their message, and so do not also report it as
/// their [`source`](std::error::Error::source): the causes (sqlx's errors above all)
/// quote their own sources, and a chain would print them twice.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Postgres(#[from] postgres::OpenError),
    #[error(transparent)]
    Mysql(#[from] mysql::OpenError),
    #[error(transparent)]
    Sqlite(#[from] sqlite::OpenError),
    #[error(transparent)]
    File(#[from] file::OpenError),
    #[error(transparent)]
    Webhook(#[from] webhook::OpenError),
    #[error(transparent)]
    Influxdb(#[from] influxdb::OpenError),
    #[error("republish needs `broker:` or `embedded:`")]
    NoBroker,
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Kafka(#[from] kafka::OpenError),
    #[cfg(not(all(feature = "nats", feature = "kafka")))]
    #[error("this mqbridge was built without the `{0}` feature")]
    NotBuilt(&'static str),
}

/// Opens the sink of `settings`: connects, opens files.
pub async fn open(
    settings: &SinkSettings,
    ctx: OpenContext<'_>,
) -> Result<Arc<dyn Sink>, OpenError> {
    Ok(match settings {
        SinkSettings::Postgres(s) => Arc::new(postgres::open(s, ctx.eval.clone()).await?),
        SinkSettings::Mysql(s) => Arc::new(mysql::open(s, ctx.eval.clone()).await?),
        SinkSettings::Sqlite(s) => Arc::new(sqlite::SqliteSink::open(s).await?),
        SinkSettings::Republish(s) => {
            let publisher = ctx.publisher.ok_or(OpenError::NoBroker)?;
            Arc::new(republish::RepublishSink::new(s, None, publisher()))
        }
        SinkSettings::Mqtt(s) => {
            let client_id = s.connection.client_id.clone();
            let connection = publish::Connection::new(&s.connection, client_id, "mqtt");
            Arc::new(republish::RepublishSink::new(
                &s.publish,
                s.properties.clone(),
                Arc::new(connection),
            ))
        }
        #[cfg(feature = "nats")]
        SinkSettings::Nats(s) => Arc::new(nats::NatsSink::new(s)),
        // Not compiled without the feature, so never in a plan (see its config).
        #[cfg(not(feature = "nats"))]
        SinkSettings::Nats(_) => return Err(OpenError::NotBuilt("nats")),
        #[cfg(feature = "kafka")]
        SinkSettings::Kafka(s) => Arc::new(kafka::KafkaSink::open(s)?),
        #[cfg(not(feature = "kafka"))]
        SinkSettings::Kafka(_) => return Err(OpenError::NotBuilt("kafka")),
        SinkSettings::File(s) => Arc::new(file::FileSink::open(s).await?),
        SinkSettings::Webhook(s) => Arc::new(webhook::WebhookSink::new(s, |name| {
            std::env::var(name).ok()
        })?),
        SinkSettings::Influxdb(s) => Arc::new(influxdb::InfluxSink::open(s)?),
    })
}

/// What writing `record` to the sink of `settings` would do, for `mqbridge try` (no side
/// effects).
pub fn would(settings: &SinkSettings, origin: &Origin, record: &Record) -> String {
    match settings {
        SinkSettings::Postgres(s) => postgres::would(s, origin, record),
        SinkSettings::Mysql(s) => mysql::would(s, origin, record),
        SinkSettings::Sqlite(s) => sqlite::would(s, origin, record),
        SinkSettings::Republish(s) => republish::would(s, None, origin, record),
        SinkSettings::Mqtt(s) => format!(
            "{} at {}",
            republish::would(&s.publish, s.properties.as_ref(), origin, record),
            s.connection.describe()
        ),
        #[cfg(feature = "nats")]
        SinkSettings::Nats(s) => nats::would(s, origin, record),
        #[cfg(not(feature = "nats"))]
        SinkSettings::Nats(_) => "nothing: built without the `nats` feature".into(),
        #[cfg(feature = "kafka")]
        SinkSettings::Kafka(s) => kafka::would(s, origin, record),
        #[cfg(not(feature = "kafka"))]
        SinkSettings::Kafka(_) => "nothing: built without the `kafka` feature".into(),
        SinkSettings::File(s) => file::would(s, origin, record),
        SinkSettings::Webhook(s) => webhook::would(s, origin, record),
        SinkSettings::Influxdb(s) => influxdb::would(s, origin, record),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_template_context_holds_the_origin_and_the_record() {
        let origin = Origin {
            id: OnceLock::from("abc".to_string()),
            topic: "sensors/d1/temp".into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            retain: true,
            vars: Vars::new(&[("device", "d1"), ("kind", "temp")]),
            received_at: jiff::Timestamp::from_millisecond(1_700_000_000_123).unwrap(),
            rule: Arc::from("r"),
            source: Arc::from("broker"),
        };
        let record = json!({"t": 21.5, "tags": ["a"]});
        let ctx = serde_json::to_value(origin.template_context(&record.clone().into())).unwrap();
        assert_eq!(
            ctx,
            json!({
                "id": "abc",
                "topic": "sensors/d1/temp",
                "segments": ["sensors", "d1", "temp"],
                "vars": {"device": "d1", "kind": "temp"},
                "qos": 1,
                "retain": true,
                "received_at": "2023-11-14T22:13:20.123Z",
                "timestamp_ms": 1_700_000_000_123_i64,
                "rule": "r",
                "record": {"t": 21.5, "tags": ["a"]},
            })
        );
    }

    /// A failure with the status that caused it, as the HTTP sinks see one.
    struct Status(u16);

    impl From<Status> for SinkError {
        fn from(s: Status) -> SinkError {
            SinkError::permanent(format!("HTTP {}", s.0))
        }
    }

    #[tokio::test]
    async fn isolate_by_splits_only_what_may_concern_some_records() {
        // 5 is a bad line (400); a part holding 404 fails as a whole (no database).
        let write = |part: &[i32]| {
            let r = if part.contains(&404) {
                Err(Status(404))
            } else if part.contains(&5) {
                Err(Status(400))
            } else {
                Ok(())
            };
            async move { r }
        };
        let split = |s: &Status| s.0 == 400;
        let summary = |out: Vec<Outcome>| -> Vec<String> {
            out.into_iter()
                .map(|o| match o {
                    Outcome::Delivered => "ok".into(),
                    Outcome::Failed(e) => e.message,
                    Outcome::HeldBack => "held".into(),
                })
                .collect()
        };
        let items: Vec<i32> = (0..8).collect();
        let mut calls = 0;
        let out = isolate_by(&items, split, |p| {
            calls += 1;
            write(p)
        })
        .await;
        let mut want = vec!["ok".to_string(); 8];
        want[5] = "HTTP 400".into();
        assert_eq!(summary(out), want);
        assert_eq!(
            calls, 7,
            "8 → 4+4 → 2+2 → 1+1: one call per part on 5's path"
        );

        let items = [1, 404, 3, 4];
        let mut calls = 0;
        let out = isolate_by(&items, split, |p| {
            calls += 1;
            write(p)
        })
        .await;
        assert_eq!(summary(out), vec!["HTTP 404"; 4]);
        assert_eq!(calls, 1);
    }

    #[cfg(any(feature = "nats", feature = "kafka"))]
    #[test]
    fn records_of_one_message_have_ids_of_their_own() {
        let d = Delivery::detached("s/d1", json!({"v": 1}));
        let a = record_id(&d.origin, &json!({"v": 1}).into());
        let b = record_id(&d.origin, &json!({"v": 2}).into());
        assert_ne!(a, b);
        let other_rule = Origin {
            rule: Arc::from("other"),
            id: std::sync::OnceLock::from(d.origin.id().to_string()),
            ..Origin::from_message(
                &crate::message::Message::detached("s/d1", "{}", 1),
                &Arc::from("x"),
                Vars::default(),
            )
        };
        assert_ne!(a, record_id(&other_rule, &json!({"v": 1}).into()));
    }

    #[cfg(any(feature = "nats", feature = "kafka"))]
    #[test]
    fn a_transient_failure_holds_back_the_rest_of_its_topic() {
        let t = || Outcome::Failed(SinkError::transient("timeout"));
        let p = || Outcome::Failed(SinkError::permanent("no stream"));
        let out = held_back_after_failures(
            &["a", "a", "b", "a", "a"],
            vec![t(), Outcome::Delivered, Outcome::Delivered, p(), t()],
        );
        let shown: Vec<&str> = out
            .iter()
            .map(|o| match o {
                Outcome::Delivered => "delivered",
                Outcome::HeldBack => "held",
                Outcome::Failed(e) if e.kind == ErrorKind::Permanent => "permanent",
                Outcome::Failed(_) => "transient",
            })
            .collect();
        assert_eq!(
            shown,
            ["transient", "held", "delivered", "permanent", "held"]
        );
    }
}
