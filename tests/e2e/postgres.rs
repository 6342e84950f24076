//! The postgres sink against a real PostgreSQL: type conversion, bad rows isolated into
//! the dead letter, conflict keys, migrations, a server restart mid-stream, and tables
//! created and columns added on demand.

use std::sync::Arc;
use std::time::Duration;

use mqbridge::config::sinks::SinkConfig;
use mqbridge::eval_pool::{EVAL_TIMEOUT, EvalPool};
use mqbridge::message::Message;
use mqbridge::rule::picks::Picks;
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

fn delivery(record: serde_json::Value) -> Delivery {
    Delivery::detached("t", record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_converted_to_each_column_type() {
    let db = pg_fresh_database(&pg_admin_url()).await;
    // (column type, record value, the value read back as text)
    let cases: &[(&str, serde_json::Value, Option<&str>)] = &[
        ("text", json!("héllo"), Some("héllo")),
        ("text", json!(42), Some("42")),
        ("varchar(8)", json!("short"), Some("short")),
        ("smallint", json!(-7), Some("-7")),
        ("integer", json!(123456), Some("123456")),
        ("integer", json!(12.0), Some("12")),
        (
            "bigint",
            json!(9007199254740993i64),
            Some("9007199254740993"),
        ),
        ("real", json!(1.5), Some("1.5")),
        ("double precision", json!(-0.125), Some("-0.125")),
        ("numeric(10,3)", json!(12.34567), Some("12.346")),
        (
            "numeric",
            json!("12345678901234567890.5"),
            Some("12345678901234567890.5"),
        ),
        ("boolean", json!(true), Some("true")),
        ("boolean", json!("false"), Some("false")),
        (
            "timestamptz",
            json!("2026-11-26T03:00:00.250Z"),
            Some("2026-11-26 03:00:00.25+00"),
        ),
        (
            "timestamptz",
            json!(1700000000),
            Some("2023-11-14 22:13:20+00"),
        ),
        (
            "timestamptz",
            json!(1700000000123i64),
            Some("2023-11-14 22:13:20.123+00"),
        ),
        (
            "timestamp",
            json!("2026-11-26T03:00:00Z"),
            Some("2026-11-26 03:00:00"),
        ),
        ("date", json!("2026-11-26"), Some("2026-11-26")),
        ("date", json!(1700000000), Some("2023-11-14")),
        (
            "uuid",
            json!("6f1c2b4e-0d7a-4c1e-9a59-3b8f2f0e9d11"),
            Some("6f1c2b4e-0d7a-4c1e-9a59-3b8f2f0e9d11"),
        ),
        ("json", json!({"a": [1, 2]}), Some(r#"{"a":[1,2]}"#)),
        (
            "jsonb",
            json!({"b": {"c": null}}),
            Some(r#"{"b": {"c": null}}"#),
        ),
        ("jsonb", json!("just a string"), Some(r#""just a string""#)),
        ("jsonb", json!(7), Some("7")),
        (
            "text[]",
            json!(["a", "b \"q\"", null]),
            Some(r#"{a,"b \"q\"",NULL}"#),
        ),
        ("integer[]", json!([1, 2, 3]), Some("{1,2,3}")),
        ("numeric[]", json!([1.5, 2]), Some("{1.5,2}")),
        ("integer", json!(null), None),
    ];
    for (i, (ty, value, want)) in cases.iter().enumerate() {
        let table = format!("t{i}");
        pg_exec(
            &db,
            &format!("CREATE TABLE {table} (v {ty}, extra_ignored_elsewhere int)"),
        )
        .await;
        let sink = open(json!({"type": "postgres", "url": db, "table": table})).await;
        sink.write(&[delivery(json!({"v": value, "not_a_column": 1}))])
            .await
            .into_iter()
            .try_for_each(Outcome::result)
            .unwrap_or_else(|e| panic!("{ty} {value}: {e}"));
        let got = pg_texts(&db, &format!("SELECT v::text FROM {table}")).await;
        assert_eq!(got, vec![want.map(String::from)], "{ty} from {value}");
    }
}

/// A payload a rule took whole is kept as its text ("The payload kept as text" in
/// src/rule/picks.rs): a `jsonb` column gets the text as it is (the server normalizes
/// it), a `json` column the value as serde_json writes it, as for any other record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_kept_as_text_goes_to_jsonb_as_it_is() {
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, "CREATE TABLE kept (b jsonb, j json, t float8)").await;
    let sink = open(json!({"type": "postgres", "url": db, "table": "kept"})).await;
    let picks = Picks::parse("{b: .payload, j: .payload, t: .payload.t}").unwrap();
    let payload = r#" {"t": 2.5, "z": [1, "\u00e9"],  "a": {"x": 1e2}} "#;
    let msg = Message::detached("s/1", payload, 1);
    let record = picks.record_from_text(&msg, &[]).expect("kept as text");
    msg.ack.settle();
    assert_eq!(
        record.entries().unwrap().next().unwrap().1.json_text(),
        Some(payload)
    );
    sink.write(&[Delivery::detached("s/1", record)])
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap();
    let got = pg_texts(
        &db,
        "SELECT b::text || ' | ' || j::text || ' | ' || t::text FROM kept",
    )
    .await;
    // `1e2` shows which text the server read: the payload's (numeric 100), not the
    // value's as serde_json writes it (100.0, as in the json column).
    let want = r#"{"a": {"x": 100}, "t": 2.5, "z": [1, "é"]} | {"a":{"x":100.0},"t":2.5,"z":[1,"é"]} | 2.5"#;
    assert_eq!(got, vec![Some(want.to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_columns_unknown_keys_and_conflicts() {
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, "CREATE SCHEMA iot; CREATE TABLE iot.readings (device text, seq int PRIMARY KEY, temp float8)").await;
    let sink = open(json!({
        "type": "postgres", "url": db, "table": "iot.readings",
        "columns": {"device": ".d", "seq": ".n", "temp": ".m.t * 2"},
        "on_conflict": {"key": ["seq"], "action": "update"}
    }))
    .await;
    sink.write(&[
        delivery(json!({"d": "a", "n": 1, "m": {"t": 10}})),
        delivery(json!({"d": "b", "n": 2, "m": {"t": 1}})),
    ])
    .await
    .into_iter()
    .try_for_each(Outcome::result)
    .unwrap();
    sink.write(&[delivery(json!({"d": "c", "n": 1, "m": {"t": 20}}))])
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap();
    assert_eq!(
        pg_texts(
            &db,
            "SELECT device || ':' || seq || ':' || temp FROM iot.readings ORDER BY seq"
        )
        .await,
        vec![Some("c:1:40".into()), Some("b:2:2".into())]
    );

    let strict = open(
        json!({"type": "postgres", "url": db, "table": "iot.readings", "unknown_keys": "error",
                             "on_conflict": {"key": ["seq"], "action": "ignore"}}),
    )
    .await;
    let err = strict
        .write(&[delivery(json!({"seq": 3, "oops": 1}))])
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap_err();
    assert!(err.message.contains("oops"), "{err}");
    strict
        .write(&[delivery(json!({"seq": 1, "device": "ignored"}))])
        .await
        .into_iter()
        .try_for_each(Outcome::result)
        .unwrap();
    assert_eq!(
        pg_texts(&db, "SELECT device FROM iot.readings WHERE seq = 1").await,
        vec![Some("c".into())]
    );
}

/// Waits until the bridge stores a probe row in `readings`, i.e. it has subscribed.
async fn wait_subscribed(publisher: &TestClient, db: &str) {
    probe_until(
        publisher,
        "sensors/probe/telemetry",
        r#"{"seq": -1, "temp": 1}"#,
        async || {
            pg_count(db, "SELECT count(*)::text FROM readings")
                .await
                .unwrap_or(0)
                > 0
        },
    )
    .await;
}

fn bridge_config(port: u16, db: &str, dlq_table: bool, dir: &std::path::Path) -> String {
    let dead = if dlq_table {
        format!("{{ type: postgres, url: \"{db}\", table: mqbridge_dead_letters, migrate: true }}")
    } else {
        format!(
            "{{ type: file, path: {} }}",
            dir.join("dead.jsonl").display()
        )
    };
    format!(
        r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: bridge-pg }}
sinks:
  pg:
    type: postgres
    url: "{db}"
    table: readings
    batch: {{ max_rows: 500, max_wait: 20ms }}
    retry: {{ initial_delay: 50ms, max_delay: 1s }}
    on_conflict: {{ key: [seq], action: ignore }}
  dead: {dead}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, seq: .payload.seq, temp: .payload.temp}}'
    to: [pg]
dead_letter: {{ sink: dead }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_row_in_a_thousand_is_dead_lettered_and_the_rest_commit() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE readings (device text, seq int PRIMARY KEY, temp float8 CHECK (temp < 1000))",
    )
    .await;
    let bridge = InProcess::start(&bridge_config(broker.port, &db, true, dir.path()));
    let publisher = TestClient::connect(broker.port, "pg-publisher").await;
    wait_subscribed(&publisher, &db).await;

    // Message 500 has a temperature the CHECK constraint refuses (23514), message 700 one
    // that is no number (22P02); both sit in the middle of 500-row batches.
    let msgs = (0..1000).map(|i| {
        let temp = match i {
            500 => "5000".to_string(),
            700 => "\"hot\"".to_string(),
            _ => format!("{}", i % 40),
        };
        (
            format!("sensors/d{}/telemetry", i % 4),
            format!(r#"{{"seq": {i}, "temp": {temp}}}"#),
        )
    });
    publisher.publish_all(msgs).await;
    eventually(
        Duration::from_secs(60),
        "998 rows and 2 dead letters",
        async || {
            let rows = pg_count(&db, "SELECT count(*)::text FROM readings WHERE seq >= 0").await?;
            let dead = pg_count(&db, "SELECT count(*)::text FROM mqbridge_dead_letters").await?;
            (rows >= 998 && dead >= 2).then_some(())
        },
    )
    .await;
    // Stopped, the bridge writes nothing more: the counts are final.
    bridge.stop().await.unwrap();
    assert_eq!(
        pg_count(&db, "SELECT count(*)::text FROM readings WHERE seq >= 0").await,
        Some(998)
    );
    let letters = pg_texts(&db, "SELECT (record->>'seq') || ' ' || sink || ' ' || error_kind || ' ' || error FROM mqbridge_dead_letters ORDER BY 1").await;
    assert_eq!(letters.len(), 2);
    let (l500, l700) = (letters[0].clone().unwrap(), letters[1].clone().unwrap());
    assert!(
        l500.starts_with("500 pg permanent postgres 23514"),
        "{l500}"
    );
    assert!(
        l700.starts_with("700 pg permanent postgres 22P02"),
        "{l700}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_table_from_migrations() {
    let broker = Mosquitto::start().await;
    let db = pg_fresh_database(&pg_admin_url()).await;
    let cfg = format!(
        r##"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: bridge-pg-default }}
sinks:
  pg: {{ type: postgres, url: "{db}", table: mqbridge_messages, migrate: true,
         on_conflict: {{ key: [message_id], action: ignore }} }}
rules:
  - {{ name: all, from: "#", to: pg }}
"##,
        port = broker.port
    );
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(broker.port, "pg-default-publisher").await;
    eventually(
        Duration::from_secs(20),
        "a row in mqbridge_messages",
        async || {
            publisher
                .publish_all([("plant/a".into(), r#"{"t": 1}"#.into())])
                .await;
            (pg_count(&db, "SELECT count(*)::text FROM mqbridge_messages").await? > 0).then_some(())
        },
    )
    .await;
    let row = pg_texts(&db, "SELECT topic || ' ' || (payload->>'t') || ' ' || qos || ' ' || length(message_id) FROM mqbridge_messages LIMIT 1").await;
    assert_eq!(row, vec![Some("plant/a 1 1 32".into())]);
    bridge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_loses_and_duplicates_nothing() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start();
    let db = pg_fresh_database(&pg.url()).await;
    pg_exec(
        &db,
        "CREATE TABLE readings (device text, seq int PRIMARY KEY, temp float8)",
    )
    .await;
    let bridge = InProcess::start(&bridge_config(broker.port, &db, false, dir.path()));
    let publisher = TestClient::connect(broker.port, "pg-restart-publisher").await;
    wait_subscribed(&publisher, &db).await;

    const N: i64 = 3000;
    let batch = |from: i64, to: i64| {
        (from..to).map(|i| {
            (
                format!("sensors/d{}/telemetry", i % 5),
                format!(r#"{{"seq": {i}, "temp": 20}}"#),
            )
        })
    };
    // Each outage starts while a chunk is streaming in and lasts until the next chunk
    // has been published, so the sink is certain to hit it.
    publisher.publish_all(batch(0, 1000)).await;
    pg.stop("fast");
    publisher.publish_all(batch(1000, 2000)).await;
    assert!(
        pg_count(&db, "SELECT 1::text").await.is_none(),
        "postgres should be down"
    );
    pg.start_again();
    eventually(
        Duration::from_secs(60),
        "rows from during the first outage",
        async || {
            (pg_count(&db, "SELECT count(*)::text FROM readings WHERE seq >= 1000").await? > 0)
                .then_some(())
        },
    )
    .await;
    publisher.publish_all(batch(2000, 2500)).await;
    pg.stop("immediate");
    publisher.publish_all(batch(2500, N)).await;
    pg.start_again();

    eventually(
        Duration::from_secs(90),
        "every row after two restarts",
        async || {
            (pg_count(&db, "SELECT count(*)::text FROM readings WHERE seq >= 0").await? >= N)
                .then_some(())
        },
    )
    .await;
    // Stopped, the bridge writes nothing more: the counts are final.
    bridge.stop().await.unwrap();
    assert_eq!(
        pg_count(
            &db,
            "SELECT count(DISTINCT seq)::text FROM readings WHERE seq >= 0"
        )
        .await,
        Some(N)
    );
    assert_eq!(
        pg_count(&db, "SELECT count(*)::text FROM readings WHERE seq >= 0").await,
        Some(N),
        "duplicates"
    );
    assert!(
        json_lines(&dir.path().join("dead.jsonl")).is_empty(),
        "nothing should be dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_created_and_columns_added_on_demand() {
    tables_on_demand(OnDemand {
        kind: "postgres",
        url: pg_fresh_database(&pg_admin_url()).await,
        columns: "{ device: text, seq: bigint, temp: double precision, at: timestamptz }",
        added: ["bigint", "double precision", "text", "boolean"],
    })
    .await;
}

/// `create:` in a schema that does not exist: the sink does not open (it would wait for
/// the schema for ever), and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_in_a_missing_schema_stops_the_sink_from_opening() {
    let db = pg_fresh_database(&pg_admin_url()).await;
    let cfg: SinkConfig = serde_json::from_value(json!({
        "type": "postgres", "url": db, "table": "nosuch.readings",
        "create": {"columns": {"a": "bigint"}}
    }))
    .unwrap();
    let eval = EvalPool::start("eval", 1, EVAL_TIMEOUT).unwrap();
    let ctx = OpenContext {
        publisher: None,
        eval: &eval,
    };
    let Err(e) = sink::open(&cfg.compile().unwrap(), ctx).await else {
        panic!("a sink on nosuch.readings opened");
    };
    let e = e.to_string();
    assert!(
        e.starts_with("creating table nosuch.readings: postgres 3F000"),
        "{e}"
    );
}
