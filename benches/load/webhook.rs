//! Webhook mode: mqbridge (the embedded broker, the durable spool, one rule) → its
//! `webhook` sink → a receiver in this process ([`crate::receiver`]), beside the ceiling
//! of that receiver, wrk, in the same run.
//!
//! One measurement starts a fresh mqbridge whose sink points at a fresh receiver,
//! publishes numbered QoS 1 JSON messages from a few publishers (each over a few topics,
//! since the sink sends the records of one topic one after another and different topics
//! in parallel), and waits until the receiver has every record: records/s from the first
//! publish to the last record received, lost and duplicated records, and the latency of
//! each record (publish → received). The sink runs unbatched (one request per record) or
//! batched (`batch_body: true`, one request per `max_rows` records). wrk POSTs one such
//! record to the same kind of receiver over as many connections as the unbatched sink
//! keeps busy. Runs are interleaved (run 1 of every variant, then run 2, …).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::brokers::{Broker, Programs};
use crate::flags::Flags;
use crate::matrix::{ms, spread};
use crate::mqtt::{self, Client};
use crate::publisher::{self, Encode, Plan};
use crate::receiver::Receiver;
use crate::tally::Latency;

/// Requests the webhook sink has in flight at once per lane when it sends one request
/// per record (one per topic; `MAX_PARALLEL` in `src/sink/webhook/mod.rs`).
const SINK_PARALLEL: usize = 16;

/// What one run sends, and how the sink is set up.
#[derive(Clone)]
pub struct Args {
    pub messages: u64,
    pub publishers: u32,
    pub topics_per_publisher: u32,
    pub payload_bytes: usize,
    /// QoS 1 messages a publisher may have unacknowledged.
    pub window: u32,
    /// The sink's `concurrency` (lanes).
    pub concurrency: usize,
    /// One batched variant per value: the sink's `batch.max_rows`.
    pub batch_rows: Vec<usize>,
    pub runs: usize,
    /// How long each wrk run lasts; None: no wrk runs.
    pub wrk: Option<Duration>,
    /// No record received for this long ends a run with an error.
    pub stall: Duration,
    pub programs: Programs,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            messages: 40_000,
            publishers: 4,
            topics_per_publisher: 4,
            payload_bytes: 100,
            window: 100,
            concurrency: 1,
            batch_rows: vec![100, 1000],
            runs: 3,
            wrk: Some(Duration::from_secs(10)),
            stall: Duration::from_secs(30),
            programs: Programs::default(),
        }
    }
}

impl Args {
    pub fn parse(mut flags: Flags) -> Args {
        let mut a = Args::default();
        while let Some(flag) = flags.next_flag() {
            match flag.as_str() {
                "--messages" => a.messages = flags.value(&flag),
                "--publishers" => a.publishers = flags.value(&flag),
                "--topics-per-publisher" => a.topics_per_publisher = flags.value(&flag),
                "--payload-bytes" => a.payload_bytes = flags.value(&flag),
                "--window" => a.window = flags.value(&flag),
                "--concurrency" => a.concurrency = flags.value(&flag),
                "--batch-rows" => a.batch_rows = flags.list(&flag),
                "--runs" => a.runs = flags.value(&flag),
                "--wrk-seconds" => a.wrk = Some(Duration::from_secs(flags.value(&flag))),
                "--no-wrk" => a.wrk = None,
                "--stall" => a.stall = Duration::from_secs(flags.value(&flag)),
                "--mqbridge" => a.programs.mqbridge = flags.value::<String>(&flag).into(),
                other => panic!("unknown flag {other}"),
            }
        }
        a
    }

    fn per_publisher(&self) -> u64 {
        self.messages / self.publishers as u64
    }

    /// Connections the unbatched sink keeps busy: one per topic, up to its limit per lane.
    fn sink_connections(&self) -> usize {
        let topics = (self.publishers * self.topics_per_publisher) as usize;
        topics.min(SINK_PARALLEL * self.concurrency)
    }

    fn variants(&self) -> Vec<Variant> {
        let mut v = vec![Variant::Unbatched];
        v.extend(self.batch_rows.iter().map(|&r| Variant::Batched(r)));
        v.extend(self.wrk.map(|_| Variant::Wrk));
        v
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// One request per record.
    Unbatched,
    /// `batch_body: true` with this `max_rows`.
    Batched(usize),
    /// wrk against the receiver alone.
    Wrk,
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::Unbatched => "webhook, one request per record".into(),
            Variant::Batched(rows) => format!("webhook, batch_body, max_rows {rows}"),
            Variant::Wrk => "wrk (the receiver's ceiling)".into(),
        }
    }
}

