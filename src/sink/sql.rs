//! What the SQL table sinks (`postgres`, `mysql`) share: a [`TableSink`] over a
//! [`Dialect`].
//!
//! The shared part discovers the table's columns (at start, and again after a transient
//! failure, so a migrated table or a replaced server is picked up), maps each record to
//! (column, value) pairs (the record's keys, or the `columns:` programs run on the
//! [evaluation pool](crate::eval_pool) under a rule's deadline), converts each value to
//! the text the database reads for the column's [`Class`], and isolates the rows a
//! database refuses ([`super::isolate`]). A dialect only says how to read the catalog, how
//! to write a batch of rows all or none, and how its errors classify. Values are always bound
//! parameters; identifiers are validated by the config and quoted by the dialect.
//!
//! Tables on demand: with `create:`, a table the discovery finds missing is created
//! (`CREATE TABLE IF NOT EXISTS`, so instances starting together agree) and discovered
//! again. With `add_columns`, a batch whose records have keys that are no column first
//! adds a nullable column for each ([`Inferred`] from its first non-null value; a key that
//! is no valid identifier is never added) and discovers the columns again; adding is
//! idempotent in each dialect, so two lanes or instances adding one column both succeed.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use smallvec::SmallVec;
use tokio::sync::{Mutex, RwLock};

use super::{Delivery, ErrorKind, Outcome, Sink, SinkError};
use crate::config::sinks::sql::{
    Create, Insert, Mapping, Table, TimeUnit, UnknownKeys, quote_ident,
};
use crate::eval_pool::{EvalError, EvalPool};
use crate::record::{Field, Record};
use crate::rule::jq::{self, Deadline};

mod text;
pub use text::{Class, Text, to_text};

/// One column of the table, as its dialect discovered it.
#[derive(Debug, Clone)]
pub struct Column {
    /// The column's type as the database writes it (PostgreSQL casts to it).
    pub sql_type: String,
    pub class: Class,
}

/// The table's columns by name. Every value of every row looks its column up here, so
/// with a fast hash (the keys are the catalog's; a record's keys only look up).
pub type Columns = HashMap<String, Column, foldhash::fast::RandomState>;

/// Columns `add_columns` could not add in this batch, with the error: the records that
/// have the key fail with it.
pub(super) type Unadded = HashMap<String, SinkError>;

/// The type of a column added for a new record key (`add_columns`), from its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inferred {
    Integer,
    Float,
    Bool,
    Text,
    Json,
}

impl Inferred {
    /// None for `null`: it says nothing of the type (and writing it adds nothing).
    pub fn of(v: &serde_json::Value) -> Option<Inferred> {
        use serde_json::Value as J;
        Some(match v {
            J::Null => return None,
            J::Bool(_) => Inferred::Bool,
            J::Number(n) if n.is_f64() => Inferred::Float,
            J::Number(_) => Inferred::Integer,
            J::String(_) => Inferred::Text,
            J::Array(_) | J::Object(_) => Inferred::Json,
        })
    }
}

/// A record prepared for insertion.
pub struct Prepared<'b> {
    /// The columns, one list shared by the rows of a batch that have the same (most
    /// have: the records of one rule share their keys).
    pub names: Names<'b>,
    /// Each column's value as text (None: NULL), in the order of `names`; a string
    /// value is borrowed from its record. Inline up to [`ROW_INLINE`] columns: a row of
    /// a few columns costs no allocation of its own.
    pub values: SmallVec<[Option<Text<'b>>; ROW_INLINE]>,
}

/// Columns of a [`Prepared`] row held inline.
const ROW_INLINE: usize = 6;

/// The columns of a [`Prepared`] row.
pub type Names<'b> = Arc<[Cow<'b, str>]>;

