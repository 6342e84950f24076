//! One scenario of tables on demand for both SQL table sinks, run by `postgres.rs` and
//! `mysql.rs` against their real servers: a type the database refuses stops the sink
//! from opening, `create:` makes the missing table, a second
//! start finds it made, a key with no column is handled as `unknown_keys` says, and with
//! `add_columns` two sinks writing to the table at once both add the columns for new keys.

use std::time::Duration;

use mqbridge::config::sinks::SinkConfig;
use mqbridge::eval_pool::{EVAL_TIMEOUT, EvalPool};
use mqbridge::sink::OpenContext;

use super::*;

/// A database to run [`tables_on_demand`] against.
pub struct OnDemand {
    /// The sink's `type:`: `postgres` or `mysql`.
    pub kind: &'static str,
    /// An empty database.
    pub url: String,
    /// `create.columns` (YAML flow style) of `device` (text), `seq` (integer), `temp`
    /// (double) and `at` (a timestamp), in the database's own type names.
    pub columns: &'static str,
    /// `information_schema.columns.data_type` of the columns added for an integer, a
    /// float, a string and a boolean.
    pub added: [&'static str; 4],
}

impl OnDemand {
    /// A query's rows of one column, each value turned to text by `concat` (which both
    /// databases have).
    async fn texts(&self, sql: &str) -> Vec<Option<String>> {
        match self.kind {
            "postgres" => pg_texts(&self.url, sql).await,
            _ => my_texts(&self.url, sql).await,
        }
    }

    async fn count(&self, sql: &str) -> Option<i64> {
        self.texts(sql).await.first()?.as_deref()?.parse().ok()
    }

    /// The column names of `readings` with their `data_type`: `name type`, by name.
    async fn columns(&self) -> Vec<String> {
        self.texts(
            "SELECT concat(column_name, ' ', data_type) FROM information_schema.columns \
             WHERE table_name = 'readings' ORDER BY column_name",
        )
        .await
        .into_iter()
        .flatten()
        .collect()
    }

