//! Which spooled messages have settled: the lowest unsettled record number (the spool's
//! cursor) advances as sinks settle records, which they may do out of order. The window
//! also knows when its oldest unsettled message was received: the spool's age.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Settlement of the records handed to the pipeline, in the order they were handed over.
/// Its memory is bounded by the messages in flight (the pipeline's bounded queues).
#[derive(Debug)]
pub struct Window {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every record numbered below this has settled.
    base: u64,
    /// Records `base..base + len`, in dispatch order: None once settled, else when the
    /// message was received.
    pending: VecDeque<Option<jiff::Timestamp>>,
}

impl Window {
    pub fn new(base: u64) -> Self {
        Window {
            inner: Mutex::new(Inner {
                base,
                pending: VecDeque::new(),
            }),
        }
    }

    /// Every record numbered below this has settled: where a restart resumes.
    pub fn base(&self) -> u64 {
        self.inner.lock().expect("window lock").base
    }

    /// When the oldest message handed to the pipeline and not settled was received (None
    /// when all have settled). Records still waiting on disk were received after it.
    pub fn oldest(&self) -> Option<jiff::Timestamp> {
        self.inner
            .lock()
            .expect("window lock")
            .pending
            .front()
            .copied()
            .flatten()
    }

    /// Record `seq`, the next in order, of a message received at `received_at`, was
    /// handed to the pipeline. Records skipped over (unreadable, see the reader) count as
    /// settled: nothing will ever settle them.
    pub fn dispatched(&self, seq: u64, received_at: jiff::Timestamp) {
        let mut w = self.inner.lock().expect("window lock");
        let mut next = w.base + w.pending.len() as u64;
        assert!(seq >= next, "record {seq} dispatched twice");
        while next < seq {
            w.pending.push_back(None);
            next += 1;
        }
        w.pending.push_back(Some(received_at));
        w.advance();
    }

    /// Record `seq` has settled (written or dead-lettered by every sink).
    pub fn settle(&self, seq: u64) {
        let mut w = self.inner.lock().expect("window lock");
        let i = seq.checked_sub(w.base).expect("record settled twice") as usize;
        w.pending[i] = None;
        w.advance();
    }
}

impl Inner {
    fn advance(&mut self) {
        while self.pending.front() == Some(&None) {
            self.pending.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn the_base_stops_at_the_first_unsettled_record() {
        let w = Window::new(10);
        assert_eq!(w.oldest(), None);
        for seq in 10..15 {
            w.dispatched(seq, at(seq as i64));
        }
        assert_eq!(w.oldest(), Some(at(10)));
        w.settle(12);
        w.settle(11);
        assert_eq!(w.base(), 10);
        assert_eq!(w.oldest(), Some(at(10)));
        w.settle(10);
        assert_eq!(w.base(), 13);
        assert_eq!(w.oldest(), Some(at(13)));
        w.settle(14);
        assert_eq!(w.base(), 13);
        w.settle(13);
        assert_eq!(w.base(), 15);
        assert_eq!(w.oldest(), None);
    }

    #[test]
    fn skipped_records_count_as_settled() {
        let w = Window::new(0);
        w.dispatched(0, at(0));
        w.dispatched(5, at(5)); // 1..5 unreadable
        w.settle(0);
        assert_eq!(w.base(), 5);
        assert_eq!(w.oldest(), Some(at(5)));
        w.settle(5);
        assert_eq!(w.base(), 6);
    }
}
