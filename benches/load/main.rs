//! End-to-end load tool, in eight modes (BENCHMARKS.md records the commands and figures):
//!
//! - **db** (the default): numbered QoS 1 messages through a running mqbridge into
//!   PostgreSQL or SQLite; the publish rate and the rate until every row is stored.
//! - **fanin**: the embedded broker beside its ceiling, Mosquitto, in the same run:
//!   4 publishers → 1 subscriber, QoS 0 and 1, 100-byte payloads, with 0 or thousands
//!   of idle connections open; lost and duplicated messages, msg/s, latency p50/p99/max,
//!   and the broker's RSS per idle connection. The tool starts both brokers itself.
//! - **webhook**: mqbridge (embedded broker, spool, one rule) → its webhook sink → a
//!   receiver in this process, unbatched and batched, beside wrk against the same
//!   receiver; records/s, lost and duplicated records, latency p50/p99.
//! - **outage**: the same bridge publishing at a fixed rate while the receiver is down
//!   (503), then the drain: mqbridge's RSS and the spool's size every second into a CSV,
//!   drain time, lost and duplicated records.
//! - **pg** and **pg-latency**: mqbridge as the broker (or, `--via mosquitto`, as the
//!   client of a Mosquitto the tool starts), with or without the spool, into a PostgreSQL
//!   the tool starts: rows/s beside `COPY` of the same rows (and beside Mosquitto's own
//!   fan-in), and publish → row latency at fixed rates (see `pg`).
//! - **abuse**: the embedded broker's fan-in beside the same fan-in with hostile clients
//!   connected (slowloris, tricklers, subscribers that never read, a flood): the healthy
//!   clients' msg/s and latency, the broker's peak RSS, what its deadlines closed.
//! - **hold-idle**: internal, a child process holding idle connections for `fanin`.
//!
//! ```text
//! cargo bench --bench load -- --port 1883 --messages 100000 --publishers 4 \
//!     --postgres postgres://postgres@127.0.0.1:5432/bench --count "select count(*) from readings"
//! cargo bench --bench load -- fanin --qos 0,1 --idle 0,5000,18000 --runs 3 --messages 200000
//! cargo bench --bench load -- webhook --runs 3 --messages 40000
//! cargo bench --bench load -- outage --rate 2000 --minutes 10 --csv target/load/outage.csv
//! cargo bench --bench load -- pg --spool on,off --runs 3 --messages 200000
//! cargo bench --bench load -- pg-latency --rates 1000,10000 --seconds 20 --csv target/bench
//! cargo bench --bench load -- abuse --runs 3 --messages 200000 --slowloris 200 --non-readers 20
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a smoke pass instead:
//! a few hundred messages per broker and QoS with a few idle connections, and a few
//! hundred records through the webhook sink, and a few hundred through the fan-in beside
//! a few hostile clients, failing on any message lost or duplicated, and asserting
//! nothing about time.
//!
//! The modules, in the order a fan-in run uses them: `brokers` (start the broker under
//! test), `idle` (the idle connections, held by child processes), `fanin` (publishers,
//! subscriber) over `publisher`, `tally` and `mqtt` (a minimal raw MQTT 3.1.1 client),
//! and `matrix` (every scenario on every broker, interleaved, and the summary table).
//! The webhook mode: `webhook` (the scenario, its variants and their table) with
//! `receiver` (the HTTP receiver) and `wrk` (its ceiling); `outage` uses the first two.

mod abuse;
mod brokers;
mod db;
mod fanin;
mod flags;
mod idle;
mod matrix;
mod mqtt;
mod outage;
mod pg;
mod publisher;
mod receiver;
mod tally;
mod webhook;
mod wrk;

use std::time::Duration;

