//! Settings of the `kafka` sink ([`crate::sink::kafka`]): records produced to Kafka (or
//! any Kafka-API broker), each delivered once the partition leader acknowledged it with
//! `acks=all`. The connection is written as Kafka users write it: bootstrap brokers, TLS
//! and SASL, and other librdkafka producer properties by their own names. The topic, key
//! and header templates are compiled here. Passwords are secrets: kept out of `Debug` and
//! of the line `check` prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::webhook::{Header, Headers};
use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::plan::Secret;
use crate::config::units;
use crate::rule::template::Template;

/// The header that carries a record's id, by which consumers drop duplicates.
pub const ID_HEADER: &str = "message-id";

super::sink_config! {
    /// `type: kafka`.
    pub struct Config {
        /// Bootstrap brokers, `host:port` each.
        pub brokers: Vec<String>,
        /// Topic template, e.g. `telemetry` or `telemetry.{{ vars.site }}`.
        pub topic: String,
        /// Key template: records with the same key go to the same partition, in order.
        /// Default: the MQTT topic the message came on, so each device stays in order.
        #[serde(default)]
        pub key: Option<String>,
        /// Record headers: name → value template. `message-id` is the sink's.
        #[serde(default)]
        pub headers: Headers,
        /// Batch compression: none (default), gzip, snappy or lz4 (zstd is not built in).
        #[serde(default)]
        pub compression: Compression,
        /// TLS to the brokers (`tls: {}` for the system's roots).
        #[serde(default)]
        pub tls: Option<Tls>,
        /// SASL authentication.
        #[serde(default)]
        pub sasl: Option<Sasl>,
        /// Other librdkafka producer properties by name, e.g. `linger.ms: 20`. Those the
        /// sink sets itself (delivery guarantees, security) are refused.
        #[serde(default)]
        pub properties: BTreeMap<String, Scalar>,
        /// How long the client keeps trying to deliver a record (`message.timeout.ms`)
        /// before it fails and mqbridge's retries take over.
        #[serde(default = "default_timeout")]
        pub timeout: units::Duration,
    }
}

fn default_timeout() -> units::Duration {
    units::Duration(Duration::from_secs(30))
}

/// `compression:`, librdkafka's `compression.type`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// `tls:`: PEM files; none set means the system's CA roots and no client certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// CA certificates the brokers' certificates are checked against.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate, for brokers that authenticate clients by certificate.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `sasl:`: a user name and a password (or the file holding it).
#[derive(Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sasl {
    /// PLAIN (use it with TLS), SCRAM-SHA-256 or SCRAM-SHA-512.
    pub mechanism: SaslMechanism,
    pub username: String,
    /// Prefer `${ENV}` or `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (trailing newline ignored), read when the sink opens.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for Sasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A property's value as YAML writes it: `linger.ms: 20` or `acks: "all"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Text(s) => f.write_str(s),
        }
    }
}

/// Properties the sink sets itself, by prefix: its guarantees (acks, idempotence,
/// ordering, the timeout), the brokers, the compression, and security (TLS and SASL have
/// their own settings, which keep passwords out of logs).
const OWN_PROPERTIES: [&str; 12] = [
    "bootstrap.servers",
    "metadata.broker.list",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "max.in.flight",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "compression.",
    "security.protocol",
    "sasl.",
    "ssl.",
];

/// The `kafka` sink's settings, compiled. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Settings {
    pub brokers: Vec<String>,
    pub topic: Template,
    /// None: the message's MQTT topic.
    pub key: Option<Template>,
    pub headers: Vec<Header>,
    pub compression: Compression,
    pub tls: Option<Tls>,
    pub sasl: Option<SaslSettings>,
    pub properties: Vec<(String, String)>,
    pub timeout: Duration,
    pub common: Common,
}

/// SASL, compiled.
#[derive(Debug, Clone)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Password,
}

#[derive(Debug, Clone)]
pub enum Password {
    Inline(Secret),
    File(PathBuf),
}

