//! Into PostgreSQL, each scenario beside its ceiling in the same run. The tool starts a
//! throwaway PostgreSQL itself (`scripts/postgres.sh`: a temp directory, a free loopback
//! port, `fsync=off` as for the tests) unless given `--postgres URL`, and a fresh mqbridge
//! for every measurement: the embedded broker (or a client of Mosquitto), a rule, and a
//! `postgres` sink into
//!
//! ```sql
//! load_readings (device text, seq bigint, temp float8, body jsonb, sent_us bigint,
//!           stored_at timestamptz DEFAULT clock_timestamp())
//! ```
//!
//! with the durable spool on or off (`--spool on,off`), `batch: { max_rows: 1000, max_wait:
//! 5ms }` (`--max-rows`, `--max-wait-ms`) and one lane (`--concurrency N` for more, each
//! with a batch in flight). The publishers are the fan-in
//! tool's (raw MQTT, TCP_NODELAY, QoS 1 with a window), sending JSON payloads that carry
//! their send time, so the database's own clock (`stored_at`, taken as each row is
//! inserted) gives each message's latency, and `(device, seq)` gives what was lost or
//! duplicated.
//!
//! - **throughput** (`pg`): `--messages` as fast as the broker takes them; rows/s from the
//!   first publish to the last row inserted. Beside it, `COPY … FROM STDIN` of the same
//!   rows into the same table (one COPY, on one connection; the rows' text made before
//!   the clock starts): what the server takes at most. With `--via mosquitto` the
//!   publishers send to a Mosquitto the tool starts and mqbridge is its client; then
//!   Mosquitto's own fan-in of the same publishers to one plain subscriber is measured
//!   beside it too.
//! - **latency** (`pg-latency`): at fixed rates (`--rates 1000,10000` msg/s in all, from
//!   `--publishers`), for `--seconds`; p50/p99/max of publish → row inserted over the
//!   messages sent after the first second, and the same per 100 ms of send time into a
//!   CSV (`--csv DIR`), to see when the tail happens.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use sqlx::{Connection, PgConnection};

use crate::brokers::{Broker, Kind, Programs, free_port};
use crate::fanin::{self, Payload, Publishers, Scenario};
use crate::flags::Flags;
use crate::mqtt::{self, Client};

const TABLE: &str = "CREATE TABLE load_readings (device text, seq bigint, temp double precision, \
    body jsonb, sent_us bigint, stored_at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// A throwaway PostgreSQL; stopped on drop.
struct Server {
    data: PathBuf,
    _dir: tempfile::TempDir,
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");

impl Server {
    fn start() -> anyhow::Result<(Server, String)> {
        let dir = tempfile::Builder::new()
            .prefix("mqbridge-bench-")
            .tempdir()?;
        let data = dir.path().join("pg");
        let port = free_port()?;
        let status = Command::new("bash")
            .arg(SCRIPT)
            .args([
                "start".as_ref(),
                data.as_os_str(),
                port.to_string().as_ref(),
            ])
            .status()
            .context("running scripts/postgres.sh")?;
        ensure!(status.success(), "scripts/postgres.sh start failed");
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Ok((Server { data, _dir: dir }, url))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .args(["stop".as_ref(), self.data.as_os_str(), "immediate".as_ref()])
            .status();
    }
}

struct Args {
    runs: usize,
    messages: u64,
    publishers: u32,
    payload_bytes: usize,
    window: u32,
    spool: Vec<bool>,
    max_rows: usize,
    max_wait_ms: u64,
    /// The sink's `concurrency` (lanes, each with a batch in flight).
    concurrency: usize,
    rates: Vec<f64>,
    seconds: u64,
    postgres: Option<String>,
    programs: Programs,
    csv: Option<PathBuf>,
    /// Publish through Mosquitto, mqbridge its client (else mqbridge is the broker).
    external: bool,
}

fn parse(mut flags: Flags) -> Args {
    let mut a = Args {
        runs: 3,
        messages: 200_000,
        publishers: 64,
        payload_bytes: 100,
        window: 100,
        spool: vec![true],
        max_rows: 1000,
        max_wait_ms: 5,
        concurrency: 1,
        rates: vec![1000.0, 10_000.0],
        seconds: 20,
        postgres: None,
        programs: Programs::default(),
        csv: None,
        external: false,
    };
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--runs" => a.runs = flags.value(&flag),
            "--messages" => a.messages = flags.value(&flag),
            "--publishers" => a.publishers = flags.value(&flag),
            "--payload-bytes" => a.payload_bytes = flags.value(&flag),
            "--window" => a.window = flags.value(&flag),
            "--spool" => {
                a.spool = flags
                    .list::<String>(&flag)
                    .iter()
                    .map(|s| s == "on")
                    .collect()
            }
            "--max-rows" => a.max_rows = flags.value(&flag),
            "--max-wait-ms" => a.max_wait_ms = flags.value(&flag),
            "--concurrency" => a.concurrency = flags.value(&flag),
            "--rates" => a.rates = flags.list(&flag),
            "--seconds" => a.seconds = flags.value(&flag),
            "--postgres" => a.postgres = Some(flags.value(&flag)),
            "--mqbridge" => a.programs.mqbridge = flags.value::<String>(&flag).into(),
            "--csv" => a.csv = Some(flags.value::<String>(&flag).into()),
            "--via" => a.external = flags.value::<Kind>(&flag) == Kind::Mosquitto,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// What one run into the table came to.
struct Stored {
    sent: u64,
    lost: u64,
    duplicated: u64,
    /// Rows per second, first publish to last row inserted.
    rows_per_s: f64,
}

impl Args {
    /// mqbridge's config after the embedded broker's block.
    fn bridge_config(&self, url: &str, spool: bool, dir: &std::path::Path) -> String {
        let mut c = String::new();
        if spool {
            let _ = writeln!(
                c,
                "spool: {{ path: {}, max_bytes: 8GiB }}",
                dir.join("spool").display()
            );
        }
        let _ = write!(
            c,
            "sinks:\n  pg:\n    type: postgres\n    url: {url}\n    table: load_readings\n    \
             batch: {{ max_rows: {}, max_wait: {}ms }}\n    concurrency: {}\n\
             rules:\n  - name: readings\n    from: [\"fanin/{{device}}\"]\n    \
             transform: '{{device: .vars.device, seq: .payload.seq, temp: .payload.temp, \
             sent_us: .payload.sent_us, body: .payload}}'\n    to: [pg]\n",
            self.max_rows, self.max_wait_ms, self.concurrency
        );
        c
    }

    fn scenario(&self, messages_per_publisher: u64, rate: Option<f64>) -> Scenario {
        Scenario {
            qos: 1,
            publishers: self.publishers,
            messages_per_publisher,
            payload_bytes: self.payload_bytes,
            window: self.window,
            stall: Duration::from_secs(120),
            payload: Payload::Json,
            rate,
        }
    }
}

fn now_us() -> anyhow::Result<i64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64)
}

