//! `mysql` sink: inserts records into a MariaDB or MySQL table.
//!
//! A [`TableSink`] (column discovery, `columns:` programs, conversion, bad-row isolation:
//! [`super::sql`]) over the MySQL dialect here: columns come from
//! `information_schema.columns`, and a batch is one transaction of multi-row
//! `INSERT … VALUES (?, …), (?, …)` statements, split so that none binds more than the
//! protocol's 65,535 parameters. Each value is bound as text and converted by the server,
//! in strict mode (`STRICT_ALL_TABLES`), so a bad value fails with its error instead of
//! being truncated. Identifiers are validated and quoted with backticks.
//!
//! `on_conflict` is `ON DUPLICATE KEY UPDATE` in both cases (`ignore` assigns the key to
//! itself): `INSERT IGNORE` would also turn every other error of the row (NULL into NOT
//! NULL, a bad value) into a warning and write a mangled row.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Executor, Row};

use super::sql::{Class, Column, Columns, Dialect, Inferred, Prepared, TableSink, Text, to_text};
use super::{Origin, SinkError};
use crate::config::sinks::mysql::Settings;
use crate::config::sinks::sql::{ConflictAction, Insert, Table, TimeUnit, redacted};
use crate::eval_pool::EvalPool;
use crate::record::Record;

/// Most parameters one statement may bind (the protocol counts them in 16 bits).
const MAX_PARAMS: usize = 65_535;

/// ER_DUP_FIELDNAME: `ADD COLUMN` of a column that exists.
const DUPLICATE_COLUMN: u16 = 1060;

/// What writing `record` would do, for `mqbridge try`: the statement, for one row (after
/// the table's creation and the columns added, when so configured).
pub fn would(cfg: &Settings, _: &Origin, record: &Record) -> String {
    let names: Vec<Cow<str>> = super::sql::would_columns(&cfg.insert, record)
        .into_iter()
        .map(Cow::Owned)
        .collect();
    let note = match cfg.insert.columns {
        Some(_) => "",
        None => " (record keys that are no column of the table are left out)",
    };
    let insert = format!("{}{note}", insert_sql(&cfg.insert, &names, 1));
    format!(
        "mysql: {}",
        super::sql::would::<Mysql>(&cfg.insert, record, insert)
    )
}

/// The mysql sink: a table sink over a MariaDB/MySQL connection pool.
pub type MysqlSink = TableSink<Mysql>;

/// The MySQL dialect of a [`TableSink`].
pub struct Mysql {
    pool: MySqlPool,
}

/// Why the mysql sink could not open. A URL in a message has no password.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is not one sqlx can connect with.
    #[error("url {url}: {error}")]
    Url { url: String, error: sqlx::Error },
    /// The table cannot be written to: it does not exist, or the database refused it for
    /// good (waiting would not help).
    #[error("{0}")]
    Table(SinkError),
}

/// Opens the sink, and checks the table when the database is reachable.
pub async fn open(cfg: &Settings, eval: EvalPool) -> Result<MysqlSink, OpenError> {
    let opts = MySqlConnectOptions::from_str(&cfg.url).map_err(|error| OpenError::Url {
        url: redacted(&cfg.url),
        error,
    })?;
    let pool = MySqlPoolOptions::new()
        .max_connections(cfg.common.concurrency.max(1) as u32 + 1)
        .acquire_timeout(Duration::from_secs(10))
        // Strict: a value the column cannot hold is an error, not a warning and a
        // truncated row, whatever the server's default sql_mode.
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')")
                    .await
                    .map(|_| ())
            })
        })
        .connect_lazy_with(opts);
    let sink = TableSink::new(Mysql { pool }, &cfg.insert, eval);
    sink.check("mysql").await.map_err(OpenError::Table)?;
    Ok(sink)
}

impl Dialect for Mysql {
    const MISSING_HINT: &'static str = " (create it, or set `create:`)";
    /// MySQL 8 has no `ADD COLUMN IF NOT EXISTS` (MariaDB has): [`Mysql::alter`] takes
    /// "duplicate column" (1060) as done instead, on both.
    const ADD_COLUMN: &'static str = "ADD COLUMN";

