//! What the HTTP sinks (`webhook`, `influxdb`) share: their client, sending one request,
//! and classifying what came of it. 2xx is delivered; 408, 429, 5xx, connection errors
//! and timeouts are transient, with the delay a 429 or 503 asked for (`Retry-After`, up
//! to the retry policy's `max_delay`); anything else is permanent. A failure quotes the
//! status and the start of the response body, never the URL's credentials or query, and
//! keeps the status, so a sink can tell what a rejection concerns (the `influxdb` sink
//! splits a batch on a 400).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode, Url};

use crate::config::units;
use crate::http_client::{error_chain, redact};
use crate::sink::{ErrorKind, SinkError};

/// Characters of a response body quoted in an error.
const EXCERPT_CHARS: usize = 200;
/// Bytes of a response body read at most (the rest is dropped with the connection).
const READ_LIMIT: usize = 64 * 1024;

/// One request, rendered.
pub struct Request {
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
}

/// A request that failed: why, classified, and the status when there was an answer.
#[derive(Debug)]
pub struct Failure {
    pub status: Option<StatusCode>,
    pub error: SinkError,
}

impl From<Failure> for SinkError {
    fn from(f: Failure) -> SinkError {
        f.error
    }
}

/// The HTTP client of one sink: its method, time limit and longest `Retry-After`.
pub struct Sender {
    client: reqwest::Client,
    method: Method,
    timeout: Duration,
    /// Longest Retry-After honoured (the retry policy's `max_delay`).
    max_retry_after: Duration,
}

impl Sender {
    /// A client sending `method` requests, each within `timeout` (connecting to reading
    /// the answer), honouring a `Retry-After` up to `max_retry_after`. Redirects are not
    /// followed.
    pub fn new(
        method: Method,
        timeout: Duration,
        max_retry_after: Duration,
    ) -> Result<Sender, reqwest::Error> {
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mqbridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            client,
            method,
            timeout,
            max_retry_after,
        })
    }

    /// Sends one request and classifies the outcome.
    pub async fn send(&self, r: &Request) -> Result<(), Failure> {
        let method = &self.method;
        let mut req = self
            .client
            .request(method.clone(), r.url.clone())
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
                let error = if e.is_builder() {
                    SinkError::permanent(message)
                } else {
                    SinkError::transient(message)
                };
                return Err(Failure {
                    status: None,
                    error,
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
        Err(Failure {
            status: Some(status),
            error: SinkError {
                kind,
                message,
                retry_after,
            },
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
