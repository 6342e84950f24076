//! Issue 5's fault scenarios for the webhook sink ("prove the promise"): numbered QoS 1
//! messages from several publishers go through Mosquitto and mqbridge (a child process)
//! to a real HTTP receiver ([`HookServer`]) that fails the way real ones do, and the test
//! counts what the receiver accepted: `sent N / stored S / lost L / duplicates D`, with
//! lost = 0. Each scenario runs a short form in the normal test run and a long one with
//! `MQBRIDGE_LONG_TESTS=1`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::hook_server::{Fault, HookServer, Seen};
use crate::util::*;

/// The bridge for every scenario here: topics `faults/{stream}` to the webhook sink
/// described by `hook` (YAML under `sinks:`, at its indentation), records
/// `{stream, seq}`, a file dead letter at `dlq`, and a spool, as in the shipped configs.
///
/// With the spool, mqbridge acknowledges what it is handed as soon as it is on disk, so a
/// backlog leaves the broker as fast as mqbridge reads it. (Without one, what Mosquitto
/// 2.0.11 floods past the receive maximum waits in memory up to `max_buffered`: see
/// [`a_flooding_broker`] and docs/guarantees.md §5.)
fn bridge_config(dir: &Path, broker: u16, client_id: &str, hook: &str) -> std::path::PathBuf {
    let path = dir.join("bridge.yaml");
    let dlq = dir.join("dead.jsonl");
    std::fs::write(
        &path,
        format!(
            r#"
broker: {{ url: "mqtt://127.0.0.1:{broker}", client_id: {client_id}, protocol: 5, receive_maximum: 2000 }}
spool: {{ path: {spool} }}
sinks:
{hook}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: faults
    from: ["faults/{{stream}}"]
    transform: '{{stream: .vars.stream, seq: .payload.seq}}'
    to: [hook]
dead_letter: {{ sink: dlq }}
"#,
            dlq = dlq.display(),
            spool = dir.join("spool").display()
        ),
    )
    .unwrap();
    path
}

/// The records the receiver accepted (answered 2xx), as (stream, seq), in the order it
/// answered them (a request's body is one record, or an array of them).
fn accepted(seen: &[Seen]) -> Vec<(String, i64)> {
    let record = |v: &serde_json::Value| {
        (
            v["stream"].as_str().unwrap().to_owned(),
            v["seq"].as_i64().unwrap(),
        )
    };
    seen.iter()
        .filter(|s| s.status.is_some_and(|c| (200..300).contains(&c)))
        .flat_map(|s| match s.json() {
            serde_json::Value::Array(items) => items.iter().map(record).collect(),
            v => vec![record(&v)],
        })
        .collect()
}

/// How many requests got each answer (status code, or "reset").
fn answers(seen: &[Seen]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for s in seen {
        let key = s.status.map_or("reset".to_owned(), |c| c.to_string());
        *out.entry(key).or_default() += 1;
    }
    out
}

/// Waits until the receiver accepted every one of the `n` messages at least once. Each
/// poll looks only at the requests new since the last one, copied out (the server waits
/// for the lock while a poll holds it).
async fn all_accepted(hook: &HookServer, n: i64, timeout: Duration) {
    let mut looked_at = 0;
    let mut distinct = std::collections::HashSet::new();
    eventually(
        timeout,
        "every message accepted by the webhook",
        async || {
            let new = hook.with_seen(|seen| seen[looked_at..].to_vec());
            looked_at += new.len();
            distinct.extend(accepted(&new).into_iter().map(|(_, s)| s));
            (distinct.len() as i64 >= n).then_some(())
        },
    )
    .await
}

/// Stops the bridge gracefully: it sends and writes nothing more, so what the receiver saw
/// and the dead letters are final (a late resend counts as a duplicate, or out of order).
async fn stop_for_the_tally(bridge: ChildBridge) {
    let (status, _) = bridge.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}");
}

