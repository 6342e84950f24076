//! Database mode: publishes numbered QoS 1 messages to a broker as fast as it
//! acknowledges them, then waits until a PostgreSQL or SQLite count reaches the number
//! sent, and prints the rates. It drives a real mqbridge (bridging an external broker or
//! as the broker itself), the broker and the database, all started beforehand.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::flags::Flags;

struct Args {
    host: String,
    port: u16,
    messages: u64,
    publishers: u64,
    topic_prefix: String,
    payload_bytes: usize,
    postgres: Option<String>,
    sqlite: Option<String>,
    count: String,
    timeout: Duration,
}

fn parse_args(mut flags: Flags) -> Args {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 1883,
        messages: 100_000,
        publishers: 4,
        topic_prefix: "load".into(),
        payload_bytes: 0,
        postgres: None,
        sqlite: None,
        count: "SELECT count(*) FROM readings".into(),
        timeout: Duration::from_secs(600),
    };
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--host" => a.host = flags.value(&flag),
            "--port" => a.port = flags.value(&flag),
            "--messages" => a.messages = flags.value(&flag),
            "--publishers" => a.publishers = flags.value(&flag),
            "--topic-prefix" => a.topic_prefix = flags.value(&flag),
            "--payload-bytes" => a.payload_bytes = flags.value(&flag),
            "--postgres" => a.postgres = Some(flags.value(&flag)),
            "--sqlite" => a.sqlite = Some(flags.value(&flag)),
            "--count" => a.count = flags.value(&flag),
            "--timeout" => a.timeout = Duration::from_secs(flags.value(&flag)),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

async fn publish(args: &Args, id: u64, from: u64, to: u64) {
    let mut opts = MqttOptions::new(
        format!("load-{id}-{}", std::process::id()),
        args.host.clone(),
        args.port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    opts.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let total = to - from;
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
        }
    });
    let pad = "x".repeat(args.payload_bytes);
    for seq in from..to {
        let topic = format!("{}/d{}/telemetry", args.topic_prefix, seq % 100);
        let payload = format!(r#"{{"seq": {seq}, "temp": {}, "pad": "{pad}"}}"#, seq % 40);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    poller.await.unwrap();
}

async fn count(args: &Args) -> Option<i64> {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(args.count.clone());
    if let Some(url) = &args.postgres {
        let mut c = sqlx::PgConnection::connect(url).await.ok()?;
        return sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut c)
            .await
            .ok();
    }
    if let Some(path) = &args.sqlite {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{path}?mode=ro"))
            .await
            .ok()?;
        return sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut c)
            .await
            .ok();
    }
    None
}

pub async fn run(flags: Flags) {
    let args = Arc::new(parse_args(flags));
    let before = count(&args).await.unwrap_or(0);
    let started = Instant::now();
    let per = args.messages / args.publishers;
    let tasks: Vec<_> = (0..args.publishers)
        .map(|i| {
            let args = args.clone();
            let to = if i == args.publishers - 1 {
                args.messages
            } else {
                (i + 1) * per
            };
            tokio::spawn(async move { publish(&args, i, i * per, to).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    report(
        "published",
        "QoS 1 messages",
        args.messages,
        started.elapsed(),
        "broker PUBACKs",
    );
    if args.postgres.is_none() && args.sqlite.is_none() {
        return;
    }
    let target = before + args.messages as i64;
    loop {
        let n = count(&args).await.unwrap_or(before);
        if n >= target {
            break;
        }
        assert!(
            started.elapsed() < args.timeout,
            "timed out at {} of {target}",
            n - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(
        "stored",
        "rows",
        args.messages,
        started.elapsed(),
        "end to end",
    );
}

/// Prints how many `what` were `done` in `took`, and the rate (`per`: what it measures).
fn report(done: &str, what: &str, n: u64, took: Duration, per: &str) {
    let secs = took.as_secs_f64();
    println!(
        "{done} {n} {what} in {secs:.2}s: {:.0} msg/s ({per})",
        n as f64 / secs
    );
}