/// What differs between SQL databases: the catalog, the statements and the errors.
pub trait Dialect: Send + Sync + 'static {
    /// Why a table is missing, after "table T does not exist".
    const MISSING_HINT: &'static str;

    /// What follows `ALTER TABLE t` to add a column: with `IF NOT EXISTS` where the
    /// database has it (else [`Dialect::alter`] takes "duplicate column" as done).
    const ADD_COLUMN: &'static str;

    /// A validated identifier, quoted.
    fn quote(name: &str) -> String;

    /// The type of a column added for values of `kind`.
    fn inferred_type(kind: Inferred) -> &'static str;

    /// Runs a statement that changes the table (`CREATE TABLE`, `ALTER TABLE`). A
    /// statement the server refuses as written (a bad type, no privilege) is a permanent
    /// error; adding a column that exists is no error.
    fn alter(&self, sql: &str) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The table's columns; empty when there is no such table.
    fn columns(&self, table: &Table) -> impl Future<Output = Result<Columns, SinkError>> + Send;

    /// Writes `rows` all or none (one statement, or one transaction).
    fn insert(
        &self,
        cfg: &Insert,
        rows: &[Prepared<'_>],
        columns: &Columns,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// A value as the text the database reads for a column of `class`.
    fn text<'v>(
        &self,
        v: &'v serde_json::Value,
        class: Class,
        unit: Option<TimeUnit>,
    ) -> Result<Option<Text<'v>>, String> {
        to_text(v, class, unit)
    }
}

/// A sink that inserts records into a table of a SQL database.
pub struct TableSink<D> {
    pub(super) db: D,
    cfg: Insert,
    /// Discovered columns; None until discovered, reset after a transient failure.
    columns: RwLock<Option<Arc<Columns>>>,
    /// Held while adding columns, so that lanes add each column once.
    adding: Mutex<()>,
    /// Keys whose column was added without error yet is not in the table (MySQL's column
    /// names ignore case: `Temp` when `temp` exists), so that each batch does not add them
    /// again. Cleared with the columns.
    shadowed: std::sync::Mutex<HashSet<String>>,
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
            adding: Mutex::new(()),
            shadowed: Default::default(),
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
        let mut map = self.db.columns(&self.cfg.table).await?;
        if let (true, Some(create)) = (map.is_empty(), &self.cfg.create) {
            map = self.create(create).await?;
        }
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

    /// Creates the table of `create:` and discovers its columns. Another instance may
    /// create it at the same moment (PostgreSQL may then fail with a unique violation):
    /// what counts is that the table is there afterwards.
    async fn create(&self, create: &Create) -> Result<Columns, SinkError> {
        let table = &self.cfg.table;
        let created = self.db.alter(&create_sql::<D>(table, create)).await;
        let map = self.db.columns(table).await?;
        match created {
            Err(e) if map.is_empty() => Err(SinkError {
                message: format!("creating table {table}: {}", e.message),
                ..e
            }),
            _ => {
                tracing::info!(%table, columns = map.len(), "table created (create:)");
                Ok(map)
            }
        }
    }

