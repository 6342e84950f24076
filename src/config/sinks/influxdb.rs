//! Settings of the `influxdb` sink ([`crate::sink::influxdb`]): where points are written
//! (InfluxDB 1.x's `/write?db=` or the 2.x/3.x `/api/v2/write?bucket=` API, chosen by
//! whether `database` or `bucket` is set), with which credentials, and how a record
//! becomes a point (measurement, tags, fields, timestamp). The URL must be written
//! literally: it is the same for every record. Credentials are secrets, read when the
//! sink opens, kept out of `Debug` and of the line `check` prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::admin::{TokenSource, secret_source};
use crate::config::units;
use crate::rule::template::Template;

super::sink_config! {
    /// `type: influxdb`.
    pub struct Config {
        /// The server: `http://host:8086` (a path prefix, e.g. behind a proxy, is kept).
        /// Literal: no templates, no credentials, no query.
        pub url: String,
        /// InfluxDB 1.x (and 3.x's 1.x API): the database, written with `POST /write?db=…`.
        #[serde(default)]
        pub database: Option<String>,
        /// With `database`: the retention policy (`rp=`); default: the database's default.
        #[serde(default)]
        pub retention_policy: Option<String>,
        /// InfluxDB 2.x/3.x: the bucket, written with `POST /api/v2/write?bucket=…`.
        #[serde(default)]
        pub bucket: Option<String>,
        /// With `bucket`: the organization, name or id (2.x needs it; 3.x ignores it).
        #[serde(default)]
        pub org: Option<String>,
        /// With `database`: the user, sent by HTTP basic authentication.
        #[serde(default)]
        pub username: Option<String>,
        /// The user's password; prefer `password_file` or `password_env`.
        #[serde(default)]
        pub password: Option<String>,
        /// File holding the password (trailing newline ignored), read at start.
        #[serde(default)]
        pub password_file: Option<PathBuf>,
        /// Environment variable holding the password, read at start.
        #[serde(default)]
        pub password_env: Option<String>,
        /// API token, sent as `Authorization: Token …`; prefer `token_file` or `token_env`.
        #[serde(default)]
        pub token: Option<String>,
        /// File holding the token (trailing newline ignored), read at start.
        #[serde(default)]
        pub token_file: Option<PathBuf>,
        /// Environment variable holding the token, read at start.
        #[serde(default)]
        pub token_env: Option<String>,
        /// Precision of the timestamps written: `ns` (default), `us`, `ms` or `s`.
        /// Timestamps are truncated to it.
        #[serde(default)]
        pub precision: Precision,
        /// The measurement: a template, e.g. `readings` or `"{{ vars.kind }}"`.
        pub measurement: String,
        /// Tags: key → value template, e.g. `{ device: "{{ vars.device }}" }`. A tag whose
        /// value renders empty is left out of the point.
        #[serde(default)]
        pub tags: BTreeMap<String, String>,
        /// The record keys written as fields. Default: every key whose value is a number,
        /// boolean or string, except the timestamp's key and keys named like a tag.
        #[serde(default)]
        pub fields: Option<Vec<String>>,
        /// How JSON integers are written: `float` (default: like every other number, so a
        /// field that is 21 in one message and 21.5 in the next keeps one type) or
        /// `integer` (`21i`).
        #[serde(default)]
        pub integers: Integers,
        /// Where a point's time comes from: a record key and its unit,
        /// e.g. `{ key: ts, unit: ms }`. Default: the time mqbridge received the message.
        #[serde(default)]
        pub timestamp: Option<TimestampConfig>,
        /// Time limit of one request, from connecting to reading the response.
        #[serde(default = "default_timeout")]
        pub timeout: units::Duration,
    }
}

fn default_timeout() -> units::Duration {
    units::Duration(Duration::from_secs(10))
}

/// `precision:` of an `influxdb` sink.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    /// As the `precision=` parameter spells it (1.x and 2.x alike).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }

    /// Nanoseconds in one unit.
    pub fn nanos(self) -> i128 {
        match self {
            Precision::Ns => 1,
            Precision::Us => 1_000,
            Precision::Ms => 1_000_000,
            Precision::S => 1_000_000_000,
        }
    }
}

/// `integers:` of an `influxdb` sink.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Integers {
    #[default]
    Float,
    Integer,
}

