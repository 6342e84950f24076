//! Outage mode: mqbridge (embedded broker, durable spool, one rule) → its webhook sink →
//! a receiver that is down (503 to every request) for the whole time messages are
//! published at a fixed rate, then comes back. Once a second the tool writes a CSV line
//! with mqbridge's RSS (`VmRSS`) and the spool's size on disk, so that one can see memory
//! stay flat while the backlog grows on disk; after the outage it measures the drain
//! (receiver back → every record received) and counts lost and duplicated records.
//!
//! CSV columns: `seconds` (since the first publish), `phase` (`outage`, `drain`, `after`:
//! the seconds after the last record came), `rss_kib`, `spool_bytes`, `received`
//! (distinct records so far).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::brokers::{Broker, Programs};
use crate::flags::Flags;
use crate::matrix::spread;
use crate::publisher::{self, Plan};
use crate::receiver::Receiver;
use crate::webhook::{self, Sink};

/// Seconds sampled after the last record arrived.
const AFTER: u32 = 5;

pub struct Args {
    /// Messages per second, all publishers together.
    pub rate: f64,
    pub duration: Duration,
    pub publishers: u32,
    pub topics_per_publisher: u32,
    pub payload_bytes: usize,
    /// The sink's `batch.max_rows` with `batch_body: true`; 0: one request per record.
    pub batch_rows: usize,
    /// The sink's `retry.max_delay` (its backoff while the receiver is down).
    pub max_delay: String,
    pub csv: PathBuf,
    /// No record received for this long during the drain ends the run with an error.
    pub stall: Duration,
    pub programs: Programs,
}

impl Args {
    pub fn parse(mut flags: Flags) -> Args {
        let mut a = Args {
            rate: 2000.0,
            duration: Duration::from_secs(600),
            publishers: 4,
            topics_per_publisher: 4,
            payload_bytes: 100,
            batch_rows: 0,
            max_delay: "1s".into(),
            csv: "target/load/outage.csv".into(),
            stall: Duration::from_secs(60),
            programs: Programs::default(),
        };
        while let Some(flag) = flags.next_flag() {
            match flag.as_str() {
                "--rate" => a.rate = flags.value(&flag),
                "--minutes" => {
                    a.duration = Duration::from_secs_f64(flags.value::<f64>(&flag) * 60.0)
                }
                "--seconds" => a.duration = Duration::from_secs(flags.value(&flag)),
                "--publishers" => a.publishers = flags.value(&flag),
                "--topics-per-publisher" => a.topics_per_publisher = flags.value(&flag),
                "--payload-bytes" => a.payload_bytes = flags.value(&flag),
                "--batch-rows" => a.batch_rows = flags.value(&flag),
                "--retry-max-delay" => a.max_delay = flags.value(&flag),
                "--csv" => a.csv = flags.value::<String>(&flag).into(),
                "--stall" => a.stall = Duration::from_secs(flags.value(&flag)),
                "--mqbridge" => a.programs.mqbridge = flags.value::<String>(&flag).into(),
                other => panic!("unknown flag {other}"),
            }
        }
        a
    }
}

const OUTAGE: u8 = 0;
const DRAIN: u8 = 1;
const AFTER_DRAIN: u8 = 2;
const PHASES: [&str; 3] = ["outage", "drain", "after"];

/// One sample of the CSV.
struct Sample {
    phase: u8,
    rss_kib: u64,
}