    fn quote(name: &str) -> String {
        quote(name)
    }

    fn inferred_type(kind: Inferred) -> &'static str {
        match kind {
            Inferred::Integer => "BIGINT",
            Inferred::Float => "DOUBLE",
            Inferred::Bool => "BOOLEAN",
            Inferred::Text => "TEXT",
            Inferred::Json => "JSON",
        }
    }

    async fn alter(&self, sql: &str) -> Result<(), SinkError> {
        match sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&self.pool)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if number(&e) == DUPLICATE_COLUMN => Ok(()),
            Err(e) => {
                // SQLSTATE 42 (a syntax error, no privilege; MySQL's unknown type), and
                // MariaDB's unknown type (4161) and too many columns (1117), both HY000.
                let refused = matches!(number(&e), 4161 | 1117)
                    || matches!(&e, sqlx::Error::Database(db)
                        if db.code().is_some_and(|c| c.starts_with("42")));
                match classify(e) {
                    e if refused => Err(SinkError::permanent(e.message)),
                    e => Err(e),
                }
            }
        }
    }

    async fn columns(&self, table: &Table) -> Result<Columns, SinkError> {
        let (schema, name) = table.parts();
        let rows = sqlx::query(
            "SELECT CAST(column_name AS CHAR) AS name, CAST(data_type AS CHAR) AS data_type, \
                    CAST(column_type AS CHAR) AS column_type \
             FROM information_schema.columns \
             WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?",
        )
        .bind(schema)
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let mut map = Columns::default();
        for r in rows {
            let data_type: String = r.get("data_type");
            let column_type: String = r.get("column_type");
            map.insert(
                r.get::<String, _>("name"),
                Column {
                    class: class(&data_type, &column_type),
                    sql_type: column_type,
                },
            );
        }
        Ok(map)
    }

    /// One statement per set of columns and per [`MAX_PARAMS`], in order, in one
    /// transaction.
    async fn insert(
        &self,
        cfg: &Insert,
        rows: &[Prepared<'_>],
        _: &Columns,
    ) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        for group in super::sql::groups(rows) {
            let names = &group[0].names;
            for chunk in group.chunks((MAX_PARAMS / names.len()).max(1)) {
                let mut q = sqlx::query(AssertSqlSafe(insert_sql(cfg, names, chunk.len())));
                for value in chunk.iter().flat_map(|r| &r.values) {
                    q = q.bind(value.as_deref());
                }
                q.execute(&mut *tx).await.map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)
    }

    /// As for PostgreSQL, but booleans are `1`/`0` (a `BOOLEAN` is a `TINYINT(1)`, which
    /// also takes numbers), and times are UTC `YYYY-MM-DD hh:mm:ss[.ffffff]` (the
    /// session's time zone is UTC): MySQL reads no RFC 3339 offset.
    fn text<'v>(
        &self,
        v: &'v serde_json::Value,
        class: Class,
        unit: Option<TimeUnit>,
    ) -> Result<Option<Text<'v>>, String> {
        use serde_json::Value as J;
        match (v, class) {
            (J::Number(n), Class::Bool) => Ok(Some(Text::display(n))),
            (_, Class::Bool) => Ok(to_text(v, class, unit)?.map(|t| match &*t {
                "true" => "1".into(),
                "false" => "0".into(),
                _ => t,
            })),
            (_, Class::Timestamp | Class::Date) => Ok(to_text(v, class, unit)?.map(|t| {
                let format = match class {
                    Class::Date => "%Y-%m-%d",
                    _ => "%Y-%m-%d %H:%M:%S%.f",
                };
                match t.parse::<jiff::Timestamp>() {
                    Ok(ts) => Text::display(ts.strftime(format)),
                    // No offset: the server reads it as it is.
                    Err(_) => t,
                }
            })),
            _ => to_text(v, class, unit),
        }
    }
}

