//! A throwaway InfluxDB 1.x (Debian's `influxdb`, 1.6) for the `influxdb` sink's tests:
//! `influxd` on free loopback ports (HTTP and its RPC bind address) with a generated
//! config, its meta, data and WAL directories in a temp dir, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

fn influxd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("INFLUXD") {
        return p.into();
    }
    for p in ["/usr/bin/influxd", "/usr/local/bin/influxd"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "influxd not found: install it (apt-get install influxdb) or run the tests through scripts/test.sh"
    );
}

pub struct Influx {
    pub port: u16,
    child: Child,
    /// Holds the config, meta, data and WAL directories and the log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Influx {
    /// Starts influxd and waits until it answers `/ping`.
    pub async fn start() -> Influx {
        mqbridge::install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let (port, rpc) = (free_port(), free_port());
        let d = dir.path().display();
        let conf = dir.path().join("influxdb.conf");
        std::fs::write(
            &conf,
            format!(
                r#"reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"#
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("influxd.log")).unwrap();
        let child = Command::new(influxd_bin())
            .arg("run")
            .arg("-config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start influxd");
        let influx = Influx {
            port,
            child,
            _dir: dir,
        };
        let ping = format!("{}/ping", influx.url());
        eventually(
            Duration::from_secs(30),
            "influxd to answer /ping",
            async || {
                let resp = reqwest::get(&ping).await.ok()?;
                (resp.status() == 204).then_some(())
            },
        )
        .await;
        influx
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs `q` (InfluxQL) in `db`; returns the answer, with times in epoch milliseconds.
    pub async fn query(&self, db: &str, q: &str) -> serde_json::Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/query", self.url()),
            [("db", db), ("q", q), ("epoch", "ms")],
        )
        .unwrap();
        let resp = reqwest::Client::new().post(url).send().await.unwrap();
        assert!(resp.status().is_success(), "{q}: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// The rows `SELECT …` returns, each as column → value (the first series only).
    pub async fn rows(&self, db: &str, q: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let answer = self.query(db, q).await;
        let Some(series) = answer["results"][0]["series"][0].as_object() else {
            return Vec::new();
        };
        let columns: Vec<String> = series["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        series["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                columns
                    .iter()
                    .cloned()
                    .zip(row.as_array().unwrap().iter().cloned())
                    .collect()
            })
            .collect()
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
