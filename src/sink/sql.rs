//! What the SQL table sinks (`postgres`, `mysql`) share: a [`TableSink`] over a
//! [`Dialect`].
//!
//! The shared part discovers the table's columns (at start, and again after a transient
//! failure, so a migrated table or a replaced server is picked up), maps each record to
//! (column, value) pairs (the record's keys, or the `columns:` programs run on the
//! [evaluation pool](crate::eval_pool) under a rule's deadline), converts each value to
//! the text the database reads for the column's [`Class`], and isolates the rows a
//! database refuses ([`super::isolate`]). A dialect only says how to read the catalog, how
//! to write one transaction of rows, and how its errors classify. Values are always bound
//! parameters; identifiers are validated by the config and quoted by the dialect.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::RwLock;

use super::{Delivery, ErrorKind, Outcome, Sink, SinkError};
use crate::config::sinks::sql::{Insert, Mapping, Table, TimeUnit, UnknownKeys};
use crate::eval_pool::{EvalError, EvalPool};
use crate::rule::jq::{self, Deadline};

/// How a value is turned into text for a column (public for `benches/pipeline.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Bool,
    Timestamp,
    Date,
    Json,
    Array,
    /// Text, numbers and everything the database converts from text.
    Plain,
}

/// One column of the table, as its dialect discovered it.
#[derive(Debug, Clone)]
pub struct Column {
    /// The column's type as the database writes it (PostgreSQL casts to it).
    pub sql_type: String,
    pub class: Class,
}

/// The table's columns by name.
pub type Columns = HashMap<String, Column>;

/// A record prepared for insertion.
pub struct Prepared<'b> {
    pub names: Vec<Cow<'b, str>>,
    /// Each column's value as text (None: NULL), in the order of `names`.
    pub values: Vec<Option<String>>,
}