/// The class of a column from `information_schema.columns`.
fn class(data_type: &str, column_type: &str) -> Class {
    match data_type {
        "tinyint" if column_type.starts_with("tinyint(1)") => Class::Bool,
        "datetime" | "timestamp" => Class::Timestamp,
        "date" => Class::Date,
        "json" => Class::Json,
        _ => Class::Plain,
    }
}

/// A validated identifier in backticks (a backtick in it doubled, for a name that came
/// from the catalog).
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `INSERT INTO t (a, b) VALUES (?, ?), … [ON DUPLICATE KEY UPDATE …]` for `rows` rows.
fn insert_sql(cfg: &Insert, names: &[Cow<'_, str>], rows: usize) -> String {
    let table = super::sql::quoted_table::<Mysql>(&cfg.table);
    let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
    let row = format!("({})", vec!["?"; names.len()].join(", "));
    let mut sql = format!(
        "INSERT INTO {table} ({}) VALUES {}",
        quoted.join(", "),
        vec![row; rows].join(", ")
    );
    if let Some(c) = &cfg.on_conflict {
        let updates: Vec<String> = names
            .iter()
            .filter(|n| !c.key.iter().any(|k| k == n.as_ref()))
            .map(|n| format!("{0} = VALUES({0})", quote(n)))
            .collect();
        let set = if c.action == ConflictAction::Update && !updates.is_empty() {
            updates.join(", ")
        } else {
            format!("{0} = {0}", quote(&c.key[0]))
        };
        sql.push_str(&format!(" ON DUPLICATE KEY UPDATE {set}"));
    }
    sql
}

/// Errors about the data are permanent: SQLSTATE classes 21 (cardinality), 22 (data) and
/// 23 (integrity: duplicate key, NULL into NOT NULL, CHECK), and the strict-mode errors
/// MariaDB reports under other states (1265 truncated, 1364 no default, 1366 and 1292
/// wrong value, 1406 too long, 1264 and 1690 out of range, 4025 and 3819 CHECK).
/// Everything else (connection, deadlock 1213, lock wait 1205, shutdown, a table or
/// column missing while a migration runs) is about the database: transient.
fn classify(e: sqlx::Error) -> SinkError {
    let number = number(&e);
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let msg = format!("mysql {number} ({code}): {}", db.message());
            let data = matches!(
                number,
                1265 | 1364 | 1366 | 1292 | 1406 | 1264 | 1690 | 4025 | 3819
            );
            if data || code.starts_with("21") || code.starts_with("22") || code.starts_with("23") {
                SinkError::permanent(msg)
            } else {
                SinkError::transient(msg)
            }
        }
        _ => SinkError::transient(format!("mysql: {e}")),
    }
}

