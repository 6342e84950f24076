//! Settings of the `postgres` sink ([`crate::sink::postgres`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SinkSpec;
use super::sql::{quote_ident, quote_table};
use crate::rule::jq::JqProgram;

super::sink_config! {
    /// `type: postgres`.
    pub struct Config {
        /// `postgres://user[:password]@host[:port]/database[?sslmode=require]`; keep the
        /// password in `${ENV}`.
        pub url: String,
        /// Table to insert into: `name` or `schema.name`.
        pub table: String,
        /// Column → jq expression over the record (e.g. `temp: .payload.temp`). Without it,
        /// record keys map to columns of the same name.
        #[serde(default)]
        pub columns: Option<BTreeMap<String, String>>,
        /// What to do with a record key that has no column: `ignore` (default) or `error`
        /// (the record goes to the dead letter).
        #[serde(default)]
        pub unknown_keys: UnknownKeys,
        /// Unit of numbers written to timestamp/date columns: `s` or `ms`. Default: by
        /// magnitude (above 10^11 means milliseconds).
        #[serde(default)]
        pub time_unit: Option<TimeUnit>,
        /// Skip or update rows whose key already exists, so redelivered messages do not
        /// duplicate rows. The key needs a unique index.
        #[serde(default)]
        pub on_conflict: Option<OnConflict>,
        /// Apply mqbridge's own migrations (`migrations/postgres`: `mqbridge_messages`,
        /// `mqbridge_dead_letters`) at start.
        #[serde(default)]
        pub migrate: bool,
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum UnknownKeys {
    #[default]
    Ignore,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    S,
    Ms,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnConflict {
    /// Columns of a unique index or primary key.
    pub key: Vec<String>,
    pub action: ConflictAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConflictAction {
    /// Keep the existing row.
    Ignore,
    /// Overwrite the existing row's other columns.
    Update,
}

/// The URL without its password, for plans and logs.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(invalid URL)".to_string(),
    }
}

impl SinkSpec for Config {
    fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            Ok(u) => errs.push((
                "url",
                format!("scheme must be postgres://, not {}://", u.scheme()),
            )),
            Err(e) => errs.push(("url", format!("invalid URL: {e}"))),
        }
        if let Err(e) = quote_table(&self.table) {
            errs.push(("table", e));
        }
        for (col, expr) in self.columns.iter().flatten() {
            if quote_ident(col).is_none() {
                errs.push(("columns", format!("invalid column name {col:?}")));
            }
            if let Err(e) = JqProgram::compile(expr) {
                errs.push(("columns", format!("{col}: jq: {e}")));
            }
        }
        if let Some(c) = &self.on_conflict {
            if c.key.is_empty() {
                errs.push(("on_conflict", "key needs at least one column".into()));
            }
            for k in &c.key {
                if quote_ident(k).is_none() {
                    errs.push(("on_conflict", format!("invalid column name {k:?}")));
                }
            }
        }
        errs
    }

    fn describe(&self) -> String {
        format!("postgres {} table {}", redacted(&self.url), self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redacted("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert!(
            !Config::describe(
                &serde_json::from_value(json!({"url": "postgres://u:pw@h/db", "table": "t"}))
                    .unwrap()
            )
            .contains("pw")
        );
    }
}