impl Config {
    /// Validates the settings and compiles the topic, key and header templates.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        if self.brokers.is_empty() {
            problem("brokers", "needs at least one host:port".into());
        }
        for (i, b) in self.brokers.iter().enumerate() {
            if let Err(e) = validate_broker(b) {
                problem(&format!("brokers[{i}]"), e);
            }
        }
        let topic = match Template::compile(&self.topic) {
            Ok(t) if t.is_plain() => match validate_topic(t.source()) {
                Ok(()) => Some(t),
                Err(e) => {
                    problem("topic", e);
                    None
                }
            },
            Ok(t) => Some(t),
            Err(e) => {
                problem("topic", format!("template: {e}"));
                None
            }
        };
        let key = match self.key.as_deref().map(Template::compile).transpose() {
            Ok(k) => k,
            Err(e) => {
                problem("key", format!("template: {e}"));
                None
            }
        };
        let headers = super::webhook::headers_except(
            &self.headers,
            &[ID_HEADER],
            "is set by the sink (the record's id)",
            &mut problem,
        );
        let sasl = self.sasl.as_ref().and_then(|s| {
            let password = match (&s.password, &s.password_file) {
                (Some(p), None) => Some(Password::Inline(Secret(p.clone()))),
                (None, Some(f)) => Some(Password::File(f.clone())),
                (Some(_), Some(_)) => {
                    problem(
                        "sasl.password_file",
                        "set password or password_file, not both".into(),
                    );
                    None
                }
                (None, None) => {
                    problem("sasl.password", "needs password or password_file".into());
                    None
                }
            };
            if s.username.is_empty() {
                problem("sasl.username", "is empty".into());
            }
            Some(SaslSettings {
                mechanism: s.mechanism,
                username: s.username.clone(),
                password: password?,
            })
        });
        if let Some(t) = &self.tls
            && t.cert_file.is_some() != t.key_file.is_some()
        {
            problem("tls.key_file", "cert_file and key_file go together".into());
        }
        for name in self.properties.keys() {
            if OWN_PROPERTIES
                .iter()
                .any(|own| name == own || (own.ends_with('.') && name.starts_with(own)))
            {
                problem(
                    &format!("properties.{name}"),
                    "is set by the sink (use its own settings: brokers, compression, tls, sasl, timeout)"
                        .into(),
                );
            }
        }
        if cfg!(not(feature = "kafka")) {
            problem(
                "type",
                "this mqbridge was built without the `kafka` feature".into(),
            );
        }
        if self.timeout.0 < Duration::from_millis(1) {
            problem("timeout", "must be at least 1ms".into());
        }
        match topic {
            Some(topic) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                brokers: self.brokers,
                topic,
                key,
                headers,
                compression: self.compression,
                tls: self.tls,
                sasl,
                properties: self
                    .properties
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                timeout: self.timeout.0,
            }),
            _ => Err(errs),
        }
    }

    /// The files the sink reads when it opens, as (field, path).
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        let tls = self.tls.as_ref();
        [
            ("tls.ca_file", tls.and_then(|t| t.ca_file.as_deref())),
            ("tls.cert_file", tls.and_then(|t| t.cert_file.as_deref())),
            ("tls.key_file", tls.and_then(|t| t.key_file.as_deref())),
            (
                "sasl.password_file",
                self.sasl.as_ref().and_then(|s| s.password_file.as_deref()),
            ),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path?)))
        .collect()
    }
}

