//! The delivery loop around every sink: take records from the sink's bounded queue,
//! group them into batches, write, retry transient failures with backoff, split a batch
//! that fails permanently until the bad records are isolated, dead-letter those, and
//! settle each record's share of its message only once it is written or dead-lettered.
//!
//! A sink with `concurrency: N` runs N lanes, each with its own queue and loop; a record's
//! lane is chosen by its topic, so the records of one topic are written in order.

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::retry::{Backoff, RetryConfig};
use super::{BatchConfig, Common, Delivery, ErrorKind, Origin, Sink, SinkError};
use crate::delivery::Ack;

/// Where records that cannot be delivered go.
#[derive(Clone)]
pub struct DeadLetter {
    /// The dead-letter sink's queue; None: log and drop (no `dead_letter:` configured).
    pub queue: Option<SinkQueue>,
}

/// The way into a running sink: its lanes' bounded queues.
#[derive(Clone)]
pub struct SinkQueue {
    lanes: Arc<[mpsc::Sender<Delivery>]>,
}

impl SinkQueue {
    /// Queues a record on its topic's lane, waiting while the lane is full
    /// (backpressure). Gives the record back when the sink has stopped.
    pub async fn send(&self, d: Delivery) -> Result<(), Delivery> {
        let lane = if self.lanes.len() == 1 {
            0
        } else {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.origin.topic.hash(&mut h);
            (h.finish() % self.lanes.len() as u64) as usize
        };
        self.lanes[lane].send(d).await.map_err(|e| e.0)
    }
}

/// Starts a sink's lanes on `tracker`; they end once every [`SinkQueue`] clone is dropped
/// and the queues are drained.
pub fn spawn(
    name: Arc<str>,
    sink: Arc<dyn Sink>,
    common: Common,
    dead_letter: DeadLetter,
    tracker: &TaskTracker,
) -> SinkQueue {
    let lanes = common.concurrency.max(1);
    let limiter = common
        .rate_limit
        .and_then(|r| NonZeroU32::new(r.per_second))
        .map(|n| Arc::new(RateLimiter::direct(Quota::per_second(n))));
    let driver = Arc::new(Driver {
        name,
        sink,
        batch: common.batch,
        retry: common.retry,
        dead_letter,
        limiter,
    });
    let per_lane = (common.queue / lanes).max(1);
    let senders: Vec<_> = (0..lanes)
        .map(|_| {
            let (tx, rx) = mpsc::channel(per_lane);
            tracker.spawn(Arc::clone(&driver).run(rx));
            tx
        })
        .collect();
    SinkQueue {
        lanes: senders.into(),
    }
}

/// One sink's delivery loop (shared by its lanes).
struct Driver {
    name: Arc<str>,
    sink: Arc<dyn Sink>,
    batch: BatchConfig,
    retry: RetryConfig,
    dead_letter: DeadLetter,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

impl Driver {
    /// Runs one lane until its queue is closed and drained.
    async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<Delivery>) {
        let mut batch = Vec::with_capacity(self.batch.max_rows.min(4096));
        while let Some(first) = queue.recv().await {
            batch.push(first);
            self.fill(&mut queue, &mut batch).await;
            self.deliver(std::mem::take(&mut batch)).await;
        }
        tracing::debug!(sink = %self.name, "sink queue closed, driver done");
    }

