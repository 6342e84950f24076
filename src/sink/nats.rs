//! The `nats` sink: each record published to NATS, delivered once a JetStream stream has
//! acknowledged it (its PubAck).
//!
//! **A batch is pipelined**: every record is sent, then every acknowledgment awaited, so a
//! batch costs one round trip, not one per record. NATS keeps the order of the messages
//! of one connection, and a stream stores them in the order it receives them.
//!
//! **Duplicates**: each message carries a `Nats-Msg-Id` header ([`msg_id`]), the same
//! whenever the record is made again from the same message (a broker's redelivery, the
//! spool after a crash, a dead letter's replay), so the stream drops a copy that arrives
//! within its duplicate window (2 minutes by default) and acknowledges it as a duplicate,
//! which counts as delivered.
//!
//! **Outcomes**, per record:
//! - the stream's PubAck: delivered;
//! - no stream captures the subject (the server answers "no responders"): permanent, so
//!   the record goes to the dead letter and the others go on; once a stream is created,
//!   `mqbridge replay` sends the dead letters again;
//! - a JetStream error reply: transient when it is the server's (code 5xx, e.g. the stream
//!   is full or JetStream is unavailable) or 408/429, else permanent (the request itself is
//!   wrong, e.g. a `Nats-Expected-*` header that does not hold);
//! - no acknowledgment within `timeout`, a lost connection: transient, and the records of
//!   that topic after it in the batch are held back, even when acknowledged (they are sent
//!   again, in order, and the stream drops the copies), so the topic stays in order;
//! - a subject or header that cannot be rendered, or a message over the server's size
//!   limit: permanent.
//!
//! The client (async-nats) reconnects by itself; a connection is made on the first
//! write, and again after one could not be made.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::nats::{Auth, MSG_ID, Settings, validate_subject};
use crate::record::Record;

/// What writing `record` would do, for `mqbridge try`.
pub fn would(settings: &Settings, origin: &Origin, record: &Record) -> String {
    match message(settings, origin, record) {
        Ok(m) => {
            let mut headers: Vec<String> = m
                .headers
                .iter()
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |v| format!("{name}: {}", v.as_str()))
                })
                .collect();
            headers.sort();
            format!(
                "publish to subject {:?} with headers {{{}}} at {}, delivered once a stream acknowledges it",
                m.subject,
                headers.join(", "),
                settings.server
            )
        }
        Err(e) => format!("fails: {e}"),
    }
}

/// One record, ready to publish.
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// Renders the subject, the headers and the payload of `record`.
fn message(settings: &Settings, origin: &Origin, record: &Record) -> Result<Message, SinkError> {
    let ctx = origin.template_context(record);
    let subject = settings
        .subject
        .render(&ctx)
        .map_err(|e| SinkError::permanent(format!("subject template: {e}")))?;
    validate_subject(&subject)
        .map_err(|e| SinkError::permanent(format!("subject {subject:?}: {e}")))?;
    // A system subject ($JS, $KV, $SYS...) only when the config wrote it, never because a
    // message's topic or payload made it.
    if subject.starts_with('$') && !settings.subject.source().starts_with('$') {
        return Err(SinkError::permanent(format!(
            "subject {subject:?}: only the configured subject may start with '$'"
        )));
    }
    let mut headers = HeaderMap::new();
    if !settings.own_msg_id {
        headers.insert(MSG_ID, super::record_id(origin, record).as_str());
    }
    for h in &settings.headers {
        let text = h
            .value
            .render(&ctx)
            .map_err(|e| SinkError::permanent(format!("headers.{} template: {e}", h.name)))?;
        // The value may be a secret: say what is wrong, never what it is.
        let value: HeaderValue = text.parse().map_err(|_| {
            SinkError::permanent(format!(
                "headers.{}: rendered value is not a valid header value (line break)",
                h.name
            ))
        })?;
        headers.insert(h.name.as_str(), value);
    }
    Ok(Message {
        subject,
        headers,
        payload: Bytes::from(super::republish::payload(record)),
    })
}

