//! `sqlite` sink: inserts records into a table of an SQLite database file.
//!
//! Record keys map to the table's columns (discovered with `PRAGMA table_info` when the
//! sink opens); keys with no column are ignored. One transaction per batch, WAL mode,
//! `synchronous=FULL` so a committed batch survives power loss, and a busy timeout.
//! Values are always bound parameters; the table name is validated and quoted.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::migrate::MigrateError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::sql::Table;
use crate::config::sinks::sqlite::Settings;
use crate::record::Record;

/// What writing `record` would do, for `mqbridge try`.
pub fn would(cfg: &Settings, _: &Origin, record: &Record) -> String {
    let keys: Vec<&str> = record
        .entries()
        .map(|o| o.map(|(k, _)| k).collect())
        .unwrap_or_default();
    format!(
        "sqlite {}: insert into {} the columns among ({})",
        cfg.path.display(),
        cfg.table,
        keys.join(", ")
    )
}

/// Why the sqlite sink could not open its database.
#[derive(Debug, thiserror::Error)]
#[error("cannot open SQLite database {}: {reason}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: Reason,
}

/// What went wrong opening an SQLite database.
#[derive(Debug, thiserror::Error)]
pub enum Reason {
    #[error("cannot create {}: {error}", dir.display())]
    Folder { dir: PathBuf, error: io::Error },
    #[error("{0}")]
    Database(sqlx::Error),
    /// `migrate: true`, and the migrations failed.
    #[error("{0}")]
    Migrate(MigrateError),
    #[error(
        "table {0} does not exist (create it, or set `migrate: true` and use table mqbridge_messages)"
    )]
    NoTable(String),
}

impl Reason {
    /// Whether it is SQLite's "busy" or "locked": another connection holds a lock.
    fn is_busy(&self) -> bool {
        let error = match self {
            Reason::Database(e)
            | Reason::Migrate(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) => e,
            _ => return false,
        };
        matches!(error, sqlx::Error::Database(db)
            if matches!(db.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff), Some(5 | 6)))
    }
}

pub struct SqliteSink {
    pool: SqlitePool,
    table: Table,
    columns: HashSet<String>,
}

/// How long opening waits for a database another process holds locked.
const OPEN_PATIENCE: Duration = Duration::from_secs(120);

impl SqliteSink {
    /// Opens the database and reads the table's columns. A database that is busy or
    /// locked (another process in a long transaction) is waited for, up to
    /// [`OPEN_PATIENCE`]; other errors (no such table, unreadable file) fail at once.
    pub async fn open(cfg: &Settings) -> Result<Self, OpenError> {
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match Self::try_open(cfg).await {
                Err(e) if e.is_busy() && started.elapsed() < OPEN_PATIENCE => {
                    tracing::warn!(path = %cfg.path.display(), error = %e, retry_in = ?delay, "SQLite database is locked; waiting to open it");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                r => {
                    return r.map_err(|reason| OpenError {
                        path: cfg.path.clone(),
                        reason,
                    });
                }
            }
        }
    }

    async fn try_open(cfg: &Settings) -> Result<Self, Reason> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|error| Reason::Folder {
                dir: dir.to_path_buf(),
                error,
            })?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(Reason::Database)?
            .filename(&cfg.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        // One writer: SQLite serializes writes anyway, and one connection keeps batches in order.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(Reason::Database)?;
        if cfg.migrate {
            super::migrate::apply(super::migrate::SQLITE, &pool)
                .await
                .map_err(Reason::Migrate)?;
        }
        let pragma = format!("PRAGMA table_info({})", cfg.table.quoted_base());
        let rows = sqlx::query(AssertSqlSafe(pragma))
            .fetch_all(&pool)
            .await
            .map_err(Reason::Database)?;
        let columns: HashSet<String> = rows.iter().map(|r| r.get::<String, _>("name")).collect();
        if columns.is_empty() {
            return Err(Reason::NoTable(cfg.table.name().to_string()));
        }
        Ok(SqliteSink {
            pool,
            table: cfg.table.clone(),
            columns,
        })
    }

    /// The INSERT for one record and the values to bind, in column order.
    fn insert_for<'r>(
        &self,
        record: &'r Record,
    ) -> Result<(String, Vec<&'r serde_json::Value>), SinkError> {
        let obj = record
            .entries()
            .ok_or_else(|| SinkError::permanent("record is not a JSON object"))?;
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for (k, v) in obj {
            if self.columns.contains(k) {
                cols.push(format!("\"{k}\""));
                vals.push(v.value());
            }
        }
        if cols.is_empty() {
            return Err(SinkError::permanent(format!(
                "record has no key matching a column of {}",
                self.table.quoted()
            )));
        }
        let marks = vec!["?"; cols.len()].join(",");
        Ok((
            format!(
                "INSERT INTO {} ({}) VALUES ({marks})",
                self.table.quoted(),
                cols.join(",")
            ),
            vals,
        ))
    }

    /// Inserts the prepared records in one transaction.
    async fn insert(&self, rows: &[(String, Vec<&serde_json::Value>)]) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for (sql, vals) in rows {
            let mut q = sqlx::query(AssertSqlSafe(sql.as_str()));
            for v in vals {
                q = match v {
                    serde_json::Value::Null => q.bind(None::<String>),
                    serde_json::Value::Bool(b) => q.bind(*b as i64),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) => q.bind(i),
                        None => q.bind(n.as_f64()),
                    },
                    serde_json::Value::String(s) => q.bind(s.as_str()),
                    other => q.bind(other.to_string()),
                };
            }
            q.execute(&mut *tx).await.map_err(classify)?;
        }
        tx.commit().await.map_err(classify)
    }
}

impl Sink for SqliteSink {
    /// One transaction per batch; a batch the database rejects is split to isolate the
    /// rows it refuses.
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| self.insert_for(&d.record),
            move |rows| async move { super::isolate(&rows, |part| self.insert(part)).await },
        ))
    }
}

/// SQLite result codes: busy, locked, I/O, full and can't-open are worth retrying;
/// constraint, mismatch and the rest are about the data.
fn classify(e: sqlx::Error) -> SinkError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(1);
            match code & 0xff {
                5 | 6 | 10 | 13 | 14 | 15 => SinkError::transient(format!("sqlite: {db}")),
                _ => SinkError::permanent(format!("sqlite ({code}): {db}")),
            }
        }
        _ => SinkError::transient(format!("sqlite: {e}")),
    }
}
