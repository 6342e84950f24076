//! The `kafka` sink: each record produced to a Kafka topic (or any Kafka-API broker),
//! delivered once the partition leader acknowledged it with `acks=all`.
//!
//! **The client** is librdkafka (through rdkafka, linked against the system's library:
//! Debian's `librdkafka-dev` to build, `librdkafka1` to run). It has the idempotent
//! producer, which this sink turns on: the client retries a produce request without the
//! broker writing it twice or out of order, for as long as `timeout` allows.
//!
//! **Partitions and order**: records with the same key go to the same partition, chosen
//! as the Java client chooses it (murmur2 of the key), so other producers of the same keys
//! agree. The key is the MQTT topic unless `key:` says otherwise, so each device's
//! records stay in order. A batch is pipelined: every record is handed to the client,
//! then every acknowledgment awaited.
//!
//! **Duplicates**: each record carries a `message-id` header ([`super::record_id`]), the
//! same whenever the record is made again from the same message (a broker's redelivery,
//! the spool after a crash, a dead letter's replay, a retry after `timeout`), so a
//! consumer can drop copies.
//!
//! **Outcomes**, per record:
//! - the leader's acknowledgment: delivered;
//! - a record the broker will never take (too large, an invalid or unauthorized topic, a
//!   topic that does not exist when the broker does not create topics): permanent, so the
//!   record goes to the dead letter and the others go on;
//! - no acknowledgment within `timeout`, the client's queue full, the brokers down:
//!   transient, and the records of that MQTT topic after it in the batch are held back
//!   (sent again, in order, after it);
//! - a fatal error of the idempotent producer, or its id or epoch fenced by the broker
//!   (what a broker may answer when the client bumps the epoch after a timeout):
//!   transient, and the sink makes a new producer (a new id) for the next write.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::kafka::{ID_HEADER, Password, Settings, validate_topic};
use crate::record::Record;

/// Why the sink could not be opened: a file it reads, or a property librdkafka refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("kafka: sasl.password_file {path}: {error}")]
    PasswordFile { path: String, error: std::io::Error },
    #[error("kafka: {0}")]
    Client(String),
}

/// What writing `record` would do, for `mqbridge try`.
pub fn would(settings: &Settings, origin: &Origin, record: &Record) -> String {
    match prepare(settings, origin, record) {
        Ok(r) => {
            let mut headers: Vec<String> = r
                .headers
                .iter()
                .map(|(name, value)| format!("{name}: {value}"))
                .collect();
            headers.sort();
            format!(
                "produce to topic {:?} with key {:?} (partition: murmur2 of the key, as the Java client picks it) \
                 and headers {{{}}} at {}, delivered once the partition leader acknowledges it \
                 (acks=all, idempotent producer{})",
                r.topic,
                r.key,
                headers.join(", "),
                settings.brokers.join(","),
                match settings.compression.name() {
                    "none" => String::new(),
                    c => format!(", {c} compression"),
                }
            )
        }
        Err(e) => format!("fails: {e}"),
    }
}

/// One record, ready to produce.
struct Prepared {
    topic: String,
    key: String,
    headers: Vec<(String, String)>,
    payload: Vec<u8>,
}

/// Renders the topic, key, headers and payload of `record`.
fn prepare(settings: &Settings, origin: &Origin, record: &Record) -> Result<Prepared, SinkError> {
    let ctx = origin.template_context(record);
    let topic = settings
        .topic
        .render(&ctx)
        .map_err(|e| SinkError::permanent(format!("topic template: {e}")))?;
    validate_topic(&topic).map_err(|e| SinkError::permanent(format!("topic {topic:?}: {e}")))?;
    let key = match &settings.key {
        Some(k) => k
            .render(&ctx)
            .map_err(|e| SinkError::permanent(format!("key template: {e}")))?,
        None => origin.topic.to_string(),
    };
    let mut headers = vec![(ID_HEADER.to_string(), super::record_id(origin, record))];
    for h in &settings.headers {
        let value = h
            .value
            .render(&ctx)
            .map_err(|e| SinkError::permanent(format!("headers.{} template: {e}", h.name)))?;
        headers.push((h.name.clone(), value));
    }
    Ok(Prepared {
        topic,
        key,
        headers,
        payload: super::republish::payload(record),
    })
}

pub struct KafkaSink {
    settings: Settings,
    /// The producer; replaced after a fatal error.
    producer: Mutex<Arc<FutureProducer>>,
}

