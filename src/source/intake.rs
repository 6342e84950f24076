//! The one way in: where every source connection hands its messages to the spool or the
//! pipeline, and learns which of them it may acknowledge.
//!
//! Both sources use it: the external broker's client (one [`Intake`] for its connection)
//! and the embedded broker (one per client connection). An [`Intake`] owns, for one
//! upstream connection:
//! - **settlement reporting and ordered acks**: each QoS 1/2 message gets an
//!   [`Ack`](crate::delivery::Ack) whose settlement is reported back here; [`Intake::released`]
//!   yields the tokens the connection may now acknowledge, in arrival order;
//! - **the hand-off**: a message goes to the [`Handoff`]'s channel at once when there is room.
//!   When there is none, QoS 1/2 messages wait here, in order, and [`Intake::released`] moves
//!   them on as room appears, so the connection's read loop never waits on the pipeline
//!   and keeps answering pings and sending acks meanwhile;
//! - **the QoS 0 policy**: a QoS 0 message that finds the pipeline full (or QoS 1/2
//!   messages already waiting) is dropped and counted, as QoS 0 allows;
//! - **the bound**: a peer that keeps to the window (our receive maximum, or the client's)
//!   cannot make more wait than the window, since nothing waiting has been acknowledged.
//!   One that does not (Mosquitto 2.0 after a session resumes) is held up to a stated
//!   number of bytes; a message past it is an [`Overflow`], and the connection ends (the
//!   messages are delivered again on the next one, as none was acknowledged).
//!
//! The `mqbridge_source_*` metrics of what arrives are counted here (messages received
//! by QoS, QoS 0 dropped, overflows, acknowledgements pending over every connection).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::delivery::{Ack, AckSequencer, Settled};
use crate::message::Message;

/// Where a source's connections hand their messages; cheap to clone.
#[derive(Clone)]
pub struct Handoff {
    out: mpsc::Sender<Message>,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
}

/// The source's metric handles, looked up once.
struct Metrics {
    /// By QoS.
    received: [metrics::Counter; 3],
    dropped_qos0: metrics::Counter,
    overflows: metrics::Counter,
    acks_pending: metrics::Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let received = |qos: &'static str| metrics::counter!("mqbridge_source_messages_received_total", "qos" => qos);
        Metrics {
            received: [received("0"), received("1"), received("2")],
            dropped_qos0: metrics::counter!("mqbridge_source_qos0_dropped_total"),
            overflows: metrics::counter!("mqbridge_source_overflows_total"),
            acks_pending: metrics::gauge!("mqbridge_source_acks_pending"),
        }
    }
}

/// What the hand-off counted, for every connection of a source.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages no one acknowledges (QoS 0, wills) dropped because the pipeline was full.
    pub dropped: AtomicU64,
    /// Connections ended because more than the bound waited for a full pipeline.
    pub overflows: AtomicU64,
}

impl Handoff {
    pub fn new(out: mpsc::Sender<Message>) -> Self {
        Handoff {
            out,
            stats: Arc::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Hands over a message no one acknowledges (QoS 0, a will) if the pipeline has room,
    /// else drops and counts it, as QoS 0 allows.
    pub fn try_hand(&self, mut msg: Message) {
        msg.ack = Ack::detached();
        if let Err(e) = self.out.try_send(msg) {
            if let mpsc::error::TrySendError::Full(_) = e {
                self.dropped();
            }
            e.into_inner().ack.settle();
        }
    }

    fn dropped(&self) {
        self.metrics.dropped_qos0.increment(1);
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "pipeline full: QoS 0 messages dropped");
        }
    }
}

/// More than the bound waited for a full pipeline.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{waiting} messages ({bytes} bytes) waiting for a full pipeline, and no room for more")]
pub struct Overflow {
    pub waiting: usize,
    pub bytes: usize,
}

