//! Session expiry and delayed wills: the deadlines of offline sessions, in one ordered map
//! the broker owns, and one task (`run`) that sleeps until the first of them.
//!
//! A session losing its connection gets its deadlines ([`Session::detach`]): its end
//! (after its expiry) and its will's (after the will delay, at the latest when the session
//! ends, MQTT 5 §3.1.3.2.2). Its entry here stands for the earlier of the two, so an
//! offline session costs one entry, and a thousand disconnects cost no task at all. The
//! session keeps the [`Key`] of its entry: a reconnect removes it ([`Timers::disarm`])
//! under the lock that attaches the session, and an entry the task takes that is no
//! longer its session's (replaced or removed meanwhile) is ignored.
//!
//! When an entry is due, the task publishes the will if its time has come (or the session
//! ends), removes the session if it has ended, and otherwise arms the session's next
//! deadline.
//!
//! Shutdown: the task ends at `stop`, so that a will is never due while the pipeline
//! drains. Without `persistence` every session ends with the process: the pending wills
//! are published then, to the subscribers and to the rules (whose pipeline still takes
//! messages until `stop` has been seen everywhere). With `persistence` they are saved with
//! their sessions ([`super::store`]) and armed again at the next start, their delay
//! counted from then, as the session expiry is.
//!
//! Locks: [`Timers`]' map is taken inside the broker's state locks (the index, then the
//! sessions), never the other way round; the task takes it alone to find what is due.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::codec::Will;
use super::session::Session;
use crate::source::intake::Handoff;

/// Entries handled under one taking of the state locks: a burst of expiries (a fleet that
/// dropped at once) holds up routing for one batch at a time.
const BATCH: usize = 256;

/// One entry of [`Timers`]: its deadline, made unique by a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    at: Instant,
    seq: u64,
}

/// The deadlines of offline sessions, by client id; see the module docs.
#[derive(Debug, Default)]
pub struct Timers {
    /// Client ids by deadline: one entry per offline session with a deadline.
    due: Mutex<BTreeMap<Key, String>>,
    next_seq: AtomicU64,
    /// Wakes the task when an entry became the first (it sleeps until the first only).
    earlier: Notify,
}

impl Timers {
    /// Sets the entry of `client_id`'s session to the session's next deadline (replacing
    /// the one it had), or removes it when the session has none. Call under the state lock
    /// that holds the session.
    pub fn arm(&self, client_id: &str, session: &mut Session) {
        let Some(at) = session.deadline() else {
            self.disarm(session);
            return;
        };
        let mut due = self.lock();
        if session
            .timer
            .is_some_and(|k| k.at == at && due.contains_key(&k))
        {
            return;
        }
        let key = Key {
            at,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(old) = session.timer.replace(key) {
            due.remove(&old);
        }
        due.insert(key, client_id.to_string());
        let first = due.first_key_value().is_some_and(|(k, _)| *k == key);
        drop(due);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Removes the session's entry (a reconnect, or the session is going away).
    pub fn disarm(&self, session: &mut Session) {
        if let Some(key) = session.timer.take() {
            self.lock().remove(&key);
        }
    }

    /// Offline sessions waiting for a deadline.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first deadline.
    fn first(&self) -> Option<Instant> {
        self.lock().first_key_value().map(|(k, _)| k.at)
    }

    /// Takes up to `max` entries due at `now`, first due first.
    fn take_due(&self, now: Instant, max: usize) -> Vec<(Key, String)> {
        let mut due = self.lock();
        let mut taken = Vec::new();
        while taken.len() < max {
            match due.first_entry() {
                Some(e) if e.key().at <= now => taken.push(e.remove_entry()),
                _ => break,
            }
        }
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, String>> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The broker's timer task: fires deadlines as they pass, until `stop` (see the module
/// docs for what happens to pending wills then). `handoff` takes the wills to the rules.
pub(super) async fn run(shared: std::sync::Arc<Shared>, handoff: Handoff, stop: CancellationToken) {
    let timers = &shared.timers;
    loop {
        let first = timers.first();
        let sleep = async {
            match first {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // An earlier deadline arrived (a permit stored meanwhile counts too).
            _ = timers.earlier.notified() => continue,
            _ = sleep => {}
        }
        fire(&shared, Instant::now(), &handoff);
    }
    if shared.plan.persistence.is_none() {
        let wills: Vec<(String, Box<Will>)> = shared
            .lock()
            .sessions
            .iter_mut()
            .filter_map(|(id, s)| s.take_will(Instant::now(), true).map(|w| (id.clone(), w)))
            .collect();
        if !wills.is_empty() {
            tracing::debug!(
                wills = wills.len(),
                "embedded broker: shutting down without persistence, delayed wills published now"
            );
        }
        for (client_id, will) in wills {
            super::connection::publish_will(&shared, &client_id, will, Some(&handoff));
        }
    }
}

/// Handles every entry due at `now`.
fn fire(shared: &Shared, now: Instant, handoff: &Handoff) {
    loop {
        let due = shared.timers.take_due(now, BATCH);
        if due.is_empty() {
            return;
        }
        let mut wills: Vec<(String, Box<Will>)> = Vec::new();
        {
            let mut state = shared.change();
            for (key, client_id) in due {
                let Some(s) = state.sessions.get_mut(&client_id) else {
                    continue;
                };
                // Replaced (a reconnect, or a later deadline) since it was taken.
                if s.timer != Some(key) || s.link.is_some() {
                    continue;
                }
                s.timer = None;
                let ended = s.ends_at.is_some_and(|t| t <= now);
                if let Some(will) = s.take_will(now, ended) {
                    wills.push((client_id.clone(), will));
                }
                if ended {
                    state.remove_session(&client_id);
                } else {
                    shared.timers.arm(&client_id, s);
                }
            }
        }
        for (client_id, will) in wills {
            super::connection::publish_will(shared, &client_id, will, Some(handoff));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_entry_per_offline_session_replaced_removed_and_taken_when_due() {
        let timers = Timers::default();
        let now = Instant::now();
        let secs = |s: u64| now + Duration::from_secs(s);
        let (mut a, mut b) = (Session::new(10), Session::new(5));
        a.detach(now, None);
        b.detach(now, None);
        timers.arm("a", &mut a);
        timers.arm("b", &mut b);
        assert_eq!((timers.len(), timers.first()), (2, Some(secs(5))));

        // The same deadline keeps its entry; a new one replaces it.
        let first = a.timer;
        timers.arm("a", &mut a);
        assert_eq!((timers.len(), a.timer), (2, first));
        a.detach(secs(1), None);
        timers.arm("a", &mut a);
        assert_eq!(timers.len(), 2);
        assert_ne!(a.timer, first);

        assert!(timers.take_due(secs(4), BATCH).is_empty());
        let due = timers.take_due(secs(11), BATCH);
        let ids: Vec<&str> = due.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(ids, ["b", "a"], "first due first");
        assert_eq!(Some(due[0].0), b.timer);
        assert!(timers.is_empty());

        // Arming after the entry was taken makes a new one; disarming removes it, and
        // one already taken is no longer there to remove.
        timers.arm("b", &mut b);
        assert!(b.timer.is_some() && timers.len() == 1);
        timers.disarm(&mut b);
        assert!(b.timer.is_none() && timers.is_empty());
        timers.disarm(&mut a);
        assert!(timers.is_empty());
    }
}
