//! The `nats` sink against a real nats-server with JetStream: messages published into the
//! embedded broker come out of a stream in order per subject, with the rendered subject,
//! headers and `Nats-Msg-Id`; a message published again is dropped by JetStream as a
//! duplicate; records for a subject no stream captures are dead-lettered without holding
//! up the others; credentials are read from a file.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::stream::Stream;

use crate::util::*;

/// mqbridge with its embedded broker on `port`: `sensors/{device}/telemetry` as
/// `{device, seq}` records to the nats sink (at `url`, with `auth` added to its settings),
/// subject `telemetry.<device>`, except device `ghost`'s, `nowhere.ghost`, which no stream
/// captures; dead letters to a file in `dir`.
fn config(dir: &Path, port: u16, url: &str, auth: &str) -> String {
    format!(
        r#"
embedded: {{ listen: "127.0.0.1:{port}", allow_anonymous: true }}
spool: {{ path: {spool} }}
sinks:
  stream:
    type: nats
    url: {url}
    subject: "{{% if vars.device == 'ghost' %}}nowhere{{% else %}}telemetry{{% endif %}}.{{{{ vars.device }}}}"
    headers: {{ Device: "{{{{ vars.device }}}}", Rule: "{{{{ rule }}}}" }}
    batch: {{ max_rows: 50 }}
    {auth}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: forward
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, seq: .payload.seq}}'
    to: [stream]
dead_letter: {{ sink: dlq }}
shutdown_timeout: 5s
"#,
        spool = dir.join("spool").display(),
        dlq = dir.join("dead.jsonl").display(),
    )
}

async fn stored(stream: &mut Stream) -> u64 {
    stream.info().await.map(|i| i.state.messages).unwrap_or(0)
}

/// Waits until the stream holds `n` messages, and not more.
async fn wait_stored(stream: &mut Stream, n: u64) {
    let got = within(Duration::from_secs(30), async || {
        (stored(stream).await >= n).then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "the stream holds {} of {n}",
        stored(stream).await
    );
    assert_eq!(
        stored(stream).await,
        n,
        "the stream holds more than expected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_stream_in_order_and_duplicates_are_dropped() {
    let nats = NatsServer::start(&[]).await;
    let js = nats.jetstream(async_nats::ConnectOptions::new()).await;
    let mut stream = NatsServer::create_stream(&js, "TELEMETRY", &["telemetry.>"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _bridge = InProcess::start(&config(dir.path(), port, &nats.url(), ""));
    wait_listening(port, "the broker to listen").await;
    let publisher = TestClient::connect(port, "devices").await;

    // 200 records on two devices, with three for the ghost among them.
    let message = |device: &str, seq: i64| {
        (
            format!("sensors/{device}/telemetry"),
            format!(r#"{{"seq": {seq}}}"#),
        )
    };
    let mut messages = Vec::new();
    for i in 0..200 {
        messages.push(message(if i % 2 == 0 { "d1" } else { "d2" }, i / 2));
        if i % 70 == 10 {
            messages.push(message("ghost", i));
        }
    }
    publisher.publish_all(messages).await;
    wait_stored(&mut stream, 200).await;

    // In order per subject, with the rendered subject and headers, each with an id of
    // its own that starts with its message's.
    let mut per_subject: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    let mut ids = std::collections::HashSet::new();
    for seq in 1..=200 {
        let m = stream.get_raw_message(seq).await.unwrap();
        let record: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let device = record["device"].as_str().unwrap();
        assert_eq!(m.subject.as_str(), format!("telemetry.{device}"));
        assert_eq!(m.headers.get("Device").unwrap().as_str(), device);
        assert_eq!(m.headers.get("Rule").unwrap().as_str(), "forward");
        let id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
        let payload = format!(r#"{{"seq": {}}}"#, record["seq"]);
        let message_id = mqbridge::message::message_id(
            &format!("sensors/{device}/telemetry"),
            payload.as_bytes(),
        );
        assert!(id.starts_with(&format!("{message_id}-")), "{id}");
        assert!(ids.insert(id), "ids are unique");
        per_subject
            .entry(m.subject.to_string())
            .or_default()
            .push(record["seq"].as_i64().unwrap());
    }
    assert_eq!(per_subject.len(), 2);
    for (subject, seqs) in &per_subject {
        assert_eq!(*seqs, (0..100).collect::<Vec<_>>(), "{subject} in order");
    }

    // The ghost's records are dead letters, with JetStream's reason.
    let dead = eventually(Duration::from_secs(10), "three dead letters", async || {
        let letters = json_lines(&dir.path().join("dead.jsonl"));
        (letters.len() >= 3).then_some(letters)
    })
    .await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    for letter in &dead {
        assert_eq!(letter["error_kind"], "permanent", "{letter}");
        let error = letter["error"].as_str().unwrap();
        assert!(
            error.contains("no stream captures subject \"nowhere.ghost\""),
            "{error}"
        );
        assert_eq!(letter["attempts"], 1, "{letter}");
    }

    // The same message again (as a broker redelivers it): JetStream drops the copy, and
    // the bridge counts it delivered (no dead letter). A new message after it arrives.
    publisher
        .publish_all([message("d1", 5), message("d1", 100)])
        .await;
    wait_stored(&mut stream, 201).await;
    let last = stream.get_raw_message(201).await.unwrap();
    let record: serde_json::Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(record["seq"], 100);
    assert_eq!(json_lines(&dir.path().join("dead.jsonl")).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_a_file() {
    let nats = NatsServer::start(&["--user", "bridge", "--pass", "s3cret-pass"]).await;
    let js = nats
        .jetstream(async_nats::ConnectOptions::with_user_and_password(
            "bridge".into(),
            "s3cret-pass".into(),
        ))
        .await;
    let mut stream = NatsServer::create_stream(&js, "TELEMETRY", &["telemetry.>"]).await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("nats-password");
    std::fs::write(&password, "s3cret-pass\n").unwrap();
    let port = free_port();
    let auth = format!(
        "username: bridge\n    password_file: {}",
        password.display()
    );
    let _bridge = InProcess::start(&config(dir.path(), port, &nats.url(), &auth));
    wait_listening(port, "the broker to listen").await;
    let publisher = TestClient::connect(port, "devices").await;
    publisher
        .publish_all([(
            "sensors/d1/telemetry".to_string(),
            r#"{"seq": 1}"#.to_string(),
        )])
        .await;
    wait_stored(&mut stream, 1).await;
}