pub struct NatsSink {
    settings: Settings,
    /// The JetStream context of the connection, made on the first write.
    context: Mutex<Option<jetstream::Context>>,
}

impl NatsSink {
    /// The sink; it connects on its first write (a server that is down at start is a
    /// transient failure, like any other).
    pub fn new(settings: &Settings) -> NatsSink {
        NatsSink {
            settings: settings.clone(),
            context: Mutex::new(None),
        }
    }

    /// The JetStream context, connecting first if there is none.
    async fn context(&self) -> Result<jetstream::Context, SinkError> {
        let mut guard = self.context.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let s = &self.settings;
        let client = options(s)
            .map_err(SinkError::transient)?
            .connect(s.server.as_str())
            .await
            .map_err(|e| {
                SinkError::transient(format!("nats: cannot connect to {}: {e}", s.server))
            })?;
        // Every record of the lanes' batches may wait for its ack at once.
        let inflight = s.common.batch.max_rows.max(1) * s.common.concurrency.max(1);
        let context = jetstream::ContextBuilder::new()
            .timeout(s.timeout)
            .max_ack_inflight(inflight)
            .build(client);
        *guard = Some(context.clone());
        Ok(context)
    }

    /// Publishes `messages` (with the topic each record came from), then awaits every
    /// acknowledgment; one outcome per message.
    async fn publish_all(&self, messages: Vec<(&str, Message)>) -> Vec<Outcome> {
        let context = match self.context().await {
            Ok(c) => c,
            Err(e) => return vec![Outcome::Failed(e); messages.len()],
        };
        let mut topics = Vec::with_capacity(messages.len());
        let mut acks = Vec::with_capacity(messages.len());
        for (topic, m) in messages {
            topics.push(topic);
            let publish = jetstream::message::PublishMessage::build()
                .payload(m.payload)
                .headers(m.headers);
            acks.push(
                match context.send_publish(m.subject.clone(), publish).await {
                    Ok(ack) => futures::future::Either::Left(async move {
                        ack.await.map(|_| ()).map_err(|e| (m.subject, e))
                    }),
                    Err(e) => {
                        futures::future::Either::Right(std::future::ready(Err((m.subject, e))))
                    }
                },
            );
        }
        let results = futures::future::join_all(acks).await;
        let timeout = self.settings.timeout;
        super::held_back_after_failures(
            &topics,
            results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Outcome::Delivered,
                    Err((subject, e)) => Outcome::Failed(classify(&subject, &e, timeout)),
                })
                .collect(),
        )
    }
}

/// The client's options: credentials (read from their files now), TLS, timeouts.
fn options(s: &Settings) -> Result<async_nats::ConnectOptions, String> {
    let read = |path: &std::path::Path, field: &str| {
        std::fs::read_to_string(path)
            .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| format!("nats: {field} {}: {e}", path.display()))
    };
    let mut o = async_nats::ConnectOptions::new()
        .name("mqbridge")
        .connection_timeout(s.timeout)
        .require_tls(s.tls);
    o = match &s.auth {
        Auth::None => o,
        Auth::User { username, password } => {
            o.user_and_password(username.clone(), password.0.clone())
        }
        Auth::UserFile { username, path } => {
            o.user_and_password(username.clone(), read(path, "password_file")?)
        }
        Auth::Token(t) => o.token(t.0.clone()),
        Auth::TokenFile(path) => o.token(read(path, "token_file")?),
    };
    if let Some(ca) = &s.ca_file {
        // The client reads the file when it connects; say which file is missing here.
        std::fs::metadata(ca).map_err(|e| format!("nats: ca_file {}: {e}", ca.display()))?;
        o = o.add_root_certificates(ca.clone());
    }
    Ok(o)
}