/// What differs between SQL databases: the catalog, the statements and the errors.
pub trait Dialect: Send + Sync + 'static {
    /// Why a table is missing, after "table T does not exist".
    const MISSING_HINT: &'static str;

    /// The table's columns; empty when there is no such table.
    fn columns(&self, table: &Table) -> impl Future<Output = Result<Columns, SinkError>> + Send;

    /// Writes `rows` in one transaction: all or none.
    fn insert(
        &self,
        cfg: &Insert,
        rows: &[Prepared<'_>],
        columns: &Columns,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// A value as the text the database reads for a column of `class`.
    fn text(
        &self,
        v: &serde_json::Value,
        class: Class,
        unit: Option<TimeUnit>,
    ) -> Result<Option<String>, String> {
        to_text(v, class, unit)
    }
}

/// A sink that inserts records into a table of a SQL database.
pub struct TableSink<D> {
    pub(super) db: D,
    cfg: Insert,
    /// Discovered columns; None until discovered, reset after a transient failure.
    columns: RwLock<Option<Arc<Columns>>>,
    /// Where the `columns:` programs run.
    eval: EvalPool,
}

impl<D: Dialect> TableSink<D> {
    /// The sink; it reads the catalog on first use.
    pub fn new(db: D, cfg: &Insert, eval: EvalPool) -> Self {
        TableSink {
            db,
            cfg: cfg.clone(),
            columns: RwLock::new(None),
            eval,
        }
    }

    /// Checks the table now when the database is up. If it is down, the sink starts
    /// anyway (writes wait and retry until it is back); a missing table, or one the
    /// database refuses for good, is an error.
    pub async fn check(&self, kind: &str) -> Result<(), SinkError> {
        let table = &self.cfg.table;
        match tokio::time::timeout(Duration::from_secs(5), self.columns()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind == ErrorKind::Permanent => return Err(e),
            Ok(Err(e)) => {
                tracing::warn!(%table, error = %e, "{kind} not reachable yet; will retry on write")
            }
            Err(_) => tracing::warn!(%table, "{kind} not reachable yet; will retry on write"),
        }
        Ok(())
    }

    /// The table's columns, discovered once (again after a transient failure).
    async fn columns(&self) -> Result<Arc<Columns>, SinkError> {
        if let Some(c) = self.columns.read().await.as_ref() {
            return Ok(Arc::clone(c));
        }
        let map = self.db.columns(&self.cfg.table).await?;
        if map.is_empty() {
            return Err(SinkError::permanent(format!(
                "table {} does not exist{}",
                self.cfg.table,
                D::MISSING_HINT
            )));
        }
        let map = Arc::new(map);
        *self.columns.write().await = Some(Arc::clone(&map));
        Ok(map)
    }

    /// The (column, value) pairs of each record of a batch: computed by the `columns:`
    /// programs on the evaluation pool, or else the record's keys that are columns.
    pub(super) async fn fields<'b>(
        &self,
        batch: &'b [Delivery],
        columns: &Columns,
    ) -> Vec<Result<Fields<'b>, SinkError>> {
        let Some(mapping) = &self.cfg.columns else {
            return batch
                .iter()
                .map(|d| self.keyed(&d.record, columns))
                .collect();
        };
        if let Some((col, _)) = mapping.iter().find(|(c, _)| !columns.contains_key(c)) {
            let e =
                SinkError::permanent(format!("column {col} does not exist in {}", self.cfg.table));
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
        columns: &Columns,
    ) -> Result<Fields<'b>, SinkError> {
        let mut out = Vec::new();
        let obj = record
            .as_object()
            .ok_or_else(|| SinkError::permanent("record is not a JSON object"))?;
        for (k, v) in obj {
            if columns.contains_key(k) {
                out.push((Cow::Borrowed(k.as_str()), Cow::Borrowed(v)));
            } else if self.cfg.unknown_keys == UnknownKeys::Error {
                return Err(SinkError::permanent(format!(
                    "record key {k:?} has no column in {}",
                    self.cfg.table
                )));
            }
        }
        if out.is_empty() {
            return Err(SinkError::permanent(format!(
                "record has no key matching a column of {}",
                self.cfg.table
            )));
        }
        Ok(out)
    }

    /// One record as a row: its column names and each value as text for the database.
    fn row<'b>(&self, fields: Fields<'b>, columns: &Columns) -> Result<Prepared<'b>, SinkError> {
        let mut names = Vec::with_capacity(fields.len());
        let mut values = Vec::with_capacity(fields.len());
        for (c, v) in fields {
            let text = self
                .db
                .text(&v, columns[c.as_ref()].class, self.cfg.time_unit)
                .map_err(|e| SinkError::permanent(format!("column {c}: {e}")))?;
            names.push(c);
            values.push(text);
        }
        Ok(Prepared { names, values })
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
            move |rows| async move {
                super::isolate(&rows, |part| self.db.insert(&self.cfg, part, columns)).await
            },
        )
        .await
    }
}

impl<D: Dialect> Sink for TableSink<D> {
    /// One transaction per batch; a batch the database rejects is split to isolate the
    /// rows it refuses.
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let outcomes = self.write_batch(batch).await;
            let transient =
                |o: &Outcome| matches!(o, Outcome::Failed(e) if e.kind == ErrorKind::Transient);
            if outcomes.iter().any(transient) {
                // The table may have changed, or the server was replaced: look again.
                *self.columns.write().await = None;
            }
            outcomes
        })
    }
}

/// Rows grouped by their set of columns (one statement each), in order inside a group.
pub fn groups<'r, 'b>(rows: &'r [Prepared<'b>]) -> Vec<Vec<&'r Prepared<'b>>> {
    let mut groups: Vec<Vec<&Prepared>> = Vec::new();
    for r in rows {
        match groups.iter_mut().find(|g| g[0].names == r.names) {
            Some(group) => group.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// The columns writing `record` would fill, for `mqbridge try`: the `columns:` or the
/// record's keys (those that are no column are left out when it is written).
pub fn would_columns(cfg: &Insert, record: &serde_json::Value) -> Vec<String> {
    match &cfg.columns {
        Some(mapping) => mapping.iter().map(|(c, _)| c.clone()).collect(),
        None => record
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    }
}

/// A record's (column, value) pairs: borrowed from the record, or computed by `columns:`.
pub(super) type Fields<'b> = Vec<(Cow<'b, str>, Cow<'b, serde_json::Value>)>;

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

/// A JSON value as the text a database reads for a column of `class` (public for
/// `benches/pipeline.rs`): timestamps as RFC 3339, JSON as JSON text, arrays as
/// PostgreSQL array literals.
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

#[cfg(test)]
mod tests {
    use super::*;
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
}
