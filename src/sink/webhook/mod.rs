//! `webhook` sink: sends records to an HTTP endpoint, one request per record or (with
//! `batch_body: true`) one request per batch whose body is a JSON array of the records.
//!
//! - **Requests**: method, URL, headers and body are templates rendered against the
//!   record's context ([`Origin::template_context`]); the default body is the record as
//!   JSON. Every request carries `Content-Type: application/json` and
//!   `Idempotency-Key` (both can be overridden by `headers`). The key is the message id,
//!   which stays the same when the broker redelivers the message, so a receiver can drop
//!   duplicates. With `batch_body` the key is the id when every record of the batch comes
//!   from one message, otherwise `<first id>-<hash of all ids>`: the same for a retry of
//!   the same batch, different for any other grouping.
//! - **Signature**: with `hmac:`, the header (default `X-Signature`) is
//!   `sha256=<hex HMAC-SHA256 of the exact body bytes>`, keyed by an environment variable
//!   read when the sink opens.
//! - **Outcome**: 2xx is delivered. 408, 429, 5xx, connection errors, resets and timeouts
//!   are transient (retried by the driver; `Retry-After` on 429/503 is honoured up to
//!   `retry.max_delay`); any other status (4xx, and 3xx: redirects are not followed) is
//!   permanent, so the record goes to the dead letter with the status and the start of
//!   the response body.
//! - **One request per record**: records of one topic are sent one after the other, in
//!   order, different topics in parallel. Each record gets its own outcome: a transient
//!   failure holds back the rest of its topic (sent with it in the driver's next round),
//!   a permanent one dead-letters that record alone. So a retry resends only what failed,
//!   and a bad record costs one request.
//! - **One request per batch** (`batch_body`): the request's outcome is every record's.
//!   A record whose body cannot be rendered is dead-lettered alone; the rest are sent.
//! - The scheme, host and port of the URL must be written literally in the config, so a
//!   message can never direct mqbridge to another host. Secrets (the HMAC key, header
//!   values, the URL's query) never appear in logs or errors.
//!
//! Here the sink and its two ways of writing; `request` renders and signs a request,
//! [`super::http`] sends it and classifies what came back.

mod request;

use std::collections::HashMap;
use std::fmt::Write as _;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::http::{Request, Sender};
use super::{Delivery, ErrorKind, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::webhook::{Method, Settings};
use crate::record::Record;
use request::Requests;

/// Requests in flight at once for one batch (records of different topics).
const MAX_PARALLEL: usize = 16;

/// What writing `record` would do, for `mqbridge try`.
pub fn would(cfg: &Settings, origin: &Origin, record: &Record) -> String {
    let requests = Requests::new(cfg);
    let ctx = origin.template_context(record);
    let url = match requests.url(&ctx) {
        Ok(u) => u,
        Err(e) => return e.message,
    };
    if let Err(e) = requests.headers(&ctx, origin.id()) {
        return e.message;
    }
    let body = match &cfg.body {
        Some(t) => match t.render(&ctx) {
            Ok(b) => format!("body {b:?}"),
            Err(e) => return format!("body template fails: {e}"),
        },
        None if cfg.method == Method::Get => "no body".into(),
        None if cfg.batch_body => {
            "body: this record in a JSON array with the rest of its batch".into()
        }
        None => "body: the record as JSON".into(),
    };
    let mut out = format!(
        "{} {url} ({}), {body}, Idempotency-Key {}",
        cfg.method,
        if cfg.batch_body {
            "batch body: one request per batch"
        } else {
            "one request per record"
        },
        origin.id(),
    );
    if cfg.batch_body {
        out.push_str(" (when the batch holds only this message)");
    }
    if !cfg.headers.is_empty() {
        let names: Vec<&str> = cfg.headers.iter().map(|h| h.name.as_str()).collect();
        let _ = write!(out, ", headers {}", names.join(", "));
    }
    if let Some(h) = &cfg.hmac {
        let _ = write!(out, ", HMAC in {}", h.header);
    }
    out
}

/// Why the webhook sink could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `hmac.secret_env` names a variable that is not set (or is empty).
    #[error("hmac.secret_env: environment variable {0} is not set or empty")]
    NoSecret(String),
    #[error("cannot build the HTTP client: {}", crate::http_client::error_chain(.0))]
    Client(reqwest::Error),
}

pub struct WebhookSink {
    requests: Requests,
    sender: Sender,
    batch_body: bool,
}

impl WebhookSink {
    /// Builds the sink; `env` looks up the HMAC key's variable.
    pub fn new(cfg: &Settings, env: impl Fn(&str) -> Option<String>) -> Result<Self, OpenError> {
        let mut requests = Requests::new(cfg);
        if let Some(hmac) = &cfg.hmac {
            requests = requests.signed(hmac, env)?;
        }
        Ok(WebhookSink {
            requests,
            sender: Sender::new(cfg.method.http(), cfg.timeout, cfg.common.retry.max_delay.0)
                .map_err(OpenError::Client)?,
            batch_body: cfg.batch_body,
        })
    }

