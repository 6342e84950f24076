//! Settings of the `postgres` sink ([`crate::sink::postgres`]): the `columns:` programs
//! are compiled here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::sql::{Table, quote_ident};
use super::{Common, HasCommon, Problems, SinkSpec};
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

/// The `postgres` sink's settings, compiled. `Debug` shows the URL without its password.
pub struct Settings {
    /// Holds the password: show it [`redacted`].
    pub url: String,
    pub table: Table,
    /// `columns:`: each column and the program that computes it from the record.
    pub columns: Option<Arc<Mapping>>,
    pub unknown_keys: UnknownKeys,
    pub time_unit: Option<TimeUnit>,
    pub on_conflict: Option<OnConflict>,
    pub migrate: bool,
    pub common: Common,
}

/// `columns:` compiled: each column and its program, in the order written.
pub type Mapping = [(String, JqProgram)];

impl Config {
    /// Validates the settings and compiles the `columns:` programs.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {}
            Ok(u) => problem(
                "url",
                format!("scheme must be postgres://, not {}://", u.scheme()),
            ),
            Err(e) => problem("url", format!("invalid URL: {e}")),
        }
        let table = Table::parse(&self.table)
            .map_err(|e| problem("table", e))
            .ok();
        let mut columns = Vec::new();
        for (col, expr) in self.columns.iter().flatten() {
            if quote_ident(col).is_none() {
                problem("columns", format!("invalid column name {col:?}"));
            }
            match JqProgram::compile(expr) {
                Ok(program) => columns.push((col.clone(), program)),
                Err(e) => problem("columns", format!("{col}: jq: {e}")),
            }
        }
        if let Some(c) = &self.on_conflict {
            if c.key.is_empty() {
                problem("on_conflict", "key needs at least one column".into());
            }
            for k in &c.key {
                if quote_ident(k).is_none() {
                    problem("on_conflict", format!("invalid column name {k:?}"));
                }
            }
        }
        match table {
            Some(table) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                columns: self.columns.map(|_| Arc::from(columns)),
                url: self.url,
                table,
                unknown_keys: self.unknown_keys,
                time_unit: self.time_unit,
                on_conflict: self.on_conflict,
                migrate: self.migrate,
            }),
            _ => Err(errs),
        }
    }
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!("postgres {} table {}", redacted(&self.url), self.table)
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &redacted(&self.url))
            .field("table", &self.table.name())
            .field("columns", &self.columns)
            .field("unknown_keys", &self.unknown_keys)
            .field("time_unit", &self.time_unit)
            .field("on_conflict", &self.on_conflict)
            .field("migrate", &self.migrate)
            .field("common", &self.common)
            .finish()
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
        let cfg: Config =
            serde_json::from_value(json!({"url": "postgres://u:pw@h/db", "table": "t"})).unwrap();
        let settings = cfg.compile().unwrap();
        assert!(!settings.describe().contains("pw"));
        assert!(!format!("{settings:?}").contains("pw"));
    }
}
