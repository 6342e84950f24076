//! `influxdb` sink: each record as one point in InfluxDB's line protocol ([`line`]), a
//! batch as one `POST` of many lines: `/write?db=…&precision=…` for InfluxDB 1.x (and
//! 3.x's 1.x API), `/api/v2/write?org=…&bucket=…&precision=…` for 2.x and 3.x.
//!
//! - **Credentials**: a token as `Authorization: Token …`, or (1.x) a username and
//!   password by HTTP basic authentication, never in the URL. They are read when the sink
//!   opens and are never logged: the header is marked sensitive, and errors quote the URL
//!   (which holds no secret).
//! - **Outcome**: as the webhook's, through the same client ([`super::http`]): 204 (any
//!   2xx) is delivered; 408, 429, 5xx, connection errors and timeouts are transient
//!   (`Retry-After` honoured); other statuses are permanent.
//! - **Bad records**: a record that cannot be a point (no fields, a bad timestamp, what
//!   line protocol cannot carry) fails alone, permanently, before anything is sent; the
//!   rest of the batch is written.
//! - **A rejected batch**: a 400 (InfluxDB could not parse a line, or a field changed
//!   type: "partial write", "unable to parse", "field type conflict"), 413 (too large)
//!   or 422 (2.x: e.g. a point outside the retention period) may concern a few lines
//!   only, and the status does not say which. So the batch is halved and each half sent
//!   again until the bad lines are alone ([`isolate_by`](super::isolate_by)); they are
//!   dead-lettered with InfluxDB's message and the others are written. A bad line in a
//!   batch of n costs about 2·log2(n) more requests. Sending a line again is harmless:
//!   1.x writes the good lines of a "partial write", and a point written twice (same
//!   measurement, tags and timestamp) is stored once, with the same values. Other
//!   statuses (401, 403, 404 for a missing database) are the whole batch's, not split.

mod line;

use base64::Engine as _;
use futures::future::BoxFuture;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Url};

use super::http::{Failure, Request, Sender};
use super::{Delivery, Origin, Outcome, Sink};
use crate::config::SecretError;
use crate::config::TokenSource;
use crate::config::sinks::influxdb::{Auth, Settings};
use crate::record::Record;
pub use line::Lines;

/// What writing `record` would do, for `mqbridge try`: the request and the line.
pub fn would(s: &Settings, origin: &Origin, record: &Record) -> String {
    let auth = match &s.auth {
        Auth::None => String::new(),
        Auth::Basic { username, .. } => format!(" as {username}"),
        Auth::Token(_) => " with a token".into(),
    };
    match Lines::new(s).line(origin, record) {
        Ok(line) => format!(
            "POST {}{auth} (one request per batch), line: {line}",
            s.endpoint
        ),
        Err(e) => format!("no point: {}", e.message),
    }
}

/// Why the sink could not be opened; names the field, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{field}: {error}")]
    Secret { field: String, error: SecretError },
    #[error("{0}: must not be empty")]
    Empty(String),
    #[error("{0}: holds characters an HTTP header cannot carry")]
    NotAHeader(String),
    #[error("cannot build the HTTP client: {}", crate::http_client::error_chain(.0))]
    Client(reqwest::Error),
}

pub struct InfluxSink {
    lines: Lines,
    endpoint: Url,
    headers: HeaderMap,
    sender: Sender,
}

impl InfluxSink {
    /// Reads the credentials and builds the client.
    pub fn open(s: &Settings) -> Result<InfluxSink, OpenError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let authorization = match &s.auth {
            Auth::None => None,
            Auth::Token(t) => Some((t.field("token"), format!("Token {}", secret(t, "token")?))),
            Auth::Basic { username, password } => {
                let p = secret(password, "password")?;
                let pair =
                    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{p}"));
                Some((password.field("password"), format!("Basic {pair}")))
            }
        };
        if let Some((field, value)) = authorization {
            let mut v = HeaderValue::from_str(&value).map_err(|_| OpenError::NotAHeader(field))?;
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
        }
        Ok(InfluxSink {
            lines: Lines::new(s),
            endpoint: s.endpoint.clone(),
            headers,
            sender: Sender::new(Method::POST, s.timeout, s.common.retry.max_delay.0)
                .map_err(OpenError::Client)?,
        })
    }

    /// Writes `lines` in one request.
    async fn post(&self, lines: &[String]) -> Result<(), Failure> {
        let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            body.push_str(l);
            body.push('\n');
        }
        let request = Request {
            url: self.endpoint.clone(),
            headers: self.headers.clone(),
            body: Some(body.into()),
        };
        self.sender.send(&request).await
    }
}