/// One connection's side of the hand-off; see the module docs. `T` is what the connection
/// needs to acknowledge a message (a packet id and QoS).
pub struct Intake<T> {
    /// None once the source stopped taking messages.
    handoff: Option<Handoff>,
    metrics: Arc<Metrics>,
    /// What this connection last added to `mqbridge_source_acks_pending`.
    pending_reported: usize,
    /// QoS 1/2 messages waiting for room, in arrival order.
    waiting: VecDeque<Message>,
    /// Topic and payload bytes of the waiting messages, and their bound.
    waiting_bytes: usize,
    max_bytes: usize,
    acks: AckSequencer<T>,
    settled: Settlements,
}

/// Where settlements are reported back to their connection: a channel made for the first
/// QoS 1/2 message, so that a connection that never has one (idle, or QoS 0 only) holds
/// none.
#[derive(Default)]
struct Settlements(Option<(mpsc::UnboundedSender<u64>, mpsc::UnboundedReceiver<u64>)>);

impl Settlements {
    fn sender(&mut self) -> &mpsc::UnboundedSender<u64> {
        &self.0.get_or_insert_with(mpsc::unbounded_channel).0
    }

    /// The next settlement reported; pending until there is one. Cancel-safe.
    async fn recv(&mut self) -> Option<u64> {
        match &mut self.0 {
            Some((_, rx)) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    fn try_recv(&mut self) -> Option<u64> {
        self.0.as_mut()?.1.try_recv().ok()
    }
}

struct ReportSettled {
    seq: u64,
    tx: mpsc::UnboundedSender<u64>,
}

impl Settled for ReportSettled {
    fn settled(&self) {
        // A closed channel means the connection is gone: the peer sends it again.
        let _ = self.tx.send(self.seq);
    }
}

impl<T> Intake<T> {
    /// An intake for one connection, holding at most `max_bytes` of messages back. It
    /// takes the hand-off, so that closing it is what closes the pipeline's input.
    pub fn new(handoff: Handoff, max_bytes: usize) -> Self {
        Intake {
            metrics: Arc::clone(&handoff.metrics),
            handoff: Some(handoff),
            pending_reported: 0,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            max_bytes,
            acks: AckSequencer::default(),
            settled: Settlements::default(),
        }
    }

    /// Takes a message (its `ack` is replaced): hands it over, holds it back, or drops it
    /// (QoS 0 only). `token` acknowledges it upstream once it settles (None for QoS 0).
    /// After [`Intake::close`] a message is not taken: it stays unacknowledged, and the
    /// peer sends it again later.
    pub fn offer(&mut self, mut msg: Message, token: Option<T>) -> Result<(), Overflow> {
        let Some(handoff) = &self.handoff else {
            return Ok(());
        };
        self.metrics.received[usize::from(msg.qos.min(2))].increment(1);
        let Some(token) = token else {
            if self.waiting.is_empty() {
                handoff.try_hand(msg);
            } else {
                handoff.dropped(); // behind the waiting ones: there is no room
            }
            return Ok(());
        };
        if !self.waiting.is_empty() && self.waiting_bytes + size(&msg) > self.max_bytes {
            handoff.stats.overflows.fetch_add(1, Ordering::Relaxed);
            handoff.metrics.overflows.increment(1);
            return Err(Overflow {
                waiting: self.waiting.len(),
                bytes: self.waiting_bytes,
            });
        }
        let seq = self.acks.arrive(token);
        // Field by field: `handoff` still borrows self.
        report_pending(
            &self.metrics,
            &mut self.pending_reported,
            self.acks.pending(),
        );
        msg.ack = Ack::new(ReportSettled {
            seq,
            tx: self.settled.sender().clone(),
        });
        if self.waiting.is_empty() {
            match handoff.out.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(msg)) => self.wait(msg),
                // The pipeline is gone (shutting down): never acknowledged.
                Err(mpsc::error::TrySendError::Closed(_)) => self.close(),
            }
        } else {
            self.wait(msg);
        }
        Ok(())
    }

