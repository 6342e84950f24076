//! Settings of the `webhook` sink ([`crate::sink::webhook`]): the URL, header and body
//! templates are compiled here. The scheme, host and port of the URL must be written
//! literally, so that a message can never direct mqbridge to another host; header values
//! and the HMAC key are secrets, kept out of `Debug` and of the line `check` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{self, HeaderName};
use serde::{Deserialize, Serialize};

use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::units;
use crate::rule::template::Template;

/// The header that carries a request's idempotency key (unless `headers` sets it).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

super::sink_config! {
    /// `type: webhook`.
    pub struct Config {
        /// URL template, e.g. `https://hooks.example.com/devices/{{ vars.device | urlencode }}`.
        /// Scheme, host and port must be literal; templates may appear in the path and query.
        pub url: String,
        /// HTTP method: GET, POST (default), PUT, PATCH or DELETE.
        #[serde(default)]
        pub method: Method,
        /// Extra headers: name → value template. `Content-Type` and `Idempotency-Key`
        /// override the defaults.
        #[serde(default)]
        pub headers: Headers,
        /// Body template; default: the record as JSON (no body for GET).
        #[serde(default)]
        pub body: Option<String>,
        /// Time limit of one request, from connecting to reading the response.
        #[serde(default = "default_timeout")]
        pub timeout: units::Duration,
        /// Send a whole batch as one request whose body is a JSON array of the records
        /// (URL and headers rendered from the first record).
        #[serde(default)]
        pub batch_body: bool,
        /// Sign each body with HMAC-SHA256.
        #[serde(default)]
        pub hmac: Option<HmacConfig>,
    }
}

fn default_timeout() -> units::Duration {
    units::Duration(Duration::from_secs(10))
}

/// `method:` of a webhook.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    #[serde(alias = "get")]
    Get,
    #[default]
    #[serde(alias = "post")]
    Post,
    #[serde(alias = "put")]
    Put,
    #[serde(alias = "patch")]
    Patch,
    #[serde(alias = "delete")]
    Delete,
}

impl Method {
    /// The method as reqwest spells it.
    pub fn http(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Patch => reqwest::Method::PATCH,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.http().as_str())
    }
}

/// `headers:` of a webhook: name → value template. Values are not shown by `Debug`
/// (they often hold tokens).
#[derive(Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, String>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "***")))
            .finish()
    }
}

/// `hmac:` of a webhook.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HmacConfig {
    /// Environment variable holding the key, read when the sink opens.
    pub secret_env: String,
    /// Header carrying `sha256=<hex>`.
    #[serde(default = "default_signature_header")]
    pub header: String,
}

fn default_signature_header() -> String {
    "X-Signature".into()
}

/// Headers mqbridge manages itself (or that would break the request if templated).
const RESERVED_HEADERS: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// The `webhook` sink's settings, compiled. `Debug` shows no header value.
#[derive(Debug)]
pub struct Settings {
    pub method: Method,
    pub url: Template,
    pub headers: Vec<Header>,
    /// None: the record as JSON (no body for GET).
    pub body: Option<Template>,
    pub timeout: Duration,
    pub batch_body: bool,
    pub hmac: Option<Signature>,
    pub common: Common,
}

/// One entry of `headers:`, compiled.
#[derive(Clone)]
pub struct Header {
    /// As configured, for messages (`headers.{name}`).
    pub name: String,
    pub header: HeaderName,
    pub value: Template,
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ***", self.name)
    }
}

/// `hmac:`, validated.
#[derive(Debug)]
pub struct Signature {
    /// Environment variable holding the key, read when the sink opens.
    pub secret_env: String,
    /// The header as configured, for messages.
    pub header: String,
    pub name: HeaderName,
}

