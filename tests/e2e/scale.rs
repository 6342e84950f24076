//! Scale-out and poison input: several instances sharing one subscription, one of them
//! killed mid-stream; and malformed payloads mixed into good traffic.

use std::time::{Duration, Instant};

use crate::util::*;

/// Three instances in one share group split the stream; one is killed with SIGKILL
/// mid-stream and restarted (as a supervisor would), and every message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_load_and_a_killed_one_loses_nothing() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE readings (seq int PRIMARY KEY, instance text)",
    )
    .await;
    let cfg = |i: usize| {
        let path = dir.path().join(format!("bridge{i}.yaml"));
        std::fs::write(
            &path,
            format!(
                r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: shared-{i}, share_group: ingest, protocol: 5, receive_maximum: 50 }}
sinks:
  pg: {{ type: postgres, url: "{db}", table: readings, on_conflict: {{ key: [seq], action: ignore }} }}
rules:
  - {{ name: r, from: "sensors/+/telemetry", transform: '{{seq: .payload.seq, instance: "{i}"}}', to: pg }}
"#,
                port = broker.port
            ),
        )
        .unwrap();
        path
    };
    let mut bridges: Vec<ChildBridge> = (0..3).map(|i| ChildBridge::start(&cfg(i))).collect();
    for b in &bridges {
        b.wait_for_log("subscribed", Duration::from_secs(20)).await;
    }
    let publisher = TestClient::connect(broker.port, "scale-publisher").await;
    let chunk = |from: i64, to: i64| {
        (from..to).map(|i| {
            (
                format!("sensors/d{}/telemetry", i % 10),
                format!(r#"{{"seq": {i}}}"#),
            )
        })
    };
    const N: i64 = 6000;
    publisher.publish_all(chunk(0, 2000)).await;
    // Kill instance 1 while messages are in its hands.
    bridges.remove(1).kill9();
    publisher.publish_all(chunk(2000, 4000)).await;
    // Its supervisor restarts it; the broker hands its session's messages back to it.
    bridges.push(ChildBridge::start(&cfg(1)));
    publisher.publish_all(chunk(4000, N)).await;

    eventually(
        Duration::from_secs(60),
        "every message stored",
        async || (pg_count(&db, "SELECT count(*)::text FROM readings").await? >= N).then_some(()),
    )
    .await;
    assert_eq!(
        pg_count(&db, "SELECT count(DISTINCT seq)::text FROM readings").await,
        Some(N),
        "lost"
    );
    let per_instance = pg_texts(
        &db,
        "SELECT instance || '=' || count(*) FROM readings GROUP BY instance ORDER BY 1",
    )
    .await;
    assert_eq!(
        per_instance.len(),
        3,
        "the load should be split over all three: {per_instance:?}"
    );
}

/// 1,000 malformed payloads in good traffic: each bad one is dead-lettered with its
/// reason, every good one stored, and the same bridge keeps running throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_payloads_are_dead_lettered_and_never_stall_the_stream() {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    sqlite_create(
        &db,
        "CREATE TABLE readings (seq INTEGER PRIMARY KEY, temp REAL)",
    )
    .await;
    let dlq = dir.path().join("dead.jsonl");
    let cfg = format!(
        r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: poison, max_packet_size: 4MiB }}
sinks:
  db: {{ type: sqlite, path: {db} , table: readings }}
  dead: {{ type: file, path: {dlq} }}
rules:
  - name: r
    from: "sensors/+/telemetry"
    transform: '{{seq: .payload.seq, temp: (.payload.temp | if type == "number" then . else error("temp is not a number") end)}}'
    to: db