impl KafkaSink {
    /// Makes the producer (it connects in the background: brokers that are down at start
    /// are a transient failure of the first writes, like any other). Refused properties
    /// and unreadable files fail here.
    pub fn open(settings: &Settings) -> Result<KafkaSink, OpenError> {
        Ok(KafkaSink {
            producer: Mutex::new(Arc::new(producer(settings)?)),
            settings: settings.clone(),
        })
    }

    fn producer(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.producer.lock().unwrap())
    }

    /// Hands `records` (with the MQTT topic each came from) to the client, then awaits
    /// every acknowledgment; one outcome per record.
    async fn produce_all(&self, records: Vec<(&str, Prepared)>) -> Vec<Outcome> {
        let producer = self.producer();
        let timeout = self.settings.timeout;
        let mut topics = Vec::with_capacity(records.len());
        let mut acks = Vec::with_capacity(records.len());
        // MQTT topics with a record the client did not take: their later records are not
        // handed over, so that they cannot land before it.
        let mut refused: Vec<&str> = Vec::new();
        for (topic, r) in records {
            topics.push(topic);
            if refused.contains(&topic) {
                acks.push(Either::Right(std::future::ready(Ok(false))));
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (key, value) in &r.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&r.topic)
                .key(r.key.as_bytes())
                .payload(&r.payload)
                .headers(headers);
            match producer.send_result(record) {
                Ok(ack) => {
                    let name = r.topic;
                    acks.push(Either::Left(async move {
                        match ack.await {
                            Ok(Ok(_)) => Ok(true),
                            Ok(Err((e, _))) => Err((name, e)),
                            Err(_) => Err((name, KafkaError::Canceled)),
                        }
                    }));
                }
                Err((e, _)) => {
                    if classify(&r.topic, &e, timeout).kind != super::ErrorKind::Permanent {
                        refused.push(topic);
                    }
                    acks.push(Either::Right(std::future::ready(Err((r.topic, e)))));
                }
            }
        }
        let results = futures::future::join_all(acks).await;
        let renew = results.iter().any(|r| match r {
            Err((_, e)) => e.rdkafka_error_code().is_some_and(needs_new_producer),
            Ok(_) => false,
        }) || producer.client().fatal_error().is_some();
        if renew {
            self.renew(&producer);
        }
        let outcomes: Vec<Outcome> = results
            .into_iter()
            .map(|r| match r {
                Ok(true) => Outcome::Delivered,
                Ok(false) => Outcome::HeldBack,
                Err((topic, e)) => Outcome::Failed(classify(&topic, &e, timeout)),
            })
            .collect();
        super::held_back_after_failures(&topics, outcomes)
    }

    /// Replaces `failed` with a new producer (a new producer id): after a fatal error, or
    /// when the broker fenced the producer's id or epoch, which is what it may answer when
    /// the client bumps its epoch after a record timed out.
    fn renew(&self, failed: &Arc<FutureProducer>) {
        let mut current = self.producer.lock().unwrap();
        if !Arc::ptr_eq(&current, failed) {
            return; // another lane renewed it already
        }
        let fatal = failed.client().fatal_error();
        tracing::warn!(
            fatal = ?fatal.map(|(code, reason)| format!("{code}: {reason}")),
            "kafka: making a new producer (the broker no longer takes the old producer's id)"
        );
        match producer(&self.settings) {
            Ok(p) => *current = Arc::new(p),
            Err(e) => tracing::error!(error = %e, "kafka: cannot make a new producer"),
        }
    }
}

/// Errors after which the idempotent producer's id is of no more use.
fn needs_new_producer(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::ProducerFenced
            | C::InvalidProducerEpoch
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
            | C::InvalidProducerIdMapping
    )
}

/// The producer of `s`: acks=all, idempotent, murmur2 partitioning, TLS and SASL, then
/// the user's properties.
fn producer(s: &Settings) -> Result<FutureProducer, OpenError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", s.brokers.join(","))
        .set("client.id", "mqbridge")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("compression.type", s.compression.name())
        .set("message.timeout.ms", s.timeout.as_millis().to_string())
        .set("linger.ms", "5");
    let protocol = match (s.tls.is_some(), s.sasl.is_some()) {
        (false, false) => "plaintext",
        (true, false) => "ssl",
        (false, true) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    c.set("security.protocol", protocol);
    if let Some(tls) = &s.tls {
        for (property, file) in [
            ("ssl.ca.location", &tls.ca_file),
            ("ssl.certificate.location", &tls.cert_file),
            ("ssl.key.location", &tls.key_file),
        ] {
            if let Some(f) = file {
                c.set(property, f.display().to_string());
            }
        }
    }
    if let Some(sasl) = &s.sasl {
        let password = match &sasl.password {
            Password::Inline(p) => p.0.clone(),
            Password::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|error| OpenError::PasswordFile {
                    path: path.display().to_string(),
                    error,
                })?,
        };
        c.set("sasl.mechanisms", sasl.mechanism.name())
            .set("sasl.username", &sasl.username)
            .set("sasl.password", password);
    }
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    // librdkafka's messages name the property, never a value.
    c.create().map_err(|e| OpenError::Client(e.to_string()))
}