/// Publishes `s` through a fresh mqbridge into the emptied table and waits until every
/// row is in (or none came for a minute); returns the count and the send epoch (µs).
async fn publish_and_store(
    a: &Args,
    db: &mut PgConnection,
    url: &str,
    spool: bool,
    s: &Scenario,
) -> anyhow::Result<(Stored, i64)> {
    sqlx::raw_sql("TRUNCATE load_readings")
        .execute(&mut *db)
        .await?;
    // Publishers connect to `to`: mqbridge, or the Mosquitto it reads from.
    let (bridge, to, _mosquitto) = if a.external {
        let mosquitto = Broker::start(Kind::Mosquitto, &a.programs).await?;
        let bridge = Broker::client_of(&a.programs, mosquitto.addr, |dir| {
            a.bridge_config(url, spool, dir)
        })
        .await?;
        subscribed(db, mosquitto.addr).await?;
        (bridge, mosquitto.addr, Some(mosquitto))
    } else {
        let bridge = Broker::bridge(&a.programs, |dir| a.bridge_config(url, spool, dir)).await?;
        let addr = bridge.addr;
        (bridge, addr, None)
    };
    let before = inserted(db).await?;
    let start_us = now_us()?;
    let publishers = Publishers::start(to, s, Instant::now()).await?;
    publishers.finish(s.stall).await?;
    let sent = s.messages_per_publisher * s.publishers as u64;
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let n = inserted(db).await? - before;
        // The statistics count aborted inserts too: the rows themselves have the last word.
        if n as u64 >= sent {
            let rows: i64 =
                sqlx::query_scalar("SELECT count(*) FROM load_readings WHERE device <> 'probe'")
                    .fetch_one(&mut *db)
                    .await?;
            if rows as u64 >= sent {
                break;
            }
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > Duration::from_secs(60) {
            eprintln!("no row for 60 s; mqbridge's log:\n{}", bridge.log());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(bridge);
    let (rows, distinct, end_us): (i64, i64, f64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (device, seq)), \
         coalesce(extract(epoch FROM max(stored_at))::float8 * 1e6, 0) FROM load_readings \
         WHERE device <> 'probe'",
    )
    .fetch_one(&mut *db)
    .await?;
    let stored = Stored {
        sent,
        lost: sent - distinct as u64,
        duplicated: (rows - distinct) as u64,
        rows_per_s: distinct as f64 / ((end_us - start_us as f64) / 1e6),
    };
    Ok((stored, start_us))
}

/// Rows inserted into `load_readings` so far, as PostgreSQL's statistics count them
/// (up to a second or so late, aborted inserts included). Asking costs nothing, where a
/// `count(*)` every 50 ms scans the growing table (with parallel workers): it took a
/// good part of a core from the very run it was waiting for.
async fn inserted(db: &mut PgConnection) -> anyhow::Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'load_readings'",
    )
    .fetch_optional(&mut *db)
    .await?;
    Ok(n.unwrap_or(0))
}

