//! Fan-in: N publishers → 1 subscriber through the broker under test, QoS 0 or 1.
//!
//! Every payload starts with its publisher's number, its sequence number and the time it
//! was written to the socket (nanoseconds since the run's start: publishers and
//! subscriber share one clock), padded to the payload size. The subscriber counts, per
//! publisher, which sequence numbers arrived and how often (lost: never; duplicated: more
//! than once) and the latency of each. A QoS 1 publisher keeps at most `window` messages
//! unacknowledged; a QoS 0 one writes as fast as TCP takes them. The rate is messages
//! delivered over the time from the first publish to the last delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Semaphore;

use crate::mqtt::{self, Client};

/// Bytes of messages a publisher encodes before each write.
const WRITE_BATCH: usize = 32 * 1024;
/// Publisher number, sequence number, send time: the start of every payload.
const STAMP: usize = 4 + 8 + 8;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub qos: u8,
    pub publishers: u32,
    pub messages_per_publisher: u64,
    pub payload_bytes: usize,
    /// QoS 1: messages a publisher may have unacknowledged.
    pub window: u32,
    /// No message for this long ends the run; what did not arrive is lost.
    pub stall: Duration,
    pub payload: Payload,
    /// Messages per second per publisher; None: as fast as the broker takes them.
    pub rate: Option<f64>,
}

/// What a payload says about its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Binary: publisher, sequence number, send time in nanoseconds since the run's epoch
    /// (read back by this tool's subscriber).
    Stamp,
    /// A JSON object `{"seq":…,"sent_us":…,"temp":…}`, the send time in microseconds since
    /// the Unix epoch (so a database can compare it with its own clock), padded with
    /// spaces to the payload size.
    Json,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Messages delivered (once) per second, first publish to last delivery.
    pub delivered_per_s: f64,
    /// Messages the publishers wrote (QoS 0) or had acknowledged (QoS 1) per second.
    pub published_per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub async fn run(broker: SocketAddr, s: &Scenario) -> anyhow::Result<Outcome> {
    ensure!(
        s.payload_bytes >= STAMP,
        "payloads need at least {STAMP} bytes"
    );
    let mut subscriber =
        Client::connect(broker, &format!("fanin-sub-{}", std::process::id()), 0).await?;
    subscriber.subscribe("fanin/#", s.qos).await?;
    let epoch = Instant::now();
    let publishers = Publishers::start(broker, s, epoch).await?;
    let tally = subscribe(subscriber, s, epoch).await?;
    let published = publishers.finish(s.stall).await?;
    let sent = s.messages_per_publisher * s.publishers as u64;
    Ok(tally.outcome(sent, published))
}

/// The scenario's publishers, each on `fanin/{its number}`, publishing.
pub struct Publishers(Vec<tokio::task::JoinHandle<anyhow::Result<Duration>>>);

impl Publishers {
    /// Connects them all, then starts them together.
    pub async fn start(broker: SocketAddr, s: &Scenario, epoch: Instant) -> anyhow::Result<Self> {
        ensure!(s.qos <= 1, "QoS 0 or 1");
        let tag = std::process::id();
        let mut clients = Vec::new();
        for p in 0..s.publishers {
            clients.push(Client::connect(broker, &format!("fanin-pub-{tag}-{p}"), 0).await?);
        }
        Ok(Publishers(
            clients
                .into_iter()
                .enumerate()
                .map(|(p, c)| tokio::spawn(publish(c, p as u32, s.clone(), epoch)))
                .collect(),
        ))
    }

    /// Waits for every publisher (at most `stall` each once asked); returns when the last
    /// one was done, as time since the epoch.
    pub async fn finish(self, stall: Duration) -> anyhow::Result<Duration> {
        let mut published = Duration::ZERO;
        for t in self.0 {
            let done = tokio::time::timeout(stall, t)
                .await
                .context("a publisher did not finish")???;
            published = published.max(done);
        }
        Ok(published)
    }
}

