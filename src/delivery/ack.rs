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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What happens when a message is fully settled.
pub trait Settled: Send + Sync + 'static {
    fn settled(&self);
}

struct Shared {
    /// Shares not yet settled. Never reaches zero while a dropped share existed.
    pending: AtomicUsize,
    on_settled: Option<Box<dyn Settled>>,
}

/// One share of a message's settlement. See the module docs.
#[must_use = "dropping an Ack without settle() leaves its message unacknowledged"]
pub struct Ack {
    shared: Option<Arc<Shared>>,
}

impl Ack {
    /// A fresh message's handle; `on_settled` runs once when every share has settled.
    pub fn new(on_settled: impl Settled) -> Self {
        Self::with(Some(Box::new(on_settled)))
    }

    /// A handle with nothing to acknowledge (QoS 0, dry runs).
    pub fn detached() -> Self {
        Self::with(None)
    }

    fn with(on_settled: Option<Box<dyn Settled>>) -> Self {
        Ack {
            shared: Some(Arc::new(Shared {
                pending: AtomicUsize::new(1),
                on_settled,
            })),
        }
    }

    /// Takes this share out, leaving a spent handle in its place (one that settles
    /// nothing: as if already settled).
    pub fn take(&mut self) -> Ack {
        Ack {
            shared: self.shared.take(),
        }
    }

    /// Another share of the same message, to hand to another sink or record.
    pub fn part(&self) -> Ack {
        let shared = self.shared.as_ref().expect("Ack used after settle");
        shared.pending.fetch_add(1, Ordering::AcqRel);
        Ack {
            shared: Some(Arc::clone(shared)),
        }
    }

    /// Gives this share back; the last one fires the callback.
    pub fn settle(mut self) {
        if let Some(shared) = self.shared.take()
            && shared.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(cb) = &shared.on_settled
        {
            cb.settled();
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pending = self
            .shared
            .as_ref()
            .map(|s| s.pending.load(Ordering::Relaxed));
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
