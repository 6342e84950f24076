//! Sinks' settings: each entry of `sinks:` as written (serde types, which also make the
//! JSON schema), and its compilation into the [`SinkSettings`] the plan holds: validated,
//! with its templates and jq programs compiled (once: `run`, `check` and `try` all use
//! these), and the line `mqbridge check` prints for it. Opening a sink from its settings,
//! and what `mqbridge try` shows it would do, is [`crate::sink`]'s.
//!
//! Adding a sink type: here, a module with a `Config` declared through [`sink_config!`]
//! (which adds the settings every sink shares), its `compile` into the `Settings` the
//! sink opens with (an implementation of [`SinkSpec`]), and a variant in [`SinkConfig`]
//! and in [`SinkSettings`]; in [`crate::sink`], the sink and how it opens.

pub mod file;
pub mod influxdb;
pub mod kafka;
pub mod mqtt;
pub mod mysql;
pub mod nats;
pub mod postgres;
pub mod republish;
pub mod sql;
pub mod sqlite;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units;

/// Problems as (field, message), the field relative to the sink (`url`, `headers.X-Key`).
pub type Problems = Vec<(String, String)>;

/// One entry of `sinks:`, by `type`, as written.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Postgres(postgres::Config),
    Mysql(mysql::Config),
    Sqlite(sqlite::Config),
    Republish(republish::Config),
    Mqtt(mqtt::Config),
    Nats(nats::Config),
    Kafka(kafka::Config),
    File(file::Config),
    Webhook(webhook::Config),
    // Boxed: its settings are much larger than the other types'.
    Influxdb(Box<influxdb::Config>),
}

impl SinkConfig {
    /// Validates the settings and compiles their templates and programs; pure, no I/O.
    /// On failure, every problem.
    pub fn compile(self) -> Result<SinkSettings, Problems> {
        Ok(match self {
            SinkConfig::Postgres(c) => SinkSettings::Postgres(c.compile()?),
            SinkConfig::Mysql(c) => SinkSettings::Mysql(c.compile()?),
            SinkConfig::Sqlite(c) => SinkSettings::Sqlite(c.compile()?),
            SinkConfig::Republish(c) => SinkSettings::Republish(c.compile()?),
            SinkConfig::Mqtt(c) => SinkSettings::Mqtt(c.compile()?),
            SinkConfig::Nats(c) => SinkSettings::Nats(c.compile()?),
            SinkConfig::Kafka(c) => SinkSettings::Kafka(c.compile()?),
            SinkConfig::File(c) => SinkSettings::File(c.compile()?),
            SinkConfig::Webhook(c) => SinkSettings::Webhook(c.compile()?),
            SinkConfig::Influxdb(c) => SinkSettings::Influxdb((*c).compile()?),
        })
    }

    /// The settings every sink has.
    pub fn common(&self) -> Common {
        match self {
            SinkConfig::Postgres(c) => c.common(),
            SinkConfig::Mysql(c) => c.common(),
            SinkConfig::Sqlite(c) => c.common(),
            SinkConfig::Republish(c) => c.common(),
            SinkConfig::Mqtt(c) => c.common(),
            SinkConfig::Nats(c) => c.common(),
            SinkConfig::Kafka(c) => c.common(),
            SinkConfig::File(c) => c.common(),
            SinkConfig::Webhook(c) => c.common(),
            SinkConfig::Influxdb(c) => c.common(),
        }
    }

    /// Environment variables the sink reads when it opens, as (field, variable name), so
    /// that loading the config can tell a missing one.
    pub fn env_vars(&self) -> Vec<(&'static str, &str)> {
        match self {
            SinkConfig::Webhook(c) => c.env_vars(),
            SinkConfig::Influxdb(c) => c.env_vars(),
            _ => Vec::new(),
        }
    }

    /// Files the sink reads when it opens or connects, as (field, path), so that loading
    /// the config can tell a missing one.
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        match self {
            SinkConfig::Mqtt(c) => c.files(),
            SinkConfig::Influxdb(c) => c.files(),
            SinkConfig::Nats(c) => c.files(),
            SinkConfig::Kafka(c) => c.files(),
            _ => Vec::new(),
        }
    }
}

/// One sink's settings as the plan holds them: validated, templates and jq programs
/// compiled. The sink opens with them, and `mqbridge try` uses them as they are.
#[derive(Debug)]
pub enum SinkSettings {
    Postgres(postgres::Settings),
    Mysql(mysql::Settings),
    Sqlite(sqlite::Settings),
    Republish(republish::Settings),
    Mqtt(mqtt::Settings),
    Nats(nats::Settings),
    Kafka(kafka::Settings),
    File(file::Settings),
    Webhook(webhook::Settings),
    Influxdb(influxdb::Settings),
}

