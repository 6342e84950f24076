//! What the SQL table sinks (`postgres`, `mysql`) share in their settings: the table and
//! how records become its rows (`columns:`, `unknown_keys`, `time_unit`, `on_conflict`),
//! how a missing table is created and columns added (`create:`, `add_columns`), declared
//! once by [`table_sink_config!`] and validated once by [`Insert::compile`]; and SQL
//! identifiers (table and column names) and column types, validated here when the config
//! is read and quoted by the sinks when they build statements.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Problems;
use crate::rule::jq::JqProgram;

/// Declares a SQL table sink's `Config` (through [`sink_config!`](super::sink_config))
/// with the fields every table sink has appended: `table`, `columns`, `unknown_keys`,
/// `time_unit`, `on_conflict`, `create` and `add_columns`; and its `insert`, which
/// validates them into an [`Insert`].
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
                /// Create the table when it is missing, with these columns (name → type
                /// as the database writes it) and primary key.
                #[serde(default)]
                pub create: Option<$crate::config::sinks::sql::CreateConfig>,
                /// Add a nullable column, of a type inferred from the value, for a record
                /// key that has no column (instead of applying `unknown_keys` to it).
                #[serde(default)]
                pub add_columns: bool,
            }
        }

        impl $name {
            /// The table settings, validated; pushes each problem onto `errs`.
            fn insert(
                &self,
                errs: &mut $crate::config::sinks::Problems,
            ) -> Option<$crate::config::sinks::sql::Insert> {
                $crate::config::sinks::sql::Insert::compile(
                    $crate::config::sinks::sql::TableSettings {
                        table: &self.table,
                        columns: self.columns.as_ref(),
                        unknown_keys: self.unknown_keys,
                        time_unit: self.time_unit,
                        on_conflict: self.on_conflict.as_ref(),
                        create: self.create.as_ref(),
                        add_columns: self.add_columns,
                    },
                    errs,
                )
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

/// `create:` as written: the columns of the table to create, and its primary key.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConfig {
    /// Column name → its SQL type as the database writes it (`bigint`, `double precision`,
    /// `timestamptz`, `jsonb`; `BIGINT`, `DOUBLE`, `DATETIME(6)`, `VARCHAR(255)`), in the
    /// order of the table.
    pub columns: ColumnTypes,
    /// Columns of the primary key (among `columns`).
    #[serde(default)]
    pub primary_key: Vec<String>,
}

/// `create.columns`: (name, type) in the order written (a YAML map, read in order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnTypes(pub Vec<(String, String)>);

impl Serialize for ColumnTypes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, ty) in &self.0 {
            map.serialize_entry(name, ty)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ColumnTypes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ColumnTypes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of column name to SQL type")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<ColumnTypes, A::Error> {
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some((name, ty)) = m.next_entry::<String, String>()? {
                    if out.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!("column {name:?} twice")));
                    }
                    out.push((name, ty));
                }
                Ok(ColumnTypes(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

impl schemars::JsonSchema for ColumnTypes {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ColumnTypes".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeMap<String, String>>::json_schema(generator)
    }
}

/// `create:` validated: the table's columns (name, type) and its primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Create {
    /// (name, type) in the order written; each name a valid identifier, each type
    /// [`check_type`]d.
    pub columns: Vec<(String, String)>,
    pub primary_key: Vec<String>,
}

/// `columns:` compiled: each column and its program, in the order written.
pub type Mapping = [(String, JqProgram)];

/// The settings every table sink shares, as written (borrowed from its `Config`).
pub struct TableSettings<'a> {
    pub table: &'a str,
    pub columns: Option<&'a BTreeMap<String, String>>,
    pub unknown_keys: UnknownKeys,
    pub time_unit: Option<TimeUnit>,
    pub on_conflict: Option<&'a OnConflict>,
    pub create: Option<&'a CreateConfig>,
    pub add_columns: bool,
}

