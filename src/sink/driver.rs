//! The delivery loop around every sink: take records from the sink's bounded queue,
//! group them into batches, write, retry transient failures with backoff, split a batch
//! that fails permanently until the bad records are isolated, dead-letter those, and
//! settle each record's share of its message only once it is written or dead-lettered.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::retry::{Backoff, RetryConfig};
use super::{BatchConfig, Delivery, ErrorKind, Origin, Sink, SinkError};
use crate::delivery::Ack;

/// Where records that cannot be delivered go.
#[derive(Clone)]
pub struct DeadLetter {
    /// The dead-letter sink's queue; None: log and drop (no `dead_letter:` configured).
    pub queue: Option<mpsc::Sender<Delivery>>,
}

/// A running sink's loop.
pub struct Driver {
    pub name: Arc<str>,
    pub sink: Arc<dyn Sink>,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    pub dead_letter: DeadLetter,
}

impl Driver {
    /// Runs until the queue is closed and drained.
    pub async fn run(self, mut queue: mpsc::Receiver<Delivery>) {
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
                Err((err, attempts)) if err.kind == ErrorKind::Permanent && part.len() > 1 => {
                    tracing::debug!(sink = %self.name, rows = part.len(), attempts, error = %err, "batch failed permanently, splitting");
                    let mut left = part;
                    let right = left.split_off(left.len() / 2);
                    pending.push(right);
                    pending.push(left);
                }
                Err((err, attempts)) => {
                    for d in part {
                        self.dead_letter(d, &err, attempts).await;
                    }
                }
            }
        }
    }

    async fn write_with_retries(&self, part: &[Delivery]) -> Result<(), (SinkError, u32)> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            let err = match self.sink.write(part).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if err.kind == ErrorKind::Permanent {
                return Err((err, backoff.attempts + 1));
            }
            match backoff.next_delay(err.retry_after) {
                Some(delay) => {
                    tracing::warn!(sink = %self.name, rows = part.len(), attempt = backoff.attempts, retry_in = ?delay, error = %err, "write failed, will retry");
                    tokio::time::sleep(delay).await;
                }
                None => return Err((err, backoff.attempts)),
            }
        }
    }

    async fn dead_letter(&self, d: Delivery, err: &SinkError, attempts: u32) {
        let failure = Failure {
            sink: Some(&self.name),
            kind: err.kind,
            error: &err.message,
            attempts,
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
        if let Err(mpsc::error::SendError(lost)) = queue.send(letter).await {
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
        "record": record,
        "received_at": crate::rule::rfc3339(origin.received_at),
        "failed_at": crate::rule::rfc3339(jiff::Timestamp::now()),
    })
}