/// Waits until mqbridge, a client of the broker at `broker`, has subscribed: publishes a
/// probe (`fanin/probe`, QoS 0: lost while nobody subscribes) every 100 ms until its row
/// is in the table. Probe rows are left out of every count.
async fn subscribed(db: &mut PgConnection, broker: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut c = Client::connect(broker, &format!("load-probe-{}", std::process::id()), 0).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut out = bytes::BytesMut::new();
        mqtt::put_publish(&mut out, "fanin/probe", 0, 0, 64, |p| {
            let json = br#"{"seq":0,"sent_us":0,"temp":0}"#;
            p[..json.len()].copy_from_slice(json);
            p[json.len()..].fill(b' ');
        });
        tokio::io::AsyncWriteExt::write_all(&mut c.socket, &out).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM load_readings WHERE device = 'probe'")
                .fetch_one(&mut *db)
                .await?;
        if n > 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "mqbridge did not subscribe in 30 s"
        );
    }
}

/// The ceiling: the same rows by one `COPY … FROM STDIN`; rows per second.
async fn copy(db: &mut PgConnection, s: &Scenario) -> anyhow::Result<f64> {
    sqlx::raw_sql("TRUNCATE load_readings")
        .execute(&mut *db)
        .await?;
    let sent_us = now_us()?;
    let mut text = String::new();
    for p in 0..s.publishers {
        for seq in 0..s.messages_per_publisher {
            let temp = (seq % 400) as f64 / 10.0;
            let _ = writeln!(
                text,
                "{p}\t{seq}\t{temp}\t{{\"seq\":{seq},\"sent_us\":{sent_us},\"temp\":{temp}}}\t{sent_us}"
            );
        }
    }
    let started = Instant::now();
    let mut copy = db
        .copy_in_raw("COPY load_readings (device, seq, temp, body, sent_us) FROM STDIN")
        .await?;
    copy.send(text.as_bytes()).await?;
    let rows = copy.finish().await?;
    let took = started.elapsed();
    ensure!(
        rows == s.messages_per_publisher * s.publishers as u64,
        "COPY wrote {rows} rows"
    );
    Ok(rows as f64 / took.as_secs_f64())
}

async fn prepare(a: &Args) -> anyhow::Result<(Option<Server>, String, PgConnection)> {
    let (server, url) = match &a.postgres {
        Some(url) => (None, url.clone()),
        None => {
            let (server, url) = Server::start()?;
            (Some(server), url)
        }
    };
    let mut db = PgConnection::connect(&url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS load_readings; {TABLE}"
    )))
    .execute(&mut db)
    .await?;
    Ok((server, url, db))
}

fn spool_name(on: bool) -> &'static str {
    if on { "spool" } else { "no spool" }
}

/// `pg`: mqbridge into PostgreSQL beside COPY, interleaved, `runs` times.
pub async fn throughput(flags: Flags) -> anyhow::Result<()> {
    let a = parse(flags);
    let (_server, url, mut db) = prepare(&a).await?;
    let s = a.scenario(a.messages / a.publishers as u64, None);
    let mut results: Vec<(String, Vec<f64>)> = a
        .spool
        .iter()
        .map(|&on| (format!("mqbridge, {}", spool_name(on)), Vec::new()))
        .collect();
    results.push(("COPY".into(), Vec::new()));
    if a.external {
        results.push(("Mosquitto fan-in to one subscriber".into(), Vec::new()));
    }
    for run in 1..=a.runs {
        for (i, &on) in a.spool.iter().enumerate() {
            let (st, _) = publish_and_store(&a, &mut db, &url, on, &s).await?;
            println!(
                "run {run}: mqbridge ({}): {:>9.0} rows/s, {} sent, lost {}, duplicated {}",
                spool_name(on),
                st.rows_per_s,
                st.sent,
                st.lost,
                st.duplicated
            );
            results[i].1.push(st.rows_per_s);
        }
        let c = copy(&mut db, &s).await?;
        println!("run {run}: COPY:               {c:>9.0} rows/s");
        results[a.spool.len()].1.push(c);
        if a.external {
            // The same publishers, Mosquitto alone, a plain QoS 1 subscriber.
            let mosquitto = Broker::start(Kind::Mosquitto, &a.programs).await?;
            let plain = Scenario {
                payload: Payload::Stamp,
                ..s.clone()
            };
            let f = fanin::run(mosquitto.addr, &plain).await?;
            println!(
                "run {run}: Mosquitto fan-in:   {:>9.0} msg/s, lost {}, duplicated {}",
                f.delivered_per_s, f.lost, f.duplicated
            );
            results[a.spool.len() + 1].1.push(f.delivered_per_s);
        }
    }
    let ceilings: Vec<(&str, f64)> = results[a.spool.len()..]
        .iter()
        .map(|(name, v)| (name.as_str(), median(v)))
        .collect();
    let header: String = ceilings.iter().map(|(n, _)| format!(" × {n} |")).collect();
    println!("\n| what | rows/s, median [min–max] |{header}");
    println!("|---|---|{}", "---|".repeat(ceilings.len()));
    for (name, v) in &results {
        let (lo, hi) = min_max(v);
        let ratios: String = ceilings
            .iter()
            .map(|(_, c)| format!(" {:.2} |", median(v) / c))
            .collect();
        println!("| {name} | {:.0} [{lo:.0}–{hi:.0}] |{ratios}", median(v));
    }
    Ok(())
}