/// How records become rows of a table, validated: the settings every table sink shares.
#[derive(Debug, Clone)]
pub struct Insert {
    pub table: Table,
    /// `columns:`: each column and the program that computes it from the record.
    pub columns: Option<Arc<Mapping>>,
    pub unknown_keys: UnknownKeys,
    pub time_unit: Option<TimeUnit>,
    pub on_conflict: Option<OnConflict>,
    /// `create:`: the table to create when it is missing.
    pub create: Option<Create>,
    /// `add_columns: true`: a record key with no column becomes a nullable column.
    pub add_columns: bool,
}

impl Insert {
    /// What `mqbridge check` adds after the table's name: how it changes on demand.
    pub fn on_demand(&self) -> &'static str {
        match (self.create.is_some(), self.add_columns) {
            (true, true) => " (created when missing, columns added for new keys)",
            (true, false) => " (created when missing)",
            (false, true) => " (columns added for new keys)",
            (false, false) => "",
        }
    }

    /// Validates the table and column names and types and compiles the `columns:`
    /// programs; pushes each problem onto `errs`.
    pub fn compile(s: TableSettings<'_>, errs: &mut Problems) -> Option<Insert> {
        let before = errs.len();
        let mut problem = |field: &str, message: String| errs.push((field.to_string(), message));
        let table = Table::parse(s.table).map_err(|e| problem("table", e)).ok();
        let mut programs = Vec::new();
        for (col, expr) in s.columns.into_iter().flatten() {
            if quote_ident(col).is_none() {
                problem("columns", format!("invalid column name {col:?}"));
            }
            match JqProgram::compile(expr) {
                Ok(program) => programs.push((col.clone(), program)),
                Err(e) => problem("columns", format!("{col}: jq: {e}")),
            }
        }
        if let Some(c) = s.on_conflict {
            if c.key.is_empty() {
                problem("on_conflict", "key needs at least one column".into());
            }
            for k in &c.key {
                if quote_ident(k).is_none() {
                    problem("on_conflict", format!("invalid column name {k:?}"));
                }
            }
        }
        if let Some(c) = s.create {
            for (col, ty) in &c.columns.0 {
                let field = format!("create.columns.{col}");
                if quote_ident(col).is_none() {
                    problem(&field, format!("invalid column name {col:?}"));
                }
                if let Err(e) = check_type(ty) {
                    problem(&field, e);
                }
            }
            if c.columns.0.is_empty() {
                problem("create.columns", "needs at least one column".into());
            }
            for (i, k) in c.primary_key.iter().enumerate() {
                if c.primary_key[..i].contains(k) {
                    problem("create.primary_key", format!("{k:?} twice"));
                } else if !c.columns.0.iter().any(|(col, _)| col == k) {
                    problem(
                        "create.primary_key",
                        format!("{k:?} is not among create.columns"),
                    );
                }
            }
        }
        if s.add_columns && s.columns.is_some() {
            problem(
                "add_columns",
                "adds columns for record keys; with `columns:`, list the columns in \
                 `create.columns` instead"
                    .into(),
            );
        }
        (errs.len() == before).then(|| Insert {
            table: table.expect("a valid table"),
            columns: s.columns.map(|_| Arc::from(programs)),
            unknown_keys: s.unknown_keys,
            time_unit: s.time_unit,
            on_conflict: s.on_conflict.cloned(),
            create: s.create.map(|c| Create {
                columns: c.columns.0.clone(),
                primary_key: c.primary_key.clone(),
            }),
            add_columns: s.add_columns,
        })
    }
}

