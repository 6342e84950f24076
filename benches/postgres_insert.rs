//! Batch insert strategies for the postgres sink, measured side by side on one server:
//! the sink's `INSERT … SELECT … FROM UNNEST($1::text[], …)` (what mqbridge uses) against
//! `COPY … FROM STDIN` in a transaction per batch. Needs a PostgreSQL URL:
//!
//! ```text
//! cargo bench --bench postgres_insert -- postgres://postgres@127.0.0.1:5432/bench
//! ```

use std::time::Instant;

use mqbridge::config::sinks::SinkConfig;
use mqbridge::eval_pool::{EVAL_TIMEOUT, EvalPool};
use mqbridge::sink::{self, Delivery, OpenContext, Outcome};
use serde_json::json;
use sqlx::Connection;

const ROWS: usize = 100_000;
const BATCH: usize = 1000;
const RUNS: usize = 5;

fn delivery(seq: usize) -> Delivery {
    Delivery::detached(
        "bench",
        json!({"device": format!("d{}", seq % 100), "seq": seq, "temp": (seq % 40) as f64 + 0.5, "ts": "2026-11-26T03:00:00Z"}),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs benches without `--bench`, maybe with test filters
    // (`postgres::`): measure only under `cargo bench`, and only a URL is a URL.
    let measure = std::env::args().any(|a| a == "--bench");
    let url = std::env::args()
        .skip(1)
        .find(|a| a.starts_with("postgres://") || a.starts_with("postgresql://"));
    let (true, Some(url)) = (measure, url) else {
        println!("postgres_insert: run with `cargo bench --bench postgres_insert -- postgres://…`");
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("DROP TABLE IF EXISTS bench_rows; CREATE TABLE bench_rows (device text, seq bigint, temp double precision, ts timestamptz)")
        .execute(&mut conn)
        .await
        .unwrap();
    let records: Vec<Delivery> = (0..ROWS).map(delivery).collect();
    let cfg: SinkConfig =
        serde_json::from_value(json!({"type": "postgres", "url": url, "table": "bench_rows"}))
            .unwrap();
    let eval = EvalPool::start("eval", 1, EVAL_TIMEOUT).unwrap();
    let ctx = OpenContext {
        publisher: None,
        eval: &eval,
    };
    let sink = sink::open(&cfg.compile().unwrap(), ctx).await.unwrap();

    let (mut unnest, mut copy) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        sqlx::raw_sql("TRUNCATE bench_rows")
            .execute(&mut conn)
            .await
            .unwrap();
        let t = Instant::now();
        for chunk in records.chunks(BATCH) {
            let outcomes = sink.write(chunk).await;
            outcomes.into_iter().try_for_each(Outcome::result).unwrap();
        }
        unnest.push(ROWS as f64 / t.elapsed().as_secs_f64());

        sqlx::raw_sql("TRUNCATE bench_rows")
            .execute(&mut conn)
            .await
            .unwrap();
        let t = Instant::now();
        for chunk in records.chunks(BATCH) {
            let mut text = String::with_capacity(chunk.len() * 48);
            for d in chunk {
                let r = &d.record;
                text.push_str(&format!(
                    "{}\t{}\t{}\t{}\n",
                    r["device"].as_str().unwrap(),
                    r["seq"],
                    r["temp"],
                    r["ts"].as_str().unwrap()
                ));
            }
            let mut tx = conn.begin().await.unwrap();
            let mut c = tx
                .copy_in_raw("COPY bench_rows (device, seq, temp, ts) FROM STDIN")
                .await
                .unwrap();
            c.send(text.into_bytes()).await.unwrap();
            c.finish().await.unwrap();
            tx.commit().await.unwrap();
        }
        copy.push(ROWS as f64 / t.elapsed().as_secs_f64());
    }
    let (u, c) = (median(unnest.clone()), median(copy.clone()));
    println!("{ROWS} rows in batches of {BATCH}, {RUNS} runs each (rows/s)");
    println!("  UNNEST (the sink):  median {u:>9.0}  runs {unnest:.0?}");
    println!("  COPY FROM STDIN:    median {c:>9.0}  runs {copy:.0?}");
    println!("  UNNEST / COPY = {:.2}", u / c);
    sqlx::raw_sql("DROP TABLE bench_rows")
        .execute(&mut conn)
        .await
        .unwrap();
}
