//! Settings of the `nats` sink ([`crate::sink::nats`]): records published to NATS, each
//! delivered once a JetStream stream acknowledged it. The connection is written as NATS
//! users write it (`nats://` or `tls://`, credentials in the URL or as fields, a token, a
//! CA file); the subject and header templates are compiled here. Passwords and tokens
//! are secrets: kept out of `Debug` and of the line `check` prints.

use std::path::PathBuf;
use std::time::Duration;

use super::webhook::{Header, Headers};
use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::plan::Secret;
use crate::config::units;
use crate::rule::template::Template;

/// The header that carries a record's id, by which JetStream drops duplicates.
pub const MSG_ID: &str = "Nats-Msg-Id";

super::sink_config! {
    /// `type: nats`.
    pub struct Config {
        /// `nats://[user[:password]@]host[:port]` or `tls://…` (TLS required); port 4222 by
        /// default. A user without a password (`nats://TOKEN@host`) is a token.
        pub url: String,
        /// Subject template, e.g. `telemetry.{{ vars.device }}`. A JetStream stream must
        /// capture the subjects it renders to.
        pub subject: String,
        /// Message headers: name → value template. `Nats-Msg-Id` (default: the record's
        /// id) may be set here, e.g. to a field of the record.
        #[serde(default)]
        pub headers: Headers,
        /// User name (overrides the URL's).
        #[serde(default)]
        pub username: Option<String>,
        /// Password (overrides the URL's); prefer `${ENV}` or `password_file`.
        #[serde(default)]
        pub password: Option<String>,
        /// File holding the password (trailing newline ignored), read at each connect.
        #[serde(default)]
        pub password_file: Option<PathBuf>,
        /// Authentication token; prefer `${ENV}` or `token_file`.
        #[serde(default)]
        pub token: Option<String>,
        /// File holding the token (trailing newline ignored), read at each connect.
        #[serde(default)]
        pub token_file: Option<PathBuf>,
        /// PEM file of CA certificates for TLS (default: the system's roots).
        #[serde(default)]
        pub ca_file: Option<PathBuf>,
        /// How long connecting, and then each message's acknowledgment, may take.
        #[serde(default = "default_timeout")]
        pub timeout: units::Duration,
    }
}

fn default_timeout() -> units::Duration {
    units::Duration(Duration::from_secs(5))
}

/// How the sink authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// A user name and password (or the file holding it).
    User {
        username: String,
        password: Secret,
    },
    UserFile {
        username: String,
        path: PathBuf,
    },
    Token(Secret),
    TokenFile(PathBuf),
}

/// The `nats` sink's settings, compiled. `Debug` shows no secret.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `nats://host:port` or `tls://host:port`, without credentials.
    pub server: String,
    pub tls: bool,
    pub auth: Auth,
    pub ca_file: Option<PathBuf>,
    pub subject: Template,
    pub headers: Vec<Header>,
    /// Whether `headers` sets `Nats-Msg-Id` (else the sink does).
    pub own_msg_id: bool,
    pub timeout: Duration,
    pub common: Common,
}