/// The secret of `source` (the secret `name`), not empty.
fn secret(source: &TokenSource, name: &str) -> Result<String, OpenError> {
    let field = source.field(name);
    let text = source.read().map_err(|error| OpenError::Secret {
        field: field.clone(),
        error,
    })?;
    if text.trim().is_empty() {
        return Err(OpenError::Empty(field));
    }
    Ok(text)
}

/// Whether a rejection may concern some lines of the batch only (see the module doc).
fn may_be_some_lines(f: &Failure) -> bool {
    matches!(f.status.map(|s| s.as_u16()), Some(400 | 413 | 422))
}

impl Sink for InfluxSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        let prepare = |d: &'a Delivery| self.lines.line(&d.origin, &d.record);
        Box::pin(super::prepared(batch, prepare, move |lines| async move {
            super::isolate_by(&lines, may_be_some_lines, |part| self.post(part)).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> Settings {
        let cfg: crate::config::sinks::influxdb::Config = yaml_serde::from_str(yaml).unwrap();
        cfg.compile().unwrap()
    }

    #[test]
    fn credentials_go_in_a_sensitive_header() {
        let s = settings("{url: http://h, bucket: b, measurement: m, token: s3cr3t}");
        let sink = InfluxSink::open(&s).unwrap();
        let auth = &sink.headers[header::AUTHORIZATION];
        assert_eq!(auth, "Token s3cr3t");
        assert!(auth.is_sensitive());
        assert!(!format!("{:?}", sink.headers).contains("s3cr3t"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "pa:ss\n").unwrap();
        let s = settings(&format!(
            "{{url: http://h, database: d, measurement: m, username: u, password_file: {}}}",
            file.display()
        ));
        let sink = InfluxSink::open(&s).unwrap();
        // base64("u:pa:ss")
        assert_eq!(sink.headers[header::AUTHORIZATION], "Basic dTpwYTpzcw==");

        std::fs::write(&file, "\n").unwrap();
        let err = InfluxSink::open(&s).err().unwrap().to_string();
        assert_eq!(err, "password_file: must not be empty");
        let s = settings(
            "{url: http://h, database: d, measurement: m, token_env: MQBRIDGE_TEST_UNSET_INFLUX_TOKEN}",
        );
        let err = InfluxSink::open(&s).err().unwrap().to_string();
        assert_eq!(
            err,
            "token_env: environment variable MQBRIDGE_TEST_UNSET_INFLUX_TOKEN is not set"
        );
    }

    #[test]
    fn would_shows_the_request_and_the_line() {
        let s = settings(
            "{url: http://h:8086, database: d, measurement: \"{{ record.kind }}\", tags: {topic: \"{{ topic }}\"}, token: s3cr3t}",
        );
        let d = Delivery::detached("sensors/d1", serde_json::json!({"kind": "env", "t": 1}));
        let shown = would(&s, &d.origin, &d.record);
        let at = d.origin.received_at.as_nanosecond();
        assert_eq!(
            shown,
            format!(
                "POST http://h:8086/write?db=d&precision=ns with a token (one request per batch), line: env,topic=sensors/d1 kind=\"env\",t=1 {at}"
            )
        );
        assert!(!shown.contains("s3cr3t"));
        let shown = would(
            &s,
            &d.origin,
            &serde_json::json!({"kind": "env\\", "t": 1}).into(),
        );
        assert_eq!(
            shown,
            "no point: line protocol: measurement \"env\\\\\": a backslash at the end cannot be written"
        );
    }
}
