//! Acknowledgements in arrival order.
//!
//! MQTT requires a client to send PUBACK/PUBREC in the order the PUBLISH packets arrived,
//! but sinks settle messages out of order (different sinks, batches, retries). The
//! sequencer numbers each arrival, records which have settled, and releases only the
//! settled *prefix*. After a reconnect the old numbers are forgotten ([`AckSequencer::reset`]):
//! the broker redelivers whatever was not acknowledged, and an old packet id must never be
//! acknowledged on a new connection.

use std::collections::VecDeque;

/// Orders acknowledgements; `T` is whatever the client needs to send one.
#[derive(Debug)]
pub struct AckSequencer<T> {
    /// Sequence number of `entries[0]`.
    base: u64,
    /// Arrivals not yet released: the item and whether it has settled.
    entries: VecDeque<(T, bool)>,
}

impl<T> Default for AckSequencer<T> {
    fn default() -> Self {
        AckSequencer {
            base: 0,
            entries: VecDeque::new(),
        }
    }
}

impl<T> AckSequencer<T> {
    /// Records an arrival and returns its sequence number.
    pub fn arrive(&mut self, item: T) -> u64 {
        self.entries.push_back((item, false));
        self.base + self.entries.len() as u64 - 1
    }

    /// Marks `seq` settled; [`AckSequencer::release`] then takes what it releases.
    /// Numbers from before the last reset, or already settled, are ignored.
    pub fn settle(&mut self, seq: u64) {
        let entry = seq
            .checked_sub(self.base)
            .and_then(|index| self.entries.get_mut(index as usize));
        if let Some(entry) = entry {
            entry.1 = true;
        }
    }

    /// Moves the items ready to acknowledge (the settled prefix) to `ready`, in arrival
    /// order: a group settled together is one allocation, not one per item.
    pub fn release(&mut self, ready: &mut Vec<T>) {
        let n = self
            .entries
            .iter()
            .take_while(|(_, settled)| *settled)
            .count();
        ready.reserve(n);
        ready.extend(self.entries.drain(..n).map(|(item, _)| item));
        self.base += n as u64;
    }

    /// Forgets every pending arrival (new connection); later numbers continue upward so
    /// stale settlements cannot match a new arrival.
    pub fn reset(&mut self) {
        self.base += self.entries.len() as u64;
        self.entries.clear();
    }

    /// Forgets the `n` latest arrivals (messages dropped before anyone could settle them);
    /// their numbers are given out again.
    pub fn forget_latest(&mut self, n: usize) {
        self.entries.truncate(self.entries.len().saturating_sub(n));
    }

    /// Arrivals waiting for settlement or for an earlier one.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<T> AckSequencer<T> {
        fn settle_one(&mut self, seq: u64) -> Vec<T> {
            self.settle(seq);
            let mut ready = Vec::new();
            self.release(&mut ready);
            ready
        }
    }

    #[test]
    fn settled_out_of_order_released_in_order() {
        let mut s = AckSequencer::default();
        let a = s.arrive('a');
        let b = s.arrive('b');
        let c = s.arrive('c');
        assert!(s.settle_one(c).is_empty());
        assert!(s.settle_one(b).is_empty());
        assert_eq!(s.settle_one(a), vec!['a', 'b', 'c']);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn partial_prefix() {
        let mut s = AckSequencer::default();
        let seqs: Vec<u64> = "abcd".chars().map(|ch| s.arrive(ch)).collect();
        assert_eq!(s.settle_one(seqs[0]), vec!['a']);
        assert!(s.settle_one(seqs[2]).is_empty());
        assert_eq!(s.settle_one(seqs[1]), vec!['b', 'c']);
        assert_eq!(s.pending(), 1);
        assert!(
            s.settle_one(seqs[1]).is_empty(),
            "settling twice releases nothing"
        );
    }

    #[test]
    fn reset_ignores_stale_settlements() {
        let mut s = AckSequencer::default();
        let old = s.arrive('x');
        s.reset();
        let new = s.arrive('y');
        assert_ne!(old, new);
        assert!(s.settle_one(old).is_empty());
        assert_eq!(s.settle_one(new), vec!['y']);
    }

    #[test]
    fn random_settle_order_always_releases_in_arrival_order() {
        use proptest::prelude::*;
        proptest!(|(order in Just((0u64..50).collect::<Vec<_>>()).prop_shuffle())| {
            let mut s = AckSequencer::default();
            for i in 0..50u64 { s.arrive(i); }
            let mut released = Vec::new();
            for seq in order { released.extend(s.settle_one(seq)); }
            prop_assert_eq!(released, (0..50).collect::<Vec<_>>());
        });
    }
}