impl Config {
    /// Validates the settings and compiles the subject and header templates.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        let server = server(&self.url).map_err(|e| problem("url", e)).ok();
        let auth = self.auth(server.as_ref(), &mut problem);
        let subject = match Template::compile(&self.subject) {
            Ok(t) if t.is_plain() => match validate_subject(t.source()) {
                Ok(()) => Some(t),
                Err(e) => {
                    problem("subject", e);
                    None
                }
            },
            Ok(t) => Some(t),
            Err(e) => {
                problem("subject", format!("template: {e}"));
                None
            }
        };
        if cfg!(not(feature = "nats")) {
            problem(
                "type",
                "this mqbridge was built without the `nats` feature".into(),
            );
        }
        if self.timeout.0.is_zero() {
            problem("timeout", "must be more than 0".into());
        }
        let headers = super::webhook::headers_except(&self.headers, &[], "", &mut problem);
        match (server, subject) {
            (Some(server), Some(subject)) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                server: server.address,
                tls: server.tls,
                auth,
                ca_file: self.ca_file,
                own_msg_id: headers.iter().any(|h| h.name.eq_ignore_ascii_case(MSG_ID)),
                subject,
                headers,
                timeout: self.timeout.0,
            }),
            _ => Err(errs),
        }
    }

    /// The credentials of the fields and the URL, fields first.
    fn auth(&self, server: Option<&Server>, problem: &mut impl FnMut(&str, String)) -> Auth {
        let url_user = server.and_then(|s| s.username.clone());
        let url_password = server.and_then(|s| s.password.clone());
        if self.password.is_some() && self.password_file.is_some() {
            problem(
                "password_file",
                "set password or password_file, not both".into(),
            );
        }
        if self.token.is_some() && self.token_file.is_some() {
            problem("token_file", "set token or token_file, not both".into());
        }
        let has_password =
            self.password.is_some() || self.password_file.is_some() || url_password.is_some();
        let has_token = self.token.is_some() || self.token_file.is_some();
        if has_token && (self.username.is_some() || has_password) {
            problem(
                if self.token.is_some() {
                    "token"
                } else {
                    "token_file"
                },
                "a token is instead of a user name and password, not with them".into(),
            );
        }
        let username = self.username.clone().or(url_user);
        if let Some(t) = &self.token {
            return Auth::Token(Secret(t.clone()));
        }
        if let Some(p) = &self.token_file {
            return Auth::TokenFile(p.clone());
        }
        match (username, &self.password, &self.password_file, url_password) {
            (Some(username), Some(p), _, _) => Auth::User {
                username,
                password: Secret(p.clone()),
            },
            (Some(username), None, Some(path), _) => Auth::UserFile {
                username,
                path: path.clone(),
            },
            (Some(username), None, None, Some(password)) => Auth::User { username, password },
            // `nats://TOKEN@host`: a user alone in the URL is a token.
            (Some(token), None, None, None) if self.username.is_none() => {
                Auth::Token(Secret(token))
            }
            (Some(_), None, None, None) => {
                problem("password", "a user name needs a password".into());
                Auth::None
            }
            (None, ..) if has_password => {
                problem("username", "a password needs a user name".into());
                Auth::None
            }
            (None, ..) => Auth::None,
        }
    }

    /// The files the sink reads when it connects, as (field, path).
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        [
            ("password_file", &self.password_file),
            ("token_file", &self.token_file),
            ("ca_file", &self.ca_file),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path.as_deref()?)))
        .collect()
    }
}

/// `url:`, parsed.
struct Server {
    address: String,
    tls: bool,
    username: Option<String>,
    password: Option<Secret>,
}

fn server(url: &str) -> Result<Server, String> {
    let u = url::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    let tls = match u.scheme() {
        "nats" => false,
        "tls" => true,
        other => {
            return Err(format!(
                "unsupported scheme {other:?}: use nats:// or tls://"
            ));
        }
    };
    let host = match u.host_str() {
        Some(h) if !h.is_empty() => h,
        _ => return Err("needs a host".into()),
    };
    if !matches!(u.path(), "" | "/") || u.query().is_some() {
        return Err("takes no path or query".into());
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Server {
        address: format!("{}://{host}:{}", u.scheme(), u.port().unwrap_or(4222)),
        tls,
        username: (!u.username().is_empty()).then(|| decode(u.username())),
        password: u.password().map(|p| Secret(decode(p))),
    })
}