dead_letter: {{ sink: dead }}
"#,
        port = broker.port,
        db = db.display(),
        dlq = dlq.display()
    );
    let bridge = InProcess::start(&cfg);
    let publisher = TestClient::connect(broker.port, "poison-publisher").await;
    probe_until(
        &publisher,
        "sensors/p/telemetry",
        r#"{"seq": -1, "temp": 1}"#,
        async || sqlite_count(&db, "readings").await > 0,
    )
    .await;

    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!(r#"{{"seq": 1, "temp": "{}"}}"#, "x".repeat(1 << 20));
    let poison: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        br#"{"seq": 1, "temp": "hot"}"#.to_vec(),
        br#"{"seq": 1, "temp": 1e400}"#.to_vec(),
        deep.into_bytes(),
        huge.into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x80],
        b"".to_vec(),
        br#"[1, 2, 3]"#.to_vec(),
    ];
    let mut good = 0;
    let mut bad = 0;
    let mut msgs = Vec::new();
    for i in 0..3000 {
        if i % 3 == 0 && bad < 1000 {
            let p = &poison[bad % poison.len()];
            msgs.push(("sensors/x/telemetry".to_string(), p.clone()));
            bad += 1;
        } else {
            msgs.push((
                "sensors/x/telemetry".to_string(),
                format!(r#"{{"seq": {good}, "temp": 21.5}}"#).into_bytes(),
            ));
            good += 1;
        }
    }
    for (topic, payload) in msgs {
        publisher
            .client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // Only the stream's letters: a repeated probe (seq -1 again) may be refused too.
    let stream_letters = || -> Vec<_> {
        json_lines(&dlq)
            .into_iter()
            .filter(|l| l["topic"] == "sensors/x/telemetry")
            .collect()
    };
    eventually(
        Duration::from_secs(90),
        "every good row and every dead letter",
        async || {
            let rows = sqlite_count(&db, "readings").await - 1;
            (rows >= good as i64 && stream_letters().len() >= bad).then_some(())
        },
    )
    .await;
    // Stopped, the bridge writes nothing more: the counts are final.
    bridge.stop().await.unwrap();
    let letters = stream_letters();
    assert_eq!(sqlite_count(&db, "readings").await - 1, good as i64);
    assert_eq!(letters.len(), bad);
    assert!(
        letters
            .iter()
            .all(|l| !l["error"].as_str().unwrap().is_empty())
    );
    let reasons: std::collections::BTreeSet<String> = letters
        .iter()
        .map(|l| {
            l["error"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        reasons.contains("decode") && reasons.contains("transform"),
        "{reasons:?}"
    );
}

/// mqbridge (a child process) storing `soak/#` messages in a PostgreSQL of the test's own,
/// which the test stops and starts: the setting of the sink-outage scenarios. The table has
/// no key, so duplicates show.
struct PgOutage {
    broker: Mosquitto,
    pg: Postgres,
    db: String,
    bridge: ChildBridge,
    publisher: TestClient,
    _dir: tempfile::TempDir,
}

impl PgOutage {
    /// `sink` adds settings to the postgres sink (entries of a YAML flow mapping);
    /// `max_queued`: what the broker holds for mqbridge while the database is down.
    async fn start(client_id: &str, max_queued: usize, sink: &str) -> PgOutage {
        let broker = Mosquitto::start_queueing(max_queued).await;
        let dir = tempfile::tempdir().unwrap();
        let pg = Postgres::start();
        let db = pg_fresh_database(&pg.url()).await;
        pg_exec(&db, "CREATE TABLE readings (seq int, pad text)").await;
        let path = dir.path().join("bridge.yaml");
        std::fs::write(
            &path,
            format!(
                r#"
broker: {{ url: "mqtt://127.0.0.1:{port}", client_id: {client_id}, protocol: 5, receive_maximum: 500 }}
sinks:
  pg: {{ type: postgres, url: "{db}", table: readings, queue: 2000, retry: {{ max_delay: 500ms }}, {sink} }}
rules:
  - {{ name: r, from: "soak/#", transform: '{{seq: .payload.seq, pad: .payload.pad}}', to: pg }}
"#,
                port = broker.port
            ),
        )
        .unwrap();
        let bridge = ChildBridge::start_subscribed(&path).await;
        let publisher = TestClient::connect(broker.port, &format!("{client_id}-publisher")).await;
        PgOutage {
            broker,
            pg,
            db,
            bridge,
            publisher,
            _dir: dir,
        }
    }

    /// Starts the database again and waits until the seqs 0..n are all stored; returns
    /// the row count sampled along the way, with the time since the database was back.
    async fn recover(&self, n: i64, timeout: Duration) -> Vec<Sample> {
        self.pg.start_again();
        let back = Instant::now();
        let mut samples = Vec::new();
        eventually(timeout, "the backlog stored", async || {
            let before = back.elapsed();
            let rows = pg_count(&self.db, "SELECT count(*)::text FROM readings").await?;
            samples.push(Sample {
                before,
                after: back.elapsed(),
                rows,
            });
            (rows >= n && self.tally(n).await.stored >= n).then_some(())
        })
        .await;
        samples
    }

    async fn tally(&self, n: i64) -> Tally {
        let count = async |sql: &str| pg_count(&self.db, sql).await.unwrap_or(0);
        Tally::new(
            n,
            count("SELECT count(DISTINCT seq)::text FROM readings").await,
            count("SELECT count(*)::text FROM readings").await,
        )
    }
}

/// A row count and when it was taken: somewhere between `before` and `after` (a count
/// takes a connection and a query, which on a busy machine take a while).
struct Sample {
    before: Duration,
    after: Duration,
    rows: i64,
}

/// Messages per second between the first sample with at least `from` rows and the last,
/// over the longest interval the two counts can span: never more than the true rate.
fn rate(samples: &[Sample], from: i64) -> f64 {
    let first = samples.iter().find(|s| s.rows >= from).unwrap();
    let last = samples.last().unwrap();
    (last.rows - first.rows) as f64 / (last.after - first.before).as_secs_f64()
}

/// A database outage under steady load: mqbridge's memory stays flat (its queues fill,
/// then it stops acknowledging and the broker holds the backlog), and once the database
/// is back everything is stored; prints how fast the backlog drained. Issue 5's soak:
/// 5 minutes with `MQBRIDGE_LONG_TESTS=1`, 30 s otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_while_the_sink_is_down() {
    // ~2,000 msg/s of 200-byte payloads while the database is down.
    let seconds: i64 = short_or_long(30, 300);
    const RATE: i64 = 2000;
    let n = seconds * RATE;
    let o = PgOutage::start("soak", 2 * n as usize, "").await;
    o.pg.stop("fast");

    let pad = "p".repeat(200);
    let mut samples = Vec::new();
    for s in 0..seconds {
        let tick = tokio::time::Instant::now();
        o.publisher
            .publish_all((s * RATE..(s + 1) * RATE).map(|i| {
                (
                    format!("soak/d{}", i % 8),
                    format!(r#"{{"seq": {i}, "pad": "{pad}"}}"#),
                )
            }))
            .await;
        samples.push(o.bridge.rss_kib());
        // Pacing: one second's worth of messages a second.
        tokio::time::sleep_until(tick + Duration::from_secs(1)).await;
    }
    // Once the queues are full (a few seconds in), memory must not keep growing with the
    // backlog, which by the end is `n` messages (~230 bytes each) held by the broker:
    // holding it would add ~0.45 MiB a second, 11 MiB over the 25 s after `settled`. The
    // allocator moves RSS in steps of 1.5-2 MiB, up or down, while the sink retries (seen
    // 10-13 s in: +4.4 MiB once in a 16 s run, which the 4 MiB bound this had failed on);
    // 6 MiB keeps clear of those steps and well below what the backlog would take.
    let settled = samples[5];
    let last = *samples.last().unwrap();
    println!(
        "RSS while the sink was down {seconds} s (KiB): first {} / after 5 s {settled} / last {last} / max {}; every {} s: {:?}",
        samples[0],
        samples.iter().max().unwrap(),
        short_or_long(1, 10),
        samples
            .iter()
            .step_by(short_or_long(1, 10))
            .collect::<Vec<_>>()
    );
    assert!(
        last <= settled + 6 * 1024,
        "RSS grew from {settled} KiB to {last} KiB while the sink was down: {samples:?}"
    );

    let drain = o
        .recover(n, short_or_long(120, 900) * Duration::from_secs(1))
        .await;
    let took = drain.last().unwrap().after;
    let tally = o.tally(n).await;
    println!("{tally}");
    println!(
        "drained {n} messages in {took:?} after the database came back: {:.0} msg/s",
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{tally}");
}

/// A sink's `rate_limit` holds after an outage too: the backlog drains at the limit, not
/// as fast as the database could take it. (The limit allows a burst of one second's worth,
/// saved up during the outage, so the rate is measured past the first 2 × limit rows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_caps_the_drain_after_an_outage() {
    const LIMIT: i64 = 1000;
    const N: i64 = 6000;
    let o = PgOutage::start(
        "drain",
        100_000,
        &format!("rate_limit: {{ per_second: {LIMIT} }}, batch: {{ max_rows: 100 }}"),
    )
    .await;
    o.pg.stop("fast");
    publish_numbered(o.broker.port, "drain-pub", 2, N, Duration::ZERO, |p, _| {
        format!("soak/d{p}")
    })
    .await;
    let drain = o.recover(N, Duration::from_secs(60)).await;
    let took = drain.last().unwrap().after;
    let sustained = rate(&drain, 2 * LIMIT);
    let tally = o.tally(N).await;
    println!("{tally}");
    println!(
        "rate_limit {LIMIT}/s: drained {N} messages in {took:?} ({:.0} msg/s), {sustained:.0} msg/s past the burst",
        N as f64 / took.as_secs_f64()
    );
    assert_eq!(tally.lost, 0, "{tally}");
    assert!(
        sustained <= LIMIT as f64 * 1.2,
        "drained at {sustained:.0} msg/s with a limit of {LIMIT}/s"
    );
}
