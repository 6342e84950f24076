//! Settlement tracking: a message is acknowledged upstream only once every record made
//! from it has been written or dead-lettered.
//!
//! An [`Ack`] is a share of one message's settlement. Cloning it with [`Ack::part`] adds a
//! share; [`Ack::settle`] gives one back; when the last share is settled the message's
//! [`Settled`] callback fires exactly once. A share that is *dropped* without being settled
//! (a task was cancelled mid-write, the process is shutting down) keeps the message
//! unsettled forever, so it is never acknowledged and the broker redelivers it after a
//! restart. Losing an ack is safe; acking early is not.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::Watch;

/// What happens when a message is fully settled.
pub trait Settled: Send + Sync + 'static {
    fn settled(&self);
}

/// A message's settlement, with its callback in the same allocation.
struct Shared<S: ?Sized> {
    /// Shares not yet settled. Never reaches zero while a dropped share existed.
    pending: AtomicUsize,
    /// The watchdog's entry for the message, told first when it settles.
    watched: OnceLock<(Arc<Watch>, u64)>,
    on_settled: S,
}

/// The callback of a message with nothing upstream to acknowledge, once it is watched.
struct Unacknowledged;

impl Settled for Unacknowledged {
    fn settled(&self) {}
}

enum Share {
    /// Settled or taken: it settles nothing, and it has no parts.
    Spent,
    /// Nothing to acknowledge: its parts are detached too (no allocation).
    Detached,
    Of(Arc<Shared<dyn Settled>>),
}

/// One share of a message's settlement. See the module docs.
#[must_use = "dropping an Ack without settle() leaves its message unacknowledged"]
pub struct Ack {
    share: Share,
}

impl Ack {
    /// A fresh message's handle; `on_settled` runs once when every share has settled.
    pub fn new(on_settled: impl Settled) -> Self {
        let shared: Arc<Shared<dyn Settled>> = Arc::new(Shared {
            pending: AtomicUsize::new(1),
            watched: OnceLock::new(),
            on_settled,
        });
        Ack {
            share: Share::Of(shared),
        }
    }

    /// A handle with nothing to acknowledge (QoS 0, dry runs).
    pub fn detached() -> Self {
        Ack {
            share: Share::Detached,
        }
    }

    /// Takes this share out, leaving a spent handle in its place (one that settles
    /// nothing: as if already settled).
    pub fn take(&mut self) -> Ack {
        Ack {
            share: std::mem::replace(&mut self.share, Share::Spent),
        }
    }

    /// Another share of the same message, to hand to another sink or record.
    pub fn part(&self) -> Ack {
        let share = match &self.share {
            Share::Spent => panic!("Ack used after settle"),
            Share::Detached => Share::Detached,
            Share::Of(shared) => {
                shared.pending.fetch_add(1, Ordering::AcqRel);
                Share::Of(Arc::clone(shared))
            }
        };
        Ack { share }
    }

    /// Gives this share back; the last one tells the watchdog, then fires the callback.
    pub fn settle(mut self) {
        if let Share::Of(shared) = std::mem::replace(&mut self.share, Share::Spent)
            && shared.pending.fetch_sub(1, Ordering::AcqRel) == 1
        {
            if let Some((watch, entry)) = shared.watched.get() {
                watch.settle(*entry);
            }
            shared.on_settled.settled();
        }
    }

    /// Has the message's settlement tell `watch` that its entry `entry` settled (in the
    /// same allocation: no wrapper, no lock). A detached handle becomes one with nothing
    /// upstream, so that it can be watched too.
    pub(super) fn watched(&mut self, watch: &Arc<Watch>, entry: u64) {
        if let Share::Detached = self.share {
            *self = Ack::new(Unacknowledged);
        }
        let Share::Of(shared) = &self.share else {
            panic!("Ack used after settle");
        };
        let fresh = shared.watched.set((Arc::clone(watch), entry)).is_ok();
        assert!(fresh, "a message is watched once");
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending = match &self.share {
            Share::Of(shared) => Some(shared.pending.load(Ordering::Relaxed)),
            Share::Spent | Share::Detached => None,
        };
        f.debug_struct("Ack").field("pending", &pending).finish()
    }
}

/// For tests: counts the messages that settled.
#[cfg(test)]
pub(crate) struct Count(pub Arc<AtomicUsize>);

#[cfg(test)]
impl Settled for Count {
    fn settled(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_after_the_last_part() {
        let n = Arc::new(AtomicUsize::new(0));
        let ack = Ack::new(Count(n.clone()));
        let a = ack.part();
        let b = ack.part();
        ack.settle();
        a.settle();
        assert_eq!(n.load(Ordering::SeqCst), 0);
        b.settle();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_part_keeps_the_message_unacknowledged() {
        let n = Arc::new(AtomicUsize::new(0));
        let ack = Ack::new(Count(n.clone()));
        let lost = ack.part();
        drop(lost);
        ack.settle();
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }
}