/// A publish error as a sink error (see the module docs).
fn classify(subject: &str, e: &jetstream::context::PublishError, timeout: Duration) -> SinkError {
    let jetstream_error =
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    match (e.kind(), jetstream_error) {
        (PublishErrorKind::StreamNotFound, _) => SinkError::permanent(format!(
            "nats: no stream captures subject {subject:?} (no responders): create one, then replay the dead letters"
        )),
        (PublishErrorKind::TimedOut, _) => SinkError::transient(format!(
            "nats: no acknowledgment for {subject:?} within {}",
            crate::config::units::Duration(timeout)
        )),
        (PublishErrorKind::MaxPayloadExceeded, _) => {
            SinkError::permanent(format!("nats: {subject:?}: {e}"))
        }
        (_, Some(js)) if js.code() >= 500 || js.code() == 408 || js.code() == 429 => {
            SinkError::transient(format!("nats: {subject:?}: the stream refused it: {js}"))
        }
        (_, Some(js)) => {
            SinkError::permanent(format!("nats: {subject:?}: the stream refused it: {js}"))
        }
        (PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence, None) => {
            SinkError::permanent(format!("nats: {subject:?}: {e}"))
        }
        // The connection: lost, closed, or too many acks pending.
        (_, None) => SinkError::transient(format!("nats: {subject:?}: {e}")),
    }
}

impl Sink for NatsSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| message(&self.settings, &d.origin, &d.record).map(|m| (&*d.origin.topic, m)),
            move |messages| self.publish_all(messages),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::sinks::nats::Config;
    use crate::sink::ErrorKind;

    fn settings(yaml: &str) -> Settings {
        yaml_serde::from_str::<Config>(yaml)
            .unwrap()
            .compile()
            .unwrap()
    }

    #[test]
    fn a_record_renders_to_its_subject_headers_and_payload() {
        let s = settings(
            "{url: nats://h, subject: \"t.{{ segments[1] }}\", headers: {X-Rule: \"{{ rule }}\"}}",
        );
        let d = Delivery::detached("s/d1", json!({"v": 1}));
        let m = message(&s, &d.origin, &d.record).unwrap();
        assert_eq!(m.subject, "t.d1");
        assert_eq!(&m.payload[..], br#"{"v":1}"#);
        assert_eq!(m.headers.get("X-Rule").unwrap().as_str(), "detached");
        let id = m.headers.get(MSG_ID).unwrap().as_str().to_string();
        assert!(id.starts_with(&format!("{}-", d.origin.id())), "{id}");
        assert_eq!(
            id,
            crate::sink::record_id(&d.origin, &d.record),
            "deterministic"
        );
        let text = Delivery::detached("s/d1", json!("plain"));
        assert_eq!(
            &message(&s, &text.origin, &text.record).unwrap().payload[..],
            b"plain"
        );
        let shown = would(&s, &d.origin, &d.record);
        assert!(
            shown.contains("\"t.d1\"") && shown.contains("X-Rule: detached"),
            "{shown}"
        );
    }

    #[test]
    fn a_subject_a_message_cannot_be_published_to_fails_the_record() {
        let s = settings("{url: nats://h, subject: \"{{ record.to }}\"}");
        for to in ["a.*", "a..b", "", "$JS.API.STREAM.DELETE.x"] {
            let d = Delivery::detached("s", json!({"to": to}));
            let e = message(&s, &d.origin, &d.record).err().unwrap();
            assert_eq!(e.kind, ErrorKind::Permanent, "{to}: {e}");
        }
        let own = settings("{url: nats://h, subject: \"$KV.b.{{ record.to }}\"}");
        let d = Delivery::detached("s", json!({"to": "k"}));
        assert_eq!(
            message(&own, &d.origin, &d.record).unwrap().subject,
            "$KV.b.k"
        );
        let bad = settings("{url: nats://h, subject: s, headers: {X: \"{{ record.v }}\"}}");
        let d = Delivery::detached("s", json!({"v": "a\r\nb"}));
        assert!(message(&bad, &d.origin, &d.record).is_err());
    }
}
