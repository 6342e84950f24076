//! Abuse: the embedded broker serving the fan-in (`fanin`'s publishers and subscriber,
//! the healthy clients) while hostile clients run beside it, against the same fan-in on
//! the same config without them: run by run, interleaved, each on a fresh broker. The
//! hostile clients, each connecting again as soon as it is closed:
//! - **slowloris**: a CONNECT written a byte every `--drip`; `connect_timeout` closes it;
//! - **tricklers**: past their CONNECT (3.1.1, no keepalive), a PUBLISH written a byte
//!   every `--drip`; 1.5 × `max_keepalive` closes it;
//! - **non-readers**: subscribers of the fan-in's topics (QoS 0) that never read, and
//!   send a PINGREQ every `--drip`; `send_timeout` closes them once their socket is full;
//! - **flooders**: QoS 0 PUBLISHes to a topic nobody subscribes to, as fast as TCP takes
//!   them. A flood is not closed: it is served at the pace its connection is read.
//!
//! Reported per run: the fan-in's delivered msg/s, lost, duplicated and latency; the
//! broker's peak RSS (sampled every 100 ms); and the connections it closed by each
//! deadline (`mqbridge_broker_connections_timed_out_total`, from its admin API).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::brokers::{self, Broker, Programs, free_port};
use crate::fanin::{self, Outcome, Scenario};
use crate::flags::Flags;
use crate::matrix::{ms, spread};
use crate::mqtt::{self, Client};

/// The admin API's token in the generated config (loopback only, a throwaway process).
const TOKEN: &str = "abuse-bench";

pub struct Args {
    pub runs: usize,
    pub scenario: Scenario,
    pub hostile: Hostile,
    /// `embedded:` settings of both variants.
    pub max_queued: usize,
    pub connect_timeout_s: u64,
    pub send_timeout_s: u64,
    pub max_keepalive_s: u64,
    /// `max_publish_rate`; 0: none.
    pub max_publish_rate: f64,
    pub programs: Programs,
}

/// How many hostile clients of each kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hostile {
    pub slowloris: usize,
    pub tricklers: usize,
    pub non_readers: usize,
    pub flooders: usize,
    pub drip: Duration,
}

impl Args {
    pub fn parse(mut flags: Flags) -> Args {
        let mut a = Args {
            runs: 3,
            scenario: Scenario {
                qos: 1,
                ..Scenario::default()
            },
            hostile: Hostile {
                slowloris: 200,
                tricklers: 200,
                non_readers: 20,
                flooders: 1,
                drip: Duration::from_millis(500),
            },
            max_queued: 100_000,
            connect_timeout_s: 2,
            send_timeout_s: 5,
            max_keepalive_s: 2,
            max_publish_rate: 0.0,
            programs: Programs::default(),
        };
        let mut messages = 200_000;
        while let Some(flag) = flags.next_flag() {
            match flag.as_str() {
                "--runs" => a.runs = flags.value(&flag),
                "--messages" => messages = flags.value(&flag),
                "--qos" => a.scenario.qos = flags.value(&flag),
                "--publishers" => a.scenario.publishers = flags.value(&flag),
                "--rate" => a.scenario.rate = Some(flags.value(&flag)),
                "--slowloris" => a.hostile.slowloris = flags.value(&flag),
                "--tricklers" => a.hostile.tricklers = flags.value(&flag),
                "--non-readers" => a.hostile.non_readers = flags.value(&flag),
                "--flooders" => a.hostile.flooders = flags.value(&flag),
                "--drip-ms" => a.hostile.drip = Duration::from_millis(flags.value(&flag)),
                "--max-queued" => a.max_queued = flags.value(&flag),
                "--send-timeout" => a.send_timeout_s = flags.value(&flag),
                "--max-publish-rate" => a.max_publish_rate = flags.value(&flag),
                "--mqbridge" => a.programs.mqbridge = flags.value::<String>(&flag).into(),
                other => panic!("unknown flag {other}"),
            }
        }
        a.scenario.messages_per_publisher = messages / a.scenario.publishers as u64;
        a
    }
}

pub struct Measurement {
    /// With the hostile clients.
    pub abused: bool,
    pub outcome: Outcome,
    pub peak_rss_kib: u64,
    /// Closed by `connect_timeout`, the keepalive, `send_timeout`.
    pub timed_out: [u64; 3],
    /// Connections the hostile clients opened, each kind.
    pub hostile_connections: [u64; 4],
}

