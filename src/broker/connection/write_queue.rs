//! The queue of encoded packets from a connection to its writer task: bounded, so that a
//! client that does not read holds at most [`WRITE_QUEUE`](super::WRITE_QUEUE) packets
//! (then the connection's sends wait, and its pump stops pulling the session's queue),
//! and holding memory only while packets wait: its storage grows with what is queued and
//! is released when the writer has written everything. An idle connection's queue is a
//! few words, where a channel would keep a block of slots for its whole life.
//!
//! Many senders (clones), one receiver. The receiver ends once the queue is empty and
//! every sender is gone; a send fails once the receiver is gone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// The writer task is gone: nothing more can be sent.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Closed;

struct Shared {
    state: Mutex<State>,
    /// Wakes the receiver: a packet queued, or the last sender gone.
    queued: Notify,
    /// Wakes a sender waiting for room: a packet taken, or the receiver gone.
    room: Notify,
    bound: usize,
}

struct State {
    packets: VecDeque<Bytes>,
    senders: usize,
    receiver_gone: bool,
}

/// A bounded queue of `bound` packets.
pub(super) fn write_queue(bound: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            packets: VecDeque::new(),
            senders: 1,
            receiver_gone: false,
        }),
        queued: Notify::new(),
        room: Notify::new(),
        bound,
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The lock guards no invariant a panic could break halfway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queues `packet`, waiting while the queue is full.
    pub(super) async fn send(&self, mut packet: Bytes) -> Result<(), Closed> {
        loop {
            match self.try_send(packet) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed) => return Err(Closed),
                Err(TrySendError::Full(p)) => packet = p,
            }
            // A permit stored by `notify_one` since the check above is not lost.
            self.shared.room.notified().await;
        }
    }

    /// Queues `packet` if there is room.
    pub(super) fn try_send(&self, packet: Bytes) -> Result<(), TrySendError> {
        let mut state = self.shared.state();
        if state.receiver_gone {
            return Err(TrySendError::Closed);
        }
        if state.packets.len() >= self.shared.bound {
            return Err(TrySendError::Full(packet));
        }
        state.packets.push_back(packet);
        drop(state);
        self.shared.queued.notify_one();
        Ok(())
    }

    /// Packets that can be queued now without waiting.
    pub(super) fn capacity(&self) -> usize {
        let state = self.shared.state();
        if state.receiver_gone {
            return 0;
        }
        self.shared.bound.saturating_sub(state.packets.len())
    }
}

#[derive(Debug)]
pub(super) enum TrySendError {
    Full(Bytes),
    Closed,
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.state().senders += 1;
        Sender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.shared.queued.notify_one();
        }
    }
}

pub(super) struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// Every packet queued, in order, waiting for one; None once the queue is empty and
    /// every sender is gone. The queue's storage leaves with them, and every waiting
    /// sender may go on (so while the writer writes a batch, up to `bound` more packets
    /// can queue behind it).
    pub(super) async fn recv_all(&mut self) -> Option<VecDeque<Bytes>> {
        loop {
            {
                let mut state = self.shared.state();
                if !state.packets.is_empty() {
                    let packets = std::mem::take(&mut state.packets);
                    drop(state);
                    self.shared.room.notify_waiters();
                    // And a permit for a sender between its check and its wait.
                    self.shared.room.notify_one();
                    return Some(packets);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // Only this receiver waits here: a permit stored since the check is not lost.
            self.shared.queued.notified().await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.receiver_gone = true;
        state.packets = VecDeque::new();
        drop(state);
        // Every waiting sender, and a permit for one about to wait.
        self.shared.room.notify_waiters();
        self.shared.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn packet(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    #[tokio::test]
    async fn packets_come_out_in_order_and_the_receiver_ends_after_the_last_sender() {
        let (tx, mut rx) = write_queue(4);
        let tx2 = tx.clone();
        tx.send(packet(1)).await.unwrap();
        tx2.send(packet(2)).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv_all().await, Some([packet(1), packet(2)].into()));
        tx2.send(packet(3)).await.unwrap();
        drop(tx2);
        assert_eq!(rx.recv_all().await, Some([packet(3)].into()));
        assert_eq!(rx.recv_all().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_makes_the_sender_wait_until_the_writer_takes_its_packets() {
        let (tx, mut rx) = write_queue(2);
        tx.send(packet(1)).await.unwrap();
        tx.try_send(packet(2)).unwrap();
        assert_eq!(tx.capacity(), 0);
        assert!(matches!(tx.try_send(packet(3)), Err(TrySendError::Full(_))));
        let blocked = tokio::spawn(async move {
            tx.send(packet(3)).await.unwrap();
            tx
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!blocked.is_finished(), "the sender waits for room");
        assert_eq!(rx.recv_all().await, Some([packet(1), packet(2)].into()));
        let tx = blocked.await.unwrap();
        assert_eq!(tx.capacity(), 1);
        assert_eq!(rx.recv_all().await, Some([packet(3)].into()));
        assert_eq!(tx.capacity(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_writer_waits_for_packets_and_a_waiting_sender_fails_once_it_is_gone() {
        let (tx, mut rx) = write_queue(1);
        let tx2 = tx.clone();
        let reader = tokio::spawn(async move {
            let first = rx.recv_all().await;
            (first, rx)
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!reader.is_finished(), "the writer waits for a packet");
        tx.send(packet(7)).await.unwrap();
        let (first, rx) = reader.await.unwrap();
        assert_eq!(first, Some([packet(7)].into()));
        tx.send(packet(8)).await.unwrap();
        let blocked = tokio::spawn(async move { tx2.send(packet(9)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(Closed));
        assert!(matches!(tx.try_send(packet(10)), Err(TrySendError::Closed)));
        assert_eq!(tx.capacity(), 0);
    }
}
