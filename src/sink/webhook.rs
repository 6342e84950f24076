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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};

use super::{Delivery, ErrorKind, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::webhook::{Config, IDEMPOTENCY_KEY, Method};
use crate::config::units;
use crate::rule::template::Template;

/// Requests in flight at once for one batch (records of different topics).
const MAX_PARALLEL: usize = 16;
/// Characters of a response body quoted in an error.
const EXCERPT_CHARS: usize = 200;
/// Bytes of a response body read at most (the rest is dropped with the connection).
const READ_LIMIT: usize = 64 * 1024;

/// What writing `record` would do, for `mqbridge try`.
pub fn would(cfg: &Config, origin: &Origin, record: &serde_json::Value) -> String {
    let requests = match Requests::compile(cfg) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let ctx = origin.template_context(record);
    let url = match requests.url(&ctx) {
        Ok(u) => u,
        Err(e) => return e.message,
    };
    if let Err(e) = requests.headers(&ctx, &origin.id) {
        return e.message;
    }
    let body = match &requests.body {
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
        origin.id,
    );
    if cfg.batch_body {
        out.push_str(" (when the batch holds only this message)");
    }
    if !cfg.headers.0.is_empty() {
        let names: Vec<&str> = cfg.headers.0.keys().map(String::as_str).collect();
        let _ = write!(out, ", headers {}", names.join(", "));
    }
    if let Some(h) = &cfg.hmac {
        let _ = write!(out, ", HMAC in {}", h.header);
    }
    out
}

fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    let mut s = u.to_string();
    if query {
        s.push_str("?…");
    }
    s
}

/// The config's templates, compiled.
struct Requests {
    method: Method,
    url: Template,
    /// (name as configured, header name, value template).
    headers: Vec<(String, HeaderName, Template)>,
    body: Option<Template>,
    /// Whether `headers` sets these (else mqbridge does).
    own_content_type: bool,
    own_key: bool,
}

impl Requests {
    fn compile(cfg: &Config) -> Result<Requests, String> {
        let url = Template::compile(&cfg.url).map_err(|e| format!("url template: {e}"))?;
        let mut headers = Vec::new();
        for (name, value) in &cfg.headers.0 {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers.{name}: invalid header name"))?;
            let t =
                Template::compile(value).map_err(|e| format!("headers.{name} template: {e}"))?;
            headers.push((name.clone(), n, t));
        }
        let body = cfg
            .body
            .as_deref()
            .map(Template::compile)
            .transpose()
            .map_err(|e| format!("body template: {e}"))?;
        Ok(Requests {
            method: cfg.method,
            own_content_type: headers.iter().any(|(_, n, _)| n == header::CONTENT_TYPE),
            own_key: headers
                .iter()
                .any(|(_, n, _)| n.as_str() == IDEMPOTENCY_KEY),
            url,
            headers,
            body,
        })
    }

