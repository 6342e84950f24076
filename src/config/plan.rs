//! Validation: turns [`RawConfig`] into a [`Plan`] the app can run, or reports every
//! problem with its field path. Pure: compiles jq programs and templates, reads nothing.
//! The plan holds what was compiled (the rules' programs, each sink's [`SinkSettings`]),
//! so nothing is compiled again: `run`, `check` and `try` all use these.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::admin::{AdminPlan, validate_admin};
use super::connection::ConnectionPlan;
use super::fingerprint::{self, Fingerprint};
use super::mosquitto::{MosquittoAcl, MosquittoHash, PasswdUser};
use super::raw::{AclAction, BrokerConfig, CertName, EmbeddedConfig, RawConfig};
use super::sinks::{SinkConfig, SinkSettings, sql};
use crate::rule::jq::JqProgram;
use crate::rule::{Decoder, Rule};
use crate::topic::{TopicFilter, covers};

use super::units::ByteSize;

/// Smallest `spool.max_bytes`: room for a few segments of the smallest size.
const MIN_SPOOL_BYTES: u64 = 1 << 20;

/// A validated config, ready to build.
#[derive(Debug)]
pub struct Plan {
    pub broker: Option<BrokerPlan>,
    pub embedded: Option<EmbeddedPlan>,
    pub sinks: Vec<SinkPlan>,
    /// Shared with the router (and the admin server) while this config runs.
    pub rules: Arc<[Rule]>,
    /// Index into `sinks`.
    pub dead_letter: Option<usize>,
    pub spool: Option<SpoolPlan>,
    pub shutdown_timeout: Duration,
    /// Log a message still unsettled after this long.
    pub unsettled_warning: Duration,
    /// The admin HTTP server; None: off.
    pub admin: Option<AdminPlan>,
    /// The settings a reload cannot apply, to tell which of them changed.
    pub restart_only: Vec<(&'static str, Fingerprint)>,
    /// Threads for the async tasks (`workers:`, or its default for the mode).
    pub workers: usize,
    /// Threads for the rules' programs (`eval_threads:`, or half the cores).
    pub eval_threads: usize,
}

/// The durable spool's place and limits (`spool:`).
#[derive(Debug, Clone)]
pub struct SpoolPlan {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub fsync: super::raw::Fsync,
}

/// A named sink and its settings.
#[derive(Debug)]
pub struct SinkPlan {
    pub name: Arc<str>,
    pub settings: SinkSettings,
    /// The settings as written: a reload keeps a sink running when this is unchanged.
    pub fingerprint: Fingerprint,
}

/// The external broker: where and how to connect, and what to ask of it.
#[derive(Debug, Clone)]
pub struct BrokerPlan {
    pub connection: ConnectionPlan,
    pub qos: u8,
    pub receive_maximum: u16,
    /// Bytes of messages held while the pipeline is full.
    pub max_buffered: usize,
    pub session_expiry: Duration,
    /// What to SUBSCRIBE to: the rules' filters, minus those another one covers, with the
    /// `$share/GROUP/` prefix when a share group is set.
    pub subscriptions: Vec<String>,
}

/// The embedded broker's settings (see [`crate::broker`]).
#[derive(Debug, Clone)]
pub struct EmbeddedPlan {
    pub listen: Vec<std::net::SocketAddr>,
    /// The environment variable `listen` was written as (`${MQBRIDGE_LISTEN:-…}` in the
    /// default config), so that "address in use" can say how to move it. Set by
    /// [`super::parse`], which knows the text before expansion.
    pub listen_var: Option<String>,
    pub allow_anonymous: bool,
    /// `users`, then those of `password_file`.
    pub users: Vec<(String, Credential)>,
    pub acl: Acl,
    /// `auth`: the HTTP service and JWT keys, asked beside `users` and the ACL.
    pub auth: super::auth::AuthPlan,
    /// Seconds; 0 = no limit.
    pub max_keepalive: u16,
    pub max_packet_size: usize,
    pub max_connections: usize,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub connect_timeout: Duration,
    /// A socket that takes no byte of what is to be sent for this long is closed.
    pub send_timeout: Duration,
    pub max_connecting: usize,
    /// Connections per second per source address; 0: no limit.
    pub connection_rate_per_ip: f64,
    /// PUBLISHes per second per client; 0: no limit.
    pub max_publish_rate: f64,
    pub max_subscriptions: usize,
    /// `max_topic_length` and `max_topic_levels`.
    pub topic_limits: crate::topic::TopicLimits,
    /// How often `$SYS/broker/…` is published; None: never.
    pub sys_interval: Option<Duration>,
    pub persistence: Option<PersistencePlan>,
    /// Seconds an offline persistent session is kept (3.1.1), at most (MQTT 5).
    pub session_expiry: u32,
    /// MQTT over TLS (and the certificate for `websocket.tls`).
    pub tls: Option<TlsPlan>,
    pub websocket: Option<WebSocketPlan>,
}

#[derive(Debug, Clone)]
pub struct TlsPlan {
    pub listen: Vec<std::net::SocketAddr>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Mutual TLS: set with `client_ca_file`.
    pub client_auth: Option<ClientAuthPlan>,
}

/// Client certificates (mutual TLS) on the TLS and secure WebSocket listeners.
#[derive(Debug, Clone)]
pub struct ClientAuthPlan {
    /// The CA certificates a client's certificate must be signed by (PEM).
    pub ca_file: PathBuf,
    /// A client without a certificate is refused at the handshake; otherwise it logs in
    /// with its CONNECT's username and password.
    pub required: bool,
    /// The username comes from the verified certificate (which is then the credential);
    /// None: from the CONNECT.
    pub username_from: Option<CertName>,
}

#[derive(Debug, Clone)]
pub struct WebSocketPlan {
    pub listen: Vec<std::net::SocketAddr>,
    pub tls: bool,
}

/// Where the embedded broker keeps its state (see [`crate::broker::store`]).
#[derive(Debug, Clone)]
pub struct PersistencePlan {
    pub path: PathBuf,
    pub flush_interval: Duration,
}

/// A secret string: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// What a user's password is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The PHC string of an argon2 hash (`embedded.users`).
    Argon2(Secret),
    /// A hash from `embedded.password_file`.
    Mosquitto(MosquittoHash),
}

