//! Which spooled messages have settled: the lowest unsettled record number (the spool's
//! cursor) advances as sinks settle records, which they may do out of order.

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
    /// Settled flags of records `base..base + len`, in dispatch order.
    done: VecDeque<bool>,
}

impl Window {
    pub fn new(base: u64) -> Self {
        Window {
            inner: Mutex::new(Inner {
                base,
                done: VecDeque::new(),
            }),
        }
    }

    /// Every record numbered below this has settled: where a restart resumes.
    pub fn base(&self) -> u64 {
        self.inner.lock().expect("window lock").base
    }

    /// Record `seq`, the next in order, was handed to the pipeline. Records skipped over
    /// (unreadable, see the reader) count as settled: nothing will ever settle them.
    pub fn dispatched(&self, seq: u64) {
        let mut w = self.inner.lock().expect("window lock");
        let mut next = w.base + w.done.len() as u64;
        assert!(seq >= next, "record {seq} dispatched twice");
        while next < seq {
            w.done.push_back(true);
            next += 1;
        }
        w.done.push_back(false);
        w.advance();
    }

    /// Record `seq` has settled (written or dead-lettered by every sink).
    pub fn settle(&self, seq: u64) {
        let mut w = self.inner.lock().expect("window lock");
        let i = seq.checked_sub(w.base).expect("record settled twice") as usize;
        w.done[i] = true;
        w.advance();
    }
}

impl Inner {
    fn advance(&mut self) {
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            self.base += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_stops_at_the_first_unsettled_record() {
        let w = Window::new(10);
        for seq in 10..15 {
            w.dispatched(seq);
        }
        w.settle(12);
        w.settle(11);
        assert_eq!(w.base(), 10);
        w.settle(10);
        assert_eq!(w.base(), 13);
        w.settle(14);
        assert_eq!(w.base(), 13);
        w.settle(13);
        assert_eq!(w.base(), 15);
    }

    #[test]
    fn skipped_records_count_as_settled() {
        let w = Window::new(0);
        w.dispatched(0);
        w.dispatched(5); // 1..5 unreadable
        w.settle(0);
        assert_eq!(w.base(), 5);
        w.settle(5);
        assert_eq!(w.base(), 6);
    }
}
