//! Batch insert strategies for the postgres sink, measured side by side on one server: the
//! sink itself (`INSERT … SELECT unnest($1::text[])::type, …`), the same arrays unnested
//! in `FROM UNNEST(…)` (the sink's statement until 3 December 2026), and `COPY … FROM
//! STDIN` of the same rows as text. The rows are the load tool's (`benches/load`, `pg`):
//! `device text, seq bigint, temp float8, body jsonb, sent_us bigint`, in batches of 1,000,
//! one statement per batch. For each: rows/s, and the server's CPU per row (every
//! `postgres` process's utime + stime from `/proc`, so run it against a server on this
//! machine). Needs a PostgreSQL URL:
//!
//! ```text
//! cargo bench --bench postgres_insert -- postgres://postgres@127.0.0.1:5432/bench
//! ```

use std::time::Instant;

use mqbridge::config::sinks::SinkConfig;
use mqbridge::eval_pool::{EVAL_TIMEOUT, EvalPool};
use mqbridge::sink::{self, Delivery, OpenContext, Outcome, Sink};
use serde_json::json;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const ROWS: usize = 100_000;
const BATCH: usize = 1000;
const RUNS: usize = 7;
const COLUMNS: [&str; 5] = ["device", "seq", "temp", "body", "sent_us"];

/// How a batch goes to the server.
#[derive(Clone, Copy)]
enum Strategy {
    Sink,
    FromUnnest,
    Copy,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Sink => "the sink: SELECT unnest($1::text[])::type, …",
            Strategy::FromUnnest => "SELECT … FROM UNNEST($1::text[], …)",
            Strategy::Copy => "COPY … FROM STDIN (text)",
        }
    }

    async fn write(
        self,
        sink: &dyn Sink,
        conn: &mut PgConnection,
        records: &[Delivery],
        texts: &[[String; 5]],
    ) {
        match self {
            Strategy::Sink => {
                let outcomes = sink.write(records).await;
                outcomes.into_iter().try_for_each(Outcome::result).unwrap();
            }
            Strategy::FromUnnest => {
                let sql = "INSERT INTO bench_rows (device, seq, temp, body, sent_us) \
                           SELECT u.c0::text, u.c1::bigint, u.c2::float8, u.c3::jsonb, u.c4::bigint \
                           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                           AS u(c0, c1, c2, c3, c4)";
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for c in 0..COLUMNS.len() {
                    q = q.bind(texts.iter().map(|r| r[c].as_str()).collect::<Vec<_>>());
                }
                q.execute(conn).await.unwrap();
            }
            Strategy::Copy => {
                let mut text = String::with_capacity(texts.len() * 120);
                for row in texts {
                    text.push_str(&row.join("\t"));
                    text.push('\n');
                }
                let sql = format!("COPY bench_rows ({}) FROM STDIN", COLUMNS.join(", "));
                let mut copy = conn.copy_in_raw(&sql).await.unwrap();
                copy.send(text.into_bytes()).await.unwrap();
                copy.finish().await.unwrap();
            }
        }
    }
}

fn record(seq: usize) -> serde_json::Value {
    let sent_us = 1_780_000_000_000_000u64 + seq as u64;
    let temp = (seq % 400) as f64 / 10.0;
    let body = json!({"seq": seq, "sent_us": sent_us, "temp": temp});
    json!({"device": format!("d{}", seq % 64), "seq": seq, "temp": temp, "sent_us": sent_us, "body": body})
}

/// CPU seconds used so far by every `postgres` process on this machine.
fn server_cpu() -> f64 {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if comm.trim() != "postgres" {
            continue;
        }
        // After the command's closing parenthesis: utime and stime are fields 12 and 13.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(11) + field(12);
    }
    ticks as f64 / 100.0
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
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_rows; CREATE TABLE bench_rows \
         (device text, seq bigint, temp float8, body jsonb, sent_us bigint)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let records: Vec<Delivery> = (0..ROWS)
        .map(|seq| Delivery::detached("bench", record(seq)))
        .collect();
    let texts: Vec<[String; 5]> = records
        .iter()
        .map(|d| {
            let r = &d.record;
            COLUMNS.map(|c| match &r[c] {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            })
        })
        .collect();
    let cfg: SinkConfig =
        serde_json::from_value(json!({"type": "postgres", "url": url, "table": "bench_rows"}))
            .unwrap();
    let eval = EvalPool::start("eval", 1, EVAL_TIMEOUT).unwrap();
    let ctx = OpenContext {
        publisher: None,
        eval: &eval,
    };
    let sink = sink::open(&cfg.compile().unwrap(), ctx).await.unwrap();

    let strategies = [Strategy::Sink, Strategy::FromUnnest, Strategy::Copy];
    let mut rates = vec![Vec::new(); strategies.len()];
    let mut cpu = vec![Vec::new(); strategies.len()];
    for _ in 0..RUNS {
        for (i, strategy) in strategies.into_iter().enumerate() {
            sqlx::raw_sql("TRUNCATE bench_rows")
                .execute(&mut conn)
                .await
                .unwrap();
            let (started, cpu_before) = (Instant::now(), server_cpu());
            for (batch, text) in records.chunks(BATCH).zip(texts.chunks(BATCH)) {
                strategy.write(&*sink, &mut conn, batch, text).await;
            }
            rates[i].push(ROWS as f64 / started.elapsed().as_secs_f64());
            cpu[i].push((server_cpu() - cpu_before) * 1e6 / ROWS as f64);
        }
    }
    println!("{ROWS} rows in batches of {BATCH}, {RUNS} runs of each, interleaved");
    for (i, strategy) in strategies.into_iter().enumerate() {
        println!(
            "  {:46} rows/s median {:>7.0} {:.0?}\n  {:46} server CPU µs/row median {:.2} {:.1?}",
            strategy.name(),
            median(rates[i].clone()),
            rates[i],
            "",
            median(cpu[i].clone()),
            cpu[i],
        );
    }
    sqlx::raw_sql("DROP TABLE bench_rows")
        .execute(&mut conn)
        .await
        .unwrap();
}