impl Measurement {
    pub fn line(&self) -> String {
        let o = &self.outcome;
        let mut s = format!(
            "{}: {:.0} msg/s delivered, {}; peak RSS {} KiB",
            if self.abused { "abused" } else { "clean " },
            o.delivered_per_s,
            o.counts(),
            self.peak_rss_kib,
        );
        if self.abused {
            let [c, k, w] = self.timed_out;
            let [sl, tr, nr, fl] = self.hostile_connections;
            let _ = write!(
                s,
                "; timed out: connect {c}, keepalive {k}, send {w}; hostile connections: \
                 slowloris {sl}, tricklers {tr}, non-readers {nr}, flooders {fl}"
            );
        }
        s
    }
}

/// Every measurement, clean and abused in turn, `runs` times.
pub async fn run(a: &Args) -> anyhow::Result<Vec<Measurement>> {
    let mut all = Vec::new();
    for run in 1..=a.runs {
        for abused in [false, true] {
            let m = measure(a, abused).await?;
            println!("run {run}: {}", m.line());
            all.push(m);
        }
    }
    Ok(all)
}

async fn measure(a: &Args, abused: bool) -> anyhow::Result<Measurement> {
    let admin = free_port()?;
    let settings = format!(
        "  max_queued_messages: {}\n  connect_timeout: {}s\n  send_timeout: {}s\n  \
         max_keepalive: {}s\n  max_publish_rate: {}\n",
        a.max_queued, a.connect_timeout_s, a.send_timeout_s, a.max_keepalive_s, a.max_publish_rate
    );
    let broker = Broker::bridge_with(&a.programs, &settings, |_| {
        format!("admin:\n  listen: 127.0.0.1:{admin}\n  token: {TOKEN}\n")
    })
    .await?;
    let peak = Arc::new(AtomicU64::new(broker.rss_kib()?));
    let sampler = tokio::spawn(sample_rss(broker.pid(), Arc::clone(&peak)));
    let hostile = if abused {
        a.hostile
    } else {
        Hostile::default()
    };
    let clients = Hostiles::start(broker.addr, hostile);
    // Let them take their places (the non-readers subscribed) before the fan-in starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcome = fanin::run(broker.addr, &a.scenario).await;
    let hostile_connections = clients.stop();
    sampler.abort();
    let outcome = outcome.with_context(|| broker.log())?;
    let timed_out = timed_out(admin).await?;
    Ok(Measurement {
        abused,
        outcome,
        peak_rss_kib: peak.load(Relaxed),
        timed_out,
        hostile_connections,
    })
}