impl SinkSettings {
    /// The sink's `type:`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSettings::Postgres(_) => "postgres",
            SinkSettings::Mysql(_) => "mysql",
            SinkSettings::Sqlite(_) => "sqlite",
            SinkSettings::Republish(_) => "republish",
            SinkSettings::Mqtt(_) => "mqtt",
            SinkSettings::Nats(_) => "nats",
            SinkSettings::Kafka(_) => "kafka",
            SinkSettings::File(_) => "file",
            SinkSettings::Webhook(_) => "webhook",
            SinkSettings::Influxdb(_) => "influxdb",
        }
    }

    /// What every sink type's settings have: the shared settings and a description.
    pub fn spec(&self) -> &dyn SinkSpec {
        match self {
            SinkSettings::Postgres(s) => s,
            SinkSettings::Mysql(s) => s,
            SinkSettings::Sqlite(s) => s,
            SinkSettings::Republish(s) => s,
            SinkSettings::Mqtt(s) => s,
            SinkSettings::Nats(s) => s,
            SinkSettings::Kafka(s) => s,
            SinkSettings::File(s) => s,
            SinkSettings::Webhook(s) => s,
            SinkSettings::Influxdb(s) => s,
        }
    }
}

/// A sink type's compiled settings: the settings every sink shares, and the description
/// `check` prints.
pub trait SinkSpec: HasCommon + Send + Sync {
    /// One line for `mqbridge check`.
    fn describe(&self) -> String;
}

/// How records are grouped into writes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in one write.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// How long a batch may wait for more records once it has one. Whatever is already
    /// queued is always taken at once, so under load batches fill without waiting.
    #[serde(default = "default_max_wait")]
    pub max_wait: units::Duration,
}

fn default_max_rows() -> usize {
    1000
}
fn default_max_wait() -> units::Duration {
    units::Duration(Duration::from_millis(5))
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_rows: default_max_rows(),
            max_wait: default_max_wait(),
        }
    }
}

/// `retry:` of a sink. By default transient errors are retried without limit (the queue
/// holds and the source is held back): nothing is dead-lettered just because a database
/// was down for a while. Set `max_attempts` or `max_elapsed` to give up into the dead letter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 0 = no limit.
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default = "default_initial_delay")]
    pub initial_delay: units::Duration,
    #[serde(default = "default_max_delay")]
    pub max_delay: units::Duration,
    /// Give up once this long has passed since the first attempt.
    #[serde(default)]
    pub max_elapsed: Option<units::Duration>,
}

fn default_initial_delay() -> units::Duration {
    units::Duration(Duration::from_millis(100))
}
fn default_max_delay() -> units::Duration {
    units::Duration(Duration::from_secs(30))
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 0,
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
            max_elapsed: None,
        }
    }
}

/// Settings every sink has, whatever its type (added to each `Config` by [`sink_config!`]).
#[derive(Debug, Clone, Copy)]
pub struct Common {
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub queue: usize,
    pub concurrency: usize,
    pub rate_limit: Option<RateLimit>,
}

/// `rate_limit:` of a sink: records per second, with bursts up to one second's worth.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
}

pub(crate) fn default_queue() -> usize {
    10_000
}

pub(crate) fn default_concurrency() -> usize {
    1
}

/// Declares a sink's `Config` struct with the fields every sink shares appended:
/// `batch`, `retry`, `queue`, `concurrency` and `rate_limit`.
macro_rules! sink_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// How records are grouped into writes.
            #[serde(default)]
            pub batch: $crate::config::sinks::BatchConfig,
            /// Retries of transient failures.
            #[serde(default)]
            pub retry: $crate::config::sinks::RetryConfig,
            /// Records waiting for this sink before the source is held back.
            #[serde(default = "crate::config::sinks::default_queue")]
            pub queue: usize,
            /// Batches written at the same time. Records are split into this many lanes by
            /// topic, so the messages of one topic still arrive in order.
            #[serde(default = "crate::config::sinks::default_concurrency")]
            pub concurrency: usize,
            /// Upper bound on records written per second.
            #[serde(default)]
            pub rate_limit: Option<$crate::config::sinks::RateLimit>,
        }

        impl $crate::config::sinks::HasCommon for $name {
            fn common(&self) -> $crate::config::sinks::Common {
                $crate::config::sinks::Common {
                    batch: self.batch,
                    retry: self.retry,
                    queue: self.queue,
                    concurrency: self.concurrency,
                    rate_limit: self.rate_limit,
                }
            }
        }
    };
}
pub(crate) use sink_config;

/// Access to the shared settings (implemented by [`sink_config!`]).
pub trait HasCommon {
    fn common(&self) -> Common;
}

/// Test support: checks that the JSON Schema's variant for sink type `kind` has exactly
/// the properties `yaml` (a sink of that type with every setting) serializes back to,
/// and no others allowed; returns them.
#[cfg(test)]
pub(crate) fn schema_properties_are_the_settings(yaml: &str, kind: &str) -> Vec<String> {
    let config: SinkConfig = yaml_serde::from_str(yaml).unwrap();
    let mut written: Vec<String> = match serde_json::to_value(&config).unwrap() {
        serde_json::Value::Object(o) => o.keys().cloned().collect(),
        other => panic!("{other}"),
    };
    written.sort();
    let schema = serde_json::to_value(schemars::schema_for!(SinkConfig)).unwrap();
    let variant = schema["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["properties"]["type"]["const"] == kind)
        .unwrap_or_else(|| panic!("a {kind} variant"));
    let mut properties: Vec<String> = variant["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    properties.sort();
    assert_eq!(properties, written);
    assert_eq!(variant["additionalProperties"], false);
    properties
}