/// The embedded broker's access rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acl {
    /// `embedded.acl`: the first rule that applies decides; none: allowed.
    Rules(Vec<AclRule>),
    /// `embedded.acl_file`, with Mosquitto's meaning (see [`crate::broker::auth`]).
    Mosquitto(Arc<MosquittoAcl>),
}

impl Default for Acl {
    fn default() -> Acl {
        Acl::Rules(Vec::new())
    }
}

/// The Mosquitto files `embedded:` names, as read. None: not named, or not usable (the
/// reader reports why; [`validate`] then makes no embedded plan, rather than one without
/// the file's users or ACL).
#[derive(Debug, Default)]
pub struct AuthFiles {
    pub passwd: Option<Vec<PasswdUser>>,
    pub acl: Option<MosquittoAcl>,
    /// What `embedded.auth.jwt`'s `secret_file`, `public_key_file` or `jwks_file` holds.
    pub jwt_key: Option<super::auth::JwtKeyFile>,
}

pub(super) type Errors = Vec<(String, String)>;

mod embedded;
use embedded::validate_embedded;

/// Validates everything, with the files `embedded:` names as read and each rule's
/// decoder made (see [`super::protobuf`]); on failure returns every (field path, message).
pub fn validate(
    mut raw: RawConfig,
    files: AuthFiles,
    mut decoders: Vec<Decoder>,
) -> Result<Plan, Errors> {
    let mut errs = Errors::new();
    let sink_names: Vec<String> = raw.sinks.keys().cloned().collect();
    let sinks: Vec<Option<SinkPlan>> = std::mem::take(&mut raw.sinks)
        .into_iter()
        .map(|(name, sink)| validate_sink(name, sink, &mut errs))
        .collect();
    let sink_index = |name: &str| sink_names.iter().position(|n| n.as_str() == name);

    let mut rules = Vec::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let at = |field: &str| format!("rules[{i}].{field}");
        if r.name.trim().is_empty() {
            errs.push((at("name"), "must not be empty".into()));
        } else if raw.rules[..i].iter().any(|o| o.name == r.name) {
            errs.push((at("name"), format!("duplicate rule name {:?}", r.name)));
        }
        let mut from = Vec::new();
        if r.from.as_slice().is_empty() {
            errs.push((at("from"), "needs at least one topic filter".into()));
        }
        for (j, f) in r.from.as_slice().iter().enumerate() {
            match TopicFilter::parse(f) {
                Ok(tf) => from.push(tf),
                Err(e) => errs.push((format!("rules[{i}].from[{j}]"), format!("{f:?}: {e}"))),
            }
        }
        let mut to = Vec::new();
        if r.to.as_slice().is_empty() {
            errs.push((at("to"), "needs at least one sink".into()));
        }
        for (j, s) in r.to.as_slice().iter().enumerate() {
            match sink_index(s) {
                Some(k) => to.push(k),
                None => errs.push((format!("rules[{i}].to[{j}]"), unknown_sink(s, &sink_names))),
            }
        }
        let mut compile = |field: &str, code: &Option<String>| {
            code.as_deref().and_then(|c| match JqProgram::compile(c) {
                Ok(p) => Some(p),
                Err(e) => {
                    errs.push((at(field), format!("jq: {e}")));
                    None
                }
            })
        };
        let filter = compile("filter", &r.filter);
        let transform = compile("transform", &r.transform);
        let postgres = |&k: &usize| {
            let settings = sinks[k].as_ref().map(|s| &s.settings);
            matches!(settings, Some(SinkSettings::Postgres(_)))
        };
        let keeps_payload_text = to.iter().all(postgres);
        rules.push(Rule {
            name: Arc::from(r.name.as_str()),
            from,
            decode: std::mem::take(&mut decoders[i]),
            filter,
            transform,
            to,
            keeps_payload_text,
        });
    }

    let dead_letter = raw.dead_letter.as_ref().and_then(|d| {
        let idx = sink_index(&d.sink);
        if idx.is_none() {
            errs.push((
                "dead_letter.sink".into(),
                unknown_sink(&d.sink, &sink_names),
            ));
        }
        idx
    });

    let broker = raw
        .broker
        .as_ref()
        .and_then(|b| validate_broker(b, &rules, &mut errs));

    let embedded = raw
        .embedded
        .as_ref()
        .and_then(|e| validate_embedded(e, files, &mut errs));
    if raw.broker.is_some() && raw.embedded.is_some() {
        errs.push((
            "embedded".into(),
            "configure either `broker:` (an external broker) or `embedded:`, not both".into(),
        ));
    }

    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| validate_admin(a, &mut errs));

    let spool = raw.spool.as_ref().and_then(|s| {
        let before = errs.len();
        if s.path.as_os_str().is_empty() {
            errs.push(("spool.path".into(), "needs a directory".into()));
        }
        if s.max_bytes.0 < MIN_SPOOL_BYTES {
            errs.push((
                "spool.max_bytes".into(),
                format!("must be at least {}", ByteSize(MIN_SPOOL_BYTES)),
            ));
        }
        (errs.len() == before).then(|| SpoolPlan {
            path: s.path.clone(),
            max_bytes: s.max_bytes.0,
            fsync: s.fsync,
        })
    });

    if !errs.is_empty() {
        return Err(errs);
    }
    let restart_only = fingerprint::restart_only(&raw);
    Ok(Plan {
        restart_only,
        broker,
        embedded,
        sinks: sinks.into_iter().flatten().collect(),
        rules: rules.into(),
        dead_letter,
        spool,
        shutdown_timeout: raw.shutdown_timeout.0,
        unsettled_warning: raw.unsettled_warning.0,
        admin,
        workers: raw.workers.map_or_else(
            || default_workers(raw.embedded.is_some(), cores()),
            std::num::NonZeroUsize::get,
        ),
        eval_threads: raw.eval_threads.map_or_else(
            || default_eval_threads(cores()),
            std::num::NonZeroUsize::get,
        ),
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// The async tasks' threads when `workers:` is not set. The embedded broker's
/// connections want every core. As a client there is one connection, and the rules'
/// and the spool's threads take the other cores: a second worker then mostly wakes and
/// parks (on 2 cores, one worker cut mqbridge's CPU per message by a quarter; see
/// BENCHMARKS.md, "Wake-ups, and one worker as a client").
fn default_workers(embedded: bool, cores: usize) -> usize {
    if embedded { cores } else { (cores / 2).max(1) }
}

/// The rules' threads when `eval_threads:` is not set: half the cores, at least one.
/// They share the machine with the async workers, the spool's threads and often the
/// database; on 2 cores a second one cost CPU and gained no throughput (see
/// BENCHMARKS.md, "One evaluation thread on two cores").
fn default_eval_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

fn unknown_sink(name: &str, known: &[String]) -> String {
    if known.is_empty() {
        format!("unknown sink {name:?}: no sinks are defined")
    } else {
        format!("unknown sink {name:?} (defined: {})", known.join(", "))
    }
}

/// Validates and compiles one sink; None when it has problems.
fn validate_sink(name: String, sink: SinkConfig, errs: &mut Errors) -> Option<SinkPlan> {
    if sql::quote_ident(&name).is_none() {
        errs.push((
            format!("sinks.{name}"),
            "sink names use letters, digits and '_'".into(),
        ));
    }
    let common = sink.common();
    let fingerprint = fingerprint::of(&sink);
    let settings = sink.compile().map_err(|problems| {
        for (field, msg) in problems {
            errs.push((format!("sinks.{name}.{field}"), msg));
        }
    });
    if common.concurrency == 0 || common.concurrency > 64 {
        errs.push((
            format!("sinks.{name}.concurrency"),
            "must be between 1 and 64".into(),
        ));
    }
    if common.queue == 0 {
        errs.push((format!("sinks.{name}.queue"), "must be at least 1".into()));
    }
    if common.rate_limit.is_some_and(|r| r.per_second == 0) {
        errs.push((
            format!("sinks.{name}.rate_limit.per_second"),
            "must be at least 1".into(),
        ));
    }
    Some(SinkPlan {
        name: Arc::from(name),
        settings: settings.ok()?,
        fingerprint,
    })
}

fn validate_broker(b: &BrokerConfig, rules: &[Rule], errs: &mut Errors) -> Option<BrokerPlan> {
    let before = errs.len();
    let connection = b.connection().validate().map_err(|problems| {
        errs.extend(
            problems
                .into_iter()
                .map(|(field, message)| (format!("broker.{field}"), message)),
        )
    });
    if b.qos > 2 {
        errs.push(("broker.qos".into(), "must be 0, 1 or 2".into()));
    }
    let filters: Vec<&str> = rules
        .iter()
        .flat_map(|r| r.from.iter().map(|f| f.mqtt_filter()))
        .collect();
    let mut subscriptions = Vec::new();
    for f in minimal_filters(&filters) {
        match &b.share_group {
            Some(g) => match TopicFilter::parse(f).and_then(|tf| tf.shared(g)) {
                Ok(s) => subscriptions.push(s),
                Err(e) => {
                    errs.push(("broker.share_group".into(), e.to_string()));
                    break;
                }
            },
            None => subscriptions.push(f.to_string()),
        }
    }
    (errs.len() == before).then(|| BrokerPlan {
        connection: connection.expect("no problems"),
        qos: b.qos,
        receive_maximum: b.receive_maximum,
        max_buffered: b.max_buffered.0 as usize,
        session_expiry: b.session_expiry.0,
        subscriptions,
    })
}

/// Parses `listen`-style addresses; `at` is the field path for errors.
pub(super) fn addresses(
    list: &super::raw::OneOrMany,
    at: &str,
    errs: &mut Errors,
) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for (i, a) in list.as_slice().iter().enumerate() {
        let path = match list {
            super::raw::OneOrMany::One(_) => at.to_string(),
            super::raw::OneOrMany::Many(_) => format!("{at}[{i}]"),
        };
        match a.parse::<std::net::SocketAddr>() {
            Ok(addr) => out.push(addr),
            Err(_) => errs.push((
                path,
                format!("{a:?} is not an address like 127.0.0.1:1883 or [::]:1883"),
            )),
        }
    }
    out
}

/// One ACL entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// None = `*`.
    pub username: Option<String>,
    pub allow: bool,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Checks that `hash` is a PHC string argon2 can verify against.
pub fn validate_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::password_hash::PasswordHash::new(hash)
        .map_err(|e| format!("not a PHC hash string: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "unsupported algorithm {:?}: use an argon2 hash from `mqbridge passwd`",
            parsed.algorithm.as_str()
        ));
    }
    Ok(())
}

/// The filters to subscribe to so that each message arrives once: duplicates and filters
/// covered by a broader one are dropped (overlapping subscriptions may make a broker
/// deliver a message once per subscription).
pub fn minimal_filters<'a>(filters: &[&'a str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let covered = filters
            .iter()
            .enumerate()
            .any(|(j, g)| j != i && covers(g, f) && (!covers(f, g) || j < i));
        if !covered && !out.contains(f) {
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_broker_takes_every_core_and_a_client_half() {
        assert_eq!(default_workers(true, 2), 2);
        assert_eq!(default_workers(false, 2), 1);
        assert_eq!(default_workers(false, 8), 4);
        assert_eq!(default_workers(false, 1), 1);
        assert_eq!(default_eval_threads(1), 1);
        assert_eq!(default_eval_threads(2), 1);
        assert_eq!(default_eval_threads(8), 4);
    }

    #[test]
    fn minimal_filters_drop_duplicates_and_covered_ones() {
        assert_eq!(
            minimal_filters(&["a/b", "a/#", "c", "a/#", "c"]),
            vec!["a/#", "c"]
        );
    }
}
