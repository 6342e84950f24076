//! The rules file as written: serde types that mirror the YAML (unknown keys are errors).
//! Nothing here is checked beyond its shape; [`super::plan`] validates.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::sinks::SinkConfig;
use super::units::{ByteSize, Duration};
use crate::rule::Decode;

/// The whole rules file.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// External broker to read from (mqbridge is then an MQTT client).
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// Embedded MQTT broker: devices connect to mqbridge itself (instead of `broker:`).
    #[serde(default)]
    pub embedded: Option<EmbeddedConfig>,
    /// Named destinations.
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    /// Topic filters mapped to sinks, evaluated in order; a message may match several rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Where records that cannot be delivered (or messages a rule cannot process) go.
    #[serde(default)]
    pub dead_letter: Option<DeadLetterConfig>,
    /// Durable local buffer between the source and the sinks: a message is acknowledged
    /// upstream once it is on disk here, and the sinks deliver from it. Without it, a
    /// message is acknowledged only once every sink has settled it.
    #[serde(default)]
    pub spool: Option<SpoolConfig>,
    /// How long a graceful shutdown may take to flush before it gives up (unsettled
    /// messages are then redelivered after restart).
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout: Duration,
    /// A message whose records are not all written or dead-lettered after this long is
    /// logged (once): it holds back the acknowledgements after it.
    #[serde(default = "default_unsettled_warning")]
    pub unsettled_warning: Duration,
    /// The admin HTTP server: `/healthz`, `/readyz`, `/metrics` and `/api/v1/…`. Off
    /// when omitted; `admin: {}` listens on 127.0.0.1:9883.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Threads that run the async tasks (connections, routing, sinks; the spool and the
    /// rules' jq have threads of their own). Default: one per core with `embedded:`;
    /// as a client of an external broker, half the cores (at least one).
    #[serde(default)]
    pub workers: Option<std::num::NonZeroUsize>,
    /// Threads that run the rules' jq programs and decoders (and the sinks' `columns:`
    /// programs). Default: half the cores, at least one.
    #[serde(default)]
    pub eval_threads: Option<std::num::NonZeroUsize>,
}

/// `admin:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on. Default `127.0.0.1:9883`; any address but a loopback one
    /// needs a token.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token for `/metrics` and `/api/…`; prefer `${ENV}`, `token_file` or
    /// `token_env`. Without one (loopback only) those are open to local processes.
    #[serde(default)]
    pub token: Option<String>,
    /// File holding the token (trailing newline ignored), read at start.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding the token, read at start.
    #[serde(default)]
    pub token_env: Option<String>,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9883".into()
}

fn default_unsettled_warning() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}

fn default_shutdown() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

super::connection::connection_config! {
    /// `broker:`.
    pub struct BrokerConfig {
        /// Subscribe as `$share/<group>/<filter>` so several instances split the messages.
        #[serde(default)]
        pub share_group: Option<String>,
        /// Subscription QoS (0, 1 or 2).
        #[serde(default = "default_qos")]
        pub qos: u8,
        /// MQTT 5: how many QoS 1/2 messages the broker may have in flight to mqbridge.
        #[serde(default = "default_receive_maximum")]
        pub receive_maximum: u16,
        /// Messages read while the pipeline is full (a broker sending past the window, as
        /// Mosquitto 2.0 does after a session resumes) are held in memory up to this size;
        /// past it mqbridge reconnects, and the broker sends them again.
        #[serde(default = "default_max_buffered")]
        pub max_buffered: ByteSize,
        /// MQTT 5: how long the broker keeps the session (and queued messages) while mqbridge is away.
        #[serde(default = "default_session_expiry")]
        pub session_expiry: Duration,
    }
}

fn default_qos() -> u8 {
    1
}
fn default_receive_maximum() -> u16 {
    1000
}
fn default_session_expiry() -> Duration {
    Duration(std::time::Duration::from_secs(7 * 24 * 3600))
}
fn default_max_buffered() -> ByteSize {
    ByteSize(32 << 20)
}

