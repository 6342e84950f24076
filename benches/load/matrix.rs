//! Broker mode: the fan-in scenario at each QoS and number of idle connections, on each
//! broker, `runs` times, interleaved (run 1 of every cell, then run 2, …) so that a
//! machine busy with something else slows every cell alike. Each measurement gets a
//! freshly started broker; with idle connections, its RSS is read before and after they
//! connect. Prints each measurement as it ends, then a table of medians [min–max] with
//! the embedded broker's ratio to Mosquitto; with `--csv PATH`, every measurement as a
//! CSV line too.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::brokers::{Broker, Kind, Programs};
use crate::fanin::{self, Outcome, Scenario};
use crate::flags::Flags;
use crate::idle::IdleConnections;

pub struct Matrix {
    pub brokers: Vec<Kind>,
    pub qos: Vec<u8>,
    pub idle: Vec<usize>,
    pub runs: usize,
    /// The scenario's QoS is replaced by each of `qos`.
    pub scenario: Scenario,
    pub idle_per_process: usize,
    pub programs: Programs,
    /// Where to write every measurement as CSV (`--csv`), for `scripts/plot-bench.py`.
    pub csv: Option<PathBuf>,
}

impl Matrix {
    /// `fanin` flags; defaults are the scenario (4 publishers → 1 subscriber,
    /// 100-byte payloads) at a size that runs in seconds.
    pub fn parse(mut flags: Flags) -> Matrix {
        let mut m = Matrix {
            brokers: vec![Kind::Embedded, Kind::Mosquitto],
            qos: vec![0, 1],
            idle: vec![0],
            runs: 3,
            scenario: Scenario::default(),
            idle_per_process: 6_000,
            programs: Programs::default(),
            csv: None,
        };
        let mut messages = 200_000;
        while let Some(flag) = flags.next_flag() {
            match flag.as_str() {
                "--brokers" => m.brokers = flags.list(&flag),
                "--qos" => m.qos = flags.list(&flag),
                "--idle" => m.idle = flags.list(&flag),
                "--runs" => m.runs = flags.value(&flag),
                "--messages" => messages = flags.value(&flag),
                "--publishers" => m.scenario.publishers = flags.value(&flag),
                "--payload-bytes" => m.scenario.payload_bytes = flags.value(&flag),
                "--window" => m.scenario.window = flags.value(&flag),
                "--stall" => m.scenario.stall = Duration::from_secs(flags.value(&flag)),
                "--idle-per-process" => m.idle_per_process = flags.value(&flag),
                "--mqbridge" => m.programs.mqbridge = flags.value::<String>(&flag).into(),
                "--mosquitto" => m.programs.mosquitto = flags.value::<String>(&flag).into(),
                "--csv" => m.csv = Some(flags.value::<String>(&flag).into()),
                other => panic!("unknown flag {other}"),
            }
        }
        m.scenario.messages_per_publisher = messages / m.scenario.publishers as u64;
        m
    }

    /// Every measurement, in the order taken.
    pub async fn run(&self) -> anyhow::Result<Vec<Measurement>> {
        let mut all = Vec::new();
        for run in 1..=self.runs {
            for &idle in &self.idle {
                for &qos in &self.qos {
                    for &broker in &self.brokers {
                        let m = self.measure(broker, qos, idle).await?;
                        println!("run {run}: {}", m.line());
                        all.push((run, m));
                    }
                }
            }
        }
        if let Some(path) = &self.csv {
            write_csv(path, &all)?;
        }
        Ok(all.into_iter().map(|(_, m)| m).collect())
    }

    async fn measure(&self, kind: Kind, qos: u8, idle: usize) -> anyhow::Result<Measurement> {
        let broker = Broker::start(kind, &self.programs).await?;
        let rss_before = broker.rss_kib()?;
        let held = IdleConnections::open(broker.addr, idle, self.idle_per_process).await?;
        let rss_idle = broker.rss_kib()?;
        let scenario = Scenario {
            qos,
            ..self.scenario.clone()
        };
        let outcome = fanin::run(broker.addr, &scenario).await?;
        drop(held);
        Ok(Measurement {
            broker: kind,
            qos,
            idle,
            outcome,
            rss_before_kib: rss_before,
            rss_idle_kib: rss_idle,
        })
    }
}

