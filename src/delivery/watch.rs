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

use bytestring::ByteString;

use super::Ack;

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
    entries: VecDeque<Option<(Instant, ByteString)>>,
    /// Entries below this number were already reported.
    reported: u64,
}

impl Watch {
    /// Tracks messages, given as their topic and their ack, from now until the ack's
    /// message settles (the ack tells the watch itself: see [`Ack::settle`]). One lock and
    /// one clock reading for the lot.
    pub fn track<'a>(
        self: &Arc<Self>,
        msgs: impl IntoIterator<Item = (&'a ByteString, &'a mut Ack)>,
    ) {
        let now = Instant::now();
        let mut w = self.inner.lock().expect("watch lock");
        for (topic, ack) in msgs {
            let entry = w.base + w.entries.len() as u64;
            w.entries.push_back(Some((now, topic.clone())));
            ack.watched(self, entry);
        }
    }

    /// Entry `seq`'s message has settled.
    pub(super) fn settle(&self, seq: u64) {
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
    pub fn overdue(&self, after: Duration) -> Vec<(ByteString, Duration)> {
        let now = Instant::now();
        let mut w = self.inner.lock().expect("watch lock");
        let from = w.reported.max(w.base);
        let mut out = Vec::new();
        let mut reported = from;
        for entry in w.entries.iter().skip((from - w.base) as usize) {
            match entry {
                Some((at, _)) if now.duration_since(*at) <= after => break,
                Some((at, topic)) => out.push((topic.clone(), now.duration_since(*at))),
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
        let [mut a, mut b, mut c] = [ack(), ack(), ack()];
        watch.track([
            (&ByteString::from("t/a"), &mut a),
            (&ByteString::from("t/b"), &mut b),
            (&ByteString::from("t/c"), &mut c),
        ]);
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
        let mut d = ack();
        watch.track([(&ByteString::from("t/d"), &mut d)]);
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

    #[test]
    fn a_message_settles_for_the_watch_when_its_last_part_does() {
        let watch = Arc::new(Watch::default());
        let settled = Arc::new(AtomicUsize::new(0));
        let mut ack = Ack::new(Count(Arc::clone(&settled)));
        let mut detached = Ack::detached();
        watch.track([
            (&ByteString::from("t/a"), &mut ack),
            (&ByteString::from("t/b"), &mut detached),
        ]);
        let part = ack.part();
        ack.settle();
        assert!(watch.oldest().is_some(), "one part is still out");
        part.settle();
        assert_eq!(settled.load(Ordering::SeqCst), 1);
        let overdue: Vec<String> = watch
            .overdue(Duration::ZERO)
            .into_iter()
            .map(|(t, _)| t.to_string())
            .collect();
        assert_eq!(overdue, ["t/b"], "a detached message is watched too");
        detached.settle();
        assert!(watch.oldest().is_none(), "nothing in flight");
    }
}