    fn url(&self, ctx: &serde_json::Value) -> Result<Url, SinkError> {
        let text = self
            .url
            .render(ctx)
            .map_err(|e| SinkError::permanent(format!("url template: {e}")))?;
        let url = Url::parse(&text)
            .map_err(|e| SinkError::permanent(format!("rendered url is invalid: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SinkError::permanent("rendered url is not http(s)"));
        }
        Ok(url)
    }

    /// Content-Type, Idempotency-Key and the configured headers (not the signature).
    fn headers(&self, ctx: &serde_json::Value, key: &str) -> Result<HeaderMap, SinkError> {
        let mut map = HeaderMap::new();
        if !self.own_content_type {
            map.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if !self.own_key {
            let v = HeaderValue::from_str(key)
                .map_err(|_| SinkError::permanent("Idempotency-Key is not a valid header value"))?;
            map.insert(HeaderName::from_static(IDEMPOTENCY_KEY), v);
        }
        for (name, header, t) in &self.headers {
            let text = t
                .render(ctx)
                .map_err(|e| SinkError::permanent(format!("headers.{name} template: {e}")))?;
            // The value may be a secret: say what is wrong, never what it is.
            let v = HeaderValue::from_str(&text).map_err(|_| {
                SinkError::permanent(format!(
                    "headers.{name}: rendered value is not a valid header value (line break or control character)"
                ))
            })?;
            map.insert(header.clone(), v);
        }
        Ok(map)
    }

    /// The body of one record's request.
    fn body(
        &self,
        ctx: &serde_json::Value,
        record: &serde_json::Value,
    ) -> Result<Option<Bytes>, SinkError> {
        match &self.body {
            Some(t) => t
                .render(ctx)
                .map(|s| Some(Bytes::from(s)))
                .map_err(|e| SinkError::permanent(format!("body template: {e}"))),
            None if self.method == Method::Get => Ok(None),
            None => serde_json::to_vec(record)
                .map(|v| Some(Bytes::from(v)))
                .map_err(|e| SinkError::permanent(format!("cannot serialize record: {e}"))),
        }
    }
}

/// One request, rendered.
struct Request {
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

pub struct WebhookSink {
    client: reqwest::Client,
    requests: Requests,
    batch_body: bool,
    timeout: Duration,
    /// Longest Retry-After honoured (the retry policy's `max_delay`).
    max_retry_after: Duration,
    /// Header name and a keyed MAC, cloned per request (the key itself is not kept).
    signer: Option<(HeaderName, Hmac<Sha256>)>,
}

impl WebhookSink {
    /// Builds the sink; `env` looks up the HMAC key's variable.
    pub fn new(cfg: &Config, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let requests = Requests::compile(cfg).map_err(anyhow::Error::msg)?;
        let signer = match &cfg.hmac {
            None => None,
            Some(h) => {
                let secret = env(&h.secret_env)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "hmac.secret_env: environment variable {} is not set or empty",
                            h.secret_env
                        )
                    })?;
                let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                    .map_err(|_| anyhow::anyhow!("hmac: invalid key"))?;
                let name = HeaderName::from_bytes(h.header.as_bytes())
                    .map_err(|_| anyhow::anyhow!("hmac.header: invalid header name"))?;
                Some((name, mac))
            }
        };
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mqbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {}", error_chain(&e)))?;
        Ok(WebhookSink {
            client,
            requests,
            batch_body: cfg.batch_body,
            timeout: cfg.timeout.0,
            max_retry_after: cfg.retry.max_delay.0,
            signer,
        })
    }

    fn sign(&self, headers: &mut HeaderMap, body: &[u8]) {
        if let Some((name, mac)) = &self.signer {
            let value = signature(mac.clone(), body);
            headers.insert(
                name.clone(),
                HeaderValue::from_str(&value).expect("hex is a valid header value"),
            );
        }
    }

    /// The request for one record.
    fn prepare(&self, d: &Delivery) -> Result<Request, SinkError> {
        let ctx = d.origin.template_context(&d.record);
        let url = self.requests.url(&ctx)?;
        let mut headers = self.requests.headers(&ctx, &d.origin.id)?;
        let body = self.requests.body(&ctx, &d.record)?;
        self.sign(&mut headers, body.as_deref().unwrap_or_default());
        Ok(Request { url, headers, body })
    }

    /// One record's element of a batch body (`batch_body: true`): the record, or the
    /// `body` template's rendering, which must be JSON.
    fn batch_item(&self, d: &Delivery) -> Result<serde_json::Value, SinkError> {
        if self.requests.body.is_none() {
            return Ok(d.record.clone());
        }
        let ctx = d.origin.template_context(&d.record);
        let text = self.requests.body(&ctx, &d.record)?.unwrap_or_default();
        serde_json::from_slice(&text).map_err(|e| {
            SinkError::permanent(format!(
                "body template: with batch_body it must render JSON: {e}"
            ))
        })
    }

    /// The one request for a batch's elements (`batch_body: true`); URL and headers are
    /// rendered from the first record.
    fn batch_request(
        &self,
        items: &[(&Delivery, serde_json::Value)],
    ) -> Result<Request, SinkError> {
        let (first, _) = items.first().expect("batches are never empty");
        let ctx = first.origin.template_context(&first.record);
        let url = self.requests.url(&ctx)?;
        let key = batch_key(items.iter().map(|(d, _)| d.origin.id.as_str()));
        let mut headers = self.requests.headers(&ctx, &key)?;
        let body = serde_json::to_vec(&items.iter().map(|(_, v)| v).collect::<Vec<_>>())
            .map_err(|e| SinkError::permanent(format!("cannot serialize records: {e}")))?;
        self.sign(&mut headers, &body);
        Ok(Request {
            url,
            headers,
            body: Some(Bytes::from(body)),
        })
    }

    /// Sends one request and classifies the outcome.
    async fn send(&self, r: &Request) -> Result<(), SinkError> {
        let method = self.requests.method;
        let mut req = self
            .client
            .request(method.http(), r.url.clone())
            .headers(r.headers.clone());
        if let Some(body) = &r.body {
            req = req.body(body.clone());
        }
        let what = || format!("{method} {}", redact(&r.url));
        let mut resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let e = e.without_url();
                let message = if e.is_timeout() {
                    format!(
                        "{}: no response within {}",
                        what(),
                        units::Duration(self.timeout)
                    )
                } else {
                    format!("{}: {}", what(), error_chain(&e))
                };
                return Err(if e.is_builder() {
                    SinkError::permanent(message)
                } else {
                    SinkError::transient(message)
                });
            }
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Read (a bounded part of) the body: lets the connection be reused, and a failure
        // quotes it. Delivery is decided by the status alone.
        let mut body = Vec::new();
        while body.len() < READ_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let Some(kind) = status_kind(status) else {
            return Ok(());
        };
        let mut message = format!("HTTP {status} from {}", what());
        let excerpt = excerpt(&body);
        if !excerpt.is_empty() {
            let _ = write!(message, ": {excerpt}");
        }
        let retry_after = (matches!(status.as_u16(), 429 | 503))
            .then(|| {
                retry_after
                    .as_deref()
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            })
            .flatten()
            .map(|d| d.min(self.max_retry_after));
        Err(SinkError {
            kind,
            message,
            retry_after,
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
            match self.send(&requests[i]).await {
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
    async fn write_each(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let prepare = |d: &Delivery| self.prepare(d).map(|r| (d.origin.topic.clone(), r));
        super::prepared(batch, prepare, move |prepared| async move {
            let mut topics: Vec<Vec<usize>> = Vec::new();
            let mut by_topic: HashMap<&str, usize> = HashMap::new();
            for (i, (topic, _)) in prepared.iter().enumerate() {
                let t = *by_topic.entry(topic.as_str()).or_insert_with(|| {
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
        let prepare = |d| self.batch_item(d).map(|item| (d, item));
        super::prepared(batch, prepare, move |items| async move {
            let sent = match self.batch_request(&items) {
                Ok(request) => self.send(&request).await,
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

/// The Idempotency-Key of a batch request: the message id when all records come from one
/// message, else the first id and a hash of all of them.
fn batch_key<'a>(ids: impl Iterator<Item = &'a str> + Clone) -> String {
    let first = ids.clone().next().unwrap_or_default();
    if ids.clone().all(|id| id == first) {
        return first.to_string();
    }
    let mut h = Sha256::new();
    for (i, id) in ids.enumerate() {
        if i > 0 {
            h.update(b",");
        }
        h.update(id.as_bytes());
    }
    format!("{first}-{}", hex::encode(&h.finalize()[..8]))
}

/// `sha256=<hex>` of HMAC-SHA256 over `body`.
fn signature(mut mac: Hmac<Sha256>, body: &[u8]) -> String {
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// None when the status means delivered (2xx), else whether retrying can help.
fn status_kind(status: StatusCode) -> Option<ErrorKind> {
    match status.as_u16() {
        200..=299 => None,
        408 | 429 | 500..=599 => Some(ErrorKind::Transient),
        _ => Some(ErrorKind::Permanent),
    }
}

/// `Retry-After`: delay-seconds or an HTTP date (any of the three formats of RFC 9110);
/// a date in the past means now.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The start of a response body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// An error and its causes, e.g. `error sending request: client error (Connect): tcp
/// connect error: Connection refused (os error 111)`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use serde_json::json;

    fn config(yaml: &str) -> Config {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn origin(id: &str, topic: &str) -> Arc<Origin> {
        Arc::new(Origin {
            id: id.into(),
            topic: topic.into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            retain: false,
            vars: vec![("device".into(), "d1".into())],
            received_at: jiff::Timestamp::UNIX_EPOCH,
            rule: Arc::from("r"),
            source: Arc::from("broker"),
        })
    }

    fn delivery(o: &Arc<Origin>, record: serde_json::Value) -> Delivery {
        Delivery {
            record,
            origin: Arc::clone(o),
            ack: crate::delivery::Ack::detached(),
        }
    }

    #[test]
    fn statuses_are_classified() {
        let kind = |s: u16| status_kind(StatusCode::from_u16(s).unwrap());
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(kind(s), None, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(kind(s), Some(ErrorKind::Transient), "{s}");
        }
        for s in [301, 302, 304, 307, 400, 401, 403, 404, 409, 410, 413, 422] {
            assert_eq!(kind(s), Some(ErrorKind::Permanent), "{s}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // IMF-fixdate, RFC 850 and asctime forms of 08:50:07, 30 s later.
        for date in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, now),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        // RFC 4231, test case 2.
        let mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        assert_eq!(
            signature(mac, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn requests_are_rendered_and_signed_over_the_exact_body() {
        let cfg = config(
            r#"
url: "http://127.0.0.1:9/devices/{{ vars.device }}?seq={{ record.seq }}"
headers: { Authorization: "Bearer t0k", X-Topic: "{{ topic }}" }
hmac: { secret_env: HOOK_SECRET }
"#,
        );
        let sink = WebhookSink::new(&cfg, |n| (n == "HOOK_SECRET").then(|| "Jefe".into())).unwrap();
        let o = origin("abc", "sensors/d1");
        let r = sink.prepare(&delivery(&o, json!({"seq": 7}))).unwrap();
        assert_eq!(r.url.as_str(), "http://127.0.0.1:9/devices/d1?seq=7");
        assert_eq!(r.body.as_deref(), Some(&br#"{"seq":7}"#[..]));
        assert_eq!(r.headers["idempotency-key"], "abc");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["authorization"], "Bearer t0k");
        assert_eq!(r.headers["x-topic"], "sensors/d1");
        let want = signature(Hmac::new_from_slice(b"Jefe").unwrap(), br#"{"seq":7}"#);
        assert_eq!(r.headers["x-signature"], want.as_str());
    }

    #[test]
    fn a_header_overrides_content_type_and_key() {
        let cfg = config(
            r#"
url: "http://h/x"
headers: { content-type: text/plain, Idempotency-Key: "{{ id }}-{{ record.n }}" }
body: "n={{ record.n }}"
"#,
        );
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let o = origin("abc", "t");
        let r = sink.prepare(&delivery(&o, json!({"n": 2}))).unwrap();
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.headers["idempotency-key"], "abc-2");
        assert_eq!(r.headers.get_all("content-type").iter().count(), 1);
        assert_eq!(r.body.as_deref(), Some(&b"n=2"[..]));
    }

    #[test]
    fn render_errors_are_permanent_and_keep_header_values_secret() {
        let cfg = config(
            r#"
url: "http://h/{{ record.missing }}"
"#,
        );
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let o = origin("abc", "t");
        let err = sink.prepare(&delivery(&o, json!({}))).err().unwrap();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert!(err.message.starts_with("url template"), "{}", err.message);

        let cfg = config("url: http://h/x\nheaders: { X-Token: \"{{ record.token }}\" }\n");
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let err = sink
            .prepare(&delivery(&o, json!({"token": "s3cr3t\nInjected: 1"})))
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert!(
            err.message.starts_with("headers.X-Token"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("s3cr3t"), "{}", err.message);
    }

    #[test]
    fn batch_bodies_are_arrays_keyed_by_their_ids() {
        let cfg = config("url: http://h/x\nbatch_body: true\n");
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let request = |sink: &WebhookSink, batch: &[Delivery]| {
            let items: Vec<_> = batch
                .iter()
                .map(|d| (d, sink.batch_item(d).unwrap()))
                .collect();
            sink.batch_request(&items).unwrap()
        };
        let (a, b) = (origin("a1", "t"), origin("b2", "t"));
        let one = [delivery(&a, json!({"i": 1})), delivery(&a, json!({"i": 2}))];
        let r = request(&sink, &one);
        assert_eq!(r.body.as_deref(), Some(&br#"[{"i":1},{"i":2}]"#[..]));
        assert_eq!(r.headers["idempotency-key"], "a1");

        let key = batch_key(["a1", "b2"].into_iter());
        assert!(key.starts_with("a1-") && key.len() == 3 + 16, "{key}");
        assert_eq!(key, batch_key(["a1", "b2"].into_iter()));
        assert_ne!(key, batch_key(["b2", "a1"].into_iter()));
        let two = [delivery(&a, json!(1)), delivery(&b, json!(2))];
        assert_eq!(
            request(&sink, &two).headers["idempotency-key"],
            key.as_str()
        );

        let cfg = config("url: http://h/x\nbatch_body: true\nbody: '{\"v\": {{ record.i }}}'\n");
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let r = request(&sink, &one);
        assert_eq!(r.body.as_deref(), Some(&br#"[{"v":1},{"v":2}]"#[..]));
    }

    #[test]
    fn get_sends_no_body_by_default() {
        let cfg = config("url: http://h/x\nmethod: get\n");
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let o = origin("a", "t");
        assert!(
            sink.prepare(&delivery(&o, json!({})))
                .unwrap()
                .body
                .is_none()
        );
    }

    #[test]
    fn a_missing_secret_names_the_variable_not_a_value() {
        let cfg = config("url: http://h/x\nhmac: { secret_env: HOOK_SECRET }\n");
        let err = WebhookSink::new(&cfg, |_| None).err().unwrap().to_string();
        assert!(
            err.contains("HOOK_SECRET") && err.contains("not set"),
            "{err}"
        );
        let err = WebhookSink::new(&cfg, |_| Some(String::new()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("HOOK_SECRET"), "{err}");
    }

    #[test]
    fn would_shows_method_url_and_mode() {
        let cfg = config("url: \"http://h/d/{{ vars.device }}\"\nheaders: { Authorization: x }\n");
        let o = origin("abc", "sensors/d1");
        let w = would(&cfg, &o, &json!({"t": 1}));
        assert!(
            w.starts_with("POST http://h/d/d1 (one request per record)"),
            "{w}"
        );
        assert!(
            w.contains("Idempotency-Key abc") && w.contains("headers Authorization"),
            "{w}"
        );
        let cfg = config("url: \"http://h/{{ record.nope }}\"\n");
        assert!(would(&cfg, &o, &json!({})).starts_with("url template"));
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

    #[test]
    fn excerpts_are_short_single_lines() {
        assert_eq!(
            excerpt(b"  {\"error\":\n\"bad\"}\n"),
            "{\"error\": \"bad\"}"
        );
        let long = "x".repeat(500);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }
}
