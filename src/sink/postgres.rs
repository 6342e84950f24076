//! `postgres` sink: inserts records into a PostgreSQL table.
//!
//! Columns are discovered from the catalog (at start, and again after a transient
//! failure, so a migrated table is picked up). Record keys map to columns, or an explicit
//! `columns:` map computes each column with a jq expression over the record; those
//! programs run on the [evaluation pool](crate::eval_pool), each record's under the same
//! deadline as a rule's (a runaway record is dead-lettered). A batch is
//! one transaction of `INSERT … SELECT … FROM UNNEST($1::text[], …)`: one array parameter
//! per column, each value sent as text and cast by PostgreSQL to the column's type, so the
//! database does the type checking and a bad value fails with its SQLSTATE. Values are
//! always bound; identifiers are validated and quoted.

use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::RwLock;

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::postgres::{
    ConflictAction, Mapping, OnConflict, Settings, TimeUnit, UnknownKeys, redacted,
};
use crate::config::sinks::sql::Table;
use crate::eval_pool::{EvalError, EvalPool};
use crate::rule::jq::{self, Deadline};

/// What writing `record` would do, for `mqbridge try`.
pub fn would(cfg: &Settings, _: &Origin, record: &serde_json::Value) -> String {
    let cols: Vec<String> = match &cfg.columns {
        Some(mapping) => mapping.iter().map(|(c, _)| c.clone()).collect(),
        None => record
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };
    let conflict = match &cfg.on_conflict {
        Some(c) => {
            let action = match c.action {
                ConflictAction::Ignore => "ignore",
                ConflictAction::Update => "update",
            };
            format!(" on conflict ({}) {action}", c.key.join(", "))
        }
        None => String::new(),
    };
    format!(
        "postgres: insert into {} the columns among ({}){conflict}",
        cfg.table,
        cols.join(", ")
    )
}

/// How a value is turned into text for a column (public for `benches/pipeline.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Bool,
    Timestamp,
    Date,
    Json,
    Array,
    /// Text, numbers and everything PostgreSQL can cast from text.
    Plain,
}

#[derive(Debug, Clone)]
struct Column {
    /// `format_type()` of the column, used as the cast target.
    sql_type: String,
    class: Class,
}

pub struct PostgresSink {
    pool: PgPool,
    table: Table,
    /// Discovered columns; None until discovered, reset after a transient failure.
    columns: RwLock<Option<Arc<HashMap<String, Column>>>>,
    /// `columns:`: each column's program (compiled with the config).
    mapping: Option<Arc<Mapping>>,
    /// Where the `columns:` programs run.
    eval: EvalPool,
    unknown_keys: UnknownKeys,
    time_unit: Option<TimeUnit>,
    on_conflict: Option<OnConflict>,
}

/// Why the postgres sink could not open. A URL in a message has no password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is not one sqlx can connect with.
    #[error("url {url}: {error}")]
    Url { url: String, error: sqlx::Error },
    /// `migrate: true`, and the migrations failed.
    #[error("migrations on {url}: {error}")]
    Migrate {
        url: String,
        error: sqlx::migrate::MigrateError,
    },
    /// The table cannot be written to: it does not exist, or the database refused it for
    /// good (waiting would not help).
    #[error("{0}")]
    Table(SinkError),
}

impl PostgresSink {
    /// Opens the sink: applies the migrations when asked, and checks the table when the
    /// database is reachable.
    pub async fn open(cfg: &Settings, eval: EvalPool) -> Result<Self, OpenError> {
        let sink = Self::new(cfg, eval)?;
        if cfg.migrate {
            super::migrate::apply(super::migrate::POSTGRES, &sink.pool)
                .await
                .map_err(|error| OpenError::Migrate {
                    url: redacted(&cfg.url),
                    error,
                })?;
        }
        // Check the table now when the database is up; if it is down, start anyway:
        // writes wait and retry until it is back.
        match tokio::time::timeout(Duration::from_secs(5), sink.columns()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind == super::ErrorKind::Permanent => {
                return Err(OpenError::Table(e));
            }
            Ok(Err(e)) => {
                tracing::warn!(table = %cfg.table, error = %e, "postgres not reachable yet; will retry on write")
            }
            Err(_) => {
                tracing::warn!(table = %cfg.table, "postgres not reachable yet; will retry on write")
            }
        }
        Ok(sink)
    }

