//! `postgres` sink: inserts records into a PostgreSQL table.
//!
//! A [`TableSink`] (column discovery, `columns:` programs, conversion, bad-row isolation:
//! [`super::sql`]) over the PostgreSQL dialect here: columns come from the catalog, and a
//! batch is one `INSERT … SELECT unnest($1::text[])::type, …`: one array parameter per
//! column, each value sent as text and cast by PostgreSQL to the column's type, so the
//! database does the type checking and a bad value fails with its SQLSTATE. Values are
//! always bound; identifiers are validated and quoted.
//!
//! The arrays are unnested in the select list (set-returning functions there run in
//! step), not in `FROM UNNEST(…)`: a function in `FROM` is first copied into a tuple
//! store, about a tenth of the server's time per row (BENCHMARKS.md, "The server's
//! share, and allocations per message"). A batch whose records share one set of columns is that
//! one statement, atomic on its own; only a batch of several sets is a transaction.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::sql::{Class, Column, Columns, Dialect, Inferred, Prepared, TableSink};
use super::{Origin, SinkError};
use crate::config::sinks::postgres::Settings;
use crate::config::sinks::sql::{ConflictAction, Insert, Table, redacted};
use crate::eval_pool::EvalPool;
use crate::record::Record;

/// What writing `record` would do, for `mqbridge try` (with the table's creation and the
/// columns added, when so configured).
pub fn would(cfg: &Settings, _: &Origin, record: &Record) -> String {
    let cols = super::sql::would_columns(&cfg.insert, record);
    let conflict = match &cfg.insert.on_conflict {
        Some(c) => {
            let action = match c.action {
                ConflictAction::Ignore => "ignore",
                ConflictAction::Update => "update",
            };
            format!(" on conflict ({}) {action}", c.key.join(", "))
        }
        None => String::new(),
    };
    let insert = format!(
        "insert into {} the columns among ({}){conflict}",
        cfg.insert.table,
        cols.join(", ")
    );
    format!(
        "postgres: {}",
        super::sql::would::<Postgres>(&cfg.insert, record, insert)
    )
}

/// The postgres sink: a table sink over a PostgreSQL connection pool.
pub type PostgresSink = TableSink<Postgres>;

/// The PostgreSQL dialect of a [`TableSink`].
pub struct Postgres {
    pool: PgPool,
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

/// Opens the sink: applies the migrations when asked, and checks the table when the
/// database is reachable.
pub async fn open(cfg: &Settings, eval: EvalPool) -> Result<PostgresSink, OpenError> {
    let sink = new(cfg, eval)?;
    if cfg.migrate {
        super::migrate::apply(super::migrate::POSTGRES, &sink.db.pool)
            .await
            .map_err(|error| OpenError::Migrate {
                url: redacted(&cfg.url),
                error,
            })?;
    }
    sink.check("postgres").await.map_err(OpenError::Table)?;
    Ok(sink)
}

/// The sink with a connection pool that connects on first use.
fn new(cfg: &Settings, eval: EvalPool) -> Result<PostgresSink, OpenError> {
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
    Ok(TableSink::new(Postgres { pool }, &cfg.insert, eval))
}

impl Dialect for Postgres {
    const MISSING_HINT: &'static str =
        " (create it, set `create:`, or set `migrate: true` and use mqbridge_messages)";
    const ADD_COLUMN: &'static str = "ADD COLUMN IF NOT EXISTS";

    fn quote(name: &str) -> String {
        format!("\"{name}\"")
    }

    fn inferred_type(kind: Inferred) -> &'static str {
        match kind {
            Inferred::Integer => "bigint",
            Inferred::Float => "double precision",
            Inferred::Bool => "boolean",
            Inferred::Text => "text",
            Inferred::Json => "jsonb",
        }
    }

    async fn alter(&self, sql: &str) -> Result<(), SinkError> {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(classify_ddl)
    }