/// `embedded:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Address(es) to listen on, e.g. `0.0.0.0:1883`. Default `127.0.0.1:1883` (local
    /// clients only): set it to reach devices on the network.
    #[serde(default = "default_listen")]
    pub listen: OneOrMany,
    /// Accept clients without a username.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Users and their argon2 password hashes (`mqbridge passwd` prints one).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Ordered access rules; the first that applies decides; none applies: allowed.
    #[serde(default)]
    pub acl: Vec<AclConfig>,
    /// A Mosquitto password file (`mosquitto_passwd`: `$7$` and `$6$` hashes), read at
    /// start and on each reload; its users log in beside those of `users` (a name in
    /// both is an error). A relative path is relative to the working directory.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A Mosquitto ACL file (`user`, `topic [read|write|readwrite|deny]`, `pattern` with
    /// `%c` and `%u`), instead of `acl`, read at start and on each reload, with Mosquitto
    /// 2.0's meaning: what it does not grant is denied, `deny` wins, and every SUBSCRIBE
    /// is granted while each message is delivered only where `read` allows it.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// Authentication and authorization beside `users`, `password_file` and the ACL: an
    /// HTTP service and JSON Web Tokens, as EMQX's (see the README's "Embedded broker:
    /// HTTP and JWT authentication").
    #[serde(default)]
    pub auth: Option<super::auth::AuthConfig>,
    /// Longest keepalive granted; MQTT 5 clients asking for more (or for none) are told
    /// this one. `0` = no limit.
    #[serde(default = "default_max_keepalive")]
    pub max_keepalive: Duration,
    /// Largest packet accepted from a client.
    #[serde(default = "default_embedded_max_packet")]
    pub max_packet_size: ByteSize,
    /// Simultaneous client connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// QoS 1/2 messages in flight per client, each way (MQTT 5 receive maximum).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages queued per subscriber (also while a persistent session is offline);
    /// beyond it new messages for that subscriber are dropped and counted.
    #[serde(default = "default_max_queued")]
    pub max_queued_messages: usize,
    /// How long a new connection has for its CONNECT, the TLS and WebSocket handshakes
    /// included; then it is closed.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// How long a client's socket may take no byte of what the broker has to send it (a
    /// client that does not read); then the connection is closed.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Duration,
    /// Connections not yet past their CONNECT (TLS and WebSocket handshakes included);
    /// beyond it new connections wait in the listen backlog, not accepted, until one of
    /// these ends.
    #[serde(default = "default_max_connecting")]
    pub max_connecting: usize,
    /// New connections per second from one source address (bursts up to one second's
    /// worth, at least one); beyond it a connection is closed as soon as it is accepted.
    /// `0` (the default): no limit, since a fleet behind one NAT address reconnects at
    /// once after an outage.
    #[serde(default)]
    pub connection_rate_per_ip: f64,
    /// PUBLISHes per second one client may send (bursts up to one second's worth, at
    /// least one); beyond it the broker stops reading that client's connection until the
    /// rate allows again, so a flood is slowed to the rate, not closed. `0` (the
    /// default): no limit.
    #[serde(default)]
    pub max_publish_rate: f64,
    /// Subscriptions one client may hold; beyond it a SUBSCRIBE's new filters are refused
    /// (MQTT 5: quota exceeded, 0x97), while re-subscribing an existing filter still works.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Levels (`/`-separated parts) of a topic name or filter; a PUBLISH or will beyond it
    /// is an invalid topic, a SUBSCRIBE's filter beyond it is refused.
    #[serde(default = "default_max_topic_levels")]
    pub max_topic_levels: usize,
    /// Bytes of a topic name or filter, treated like `max_topic_levels`.
    #[serde(default = "default_max_topic_length")]
    pub max_topic_length: ByteSize,
    /// How often the broker publishes its figures on `$SYS/broker/…` topics, as Mosquitto
    /// does (retained, each only when it changed). `0s`: never. Who may read them is up
    /// to the ACL; clients may never publish there.
    #[serde(default = "default_sys_interval")]
    pub sys_interval: Duration,
    /// Keep retained messages and persistent sessions (subscriptions, queued and unacknowledged
    /// messages) across restarts, in a SQLite file of their own. Default: in memory only.
    #[serde(default)]
    pub persistence: Option<PersistenceConfig>,
    /// How long a persistent session is kept while its client is offline: for MQTT 3.1.1
    /// clients with clean session 0 (which cannot say), and the most an MQTT 5 client may
    /// ask for (it is told the value granted).
    #[serde(default = "default_embedded_session_expiry")]
    pub session_expiry: Duration,
    /// MQTT over TLS listener(s) and the server certificate (also used by `websocket.tls`).
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
    /// MQTT over WebSocket listener(s): `ws://HOST:PORT/mqtt`, subprotocol `mqtt`.
    #[serde(default)]
    pub websocket: Option<WebSocketListenerConfig>,
}