use brokers::{Kind, Programs};
use fanin::{Payload, Scenario};
use flags::Flags;
use matrix::Matrix;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    args.retain(|a| a != "--bench");
    let mode = args.first().map(String::as_str);
    match mode {
        Some("hold-idle") => idle::hold(Flags::new(args.split_off(1))).await,
        _ if !bench => smoke().await,
        Some("fanin") => {
            let matrix = Matrix::parse(Flags::new(args.split_off(1)));
            let all = matrix.run().await?;
            println!("\n{}", matrix::summary(&all));
            Ok(())
        }
        Some("webhook") => {
            let all = webhook::run(&webhook::Args::parse(Flags::new(args.split_off(1)))).await?;
            println!("\n{}", webhook::summary(&all));
            Ok(())
        }
        Some("abuse") => {
            let all = abuse::run(&abuse::Args::parse(Flags::new(args.split_off(1)))).await?;
            println!("\n{}", abuse::summary(&all));
            Ok(())
        }
        Some("outage") => outage::run(&outage::Args::parse(Flags::new(args.split_off(1)))).await,
        Some("pg") => pg::throughput(Flags::new(args.split_off(1))).await,
        Some("pg-latency") => pg::latency(Flags::new(args.split_off(1))).await,
        Some("db") => {
            db::run(Flags::new(args.split_off(1))).await;
            Ok(())
        }
        _ => {
            db::run(Flags::new(args)).await;
            Ok(())
        }
    }
}

/// The test command's pass: the fan-in tool end to end on a tiny scale, against the
/// embedded broker (the debug build cargo made for the tests) and Mosquitto when it is
/// installed, then a few hundred records through the webhook sink, then the `pg`
/// scenario into the tests' PostgreSQL when there is one. Fails on any message lost or
/// duplicated; no timing is checked.
async fn smoke() -> anyhow::Result<()> {
    let programs = Programs::default();
    let mut brokers = vec![Kind::Embedded];
    if std::process::Command::new(&programs.mosquitto)
        .arg("-h")
        .output()
        .is_ok()
    {
        brokers.push(Kind::Mosquitto);
    } else {
        println!("load smoke: no mosquitto, the embedded broker only");
    }
    let matrix = Matrix {
        brokers,
        qos: vec![0, 1],
        idle: vec![20],
        runs: 1,
        scenario: Scenario {
            qos: 0,
            publishers: 4,
            messages_per_publisher: 100,
            payload_bytes: 100,
            window: 10,
            stall: Duration::from_secs(30),
            payload: Payload::Stamp,
            rate: None,
        },
        idle_per_process: 10,
        programs,
        csv: None,
    };
    let all = matrix.run().await?;
    webhook_smoke().await?;
    abuse_smoke().await?;
    for m in &all {
        anyhow::ensure!(
            m.outcome.lost == 0 && m.outcome.duplicated == 0,
            "{} QoS {}: {} lost, {} duplicated",
            m.broker.name(),
            m.qos,
            m.outcome.lost,
            m.outcome.duplicated
        );
    }
    match std::env::var("MQBRIDGE_TEST_DATABASE_URL") {
        Ok(url) => pg::smoke(&url).await,
        Err(_) => {
            println!("load smoke: no MQBRIDGE_TEST_DATABASE_URL, no PostgreSQL pass");
            Ok(())
        }
    }
}

/// The webhook mode on a tiny scale: 400 records through the sink unbatched and batched,
/// failing on any record lost or duplicated; no timing is checked.
async fn webhook_smoke() -> anyhow::Result<()> {
    let args = webhook::Args {
        messages: 400,
        ..webhook::Args::default()
    };
    for variant in [webhook::Variant::Unbatched, webhook::Variant::Batched(100)] {
        let m = webhook::measure(&args, variant).await?;
        println!("webhook smoke: {}", m.line());
        anyhow::ensure!(
            m.lost == 0 && m.duplicated == 0,
            "webhook {variant:?}: {} lost, {} duplicated",
            m.lost,
            m.duplicated
        );
    }
    Ok(())
}

/// The abuse mode on a tiny scale: 400 messages through the fan-in without and with two
/// hostile clients of each kind, failing on any message lost or duplicated; no timing
/// (nor whether a deadline passed in so short a run) is checked.
async fn abuse_smoke() -> anyhow::Result<()> {
    let mut args = abuse::Args::parse(Flags::new(Vec::new()));
    args.runs = 1;
    args.scenario.messages_per_publisher = 100;
    args.hostile = abuse::Hostile {
        slowloris: 2,
        tricklers: 2,
        non_readers: 2,
        flooders: 1,
        drip: Duration::from_millis(100),
    };
    for m in abuse::run(&args).await? {
        anyhow::ensure!(
            m.outcome.lost == 0 && m.outcome.duplicated == 0,
            "abuse smoke: {}",
            m.line()
        );
    }
    Ok(())
}