    async fn columns(&self, table: &Table) -> Result<Columns, SinkError> {
        let rows = sqlx::query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type, \
                    t.typname::text AS typname, t.typcategory::text AS category \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table.quoted())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut map = Columns::default();
        for r in rows {
            let typname: String = r.get("typname");
            let category: String = r.get("category");
            let class = match (typname.as_str(), category.as_str()) {
                ("bool", _) => Class::Bool,
                ("timestamptz" | "timestamp", _) => Class::Timestamp,
                ("date", _) => Class::Date,
                ("json", _) => Class::Json,
                ("jsonb", _) => Class::Jsonb,
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
        Ok(map)
    }

    /// One statement per set of columns, in order: alone when the batch has one set,
    /// else in one transaction.
    async fn insert(
        &self,
        cfg: &Insert,
        rows: &[Prepared<'_>],
        columns: &Columns,
    ) -> Result<(), SinkError> {
        let groups = super::sql::groups(rows);
        let statement = |group: &[&Prepared]| {
            let names = &group[0].names;
            let mut q = sqlx::query(AssertSqlSafe(insert_sql(cfg, names, columns)));
            for i in 0..names.len() {
                let column: Vec<Option<&str>> =
                    group.iter().map(|r| r.values[i].as_deref()).collect();
                q = q.bind(column);
            }
            q
        };
        if let [group] = groups.as_slice() {
            return statement(group)
                .execute(&self.pool)
                .await
                .map(|_| ())
                .map_err(classify);
        }
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for group in &groups {
            statement(group).execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }
}

fn insert_sql(cfg: &Insert, names: &[Cow<'_, str>], columns: &Columns) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let values: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let sql_type = &columns[n.as_ref()].sql_type;
            format!("unnest(${}::text[])::{sql_type}", i + 1)
        })
        .collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) SELECT {}",
        cfg.table.quoted(),
        quoted.join(", "),
        values.join(", ")
    );
    if let Some(c) = &cfg.on_conflict {
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

/// As [`classify`], but a statement the server refuses as written is permanent: SQLSTATE
/// class 42 (a syntax error, an unknown type, no privilege), 54 (too many columns) and
/// 3F (no such schema).
fn classify_ddl(e: sqlx::Error) -> SinkError {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    };
    let refused = code.is_some_and(|c| ["42", "54", "3F"].iter().any(|k| c.starts_with(k)));
    match classify(e) {
        e if refused => SinkError::permanent(e.message),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sinks::postgres::Config;
    use crate::sink::Delivery;
    use crate::sink::sql::{Cell, Fields};
    use serde_json::json;

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
        let sink = new(&cfg.compile().unwrap(), eval).unwrap();
        let plain = Column {
            sql_type: "bigint".into(),
            class: Class::Plain,
        };
        let columns = Columns::from_iter([("seq".into(), plain.clone()), ("steps".into(), plain)]);
        let batch = [
            json!({"seq": 1, "n": 3}),
            json!({"seq": 2, "n": 1e12}),
            json!({"seq": 3, "n": 4}),
        ]
        .map(|r| Delivery::detached("t", r));
        let started = std::time::Instant::now();
        let fields = sink.mapped(&batch, &columns).await.unwrap();
        assert!(
            started.elapsed() < LIMIT * 5,
            "took {:?}",
            started.elapsed()
        );
        let made = |fields: &Fields| -> Vec<(String, serde_json::Value)> {
            let made = fields.iter().map(|(c, v)| match v {
                Cell::Made(v) => (c.to_string(), v.clone()),
                Cell::Record(_) => panic!("{c}: not made by its program"),
            });
            made.collect()
        };
        let row = |seq, steps| vec![("seq".into(), json!(seq)), ("steps".into(), json!(steps))];
        assert_eq!(made(fields[0].as_ref().unwrap()), row(1, 3));
        assert_eq!(made(fields[2].as_ref().unwrap()), row(3, 4));
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
            would(
                &cfg.compile().unwrap(),
                &delivery.origin,
                &record.clone().into()
            ),
            "postgres: insert into readings the columns among (deviceId, ts) on conflict (deviceId, ts) update"
        );
    }

    #[test]
    fn try_shows_the_table_created_and_the_columns_added() {
        let cfg: Config = yaml_serde::from_str(
            "{url: postgres://h/db, table: iot.readings, add_columns: true, create: \
             {columns: {ts: timestamptz, device: text, temp: double precision}, \
             primary_key: [device, ts]}}",
        )
        .unwrap();
        let record = json!({"device": "d1", "ts": 1, "fw": {"v": 2}, "bad key": 1, "n": null});
        let delivery = Delivery::detached("t", record.clone());
        assert_eq!(
            would(
                &cfg.compile().unwrap(),
                &delivery.origin,
                &record.clone().into()
            ),
            "postgres: CREATE TABLE IF NOT EXISTS \"iot\".\"readings\" (\"ts\" timestamptz, \
             \"device\" text, \"temp\" double precision, PRIMARY KEY (\"device\", \"ts\")) \
             (when the table is missing), then insert into iot.readings the columns among \
             (bad key, device, fw, n, ts) (after ALTER TABLE \"iot\".\"readings\" ADD COLUMN IF \
             NOT EXISTS for each of \"fw\" jsonb that is no column yet)"
        );
    }

    #[test]
    fn added_columns_have_the_type_of_the_value() {
        let table = Table::parse("readings").unwrap();
        let sql = |v| {
            let kind = Inferred::of(&v).unwrap();
            super::super::sql::add_column_sql::<Postgres>(&table, "x", kind)
        };
        assert_eq!(
            sql(json!(1)),
            "ALTER TABLE \"readings\" ADD COLUMN IF NOT EXISTS \"x\" bigint"
        );
        assert!(sql(json!(-1.5)).ends_with("\"x\" double precision"));
        assert!(sql(json!(true)).ends_with("\"x\" boolean"));
        assert!(sql(json!("on")).ends_with("\"x\" text"));
        assert!(sql(json!([1])).ends_with("\"x\" jsonb"));
        assert!(sql(json!({"a": 1})).ends_with("\"x\" jsonb"));
        assert_eq!(Inferred::of(&json!(null)), None);
    }
}