    /// The sink with a connection pool that connects on first use.
    fn new(cfg: &Settings, eval: EvalPool) -> Result<Self, OpenError> {
        let opts = PgConnectOptions::from_str(&cfg.url)
            .map_err(|error| OpenError::Url {
                url: redacted(&cfg.url),
                error,
            })?
            .application_name("mqbridge");
        let pool = PgPoolOptions::new()
            .max_connections(cfg.common.concurrency.max(1) as u32 + 1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(opts);
        Ok(PostgresSink {
            pool,
            table: cfg.table.clone(),
            columns: RwLock::new(None),
            mapping: cfg.columns.clone(),
            eval,
            unknown_keys: cfg.unknown_keys,
            time_unit: cfg.time_unit,
            on_conflict: cfg.on_conflict.clone(),
        })
    }

    /// The table's columns, discovered once (again after a transient failure).
    async fn columns(&self) -> Result<Arc<HashMap<String, Column>>, SinkError> {
        if let Some(c) = self.columns.read().await.as_ref() {
            return Ok(Arc::clone(c));
        }
        let rows = sqlx::query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type, \
                    t.typname::text AS typname, t.typcategory::text AS category \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(self.table.quoted())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        if rows.is_empty() {
            return Err(SinkError::permanent(format!(
                "table {} does not exist (create it, or set `migrate: true` and use mqbridge_messages)",
                self.table
            )));
        }
        let mut map = HashMap::new();
        for r in rows {
            let typname: String = r.get("typname");
            let category: String = r.get("category");
            let class = match (typname.as_str(), category.as_str()) {
                ("bool", _) => Class::Bool,
                ("timestamptz" | "timestamp", _) => Class::Timestamp,
                ("date", _) => Class::Date,
                ("json" | "jsonb", _) => Class::Json,
                (_, "A") => Class::Array,
                _ => Class::Plain,
            };
            map.insert(
                r.get::<String, _>("name"),
                Column {
                    sql_type: r.get("sql_type"),
                    class,
                },
            );
        }
        let map = Arc::new(map);
        *self.columns.write().await = Some(Arc::clone(&map));
        Ok(map)
    }

    /// The (column, value) pairs of each record of a batch: computed by the `columns:`
    /// programs on the evaluation pool, or else the record's keys that are columns.
    async fn fields<'b>(
        &self,
        batch: &'b [Delivery],
        columns: &HashMap<String, Column>,
    ) -> Vec<Result<Fields<'b>, SinkError>> {
        let Some(mapping) = &self.mapping else {
            return batch
                .iter()
                .map(|d| self.keyed(&d.record, columns))
                .collect();
        };
        if let Some((col, _)) = mapping.iter().find(|(c, _)| !columns.contains_key(c)) {
            let e = SinkError::permanent(format!("column {col} does not exist in {}", self.table));
            return vec![Err(e); batch.len()];
        }
        let records: Vec<serde_json::Value> = batch.iter().map(|d| d.record.clone()).collect();
        let (mapping, limit) = (Arc::clone(mapping), self.eval.limit());
        let job = move || {
            let run = |r: &serde_json::Value| map_record(&mapping, r, Deadline::after(limit));
            records.iter().map(run).collect()
        };
        match self.eval.run(job).await {
            Ok(fields) => fields,
            // The driver isolates a panic and dead-letters its record.
            Err(EvalError::Panicked(payload)) => std::panic::resume_unwind(payload),
            Err(e @ EvalError::Stopped) => {
                vec![Err(SinkError::transient(e.to_string())); batch.len()]
            }
        }
    }

    /// The record's keys that are columns of the table, with their values (borrowed).
    fn keyed<'b>(
        &self,
        record: &'b serde_json::Value,
        columns: &HashMap<String, Column>,
    ) -> Result<Fields<'b>, SinkError> {
        let mut out = Vec::new();
        let obj = record
            .as_object()
            .ok_or_else(|| SinkError::permanent("record is not a JSON object"))?;
        for (k, v) in obj {
            if columns.contains_key(k) {
                out.push((Cow::Borrowed(k.as_str()), Cow::Borrowed(v)));
            } else if self.unknown_keys == UnknownKeys::Error {
                return Err(SinkError::permanent(format!(
                    "record key {k:?} has no column in {}",
                    self.table
                )));
            }
        }
        if out.is_empty() {
            return Err(SinkError::permanent(format!(
                "record has no key matching a column of {}",
                self.table
            )));
        }
        Ok(out)
    }

    /// One record as a row: its column names and each value as text for PostgreSQL to cast.
    fn row<'b>(
        &self,
        fields: Fields<'b>,
        columns: &HashMap<String, Column>,
    ) -> Result<Prepared<'b>, SinkError> {
        let mut names = Vec::with_capacity(fields.len());
        let mut values = Vec::with_capacity(fields.len());
        for (c, v) in fields {
            let text = to_text(&v, columns[c.as_ref()].class, self.time_unit)
                .map_err(|e| SinkError::permanent(format!("column {c}: {e}")))?;
            names.push(c);
            values.push(text);
        }
        Ok(Prepared { names, values })
    }

    /// Inserts rows in one transaction: one statement per set of columns, in order.
    async fn insert(
        &self,
        rows: &[Prepared<'_>],
        columns: &HashMap<String, Column>,
    ) -> Result<(), SinkError> {
        // Group rows by their column set, keeping order inside each group.
        let mut groups: Vec<Vec<&Prepared>> = Vec::new();
        for r in rows {
            match groups.iter_mut().find(|g| g[0].names == r.names) {
                Some(group) => group.push(r),
                None => groups.push(vec![r]),
            }
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for group in groups {
            let names = &group[0].names;
            let sql = self.insert_sql(names, columns);
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for i in 0..names.len() {
                let column: Vec<Option<&str>> =
                    group.iter().map(|r| r.values[i].as_deref()).collect();
                q = q.bind(column);
            }
            q.execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let columns = match self.columns().await {
            Ok(c) => c,
            Err(e) => return super::all(batch.len(), Err(e)),
        };
        let columns = &*columns;
        let mut fields = self.fields(batch, columns).await.into_iter();
        super::prepared(
            batch,
            |_| self.row(fields.next().expect("fields for each record")?, columns),
            move |rows| async move { super::isolate(&rows, |part| self.insert(part, columns)).await },
        )
        .await
    }

    fn insert_sql(&self, names: &[Cow<'_, str>], columns: &HashMap<String, Column>) -> String {
        let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (0..names.len()).map(|i| format!("c{i}")).collect();
        let casts: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("u.c{i}::{}", columns[n.as_ref()].sql_type))
            .collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM UNNEST({}) AS u({})",
            self.table.quoted(),
            quoted.join(", "),
            casts.join(", "),
            params.join(", "),
            aliases.join(", ")
        );
        if let Some(c) = &self.on_conflict {
            let key: Vec<String> = c.key.iter().map(|k| format!("\"{k}\"")).collect();
            let updates: Vec<String> = names
                .iter()
                .filter(|n| !c.key.iter().any(|k| k == n.as_ref()))
                .map(|n| format!("\"{n}\" = EXCLUDED.\"{n}\""))
                .collect();
            if c.action == ConflictAction::Update && !updates.is_empty() {
                sql.push_str(&format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    key.join(", "),
                    updates.join(", ")
                ));
            } else {
                sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", key.join(", ")));
            }
        }
        sql
    }
}