    /// `add_columns`: adds a column for each key of the batch's records that is no column
    /// of the table (valid identifiers with a non-null value only), then discovers the
    /// columns again. Returns them, and the columns that could not be added.
    async fn add_columns(
        &self,
        batch: &[Delivery],
        columns: Arc<Columns>,
    ) -> Result<(Arc<Columns>, Unadded), SinkError> {
        let wanted = |columns: &Columns| {
            let shadowed = self.shadowed.lock().expect("not poisoned");
            let mut wanted: Vec<(&str, Inferred)> = Vec::new();
            let keys = batch.iter().filter_map(|d| d.record.entries()).flatten();
            for (k, v) in keys {
                let new = !columns.contains_key(k)
                    && !shadowed.contains(k)
                    && quote_ident(k).is_some()
                    && !wanted.iter().any(|(w, _)| *w == k);
                if new && let Some(kind) = Inferred::of(&v) {
                    wanted.push((k, kind));
                }
            }
            wanted
        };
        if wanted(&columns).is_empty() {
            return Ok((columns, Unadded::new()));
        }
        let _adding = self.adding.lock().await;
        // Another lane may have added them while this one waited.
        let columns = self.columns().await?;
        let table = &self.cfg.table;
        let (mut added, mut unadded) = (Vec::new(), Unadded::new());
        for (name, kind) in wanted(&columns) {
            match self.db.alter(&add_column_sql::<D>(table, name, kind)).await {
                Ok(()) => {
                    tracing::info!(%table, column = name, r#type = D::inferred_type(kind), "column added (add_columns)");
                    added.push(name);
                }
                Err(e) => {
                    tracing::warn!(%table, column = name, error = %e, "could not add column (add_columns)");
                    unadded.insert(name.to_string(), e);
                }
            }
        }
        if added.is_empty() {
            return Ok((columns, unadded));
        }
        *self.columns.write().await = None;
        let columns = self.columns().await?;
        let mut shadowed = self.shadowed.lock().expect("not poisoned");
        shadowed.extend(
            added
                .into_iter()
                .filter(|n| !columns.contains_key(*n))
                .map(String::from),
        );
        Ok((columns, unadded))
    }

    /// The (column, value) pairs of each record of a batch as the `columns:` programs
    /// compute them, on the evaluation pool; None without `columns:` (see
    /// [`TableSink::keyed`]).
    pub(super) async fn mapped(
        &self,
        batch: &[Delivery],
        columns: &Columns,
    ) -> Option<Vec<Result<Fields<'static>, SinkError>>> {
        let mapping = self.cfg.columns.as_ref()?;
        if let Some((col, _)) = mapping.iter().find(|(c, _)| !columns.contains_key(c)) {
            let e =
                SinkError::permanent(format!("column {col} does not exist in {}", self.cfg.table));
            return Some(vec![Err(e); batch.len()]);
        }
        let records: Vec<Record> = batch.iter().map(|d| d.record.clone()).collect();
        let (mapping, limit) = (Arc::clone(mapping), self.eval.limit());
        let job = move || {
            let run = |r: &Record| map_record(&mapping, r, Deadline::after(limit));
            records.iter().map(run).collect()
        };
        Some(match self.eval.run(job).await {
            Ok(fields) => fields,
            // The driver isolates a panic and dead-letters its record.
            Err(EvalError::Panicked(payload)) => std::panic::resume_unwind(payload),
            Err(e @ EvalError::Stopped) => {
                vec![Err(SinkError::transient(e.to_string())); batch.len()]
            }
        })
    }