/// Checks a subject a message is published to: dot-separated tokens, none empty, no
/// wildcard (`*`, `>`), no whitespace or control character.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("is empty".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("has whitespace or a control character".into());
    }
    for token in subject.split('.') {
        match token {
            "" => return Err("has an empty token (a leading, trailing or double '.')".into()),
            "*" | ">" => return Err("has a wildcard: messages go to one subject".into()),
            _ => {}
        }
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
            "nats {} to {}{}",
            self.subject.source(),
            self.server,
            match self.auth {
                Auth::None => "",
                Auth::User { .. } | Auth::UserFile { .. } => " (user and password)",
                Auth::Token(_) | Auth::TokenFile(_) => " (token)",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[cfg(feature = "nats")]
    fn config(yaml: &str) -> Config {
        yaml_serde::from_str(yaml).unwrap()
    }

    const STREAM: &str = r#"embedded: { allow_anonymous: true }
sinks:
  stream:
    type: nats
    url: nats://bridge:url-s3cret@nats.test
    subject: "telemetry.{{ vars.device }}"
    headers: { Device: "{{ vars.device }}" }
    timeout: 2s
rules:
  - { name: r, from: "s/{device}", to: stream }
"#;

    /// Every field the sink reads (as it serializes back) is a property of its variant in
    /// the JSON schema, and the schema has no other.
    #[test]
    fn the_schema_has_every_setting() {
        let properties = crate::config::sinks::schema_properties_are_the_settings(
            "{type: nats, url: nats://h, subject: s, headers: {a: b}, username: u, password: p, password_file: f, token: t, token_file: f, ca_file: c}",
            "nats",
        );
        for key in [
            "url",
            "subject",
            "headers",
            "password_file",
            "token_file",
            "ca_file",
            "timeout",
        ] {
            assert!(properties.iter().any(|p| p == key), "{key}");
        }
    }

    #[cfg(feature = "nats")]
    #[test]
    fn the_url_and_credentials_are_compiled() {
        let plan = parse(STREAM, "rules.yaml", |_| None).unwrap();
        let super::super::SinkSettings::Nats(s) = &plan.sinks[0].settings else {
            panic!("a nats sink")
        };
        assert_eq!((s.server.as_str(), s.tls), ("nats://nats.test:4222", false));
        assert!(
            matches!(&s.auth, Auth::User { username, password } if username == "bridge" && password.0 == "url-s3cret"),
            "{:?}",
            s.auth
        );
        assert_eq!(s.timeout, Duration::from_secs(2));
        assert!(!s.own_msg_id);

        let token = config("{url: \"tls://t0k3n@h:4443\", subject: s}")
            .compile()
            .unwrap();
        assert_eq!((token.server.as_str(), token.tls), ("tls://h:4443", true));
        assert!(matches!(&token.auth, Auth::Token(t) if t.0 == "t0k3n"));
        let file = config("{url: nats://h, subject: s, username: u, password_file: /run/p}")
            .compile()
            .unwrap();
        assert!(matches!(&file.auth, Auth::UserFile { username, .. } if username == "u"));
        let own =
            config("{url: nats://h, subject: s, headers: {nats-msg-id: \"{{ record.id }}\"}}")
                .compile()
                .unwrap();
        assert!(own.own_msg_id);
    }

    #[cfg(feature = "nats")]
    #[test]
    fn secrets_are_never_shown() {
        let text = STREAM.replace("timeout: 2s", "token: tok-s3cret");
        let text = text.replace("bridge:url-s3cret@", "");
        let plan = parse(&text, "rules.yaml", |_| None).unwrap();
        let settings = &plan.sinks[0].settings;
        let origin = crate::sink::Delivery::detached("s/d1", serde_json::json!({})).origin;
        for shown in [
            format!("{plan:?}"),
            settings.spec().describe(),
            crate::sink::would(settings, &origin, &serde_json::json!({}).into()),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        let plan = parse(STREAM, "rules.yaml", |_| None).unwrap();
        let shown = format!("{plan:?} {}", plan.sinks[0].settings.spec().describe());
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn problems_are_reported_at_their_fields() {
        let text = STREAM
            .replace("nats://bridge:url-s3cret@nats.test", "http://nats.test")
            .replace("telemetry.{{ vars.device }}", "telemetry.>")
            .replace("Device:", "\"Bad Name\":")
            .replace("timeout: 2s", "timeout: 0s\n    token: t\n    password: p");
        let errs = match parse(&text, "rules.yaml", |_| None) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        };
        for want in [
            "rules.yaml:5:10: sinks.stream.url: unsupported scheme \"http\"",
            "rules.yaml:6:14: sinks.stream.subject: has a wildcard",
            "rules.yaml:7:28: sinks.stream.headers.Bad Name: invalid header name",
            "rules.yaml:8:14: sinks.stream.timeout: must be more than 0",
            "rules.yaml:9:12: sinks.stream.token: a token is instead of a user name and password",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
    }

    #[cfg(not(feature = "nats"))]
    #[test]
    fn without_the_feature_the_sink_is_refused() {
        let errs = match parse(STREAM, "rules.yaml", |_| None) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            errs.contains("rules.yaml:4:11: sinks.stream.type: this mqbridge was built without the `nats` feature"),
            "{errs}"
        );
    }

    #[test]
    fn subjects_are_checked() {
        for good in ["a", "a.b.c", "$KV.bucket.key", "a-b_c.1"] {
            assert_eq!(validate_subject(good), Ok(()), "{good}");
        }
        for bad in ["", "a..b", ".a", "a.", "a.*.b", "a.>", "a b", "a\tb"] {
            assert!(validate_subject(bad).is_err(), "{bad:?}");
        }
    }
}