/// The webhook is down (connections refused, then 503 to everything) while 4 publishers
/// send, then comes back flaky (about half the requests get a 5xx, some a 429 with
/// `Retry-After: 1`) for twice as long, then healthy. Retries are unlimited, so every
/// message must get a 2xx and none may be dead-lettered.
///
/// The flaky phase ends because under it the sink moves slowly: the records of one topic
/// go one after the other, so a retry of a batch gets each topic about one record further,
/// and the batch's backoff still grows to `max_delay` as if nothing had been delivered
/// (2,000 messages took 45–70 s when the webhook stayed flaky).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_then_flaky_loses_nothing() {
    let n: i64 = short_or_long(2_000, 20_000);
    let outage = short_or_long(Duration::from_secs(5), Duration::from_secs(30));
    let flaky = outage * 2;
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let reserved = HookServer::reserve();
    // Retry-After is honoured up to max_delay: with 1 s, the 429s' `Retry-After: 1` is.
    let hook = format!(
        r#"  hook:
    type: webhook
    url: {}/ingest
    timeout: 5s
    concurrency: 4
    batch: {{ max_rows: 500, max_wait: 20ms }}
    retry: {{ initial_delay: 20ms, max_delay: 1s }}"#,
        reserved.url()
    );
    let bridge =
        ChildBridge::start_subscribed(&bridge_config(dir.path(), broker.port, "faults-1", &hook))
            .await;

    // 64 streams a publisher (many, for the reason above), spread over 1.5 outages: some
    // of the traffic arrives while the webhook is down, the rest while it is flaky.
    let started = Instant::now();
    let publishing = publish_numbered(broker.port, "faults-pub", 4, n, outage * 3 / 2, |p, i| {
        format!("faults/p{p}s{}", i % 64)
    });
    // The sleeps here pace the phases (how long each lasts); nothing waits on them.
    let server = async {
        // Down: the port is not listened on, connections are refused.
        tokio::time::sleep(outage / 2).await;
        // Up, but answering 503 to everything.
        let hook = reserved.listen();
        hook.fail_at_random(&[(Fault::Unavailable, 1.0)]);
        tokio::time::sleep(outage / 2).await;
        // Flaky.
        hook.fail_at_random(&[
            (Fault::Error500, 0.4),
            (Fault::Unavailable, 0.1),
            (Fault::TooMany, 0.01),
        ]);
        tokio::time::sleep(flaky).await;
        // Healthy.
        hook.fail_at_random(&[]);
        hook
    };
    let ((), hook) = tokio::join!(publishing, server);
    let while_flaky = hook.with_seen(|seen| accepted(seen).len());
    all_accepted(&hook, n, short_or_long(120, 900) * Duration::from_secs(1)).await;
    let log = std::sync::Arc::clone(&bridge.log);
    stop_for_the_tally(bridge).await;

    let tally =
        hook.with_seen(|seen| Tally::of_seqs(n, accepted(seen).into_iter().map(|(_, s)| s)));
    println!("{tally}");
    println!(
        "webhook down {outage:?}, flaky {flaky:?} ({while_flaky} accepted by then), then healthy: answers {:?}, all accepted after {:?}",
        hook.with_seen(answers),
        started.elapsed()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    // Each 2xx reached the bridge here (no timeouts, resets or restarts), and a request
    // that got one is not sent again when its batch is retried: so no duplicates. (In
    // general a webhook can get duplicates, e.g. a 2xx whose answer the bridge never saw;
    // the Idempotency-Key lets the receiver drop them.)
    assert_eq!(tally.duplicates, 0, "{tally}");
    assert!(json_lines(&dir.path().join("dead.jsonl")).is_empty());

    // Each phase happened: refused connections, 503s, then 500s and 429s.
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("will retry") && l.contains("refused")),
        "no write failed on a refused connection"
    );
    let answers = hook.with_seen(answers);
    for status in ["500", "503", "429"] {
        assert!(answers.get(status).is_some_and(|&k| k > 0), "{answers:?}");
    }
    assert!(
        while_flaky > 0,
        "nothing got through while the webhook was flaky"
    );
}