/// `timestamp:` of an `influxdb` sink: the record key holding a point's time.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimestampConfig {
    /// The record key.
    pub key: String,
    /// What its value is: epoch `s`, `ms`, `us` or `ns` (a number), or `rfc3339` (a
    /// string such as `2026-12-01T10:00:00.5Z`).
    pub unit: TimeUnit,
}

/// `timestamp.unit:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    S,
    Ms,
    Us,
    Ns,
    Rfc3339,
}

/// Which API the sink writes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Api {
    /// 1.x: `POST /write?db=…[&rp=…]`.
    V1 {
        database: String,
        retention_policy: Option<String>,
    },
    /// 2.x/3.x: `POST /api/v2/write?[org=…&]bucket=…`.
    V2 { org: Option<String>, bucket: String },
}

/// How the sink authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// HTTP basic authentication (1.x users).
    Basic {
        username: String,
        password: TokenSource,
    },
    /// `Authorization: Token …`.
    Token(TokenSource),
}

/// The `influxdb` sink's settings, compiled. `Debug` shows no secret.
#[derive(Debug)]
pub struct Settings {
    /// The write endpoint, its query included (no credentials: those go in a header).
    pub endpoint: Url,
    pub api: Api,
    pub auth: Auth,
    pub precision: Precision,
    pub measurement: Template,
    /// (key, value template), sorted by key (as InfluxDB prefers them).
    pub tags: Vec<(String, Template)>,
    pub fields: Option<Vec<String>>,
    pub integers: Integers,
    pub timestamp: Option<TimestampConfig>,
    pub timeout: Duration,
    pub common: Common,
}

