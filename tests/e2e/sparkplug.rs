//! Sparkplug B through the embedded broker into SQLite (`decode: {sparkplug_b: ...}`): an
//! edge node's NBIRTH, NDATA by alias only (the names come from the birth), a gap in
//! `seq` (logged, counted, and a rebirth request that the edge node receives), NDEATH
//! (an offline record), and a broken payload dead-lettered with the decoder's reason.
//! The payloads are encoded by prost-reflect against the schema mqbridge reads them
//! with (`src/rule/decode/sparkplug/sparkplug_b.proto`, the one Sparkplug publishes).

use std::time::Duration;

use prost_reflect::prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use rumqttc::QoS;
use serde_json::{Value as Json, json};

use crate::embedded::V4;
use crate::util::*;

/// 2026-12-02T16:45:28Z, in ms since the epoch.
const AT: u64 = 1_796_229_928_000;

/// `Payload` of the Sparkplug B schema, compiled by protox from the file mqbridge builds in.
fn payload_type() -> MessageDescriptor {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/rule/decode/sparkplug");
    protox::Compiler::new([dir])
        .unwrap()
        .open_file("sparkplug_b.proto")
        .unwrap()
        .descriptor_pool()
        .get_message_by_name("org.eclipse.tahu.protobuf.Payload")
        .unwrap()
}