/// Messages of one topic reach the webhook in arrival order with 4 lanes and retries of
/// every kind: 8 streams of numbered messages, the receiver failing ~30% of requests
/// (500s, resets, and 2xx answers slower than the sink's timeout, which the sink must
/// resend). Per stream, the seqs the receiver accepted, in the order it accepted them,
/// must be 0, 1, 2, … with nothing skipped; a seq may repeat (a resent request) but never
/// come back after a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_keeps_each_topic_in_order_through_retries_on_4_lanes() {
    const STREAMS: i64 = 8;
    let per_stream: i64 = short_or_long(500, 5_000);
    let n = STREAMS * per_stream;
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = HookServer::start().await;
    hook.fail_at_random(&[
        (Fault::Error500, 0.25),
        (Fault::Reset, 0.04),
        (Fault::Slow, 0.003),
    ]);
    let sink = format!(
        r#"  hook:
    type: webhook
    url: {}/ingest
    timeout: 500ms
    concurrency: 4
    batch: {{ max_rows: 16, max_wait: 5ms }}
    retry: {{ initial_delay: 2ms, max_delay: 20ms }}"#,
        hook.url()
    );
    let bridge =
        ChildBridge::start_subscribed(&bridge_config(dir.path(), broker.port, "faults-2", &sink))
            .await;

    // Publisher p sends streams 2p and 2p+1, interleaved, each in increasing seq order.
    let stream = |i: i64| i / (n / 4) * 2 + i % 2;
    let started = Instant::now();
    publish_numbered(broker.port, "order-pub", 4, n, Duration::ZERO, |_, i| {
        format!("faults/t{}", stream(i))
    })
    .await;
    all_accepted(&hook, n, short_or_long(120, 900) * Duration::from_secs(1)).await;
    stop_for_the_tally(bridge).await;

    let accepted = hook.with_seen(accepted);
    let tally = Tally::of_seqs(n, accepted.iter().map(|(_, s)| *s));
    println!("{tally}");
    println!(
        "8 streams on 4 lanes: answers {:?}, all accepted after {:?}",
        hook.with_seen(answers),
        started.elapsed()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    let mut per_stream_seqs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (s, seq) in accepted {
        assert_eq!(
            s,
            format!("t{}", stream(seq)),
            "seq {seq} on the wrong stream"
        );
        per_stream_seqs.entry(s).or_default().push(seq);
    }
    assert_eq!(per_stream_seqs.len() as i64, STREAMS);
    for (s, seqs) in &per_stream_seqs {
        if let Some(w) = seqs.windows(2).find(|w| w[1] < w[0]) {
            panic!("{s}: {} accepted after {}", w[1], w[0]);
        }
        let mut distinct = seqs.clone();
        distinct.dedup();
        let want: Vec<i64> = (0..n)
            .filter(|&i| format!("t{}", stream(i)) == *s)
            .collect();
        assert_eq!(distinct, want, "{s}: a seq is missing");
    }
    // Retries of each kind happened, and only slow answers were resent after a 2xx.
    let answers = hook.with_seen(answers);
    assert!(answers.get("500").is_some_and(|&k| k > 0), "{answers:?}");
    assert!(answers.get("reset").is_some_and(|&k| k > 0), "{answers:?}");
    let slow =
        hook.with_seen(|seen| seen.iter().filter(|s| s.fault == Some(Fault::Slow)).count() as i64);
    assert!(tally.duplicates <= slow, "{tally}, {slow} slow answers");
    assert!(json_lines(&dir.path().join("dead.jsonl")).is_empty());
}