/// The server's error number (0 when the error is not the server's).
fn number(e: &sqlx::Error) -> u16 {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map_or(0, |e| e.number()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sinks::mysql::Config;
    use crate::sink::Delivery;
    use serde_json::json;

    fn settings(cfg: serde_json::Value) -> Settings {
        serde_json::from_value::<Config>(cfg)
            .unwrap()
            .compile()
            .unwrap()
    }

    #[test]
    fn try_shows_the_statement() {
        let record = json!({"device": "d1", "seq": 1, "temp": 2.5});
        let origin = &Delivery::detached("t", record.clone()).origin;
        let update = settings(json!({
            "url": "mysql://u:pw@h/db", "table": "iot.readings",
            "on_conflict": {"key": ["seq"], "action": "update"}
        }));
        assert_eq!(
            would(&update, origin, &record.clone().into()),
            "mysql: INSERT INTO `iot`.`readings` (`device`, `seq`, `temp`) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE `device` = VALUES(`device`), `temp` = VALUES(`temp`) \
             (record keys that are no column of the table are left out)"
        );
        let ignore = settings(json!({
            "url": "mysql://h/db", "table": "readings",
            "on_conflict": {"key": ["seq"], "action": "ignore"}
        }));
        let names = [Cow::from("seq"), Cow::from("temp")];
        assert_eq!(
            insert_sql(&ignore.insert, &names, 2),
            "INSERT INTO `readings` (`seq`, `temp`) VALUES (?, ?), (?, ?) \
             ON DUPLICATE KEY UPDATE `seq` = `seq`"
        );
    }

    #[tokio::test] // the (never used) pool needs a runtime
    async fn values_as_mysql_reads_them() {
        let db = Mysql {
            pool: MySqlPoolOptions::new()
                .connect_lazy_with(MySqlConnectOptions::new().host("127.0.0.1").port(1)),
        };
        let t = |v, class| db.text(&v, class, None).unwrap().map(|t| t.to_string());
        assert_eq!(t(json!(true), Class::Bool).as_deref(), Some("1"));
        assert_eq!(t(json!("false"), Class::Bool).as_deref(), Some("0"));
        assert_eq!(t(json!(1), Class::Bool).as_deref(), Some("1"));
        assert_eq!(
            t(json!("2026-11-26T03:00:00.250+01:00"), Class::Timestamp).as_deref(),
            Some("2026-11-26 02:00:00.25")
        );
        assert_eq!(
            t(json!(1_700_000_000), Class::Timestamp).as_deref(),
            Some("2023-11-14 22:13:20")
        );
        assert_eq!(
            t(json!(1_700_000_000), Class::Date).as_deref(),
            Some("2023-11-14")
        );
        assert_eq!(
            t(json!("2026-01-02 03:04:05"), Class::Timestamp).as_deref(),
            Some("2026-01-02 03:04:05")
        );
        assert_eq!(t(json!(null), Class::Bool), None);
        assert_eq!(class("tinyint", "tinyint(1)"), Class::Bool);
        assert_eq!(class("tinyint", "tinyint(4)"), Class::Plain);
        assert_eq!(class("timestamp", "timestamp(3)"), Class::Timestamp);
    }

    #[test]
    fn try_shows_the_table_created_and_the_columns_added() {
        let record = json!({"device": "d1", "seq": 1, "temp": 2.5});
        let origin = &Delivery::detached("t", record.clone()).origin;
        let created = yaml_serde::from_str::<Config>(
            "{url: mysql://h/db, table: readings, create: {columns: \
             {seq: BIGINT, device: VARCHAR(64), at: DATETIME(6)}, primary_key: [seq]}}",
        )
        .unwrap()
        .compile()
        .unwrap();
        assert_eq!(
            would(&created, origin, &record.clone().into()),
            "mysql: CREATE TABLE IF NOT EXISTS `readings` (`seq` BIGINT, `device` VARCHAR(64), \
             `at` DATETIME(6), PRIMARY KEY (`seq`)) (when the table is missing), then \
             INSERT INTO `readings` (`device`, `seq`, `temp`) VALUES (?, ?, ?) \
             (record keys that are no column of the table are left out)"
        );
        let adding = settings(json!({
            "url": "mysql://h/db", "table": "plant.readings", "add_columns": true
        }));
        assert_eq!(
            would(&adding, origin, &json!({"ok": false, "body": [1]}).into()),
            "mysql: INSERT INTO `plant`.`readings` (`body`, `ok`) VALUES (?, ?) \
             (record keys that are no column of the table are left out) \
             (after ALTER TABLE `plant`.`readings` ADD COLUMN for each of `body` JSON, \
             `ok` BOOLEAN that is no column yet)"
        );
        let table = Table::parse("readings").unwrap();
        let add =
            |v| super::super::sql::add_column_sql::<Mysql>(&table, "x", Inferred::of(&v).unwrap());
        assert_eq!(
            add(json!(7)),
            "ALTER TABLE `readings` ADD COLUMN `x` BIGINT"
        );
        assert!(add(json!(0.5)).ends_with("`x` DOUBLE"));
        assert!(add(json!("s")).ends_with("`x` TEXT"));
    }
}