/// A produce error as a sink error (see the module docs).
fn classify(topic: &str, e: &KafkaError, timeout: Duration) -> SinkError {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageTimedOut) => SinkError::transient(format!(
            "kafka: no acknowledgment for topic {topic:?} within {}",
            crate::config::units::Duration(timeout)
        )),
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::UnknownTopic
            | C::UnknownPartition
            | C::UnsupportedForMessageFormat,
        ) => SinkError::permanent(format!("kafka: topic {topic:?}: {e}")),
        _ => SinkError::transient(format!("kafka: topic {topic:?}: {e}")),
    }
}

impl Sink for KafkaSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| prepare(&self.settings, &d.origin, &d.record).map(|r| (&*d.origin.topic, r)),
            move |records| self.produce_all(records),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::sinks::kafka::Config;
    use crate::sink::ErrorKind;

    fn settings(yaml: &str) -> Settings {
        yaml_serde::from_str::<Config>(yaml)
            .unwrap()
            .compile()
            .unwrap()
    }

    #[test]
    fn a_record_renders_to_its_topic_key_headers_and_payload() {
        let s = settings(
            "{brokers: [h:9092], topic: \"t.{{ segments[0] }}\", headers: {X-Rule: \"{{ rule }}\"}}",
        );
        let d = Delivery::detached("s/d1", json!({"v": 1}));
        let r = prepare(&s, &d.origin, &d.record).unwrap();
        assert_eq!(r.topic, "t.s");
        assert_eq!(r.key, "s/d1", "the MQTT topic by default");
        assert_eq!(r.payload, br#"{"v":1}"#);
        assert_eq!(
            r.headers,
            [
                (
                    ID_HEADER.to_string(),
                    super::super::record_id(&d.origin, &d.record)
                ),
                ("X-Rule".to_string(), "detached".to_string())
            ]
        );
        let keyed = settings("{brokers: [h:9092], topic: t, key: \"{{ record.v }}\"}");
        assert_eq!(prepare(&keyed, &d.origin, &d.record).unwrap().key, "1");
        let shown = would(&s, &d.origin, &d.record);
        assert!(
            shown.contains("\"t.s\"")
                && shown.contains("key \"s/d1\"")
                && shown.contains("X-Rule: detached"),
            "{shown}"
        );
    }

    #[test]
    fn a_topic_kafka_refuses_fails_the_record() {
        let s = settings("{brokers: [h:9092], topic: \"{{ record.to }}\"}");
        for to in ["a/b", "", "..", "a b"] {
            let d = Delivery::detached("s", json!({"to": to}));
            let e = prepare(&s, &d.origin, &d.record).err().unwrap();
            assert_eq!(e.kind, ErrorKind::Permanent, "{to}: {e}");
        }
    }

    #[test]
    fn errors_are_classified() {
        let t = Duration::from_secs(1);
        let kind = |code| classify("t", &KafkaError::MessageProduction(code), t).kind;
        assert_eq!(
            kind(RDKafkaErrorCode::MessageSizeTooLarge),
            ErrorKind::Permanent
        );
        assert_eq!(kind(RDKafkaErrorCode::UnknownTopic), ErrorKind::Permanent);
        assert_ne!(
            kind(RDKafkaErrorCode::MessageTimedOut),
            ErrorKind::Permanent
        );
        assert_ne!(kind(RDKafkaErrorCode::QueueFull), ErrorKind::Permanent);
        assert_ne!(kind(RDKafkaErrorCode::AllBrokersDown), ErrorKind::Permanent);
        assert_ne!(
            classify("t", &KafkaError::Canceled, t).kind,
            ErrorKind::Permanent
        );
    }

    #[test]
    fn a_property_librdkafka_does_not_know_fails_the_open() {
        let s = settings("{brokers: [h:9092], topic: t, properties: {no.such.property: 1}}");
        let e = KafkaSink::open(&s).err().expect("refused");
        assert!(e.to_string().contains("no.such.property"), "{e}");
    }
}