/// The payload `fields` (proto3 JSON) describe, encoded.
fn encode(desc: &MessageDescriptor, fields: Json) -> Vec<u8> {
    DynamicMessage::deserialize(desc.clone(), fields)
        .unwrap()
        .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_data_by_alias_a_seq_gap_and_a_death() {
    let desc = payload_type();
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let (db, dlq) = (dir.path().join("t.db"), dir.path().join("dead.jsonl"));
    sqlite_create(
        &db,
        "CREATE TABLE metrics (edge TEXT, message_type TEXT, seq INTEGER, online INTEGER, \
         name TEXT, alias INTEGER, datatype TEXT, value TEXT, ts TEXT)",
    )
    .await;
    let cfg = dir.path().join("sparkplug.yaml");
    std::fs::write(
        &cfg,
        format!(
            r#"embedded: {{ listen: 127.0.0.1:{port}, allow_anonymous: true }}
admin: {{ listen: 127.0.0.1:{admin_port} }}
sinks:
  db: {{ type: sqlite, path: {db}, table: metrics }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: plant
    from: ["spBv1.0/#"]
    decode: {{ sparkplug_b: {{ rebirth_on_gap: true }} }}
    transform: >-
      {{edge: (.vars.group + "/" + .vars.edge_node), message_type: .payload.message_type,
        seq: .payload.seq, online: .payload.online, name: .payload.name,
        alias: .payload.alias, datatype: .payload.datatype, value: (.payload.value | tojson),
        ts: .payload.timestamp}}
    to: [db]
dead_letter: {{ sink: dlq }}
shutdown_timeout: 5s
"#,
            db = db.display(),
            dlq = dlq.display(),
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start(&cfg);
    let base = format!("http://127.0.0.1:{admin_port}");
    admin_ready(&base).await;

    // The edge node listens for its commands, as Sparkplug edge nodes do.
    let mut edge = V4::connect(port, "Gw", true, None).await;
    edge.subscribe_acked("spBv1.0/Plant/NCMD/Gw", QoS::AtMostOnce)
        .await;
    let publish = async |edge: &V4, kind: &str, payload: Vec<u8>| {
        let topic = format!("spBv1.0/Plant/{kind}/Gw");
        edge.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    };
    let nbirth = json!({"timestamp": AT, "seq": 0, "metrics": [
        {"name": "bdSeq", "datatype": 4, "longValue": 1},
        {"name": "Temperature", "alias": 1, "datatype": 9, "floatValue": 20.5},
        {"name": "Running", "alias": 2, "datatype": 11, "booleanValue": true},
    ]});
    publish(&edge, "NBIRTH", encode(&desc, nbirth)).await;
    // Aliases only, as edge nodes send their data.
    let ndata = |seq: u64, alias: u64, value: Json| {
        let mut metric = json!({"alias": alias, "timestamp": AT + seq * 1000});
        metric
            .as_object_mut()
            .unwrap()
            .extend(value.as_object().unwrap().clone());
        encode(
            &desc,
            json!({"timestamp": AT + seq * 1000, "seq": seq, "metrics": [metric]}),
        )
    };
    publish(&edge, "NDATA", ndata(1, 1, json!({"floatValue": 21.5}))).await;
    // seq 2 to 4 lost.
    publish(&edge, "NDATA", ndata(5, 2, json!({"booleanValue": false}))).await;

    // The rebirth request reaches the edge node.
    let ncmd = edge.publish_msg().await;
    assert_eq!(ncmd.topic, "spBv1.0/Plant/NCMD/Gw");
    let ncmd = DynamicMessage::decode(desc.clone(), ncmd.payload).unwrap();
    let ncmd = serde_json::to_value(&ncmd).unwrap();
    let metrics = ncmd["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 1, "{ncmd}");
    assert_eq!(
        (
            &metrics[0]["name"],
            &metrics[0]["datatype"],
            &metrics[0]["booleanValue"]
        ),
        (&json!("Node Control/Rebirth"), &json!(11), &json!(true)),
        "{ncmd}"
    );
    bridge
        .wait_for_log("Sparkplug B: seq gap", Duration::from_secs(10))
        .await;
    let gap = bridge
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("seq gap"))
        .cloned();
    let gap = gap.unwrap();
    assert!(
        gap.contains("node=Plant/Gw") && gap.contains("expected=2") && gap.contains("got=5"),
        "{gap}"
    );
    let counted = eventually(Duration::from_secs(10), "the gap counted", async || {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let has = |line: &str| text.lines().any(|l| l == line);
        (has(r#"mqbridge_sparkplug_seq_gaps_total{rule="plant"} 1"#)
            && has(r#"mqbridge_sparkplug_rebirths_requested_total{rule="plant"} 1"#))
        .then_some(())
    });
    counted.await;

    let ndeath = json!({"timestamp": AT + 9000, "metrics": [
        {"name": "bdSeq", "datatype": 4, "longValue": 1}]});
    publish(&edge, "NDEATH", encode(&desc, ndeath)).await;
    // A payload cut short: dead-lettered with the reason.
    let mut broken = ndata(6, 1, json!({"floatValue": 22.5}));
    broken.pop();
    publish(&edge, "NDATA", broken.clone()).await;

    eventually(Duration::from_secs(10), "six rows", async || {
        (sqlite_count(&db, "metrics").await == 6).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the dead letter", async || {
        (!json_lines(&dlq).is_empty()).then_some(())
    })
    .await;
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");

    let rows = sqlite_rows(
        &db,
        "SELECT edge, message_type, seq, online, name, alias, datatype, value, ts \
         FROM metrics ORDER BY seq, alias, name",
    )
    .await;
    let ts = |s: u64| format!("2026-12-02T16:45:{}Z", 28 + s);
    assert_eq!(
        rows,
        [
            // NDEATH carries no seq.
            json!([
                "Plant/Gw",
                "NDEATH",
                null,
                0,
                null,
                null,
                null,
                "null",
                ts(9)
            ]),
            json!([
                "Plant/Gw",
                "NBIRTH",
                0,
                1,
                "bdSeq",
                null,
                "Int64",
                "1",
                ts(0)
            ]),
            json!([
                "Plant/Gw",
                "NBIRTH",
                0,
                1,
                "Temperature",
                1,
                "Float",
                "20.5",
                ts(0)
            ]),
            json!([
                "Plant/Gw",
                "NBIRTH",
                0,
                1,
                "Running",
                2,
                "Boolean",
                "true",
                ts(0)
            ]),
            json!([
                "Plant/Gw",
                "NDATA",
                1,
                null,
                "Temperature",
                1,
                "Float",
                "21.5",
                ts(1)
            ]),
            json!([
                "Plant/Gw",
                "NDATA",
                5,
                null,
                "Running",
                2,
                "Boolean",
                "false",
                ts(5)
            ]),
        ]
    );
    let letters = json_lines(&dlq);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let error = letters[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("decode: payload is not a valid Sparkplug B payload: "),
        "{error}"
    );
    assert_eq!(letters[0]["topic"], "spBv1.0/Plant/NDATA/Gw");
}

/// The rows `sql` selects, each as a JSON array of its columns (text, integer or null).
async fn sqlite_rows(db: &std::path::Path, sql: &str) -> Vec<Json> {
    use sqlx::{Column as _, Connection as _, Row as _, ValueRef as _};
    let url = format!("sqlite://{}?mode=ro", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            row.columns()
                .iter()
                .map(|c| {
                    let i = c.ordinal();
                    if row.try_get_raw(i).unwrap().is_null() {
                        Json::Null
                    } else if let Ok(n) = row.try_get::<i64, _>(i) {
                        json!(n)
                    } else {
                        json!(row.get::<String, _>(i))
                    }
                })
                .collect()
        })
        .collect()
}

/// `mqbridge try` on the shipped example: an NBIRTH's metrics become the table's rows; an
/// NDATA on its own (nothing remembered in a one-off try) keeps its alias unnamed.
#[test]
fn try_shows_a_record_per_metric_of_the_shipped_example() {
    let desc = payload_type();
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/sparkplug-postgres.yaml"
    );
    let try_with = |topic: &str, fields: Json| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mqbridge"))
            .args(["try", cfg, "--topic", topic, "--payload-hex"])
            .arg(hex::encode(encode(&desc, fields)))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = try_with(
        "spBv1.0/Plant/NBIRTH/Gw",
        json!({"timestamp": AT, "seq": 0, "metrics": [
            {"name": "Temperature", "alias": 1, "datatype": 9, "floatValue": 20.5,
             "properties": {"keys": ["engUnit"], "values": [{"type": 12, "stringValue": "C"}]}},
        ]}),
    );
    assert!(
        out.contains("rule sparkplug matched (group=Plant, message_type=NBIRTH, edge_node=Gw)")
            && out.contains(
                r#"record {"datatype":"Float","device":"","edge_node":"Gw","group_id":"Plant","historical":false,"message_type":"NBIRTH","name":"Temperature","online":true,"properties":{"engUnit":"C"},"seq":0,"ts":"2026-12-02T16:45:28Z","value":20.5}"#
            )
            && out.contains("-> metrics: postgres"),
        "{out}"
    );
    let out = try_with(
        "spBv1.0/Plant/NDATA/Gw",
        json!({"timestamp": AT, "seq": 1, "metrics": [{"alias": 1, "floatValue": 21.5}]}),
    );
    assert!(
        out.contains(r#""message_type":"NDATA","name":"","online":null"#)
            && out.contains(r#""datatype":null"#)
            && out.contains(r#""value":21.5"#),
        "{out}"
    );
}

/// `mqbridge schema` describes both ways of writing the decoder.
#[test]
fn the_schema_covers_sparkplug_b() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mqbridge"))
        .arg("schema")
        .output()
        .unwrap();
    let schema: Json = serde_json::from_slice(&out.stdout).unwrap();
    let defs = &schema["$defs"];
    let decode: Vec<&str> = defs["DecodeConfig"]["anyOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["$ref"].as_str())
        .collect();
    assert!(
        decode.contains(&"#/$defs/SparkplugName") && decode.contains(&"#/$defs/SparkplugDecode"),
        "{decode:?}"
    );
    assert_eq!(defs["SparkplugName"]["oneOf"][0]["const"], "sparkplug_b");
    assert_eq!(
        defs["SparkplugDecode"]["properties"]["sparkplug_b"]["$ref"],
        "#/$defs/SparkplugConfig"
    );
    let rebirth = &defs["SparkplugConfig"]["properties"]["rebirth_on_gap"];
    assert_eq!(
        (&rebirth["type"], &rebirth["default"]),
        (&json!("boolean"), &json!(false))
    );
    assert_eq!(defs["SparkplugConfig"]["additionalProperties"], false);
}

/// With an external broker (Mosquitto), the rebirth request goes out over a connection
/// mqbridge makes for it: here for data from an edge node whose NBIRTH it never saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebirth_requests_reach_an_external_broker() {
    let desc = payload_type();
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let bridge = InProcess::start(&format!(
        r#"broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: sp-bridge }}
sinks:
  out: {{ type: file, path: {out} }}
rules:
  - name: plant
    from: ["spBv1.0/+/NDATA/+"]
    decode: sparkplug_b
    to: [out]
  - name: plant-rebirth
    from: ["spBv1.0/+/NDATA/+"]
    decode: {{ sparkplug_b: {{ rebirth_on_gap: true }} }}
    filter: 'false'
    to: [out]
shutdown_timeout: 5s
"#,
        port = broker.port,
        out = out.display(),
    ));
    let mut edge = TestClient::connect(broker.port, "Gw").await;
    edge.client
        .subscribe("spBv1.0/Plant/NCMD/Gw", QoS::AtMostOnce)
        .await
        .unwrap();
    // Until the bridge has subscribed, its NDATA are not seen: publish until one is.
    let data = encode(
        &desc,
        json!({"seq": 7, "metrics": [{"alias": 1, "floatValue": 1.5}]}),
    );
    let ncmd = eventually(Duration::from_secs(20), "the rebirth request", async || {
        edge.client
            .publish(
                "spBv1.0/Plant/NDATA/Gw",
                QoS::AtLeastOnce,
                false,
                data.clone(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_millis(300), edge.received.recv())
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(ncmd.0, "spBv1.0/Plant/NCMD/Gw");
    let sent = DynamicMessage::decode(desc.clone(), ncmd.1.as_slice()).unwrap();
    let sent = serde_json::to_value(&sent).unwrap();
    assert_eq!(sent["metrics"][0]["name"], "Node Control/Rebirth", "{sent}");
    assert_eq!(sent["metrics"][0]["booleanValue"], true, "{sent}");
    // The rule without rebirth_on_gap wrote its records: no name for an unknown alias.
    eventually(Duration::from_secs(10), "a record", async || {
        json_lines(&out).first().cloned()
    })
    .await;
    let record = &json_lines(&out)[0];
    assert_eq!(record["payload"]["alias"], 1, "{record}");
    assert_eq!(record["payload"]["name"], Json::Null, "{record}");
    assert_eq!(record["payload"]["value"], 1.5, "{record}");
    bridge.stop().await.unwrap();
}