    /// Takes whatever is queued, then waits up to `max_wait` for more, up to `max_rows`.
    async fn fill(&self, queue: &mut mpsc::Receiver<Delivery>, batch: &mut Vec<Delivery>) {
        let max = self.batch.max_rows.max(1);
        let deadline = Instant::now() + self.batch.max_wait.0;
        while batch.len() < max {
            match queue.try_recv() {
                Ok(d) => batch.push(d),
                Err(mpsc::error::TryRecvError::Disconnected) => return,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, queue.recv()).await {
                        Ok(Some(d)) => batch.push(d),
                        Ok(None) | Err(_) => return,
                    }
                }
            }
        }
    }

    /// Delivers one batch to the end: written, or dead-lettered, record by record.
    async fn deliver(&self, batch: Vec<Delivery>) {
        // Work list of sub-batches still to write; a permanently failing one is halved.
        let mut pending = vec![batch];
        while let Some(part) = pending.pop() {
            match self.write_with_retries(&part).await {
                Ok(()) => part.into_iter().for_each(|d| d.ack.settle()),
                Err((err, attempts, _)) if err.kind == ErrorKind::Permanent && part.len() > 1 => {
                    tracing::debug!(sink = %self.name, rows = part.len(), attempts, error = %err, "batch failed permanently, splitting");
                    let mut left = part;
                    let right = left.split_off(left.len() / 2);
                    pending.push(right);
                    pending.push(left);
                }
                Err((err, attempts, first_attempt)) => {
                    for d in part {
                        self.dead_letter(d, &err, attempts, first_attempt).await;
                    }
                }
            }
        }
    }

    /// Waits until the rate limit allows `n` more records.
    async fn pace(&self, n: usize) {
        let Some(limiter) = &self.limiter else { return };
        let mut left = n as u32;
        while left > 0 {
            // A burst holds at most one second's worth; wait for larger batches in steps.
            let mut step = left;
            loop {
                let Some(k) = NonZeroU32::new(step) else {
                    return;
                };
                match limiter.until_n_ready(k).await {
                    Ok(()) => break,
                    Err(governor::InsufficientCapacity(cap)) => step = cap,
                }
            }
            left -= step;
        }
    }

    /// Writes with retries; on failure returns the last error, the attempts made and when
    /// the first one started.
    async fn write_with_retries(
        &self,
        part: &[Delivery],
    ) -> Result<(), (SinkError, u32, jiff::Timestamp)> {
        self.pace(part.len()).await;
        let first_attempt = jiff::Timestamp::now();
        let mut backoff = Backoff::new(self.retry);
        loop {
            let err = match self.sink.write(part).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if err.kind == ErrorKind::Permanent {
                return Err((err, backoff.attempts + 1, first_attempt));
            }
            match backoff.next_delay(err.retry_after) {
                Some(delay) => {
                    tracing::warn!(sink = %self.name, rows = part.len(), attempt = backoff.attempts, retry_in = ?delay, error = %err, "write failed, will retry");
                    tokio::time::sleep(delay).await;
                }
                None => return Err((err, backoff.attempts, first_attempt)),
            }
        }
    }

    async fn dead_letter(
        &self,
        d: Delivery,
        err: &SinkError,
        attempts: u32,
        first_attempt: jiff::Timestamp,
    ) {
        let failure = Failure {
            sink: Some(&self.name),
            kind: err.kind,
            error: &err.message,
            attempts,
            first_attempt,
        };
        self.dead_letter
            .send(d.origin, &d.record, failure, d.ack)
            .await;
    }
}

/// Why a record or message is dead-lettered.
pub struct Failure<'a> {
    /// The sink that failed; None when the rule itself failed.
    pub sink: Option<&'a str>,
    pub kind: ErrorKind,
    pub error: &'a str,
    pub attempts: u32,
    /// When the first attempt started (the last one is "now", when the letter is made).
    pub first_attempt: jiff::Timestamp,
}

impl DeadLetter {
    /// Sends a dead letter carrying `ack`, which settles once the letter is written.
    /// Without a dead-letter sink the failure is logged and the message settled.
    pub async fn send(
        &self,
        origin: Arc<Origin>,
        record: &serde_json::Value,
        failure: Failure<'_>,
        ack: Ack,
    ) {
        let Some(queue) = &self.queue else {
            tracing::error!(sink = failure.sink, rule = %origin.rule, topic = %origin.topic, error = %failure.error, "message dropped: it failed and no dead_letter sink is configured");
            ack.settle();
            return;
        };
        let letter = Delivery {
            record: dead_letter_record(&origin, record, &failure),
            origin,
            ack,
        };
        if let Err(lost) = queue.send(letter).await {
            // The dead-letter driver is gone (shutdown): leave the message unsettled so
            // the broker redelivers it.
            tracing::warn!(topic = %lost.origin.topic, "dead-letter queue closed; message left unacknowledged");
            drop(lost.ack);
        }
    }
}

/// The record written to the dead-letter sink (DESIGN.md §4): the original message, the
/// rule, the sink, the error and the attempt count.
pub fn dead_letter_record(
    origin: &Origin,
    record: &serde_json::Value,
    f: &Failure<'_>,
) -> serde_json::Value {
    let (payload, encoding) = crate::rule::payload_text(&origin.payload);
    serde_json::json!({
        "message_id": origin.id,
        "topic": origin.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "qos": origin.qos,
        "retain": origin.retain,
        "source": &*origin.source,
        "rule": &*origin.rule,
        "sink": f.sink,
        "error_kind": f.kind,
        "error": f.error,
        "attempts": f.attempts,
        "first_attempt_at": crate::rule::rfc3339(f.first_attempt),
        "last_attempt_at": crate::rule::rfc3339(jiff::Timestamp::now()),
        "record": record,
        "received_at": crate::rule::rfc3339(origin.received_at),
    })
}