impl Config {
    /// Validates the settings and compiles the measurement and tag templates.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let mut problem = |field: String, message: String| errs.push((field, message));
        let base = base_url(&self.url)
            .map_err(|e| problem("url".into(), e))
            .ok();
        let api = match (&self.database, &self.bucket) {
            (Some(database), None) => {
                if self.org.is_some() {
                    problem("org".into(), "goes with bucket (2.x), not database".into());
                }
                Some(Api::V1 {
                    database: database.clone(),
                    retention_policy: self.retention_policy.clone(),
                })
            }
            (None, Some(bucket)) => {
                if self.retention_policy.is_some() {
                    problem(
                        "retention_policy".into(),
                        "goes with database (1.x), not bucket".into(),
                    );
                }
                Some(Api::V2 {
                    org: self.org.clone(),
                    bucket: bucket.clone(),
                })
            }
            (Some(_), Some(_)) => {
                problem(
                    "bucket".into(),
                    "set database (InfluxDB 1.x) or bucket (2.x/3.x), not both".into(),
                );
                None
            }
            (None, None) => {
                problem(
                    "database".into(),
                    "set database (InfluxDB 1.x, /write) or bucket (2.x/3.x, /api/v2/write)".into(),
                );
                None
            }
        };
        for (field, value) in [
            ("database", &self.database),
            ("bucket", &self.bucket),
            ("org", &self.org),
            ("retention_policy", &self.retention_policy),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                problem(field.into(), "must not be empty".into());
            }
        }
        let auth = self.auth(&mut problem);
        let measurement = Template::compile(&self.measurement)
            .map_err(|e| problem("measurement".into(), format!("template: {e}")))
            .ok();
        let mut tags = Vec::new();
        for (key, value) in &self.tags {
            let field = format!("tags.{key}");
            if let Err(e) = check_key(key) {
                problem(field.clone(), e);
            }
            match Template::compile(value) {
                Ok(t) => tags.push((key.clone(), t)),
                Err(e) => problem(field, format!("template: {e}")),
            }
        }
        if let Some(fields) = &self.fields {
            if fields.is_empty() {
                problem(
                    "fields".into(),
                    "must name at least one key (or leave it out: every number, boolean and string)"
                        .into(),
                );
            }
            for (i, key) in fields.iter().enumerate() {
                if let Err(e) = check_key(key) {
                    problem(format!("fields[{i}]"), e);
                } else if fields[..i].contains(key) {
                    problem(format!("fields[{i}]"), format!("{key:?} is listed twice"));
                } else if self.tags.contains_key(key) {
                    problem(format!("fields[{i}]"), format!("{key:?} is also a tag"));
                }
            }
        }
        if self.timeout.0.is_zero() {
            problem("timeout".into(), "must be more than 0".into());
        }
        let endpoint = match (&base, &api) {
            (Some(base), Some(api)) => Some(endpoint(base, api, self.precision)),
            _ => None,
        };
        match (endpoint, api, measurement) {
            (Some(endpoint), Some(api), Some(measurement)) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                endpoint,
                api,
                auth,
                precision: self.precision,
                measurement,
                tags,
                fields: self.fields,
                integers: self.integers,
                timestamp: self.timestamp,
                timeout: self.timeout.0,
            }),
            _ => Err(errs),
        }
    }

    /// The credentials: a token, or (1.x) a username and password.
    fn auth(&self, problem: &mut impl FnMut(String, String)) -> Auth {
        let token = secret_source(
            "token",
            self.token.as_deref(),
            self.token_file.as_deref(),
            self.token_env.as_deref(),
            problem,
        );
        let password = secret_source(
            "password",
            self.password.as_deref(),
            self.password_file.as_deref(),
            self.password_env.as_deref(),
            problem,
        );
        match (token, &self.username, password) {
            (Some(_), Some(_), _) => {
                problem(
                    "username".into(),
                    "set a token or a username and password, not both".into(),
                );
                Auth::None
            }
            (Some(token), None, _) => Auth::Token(token),
            (None, Some(username), Some(password)) => {
                if self.bucket.is_some() {
                    problem(
                        "username".into(),
                        "the 2.x API (bucket) authenticates with a token".into(),
                    );
                }
                Auth::Basic {
                    username: username.clone(),
                    password,
                }
            }
            (None, Some(_), None) => {
                problem(
                    "username".into(),
                    "needs password, password_file or password_env".into(),
                );
                Auth::None
            }
            (None, None, Some(p)) => {
                problem(p.field("password"), "needs username".into());
                Auth::None
            }
            (None, None, None) => Auth::None,
        }
    }

    /// Environment variables the sink reads when it opens, as (field, variable name).
    pub fn env_vars(&self) -> Vec<(&'static str, &str)> {
        [
            ("token_env", &self.token_env),
            ("password_env", &self.password_env),
        ]
        .into_iter()
        .filter_map(|(field, var)| Some((field, var.as_deref()?)))
        .collect()
    }

    /// Files the sink reads when it opens, as (field, path).
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        [
            ("token_file", &self.token_file),
            ("password_file", &self.password_file),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path.as_deref()?)))
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
        let mut out = format!(
            "influxdb {} measurement {}",
            self.endpoint,
            self.measurement.source()
        );
        match &self.auth {
            Auth::None => {}
            Auth::Basic { username, password } => out.push_str(&format!(
                ", user {username} ({})",
                password.describe().replace("token", "password")
            )),
            Auth::Token(t) => out.push_str(&format!(", {}", t.describe())),
        }
        out.push_str(&format!(", timeout {}", units::Duration(self.timeout)));
        out
    }
}

/// A tag key or field key as the config names it: not empty, not `time` (InfluxDB refuses
/// it), no line break (line protocol cannot carry one).
fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        Err("a key must not be empty".into())
    } else if key == "time" {
        Err("InfluxDB does not accept the key \"time\"".into())
    } else if key.contains(['\n', '\r']) {
        Err("a key cannot hold a line break".into())
    } else {
        Ok(())
    }
}

/// The server's URL: http(s), a host, no credentials, query or fragment, no template.
fn base_url(text: &str) -> Result<Url, String> {
    if ["{{", "{%", "{#"].iter().any(|t| text.contains(t)) {
        return Err("must be literal: the URL is the same for every record".into());
    }
    let url = Url::parse(text).map_err(|e| format!("invalid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must start with http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("needs a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not hold credentials: use username with password_file, or token_file".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(
            "must not hold a query or fragment: database, bucket, org and precision are settings"
                .into(),
        );
    }
    Ok(url)
}