/// Issue 10's flaky endpoint, a normal day for a SaaS webhook: every third request is
/// answered 500 and every seventh 429 with `Retry-After: 1`, while 10 devices send 100
/// QoS 1 messages each, to the webhook and to PostgreSQL, with
/// `retry: { max_attempts: 30, initial_delay: 20ms, max_delay: 500ms }`. Each record has
/// its own budget of 30 attempts, and no record fails 30 times in a row here, so the
/// webhook must get all 1,000 records and nothing may be dead-lettered. (When the attempt
/// count belonged to a whole batch, 538 of 1,000 were dead-lettered.)
async fn a_flaky_endpoint_gets_every_record(batch_body: bool) {
    const DEVICES: i64 = 10;
    const N: i64 = 1_000;
    let broker = Mosquitto::start().await;
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE flaky (stream text NOT NULL, seq bigint NOT NULL)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let hook = HookServer::start().await;
    hook.fail_every(&[(7, Fault::TooMany), (3, Fault::Error500)]);
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: flaky-{batch_body}, protocol: 5 }}
spool: {{ path: {spool} }}
sinks:
  hook:
    type: webhook
    url: {url}/ingest
    batch_body: {batch_body}
    batch: {{ max_rows: {max_rows} }}
    retry: {{ max_attempts: 30, initial_delay: 20ms, max_delay: 500ms }}
  pg: {{ type: postgres, url: "{db}", table: flaky }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: flaky
    from: ["faults/{{stream}}"]
    transform: '{{stream: .vars.stream, seq: .payload.seq}}'
    to: [hook, pg]
dead_letter: {{ sink: dlq }}
"#,
            port = broker.port,
            url = hook.url(),
            spool = dir.path().join("spool").display(),
            dlq = dir.path().join("dead.jsonl").display(),
            // Batch bodies: at least 20 requests, so that both faults come up however
            // the records happen to be grouped (a busy machine makes bigger batches).
            max_rows = if batch_body { 50 } else { 1000 },
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start_subscribed(&config).await;

    let started = Instant::now();
    publish_numbered(
        broker.port,
        "flaky-pub",
        DEVICES,
        N,
        Duration::ZERO,
        |p, _| format!("faults/d{p}"),
    )
    .await;
    all_accepted(&hook, N, Duration::from_secs(120)).await;
    let took = started.elapsed();
    eventually(
        Duration::from_secs(30),
        "every row in PostgreSQL",
        async || {
            (pg_count(&db, "SELECT count(DISTINCT seq)::text FROM flaky").await == Some(N))
                .then_some(())
        },
    )
    .await;
    let (status, _) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");

    let tally =
        hook.with_seen(|seen| Tally::of_seqs(N, accepted(seen).into_iter().map(|(_, s)| s)));
    println!("{tally}");
    println!(
        "flaky endpoint (batch_body: {batch_body}): answers {:?}, every record accepted after {took:?}",
        hook.with_seen(answers)
    );
    assert_eq!(tally.lost, 0, "{tally}");
    let answers = hook.with_seen(answers);
    for status in ["500", "429"] {
        assert!(answers.get(status).is_some_and(|&k| k > 0), "{answers:?}");
    }
    let dead = json_lines(&dir.path().join("dead.jsonl"));
    assert!(
        dead.is_empty(),
        "{} dead-lettered, e.g. {}",
        dead.len(),
        dead[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_endpoint_gets_every_record_one_request_each() {
    a_flaky_endpoint_gets_every_record(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_endpoint_gets_every_record_in_batch_bodies() {
    a_flaky_endpoint_gets_every_record(true).await;
}

/// A broker that floods the connection past the window (no limit on messages in flight,
/// as Mosquitto 2.0 does towards a resumed session) while the webhook sink is held to
/// 1,000 records a second, so 8,000 messages arrive much faster than the pipeline takes
/// them. Without a spool. Returns the tally of what the webhook accepted, and the
/// bridge's log.
///
/// keep_alive is 1 s. A source that stops reading its connection while the pipeline is
/// full (as it did) leaves the broker's PINGRESP behind thousands of PUBLISHes that it
/// can only read as the sink drains; rumqttc gives up after two keep-alive periods
/// ("Last pingreq isn't acked"), reconnects, and the broker sends every unacknowledged
/// message again.
async fn a_flooding_broker(name: &str, max_buffered: &str) -> (Tally, Vec<String>) {
    const N: i64 = 8_000;
    let broker = Mosquitto::start_flooding().await;
    let dir = tempfile::tempdir().unwrap();
    let hook = HookServer::start().await;
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: {name}, keep_alive: 1s, max_buffered: {max_buffered} }}
sinks:
  hook:
    type: webhook
    url: {url}/ingest
    queue: 10
    batch_body: true
    batch: {{ max_rows: 100 }}
    rate_limit: {{ per_second: 1000 }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: flood
    from: ["flood/{{stream}}"]
    transform: '{{stream: .vars.stream, seq: .payload.seq}}'
    to: [hook]
dead_letter: {{ sink: dlq }}
"#,
            port = broker.port,
            url = hook.url(),
            dlq = dir.path().join("dead.jsonl").display(),
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start_subscribed(&config).await;
    publish_numbered(
        broker.port,
        &format!("{name}-pub"),
        4,
        N,
        Duration::ZERO,
        |p, _| format!("flood/d{p}"),
    )
    .await;
    all_accepted(&hook, N, Duration::from_secs(120)).await;
    let log = std::sync::Arc::clone(&bridge.log);
    stop_for_the_tally(bridge).await;
    let tally =
        hook.with_seen(|seen| Tally::of_seqs(N, accepted(seen).into_iter().map(|(_, s)| s)));
    println!("flooding broker, max_buffered {max_buffered}: {tally}");
    assert!(json_lines(&dir.path().join("dead.jsonl")).is_empty());
    let log = log.lock().unwrap().clone();
    (tally, log)
}

/// The flood fits in `max_buffered`: the source keeps reading its connection while the
/// pipeline is full, so it keeps it (before, it stopped reading, lost the connection to
/// the keep-alive and got every unacknowledged message again), and every record arrives
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_broker_keeps_its_connection_while_the_pipeline_is_full() {
    let (tally, log) = a_flooding_broker("flood-held", "32MiB").await;
    let lost: Vec<_> = log
        .iter()
        .filter(|l| l.contains("broker connection failed") || l.contains("reconnecting"))
        .collect();
    assert!(lost.is_empty(), "the connection was lost: {lost:?}");
    assert_eq!((tally.lost, tally.duplicates), (0, 0), "{tally}");
}

/// The flood does not fit in `max_buffered`: mqbridge reconnects rather than hold more
/// (or stall the connection), and the broker sends the unacknowledged messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_max_buffered_reconnects_and_loses_nothing() {
    let (tally, log) = a_flooding_broker("flood-over", "16KiB").await;
    assert!(
        log.iter().any(|l| l.contains("sent past the window")),
        "no reconnect for the flood"
    );
    assert_eq!(tally.lost, 0, "{tally}");
}
