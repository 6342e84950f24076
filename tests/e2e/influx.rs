//! The `influxdb` sink: messages published to the embedded broker become points in a real
//! InfluxDB 1.6 (Debian's, [`Influx`]) that the tests query back: values, tags, escaping,
//! timestamps, and the bad records dead-lettered with their reason while the rest of
//! their batch is written. The 2.x API, which 1.6 does not serve, is checked against a
//! real HTTP server ([`HookServer`]): path, query, `Authorization` and body.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::embedded::{config, start};
use crate::hook_server::{Fault, HookServer};
use crate::util::*;

/// The embedded broker on `mqtt`, readings of `sensors/{device}/{kind}` (the payload as
/// the record) to the influxdb sink written as `sink` (YAML at the indentation of a
/// sink's settings), a file dead letter `dlq`.
fn bridge(mqtt: u16, sink: &str, dlq: &std::path::Path) -> String {
    config(
        mqtt,
        "",
        &format!(
            r#"sinks:
  influx:
    type: influxdb
{sink}
  dlq: {{ type: file, path: {} }}
rules:
  - name: readings
    from: ["sensors/{{device}}/{{kind}}"]
    transform: '.payload'
    to: [influx]
dead_letter: {{ sink: dlq }}"#,
            dlq.display()
        ),
    )
}