pub async fn run(a: &Args) -> anyhow::Result<()> {
    let per = (a.rate * a.duration.as_secs_f64() / a.publishers as f64) as u64;
    let sent = per * a.publishers as u64;
    let epoch = Instant::now();
    let receiver = Receiver::start(a.publishers as usize, per as usize, epoch).await?;
    receiver.set_down(true);
    let spool = tempfile::tempdir()?;
    let sink = match a.batch_rows {
        0 => Sink::unbatched(1),
        rows => Sink {
            batch_body: true,
            max_rows: rows,
            concurrency: 1,
        },
    };
    let config = webhook::bridge_config(&receiver.url(), spool.path(), &sink, &a.max_delay);
    let bridge = Broker::bridge(&a.programs, |_| config).await?;
    if let Some(dir) = a.csv.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut csv = std::io::BufWriter::new(
        std::fs::File::create(&a.csv).with_context(|| format!("creating {}", a.csv.display()))?,
    );
    writeln!(csv, "seconds,phase,rss_kib,spool_bytes,received")?;
    println!(
        "outage: {sent} messages at {:.0} msg/s for {:?} with the receiver down, then the drain; \
         samples in {}",
        a.rate,
        a.duration,
        a.csv.display()
    );

    let phase = AtomicU8::new(OUTAGE);
    let publishers = webhook::connect(bridge.addr, a.publishers).await?;
    let started = epoch.elapsed();
    let plan = Plan {
        qos: 1,
        messages: per,
        window: 100,
        per_second: Some(a.rate / a.publishers as f64),
    };
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, c)| {
            let encode = webhook::encoder(p as u32, a.topics_per_publisher, a.payload_bytes);
            tokio::spawn(publisher::publish(c, plan.clone(), epoch, encode))
        })
        .collect();
    let outage = async {
        let mut published = Duration::ZERO;
        for t in tasks {
            published = published.max(t.await??);
        }
        let up = epoch.elapsed();
        let backlog = sent - receiver.distinct();
        phase.store(DRAIN, Ordering::Relaxed);
        receiver.set_down(false);
        receiver
            .wait_for(sent, a.stall)
            .await
            .with_context(|| format!("mqbridge's log: {}", bridge.log()))?;
        phase.store(AFTER_DRAIN, Ordering::Relaxed);
        anyhow::Ok((published - started, up, backlog))
    };
    let sampling = async {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut after = 0;
        while after < AFTER {
            tick.tick().await;
            let p = phase.load(Ordering::Relaxed);
            after += u32::from(p == AFTER_DRAIN);
            let rss_kib = bridge.rss_kib()?;
            let at = epoch.elapsed().saturating_sub(started).as_secs_f64();
            let (bytes, received) = (disk_usage(spool.path()), receiver.distinct());
            writeln!(
                csv,
                "{at:.1},{},{rss_kib},{bytes},{received}",
                PHASES[p as usize]
            )?;
            csv.flush()?;
            samples.push(Sample { phase: p, rss_kib });
        }
        anyhow::Ok(samples)
    };
    let (outage, samples) = futures::future::join(outage, sampling).await;
    let (published, up, backlog) = outage?;
    let samples = samples?;
    let (distinct, duplicated, first, last) =
        receiver.tally(|t| (t.distinct, t.duplicated, t.first, t.last));
    let drain = last.saturating_sub(up);
    // The sink's first retry after the receiver came back waits out its backoff (up to
    // `retry.max_delay`): the rate from the first record received is the sink's own.
    let flowing = last.saturating_sub(first.unwrap_or(up).max(up));
    println!(
        "published {sent} messages in {:.1} s ({:.0} msg/s acknowledged); backlog {backlog} \
         records when the receiver came back; drained in {:.1} s ({:.0} records/s; \
         {:.0} records/s from the first record received); lost {} of {sent}, \
         duplicated {duplicated}",
        published.as_secs_f64(),
        sent as f64 / published.as_secs_f64(),
        drain.as_secs_f64(),
        backlog as f64 / drain.as_secs_f64(),
        backlog as f64 / flowing.as_secs_f64(),
        sent.saturating_sub(distinct),
    );
    for (i, name) in PHASES.iter().enumerate() {
        let rss: Vec<f64> = samples
            .iter()
            .filter(|s| s.phase as usize == i)
            .map(|s| s.rss_kib as f64)
            .collect();
        if rss.is_empty() {
            continue;
        }
        let n = rss.len();
        let (med, min, max) = spread(rss);
        println!("RSS {name}: median {med:.0} KiB [{min:.0}–{max:.0}] over {n} samples");
    }
    Ok(())
}

/// Bytes of the files under `dir` (the spool's segments).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
