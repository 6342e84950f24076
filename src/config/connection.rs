//! How to reach an MQTT broker, written the same way wherever mqbridge connects to one:
//! `broker:` (the external broker it reads from) and the `mqtt` sink (a remote broker it
//! forwards to, e.g. edge to cloud). The fields are declared once, by
//! [`connection_config!`], into each struct that has them; [`ConnectionConfig::validate`]
//! turns them into a [`ConnectionPlan`], what [`crate::mqtt::connect`] opens.

use std::path::PathBuf;
use std::time::Duration;

use super::plan::Secret;
use super::raw::Protocol;
use super::sinks::Problems;
use super::units::{self, ByteSize};

/// Declares a struct holding the connection fields (`url`, `client_id`, `protocol`,
/// `username`, `password`, `password_file`, `keep_alive`, `max_packet_size`, `ca_file`),
/// then its own, and a `connection()` that copies the former out as a [`ConnectionConfig`].
///
/// `broker:` is declared through it rather than flattening a [`ConnectionConfig`]: the
/// type errors of a flattened field lose their field path (serde reads it from a buffer).
/// A sink's settings are read from such a buffer anyway (through their `type:` tag), so
/// the `mqtt` sink flattens [`ConnectionConfig`] and loses nothing.
macro_rules! connection_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (TLS, default port 8883).
            pub url: String,
            /// Client id. For `broker:` a stable one, with the persistent session, makes
            /// the broker keep messages for mqbridge while it is down.
            pub client_id: String,
            /// MQTT protocol version: `3.1.1` (also `4`) or `5`.
            #[serde(default)]
            pub protocol: $crate::config::raw::Protocol,
            /// Username (overrides the URL's).
            #[serde(default)]
            pub username: Option<String>,
            /// Password (overrides the URL's); prefer `${ENV}` or `password_file`.
            #[serde(default)]
            pub password: Option<String>,
            /// File holding the password (trailing newline ignored), read at each connect.
            #[serde(default)]
            pub password_file: Option<std::path::PathBuf>,
            #[serde(default = "crate::config::connection::default_keep_alive")]
            pub keep_alive: $crate::config::units::Duration,
            /// Largest packet accepted or sent. MQTT 5 tells the broker, which then
            /// withholds larger messages; with 3.1.1 keep it at least the broker's own
            /// message size limit.
            #[serde(default = "crate::config::connection::default_max_packet")]
            pub max_packet_size: $crate::config::units::ByteSize,
            /// PEM file of CA certificates for `mqtts://` (default: the system's roots).
            #[serde(default)]
            pub ca_file: Option<std::path::PathBuf>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The connection fields, as a [`ConnectionConfig`](crate::config::connection::ConnectionConfig).
            pub fn connection(&self) -> $crate::config::connection::ConnectionConfig {
                $crate::config::connection::ConnectionConfig {
                    url: self.url.clone(),
                    client_id: self.client_id.clone(),
                    protocol: self.protocol,
                    username: self.username.clone(),
                    password: self.password.clone(),
                    password_file: self.password_file.clone(),
                    keep_alive: self.keep_alive,
                    max_packet_size: self.max_packet_size,
                    ca_file: self.ca_file.clone(),
                }
            }
        }
    };
}
pub(crate) use connection_config;

pub(crate) fn default_keep_alive() -> units::Duration {
    units::Duration(Duration::from_secs(30))
}
pub(crate) fn default_max_packet() -> ByteSize {
    ByteSize(16 << 20)
}

connection_config! {
    /// The connection fields alone (the `mqtt` sink's are flattened into it).
    pub struct ConnectionConfig {}
}

/// Where and how to connect to a broker, validated.
#[derive(Debug, Clone)]
pub struct ConnectionPlan {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub client_id: String,
    pub protocol: Protocol,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub keep_alive: Duration,
    pub max_packet_size: usize,
    pub ca_file: Option<PathBuf>,
}

impl ConnectionPlan {
    /// Where it connects, without credentials: `mqtts://host:8883 as "edge-1" (MQTT 5)`.
    pub fn describe(&self) -> String {
        format!(
            "{}://{}:{} as {:?} (MQTT {})",
            if self.tls { "mqtts" } else { "mqtt" },
            self.host,
            self.port,
            self.client_id,
            self.protocol
        )
    }
}

impl ConnectionConfig {
    /// Validates the fields; problems are reported with the field relative to the
    /// section (`url`, `client_id`).
    pub fn validate(&self) -> Result<ConnectionPlan, Problems> {
        let mut errs = Problems::new();
        let url = match url::Url::parse(&self.url) {
            Ok(u) => Some(u),
            Err(e) => {
                errs.push(("url".into(), format!("invalid URL: {e}")));
                None
            }
        };
        let (mut host, mut port, mut tls, mut username, mut password) =
            (String::new(), 0, false, None, None);
        if let Some(u) = &url {
            match u.scheme() {
                "mqtt" | "tcp" => port = 1883,
                "mqtts" | "ssl" => {
                    tls = true;
                    port = 8883
                }
                other => errs.push((
                    "url".into(),
                    format!("unsupported scheme {other:?}: use mqtt:// or mqtts://"),
                )),
            }
            port = u.port().unwrap_or(port);
            match u.host_str() {
                Some(h) if !h.is_empty() => host = h.trim_matches(['[', ']']).to_string(),
                _ => errs.push(("url".into(), "needs a host".into())),
            }
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            if !u.username().is_empty() {
                username = Some(decode(u.username()));
            }
            password = u.password().map(|p| Secret(decode(p)));
        }
        if self.username.is_some() {
            username = self.username.clone();
        }
        if let Some(p) = &self.password {
            password = Some(Secret(p.clone()));
        }
        if self.password.is_some() && self.password_file.is_some() {
            errs.push((
                "password_file".into(),
                "set password or password_file, not both".into(),
            ));
        }
        if self.client_id.trim().is_empty() {
            errs.push((
                "client_id".into(),
                "must not be empty: a stable client id is what lets the broker keep a session for mqbridge".into(),
            ));
        }
        if let Err(why) = self.max_packet_size.check_packet_size() {
            errs.push(("max_packet_size".into(), why));
        }
        let keep_alive = self.keep_alive.0;
        if keep_alive < Duration::from_secs(1) || keep_alive > Duration::from_secs(65535) {
            errs.push(("keep_alive".into(), "must be between 1s and 65535s".into()));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(ConnectionPlan {
            host,
            port,
            tls,
            client_id: self.client_id.clone(),
            protocol: self.protocol,
            username,
            password,
            password_file: self.password_file.clone(),
            keep_alive,
            max_packet_size: self.max_packet_size.0 as usize,
            ca_file: self.ca_file.clone(),
        })
    }

    /// The files the connection reads, as (field, path), for the preflight check.
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        [
            ("password_file", &self.password_file),
            ("ca_file", &self.ca_file),
        ]
        .into_iter()
        .filter_map(|(field, path)| Some((field, path.as_deref()?)))
        .collect()
    }
}