    /// Acknowledges `token` in its turn without handing anything over (a message refused
    /// by the ACL, which the peer must still get an answer for).
    pub fn pass(&mut self, token: T) {
        let seq = self.acks.arrive(token);
        self.report_pending();
        let _ = self.settled.sender().send(seq);
    }

    /// The next tokens to acknowledge, in arrival order. Meanwhile moves waiting messages
    /// on as the pipeline makes room. Cancel-safe: use it as a `select!` branch.
    pub async fn released(&mut self) -> Vec<T> {
        enum Step {
            Settled(u64),
            Room(Option<mpsc::OwnedPermit<Message>>),
        }
        loop {
            let out = (self.handoff.as_ref())
                .filter(|_| !self.waiting.is_empty())
                .map(|h| h.out.clone());
            let moving = out.is_some();
            let step = tokio::select! {
                Some(seq) = self.settled.recv() => Step::Settled(seq),
                // Boxed: made only while messages wait, and this future is part of every
                // embedded-broker connection's task.
                permit = async { Box::pin(out?.reserve_owned()).await.ok() }, if moving => Step::Room(permit),
            };
            match step {
                Step::Settled(seq) => {
                    // With what settled meanwhile: a group the spool synced, or a batch a
                    // sink wrote, settles together and is acknowledged in one write.
                    self.acks.settle(seq);
                    let mut ready = Vec::new();
                    self.take_settled(&mut ready);
                    if !ready.is_empty() {
                        self.report_pending();
                        return ready;
                    }
                }
                Step::Room(Some(permit)) => {
                    let msg = self.waiting.pop_front().expect("a message waits");
                    self.waiting_bytes -= size(&msg);
                    permit.send(msg);
                }
                // The pipeline is gone (shutting down).
                Step::Room(None) => self.close(),
            }
        }
    }

    /// The tokens that settlements already reported release, without waiting: the last
    /// acknowledgements to send when the connection is about to end.
    pub fn released_now(&mut self) -> Vec<T> {
        let mut ready = Vec::new();
        self.take_settled(&mut ready);
        self.report_pending();
        ready
    }

    /// Adds to `ready` what the settlements already reported release.
    fn take_settled(&mut self, ready: &mut Vec<T>) {
        while let Some(seq) = self.settled.try_recv() {
            self.acks.settle(seq);
        }
        self.acks.release(ready);
    }

    /// QoS 1/2 messages taken (handed over or waiting) and not yet released.
    pub fn unacknowledged(&self) -> usize {
        self.acks.pending()
    }

    /// Messages waiting for room in the pipeline.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Stops taking messages (shutdown): the waiting ones are dropped unacknowledged, so
    /// the peer sends them again later; those handed over still settle and are released.
    pub fn close(&mut self) {
        self.handoff = None;
        self.shed();
    }

    /// The hand-off, until [`Intake::close`].
    pub fn handoff(&self) -> Option<&Handoff> {
        self.handoff.as_ref()
    }

    /// Drops the waiting messages unacknowledged (the peer sends them again on its next
    /// connection); those handed over still settle and are released.
    pub fn shed(&mut self) {
        self.acks.forget_latest(self.waiting.len());
        self.forget_waiting();
        self.report_pending();
    }

    /// The connection was lost: forget every pending acknowledgement (an old packet id
    /// must never be acknowledged on a new connection) and the messages still waiting.
    pub fn reset(&mut self) {
        self.acks.reset();
        self.forget_waiting();
        self.report_pending();
    }

    fn report_pending(&mut self) {
        report_pending(
            &self.metrics,
            &mut self.pending_reported,
            self.acks.pending(),
        );
    }

    fn wait(&mut self, msg: Message) {
        self.waiting_bytes += size(&msg);
        self.waiting.push_back(msg);
    }

    fn forget_waiting(&mut self) {
        self.waiting.clear();
        self.waiting_bytes = 0;
    }
}