impl Sink for PostgresSink {
    /// One transaction per batch; a batch the database rejects is split to isolate the
    /// rows it refuses.
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let outcomes = self.write_batch(batch).await;
            let transient = |o: &Outcome| matches!(o, Outcome::Failed(e) if e.kind == super::ErrorKind::Transient);
            if outcomes.iter().any(transient) {
                // The table may have changed, or the server was replaced: look again.
                *self.columns.write().await = None;
            }
            outcomes
        })
    }
}

/// A record's (column, value) pairs: borrowed from the record, or computed by `columns:`.
type Fields<'b> = Vec<(Cow<'b, str>, Cow<'b, serde_json::Value>)>;

/// A record's fields under `columns:`: each program's first output (none is NULL). One
/// deadline covers all of the record's programs.
fn map_record(
    mapping: &Mapping,
    record: &serde_json::Value,
    deadline: Deadline,
) -> Result<Fields<'static>, SinkError> {
    let input = jq::from_json(record);
    mapping
        .iter()
        .map(|(col, prog)| {
            let v = prog
                .run(input.clone(), deadline)
                .map_err(|e| SinkError::permanent(format!("columns.{col}: {e}")))?
                .first()
                .map(jq::to_json)
                .unwrap_or(serde_json::Value::Null);
            Ok((Cow::Owned(col.clone()), Cow::Owned(v)))
        })
        .collect()
}

