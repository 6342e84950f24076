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
                        if self.sink.already_written(&d) {
                            d.ack.settle();
                        } else {
                            self.dead_letter(d, &err, attempts, first_attempt).await;
                        }
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

#[cfg(test)]
mod tests {
    //! The driver's logic against a scripted in-memory sink: retries, splitting, lanes,
    //! dead letters and settlement. (The real sinks have their own tests against real
    //! services in tests/e2e.)

    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::delivery::Settled;
    use crate::sink::{RateLimit, retry::RetryConfig};

    /// Records what was written; fails per a script.
    #[derive(Default)]
    struct Scripted {
        written: Mutex<Vec<(String, i64)>>,
        /// Fail the first N write calls with a transient error.
        transient_failures: AtomicUsize,
        /// Records with this seq fail permanently (and take their batch with them).
        poison: Option<i64>,
        /// Random-ish delay per write, to shuffle lanes.
        jitter: bool,
        /// A record with this seq never gets through (transiently), while the rest of its
        /// batch does, and the sink remembers them (like the webhook's requests).
        stuck: Option<i64>,
    }

    impl Sink for Scripted {
        fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                if self.jitter {
                    tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 2000)).await;
                }
                if self.transient_failures.load(Ordering::SeqCst) > 0 {
                    self.transient_failures.fetch_sub(1, Ordering::SeqCst);
                    return Err(SinkError::transient("connection refused"));
                }
                if batch.iter().any(|d| Some(seq(d)) == self.poison) {
                    return Err(SinkError::permanent("constraint violated"));
                }
                let mut w = self.written.lock().unwrap();
                for d in batch {
                    let record = (d.origin.topic.clone(), seq(d));
                    if Some(record.1) != self.stuck && !w.contains(&record) {
                        w.push(record);
                    }
                }
                match batch.iter().any(|d| Some(seq(d)) == self.stuck) {
                    true => Err(SinkError::transient("503 for one request")),
                    false => Ok(()),
                }
            })
        }

        fn already_written(&self, d: &Delivery) -> bool {
            let record = (d.origin.topic.clone(), seq(d));
            self.written.lock().unwrap().contains(&record)
        }
    }

    impl Scripted {
        /// The seqs written so far, in write order.
        fn seqs(&self) -> Vec<i64> {
            self.written
                .lock()
                .unwrap()
                .iter()
                .map(|(_, s)| *s)
                .collect()
        }
    }

    /// The record's `seq`, also inside a dead letter.
    fn seq(d: &Delivery) -> i64 {
        d.record
            .pointer("/seq")
            .or(d.record.pointer("/record/seq"))
            .and_then(|v| v.as_i64())
            .unwrap()
    }

    struct Count(Arc<AtomicUsize>);
    impl Settled for Count {
        fn settled(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn delivery(topic: &str, seq: i64, settled: &Arc<AtomicUsize>) -> Delivery {
        Delivery {
            ack: Ack::new(Count(Arc::clone(settled))),
            ..Delivery::detached(topic, json!({ "seq": seq }))
        }
    }

    fn common(concurrency: usize, rate: Option<u32>) -> Common {
        Common {
            batch: BatchConfig {
                max_rows: 16,
                max_wait: crate::config::units::Duration(Duration::from_millis(1)),
            },
            retry: RetryConfig {
                initial_delay: crate::config::units::Duration(Duration::from_millis(1)),
                max_delay: crate::config::units::Duration(Duration::from_millis(5)),
                ..RetryConfig::default()
            },
            queue: 64,
            concurrency,
            rate_limit: rate.map(|per_second| RateLimit { per_second }),
        }
    }

    /// Runs `records` through a driver over `sink`; returns the seqs dead-lettered.
    async fn run(sink: Arc<Scripted>, common: Common, records: Vec<Delivery>) -> Vec<i64> {
        let tracker = TaskTracker::new();
        let dead: Arc<Scripted> = Arc::default();
        let dlq = spawn(
            Arc::from("dlq"),
            dead.clone(),
            Common {
                concurrency: 1,
                ..common
            },
            DeadLetter { queue: None },
            &tracker,
        );
        let queue = spawn(
            Arc::from("s"),
            sink,
            common,
            DeadLetter { queue: Some(dlq) },
            &tracker,
        );
        for d in records {
            assert!(queue.send(d).await.is_ok());
        }
        drop(queue);
        tracker.close();
        tracker.wait().await;
        dead.seqs()
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_everything_settles_once_in_order() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            transient_failures: AtomicUsize::new(5),
            ..Scripted::default()
        });
        let records = (0..100).map(|i| delivery("a", i, &settled)).collect();
        run(Arc::clone(&sink), common(1, None), records).await;
        let written = sink.seqs();
        assert_eq!(written, (0..100).collect::<Vec<_>>());
        assert_eq!(settled.load(Ordering::SeqCst), 100);
    }

    #[tokio::test]
    async fn a_permanent_failure_is_isolated_and_the_rest_is_written() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            poison: Some(37),
            ..Scripted::default()
        });
        let records = (0..64).map(|i| delivery("a", i, &settled)).collect();
        let dead = run(Arc::clone(&sink), common(1, None), records).await;
        assert_eq!(dead, vec![37]);
        let written = sink.seqs();
        assert_eq!(written.len(), 63);
        assert!(!written.contains(&37));
        // The dead-lettered record settles too, once its letter is written.
        assert_eq!(settled.load(Ordering::SeqCst), 64);
    }

    #[tokio::test]
    async fn giving_up_dead_letters_only_what_was_not_written() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            stuck: Some(7),
            ..Scripted::default()
        });
        let mut c = common(1, None);
        c.retry.max_attempts = 3;
        let records = (0..10).map(|i| delivery("a", i, &settled)).collect();
        let dead = run(Arc::clone(&sink), c, records).await;
        assert_eq!(dead, vec![7], "only the record that never got through");
        assert_eq!(sink.seqs().len(), 9, "each of the others written once");
        assert_eq!(settled.load(Ordering::SeqCst), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lanes_keep_each_topic_in_order() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            jitter: true,
            transient_failures: AtomicUsize::new(3),
            ..Scripted::default()
        });
        let records = (0..400)
            .map(|i| delivery(&format!("t{}", i % 7), i, &settled))
            .collect();
        run(Arc::clone(&sink), common(4, None), records).await;
        let mut per_topic: HashMap<String, Vec<i64>> = HashMap::new();
        for (topic, seq) in sink.written.lock().unwrap().iter() {
            per_topic.entry(topic.clone()).or_default().push(*seq);
        }
        assert_eq!(per_topic.len(), 7);
        for (topic, seqs) in per_topic {
            let mut sorted = seqs.clone();
            sorted.sort();
            assert_eq!(seqs, sorted, "topic {topic} out of order");
        }
        assert_eq!(settled.load(Ordering::SeqCst), 400);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_rate_limit_paces_writes() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink: Arc<Scripted> = Arc::default();
        let records = (0..150).map(|i| delivery("a", i, &settled)).collect();
        let started = std::time::Instant::now();
        run(Arc::clone(&sink), common(1, Some(100)), records).await;
        // A burst of 100, then 50 more at 100/s: at least half a second.
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(settled.load(Ordering::SeqCst), 150);
    }
}
