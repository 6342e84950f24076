//! A record's request: the templates compiled with the config ([`Requests`]), rendered
//! against the record's context, its body signed; and the Idempotency-Key of a batch.

use std::borrow::Cow;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::OpenError;
use crate::config::sinks::webhook::{Header, IDEMPOTENCY_KEY, Method, Settings, Signature};
use crate::record::Record;
use crate::rule::template::Template;
use crate::sink::http::Request;
use crate::sink::{Delivery, SinkError, TemplateContext};

/// The settings' compiled templates, and the key bodies are signed with: renders the
/// request of one record, or of a batch.
pub(super) struct Requests {
    method: Method,
    url: Template,
    /// The URL when its template is plain text, parsed once (not per record).
    plain_url: Option<Url>,
    headers: Vec<Header>,
    /// None: the record as JSON (no body for GET).
    body: Option<Template>,
    /// Whether `headers` sets these (else mqbridge does).
    own_content_type: bool,
    own_key: bool,
    /// Header name and a keyed MAC, cloned per request (the key itself is not kept).
    signer: Option<(HeaderName, Hmac<Sha256>)>,
}

impl Requests {
    /// The requests of `settings`, not signed.
    pub(super) fn new(settings: &Settings) -> Requests {
        let headers = settings.headers.clone();
        Requests {
            method: settings.method,
            own_content_type: headers.iter().any(|h| h.header == header::CONTENT_TYPE),
            own_key: headers.iter().any(|h| h.header.as_str() == IDEMPOTENCY_KEY),
            url: settings.url.clone(),
            plain_url: settings
                .url
                .is_plain()
                .then(|| checked_url(settings.url.source()).ok())
                .flatten(),
            headers,
            body: settings.body.clone(),
            signer: None,
        }
    }

    /// Signs each body with the key of `hmac`, read from the environment variable it names
    /// (`env` looks it up).
    pub(super) fn signed(
        self,
        hmac: &Signature,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Requests, OpenError> {
        let secret = env(&hmac.secret_env)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OpenError::NoSecret(hmac.secret_env.clone()))?;
        let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .expect("HMAC takes a key of any length");
        Ok(Requests {
            signer: Some((hmac.name.clone(), mac)),
            ..self
        })
    }

    pub(super) fn url(&self, ctx: &TemplateContext) -> Result<Url, SinkError> {
        if let Some(url) = &self.plain_url {
            return Ok(url.clone());
        }
        let text = self
            .url
            .render(ctx)
            .map_err(|e| SinkError::permanent(format!("url template: {e}")))?;
        checked_url(&text)
    }

    /// Content-Type, Idempotency-Key and the configured headers (not the signature).
    pub(super) fn headers(&self, ctx: &TemplateContext, key: &str) -> Result<HeaderMap, SinkError> {
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
        for Header {
            name,
            header,
            value,
        } in &self.headers
        {
            let text = value
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
    fn body(&self, ctx: &TemplateContext, record: &Record) -> Result<Option<Bytes>, SinkError> {
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

    /// The request for one record.
    pub(super) fn prepare(&self, d: &Delivery) -> Result<Request, SinkError> {
        let ctx = d.origin.template_context(&d.record);
        let url = self.url(&ctx)?;
        let mut headers = self.headers(&ctx, d.origin.id())?;
        let body = self.body(&ctx, &d.record)?;
        self.sign(&mut headers, body.as_deref().unwrap_or_default());
        Ok(Request { url, headers, body })
    }

    /// One record's element of a batch body (`batch_body: true`): the record, or the
    /// `body` template's rendering, which must be JSON.
    pub(super) fn batch_item<'d>(&self, d: &'d Delivery) -> Result<Cow<'d, Record>, SinkError> {
        if self.body.is_none() {
            return Ok(Cow::Borrowed(&d.record));
        }
        let ctx = d.origin.template_context(&d.record);
        let text = self.body(&ctx, &d.record)?.unwrap_or_default();
        let json = serde_json::from_slice::<serde_json::Value>(&text);
        json.map(|v| Cow::Owned(v.into())).map_err(|e| {
            SinkError::permanent(format!(
                "body template: with batch_body it must render JSON: {e}"
            ))
        })
    }

    /// The one request for a batch's elements (`batch_body: true`); URL and headers are
    /// rendered from the first record.
    pub(super) fn batch_request(
        &self,
        items: &[(&Delivery, Cow<'_, Record>)],
    ) -> Result<Request, SinkError> {
        let (first, _) = items.first().expect("batches are never empty");
        let ctx = first.origin.template_context(&first.record);
        let url = self.url(&ctx)?;
        let key = batch_key(items.iter().map(|(d, _)| d.origin.id()));
        let mut headers = self.headers(&ctx, &key)?;
        let body = serde_json::to_vec(&items.iter().map(|(_, v)| v).collect::<Vec<_>>())
            .map_err(|e| SinkError::permanent(format!("cannot serialize records: {e}")))?;
        self.sign(&mut headers, &body);
        Ok(Request {
            url,
            headers,
            body: Some(Bytes::from(body)),
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
}

/// `text` as a request URL: it must parse, and be http(s).
fn checked_url(text: &str) -> Result<Url, SinkError> {
    let url = Url::parse(text)
        .map_err(|e| SinkError::permanent(format!("rendered url is invalid: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SinkError::permanent("rendered url is not http(s)"));
    }
    Ok(url)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::sink::ErrorKind;
    use crate::sink::webhook::WebhookSink;
    use crate::sink::webhook::tests::{config, delivery, origin};

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
        let r = sink
            .requests
            .prepare(&delivery(&o, json!({"seq": 7})))
            .unwrap();
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
        let r = sink
            .requests
            .prepare(&delivery(&o, json!({"n": 2})))
            .unwrap();
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
        let err = sink
            .requests
            .prepare(&delivery(&o, json!({})))
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert!(err.message.starts_with("url template"), "{}", err.message);

        let cfg = config("url: http://h/x\nheaders: { X-Token: \"{{ record.token }}\" }\n");
        let sink = WebhookSink::new(&cfg, |_| None).unwrap();
        let err = sink
            .requests
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
                .map(|d| (d, sink.requests.batch_item(d).unwrap()))
                .collect();
            sink.requests.batch_request(&items).unwrap()
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
            sink.requests
                .prepare(&delivery(&o, json!({})))
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
}