    /// A bridge with an embedded broker on `port`, a rule to the sinks `to`, each one
    /// this database's table `readings` created on demand with `settings` added.
    fn config(&self, port: u16, dead: &std::path::Path, settings: &str, to: &[&str]) -> String {
        let sink = format!(
            "{{ type: {}, url: \"{}\", table: readings, {settings}, \
             create: {{ columns: {}, primary_key: [device, seq] }}, \
             on_conflict: {{ key: [device, seq], action: ignore }}, \
             batch: {{ max_rows: 100, max_wait: 20ms }}, \
             retry: {{ initial_delay: 50ms, max_delay: 1s }} }}",
            self.kind, self.url, self.columns
        );
        let sinks: String = to.iter().map(|s| format!("  {s}: {sink}\n")).collect();
        format!(
            r#"
embedded: {{ listen: "127.0.0.1:{port}", allow_anonymous: true }}
sinks:
{sinks}  dead: {{ type: file, path: "{}" }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '.payload + {{device: .vars.device, at: .received_at}}'
    to: [{}]
dead_letter: {{ sink: dead }}
shutdown_timeout: 5s
"#,
            dead.display(),
            to.join(", ")
        )
    }
}

/// Messages through the embedded broker become rows of a table the sink creates; then,
/// the table there, keys with no column become columns.
pub async fn tables_on_demand(db: OnDemand) {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let rows = "SELECT concat(count(*)) FROM readings";

    // The table is missing: the sink creates it when it opens. A key with no column
    // (`rssi`) is an error, as `unknown_keys` says: that record is dead-lettered.
    // A type the database does not know stops the sink from opening, with its error.
    let cfg = serde_json::json!({
        "type": db.kind, "url": db.url, "table": "broken",
        "create": {"columns": {"a": "no_such_type"}}
    });
    let cfg: SinkConfig = serde_json::from_value(cfg).unwrap();
    let eval = EvalPool::start("eval", 1, EVAL_TIMEOUT).unwrap();
    let ctx = OpenContext {
        publisher: None,
        eval: &eval,
    };
    match mqbridge::sink::open(&cfg.compile().unwrap(), ctx).await {
        Ok(_) => panic!("a sink on a table of type no_such_type opened"),
        Err(e) => assert!(e.to_string().contains("creating table broken: "), "{e}"),
    }

    let port = free_port();
    let bridge = InProcess::start(&db.config(port, &dead, "unknown_keys: error", &["a"]));
    let publisher = TestClient::connect(port, "on-demand-1").await;
    publisher
        .publish_all(
            [
                ("sensors/d1/telemetry", r#"{"seq": 1, "temp": 20.5}"#),
                ("sensors/d1/telemetry", r#"{"seq": 2, "temp": 21.5}"#),
                (
                    "sensors/d2/telemetry",
                    r#"{"seq": 3, "temp": 22.5, "rssi": -70}"#,
                ),
            ]
            .map(|(t, p)| (t.to_string(), p.to_string())),
        )
        .await;
    eventually(
        Duration::from_secs(30),
        "2 rows, 1 dead letter",
        async || {
            let n = db.count(rows).await?;
            (n >= 2 && !json_lines(&dead).is_empty()).then_some(())
        },
    )
    .await;
    bridge.stop().await.unwrap();
    assert_eq!(db.count(rows).await, Some(2));
    let letters = json_lines(&dead);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["record"]["seq"], 3);
    let error = letters[0]["error"].as_str().unwrap();
    assert!(
        error.contains("record key \"rssi\" has no column in readings"),
        "{error}"
    );
    let created = db.columns().await;
    let names: Vec<&str> = created
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .collect();
    assert_eq!(names, ["at", "device", "seq", "temp"], "{created:?}");

    // A second start finds the table made. With `add_columns`, two sinks writing the same
    // records to it (the conflict key keeps one row each) both add the new keys' columns
    // at once; a key that is no SQL name (`bad-key`) is ignored, as `unknown_keys` says,
    // and so is one that is only ever null.
    let port = free_port();
    let bridge = InProcess::start(&db.config(port, &dead, "add_columns: true", &["a", "b"]));
    let publisher = TestClient::connect(port, "on-demand-2").await;
    publisher
        .publish_all((10..20).map(|seq| {
            (
                format!("sensors/d{}/telemetry", seq % 3),
                format!(
                    r#"{{"seq": {seq}, "temp": 1.5, "rssi": -{seq}, "snr": {seq}.25, "fw": "1.{seq}", "ok": true, "bad-key": 1, "nothing": null}}"#
                ),
            )
        }))
        .await;
    eventually(Duration::from_secs(30), "12 rows", async || {
        (db.count(rows).await? >= 12).then_some(())
    })
    .await;
    bridge.stop().await.unwrap();
    assert_eq!(db.count(rows).await, Some(12));
    assert_eq!(json_lines(&dead).len(), 1, "no new dead letters");
    let [int, float, string, boolean] = db.added;
    let columns = db.columns().await;
    for added in [
        format!("fw {string}"),
        format!("ok {boolean}"),
        format!("rssi {int}"),
        format!("snr {float}"),
    ] {
        assert!(columns.contains(&added), "{added} in {columns:?}");
    }
    assert_eq!(columns.len(), 8, "{columns:?}");
    let row = db
        .texts("SELECT concat(device, ' ', rssi, ' ', snr, ' ', fw) FROM readings WHERE seq = 15")
        .await;
    assert_eq!(row, [Some("d0 -15 15.25 1.15".to_string())]);
    let old = db
        .texts("SELECT concat(seq, ' ', coalesce(rssi, 0)) FROM readings WHERE seq = 1")
        .await;
    assert_eq!(old, [Some("1 0".to_string())], "earlier rows hold NULL");
}