/// `embedded.tls`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsListenerConfig {
    /// Address(es) for MQTT over TLS, e.g. `0.0.0.0:8883`; may be empty (`[]`) when only
    /// `websocket.tls` uses the certificate.
    pub listen: OneOrMany,
    /// PEM file: the server certificate, then its chain.
    pub cert_file: PathBuf,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file of one or more CA certificates: clients are asked for a certificate
    /// (mutual TLS) and one they present must be signed by one of these. Applies to
    /// `websocket.tls` too.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse a client without a certificate at the TLS handshake.
    /// Default `true`; `false`: such a client logs in with a username and password as
    /// without mutual TLS (a certificate it does present must still be valid).
    #[serde(default)]
    pub require_client_cert: Option<bool>,
    /// With `client_ca_file`: the username is taken from the client's certificate, which
    /// is then the credential (the CONNECT's username and password are ignored), and the
    /// ACL applies to it. `cn`: the subject's common name; `san`: the first DNS name of
    /// the subject alternative names, or without one the first URI. Default: the
    /// CONNECT's username and password, as without a certificate.
    #[serde(default)]
    pub username_from: Option<CertName>,
}

/// What part of a client certificate names the user (`embedded.tls.username_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CertName {
    /// The subject's common name (CN), as Mosquitto's `use_identity_as_username`.
    Cn,
    /// The first DNS name of the subject alternative names, or without one the first URI.
    San,
}

/// `embedded.websocket`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebSocketListenerConfig {
    /// Address(es), e.g. `0.0.0.0:8080`; clients connect to `ws://HOST:8080/mqtt`.
    pub listen: OneOrMany,
    /// Serve `wss://` with the certificate of `embedded.tls`.
    #[serde(default)]
    pub tls: bool,
}

/// `spool:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool's segment files, e.g. `data/spool` (created if missing; one
    /// mqbridge process per directory).
    pub path: PathBuf,
    /// Most disk space the spool may use. When it is full, acknowledgements stop and the
    /// broker (or the publishers, in embedded mode) holds the backlog. Default 1GiB.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: ByteSize,
    /// `batch` (default): messages arriving together share one write and one fsync, and
    /// each is acknowledged after it. `always`: one write and fsync per message (slower;
    /// the same guarantee, for disks that lie about batched flushes).
    #[serde(default)]
    pub fsync: Fsync,
}

fn default_spool_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}

/// `spool.fsync`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    #[default]
    Batch,
    Always,
}

/// `embedded.persistence`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistenceConfig {
    /// SQLite file for the broker's state (not a sink's database), e.g. `data/broker.db`.
    pub path: PathBuf,
    /// Changes are written in one transaction at most this often; a crash (`kill -9`, not a
    /// graceful stop) loses at most this much of broker state. Default 100ms.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: Duration,
}

fn default_embedded_session_expiry() -> Duration {
    Duration(std::time::Duration::from_secs(7 * 24 * 3600))
}

fn default_flush_interval() -> Duration {
    Duration(std::time::Duration::from_millis(100))
}

/// One entry of `embedded.users`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// PHC string of an argon2 hash, e.g. `$argon2id$v=19$m=19456,t=2,p=1$…`.
    pub password_hash: String,
}

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    Allow,
    Deny,
}

/// One entry of `embedded.acl`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// A username, or `*` for everyone (anonymous clients included).
    pub username: String,
    pub action: AclAction,
    /// Topic filters this rule applies to for PUBLISH.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters this rule applies to for SUBSCRIBE.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

fn default_listen() -> OneOrMany {
    OneOrMany::One("127.0.0.1:1883".into())
}
fn default_max_keepalive() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}
fn default_embedded_max_packet() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_max_inflight() -> u16 {
    100
}
fn default_max_queued() -> usize {
    1000
}
fn default_sys_interval() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}
fn default_connect_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}
fn default_send_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn default_max_connecting() -> usize {
    1000
}
fn default_max_subscriptions() -> usize {
    1000
}
fn default_max_topic_levels() -> usize {
    128
}
fn default_max_topic_length() -> ByteSize {
    ByteSize(65535)
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// As written in the config: `3.1.1` or `5`.
impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        match text.as_str() {
            "3.1.1" | "4" | "3" => Ok(Protocol::V311),
            "5" | "5.0" => Ok(Protocol::V5),
            other => Err(serde::de::Error::custom(format!(
                "unknown MQTT protocol {other:?}: use 3.1.1 or 5"
            ))),
        }
    }
}

/// One entry of `rules:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, used in logs, metrics and dead letters.
    pub name: String,
    /// Topic filters; `+` and `#` as in MQTT, `{name}` captures a level into `vars.name`.
    pub from: OneOrMany,
    /// How the payload is read: `json` (the default), `text`, `bytes`, `cbor`,
    /// `msgpack`, `{protobuf: {...}}`, or `sparkplug_b` (`{sparkplug_b: {...}}` with
    /// settings).
    #[serde(default)]
    pub decode: DecodeConfig,
    /// jq expression; the message is kept when it yields a value other than false/null.
    #[serde(default)]
    pub filter: Option<String>,
    /// jq program producing zero or more records; without it the record is
    /// `{topic, payload, qos, retain, received_at}`.
    #[serde(default)]
    pub transform: Option<String>,
    /// Sink names.
    pub to: OneOrMany,
}