pub struct Measurement {
    pub variant: Variant,
    /// Records received (once) per second, first publish to last record; wrk: requests/s.
    pub records_per_s: f64,
    /// Messages acknowledged by mqbridge per second (0 for wrk).
    pub published_per_s: f64,
    /// Requests the receiver answered 200.
    pub requests: u64,
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub latency: Latency,
}

impl Measurement {
    pub fn line(&self) -> String {
        if self.variant == Variant::Wrk {
            return format!(
                "{}: {:.0} requests/s",
                self.variant.name(),
                self.records_per_s
            );
        }
        format!(
            "{}: {:.0} records/s end to end ({:.0} msg/s acknowledged), {} requests, \
             lost {} of {}, duplicated {}, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            self.variant.name(),
            self.records_per_s,
            self.published_per_s,
            self.requests,
            self.lost,
            self.sent,
            self.duplicated,
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max),
        )
    }
}

/// Every variant `runs` times, interleaved; prints each measurement as it ends.
pub async fn run(a: &Args) -> anyhow::Result<Vec<Measurement>> {
    println!(
        "webhook: {} messages from {} publishers over {} topics, sink concurrency {}, \
         wrk with {} connections",
        a.per_publisher() * a.publishers as u64,
        a.publishers,
        a.publishers * a.topics_per_publisher,
        a.concurrency,
        a.sink_connections()
    );
    let mut all = Vec::new();
    for run in 1..=a.runs {
        for variant in a.variants() {
            let m = measure(a, variant).await?;
            println!("run {run}: {}", m.line());
            all.push(m);
        }
    }
    Ok(all)
}

pub async fn measure(a: &Args, variant: Variant) -> anyhow::Result<Measurement> {
    let sink = match variant {
        Variant::Unbatched => Sink::unbatched(a.concurrency),
        Variant::Batched(rows) => Sink {
            batch_body: true,
            max_rows: rows,
            concurrency: a.concurrency,
        },
        Variant::Wrk => return measure_wrk(a).await,
    };
    let per = a.per_publisher();
    let sent = per * a.publishers as u64;
    let epoch = Instant::now();
    let receiver = Receiver::start(a.publishers as usize, per as usize, epoch).await?;
    let spool = tempfile::tempdir()?;
    let config = bridge_config(&receiver.url(), spool.path(), &sink, "1s");
    let bridge = Broker::bridge(&a.programs, |_| config).await?;
    let publishers = connect(bridge.addr, a.publishers).await?;
    let plan = Plan {
        qos: 1,
        messages: per,
        window: a.window,
        per_second: None,
    };
    let started = epoch.elapsed();
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, c)| {
            let encode = encoder(p as u32, a.topics_per_publisher, a.payload_bytes);
            tokio::spawn(publisher::publish(c, plan.clone(), epoch, encode))
        })
        .collect();
    receiver
        .wait_for(sent, a.stall)
        .await
        .with_context(|| format!("mqbridge's log: {}", bridge.log()))?;
    let mut published = Duration::ZERO;
    for t in tasks {
        published = published.max(t.await??);
    }
    let (distinct, duplicated, last, latency) =
        receiver.tally(|t| (t.distinct, t.duplicated, t.last, t.latency()));
    Ok(Measurement {
        variant,
        records_per_s: distinct as f64 / (last - started).as_secs_f64(),
        published_per_s: sent as f64 / (published - started).as_secs_f64(),
        requests: receiver.requests(),
        sent,
        lost: sent.saturating_sub(distinct),
        duplicated,
        latency,
    })
}

async fn measure_wrk(a: &Args) -> anyhow::Result<Measurement> {
    let receiver = Receiver::start(1, 1, Instant::now()).await?;
    let body = r#"{"device":"d0","p":0,"seq":0,"t":0,"temp":21.5}"#;
    let duration = a.wrk.unwrap_or(Duration::from_secs(10));
    let rate = crate::wrk::post(&receiver.url(), body, a.sink_connections(), duration).await?;
    Ok(Measurement {
        variant: Variant::Wrk,
        records_per_s: rate,
        published_per_s: 0.0,
        requests: receiver.requests(),
        sent: 0,
        lost: 0,
        duplicated: 0,
        latency: Latency::default(),
    })
}

/// How the webhook sink is set up.
pub struct Sink {
    pub batch_body: bool,
    pub max_rows: usize,
    pub concurrency: usize,
}

impl Sink {
    /// One request per record, the driver's default batches.
    pub fn unbatched(concurrency: usize) -> Sink {
        Sink {
            batch_body: false,
            max_rows: 1000,
            concurrency,
        }
    }
}

