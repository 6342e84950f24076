//! The receiving end's count, for every mode: per publisher and sequence number, how many
//! copies arrived (lost: none; duplicated: more than one), the latency of each arrival
//! (send time → arrival, on the tool's one clock) and when the first and the last came.

use std::time::Duration;

use anyhow::Context;

pub struct Tally {
    /// Per publisher, per sequence number: copies received (saturating).
    copies: Vec<Vec<u8>>,
    latencies_ns: Vec<u64>,
    /// Messages that arrived at least once.
    pub distinct: u64,
    /// Arrivals after the first of a message.
    pub duplicated: u64,
    /// The first arrival, as time since the run's start.
    pub first: Option<Duration>,
    /// The latest arrival, as time since the run's start.
    pub last: Duration,
}

/// Latency quantiles of the arrivals.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Tally {
    pub fn new(publishers: usize, per_publisher: usize) -> Tally {
        Tally {
            copies: vec![vec![0; per_publisher]; publishers],
            latencies_ns: Vec::with_capacity(publishers * per_publisher),
            distinct: 0,
            duplicated: 0,
            first: None,
            last: Duration::ZERO,
        }
    }

    /// One arrival of message `seq` of publisher `id`, sent at `sent_ns` and received at
    /// `now_ns` (both since the run's start).
    pub fn record(
        &mut self,
        id: usize,
        seq: usize,
        sent_ns: u64,
        now_ns: u64,
    ) -> anyhow::Result<()> {
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
        self.latencies_ns.push(now_ns.saturating_sub(sent_ns));
        let now = Duration::from_nanos(now_ns);
        self.first = Some(self.first.map_or(now, |f| f.min(now)));
        self.last = self.last.max(now);
        Ok(())
    }

    /// Of `sent` messages, those that never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.distinct)
    }

    /// p50, p99 and max of the latencies recorded so far.
    pub fn latency(&mut self) -> Latency {
        self.latencies_ns.sort_unstable();
        let at = |q: f64| {
            let i = ((self.latencies_ns.len() as f64 * q) as usize)
                .min(self.latencies_ns.len().saturating_sub(1));
            Duration::from_nanos(self.latencies_ns.get(i).copied().unwrap_or(0))
        };
        Latency {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}
