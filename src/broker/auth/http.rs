//! Authentication and authorization by an HTTP service (`embedded.auth.http`), in the
//! shape of EMQX 5's HTTP authenticator and authorizer: a request rendered from the
//! configured templates (POST: the body as a JSON object; GET: as the query string), and
//! an answer of HTTP 200 with `{"result": "allow" | "deny" | "ignore"}` (authentication:
//! also `is_superuser` and `acl`), or 204, which allows.
//!
//! Anything else fails closed: no answer within `timeout`, a connection error, another
//! status, a body that does not parse. The request is then denied (EMQX would "ignore"
//! it and ask the next source) and a warning logged, at most one per
//! [`WARN_INTERVAL`], counting those it leaves out. A failure is not cached: the next
//! request asks again.
//!
//! Authorization answers are cached per connection ([`Cache`], as EMQX's authorization
//! cache): for `cache_ttl`, by (action, topic or filter, QoS, retain), at most
//! `cache_size` of them, the oldest making room.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::Url;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::config::auth::{HttpAuthzPlan, HttpMethod, HttpRequestPlan};
use crate::config::units;

/// At most one warning about failing requests this often.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Bytes of an answer read at most.
const READ_LIMIT: usize = 64 * 1024;

/// What the service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Not the service's to decide: the next source does.
    Ignore,
}

/// An authentication answer.
#[derive(Debug)]
pub struct Authenticated {
    pub verdict: Verdict,
    /// `is_superuser`: every publish and subscribe is allowed.
    pub superuser: bool,
    /// `acl`, as sent (parsed by the caller, who knows the client).
    pub acl: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Answer {
    result: Result,
    #[serde(default)]
    is_superuser: bool,
    #[serde(default)]
    acl: Option<serde_json::Value>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Result {
    Allow,
    Deny,
    Ignore,
}

/// The HTTP authenticator and authorizer of one config.
#[derive(Debug)]
pub struct HttpAuth {
    client: reqwest::Client,
    authentication: Option<HttpRequestPlan>,
    authorization: Option<HttpAuthzPlan>,
    /// When the last warning was logged, and the failures since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl HttpAuth {
    pub fn new(
        authentication: Option<HttpRequestPlan>,
        authorization: Option<HttpAuthzPlan>,
    ) -> HttpAuth {
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mqbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with rustls and the ring provider builds");
        HttpAuth {
            client,
            authentication,
            authorization,
            warned: Mutex::new((None, 0)),
        }
    }

    pub fn authenticates(&self) -> bool {
        self.authentication.is_some()
    }

    pub fn authorization(&self) -> Option<&HttpAuthzPlan> {
        self.authorization.as_ref()
    }

    /// Asks the authentication endpoint about a login (`ctx`: its placeholders); a
    /// failure denies. None: no authentication endpoint.
    pub async fn authenticate(&self, ctx: &serde_json::Value) -> Option<Authenticated> {
        let plan = self.authentication.as_ref()?;
        Some(match self.ask(plan, ctx, "authentication").await {
            Some(answer) => answer,
            None => Authenticated {
                verdict: Verdict::Deny,
                superuser: false,
                acl: None,
            },
        })
    }

    /// Asks the authorization endpoint of `plan` (`ctx`: its placeholders). None: the
    /// request failed (logged), which denies.
    pub async fn authorize(
        &self,
        plan: &HttpAuthzPlan,
        ctx: &serde_json::Value,
    ) -> Option<Verdict> {
        let answer = self.ask(&plan.request, ctx, "authorization").await?;
        Some(answer.verdict)
    }

    /// One request; None when it failed (logged).
    async fn ask(
        &self,
        plan: &HttpRequestPlan,
        ctx: &serde_json::Value,
        what: &str,
    ) -> Option<Authenticated> {
        let asked = tokio::time::timeout(plan.timeout, self.request(plan, ctx)).await;
        let failed = match asked {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {}", units::Duration(plan.timeout)),
        };
        self.warn(what, &failed);
        None
    }

    async fn request(
        &self,
        plan: &HttpRequestPlan,
        ctx: &serde_json::Value,
    ) -> std::result::Result<Authenticated, String> {
        let render = |t: &crate::rule::template::Template, field: &str| {
            t.render(ctx).map_err(|e| format!("{field}: {e}"))
        };
        let mut url = Url::parse(&render(&plan.url, "url")?).map_err(|e| format!("url: {e}"))?;
        let mut fields = serde_json::Map::new();
        for (name, value) in &plan.body {
            fields.insert(name.clone(), render(value, name)?.into());
        }
        let mut headers = HeaderMap::new();
        for h in &plan.headers {
            // The value may be a secret: never quoted.
            let v = HeaderValue::from_str(&render(&h.value, &h.name)?)
                .map_err(|_| format!("headers.{}: not a valid header value", h.name))?;
            headers.insert(h.header.clone(), v);
        }
        let shown = crate::http_client::redact(&url);
        let req = match plan.method {
            HttpMethod::Get => {
                url.query_pairs_mut().extend_pairs(
                    fields
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or(""))),
                );
                self.client.get(url)
            }
            HttpMethod::Post => {
                if !headers.contains_key(header::CONTENT_TYPE) {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                }
                let body = serde_json::Value::Object(fields).to_string();
                self.client.post(url).body(body)
            }
        };
        let mut resp = req
            .headers(headers)
            .timeout(plan.timeout)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "{shown}: {}",
                    crate::http_client::error_chain(&e.without_url())
                )
            })?;
        let status = resp.status();
        let mut body = Vec::new();
        while body.len() < READ_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(format!("{shown}: reading the answer: {e}")),
            }
        }
        match status.as_u16() {
            204 => Ok(Authenticated {
                verdict: Verdict::Allow,
                superuser: false,
                acl: None,
            }),
            200 => {
                let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
                    format!("{shown}: the answer is not {{\"result\": \"allow\"|\"deny\"|\"ignore\"}}: {e}")
                })?;
                Ok(Authenticated {
                    verdict: match answer.result {
                        Result::Allow => Verdict::Allow,
                        Result::Deny => Verdict::Deny,
                        Result::Ignore => Verdict::Ignore,
                    },
                    superuser: answer.is_superuser,
                    acl: answer.acl,
                })
            }
            _ => Err(format!("{shown}: HTTP {status}")),
        }
    }

    /// Logs a failed request, at most once per [`WARN_INTERVAL`].
    fn warn(&self, what: &str, error: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if warned
            .0
            .is_some_and(|at| now.duration_since(at) < WARN_INTERVAL)
        {
            warned.1 += 1;
            return;
        }
        let left_out = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        drop(warned);
        tracing::warn!(
            error,
            failures_not_logged = left_out,
            "embedded broker: HTTP {what} failed; denied"
        );
    }
}

