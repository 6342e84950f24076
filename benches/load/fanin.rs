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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mqtt::{self, Client};
use crate::publisher::{self, Plan};
use crate::tally::Tally;
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

impl Default for Scenario {
    /// The issue's fan-in: 4 publishers → 1 subscriber, 100-byte payloads, QoS 0, a
    /// window of 100, at a size that runs in seconds.
    fn default() -> Scenario {
        Scenario {
            qos: 0,
            publishers: 4,
            messages_per_publisher: 50_000,
            payload_bytes: 100,
            window: 100,
            stall: Duration::from_secs(10),
            payload: Payload::Stamp,
            rate: None,
        }
    }
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

impl Outcome {
    /// What was lost and duplicated, and the latency, as the run lines print them.
    pub fn counts(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "lost {} of {}, duplicated {}, latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            self.lost,
            self.sent,
            self.duplicated,
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
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
    let mut tally = subscribe(subscriber, s, epoch).await?;
    let published = publishers.finish(s.stall).await?;
    let sent = s.messages_per_publisher * s.publishers as u64;
    let latency = tally.latency();
    Ok(Outcome {
        sent,
        lost: tally.lost(sent),
        duplicated: tally.duplicated,
        delivered_per_s: tally.distinct as f64 / tally.last.as_secs_f64(),
        published_per_s: sent as f64 / published.as_secs_f64(),
        p50: latency.p50,
        p99: latency.p99,
        max: latency.max,
    })
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

/// Publishes the scenario's messages on `fanin/<id>`; returns when the last was written
/// (QoS 0) or acknowledged (QoS 1), as time since `epoch`.
async fn publish(c: Client, id: u32, s: Scenario, epoch: Instant) -> anyhow::Result<Duration> {
    let topic = format!("fanin/{id}");
    let plan = Plan {
        qos: s.qos,
        messages: s.messages_per_publisher,
        window: s.window,
        per_second: s.rate,
    };
    // The wall clock at `epoch`, for the JSON payloads' `sent_us`.
    let epoch_us = (SystemTime::now().duration_since(UNIX_EPOCH)? - epoch.elapsed()).as_micros();
    publisher::publish(c, plan, epoch, move |out, seq, pkid, now| {
        mqtt::put_publish(out, &topic, s.qos, pkid, s.payload_bytes, |p| {
            match s.payload {
                Payload::Stamp => {
                    p[..4].copy_from_slice(&id.to_be_bytes());
                    p[4..12].copy_from_slice(&seq.to_be_bytes());
                    p[12..20].copy_from_slice(&now.to_be_bytes());
                }
                Payload::Json => {
                    let temp = (seq % 400) as f64 / 10.0;
                    let sent_us = epoch_us + (now / 1000) as u128;
                    let json = format!(r#"{{"seq":{seq},"sent_us":{sent_us},"temp":{temp}}}"#);
                    p[..json.len()].copy_from_slice(json.as_bytes());
                    p[json.len()..].fill(b' ');
                }
            }
        });
    })
    .await
}

/// Reads one message's stamp into the tally.
fn record(tally: &mut Tally, payload: &[u8], now_ns: u64) -> anyhow::Result<()> {
    ensure!(payload.len() >= STAMP, "short payload");
    let id = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
    let seq = u64::from_be_bytes(payload[4..12].try_into().unwrap()) as usize;
    let sent = u64::from_be_bytes(payload[12..20].try_into().unwrap());
    tally.record(id, seq, sent, now_ns)
}

/// Receives (and, at QoS 1, acknowledges) until every message arrived or none came for
/// `s.stall`.
async fn subscribe(mut c: Client, s: &Scenario, epoch: Instant) -> anyhow::Result<Tally> {
    let per = s.messages_per_publisher as usize;
    let expected = s.messages_per_publisher * s.publishers as u64;
    let mut tally = Tally::new(s.publishers as usize, per);
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
            record(&mut tally, payload, now.as_nanos() as u64)?;
            if qos == 1 {
                mqtt::put_puback(&mut acks, pkid);
            }
            at = f.body.end;
        }
        c.buf.advance(at);
        if !acks.is_empty() {
            c.socket.write_all(&acks).await?;
            acks.clear();
        }
    }
    Ok(tally)
}