/// The config appended to the embedded broker's: the spool in `spool`, a webhook sink to
/// `url` (retries without limit, backing off up to `max_delay`), and one rule that turns
/// every `hook/{device}` message into a record carrying its publisher, sequence number
/// and send time.
pub fn bridge_config(url: &str, spool: &Path, sink: &Sink, max_delay: &str) -> String {
    format!(
        r#"spool: {{ path: "{spool}", max_bytes: 8GiB }}
sinks:
  hook:
    type: webhook
    url: "{url}"
    batch_body: {batch_body}
    batch: {{ max_rows: {max_rows}, max_wait: 5ms }}
    concurrency: {concurrency}
    retry: {{ initial_delay: 100ms, max_delay: {max_delay} }}
rules:
  - name: hook
    from: ["hook/{{device}}"]
    decode: json
    transform: '{{device: .vars.device, p: .payload.p, seq: .payload.seq, t: .payload.t, temp: .payload.temp}}'
    to: [hook]
"#,
        spool = spool.display(),
        batch_body = sink.batch_body,
        max_rows = sink.max_rows,
        concurrency = sink.concurrency,
    )
}

/// `n` publishers' connections to the broker.
pub async fn connect(broker: SocketAddr, n: u32) -> anyhow::Result<Vec<Client>> {
    let tag = std::process::id();
    let mut clients = Vec::new();
    for p in 0..n {
        clients.push(Client::connect(broker, &format!("hook-pub-{tag}-{p}"), 0).await?);
    }
    Ok(clients)
}

/// Publisher `p`'s messages at QoS 1: message `seq` on `hook/d<k>`, k cycling over the
/// publisher's `topics` topics, with a JSON payload of about `payload_bytes`:
/// `{"p":…,"seq":…,"t":<send time ns>,"temp":…,"pad":"xx…"}`.
pub fn encoder(p: u32, topics: u32, payload_bytes: usize) -> impl Encode {
    let (mut topic, mut json) = (String::new(), String::new());
    move |out, seq, pkid, now| {
        topic.clear();
        let _ = write!(topic, "hook/d{}", p * topics + (seq % topics as u64) as u32);
        json.clear();
        let _ = write!(
            json,
            r#"{{"p":{p},"seq":{seq},"t":{now},"temp":{}.5,"pad":""#,
            seq % 40
        );
        let pad = payload_bytes.saturating_sub(json.len() + 2);
        json.extend(std::iter::repeat_n('x', pad));
        json.push_str("\"}");
        mqtt::put_publish(out, &topic, 1, pkid, json.len(), |b| {
            b.copy_from_slice(json.as_bytes())
        });
    }
}

/// A markdown table of medians [min–max] per variant, and the ratios the issue sets
/// targets for (unbatched ÷ wrk ≥ 0.8, batched ÷ unbatched ≥ 10).
pub fn summary(all: &[Measurement]) -> String {
    let mut out = String::from(
        "| variant | records/s (wrk: requests/s) | requests | lost | dup | p50 ms | p99 ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut seen: Vec<Variant> = Vec::new();
    for m in all {
        if !seen.contains(&m.variant) {
            seen.push(m.variant);
        }
    }
    let median = |v: Variant| {
        let rates: Vec<f64> = all
            .iter()
            .filter(|m| m.variant == v)
            .map(|m| m.records_per_s)
            .collect();
        (!rates.is_empty()).then(|| spread(rates).0)
    };
    for &v in &seen {
        let runs: Vec<&Measurement> = all.iter().filter(|m| m.variant == v).collect();
        let fmt = |f: &dyn Fn(&Measurement) -> f64, digits: usize| {
            let (med, min, max) = spread(runs.iter().map(|m| f(m)).collect());
            format!("{med:.digits$} [{min:.digits$}–{max:.digits$}]")
        };
        let (requests, lost, dup, p50, p99) = if v == Variant::Wrk {
            Default::default()
        } else {
            (
                fmt(&|m| m.requests as f64, 0),
                runs.iter().map(|m| m.lost).sum::<u64>().to_string(),
                runs.iter().map(|m| m.duplicated).sum::<u64>().to_string(),
                fmt(&|m| ms(m.latency.p50), 1),
                fmt(&|m| ms(m.latency.p99), 1),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {requests} | {lost} | {dup} | {p50} | {p99} |",
            v.name(),
            fmt(&|m| m.records_per_s, 0),
        );
    }
    let unbatched = median(Variant::Unbatched);
    if let (Some(u), Some(w)) = (unbatched, median(Variant::Wrk)) {
        let _ = writeln!(out, "\nunbatched ÷ wrk: **{:.2}** (target ≥ 0.8)", u / w);
    }
    for &v in &seen {
        if let (Variant::Batched(rows), Some(b), Some(u)) = (v, median(v), unbatched) {
            let _ = writeln!(
                out,
                "batched (max_rows {rows}) ÷ unbatched: **{:.1}** (target ≥ 10)",
                b / u
            );
        }
    }
    out
}