/// Checks a column type of `create.columns`, written as the database names it: words of
/// letters, digits and `_` separated by spaces (`double precision`, `timestamp with time
/// zone`), with balanced parentheses holding words, numbers and commas (`numeric(10,2)`,
/// `DATETIME(6)`), and PostgreSQL's array brackets (`text[]`, `int[3]`). Nothing that
/// could end the statement or start another: no quotes, `;`, comments or operators.
pub fn check_type(ty: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid type {ty:?}: {why}"));
    if !ty.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return bad("starts with a letter");
    }
    if ty.len() > 100 {
        return bad("at most 100 characters");
    }
    let (mut parens, mut brackets) = (0u32, false);
    for c in ty.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | ' ' if !brackets || c.is_ascii_digit() => {}
            '(' if !brackets => parens += 1,
            ')' if parens > 0 => parens -= 1,
            ',' if parens > 0 => {}
            '[' if parens == 0 && !brackets => brackets = true,
            ']' if brackets => brackets = false,
            _ => {
                return bad(
                    "use letters, digits, '_' and spaces, with numbers or words in parentheses \
                     (`numeric(10,2)`) and `[]` for arrays",
                );
            }
        }
    }
    if parens > 0 || brackets {
        return bad("unbalanced parentheses or brackets");
    }
    Ok(())
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

    #[test]
    fn column_types() {
        for good in [
            "bigint",
            "double precision",
            "timestamp with time zone",
            "numeric(10,2)",
            "numeric(10, 2)",
            "VARCHAR(255)",
            "DATETIME(6)",
            "text[]",
            "int[3][]",
            "bigint NOT NULL",
        ] {
            assert_eq!(check_type(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            " int",
            "(int)",
            "int; drop table x",
            "text -- comment",
            "text /* c */",
            "varchar(10",
            "int)",
            "int, evil text",
            "enum('a','b')",
            "text default \"x\"",
            "int check (x > 0)",
            "text[a]",
            "text[(1)]",
            "int\nx",
        ] {
            assert!(check_type(bad).is_err(), "{bad:?}");
        }
    }

    /// The table settings as written (YAML keeps the order of maps).
    #[derive(Deserialize)]
    struct Written {
        table: String,
        columns: Option<BTreeMap<String, String>>,
        create: Option<CreateConfig>,
        #[serde(default)]
        add_columns: bool,
    }

    fn compile(w: Written) -> Result<Insert, Problems> {
        let mut errs = Problems::new();
        let insert = Insert::compile(
            TableSettings {
                table: &w.table,
                columns: w.columns.as_ref(),
                unknown_keys: UnknownKeys::Ignore,
                time_unit: None,
                on_conflict: None,
                create: w.create.as_ref(),
                add_columns: w.add_columns,
            },
            &mut errs,
        );
        insert.ok_or(errs)
    }

    #[test]
    fn create_keeps_the_written_order_and_checks_each_column() {
        let yaml = "{table: t, create: {columns: {ts: timestamptz, device: text, a: \"numeric(10,2)\"}, \
                    primary_key: [device, ts]}, add_columns: true}";
        let create = compile(yaml_serde::from_str(yaml).unwrap())
            .unwrap()
            .create
            .unwrap();
        let names: Vec<&str> = create.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ts", "device", "a"]);
        assert_eq!(create.primary_key, ["device", "ts"]);

        let errs = compile(
            serde_json::from_value(serde_json::json!({
                "table": "t",
                "columns": {"a": ".a"},
                "add_columns": true,
                "create": {
                    "columns": {"ok": "int", "bad name": "int", "x": "int; drop table t"},
                    "primary_key": ["ok", "y", "ok"]
                }
            }))
            .unwrap(),
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "create.columns.bad name",
                "create.columns.x",
                "create.primary_key",
                "create.primary_key",
                "add_columns"
            ],
            "{errs:?}"
        );
        assert!(
            errs[1].1.starts_with("invalid type \"int; drop table t\""),
            "{errs:?}"
        );
        assert_eq!(errs[2].1, "\"y\" is not among create.columns");
        assert_eq!(errs[3].1, "\"ok\" twice");

        let twice = yaml_serde::from_str::<CreateConfig>("{columns: {a: int, a: text}}");
        assert!(twice.is_err());
        let empty = yaml_serde::from_str("{table: t, create: {columns: {}}}").unwrap();
        let empty = compile(empty);
        assert_eq!(empty.unwrap_err()[0].0, "create.columns");
    }
}
