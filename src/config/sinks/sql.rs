//! What the SQL table sinks (`postgres`, `mysql`) share in their settings: the table and
//! how records become its rows (`columns:`, `unknown_keys`, `time_unit`, `on_conflict`),
//! declared once by [`table_sink_config!`] and validated once by [`Insert::compile`]; and
//! SQL identifiers (table and column names), validated here when the config is read and
//! quoted by the sinks when they build statements.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Problems;
use crate::rule::jq::JqProgram;

/// Declares a SQL table sink's `Config` (through [`sink_config!`](super::sink_config))
/// with the fields every table sink has appended: `table`, `columns`, `unknown_keys`,
/// `time_unit` and `on_conflict`.
macro_rules! table_sink_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $crate::config::sinks::sink_config! {
            $(#[$meta])*
            pub struct $name {
                $($(#[$fmeta])* pub $field: $ty,)*
                /// Table to insert into: `name` or `schema.name` (for MySQL and MariaDB,
                /// `database.name`).
                pub table: String,
                /// Column → jq expression over the record (e.g. `temp: .payload.temp`).
                /// Without it, record keys map to columns of the same name.
                #[serde(default)]
                pub columns: Option<std::collections::BTreeMap<String, String>>,
                /// What to do with a record key that has no column: `ignore` (default) or
                /// `error` (the record goes to the dead letter).
                #[serde(default)]
                pub unknown_keys: $crate::config::sinks::sql::UnknownKeys,
                /// Unit of numbers written to timestamp/date columns: `s` or `ms`. Default:
                /// by magnitude (above 10^11 means milliseconds).
                #[serde(default)]
                pub time_unit: Option<$crate::config::sinks::sql::TimeUnit>,
                /// Skip or update rows whose key already exists, so redelivered messages do
                /// not duplicate rows. The key needs a unique index.
                #[serde(default)]
                pub on_conflict: Option<$crate::config::sinks::sql::OnConflict>,
            }
        }
    };
}
pub(crate) use table_sink_config;

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

/// `columns:` compiled: each column and its program, in the order written.
pub type Mapping = [(String, JqProgram)];

/// How records become rows of a table, validated: the settings every table sink shares.
#[derive(Debug, Clone)]
pub struct Insert {
    pub table: Table,
    /// `columns:`: each column and the program that computes it from the record.
    pub columns: Option<Arc<Mapping>>,
    pub unknown_keys: UnknownKeys,
    pub time_unit: Option<TimeUnit>,
    pub on_conflict: Option<OnConflict>,
}

impl Insert {
    /// Validates the table and column names and compiles the `columns:` programs; pushes
    /// each problem onto `errs`.
    pub fn compile(
        table: &str,
        columns: Option<BTreeMap<String, String>>,
        unknown_keys: UnknownKeys,
        time_unit: Option<TimeUnit>,
        on_conflict: Option<OnConflict>,
        errs: &mut Problems,
    ) -> Option<Insert> {
        let before = errs.len();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        let table = Table::parse(table).map_err(|e| problem("table", e)).ok();
        let mut programs = Vec::new();
        for (col, expr) in columns.iter().flatten() {
            if quote_ident(col).is_none() {
                problem("columns", format!("invalid column name {col:?}"));
            }
            match JqProgram::compile(expr) {
                Ok(program) => programs.push((col.clone(), program)),
                Err(e) => problem("columns", format!("{col}: jq: {e}")),
            }
        }
        if let Some(c) = &on_conflict {
            if c.key.is_empty() {
                problem("on_conflict", "key needs at least one column".into());
            }
            for k in &c.key {
                if quote_ident(k).is_none() {
                    problem("on_conflict", format!("invalid column name {k:?}"));
                }
            }
        }
        (errs.len() == before).then(|| Insert {
            table: table.expect("a valid table"),
            columns: columns.map(|_| Arc::from(programs)),
            unknown_keys,
            time_unit,
            on_conflict,
        })
    }
}

/// Checks that `url` parses and has one of `schemes`; pushes the problem onto `errs`.
pub fn check_url(url: &str, schemes: &[&str], errs: &mut Problems) {
    match url::Url::parse(url) {
        Ok(u) if schemes.contains(&u.scheme()) => {}
        Ok(u) => errs.push((
            "url".into(),
            format!("scheme must be {}://, not {}://", schemes[0], u.scheme()),
        )),
        Err(e) => errs.push(("url".into(), format!("invalid URL: {e}"))),
    }
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

/// A validated table name, `name` or `schema.name`: as written, and quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    name: String,
    quoted: String,
}

impl Table {
    /// Checks that `name` (or `schema.name`) is made of plain SQL identifiers.
    pub fn parse(name: &str) -> Result<Table, String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.is_empty() || parts.len() > 2 {
            return Err(format!("invalid table name {name:?}"));
        }
        let mut quoted = Vec::new();
        for p in parts {
            quoted.push(quote_ident(p).ok_or_else(|| {
                format!("invalid table name {name:?}: use letters, digits and '_' (not starting with a digit)")
            })?);
        }
        Ok(Table {
            name: name.to_string(),
            quoted: quoted.join("."),
        })
    }

    /// The name as written, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted, for statements: `"schema"."name"`.
    pub fn quoted(&self) -> &str {
        &self.quoted
    }

    /// The schema (None when not written) and the table's own name, unquoted.
    pub fn parts(&self) -> (Option<&str>, &str) {
        match self.name.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, &self.name),
        }
    }

    /// The table's own name without its schema, quoted: `"name"`.
    pub fn quoted_base(&self) -> &str {
        self.quoted.rsplit('.').next().unwrap_or(&self.quoted)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Quotes a validated identifier: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes.
pub fn quote_ident(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok = first_ok && name.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| format!("\"{name}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        let quoted = |name| Table::parse(name).unwrap().quoted().to_string();
        assert_eq!(quoted("readings"), "\"readings\"");
        assert_eq!(quoted("main.readings"), "\"main\".\"readings\"");
        let table = Table::parse("main.readings").unwrap();
        assert_eq!(
            (table.name(), table.quoted_base()),
            ("main.readings", "\"readings\"")
        );
        for bad in ["", "a b", "x;drop", "1abc", "a.b.c", "r\"x"] {
            assert!(Table::parse(bad).is_err(), "{bad}");
        }
    }
}
