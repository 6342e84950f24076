//! The mysql sink against a real MariaDB (one server per test, `scripts/mariadb.sh`):
//! type conversion, messages through the embedded broker, bad rows isolated into the
//! dead letter, conflict keys, and tables created and columns added on demand.

use std::sync::Arc;
use std::time::Duration;

use mqbridge::config::sinks::SinkConfig;
use mqbridge::eval_pool::{EVAL_TIMEOUT, EvalPool};
use mqbridge::sink::{self, Delivery, OpenContext, Outcome, Sink};
use serde_json::json;

use crate::util::*;

async fn open(cfg: serde_json::Value) -> Arc<dyn Sink> {
    let cfg: SinkConfig = serde_json::from_value(cfg).unwrap();
    let eval = EvalPool::start("eval", 1, EVAL_TIMEOUT).unwrap();
    let ctx = OpenContext {
        publisher: None,
        eval: &eval,
    };
    sink::open(&cfg.compile().unwrap(), ctx).await.unwrap()
}

async fn write_ok(sink: &dyn Sink, records: Vec<serde_json::Value>) {
    let batch: Vec<Delivery> = records
        .into_iter()
        .map(|r| Delivery::detached("t", r))
        .collect();
    sink.write(&batch)
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_converted_to_each_column_type() {
    let server = Mariadb::start("conv").await;
    let db = server.url("conv");
    // (column type, record value, the value read back as text)
    let cases: &[(&str, serde_json::Value, Option<&str>)] = &[
        ("text", json!("héllo"), Some("héllo")),
        ("varchar(8)", json!("short"), Some("short")),
        ("varchar(8)", json!(42), Some("42")),
        ("int", json!(-123456), Some("-123456")),
        ("int", json!(12.0), Some("12")),
        (
            "bigint",
            json!(9007199254740993i64),
            Some("9007199254740993"),
        ),
        ("double", json!(-0.125), Some("-0.125")),
        ("decimal(10,3)", json!(12.345), Some("12.345")),
        (
            "decimal(30,1)",
            json!("12345678901234567890.5"),
            Some("12345678901234567890.5"),
        ),
        ("boolean", json!(true), Some("1")),
        ("boolean", json!("false"), Some("0")),
        ("tinyint(1)", json!(1), Some("1")),
        (
            "datetime(3)",
            json!("2026-11-26T03:00:00.250Z"),
            Some("2026-11-26 03:00:00.250"),
        ),
        (
            "datetime",
            json!("2026-11-26T04:00:00+01:00"),
            Some("2026-11-26 03:00:00"),
        ),
        (
            "timestamp(3)",
            json!(1700000000123i64),
            Some("2023-11-14 22:13:20.123"),
        ),
        ("timestamp", json!(1700000000), Some("2023-11-14 22:13:20")),
        ("date", json!("2026-11-26"), Some("2026-11-26")),
        ("date", json!(1700000000), Some("2023-11-14")),
        ("json", json!({"a": [1, 2]}), Some(r#"{"a":[1,2]}"#)),
        ("int", json!(null), None),
    ];
    for (i, (ty, value, want)) in cases.iter().enumerate() {
        let table = format!("t{i}");
        my_exec(
            &db,
            &format!("CREATE TABLE {table} (v {ty} NULL, other int)"),
        )
        .await;
        let sink = open(json!({"type": "mysql", "url": db, "table": table})).await;
        sink.write(&[Delivery::detached(
            "t",
            json!({"v": value, "not_a_column": 1}),
        )])
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap_or_else(|e| panic!("{ty} {value}: {e}"));
        let got = my_texts(&db, &format!("SELECT CAST(v AS CHAR) FROM {table}")).await;
        assert_eq!(got, vec![want.map(String::from)], "{ty} from {value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_through_the_embedded_broker_become_rows_and_bad_ones_dead_letters() {
    let server = Mariadb::start("plant").await;
    let db = server.url("plant");
    my_exec(
        &db,
        "CREATE TABLE readings (device varchar(16) NOT NULL, seq int PRIMARY KEY, big bigint, \
         temp double NOT NULL, price decimal(10,2), body json, at datetime(3), ok boolean)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead = dir.path().join("dead.jsonl");
    let cfg = format!(
        r#"
embedded: {{ listen: "127.0.0.1:{port}", allow_anonymous: true }}
sinks:
  my:
    type: mysql
    url: "{db}"
    table: plant.readings
    batch: {{ max_rows: 500, max_wait: 20ms }}
    retry: {{ initial_delay: 50ms, max_delay: 1s }}
    columns:
      device: .device
      seq: .p.seq
      big: .p.seq * 1000000000
      temp: .p.temp
      price: .p.price
      body: .p
      at: .at
      ok: .p.seq % 2 == 0
  dead: {{ type: file, path: "{}" }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, p: .payload, at: .received_at}}'
    to: [my]
dead_letter: {{ sink: dead }}
shutdown_timeout: 5s
"#,
        dead.display()
    );
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(port, "my-publisher").await;
    // Message 500 has no temperature (NULL into NOT NULL), message 700 one that is no
    // number; both sit in the middle of 500-row batches.
    let msgs = (0..1000).map(|i| {
        let temp = match i {
            500 => "null".to_string(),
            700 => "\"hot\"".to_string(),
            _ => format!("{}.5", i % 40),
        };
        (
            format!("sensors/d{}/telemetry", i % 4),
            format!(r#"{{"seq": {i}, "temp": {temp}, "price": 1.25}}"#),
        )
    });
    publisher.publish_all(msgs).await;
    eventually(
        Duration::from_secs(60),
        "998 rows and 2 dead letters",
        async || {
            let rows = my_count(&db, "SELECT CAST(count(*) AS CHAR) FROM readings").await?;
            (rows >= 998 && json_lines(&dead).len() >= 2).then_some(())
        },
    )
    .await;
    bridge.stop().await.unwrap();
    assert_eq!(
        my_count(&db, "SELECT CAST(count(*) AS CHAR) FROM readings").await,
        Some(998)
    );
    let row = my_texts(
        &db,
        "SELECT CONCAT_WS(' ', device, seq, big, temp, price, JSON_VALUE(body, '$.seq'), \
         at > NOW() - INTERVAL 1 HOUR, ok) FROM readings WHERE seq = 42",
    )
    .await;
    assert_eq!(row, vec![Some("d2 42 42000000000 2.5 1.25 42 1 1".into())]);
    let mut letters: Vec<String> = json_lines(&dead)
        .iter()
        .map(|l| {
            format!(
                "{} {} {}",
                l["record"]["p"]["seq"], l["error_kind"], l["error"]
            )
        })
        .collect();
    letters.sort();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters[0].starts_with("500 \"permanent\" \"mysql 1048 (23000)"),
        "{}",
        letters[0]
    );
    assert!(
        letters[1].starts_with("700 \"permanent\" \"mysql 1366"),
        "{}",
        letters[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_conflict_ignore_and_update() {
    let server = Mariadb::start("conflicts").await;
    let db = server.url("conflicts");
    my_exec(
        &db,
        "CREATE TABLE readings (seq int PRIMARY KEY, device text, temp double)",
    )
    .await;
    let sink = |action: &str| {
        open(json!({"type": "mysql", "url": db, "table": "readings",
                    "on_conflict": {"key": ["seq"], "action": action}}))
    };
    let (update, ignore) = (sink("update").await, sink("ignore").await);
    let rows = async || {
        my_texts(
            &db,
            "SELECT CONCAT_WS(':', seq, device, temp) FROM readings ORDER BY seq",
        )
        .await
    };
    write_ok(
        &*update,
        vec![
            json!({"seq": 1, "device": "a", "temp": 10}),
            json!({"seq": 2, "device": "b", "temp": 1}),
        ],
    )
    .await;
    // A redelivered row and a new one in one batch: the new one is written, the old one
    // kept as it was.
    write_ok(
        &*ignore,
        vec![
            json!({"seq": 1, "device": "x", "temp": 99}),
            json!({"seq": 3, "device": "c", "temp": 3}),
        ],
    )
    .await;
    assert_eq!(
        rows().await,
        ["1:a:10", "2:b:1", "3:c:3"].map(|s| Some(s.to_string()))
    );
    write_ok(&*update, vec![json!({"seq": 1, "device": "z", "temp": 20})]).await;
    assert_eq!(
        rows().await,
        ["1:z:20", "2:b:1", "3:c:3"].map(|s| Some(s.to_string()))
    );
    // The same key twice in one batch: the later one wins.
    write_ok(
        &*update,
        vec![json!({"seq": 2, "temp": 5}), json!({"seq": 2, "temp": 6})],
    )
    .await;
    assert_eq!(rows().await[1], Some("2:b:6".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_created_and_columns_added_on_demand() {
    let server = Mariadb::start("ondemand").await;
    tables_on_demand(OnDemand {
        kind: "mysql",
        url: server.url("ondemand"),
        columns: "{ device: VARCHAR(64), seq: BIGINT, temp: DOUBLE, at: DATETIME(6) }",
        added: ["bigint", "double", "text", "tinyint"],
    })
    .await;
}