/// A record prepared for insertion.
struct Prepared<'b> {
    names: Vec<Cow<'b, str>>,
    /// Each column's value as text (None: NULL), in the order of `names`.
    values: Vec<Option<String>>,
}

/// A JSON value as the text PostgreSQL will cast to the column's type (public for
/// `benches/pipeline.rs`).
pub fn to_text(
    v: &serde_json::Value,
    class: Class,
    unit: Option<TimeUnit>,
) -> Result<Option<String>, String> {
    use serde_json::Value as J;
    Ok(Some(match (v, class) {
        (J::Null, _) => return Ok(None),
        (_, Class::Json) => v.to_string(),
        (J::Number(n), Class::Timestamp | Class::Date) => epoch_to_rfc3339(n, unit)?,
        (J::String(s), _) => s.clone(),
        (J::Bool(b), _) => b.to_string(),
        (J::Number(n), Class::Bool) => return Err(format!("expected a boolean, got {n}")),
        (J::Number(n), _) => match (n.as_f64(), n.is_f64()) {
            // 12.0 into an integer column is 12.
            (Some(f), true) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        (J::Array(_), Class::Array) => pg_array(v),
        (J::Array(_) | J::Object(_), _) => v.to_string(),
    }))
}

fn epoch_to_rfc3339(n: &serde_json::Number, unit: Option<TimeUnit>) -> Result<String, String> {
    let x = n.as_f64().ok_or("not a number")?;
    let ms = match unit {
        Some(TimeUnit::Ms) => x,
        Some(TimeUnit::S) => x * 1000.0,
        None if x.abs() >= 1e11 => x,
        None => x * 1000.0,
    };
    let ts = jiff::Timestamp::from_millisecond(ms as i64)
        .map_err(|e| format!("timestamp out of range: {e}"))?;
    Ok(format!("{ts}"))
}

/// A JSON array as a PostgreSQL array literal (`{1,2}`, `{"a","b \"c\""}`, nested arrays).
fn pg_array(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
    match v {
        J::Array(items) => {
            let inner: Vec<String> = items.iter().map(pg_array).collect();
            format!("{{{}}}", inner.join(","))
        }
        J::Null => "NULL".to_string(),
        J::String(s) => quote(s),
        J::Object(_) => quote(&v.to_string()),
        other => other.to_string(),
    }
}

/// SQLSTATE classes: data (22), integrity (23) and cardinality (21) errors are about the
/// records: permanent. Everything else (connection 08, resources 53, shutdown 57P0x,
/// serialization 40001, deadlock 40P01, auth, missing objects while a migration runs)
/// is about the database: transient.
fn classify(e: sqlx::Error) -> SinkError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let msg = format!("postgres {code}: {}", db.message());
            if code.starts_with("22") || code.starts_with("23") || code.starts_with("21") {
                SinkError::permanent(msg)
            } else {
                SinkError::transient(msg)
            }
        }
        _ => SinkError::transient(format!("postgres: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sinks::postgres::Config;
    use serde_json::json;

    #[test]
    fn values_as_text() {
        let t = |v: serde_json::Value, c| to_text(&v, c, None).unwrap();
        assert_eq!(t(json!(null), Class::Plain), None);
        assert_eq!(t(json!("x"), Class::Plain).as_deref(), Some("x"));
        assert_eq!(t(json!(12.0), Class::Plain).as_deref(), Some("12"));
        assert_eq!(t(json!(12.5), Class::Plain).as_deref(), Some("12.5"));
        assert_eq!(t(json!("x"), Class::Json).as_deref(), Some("\"x\""));
        assert_eq!(
            t(json!({"a": 1}), Class::Json).as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(t(json!(true), Class::Bool).as_deref(), Some("true"));
        assert!(to_text(&json!(1), Class::Bool, None).is_err());
        assert_eq!(
            t(json!(["a", "b\"c", null]), Class::Array).as_deref(),
            Some(r#"{"a","b\"c",NULL}"#)
        );
        assert_eq!(
            t(json!([[1, 2], [3, 4]]), Class::Array).as_deref(),
            Some("{{1,2},{3,4}}")
        );
    }

    #[test]
    fn epochs() {
        let t = |v: serde_json::Value, u| to_text(&v, Class::Timestamp, u).unwrap().unwrap();
        assert_eq!(t(json!(1_700_000_000), None), "2023-11-14T22:13:20Z");
        assert_eq!(
            t(json!(1_700_000_000_123i64), None),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            t(json!(1_700_000_000), Some(TimeUnit::Ms)),
            "1970-01-20T16:13:20Z"
        );
        assert_eq!(
            t(json!("2026-01-01T00:00:00Z"), None),
            "2026-01-01T00:00:00Z"
        );
    }

    #[tokio::test]
    async fn a_runaway_columns_program_costs_its_record_only() {
        const LIMIT: Duration = Duration::from_millis(100);
        let cfg: Config = serde_json::from_value(json!({
            "url": "postgres://u@127.0.0.1:1/db",
            "table": "t",
            "columns": {"seq": ".seq", "steps": "reduce range(.n) as $i (0; . + 1)"},
        }))
        .unwrap();
        let eval = EvalPool::start("pg-columns-t", 1, LIMIT).unwrap();
        let sink = PostgresSink::new(&cfg.compile().unwrap(), eval).unwrap();
        let plain = Column {
            sql_type: "bigint".into(),
            class: Class::Plain,
        };
        let columns = HashMap::from([("seq".into(), plain.clone()), ("steps".into(), plain)]);
        let batch = [
            json!({"seq": 1, "n": 3}),
            json!({"seq": 2, "n": 1e12}),
            json!({"seq": 3, "n": 4}),
        ]
        .map(|r| Delivery::detached("t", r));
        let started = std::time::Instant::now();
        let fields = sink.fields(&batch, &columns).await;
        assert!(
            started.elapsed() < LIMIT * 5,
            "took {:?}",
            started.elapsed()
        );
        let row = |seq, steps| -> Fields {
            vec![
                ("seq".into(), Cow::Owned(json!(seq))),
                ("steps".into(), Cow::Owned(json!(steps))),
            ]
        };
        assert_eq!(fields[0].as_ref().unwrap(), &row(1, 3));
        assert_eq!(fields[2].as_ref().unwrap(), &row(3, 4));
        let err = fields[1].as_ref().unwrap_err();
        assert_eq!(err.kind, super::super::ErrorKind::Permanent);
        assert_eq!(
            err.message,
            "columns.steps: program ran longer than 100ms and was stopped"
        );
    }

    #[test]
    fn try_names_columns_and_the_conflict_action_as_written() {
        let cfg: Config = serde_json::from_value(json!({
            "url": "postgres://h/db",
            "table": "readings",
            "on_conflict": {"key": ["deviceId", "ts"], "action": "update"}
        }))
        .unwrap();
        let record = json!({"deviceId": "d1", "ts": 1});
        let delivery = Delivery::detached("t", record.clone());
        assert_eq!(
            would(&cfg.compile().unwrap(), &delivery.origin, &record),
            "postgres: insert into readings the columns among (deviceId, ts) on conflict (deviceId, ts) update"
        );
    }
}
