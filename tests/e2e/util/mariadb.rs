//! A throwaway MariaDB (Debian's `mariadb-server`) for the `mysql` sink's tests, one per
//! test: `scripts/mariadb.sh` installs a data directory in a temp dir and starts
//! `mariadbd` on a free loopback port, with a user that logs in with a password. It is
//! killed on drop. About two seconds to start, so each test has a server of its own.

use std::path::PathBuf;
use std::process::Command;

use sqlx::Connection;

use super::free_port;

pub struct Mariadb {
    pub port: u16,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn mariadb_sh(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mariadb.sh");
    let status = Command::new(script)
        .args(args)
        .status()
        .expect("scripts/mariadb.sh");
    assert!(status.success(), "scripts/mariadb.sh {args:?} failed");
}

impl Mariadb {
    /// Starts a server and creates the database `db` on it.
    pub async fn start(db: &str) -> Mariadb {
        mqbridge::install_crypto();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mariadb");
        let port = free_port();
        mariadb_sh(&["start", dir.to_str().unwrap(), &port.to_string()]);
        let server = Mariadb {
            port,
            dir,
            _tmp: tmp,
        };
        let admin = format!("mysql://mqbridge:mqbridge-test@127.0.0.1:{port}");
        let mut conn = sqlx::MySqlConnection::connect(&admin).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut conn)
            .await
            .unwrap();
        server
    }

    /// The URL of database `db`, with the user's password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "mysql://mqbridge:mqbridge-test@127.0.0.1:{}/{db}",
            self.port
        )
    }
}

/// Runs statements on a database.
pub async fn my_exec(url: &str, sql: &str) {
    let mut conn = sqlx::MySqlConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Runs a query whose rows are one text column (cast in SQL with `CAST(… AS CHAR)`);
/// empty when the server is unreachable.
pub async fn my_texts(url: &str, sql: &str) -> Vec<Option<String>> {
    let Ok(mut conn) = sqlx::MySqlConnection::connect(url).await else {
        return Vec::new();
    };
    let rows: Result<Vec<(Option<String>,)>, _> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut conn)
            .await;
    rows.map(|r| r.into_iter().map(|(v,)| v).collect())
        .unwrap_or_default()
}

/// One integer from a query, None when the server is unreachable.
pub async fn my_count(url: &str, sql: &str) -> Option<i64> {
    my_texts(url, sql)
        .await
        .first()
        .cloned()
        .flatten()
        .and_then(|s| s.parse().ok())
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mariadb.sh");
        let _ = Command::new(script)
            .args(["stop", self.dir.to_str().unwrap(), "immediate"])
            .status();
    }
}