async fn sample_rss(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        if let Ok(kib) = brokers::rss_kib(pid) {
            peak.fetch_max(kib, Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `mqbridge_broker_connections_timed_out_total` by `timeout`: connect, keepalive, send.
async fn timed_out(admin: u16) -> anyhow::Result<[u64; 3]> {
    // HTTP/1.0 by hand: one request, the answer read to its close.
    let mut socket = TcpStream::connect(("127.0.0.1", admin)).await?;
    let request = format!("GET /metrics HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut text = String::new();
    socket.read_to_string(&mut text).await?;
    anyhow::ensure!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "GET /metrics: {}",
        text.lines().next().unwrap_or_default()
    );
    let count = |label: &str| {
        let series = format!("mqbridge_broker_connections_timed_out_total{{timeout=\"{label}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {series} in /metrics"))
    };
    Ok([count("connect")?, count("keepalive")?, count("send")?])
}

/// The hostile clients' tasks, and the connections each kind opened.
struct Hostiles {
    tasks: Vec<JoinHandle<()>>,
    opened: Arc<[AtomicU64; 4]>,
}

#[derive(Clone, Copy)]
enum Kind {
    Slowloris,
    Trickler,
    NonReader,
    Flooder,
}

impl Hostiles {
    fn start(broker: SocketAddr, h: Hostile) -> Hostiles {
        let opened: Arc<[AtomicU64; 4]> = Arc::default();
        let mut tasks = Vec::new();
        for (kind, n) in [
            (Kind::Slowloris, h.slowloris),
            (Kind::Trickler, h.tricklers),
            (Kind::NonReader, h.non_readers),
            (Kind::Flooder, h.flooders),
        ] {
            for i in 0..n {
                let opened = Arc::clone(&opened);
                tasks.push(tokio::spawn(async move {
                    loop {
                        opened[kind as usize].fetch_add(1, Relaxed);
                        // Whatever ends a connection (the broker closing it, mostly), the
                        // client comes back.
                        let _ = hostile(broker, kind, i, h.drip).await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
            }
        }
        Hostiles { tasks, opened }
    }

    fn stop(self) -> [u64; 4] {
        for t in &self.tasks {
            t.abort();
        }
        std::array::from_fn(|k| self.opened[k].load(Relaxed))
    }
}

/// One connection of a hostile client, until the broker closes it.
async fn hostile(broker: SocketAddr, kind: Kind, i: usize, drip: Duration) -> anyhow::Result<()> {
    let id = format!("hostile-{}-{i}", kind as usize);
    match kind {
        Kind::Slowloris => {
            let mut connect = BytesMut::new();
            mqtt::put_connect(&mut connect, &id, 0);
            let socket = TcpStream::connect(broker).await?;
            trickle(socket, &connect, drip).await
        }
        Kind::Trickler => {
            let c = Client::connect(broker, &id, 0).await?;
            let mut publish = BytesMut::new();
            mqtt::put_publish(&mut publish, &"trickle/".repeat(16), 0, 0, 64, |p| {
                p.fill(b'x')
            });
            trickle(c.socket, &publish, drip).await
        }
        Kind::NonReader => {
            let mut c = Client::connect(broker, &id, 0).await?;
            c.subscribe("fanin/#", 0).await?;
            // Never reads; a PINGREQ now and then finds out when the broker has closed.
            loop {
                tokio::time::sleep(drip).await;
                c.socket.write_all(&[0xC0, 0]).await?;
            }
        }
        Kind::Flooder => {
            let mut c = Client::connect(broker, &id, 0).await?;
            let mut flood = BytesMut::new();
            while flood.len() < 64 << 10 {
                mqtt::put_publish(&mut flood, &format!("flood/{i}"), 0, 0, 100, |p| {
                    p.fill(b'f')
                });
            }
            loop {
                c.socket.write_all(&flood).await?;
            }
        }
    }
}

/// Writes `bytes` one at a time, `drip` apart, until the broker closes the connection
/// (then Ok) or all but the last are written (then holds on, sending nothing more).
async fn trickle(mut socket: TcpStream, bytes: &[u8], drip: Duration) -> anyhow::Result<()> {
    socket.set_nodelay(true)?;
    let mut at = 0;
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            r = socket.read(&mut sink) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(drip), if at + 1 < bytes.len() => {
                socket.write_all(&bytes[at..=at]).await?;
                at += 1;
            }
        }
    }
}

/// A table of medians [min–max]: clean and abused, and abused as a share of clean.
pub fn summary(all: &[Measurement]) -> String {
    let mut out = String::from(
        "| variant | msg/s delivered | × clean | lost | dup | p50 ms | p99 ms | peak RSS MiB | timed out: connect · keepalive · send |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let median_rate = |abused: bool| {
        let v = all
            .iter()
            .filter(|m| m.abused == abused)
            .map(|m| m.outcome.delivered_per_s)
            .collect();
        spread(v).0
    };
    let clean = median_rate(false);
    for abused in [false, true] {
        let runs: Vec<&Measurement> = all.iter().filter(|m| m.abused == abused).collect();
        let fmt = |f: &dyn Fn(&Measurement) -> f64, digits: usize| {
            let (med, min, max) = spread(runs.iter().map(|m| f(m)).collect());
            format!("{med:.digits$} [{min:.digits$}–{max:.digits$}]")
        };
        let timeouts = (0..3)
            .map(|i| fmt(&|m| m.timed_out[i] as f64, 0))
            .collect::<Vec<_>>()
            .join(" · ");
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {timeouts} |",
            if abused { "abused" } else { "clean" },
            fmt(&|m| m.outcome.delivered_per_s, 0),
            median_rate(abused) / clean,
            runs.iter().map(|m| m.outcome.lost).sum::<u64>(),
            runs.iter().map(|m| m.outcome.duplicated).sum::<u64>(),
            fmt(&|m| ms(m.outcome.p50), 2),
            fmt(&|m| ms(m.outcome.p99), 2),
            fmt(&|m| m.peak_rss_kib as f64 / 1024.0, 1),
        );
    }
    out
}