/// Brings `mqbridge_source_acks_pending` up to date with a connection's count `now`
/// (`reported` is what it added so far).
fn report_pending(metrics: &Metrics, reported: &mut usize, now: usize) {
    let before = std::mem::replace(reported, now);
    if now > before {
        metrics.acks_pending.increment((now - before) as f64);
    } else if now < before {
        metrics.acks_pending.decrement((before - now) as f64);
    }
}

impl<T> Drop for Intake<T> {
    /// The connection is gone: its pending acknowledgements with it.
    fn drop(&mut self) {
        self.metrics
            .acks_pending
            .decrement(self.pending_reported as f64);
    }
}

/// What a waiting message counts against the bound.
fn size(msg: &Message) -> usize {
    msg.topic.len() + msg.payload.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, qos: u8) -> Message {
        Message::detached(topic, "{}", qos)
    }

    /// Receives what was handed over, without waiting.
    fn taken(rx: &mut mpsc::Receiver<Message>) -> Vec<Message> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    async fn released<T>(intake: &mut Intake<T>) -> Vec<T> {
        tokio::time::timeout(std::time::Duration::from_secs(5), intake.released())
            .await
            .expect("released in time")
    }

    #[tokio::test]
    async fn acks_are_released_in_arrival_order_whatever_order_messages_settle_in() {
        let (tx, mut rx) = mpsc::channel(10);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        for i in 0..3 {
            intake.offer(msg("t", 1), Some(i)).unwrap();
        }
        let mut got = taken(&mut rx);
        assert_eq!(got.len(), 3);
        got.pop().unwrap().ack.settle(); // the third
        got.pop().unwrap().ack.settle(); // the second
        let first = got.pop().unwrap();
        // Nothing is released while the first is unsettled.
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), intake.released()).await;
        assert!(early.is_err(), "released before the first settled");
        first.ack.settle();
        assert_eq!(released(&mut intake).await, vec![0, 1, 2]);
        assert_eq!(intake.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn a_full_pipeline_holds_qos1_back_in_order_and_drops_qos0() {
        let (tx, mut rx) = mpsc::channel(1);
        let handoff = Handoff::new(tx);
        let mut intake = Intake::new(handoff.clone(), 1000);
        intake.offer(msg("a", 1), Some(0)).unwrap(); // fills the channel
        intake.offer(msg("b", 1), Some(1)).unwrap(); // waits
        intake.offer(msg("c", 0), None).unwrap(); // dropped: the pipeline is full
        intake.offer(msg("d", 1), Some(2)).unwrap(); // waits, behind b
        assert_eq!(intake.waiting(), 2);
        assert_eq!(handoff.stats().dropped.load(Ordering::Relaxed), 1);

        // As the pipeline makes room, released() moves the waiting messages on, in order.
        let mut order = Vec::new();
        while order.len() < 3 {
            tokio::select! {
                m = rx.recv() => {
                    let m = m.unwrap();
                    order.push(m.topic.to_string());
                    m.ack.settle();
                }
                tokens = intake.released() => assert!(!tokens.is_empty()),
            }
        }
        assert_eq!(order, ["a", "b", "d"]);
        assert_eq!(intake.waiting(), 0);
    }

    #[tokio::test]
    async fn more_waiting_than_the_bound_is_an_overflow() {
        let (tx, _rx) = mpsc::channel(1);
        let handoff = Handoff::new(tx);
        // Each message is 3 bytes (topic "t", payload "{}").
        let mut intake = Intake::new(handoff.clone(), 7);
        for i in 0..3 {
            intake.offer(msg("t", 1), Some(i)).unwrap(); // 1 handed over, 2 waiting
        }
        assert_eq!(
            intake.offer(msg("t", 1), Some(3)),
            Err(Overflow {
                waiting: 2,
                bytes: 6
            })
        );
        assert_eq!(handoff.stats().overflows.load(Ordering::Relaxed), 1);
        // QoS 0 never overflows: it is dropped.
        intake.offer(msg("t", 0), None).unwrap();
    }

    #[tokio::test]
    async fn after_close_nothing_is_taken_but_what_was_taken_is_still_released() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        intake.offer(msg("a", 1), Some("a")).unwrap();
        intake.offer(msg("b", 1), Some("b")).unwrap(); // waits
        intake.close();
        assert_eq!(intake.waiting(), 0, "waiting messages are dropped");
        intake.offer(msg("c", 1), Some("c")).unwrap();
        let got = taken(&mut rx);
        assert_eq!(got.len(), 1);
        got.into_iter().next().unwrap().ack.settle();
        assert_eq!(released(&mut intake).await, vec!["a"]);
        // b was dropped and c never taken: neither is ever acknowledged.
        assert_eq!(intake.unacknowledged(), 0);
        // The pipeline's input is closed, so it can drain and finish.
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn shedding_drops_what_waits_and_still_releases_what_was_handed_over() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        for i in 0..3 {
            intake.offer(msg("t", 1), Some(i)).unwrap(); // 1 handed over, 2 waiting
        }
        intake.shed();
        assert_eq!((intake.waiting(), intake.unacknowledged()), (0, 1));
        taken(&mut rx).pop().unwrap().ack.settle();
        assert_eq!(released(&mut intake).await, vec![0]);
        // Later arrivals are handed over and released as usual.
        intake.offer(msg("t", 1), Some(7)).unwrap();
        taken(&mut rx).pop().unwrap().ack.settle();
        assert_eq!(released(&mut intake).await, vec![7]);
        assert_eq!(intake.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn settlements_already_reported_are_released_without_waiting() {
        let (tx, mut rx) = mpsc::channel(10);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        for i in 0..3 {
            intake.offer(msg("t", 1), Some(i)).unwrap();
        }
        let mut got = taken(&mut rx);
        got.remove(0).ack.settle();
        got.remove(0).ack.settle();
        assert_eq!(intake.released_now(), vec![0, 1]);
        assert_eq!(intake.released_now(), Vec::<i32>::new());
        assert_eq!(intake.unacknowledged(), 1);
    }

    #[tokio::test]
    async fn what_settled_together_is_released_together() {
        let (tx, mut rx) = mpsc::channel(10);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        for i in 0..3 {
            intake.offer(msg("t", 1), Some(i)).unwrap();
        }
        // In arrival order, as a synced group or a written batch settles: each one alone
        // would release itself.
        for m in taken(&mut rx) {
            m.ack.settle();
        }
        assert_eq!(released(&mut intake).await, vec![0, 1, 2]);
        assert_eq!(intake.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn after_a_reset_settlements_of_the_old_connection_release_nothing() {
        let (tx, mut rx) = mpsc::channel(10);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        intake.offer(msg("old", 1), Some("old")).unwrap();
        let old = taken(&mut rx).pop().unwrap();
        intake.reset();
        intake.offer(msg("new", 1), Some("new")).unwrap();
        old.ack.settle();
        taken(&mut rx).pop().unwrap().ack.settle();
        assert_eq!(released(&mut intake).await, vec!["new"]);
    }

    #[tokio::test]
    async fn a_passed_token_is_acknowledged_in_its_turn() {
        let (tx, mut rx) = mpsc::channel(10);
        let mut intake = Intake::new(Handoff::new(tx), 1000);
        intake.offer(msg("a", 1), Some("a")).unwrap();
        intake.pass("refused");
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), intake.released()).await;
        assert!(
            early.is_err(),
            "the refused one waits for the earlier message"
        );
        taken(&mut rx).pop().unwrap().ack.settle();
        let mut all = released(&mut intake).await;
        if all.len() < 2 {
            all.extend(released(&mut intake).await);
        }
        assert_eq!(all, vec!["a", "refused"]);
    }
}