    /// The record's keys that are columns of the table, with their values (borrowed). A
    /// key that is no column fails the record when its column could not be added, is left
    /// out when `add_columns` and its value is null (a column added later would hold
    /// NULL), and is handled as `unknown_keys` says otherwise. Into `out` (emptied
    /// first, so that a batch's records share one vector).
    fn keyed<'b>(
        &self,
        record: &'b Record,
        columns: &Columns,
        unadded: &Unadded,
        out: &mut Fields<'b>,
    ) -> Result<(), SinkError> {
        let obj = record
            .entries()
            .ok_or_else(|| SinkError::permanent("record is not a JSON object"))?;
        out.clear();
        for (k, v) in obj {
            if columns.contains_key(k) {
                out.push((Cow::Borrowed(k), Cell::Record(v)));
            } else if let Some(e) = unadded.get(k) {
                return Err(SinkError {
                    message: format!("adding column {k} to {}: {}", self.cfg.table, e.message),
                    ..e.clone()
                });
            } else if self.cfg.add_columns && v.is_null() {
                // Nothing to write, and no type to add a column of.
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
        Ok(())
    }

    /// One record as a row: its column names and each value as text for the database.
    /// `last` is the previous row's names, taken again when they are the same.
    /// Takes the fields out of `fields`.
    fn row<'b>(
        &self,
        fields: &mut Fields<'b>,
        columns: &Columns,
        last: &mut Option<Names<'b>>,
    ) -> Result<Prepared<'b>, SinkError> {
        let names = match last {
            Some(names) if names.iter().eq(fields.iter().map(|(c, _)| c)) => Arc::clone(names),
            _ => Arc::clone(last.insert(fields.iter().map(|(c, _)| c.clone()).collect())),
        };
        let mut values = SmallVec::with_capacity(fields.len());
        for (c, v) in fields.drain(..) {
            let (class, unit) = (columns[c.as_ref()].class, self.cfg.time_unit);
            let text = match v {
                Cell::Record(f) => match (f.json_text(), class) {
                    (Some(json), Class::Jsonb) => Ok(Some(Text::Borrowed(json))),
                    _ => self.db.text(f.value(), class, unit),
                },
                Cell::Made(v) => self
                    .db
                    .text(&v, class, unit)
                    .map(|t| t.map(Text::into_static)),
            }
            .map_err(|e| SinkError::permanent(format!("column {c}: {e}")))?;
            values.push(text);
        }
        Ok(Prepared { names, values })
    }

    async fn write_batch(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let columns = match self.columns().await {
            Ok(c) if self.cfg.add_columns => self.add_columns(batch, c).await,
            Ok(c) => Ok((c, Unadded::new())),
            Err(e) => Err(e),
        };
        let (columns, unadded) = match columns {
            Ok(c) => c,
            Err(e) => return super::all(batch.len(), Err(e)),
        };
        let columns = &*columns;
        let mut mapped = self.mapped(batch, columns).await.map(Vec::into_iter);
        let mut keyed = Fields::new();
        let mut last = None;
        super::prepared(
            batch,
            |d| {
                let mut one;
                let fields = match &mut mapped {
                    Some(m) => {
                        one = m.next().expect("fields for each record")?;
                        &mut one
                    }
                    None => {
                        self.keyed(&d.record, columns, &unadded, &mut keyed)?;
                        &mut keyed
                    }
                };
                self.row(fields, columns, &mut last)
            },
            move |rows| async move {
                super::isolate(&rows, |part| self.db.insert(&self.cfg, part, columns)).await
            },
        )
        .await
    }
}

impl<D: Dialect> Sink for TableSink<D> {
    /// One statement (or one transaction) per batch; a batch the database rejects is
    /// split to isolate the rows it refuses.
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let outcomes = self.write_batch(batch).await;
            let transient =
                |o: &Outcome| matches!(o, Outcome::Failed(e) if e.kind == ErrorKind::Transient);
            if outcomes.iter().any(transient) {
                // The table may have changed, or the server was replaced: look again.
                *self.columns.write().await = None;
                self.shadowed.lock().expect("not poisoned").clear();
            }
            outcomes
        })
    }
}