/// Publishes the scenario's messages; returns when the last was written (QoS 0) or
/// acknowledged (QoS 1), as time since `epoch`.
async fn publish(c: Client, id: u32, s: Scenario, epoch: Instant) -> anyhow::Result<Duration> {
    let topic = format!("fanin/{id}");
    let (rd, mut wr) = c.socket.into_split();
    let window = Arc::new(Semaphore::new(s.window as usize));
    let acks = (s.qos == 1).then(|| {
        let window = Arc::clone(&window);
        tokio::spawn(count_acks(rd, c.buf, s.messages_per_publisher, window))
    });
    let mut out = BytesMut::with_capacity(WRITE_BATCH + s.payload_bytes + 64);
    let started = Instant::now();
    let mut seq = 0;
    while seq < s.messages_per_publisher {
        let left = s.messages_per_publisher - seq;
        // At a fixed rate: only what is due by now, else wait until the next one is.
        let due = match s.rate {
            Some(rate) => {
                let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                if due <= seq {
                    let next = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(next.into()).await;
                    continue;
                }
                (due - seq).min(left)
            }
            None => left,
        };
        let mut room = due;
        if s.qos == 1 {
            // Only this task takes permits: what is available now stays available.
            let k = (window.available_permits().max(1) as u64).min(due);
            window.acquire_many(k as u32).await?.forget();
            room = k;
        }
        let now = epoch.elapsed().as_nanos() as u64;
        let wall_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros();
        let mut used = 0;
        while used < room && out.len() < WRITE_BATCH {
            let pkid = (seq % 65_535) as u16 + 1;
            mqtt::put_publish(
                &mut out,
                &topic,
                s.qos,
                pkid,
                s.payload_bytes,
                |p| match s.payload {
                    Payload::Stamp => {
                        p[..4].copy_from_slice(&id.to_be_bytes());
                        p[4..12].copy_from_slice(&seq.to_be_bytes());
                        p[12..20].copy_from_slice(&now.to_be_bytes());
                    }
                    Payload::Json => {
                        let temp = (seq % 400) as f64 / 10.0;
                        let json = format!(r#"{{"seq":{seq},"sent_us":{wall_us},"temp":{temp}}}"#);
                        p[..json.len()].copy_from_slice(json.as_bytes());
                        p[json.len()..].fill(b' ');
                    }
                },
            );
            seq += 1;
            used += 1;
        }
        if s.qos == 1 && used < room {
            // The batch filled before the permits ran out: give the rest back.
            window.add_permits((room - used) as usize);
        }
        wr.write_all(&out).await?;
        out.clear();
    }
    if let Some(acks) = acks {
        acks.await??;
    }
    Ok(epoch.elapsed())
}

/// Reads a QoS 1 publisher's PUBACKs, returning each to the window, until `n` came.
async fn count_acks(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    n: u64,
    window: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let mut acked = 0;
    while acked < n {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        if rd.read_buf(&mut buf).await? == 0 {
            bail!("the broker closed a publisher's connection ({acked} of {n} acknowledged)");
        }
        let (mut at, mut now) = (0, 0);
        while let Some(f) = mqtt::frame_at(&buf, at)? {
            ensure!(
                f.kind() == mqtt::PUBACK,
                "publisher got packet {:#x}",
                f.header
            );
            at = f.body.end;
            now += 1;
        }
        buf.advance(at);
        acked += now;
        window.add_permits(now as usize);
    }
    Ok(())
}

/// The subscriber's count: which messages arrived, how often, how late.
struct Tally {
    /// Per publisher, per sequence number: copies received (saturating).
    copies: Vec<Vec<u8>>,
    latencies_ns: Vec<u64>,
    distinct: u64,
    duplicated: u64,
    last_delivery: Duration,
}

impl Tally {
    fn record(&mut self, payload: &[u8], now_ns: u64) -> anyhow::Result<()> {
        ensure!(payload.len() >= STAMP, "short payload");
        let id = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
        let seq = u64::from_be_bytes(payload[4..12].try_into().unwrap()) as usize;
        let sent = u64::from_be_bytes(payload[12..20].try_into().unwrap());
        let copies = self
            .copies
            .get_mut(id)
            .and_then(|c| c.get_mut(seq))
            .with_context(|| format!("message {id}/{seq} was never sent"))?;
        if *copies == 0 {
            self.distinct += 1;
        } else {
            self.duplicated += 1;
        }
        *copies = copies.saturating_add(1);
        self.latencies_ns.push(now_ns.saturating_sub(sent));
        Ok(())
    }

    fn outcome(mut self, sent: u64, published: Duration) -> Outcome {
        self.latencies_ns.sort_unstable();
        let at = |q: f64| {
            let i = ((self.latencies_ns.len() as f64 * q) as usize)
                .min(self.latencies_ns.len().saturating_sub(1));
            Duration::from_nanos(self.latencies_ns.get(i).copied().unwrap_or(0))
        };
        Outcome {
            sent,
            lost: sent - self.distinct,
            duplicated: self.duplicated,
            delivered_per_s: self.distinct as f64 / self.last_delivery.as_secs_f64(),
            published_per_s: sent as f64 / published.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Receives (and, at QoS 1, acknowledges) until every message arrived or none came for
/// `s.stall`.
async fn subscribe(mut c: Client, s: &Scenario, epoch: Instant) -> anyhow::Result<Tally> {
    let per = s.messages_per_publisher as usize;
    let expected = s.messages_per_publisher * s.publishers as u64;
    let mut tally = Tally {
        copies: vec![vec![0; per]; s.publishers as usize],
        latencies_ns: Vec::with_capacity(expected as usize),
        distinct: 0,
        duplicated: 0,
        last_delivery: Duration::ZERO,
    };
    let mut acks = BytesMut::new();
    while tally.distinct < expected {
        if c.buf.capacity() - c.buf.len() < 16 * 1024 {
            c.buf.reserve(64 * 1024);
        }
        match tokio::time::timeout(s.stall, c.socket.read_buf(&mut c.buf)).await {
            Err(_) => break, // stalled: the rest is lost
            Ok(Ok(0)) => bail!("the broker closed the subscriber's connection"),
            Ok(r) => r?,
        };
        let now = epoch.elapsed();
        let mut at = 0;
        while let Some(f) = mqtt::frame_at(&c.buf, at)? {
            ensure!(
                f.kind() == mqtt::PUBLISH,
                "subscriber got packet {:#x}",
                f.header
            );
            let (qos, pkid, payload) = mqtt::parse_publish(f.header, &c.buf[f.body.clone()])?;
            tally.record(payload, now.as_nanos() as u64)?;
            if qos == 1 {
                mqtt::put_puback(&mut acks, pkid);
            }
            at = f.body.end;
        }
        if at > 0 {
            tally.last_delivery = now;
        }
        c.buf.advance(at);
        if !acks.is_empty() {
            c.socket.write_all(&acks).await?;
            acks.clear();
        }
    }
    Ok(tally)
}