impl Config {
    /// Validates the settings and compiles the URL, header and body templates.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        let url = url(&self.url).map_err(|e| problem("url", e)).ok();
        let body = match self.body.as_deref().map(Template::compile).transpose() {
            Ok(body) => Some(body),
            Err(e) => {
                problem("body", format!("template: {e}"));
                None
            }
        };
        if self.timeout.0.is_zero() {
            problem("timeout", "must be more than 0".into());
        }
        if self.batch_body && self.method == Method::Get {
            problem("batch_body", "GET requests have no body".into());
        }
        let hmac = self
            .hmac
            .as_ref()
            .and_then(|h| signature(h, &self.headers, &mut problem));
        let headers = headers(&self.headers, &mut problem);
        match (url, body) {
            (Some(url), Some(body)) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                method: self.method,
                url,
                headers,
                body,
                timeout: self.timeout.0,
                batch_body: self.batch_body,
                hmac,
            }),
            _ => Err(errs),
        }
    }

    /// Environment variables the sink reads when it opens, as (field, variable name).
    pub fn env_vars(&self) -> Vec<(&'static str, &str)> {
        self.hmac
            .iter()
            .map(|h| ("hmac.secret_env", h.secret_env.as_str()))
            .collect()
    }
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        let mut out = format!("webhook {} {}", self.method, shown(self.url.source()));
        if self.batch_body {
            out.push_str(" (batch body)");
        }
        let _ = write!(out, " timeout {}", units::Duration(self.timeout));
        if let Some(h) = &self.hmac {
            let _ = write!(out, ", HMAC in {} (key from ${})", h.header, h.secret_env);
        }
        out
    }
}

/// Compiles `hmac:`; None when it has problems.
fn signature(
    h: &HmacConfig,
    headers: &Headers,
    problem: &mut impl FnMut(&str, String),
) -> Option<Signature> {
    if !crate::config::env::is_valid_name(&h.secret_env) {
        problem(
            "hmac.secret_env",
            "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)".into(),
        );
    }
    match HeaderName::from_bytes(h.header.as_bytes()) {
        Err(_) => problem("hmac.header", "invalid header name".into()),
        Ok(name)
            if RESERVED_HEADERS.contains(&name.as_str())
                || name == header::CONTENT_TYPE
                || name.as_str() == IDEMPOTENCY_KEY =>
        {
            problem("hmac.header", format!("cannot be {}", h.header));
        }
        Ok(name)
            if headers
                .0
                .keys()
                .any(|k| k.eq_ignore_ascii_case(name.as_str())) =>
        {
            problem(
                "hmac.header",
                format!("{} is also set in headers", h.header),
            );
        }
        Ok(name) => {
            return Some(Signature {
                secret_env: h.secret_env.clone(),
                header: h.header.clone(),
                name,
            });
        }
    }
    None
}

/// Compiles `headers:` of an HTTP request: those without problems (also the HTTP
/// authenticator's and authorizer's, [`crate::config::auth`]).
pub(crate) fn headers(headers: &Headers, problem: &mut impl FnMut(&str, String)) -> Vec<Header> {
    headers_except(
        headers,
        &RESERVED_HEADERS,
        "is set by the HTTP client",
        problem,
    )
}

/// Compiles `headers:` (also the `nats` sink's): those without problems. A header named
/// in `reserved` (lowercase) is a problem, `why` says why.
pub(crate) fn headers_except(
    headers: &Headers,
    reserved: &[&str],
    why: &str,
    problem: &mut impl FnMut(&str, String),
) -> Vec<Header> {
    let mut out = Vec::new();
    let mut seen: Vec<HeaderName> = Vec::new();
    for (name, value) in &headers.0 {
        let field = format!("headers.{name}");
        let header = match HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => {
                problem(&field, "invalid header name".into());
                None
            }
            Ok(h) if reserved.contains(&h.as_str()) => {
                problem(&field, why.into());
                None
            }
            Ok(h) if seen.contains(&h) => {
                problem(&field, "set twice (header names ignore case)".into());
                None
            }
            Ok(h) => {
                seen.push(h.clone());
                Some(h)
            }
        };
        match (header, Template::compile(value)) {
            (Some(header), Ok(value)) => out.push(Header {
                name: name.clone(),
                header,
                value,
            }),
            (_, Ok(_)) => {}
            (_, Err(e)) => problem(&field, format!("template: {e}")),
        }
    }
    out
}

