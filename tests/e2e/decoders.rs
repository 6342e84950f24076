//! Binary payloads through the embedded broker into SQLite: `decode: cbor`,
//! `decode: msgpack` and `decode: {protobuf: ...}` make rows of good payloads and
//! dead-letter a broken one with the decoder's reason.

use std::time::Duration;

use base64::Engine as _;
use ciborium_ll::{Encoder, Header};

use crate::embedded::{V4, config, start};
use crate::util::*;

/// When the readings were taken: 2026-12-02T16:45:28Z.
const AT_SECONDS: u32 = 1_796_229_928;
const AT: &str = "2026-12-02T16:45:28Z";

/// A reading in CBOR: `{"t": 21.5, "seq": seq, "at": 0(AT), "fw": h'0102'}`.
fn cbor_reading(seq: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::from(&mut buf);
    let mut write = || -> std::io::Result<()> {
        e.push(Header::Map(Some(4)))?;
        e.text("t", None)?;
        e.push(Header::Float(21.5))?;
        e.text("seq", None)?;
        e.push(Header::Positive(seq))?;
        e.text("at", None)?;
        e.push(Header::Tag(0))?;
        e.text(AT, None)?;
        e.text("fw", None)?;
        e.bytes(&[1, 2], None)
    };
    write().unwrap();
    buf
}

/// The same reading in MessagePack, `at` a timestamp (extension -1, 32 bits).
fn msgpack_reading(seq: u64) -> Vec<u8> {
    use rmp::encode;
    let mut b = Vec::new();
    let mut write = || -> Result<(), Box<dyn std::error::Error>> {
        encode::write_map_len(&mut b, 4)?;
        encode::write_str(&mut b, "t")?;
        encode::write_f64(&mut b, 21.5)?;
        encode::write_str(&mut b, "seq")?;
        encode::write_uint(&mut b, seq)?;
        encode::write_str(&mut b, "at")?;
        encode::write_ext_meta(&mut b, 4, -1)?;
        b.extend(AT_SECONDS.to_be_bytes());
        encode::write_str(&mut b, "fw")?;
        encode::write_bin(&mut b, &[1, 2])?;
        Ok(())
    };
    write().unwrap();
    b
}

/// The directory of `config/examples/sensors.proto`, which defines `sensors.Reading`.
#[cfg(feature = "protobuf")]
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");

/// The same reading as a Protobuf `sensors.Reading`, `at` as text.
#[cfg(feature = "protobuf")]
fn protobuf_reading(seq: u64) -> Vec<u8> {
    use prost_reflect::{DynamicMessage, Value, prost::Message as _};
    let pool = protox::Compiler::new([EXAMPLES])
        .unwrap()
        .open_file("sensors.proto")
        .unwrap()
        .descriptor_pool();
    let mut msg = DynamicMessage::new(pool.get_message_by_name("sensors.Reading").unwrap());
    msg.set_field_by_name("t", Value::F64(21.5));
    msg.set_field_by_name("seq", Value::U64(seq));
    msg.set_field_by_name("at", Value::String(AT.into()));
    msg.set_field_by_name("fw", Value::Bytes(vec![1, 2].into()));
    msg.encode_to_vec()
}

#[cfg(feature = "protobuf")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_readings_become_rows_and_a_broken_one_a_dead_letter() {
    // A reading cut short inside its last field (fw, two bytes long).
    let mut broken = protobuf_reading(9);
    broken.pop();
    readings_and_a_dead_letter(
        &format!(
            "{{ protobuf: {{ proto_files: [{EXAMPLES}/sensors.proto], message: sensors.Reading }} }}"
        ),
        protobuf_reading,
        &broken,
        "payload is not a valid Protobuf sensors.Reading: buffer underflow",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_readings_become_rows_and_a_broken_one_a_dead_letter() {
    // A map of four entries cut short in its first value.
    let broken = [0xa4, 0x61, b't', 0xf9];
    readings_and_a_dead_letter(
        "cbor",
        cbor_reading,
        &broken,
        "payload is not valid CBOR: truncated: the payload ends inside an item",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_readings_become_rows_and_a_broken_one_a_dead_letter() {
    // A reading with two bytes after it.
    let mut broken = msgpack_reading(9);
    let end = broken.len();
    broken.extend([0xc0, 0xc0]);
    readings_and_a_dead_letter(
        "msgpack",
        msgpack_reading,
        &broken,
        &format!(
            "payload is not valid MessagePack: 2 bytes after the value (which ends at byte {end})"
        ),
    )
    .await;
}

/// Publishes `broken`, then readings 1 to 3 made by `reading`, to a bridge whose rule
/// decodes them with `decode`: three rows, and one dead letter with `reason`.
async fn readings_and_a_dead_letter(
    decode: &str,
    reading: fn(u64) -> Vec<u8>,
    broken: &[u8],
    reason: &str,
) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (db, dlq) = (dir.path().join("t.db"), dir.path().join("dead.jsonl"));
    sqlite_create(
        &db,
        "CREATE TABLE readings (device TEXT, temp REAL, seq INTEGER, at TEXT, fw TEXT)",
    )
    .await;
    let rest = format!(
        r#"sinks:
  db: {{ type: sqlite, path: {db}, table: readings }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: readings
    from: ["sensors/{{device}}/bin"]
    decode: {decode}
    transform: '{{device: .vars.device, temp: .payload.t, seq: .payload.seq, at: .payload.at, fw: .payload.fw}}'
    to: [db]
dead_letter: {{ sink: dlq }}"#,
        db = db.display(),
        dlq = dlq.display(),
    );
    let bridge = start(port, &config(port, "", &rest)).await;
    let p = V4::connect(port, &format!("sensor-{port}"), true, None).await;
    let payloads = std::iter::once(broken.to_vec()).chain((1..=3).map(reading));
    for payload in payloads {
        p.client
            .publish("sensors/d1/bin", rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    eventually(Duration::from_secs(10), "three rows", async || {
        (sqlite_count(&db, "readings").await == 3).then_some(())
    })
    .await;
    assert_eq!(
        sqlite_query(
            &db,
            &format!(
                "SELECT seq FROM readings WHERE device = 'd1' AND temp = 21.5 AND at = '{AT}' \
                 AND fw = 'AQI=' ORDER BY seq"
            )
        )
        .await,
        vec![1, 2, 3],
        "each reading's fields in its row"
    );
    eventually(Duration::from_secs(10), "the dead letter", async || {
        (!json_lines(&dlq).is_empty()).then_some(())
    })
    .await;
    bridge.stop().await.unwrap();
    let letters = json_lines(&dlq);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["rule"], "readings");
    assert_eq!(letter["error"], format!("decode: {reason}"));
    assert_eq!(letter["error_kind"], "permanent");
    assert_eq!(letter["payload_encoding"], "base64");
    assert_eq!(
        letter["payload"],
        base64::engine::general_purpose::STANDARD.encode(broken)
    );
}
