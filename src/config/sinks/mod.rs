//! Sinks' settings: each entry of `sinks:` as written (serde types, which also make the
//! JSON schema), its pure validation, and the line `mqbridge check` prints for it.
//! Opening a sink from its settings, and what `mqbridge try` shows it would do, is
//! [`crate::sink`]'s.
//!
//! Adding a sink type: here, a module with a `Config` declared through [`sink_config!`]
//! (which adds the settings every sink shares), an implementation of [`SinkSpec`] for it,
//! and a variant in [`SinkConfig`]; in [`crate::sink`], the sink and how it opens.

pub mod file;
pub mod postgres;
pub mod republish;
pub mod sql;
pub mod sqlite;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::units;

/// One entry of `sinks:`, by `type`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Postgres(postgres::Config),
    Sqlite(sqlite::Config),
    Republish(republish::Config),
    File(file::Config),
    Webhook(webhook::Config),
}

impl SinkConfig {
    pub fn spec(&self) -> &dyn SinkSpec {
        match self {
            SinkConfig::Postgres(c) => c,
            SinkConfig::Sqlite(c) => c,
            SinkConfig::Republish(c) => c,
            SinkConfig::File(c) => c,
            SinkConfig::Webhook(c) => c,
        }
    }
}

/// A sink type's settings: validation and the description `check` prints.
pub trait SinkSpec: HasCommon + Send + Sync {
    /// Problems as (field, message); pure, no I/O.
    fn validate(&self) -> Vec<(&'static str, String)>;
    /// Problems in fields whose path is only known at run time, such as a map entry
    /// (`headers.Authorization`), as (field, message); most sinks have none.
    fn validate_entries(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Environment variables the sink reads when it opens, as (field, variable name), so
    /// that loading the config can tell a missing one; most sinks read none.
    fn env_vars(&self) -> Vec<(&'static str, &str)> {
        Vec::new()
    }
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