/// What a cached answer is for: (publish?, topic or filter, QoS, retain).
type Key = (bool, Box<str>, u8, bool);

/// One connection's authorization answers.
#[derive(Debug, Default)]
pub struct Cache {
    answers: HashMap<Key, (Verdict, Instant)>,
    /// The authorizer the answers came from (its address): a reload that replaces it
    /// empties the cache.
    from: usize,
}

impl Cache {
    /// A fresh answer for `key` from `authorizer`, if one is cached.
    pub fn get(
        &mut self,
        authorizer: &HttpAuth,
        plan: &HttpAuthzPlan,
        key: &Key,
    ) -> Option<Verdict> {
        let from = authorizer as *const HttpAuth as usize;
        if self.from != from {
            self.answers.clear();
            self.from = from;
        }
        let &(verdict, at) = self.answers.get(key)?;
        (at.elapsed() < plan.cache_ttl).then_some(verdict)
    }

    /// Keeps an answer, making room by dropping stale ones, else the oldest.
    pub fn put(&mut self, plan: &HttpAuthzPlan, key: Key, verdict: Verdict) {
        if plan.cache_ttl.is_zero() || plan.cache_size == 0 {
            return;
        }
        if self.answers.len() >= plan.cache_size && !self.answers.contains_key(&key) {
            self.answers
                .retain(|_, (_, at)| at.elapsed() < plan.cache_ttl);
            if self.answers.len() >= plan.cache_size
                && let Some(oldest) = self
                    .answers
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                self.answers.remove(&oldest);
            }
        }
        self.answers.insert(key, (verdict, Instant::now()));
    }
}

/// The cache key of an authorization request.
pub fn key(publish: bool, topic: &str, qos: u8, retain: bool) -> Key {
    (publish, topic.into(), qos, retain)
}