/// `pg-latency`: publish → row inserted at fixed rates.
pub async fn latency(flags: Flags) -> anyhow::Result<()> {
    let a = parse(flags);
    let (_server, url, mut db) = prepare(&a).await?;
    let mut summary = String::from("rate,spool,run,p50_ms,p99_ms,max_ms\n");
    for run in 1..=a.runs {
        for &rate in &a.rates {
            for &on in &a.spool {
                let per_publisher = rate / a.publishers as f64;
                let n = (per_publisher * a.seconds as f64).ceil() as u64;
                let s = a.scenario(n, Some(per_publisher));
                let (st, start_us) = publish_and_store(&a, &mut db, &url, on, &s).await?;
                // Latency in ms of each row sent after the first second.
                let from = "(SELECT (extract(epoch FROM stored_at)::float8 * 1e6 - sent_us) / 1000.0 \
                            AS ms, sent_us FROM load_readings WHERE sent_us >= $1) t";
                let (p50, p99, max): (f64, f64, f64) =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM {from}"
                    )))
                    .bind(start_us + 1_000_000)
                    .fetch_one(&mut db)
                    .await?;
                println!(
                    "run {run}: {rate:>6.0} msg/s ({}): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; \
                     {} sent, lost {}, duplicated {}",
                    spool_name(on),
                    st.sent,
                    st.lost,
                    st.duplicated
                );
                let _ = writeln!(summary, "{rate},{on},{run},{p50:.2},{p99:.2},{max:.2}");
                if let Some(dir) = &a.csv {
                    let rows: Vec<(f64, f64, f64, f64)> =
                        sqlx::query_as(sqlx::AssertSqlSafe(format!(
                            "SELECT floor((sent_us - $1) / 100000.0)::float8 / 10.0 AS s, \
                         percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), \
                         percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) \
                         FROM {from} GROUP BY 1 ORDER BY 1"
                        )))
                        .bind(start_us)
                        .fetch_all(&mut db)
                        .await?;
                    let mut csv = String::from("second,p50_ms,p99_ms,max_ms\n");
                    for (t, p50, p99, max) in rows {
                        let _ = writeln!(csv, "{t},{p50:.2},{p99:.2},{max:.2}");
                    }
                    let name = format!(
                        "latency-timeline-{rate}-{}-run{run}.csv",
                        spool_name(on).replace(' ', "-")
                    );
                    std::fs::create_dir_all(dir)?;
                    std::fs::write(dir.join(name), csv)?;
                }
            }
        }
    }
    if let Some(dir) = &a.csv {
        std::fs::write(dir.join("latency.csv"), &summary)?;
    }
    print!("\n{summary}");
    Ok(())
}

/// The test command's pass: 400 messages through mqbridge with the spool into `url`'s
/// database, failing on any row lost or duplicated; nothing about time.
pub async fn smoke(url: &str) -> anyhow::Result<()> {
    let flags = ["--postgres", url, "--publishers", "4", "--messages", "400"];
    let a = parse(Flags::new(flags.iter().map(|f| f.to_string()).collect()));
    let (_server, url, mut db) = prepare(&a).await?;
    let (st, _) = publish_and_store(&a, &mut db, &url, true, &a.scenario(100, None)).await?;
    println!(
        "load smoke: into PostgreSQL with the spool: {} sent, lost {}, duplicated {}",
        st.sent, st.lost, st.duplicated
    );
    ensure!(
        st.lost == 0 && st.duplicated == 0,
        "{} lost, {} duplicated",
        st.lost,
        st.duplicated
    );
    sqlx::raw_sql("DROP TABLE load_readings")
        .execute(&mut db)
        .await?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}