/// A bootstrap broker: `host:port`.
fn validate_broker(b: &str) -> Result<(), String> {
    let (host, port) = b
        .rsplit_once(':')
        .ok_or_else(|| format!("{b:?}: needs host:port"))?;
    if host.is_empty() || host.contains(['/', ',', ' ']) {
        return Err(format!("{b:?}: needs host:port"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .map(|_| ())
        .ok_or_else(|| format!("{b:?}: invalid port"))
}

/// Checks a topic name as Kafka does: 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("is empty".into());
    }
    if topic.len() > 249 {
        return Err("is longer than 249 characters".into());
    }
    if topic == "." || topic == ".." {
        return Err("cannot be '.' or '..'".into());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "has {c:?}: a Kafka topic is made of letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!(
            "kafka {} at {}{}{}",
            self.topic.source(),
            self.brokers.join(","),
            if self.tls.is_some() { " (TLS)" } else { "" },
            match &self.sasl {
                Some(s) => format!(" (SASL {} as {})", s.mechanism.name(), s.username),
                None => String::new(),
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const STREAM: &str = r#"embedded: { allow_anonymous: true }
sinks:
  events:
    type: kafka
    brokers: ["kafka-1:9092", "kafka-2:9092"]
    topic: telemetry
    key: "{{ vars.device }}"
    headers: { Device: "{{ vars.device }}" }
    compression: lz4
    sasl: { mechanism: SCRAM-SHA-512, username: bridge, password: s3cret }
    properties: { linger.ms: 20, client.id: edge-1 }
rules:
  - { name: r, from: "s/{device}", to: events }
"#;

    /// Every field the sink reads (as it serializes back) is a property of its variant in
    /// the JSON schema, and the schema has no other.
    #[test]
    fn the_schema_has_every_setting() {
        let properties = crate::config::sinks::schema_properties_are_the_settings(
            "{type: kafka, brokers: [h:9092], topic: t, key: k, headers: {a: b}, tls: {}, \
             sasl: {mechanism: PLAIN, username: u, password: p}, properties: {linger.ms: 5}}",
            "kafka",
        );
        for key in [
            "brokers",
            "topic",
            "key",
            "headers",
            "compression",
            "tls",
            "sasl",
            "properties",
            "timeout",
        ] {
            assert!(properties.iter().any(|p| p == key), "{key}");
        }
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn the_settings_are_compiled() {
        let plan = parse(STREAM, "rules.yaml", |_| None).unwrap();
        let super::super::SinkSettings::Kafka(s) = &plan.sinks[0].settings else {
            panic!("a kafka sink")
        };
        assert_eq!(s.brokers, ["kafka-1:9092", "kafka-2:9092"]);
        assert_eq!(s.compression, Compression::Lz4);
        assert_eq!(s.key.as_ref().unwrap().source(), "{{ vars.device }}");
        assert_eq!(
            s.properties,
            [
                ("client.id".to_string(), "edge-1".to_string()),
                ("linger.ms".to_string(), "20".to_string())
            ]
        );
        assert!(matches!(
            &s.sasl,
            Some(SaslSettings { mechanism: SaslMechanism::ScramSha512, username, password: Password::Inline(p) })
                if username == "bridge" && p.0 == "s3cret"
        ));
        assert_eq!(s.timeout, Duration::from_secs(30));
        let shown = format!("{plan:?} {}", plan.sinks[0].settings.spec().describe());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("SASL SCRAM-SHA-512 as bridge"), "{shown}");
    }

    #[test]
    fn problems_are_reported_at_their_fields() {
        let text = STREAM
            .replace("\"kafka-2:9092\"", "\"kafka-2\"")
            .replace("topic: telemetry", "topic: \"tele metry\"")
            .replace("Device:", "message-id:")
            .replace("password: s3cret", "password: s3cret, password_file: /p")
            .replace("client.id: edge-1", "sasl.password: x");
        let errs = match parse(&text, "rules.yaml", |_| None) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        };
        for want in [
            "sinks.events.brokers[1]: \"kafka-2\": needs host:port",
            "rules.yaml:6:12: sinks.events.topic: has ' '",
            "sinks.events.headers.message-id: is set by the sink",
            "sinks.events.sasl.password_file: set password or password_file, not both",
            "sinks.events.properties.sasl.password: is set by the sink",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
        let errs = match parse(
            &STREAM.replace("compression: lz4", "compression: brotli"),
            "rules.yaml",
            |_| None,
        ) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(errs.contains("brotli"), "{errs}");
    }

    #[cfg(not(feature = "kafka"))]
    #[test]
    fn without_the_feature_the_sink_is_refused() {
        let errs = match parse(STREAM, "rules.yaml", |_| None) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            errs.contains("sinks.events.type: this mqbridge was built without the `kafka` feature"),
            "{errs}"
        );
    }

    #[test]
    fn topics_are_checked() {
        for good in ["a", "telemetry.site-1", "A_b.9"] {
            assert_eq!(validate_topic(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", &"x".repeat(250)] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }
}
