//! The durable spool's sustained rate with realistic telemetry messages, side by side
//! with the alternative considered for it: SQLite in WAL mode, in its own file. Both do
//! the same work per message: group commit (one fsync per group) before the message is
//! acknowledged upstream, handing messages back out in order, and discarding them once
//! settled. Each run pushes `MESSAGES` through and reports msg/s; the median of `RUNS`.
//!
//! ```text
//! cargo bench --bench spool            # temp dirs under /tmp (cargo test runs a small smoke pass)
//! cargo bench --bench spool -- DIR     # on the disk that holds DIR
//! ```

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use mqbridge::config::{Fsync, SpoolPlan};
use mqbridge::delivery::{Ack, Settled};
use mqbridge::message::Message;
use mqbridge::spool::Spool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 200_000;
const RUNS: usize = 5;
/// `fsync: always` is one fsync per message: fewer messages keep the run short.
const MESSAGES_ALWAYS: usize = 5_000;
/// Under `cargo test --all-targets` (no `--bench` argument) the bench only runs once at
/// this size, as a smoke test of the code, not a measurement.
const SMOKE: usize = 2_000;

struct Count(Arc<AtomicUsize>);
impl Settled for Count {
    fn settled(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A telemetry message like the ones in config/examples (about 130 bytes of JSON).
fn message(i: usize, acked: &Arc<AtomicUsize>) -> Message {
    let payload = format!(
        r#"{{"device":"d{:04}","seq":{i},"temp":{:.1},"humidity":{:.1},"battery":{},"ts":"2026-11-26T03:00:00.123Z"}}"#,
        i % 1000,
        15.0 + (i % 200) as f64 / 10.0,
        40.0 + (i % 300) as f64 / 10.0,
        i % 100
    );
    let mut m = Message::detached(format!("sensors/d{:04}/telemetry", i % 1000), payload, 1);
    m.ack = Ack::new(Count(Arc::clone(acked)));
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Feeds `n` messages in, takes them out and settles them; returns msg/s once every
/// message was acknowledged upstream and delivered.
async fn drive(n: usize, input: mpsc::Sender<Message>, mut output: mpsc::Receiver<Message>) -> f64 {
    let acked = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let producer = tokio::spawn({
        let acked = Arc::clone(&acked);
        async move {
            for i in 0..n {
                input.send(message(i, &acked)).await.unwrap();
            }
        }
    });
    for _ in 0..n {
        output.recv().await.expect("delivered").ack.settle();
    }
    producer.await.unwrap();
    while acked.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn segment_log(dir: &Path, fsync: Fsync, n: usize) -> f64 {
    let path = dir.join("segments");
    let _ = std::fs::remove_dir_all(&path);
    let plan = SpoolPlan {
        path,
        max_bytes: 1 << 30,
        fsync,
    };
    let (in_tx, in_rx) = mpsc::channel(4096);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let stop = CancellationToken::new();
    let mut running = Spool::open(&plan)
        .unwrap()
        .start(in_rx, out_tx, stop.clone())
        .unwrap();
    let rate = drive(n, in_tx, out_rx).await;
    stop.cancel();
    running.writer_done().await.unwrap();
    running.close().await.unwrap();
    rate
}

/// The same job on SQLite (WAL, synchronous=FULL so that a commit is durable): the writer
/// inserts each group in one transaction with multi-row INSERTs, the reader selects in
/// order, and settled rows are deleted every 10,000.
async fn sqlite_wal(dir: &Path, n: usize) -> f64 {
    let file = dir.join("spool.db");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", file.display()));
    }
    let opts = SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full);
    let mut w = opts.connect().await.unwrap();
    sqlx::raw_sql("CREATE TABLE spool (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL, received_at INTEGER NOT NULL)")
        .execute(&mut w)
        .await
        .unwrap();
    let mut r = opts.connect().await.unwrap();
    let (in_tx, mut in_rx) = mpsc::channel::<Message>(4096);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let (committed_tx, mut committed) = watch::channel(0i64);

    let writer = tokio::spawn(async move {
        let mut seq = 0i64;
        let mut group = Vec::new();
        while let Some(first) = in_rx.recv().await {
            group.push(first);
            while group.len() < 32_768
                && let Ok(m) = in_rx.try_recv()
            {
                group.push(m);
            }
            let mut tx = w.begin().await.unwrap();
            for chunk in group.chunks(500) {
                let mut sql =
                    String::from("INSERT INTO spool (seq, topic, payload, received_at) VALUES ");
                for i in 0..chunk.len() {
                    sql.push_str(if i == 0 { "(?,?,?,?)" } else { ",(?,?,?,?)" });
                }
                // Only placeholders are added: the values are bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for m in chunk {
                    seq += 1;
                    q = q
                        .bind(seq)
                        .bind(&*m.topic)
                        .bind(m.payload.as_ref())
                        .bind(m.received_at.as_microsecond());
                }
                q.execute(&mut *tx).await.unwrap();
            }
            tx.commit().await.unwrap();
            for m in group.drain(..) {
                m.ack.settle();
            }
            committed_tx.send_replace(seq);
        }
    });
    let reader = tokio::spawn(async move {
        let mut next = 1i64;
        let mut deleted_below = 1i64;
        loop {
            if committed.wait_for(|&c| c >= next).await.is_err() {
                return;
            }
            let rows = sqlx::query("SELECT seq, topic, payload, received_at FROM spool WHERE seq >= ? ORDER BY seq LIMIT 1000")
                .bind(next)
                .fetch_all(&mut r)
                .await
                .unwrap();
            for row in rows {
                next = row.get::<i64, _>(0) + 1;
                let m = Message::detached(row.get::<String, _>(1), row.get::<Vec<u8>, _>(2), 1);
                if out_tx.send(m).await.is_err() {
                    return;
                }
            }
            // Settled rows (the consumer settles as it receives) are deleted in bulk.
            if next - deleted_below >= 10_000 {
                sqlx::query("DELETE FROM spool WHERE seq < ?")
                    .bind(next)
                    .execute(&mut r)
                    .await
                    .unwrap();
                deleted_below = next;
            }
        }
    });
    let rate = drive(n, in_tx, out_rx).await;
    writer.await.unwrap();
    reader.await.unwrap();
    rate
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    // `cargo bench` passes `--bench`; `cargo test` does not (and may pass test filters).
    let measure = std::env::args().any(|a| a == "--bench");
    let dir = match std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        Some(d) if measure => std::path::PathBuf::from(d),
        _ => tmp.path().to_path_buf(),
    };
    std::fs::create_dir_all(&dir).unwrap();
    let (runs, messages, messages_always) = if measure {
        (RUNS, MESSAGES, MESSAGES_ALWAYS)
    } else {
        (1, SMOKE, SMOKE / 10)
    };
    let (mut log, mut log_always, mut sqlite) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        log.push(segment_log(&dir, Fsync::Batch, messages).await);
        sqlite.push(sqlite_wal(&dir, messages).await);
        log_always.push(segment_log(&dir, Fsync::Always, messages_always).await);
        println!(
            "run {run}: segment log {:.0} msg/s, SQLite WAL {:.0} msg/s, segment log fsync=always {:.0} msg/s",
            log[run], sqlite[run], log_always[run]
        );
    }
    let (l, s, a) = (median(log), median(sqlite), median(log_always));
    println!(
        "median of {runs}: segment log (fsync: batch) {l:.0} msg/s; SQLite WAL {s:.0} msg/s (segment log ×{:.2}); segment log (fsync: always) {a:.0} msg/s",
        l / s
    );
}
