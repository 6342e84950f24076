//! Live tail of a rule: what the router makes of the messages a rule matches, as it
//! happens, for whoever is watching (the admin API's `/api/v1/rules/{name}/tail`, and
//! the dashboard through it).
//!
//! The router offers each outcome (a record, a message filtered out, a failure) to
//! [`Taps::offer`], which costs one atomic load while nobody watches. A watcher's channel
//! is bounded: when it is full the outcome is skipped for that watcher, never waited
//! for: watching never slows delivery down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

/// What became of one matched message, as a watcher sees it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The rule emitted this record (it goes to each of the rule's sinks).
    Record {
        topic: String,
        record: crate::record::Record,
    },
    /// The rule's filter left the message out.
    Filtered { topic: String },
    /// The rule could not process the message: it is dead-lettered.
    Failed { topic: String, error: String },
}

/// One watcher.
struct Tap {
    rule: Arc<str>,
    tx: mpsc::Sender<Event>,
}

/// The watchers of every rule; shared by the router and the admin server.
#[derive(Default)]
pub struct Taps {
    taps: Mutex<Vec<Tap>>,
    /// `taps.len()`, read without the lock on the router's path.
    watching: AtomicUsize,
}

impl Taps {
    /// Starts watching the rule named `rule`; at most `room` events wait unread.
    /// Dropping the receiver stops watching.
    pub fn watch(&self, rule: &str, room: usize) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(room.max(1));
        let mut taps = self.lock();
        taps.push(Tap {
            rule: Arc::from(rule),
            tx,
        });
        self.watching.store(taps.len(), Ordering::Relaxed);
        rx
    }

    /// Whether anyone watches any rule (one atomic load).
    pub fn watched(&self) -> bool {
        self.watching.load(Ordering::Relaxed) > 0
    }

    /// Gives the watchers of `rule` the event `make` builds (built only when someone
    /// watches that rule). Watchers that stopped are forgotten here.
    pub fn offer(&self, rule: &str, make: impl FnOnce() -> Event) {
        if !self.watched() {
            return;
        }
        let mut taps = self.lock();
        taps.retain(|t| !t.tx.is_closed());
        self.watching.store(taps.len(), Ordering::Relaxed);
        let mut watchers = taps.iter().filter(|t| &*t.rule == rule).peekable();
        if watchers.peek().is_none() {
            return;
        }
        let event = make();
        for t in watchers {
            let _ = t.tx.try_send(event.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tap>> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: i64) -> Event {
        Event::Record {
            topic: "t".into(),
            record: serde_json::json!({ "n": n }).into(),
        }
    }

    #[test]
    fn watchers_get_their_rule_only_and_a_full_one_misses_events() {
        let taps = Taps::default();
        assert!(!taps.watched());
        taps.offer("a", || unreachable!("nobody watches"));
        let mut a = taps.watch("a", 2);
        let mut b = taps.watch("b", 8);
        for n in 0..3 {
            taps.offer("a", || record(n));
        }
        taps.offer("b", || Event::Filtered { topic: "t".into() });
        let got: Vec<_> = std::iter::from_fn(|| a.try_recv().ok()).collect();
        assert_eq!(got.len(), 2, "room for two");
        assert!(matches!(&got[1], Event::Record { record, .. } if record["n"] == 1));
        assert!(matches!(b.try_recv(), Ok(Event::Filtered { .. })));
        assert!(b.try_recv().is_err());
    }

    #[test]
    fn a_dropped_watcher_is_forgotten() {
        let taps = Taps::default();
        drop(taps.watch("a", 1));
        assert!(taps.watched());
        taps.offer("other", || unreachable!("nobody watches this rule"));
        assert!(!taps.watched());
    }
}