/// The write endpoint of `api` under `base`, with its query.
fn endpoint(base: &Url, api: &Api, precision: Precision) -> Url {
    let mut url = base.clone();
    let path = base.path().trim_end_matches('/');
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    match api {
        Api::V1 {
            database,
            retention_policy,
        } => {
            url.set_path(&format!("{path}/write"));
            pairs.push(("db", database));
            if let Some(rp) = retention_policy {
                pairs.push(("rp", rp));
            }
        }
        Api::V2 { org, bucket } => {
            url.set_path(&format!("{path}/api/v2/write"));
            if let Some(org) = org {
                pairs.push(("org", org));
            }
            pairs.push(("bucket", bucket));
        }
    }
    pairs.push(("precision", precision.as_str()));
    url.query_pairs_mut().extend_pairs(pairs);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn the_api_decides_the_endpoint() {
        let s = config("{url: http://h:8086, database: telemetry, measurement: m}")
            .compile()
            .unwrap();
        assert_eq!(
            s.endpoint.as_str(),
            "http://h:8086/write?db=telemetry&precision=ns"
        );
        let s = config(
            "{url: https://h/influx/, bucket: b 1, org: acme, precision: ms, measurement: m, token_env: T}",
        )
        .compile()
        .unwrap();
        assert_eq!(
            s.endpoint.as_str(),
            "https://h/influx/api/v2/write?org=acme&bucket=b+1&precision=ms"
        );
        assert_eq!(s.auth, Auth::Token(TokenSource::Env("T".into())));
        let s = config("{url: http://h, database: d, retention_policy: week, precision: s, measurement: m, username: u, password_file: /p}")
            .compile()
            .unwrap();
        assert_eq!(
            s.endpoint.as_str(),
            "http://h/write?db=d&rp=week&precision=s"
        );
        assert!(matches!(s.auth, Auth::Basic { .. }));
    }

    #[test]
    fn validation_reports_each_field() {
        let errs = config(
            r#"
url: "http://u:p@h/{{ x }}"
database: d
bucket: b
measurement: "{{ oops "
tags: { time: x, ok: "{{ bad " }
fields: [a, a, ok, time]
token: t
token_env: "1X"
username: u
timeout: 0ms
"#,
        )
        .compile()
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "url",
                "bucket",
                "token_env",
                "token_env",
                "username",
                "measurement",
                "tags.ok",
                "tags.time",
                "fields[1]",
                "fields[2]",
                "fields[3]",
                "timeout"
            ],
            "{errs:?}"
        );
        for (yaml, field, message) in [
            (
                "{url: http://h, measurement: m}",
                "database",
                "set database",
            ),
            (
                "{url: http://h?db=x, database: d, measurement: m}",
                "url",
                "must not hold a query",
            ),
            (
                "{url: ftp://h, database: d, measurement: m}",
                "url",
                "http://",
            ),
            (
                "{url: http://h, database: d, measurement: m, username: u}",
                "username",
                "needs password",
            ),
            (
                "{url: http://h, bucket: b, measurement: m, username: u, password: p}",
                "username",
                "token",
            ),
            (
                "{url: http://h, database: d, measurement: m, password: p}",
                "password",
                "needs username",
            ),
            (
                "{url: http://h, database: d, measurement: m, fields: []}",
                "fields",
                "at least one",
            ),
        ] {
            let errs = config(yaml).compile().unwrap_err();
            assert!(
                errs.iter().any(|(f, m)| f == field && m.contains(message)),
                "{yaml}: {errs:?}"
            );
        }
    }

    #[test]
    fn debug_and_describe_keep_secrets_out() {
        for yaml in [
            "{url: http://h, bucket: b, org: o, measurement: m, token: s3cr3t}",
            "{url: http://h, database: d, measurement: m, username: u, password: s3cr3t}",
        ] {
            let s = config(yaml).compile().unwrap();
            for shown in [format!("{s:?}"), s.describe()] {
                assert!(!shown.contains("s3cr3t"), "{shown}");
            }
        }
        let s =
            config("{url: http://h, database: d, measurement: m, username: u, password_env: P}")
                .compile()
                .unwrap();
        assert_eq!(
            s.describe(),
            "influxdb http://h/write?db=d&precision=ns measurement m, user u (password from $P), timeout 10s"
        );
    }

    /// Every field the sink reads (as it serializes back) is a property of its variant in
    /// the JSON schema, and the schema has no other.
    #[test]
    fn the_schema_has_every_setting() {
        crate::config::sinks::schema_properties_are_the_settings(
            "{type: influxdb, url: http://h, database: d, retention_policy: r, bucket: b, org: o, username: u, password: p, password_file: f, password_env: E, token: t, token_file: f, token_env: T, precision: ms, measurement: m, tags: {a: b}, fields: [x], integers: integer, timestamp: {key: ts, unit: ms}}",
            "influxdb",
        );
    }
}