    /// Sends the requests of one topic in order. After a transient failure the rest of
    /// the topic is held back (not sent), so that the topic stays in order; a permanent
    /// failure concerns that record alone. Returns (index, outcome) of those it sent.
    async fn send_in_order(
        &self,
        requests: &[Request],
        topic: Vec<usize>,
    ) -> Vec<(usize, Outcome)> {
        let mut out = Vec::with_capacity(topic.len());
        for i in topic {
            match self
                .sender
                .send(&requests[i])
                .await
                .map_err(SinkError::from)
            {
                Ok(()) => out.push((i, Outcome::Delivered)),
                Err(e) if e.kind == ErrorKind::Permanent => out.push((i, Outcome::Failed(e))),
                Err(e) => {
                    out.push((i, Outcome::Failed(e)));
                    break;
                }
            }
        }
        out
    }

    /// One request per record: the topics in parallel, each in order.
    async fn write_each<'a>(&'a self, batch: &'a [Delivery]) -> Vec<Outcome> {
        let prepare = |d: &'a Delivery| self.requests.prepare(d).map(|r| (&*d.origin.topic, r));
        super::prepared(batch, prepare, move |prepared| async move {
            let mut topics: Vec<Vec<usize>> = Vec::new();
            let mut by_topic: HashMap<&str, usize> = HashMap::new();
            for (i, (topic, _)) in prepared.iter().enumerate() {
                let t = *by_topic.entry(topic).or_insert_with(|| {
                    topics.push(Vec::new());
                    topics.len() - 1
                });
                topics[t].push(i);
            }
            drop(by_topic);
            let requests: Vec<Request> = prepared.into_iter().map(|(_, r)| r).collect();
            let mut out = vec![Outcome::HeldBack; requests.len()];
            let sent: Vec<Vec<(usize, Outcome)>> = futures::stream::iter(topics)
                .map(|t| self.send_in_order(&requests, t))
                .buffer_unordered(MAX_PARALLEL)
                .collect()
                .await;
            for (i, o) in sent.into_iter().flatten() {
                out[i] = o;
            }
            out
        })
        .await
    }

    /// One request for the whole batch (`batch_body: true`): all delivered or all failed.
    async fn write_batch(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let prepare = |d| self.requests.batch_item(d).map(|item| (d, item));
        super::prepared(batch, prepare, move |items| async move {
            let sent = match self.requests.batch_request(&items) {
                Ok(request) => self.sender.send(&request).await.map_err(SinkError::from),
                Err(e) => Err(e),
            };
            super::all(items.len(), sent)
        })
        .await
    }
}

impl Sink for WebhookSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        if self.batch_body {
            Box::pin(self.write_batch(batch))
        } else {
            Box::pin(self.write_each(batch))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;

    /// The settings of a webhook written as YAML.
    pub(super) fn config(yaml: &str) -> Settings {
        let cfg: crate::config::sinks::webhook::Config = yaml_serde::from_str(yaml).unwrap();
        cfg.compile().unwrap()
    }

    pub(super) fn origin(id: &str, topic: &str) -> Arc<Origin> {
        Arc::new(Origin {
            id: id.to_string().into(),
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            retain: false,
            vars: crate::topic::Vars::new(&[("device", "d1")]),
            received_at: jiff::Timestamp::UNIX_EPOCH,
            rule: Arc::from("r"),
            source: Arc::from("broker"),
        })
    }

    pub(super) fn delivery(o: &Arc<Origin>, record: serde_json::Value) -> Delivery {
        Delivery {
            record: record.into(),
            origin: Arc::clone(o),
            ack: crate::delivery::Ack::detached(),
        }
    }

    #[test]
    fn would_shows_method_url_and_mode() {
        let cfg = config("url: \"http://h/d/{{ vars.device }}\"\nheaders: { Authorization: x }\n");
        let o = origin("abc", "sensors/d1");
        let w = would(&cfg, &o, &json!({"t": 1}).into());
        assert!(
            w.starts_with("POST http://h/d/d1 (one request per record)"),
            "{w}"
        );
        assert!(
            w.contains("Idempotency-Key abc") && w.contains("headers Authorization"),
            "{w}"
        );
        let cfg = config("url: \"http://h/{{ record.nope }}\"\n");
        assert!(would(&cfg, &o, &json!({}).into()).starts_with("url template"));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_transient_and_the_query_stays_out_of_errors() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = config(&format!(
            "url: \"http://127.0.0.1:{port}/x?token=s3cr3t\"\ntimeout: 2s\n"
        ));
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let o = origin("a", "t");
        let outcomes = sink.write(&[delivery(&o, json!({}))]).await;
        let [Outcome::Failed(err)] = &outcomes[..] else {
            panic!("{outcomes:?}")
        };
        assert_eq!(err.kind, ErrorKind::Transient);
        assert!(
            err.message
                .starts_with(&format!("POST http://127.0.0.1:{port}/x?…: ")),
            "{}",
            err.message
        );
        assert!(!err.message.contains("s3cr3t"), "{}", err.message);
    }
}