pub struct Measurement {
    pub broker: Kind,
    pub qos: u8,
    pub idle: usize,
    pub outcome: Outcome,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
}

impl Measurement {
    /// RSS the idle connections added, per connection (KiB).
    fn rss_per_idle_kib(&self) -> Option<f64> {
        (self.idle > 0)
            .then(|| (self.rss_idle_kib as f64 - self.rss_before_kib as f64) / self.idle as f64)
    }

    fn line(&self) -> String {
        let o = &self.outcome;
        let mut s = format!(
            "{:9} QoS {} idle {:>6}: {:>9.0} msg/s delivered ({:.0} published), {}",
            self.broker.name(),
            self.qos,
            self.idle,
            o.delivered_per_s,
            o.published_per_s,
            o.counts(),
        );
        if let Some(per) = self.rss_per_idle_kib() {
            let _ = write!(
                s,
                "; RSS {} → {} KiB: {per:.2} KiB per idle connection",
                self.rss_before_kib, self.rss_idle_kib
            );
        }
        s
    }
}

/// One line per measurement (run number, cell, and what `line` prints).
fn write_csv(path: &Path, all: &[(usize, Measurement)]) -> anyhow::Result<()> {
    let mut out = String::from(
        "broker,qos,idle,run,msg_per_s,published_per_s,lost,duplicated,p50_ms,p99_ms,max_ms,rss_per_idle_kib\n",
    );
    for (run, m) in all {
        let o = &m.outcome;
        let _ = writeln!(
            out,
            "{},{},{},{run},{:.0},{:.0},{},{},{:.3},{:.3},{:.3},{}",
            m.broker.name(),
            m.qos,
            m.idle,
            o.delivered_per_s,
            o.published_per_s,
            o.lost,
            o.duplicated,
            ms(o.p50),
            ms(o.p99),
            ms(o.max),
            m.rss_per_idle_kib()
                .map(|k| format!("{k:.2}"))
                .unwrap_or_default(),
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median, min and max.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// A markdown table: one row per broker and cell, medians [min–max] of the runs, and the
/// embedded broker's rate as a multiple of Mosquitto's (medians).
pub fn summary(all: &[Measurement]) -> String {
    let mut cells: Vec<(usize, u8)> = all.iter().map(|m| (m.idle, m.qos)).collect();
    cells.sort();
    cells.dedup();
    let mut out = String::from(
        "| idle | QoS | broker | msg/s delivered | lost | dup | p50 ms | p99 ms | KiB per idle conn | × mosquitto |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (idle, qos) in cells {
        let median_rate = |kind| {
            let v: Vec<f64> = all
                .iter()
                .filter(|m| m.idle == idle && m.qos == qos && m.broker == kind)
                .map(|m| m.outcome.delivered_per_s)
                .collect();
            (!v.is_empty()).then(|| spread(v).0)
        };
        let mosquitto = median_rate(Kind::Mosquitto);
        for kind in [Kind::Embedded, Kind::Mosquitto] {
            let runs: Vec<&Measurement> = all
                .iter()
                .filter(|m| m.idle == idle && m.qos == qos && m.broker == kind)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let fmt = |f: &dyn Fn(&Measurement) -> f64, digits: usize| {
                let (med, min, max) = spread(runs.iter().map(|m| f(m)).collect());
                format!("{med:.digits$} [{min:.digits$}–{max:.digits$}]")
            };
            let ratio = match (median_rate(kind), mosquitto) {
                (Some(a), Some(b)) if kind == Kind::Embedded => format!("{:.2}", a / b),
                _ => String::new(),
            };
            let per_idle = if idle > 0 {
                fmt(&|m| m.rss_per_idle_kib().unwrap_or(0.0), 2)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {idle} | {qos} | {} | {} | {} | {} | {} | {} | {per_idle} | {ratio} |",
                kind.name(),
                fmt(&|m| m.outcome.delivered_per_s, 0),
                runs.iter().map(|m| m.outcome.lost).sum::<u64>(),
                runs.iter().map(|m| m.outcome.duplicated).sum::<u64>(),
                fmt(&|m| ms(m.outcome.p50), 2),
                fmt(&|m| ms(m.outcome.p99), 2),
            );
        }
    }
    out
}