const T0: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_v1_writes_points_and_dead_letters_the_bad_records_alone() {
    let influx = Influx::start().await;
    influx.query("", "CREATE DATABASE telemetry").await;
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let mqtt = free_port();
    let sink = format!(
        r#"    url: {}
    database: telemetry
    precision: ms
    measurement: "{{{{ vars.kind }}}}"
    tags: {{ device: "{{{{ vars.device }}}}" }}
    timestamp: {{ key: ts, unit: ms }}
    integers: integer
    batch: {{ max_rows: 100, max_wait: 300ms }}
    retry: {{ initial_delay: 50ms, max_delay: 1s }}"#,
        influx.url()
    );
    let _bridge = start(mqtt, &bridge(mqtt, &sink, &dlq)).await;
    let publisher = TestClient::connect(mqtt, "influx-publisher").await;

    // 20 good readings from two devices (one with characters line protocol escapes in
    // its name), and among them three bad ones: no field, an unreadable timestamp, and a
    // field of another type than the rest (which only InfluxDB can tell: it rejects the
    // batch, which is halved until that line is alone).
    const ODD: &str = "d 2,x=y";
    let mut messages = Vec::new();
    for i in 0..20i64 {
        let device = if i % 2 == 0 { "d1" } else { ODD };
        let note = format!("say \"hi\" \\ {i}\nline two");
        messages.push((
            format!("sensors/{device}/env"),
            json!({"ts": T0 + i, "temp": 20.5 + i as f64, "count": i, "ok": i % 3 == 0, "note": note})
                .to_string(),
        ));
        match i {
            5 => messages.push(("sensors/d1/env".into(), json!({"ts": T0 + 100}).to_string())),
            10 => messages.push((
                "sensors/d1/env".into(),
                json!({"ts": "yesterday", "temp": 1.5}).to_string(),
            )),
            15 => messages.push((
                "sensors/d1/env".into(),
                json!({"ts": T0 + 101, "temp": "hot"}).to_string(),
            )),
            _ => {}
        }
    }
    publisher.publish_all(messages).await;

    let rows = eventually(
        Duration::from_secs(30),
        "20 points and 3 dead letters",
        async || {
            let rows = influx
                .rows("telemetry", "SELECT * FROM env ORDER BY time")
                .await;
            (rows.len() >= 20 && json_lines(&dlq).len() >= 3).then_some(rows)
        },
    )
    .await;
    assert_eq!(rows.len(), 20, "{rows:?}");
    for (i, row) in rows.iter().enumerate() {
        let i = i as i64;
        let want = json!({
            "time": T0 + i,
            "device": if i % 2 == 0 { "d1" } else { ODD },
            "temp": 20.5 + i as f64,
            "count": i,
            "ok": i % 3 == 0,
            "note": format!("say \"hi\" \\ {i}\nline two"),
        });
        assert_eq!(Value::Object(row.clone()), want);
    }
    // The integer field is stored as an integer, the others as what they are.
    let types = influx
        .rows("telemetry", "SHOW FIELD KEYS FROM env")
        .await
        .into_iter()
        .map(|r| {
            (
                r["fieldKey"].as_str().unwrap().to_string(),
                r["fieldType"].as_str().unwrap().to_string(),
            )
        })
        .collect::<BTreeMap<_, _>>();
    assert_eq!(
        types,
        BTreeMap::from(
            [
                ("count", "integer"),
                ("note", "string"),
                ("ok", "boolean"),
                ("temp", "float")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        )
    );

    let letters = json_lines(&dlq);
    assert_eq!(letters.len(), 3, "{letters:?}");
    let error = |ts: Value| -> String {
        let l = letters
            .iter()
            .find(|l| l["record"]["ts"] == ts)
            .unwrap_or_else(|| panic!("no dead letter for ts {ts}: {letters:?}"));
        assert_eq!(l["sink"], "influx");
        assert_eq!(l["error_kind"], "permanent", "{l}");
        assert_eq!(l["attempts"], 1, "{l}");
        l["error"].as_str().unwrap().to_string()
    };
    let e = error(json!(T0 + 100));
    assert!(e.starts_with("line protocol: no fields"), "{e}");
    let e = error(json!("yesterday"));
    assert!(
        e.starts_with(
            "line protocol: timestamp: ts = \"yesterday\" is not a number of milliseconds"
        ),
        "{e}"
    );
    let e = error(json!(T0 + 101));
    assert!(
        e.starts_with(&format!(
            "HTTP 400 Bad Request from POST {}/write?…: ",
            influx.url()
        )) && e.contains("field type conflict"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_v2_requests_carry_the_bucket_the_token_and_the_lines() {
    let hook = HookServer::start().await;
    // The first write fails (500): the batch is sent again, whole.
    hook.inject([Fault::Error500]);
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dead.jsonl");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cr3t-token\n").unwrap();
    let mqtt = free_port();
    let sink = format!(
        r#"    url: {}/influx
    org: acme
    bucket: telemetry
    token_file: {}
    precision: s
    measurement: readings
    tags: {{ device: "{{{{ vars.device }}}}", kind: "{{{{ vars.kind }}}}" }}
    fields: [temp, state]
    timestamp: {{ key: at, unit: rfc3339 }}
    batch: {{ max_rows: 100, max_wait: 300ms }}
    retry: {{ initial_delay: 50ms, max_delay: 1s }}"#,
        hook.url(),
        token.display()
    );
    let _bridge = start(mqtt, &bridge(mqtt, &sink, &dlq)).await;
    let publisher = TestClient::connect(mqtt, "influx-v2-publisher").await;
    publisher
        .publish_all([
            (
                "sensors/d1/env".to_string(),
                r#"{"at": "2026-12-01T09:00:00Z", "temp": 21, "state": "on", "extra": 1}"#.into(),
            ),
            (
                "sensors/d1/env".to_string(),
                r#"{"at": "2026-12-01T09:00:01.9Z", "temp": 21.5}"#.into(),
            ),
        ])
        .await;
    let seen = eventually(Duration::from_secs(20), "both lines written", async || {
        let seen = hook.seen();
        let lines: usize = seen
            .iter()
            .filter(|s| s.status == Some(200))
            .map(|s| {
                s.body
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum();
        (lines >= 2).then_some(seen)
    })
    .await;
    // Fields in the order listed; `extra` is not one.
    let want = "readings,device=d1,kind=env temp=21,state=\"on\" 1796115600\nreadings,device=d1,kind=env temp=21.5 1796115601\n";
    let bodies: Vec<&str> = seen
        .iter()
        .map(|s| std::str::from_utf8(&s.body).unwrap())
        .collect();
    // One request per batch (the two messages may have come in one batch or two): the
    // 500 made the first one's lines go again, and every line was written once, in order.
    assert_eq!(seen[0].status, Some(500));
    assert!(want.starts_with(bodies[0]), "{bodies:?}");
    let written: String = seen
        .iter()
        .zip(&bodies)
        .filter(|(s, _)| s.status == Some(200))
        .map(|(_, b)| *b)
        .collect();
    assert_eq!(written, want, "{bodies:?}");
    for s in &seen {
        assert_eq!(s.path, "/influx/api/v2/write");
        assert_eq!(
            s.query.as_deref(),
            Some("org=acme&bucket=telemetry&precision=s")
        );
        assert_eq!(s.authorization.as_deref(), Some("Token s3cr3t-token"));
        assert_eq!(s.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    }
    assert!(json_lines(&dlq).is_empty());
}