/// `decode:`: a format's name, a Protobuf message type, or Sparkplug B.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum DecodeConfig {
    Named(Decode),
    Protobuf(ProtobufDecode),
    /// `sparkplug_b`: Sparkplug B with the default settings.
    SparkplugB(SparkplugName),
    /// `{sparkplug_b: {...}}`.
    SparkplugBWith(SparkplugDecode),
}

/// `decode: sparkplug_b`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SparkplugName {
    /// Sparkplug B (topics `spBv1.0/...`, its Protobuf payloads): one record per metric.
    #[serde(rename = "sparkplug_b")]
    SparkplugB,
}

/// `decode: {sparkplug_b: {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SparkplugDecode {
    pub sparkplug_b: SparkplugConfig,
}

/// Sparkplug B's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SparkplugConfig {
    /// Ask an edge node for a rebirth (an NCMD with `Node Control/Rebirth` = true, to the
    /// broker mqbridge reads from) when its `seq` skips, its data comes before its
    /// birth, or it uses an alias its birth did not define. At most one request per node
    /// every 10 s.
    #[serde(default)]
    pub rebirth_on_gap: bool,
}

impl Default for DecodeConfig {
    fn default() -> DecodeConfig {
        DecodeConfig::Named(Decode::default())
    }
}

/// A name is a [`Decode`] or `sparkplug_b`; a map is `{protobuf: ...}` or
/// `{sparkplug_b: ...}`. (Not `untagged`: its errors would not say which name or key is
/// wrong.)
impl<'de> Deserialize<'de> for DecodeConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IntoDeserializer, MapAccess, Visitor};
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = DecodeConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "json, text, bytes, cbor, msgpack, sparkplug_b, {protobuf: {...}} or {sparkplug_b: {...}}",
                )
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<DecodeConfig, E> {
                if name == "sparkplug_b" {
                    return Ok(DecodeConfig::SparkplugB(SparkplugName::SparkplugB));
                }
                const NAMES: &[&str] = &["json", "text", "bytes", "cbor", "msgpack", "sparkplug_b"];
                Decode::deserialize(name.into_deserializer())
                    .map(DecodeConfig::Named)
                    .map_err(|_: E| E::unknown_variant(name, NAMES))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DecodeConfig, A::Error> {
                use serde::de::Error;
                const KEYS: &[&str] = &["protobuf", "sparkplug_b"];
                let decode = match map.next_key::<String>()?.as_deref() {
                    Some("protobuf") => DecodeConfig::Protobuf(ProtobufDecode {
                        protobuf: map.next_value()?,
                    }),
                    Some("sparkplug_b") => DecodeConfig::SparkplugBWith(SparkplugDecode {
                        sparkplug_b: map.next_value()?,
                    }),
                    Some(other) => return Err(A::Error::unknown_field(other, KEYS)),
                    None => {
                        return Err(A::Error::invalid_length(
                            0,
                            &"one of protobuf or sparkplug_b",
                        ));
                    }
                };
                if let Some(other) = map.next_key::<String>()? {
                    return Err(A::Error::unknown_field(&other, &[]));
                }
                Ok(decode)
            }
        }
        d.deserialize_any(Either)
    }
}

/// `decode: {protobuf: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtobufDecode {
    pub protobuf: ProtobufConfig,
}

/// One Protobuf message type, from `.proto` files (compiled when the config loads; no
/// `protoc` needed) or a compiled descriptor set. Relative paths are relative to the
/// config file's directory (a schema travels with its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtobufConfig {
    /// The `.proto` files that define the message (and what they import, looked up in
    /// `include`).
    #[serde(default)]
    pub proto_files: Vec<PathBuf>,
    /// Directories imports are looked up in, as `protoc -I`; default: the directories of
    /// `proto_files`.
    #[serde(default)]
    pub include: Vec<PathBuf>,
    /// A FileDescriptorSet, instead of `proto_files`: `protoc --include_imports
    /// --descriptor_set_out=FILE`.
    #[serde(default)]
    pub descriptor_set: Option<PathBuf>,
    /// The message type payloads hold, with its package: `sensors.Reading`.
    pub message: String,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// `dead_letter:`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Name of the sink that receives dead letters.
    pub sink: String,
}