/// Rows grouped by their set of columns (one statement each), in order inside a group.
pub fn groups<'r, 'b>(rows: &'r [Prepared<'b>]) -> Vec<Vec<&'r Prepared<'b>>> {
    let mut groups: Vec<Vec<&Prepared>> = Vec::new();
    for r in rows {
        let same =
            |g: &&mut Vec<&Prepared>| Arc::ptr_eq(&g[0].names, &r.names) || g[0].names == r.names;
        match groups.iter_mut().find(same) {
            Some(group) => group.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// What writing `record` would do, for `mqbridge try`: `insert` (the dialect's insert
/// statement or its description), after the table's creation when `create:` is set, and
/// with the columns `add_columns` would add for the record's keys the table lacks (those
/// `create:` does not make).
pub fn would<D: Dialect>(cfg: &Insert, record: &Record, insert: String) -> String {
    let create = match &cfg.create {
        Some(c) => format!(
            "{} (when the table is missing), then ",
            create_sql::<D>(&cfg.table, c)
        ),
        None => String::new(),
    };
    let created = |k: &str| {
        let columns = cfg.create.iter().flat_map(|c| &c.columns);
        columns.map(|(name, _)| name).any(|name| name == k)
    };
    let mut adds = Vec::new();
    for (k, v) in record.entries().into_iter().flatten() {
        let new = cfg.add_columns && quote_ident(k).is_some() && !created(k);
        if new && let Some(kind) = Inferred::of(&v) {
            adds.push(format!("{} {}", D::quote(k), D::inferred_type(kind)));
        }
    }
    let adds = match adds.is_empty() {
        true => String::new(),
        false => format!(
            " (after ALTER TABLE {} {} for each of {} that is no column yet)",
            quoted_table::<D>(&cfg.table),
            D::ADD_COLUMN,
            adds.join(", ")
        ),
    };
    format!("{create}{insert}{adds}")
}

/// The columns writing `record` would fill, for `mqbridge try`: the `columns:` or the
/// record's keys (those that are no column are left out when it is written).
pub fn would_columns(cfg: &Insert, record: &Record) -> Vec<String> {
    match &cfg.columns {
        Some(mapping) => mapping.iter().map(|(c, _)| c.clone()).collect(),
        None => record
            .entries()
            .map(|o| o.map(|(k, _)| k.to_string()).collect())
            .unwrap_or_default(),
    }
}

/// `CREATE TABLE IF NOT EXISTS t (c type, …, PRIMARY KEY (…))` for `create:`.
pub fn create_sql<D: Dialect>(table: &Table, create: &Create) -> String {
    let mut parts: Vec<String> = create
        .columns
        .iter()
        .map(|(name, ty)| format!("{} {ty}", D::quote(name)))
        .collect();
    if !create.primary_key.is_empty() {
        let key: Vec<String> = create.primary_key.iter().map(|k| D::quote(k)).collect();
        parts.push(format!("PRIMARY KEY ({})", key.join(", ")));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quoted_table::<D>(table),
        parts.join(", ")
    )
}

/// `ALTER TABLE t ADD COLUMN c type` (nullable) for `add_columns`; `name` must be a valid
/// identifier.
pub fn add_column_sql<D: Dialect>(table: &Table, name: &str, kind: Inferred) -> String {
    format!(
        "ALTER TABLE {} {} {} {}",
        quoted_table::<D>(table),
        D::ADD_COLUMN,
        D::quote(name),
        D::inferred_type(kind)
    )
}

/// The table's name quoted as the dialect quotes: `schema.name` or `name`.
pub fn quoted_table<D: Dialect>(table: &Table) -> String {
    match table.parts() {
        (Some(schema), name) => format!("{}.{}", D::quote(schema), D::quote(name)),
        (None, name) => D::quote(name),
    }
}

/// A record's (column, value) pairs: borrowed from the record, or computed by `columns:`.
pub(super) type Fields<'b> = Vec<(Cow<'b, str>, Cell<'b>)>;

/// A value for a column: one of the record's, or what a `columns:` program made.
#[derive(Debug, Clone)]
pub(super) enum Cell<'b> {
    Record(Field<'b>),
    Made(serde_json::Value),
}

/// A record's fields under `columns:`: each program's first output (none is NULL). One
/// deadline covers all of the record's programs.
fn map_record(
    mapping: &Mapping,
    record: &Record,
    deadline: Deadline,
) -> Result<Fields<'static>, SinkError> {
    let input = jq::from_json(&record.to_value());
    mapping
        .iter()
        .map(|(col, prog)| {
            let v = prog
                .run(input.clone(), deadline)
                .map_err(|e| SinkError::permanent(format!("columns.{col}: {e}")))?
                .first()
                .map(jq::to_json)
                .unwrap_or(serde_json::Value::Null);
            Ok((Cow::Owned(col.clone()), Cell::Made(v)))
        })
        .collect()
}
