//! The unsettled-message watchdog: every message the router takes is tracked until it
//! settles (all its records written or dead-lettered), and one that stays unsettled longer
//! than `unsettled_warning` is logged, once, with its topic and age. A message stuck like
//! that holds back every acknowledgement after it (acks go out in order) and, with the
//! spool, the spool's cursor: the log says which one and since when.
//!
//! Tracking is a window in arrival order, like the spool's: admitting a message appends
//! an entry, settling marks it, and the settled prefix is dropped. Its memory is bounded
//! by the messages in flight.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Ack, Settled};

/// Messages in flight, oldest first.
#[derive(Default)]
pub struct Watch {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Number of the first entry.
    base: u64,
    /// Arrival time and topic of each message from `base` on; None once settled.
    entries: VecDeque<Option<(Instant, Arc<str>)>>,
    /// Entries below this number were already reported.
    reported: u64,
}

/// Settles the message's own share once the tracked share settles.
struct Tracked {
    watch: Arc<Watch>,
    seq: u64,
    upstream: Mutex<Option<Ack>>,
}

impl Settled for Tracked {
    fn settled(&self) {
        self.watch.settle(self.seq);
        if let Some(ack) = self.upstream.lock().expect("tracked ack").take() {
            ack.settle();
        }
    }
}

impl Watch {
    /// Tracks messages, given as their topic and their ack (a share, which it takes),
    /// from now until that share would settle; returns, in order, the shares to use in
    /// their place. One lock and one clock reading for the lot.
    pub fn track<'a>(self: &Arc<Self>, msgs: impl IntoIterator<Item = (&'a str, Ack)>) -> Vec<Ack> {
        let now = Instant::now();
        let (first, upstream) = {
            let mut w = self.inner.lock().expect("watch lock");
            let first = w.base + w.entries.len() as u64;
            let upstream: Vec<Ack> = msgs
                .into_iter()
                .map(|(topic, ack)| {
                    w.entries.push_back(Some((now, Arc::from(topic))));
                    ack
                })
                .collect();
            (first, upstream)
        };
        (first..)
            .zip(upstream)
            .map(|(seq, ack)| {
                Ack::new(Tracked {
                    watch: Arc::clone(self),
                    seq,
                    upstream: Mutex::new(Some(ack)),
                })
            })
            .collect()
    }

    fn settle(&self, seq: u64) {
        let mut w = self.inner.lock().expect("watch lock");
        let i = (seq - w.base) as usize;
        w.entries[i] = None;
        while let Some(None) = w.entries.front() {
            w.entries.pop_front();
            w.base += 1;
        }
    }

    /// Messages unsettled for longer than `after` and not reported before, as (topic,
    /// age), oldest first; each is reported once.
    pub fn overdue(&self, after: Duration) -> Vec<(Arc<str>, Duration)> {
        let now = Instant::now();
        let mut w = self.inner.lock().expect("watch lock");
        let from = w.reported.max(w.base);
        let mut out = Vec::new();
        let mut reported = from;
        for entry in w.entries.iter().skip((from - w.base) as usize) {
            match entry {
                Some((at, _)) if now.duration_since(*at) <= after => break,
                Some((at, topic)) => out.push((Arc::clone(topic), now.duration_since(*at))),
                None => {}
            }
            reported += 1;
        }
        w.reported = reported;
        out
    }

    /// How long the oldest unsettled message has waited (None: nothing in flight).
    pub fn oldest(&self) -> Option<Duration> {
        let w = self.inner.lock().expect("watch lock");
        w.entries
            .iter()
            .flatten()
            .next()
            .map(|(at, _)| at.elapsed())
    }

    /// Logs each message unsettled for longer than `after`, checking every `after / 4`
    /// (at most every second), and keeps `mqbridge_source_oldest_unsettled_seconds` up to
    /// date, until cancelled.
    pub async fn run(self: Arc<Self>, after: Duration, stop: tokio_util::sync::CancellationToken) {
        let oldest = metrics::gauge!("mqbridge_source_oldest_unsettled_seconds");
        let mut tick = tokio::time::interval(
            (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            oldest.set(self.oldest().unwrap_or_default());
            for (topic, age) in self.overdue(after) {
                tracing::warn!(%topic, unsettled_for = ?age, "a message is still not settled (its records are neither written nor dead-lettered); it holds back the acknowledgements after it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::delivery::Count;

    #[test]
    fn reports_each_overdue_message_once_and_passes_settlement_on() {
        let watch = Arc::new(Watch::default());
        let settled = Arc::new(AtomicUsize::new(0));
        let ack = || Ack::new(Count(Arc::clone(&settled)));
        let [a, b, c] = watch
            .track([("t/a", ack()), ("t/b", ack()), ("t/c", ack())])
            .try_into()
            .unwrap();
        b.settle();
        assert_eq!(
            settled.load(Ordering::SeqCst),
            1,
            "settling passes on upstream"
        );
        assert!(
            watch.overdue(Duration::from_secs(60)).is_empty(),
            "none is old yet"
        );
        let overdue: Vec<String> = watch
            .overdue(Duration::ZERO)
            .into_iter()
            .map(|(t, _)| t.to_string())
            .collect();
        assert_eq!(overdue, ["t/a", "t/c"], "the settled one is not reported");
        assert!(
            watch.overdue(Duration::ZERO).is_empty(),
            "each is reported once"
        );
        assert!(watch.oldest().is_some());
        a.settle();
        c.settle();
        assert_eq!(settled.load(Ordering::SeqCst), 3);
        assert!(watch.oldest().is_none(), "nothing in flight");
        let [d] = watch.track([("t/d", ack())]).try_into().unwrap();
        assert_eq!(
            watch.overdue(Duration::ZERO).len(),
            1,
            "a new one is reported"
        );
        d.settle();
        assert!(
            watch.inner.lock().unwrap().entries.is_empty(),
            "memory is given back"
        );
    }
}