/// Compiles the URL template and checks that the scheme, host and port are literal.
pub(crate) fn url(src: &str) -> Result<Template, String> {
    let template = Template::compile(src).map_err(|e| format!("template: {e}"))?;
    let literal_end = ["{{", "{%", "{#"]
        .iter()
        .filter_map(|t| src.find(t))
        .min()
        .unwrap_or(src.len());
    let literal = &src[..literal_end];
    let Some(after_scheme) = literal
        .strip_prefix("http://")
        .or_else(|| literal.strip_prefix("https://"))
    else {
        return Err("must start with http:// or https://".into());
    };
    let authority_end = match after_scheme.find(['/', '?', '#']) {
        Some(i) => i,
        None if literal_end == src.len() => after_scheme.len(),
        None => {
            return Err(
                "the scheme, host and port must be written out; templates may only be used in the path and query"
                    .into(),
            );
        }
    };
    let origin = &literal[..literal.len() - after_scheme.len() + authority_end];
    let url = Url::parse(origin).map_err(|e| format!("invalid URL: {e}"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err("needs a host".into());
    }
    if literal_end == src.len() {
        Url::parse(src).map_err(|e| format!("invalid URL: {e}"))?;
    }
    Ok(template)
}

/// The URL template without credentials and query, for `check`.
fn shown(url: &str) -> String {
    let mut s = match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    };
    if let Some(i) = s.find("://") {
        let rest = &s[i + 3..];
        let end = rest.find(['/', '?', '#', '{']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            s = format!("{}…@{}", &s[..i + 3], &rest[at + 1..]);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn validation_reports_each_field() {
        let cfg = config(
            r#"
url: "http://h/{{ topic "
method: GET
batch_body: true
timeout: 0ms
body: "{% if %}"
headers: { "Bad Name": x, X-Ok: "{{ oops ", Content-Length: "1", x-ok: y, X-Sig: z }
hmac: { secret_env: "1NOT-A-NAME", header: x-sig }
"#,
        );
        let errs = cfg.compile().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "url",
                "body",
                "timeout",
                "batch_body",
                "hmac.secret_env",
                "hmac.header",
                "headers.Bad Name",
                "headers.Content-Length",
                "headers.X-Ok",
                "headers.x-ok"
            ],
            "{errs:?}"
        );
        assert!(errs[8].1.starts_with("template:"), "{errs:?}");
        assert!(errs[9].1.contains("twice"), "{errs:?}");

        let clash = config("url: http://h/x\nhmac: { secret_env: K, header: Content-Type }\n");
        assert_eq!(
            clash.compile().unwrap_err(),
            [(
                "hmac.header".to_string(),
                "cannot be Content-Type".to_string()
            )]
        );

        let ok = config("url: https://hooks.example.com:8443/a/{{ vars.device }}?x={{ id }}\n");
        assert!(ok.compile().is_ok());
    }

    #[test]
    fn the_host_must_be_literal() {
        for good in [
            "http://h",
            "https://h:8443/",
            "https://user@h/{{ topic }}",
            "http://h?x={{ id }}",
            "http://[::1]:80/{{ id }}",
        ] {
            assert_eq!(url(good).map(|t| t.source().to_string()), Ok(good.into()));
        }
        for bad in [
            "{{ record.url }}",
            "https://{{ vars.tenant }}.example.com/",
            "https://h{{ x }}/",
            "https://h:{{ port }}/",
            "ftp://h/x",
            "http:///x",
            "h/x",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_and_describe_keep_secrets_out() {
        let cfg = config(
            "url: \"https://h/x?token=s3cr3t\"\nheaders: { Authorization: Bearer s3cr3t }\n",
        );
        let debug = format!("{:?}", cfg.headers);
        assert!(
            !debug.contains("s3cr3t") && debug.contains("Authorization"),
            "{debug}"
        );
        let settings = cfg.compile().unwrap();
        let debug = format!("{:?}", settings.headers);
        assert!(
            !debug.contains("s3cr3t") && debug.contains("Authorization"),
            "{debug}"
        );
        assert_eq!(
            settings.describe(),
            "webhook POST https://h/x?… timeout 10s"
        );
        let settings = config("url: \"https://u:s3cr3t@h:1/{{ id }}\"\n")
            .compile()
            .unwrap();
        assert_eq!(
            settings.describe(),
            "webhook POST https://…@h:1/{{ id }} timeout 10s"
        );
    }
}
