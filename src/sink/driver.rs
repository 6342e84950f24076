//! The delivery loop around every sink: take records from the sink's bounded queue,
//! group them into batches, write, and settle each record's share of its message only
//! once it is written or dead-lettered.
//!
//! **Retries are per record.** The sink reports an [`Outcome`] for each record. What was
//! delivered settles; what failed permanently is dead-lettered at once; what failed
//! transiently is written again in the next round, in order, after a backoff that starts
//! over whenever a round delivered something. Each record counts its own attempts and
//! elapsed time against `retry:`, so a record is given up on only when *its* budget is
//! spent, however its neighbours fare. Records a sink held back to keep a topic in order
//! go again without counting an attempt.
//!
//! **Panics are caught at the lane.** A panic in a sink's write is logged with the sink,
//! rule and topic; the batch is halved until the record that panics is alone, the others
//! are written, and that record is tried [`PANIC_ATTEMPTS`] times in all, then
//! dead-lettered with `error_kind: "panic"`. The lane keeps running.
//!
//! A sink with `concurrency: N` runs N lanes, each with its own queue and loop; a record's
//! lane is chosen by its topic, so the records of one topic are written in order.
//!
//! **Health and metrics** are kept here, where the writes happen: a sink is healthy
//! unless its last write round failed transiently (it cannot reach its destination, or
//! the destination is failing: it is retrying); a round that wrote anything makes it
//! healthy again, and permanent failures (bad records) leave it as it was. Its
//! `mqbridge_sink_*` metrics are labelled with the sink's configured name.

use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytestring::ByteString;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::queue::{self, LaneQueue, SinkQueue};
use super::retry::{self, Backoff};
use super::{Delivery, ErrorKind, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::{BatchConfig, Common, RetryConfig};
use crate::delivery::Ack;
use crate::health::Status;
use crate::record::Record;

/// Attempts in all for a record whose write panics, whatever `retry:` says (a panic is a
/// bug; retrying without end would stall its lane for good).
pub const PANIC_ATTEMPTS: u32 = 3;

/// Where records that cannot be delivered go. Every clone is the same target, which a
/// config reload may [`DeadLetter::set`]: sink drivers that keep running then dead-letter
/// to the new sink; the old one ends once its queue is drained and no sender holds it.
#[derive(Clone, Default)]
pub struct DeadLetter {
    /// The dead-letter sink's queue; None: log and drop (no `dead_letter:` configured).
    /// Locked only to clone or replace the queue, never across an `.await`.
    target: Arc<std::sync::RwLock<Option<SinkQueue>>>,
    /// The latest letters, for `/api/v1/dead-letters`.
    recent: Arc<Recent>,
}

/// The latest dead letters (at most [`Recent::KEPT`]), newest last; dropped ones (no
/// dead-letter sink) too, since their reason is all that is left of them. Each has the
/// id a dead-letter file's line of it has ([`letter_id`]), and remembers being replayed.
#[derive(Default)]
pub struct Recent(std::sync::Mutex<std::collections::VecDeque<Kept>>);

struct Kept {
    id: String,
    letter: serde_json::Value,
    replayed_at: Option<jiff::Timestamp>,
}

impl Recent {
    pub const KEPT: usize = 100;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Kept>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, letter: serde_json::Value) {
        let kept = Kept {
            id: letter_id(&letter.to_string()),
            letter,
            replayed_at: None,
        };
        let mut letters = self.lock();
        if letters.len() == Self::KEPT {
            letters.pop_front();
        }
        letters.push_back(kept);
    }

    /// Up to `n` letters, newest first, each with its `id` and `replayed_at` (null until
    /// [`Recent::mark_replayed`]).
    pub fn latest(&self, n: usize) -> Vec<serde_json::Value> {
        let letters = self.lock();
        letters
            .iter()
            .rev()
            .take(n)
            .map(|k| {
                let mut v = k.letter.clone();
                if let Some(o) = v.as_object_mut() {
                    o.insert("id".into(), k.id.clone().into());
                    let at = k.replayed_at.map(crate::rule::rfc3339);
                    o.insert("replayed_at".into(), at.into());
                }
                v
            })
            .collect()
    }

    /// The letter of this id as it was written (without `id` and `replayed_at`), and
    /// whether it was replayed.
    pub fn get(&self, id: &str) -> Option<(serde_json::Value, bool)> {
        let letters = self.lock();
        let k = letters.iter().find(|k| k.id == id)?;
        Some((k.letter.clone(), k.replayed_at.is_some()))
    }

    /// Notes that the letter of this id was replayed.
    pub fn mark_replayed(&self, id: &str) {
        if let Some(k) = self.lock().iter_mut().find(|k| k.id == id) {
            k.replayed_at = Some(jiff::Timestamp::now());
        }
    }
}

/// The id of a dead letter: hex SHA-256 of its line in a dead-letter file (its JSON,
/// without the line feed), so that the admin API and `mqbridge replay` name it alike.
pub fn letter_id(line: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(line.as_bytes()))
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
    let health = Status::ready();
    let driver = Arc::new(Driver {
        metrics: SinkMetrics::new(&name),
        health: health.clone(),
        name,
        sink,
        batch: common.batch,
        retry: common.retry,
        dead_letter,
        limiter,
    });
    let (queue, lane_queues) = queue::open(lanes, common.queue / lanes, health);
    for lane in lane_queues {
        tracker.spawn(Arc::clone(&driver).run(lane));
    }
    queue
}

/// A sink's metric handles, looked up once.
struct SinkMetrics {
    written: Counter,
    retried: Counter,
    dead_lettered: Counter,
    batch_size: Histogram,
    write_seconds: Histogram,
    healthy: Gauge,
}

impl SinkMetrics {
    fn new(sink: &Arc<str>) -> SinkMetrics {
        let sink = sink.to_string();
        let healthy = metrics::gauge!("mqbridge_sink_healthy", "sink" => sink.clone());
        healthy.set(1.0);
        SinkMetrics {
            written: metrics::counter!("mqbridge_sink_records_written_total", "sink" => sink.clone()),
            retried: metrics::counter!("mqbridge_sink_records_retried_total", "sink" => sink.clone()),
            dead_lettered: metrics::counter!("mqbridge_sink_records_dead_lettered_total", "sink" => sink.clone()),
            batch_size: metrics::histogram!("mqbridge_sink_batch_size", "sink" => sink.clone()),
            write_seconds: metrics::histogram!("mqbridge_sink_write_seconds", "sink" => sink),
            healthy,
        }
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
    metrics: SinkMetrics,
    /// Shared by the lanes: the last round of any lane decides.
    health: Status,
}

/// A record's place in its batch, and its retry budget.
type Placed = (usize, (Delivery, Budget));

/// Splits `pending` into this round (with each record's place in the batch) and the
/// records that wait: those waiting out a Retry-After, and those behind one of their
/// topic that does. A first round (no record waits) is the batch as it is.
fn split_ready(
    pending: Vec<(Delivery, Budget)>,
    now: Instant,
) -> (Vec<usize>, Vec<(Delivery, Budget)>, Vec<Placed>) {
    let ready = |b: &Budget| b.not_before.is_none_or(|t| t <= now);
    if pending.iter().all(|(_, b)| ready(b)) {
        return ((0..pending.len()).collect(), pending, Vec::new());
    }
    let mut waiting_topics: Vec<ByteString> = Vec::new();
    let (mut places, mut round, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
    for (place, (d, b)) in pending.into_iter().enumerate() {
        let topic = &d.origin.topic;
        if ready(&b) && !waiting_topics.contains(topic) {
            places.push(place);
            round.push((d, b));
        } else {
            if !waiting_topics.contains(topic) {
                waiting_topics.push(topic.clone());
            }
            waiting.push((place, (d, b)));
        }
    }
    (places, round, waiting)
}

impl Driver {
    /// Runs one lane until its queue is closed and drained: takes whatever is queued,
    /// then waits up to `max_wait` for more, up to `max_rows`, and delivers that batch.
    async fn run(self: Arc<Self>, mut queue: LaneQueue) {
        let max = self.batch.max_rows.max(1);
        let room = max.min(4096);
        let mut batch = Vec::with_capacity(room);
        while queue.wait().await {
            let deadline = Instant::now() + self.batch.max_wait.0;
            queue.take(&mut batch, max, deadline).await;
            // The next batch has its room at once, not grown record by record.
            let next = Vec::with_capacity(room);
            self.deliver(std::mem::replace(&mut batch, next)).await;
        }
        tracing::debug!(sink = %self.name, "sink queue closed, driver done");
    }

    /// Delivers one batch to the end: each record written, or dead-lettered once its own
    /// retry budget is spent (see the module docs).
    async fn deliver(&self, batch: Vec<Delivery>) {
        self.pace(batch.len()).await;
        let mut backoff = Backoff::new(self.retry);
        // In batch order; a record's place in it is its place in its topic.
        let mut pending: Vec<(Delivery, Budget)> =
            batch.into_iter().map(|d| (d, Budget::default())).collect();
        loop {
            let now = Instant::now();
            let (places, round, waiting) = split_ready(pending, now);
            if round.is_empty() {
                let until = waiting.iter().filter_map(|(_, (_, b))| b.not_before).min();
                tokio::time::sleep_until(until.unwrap_or(now)).await;
                pending = waiting.into_iter().map(|(_, p)| p).collect();
                continue;
            }
            let (records, budgets): (Vec<Delivery>, Vec<Budget>) = round.into_iter().unzip();

            let started = (Instant::now(), jiff::Timestamp::now());
            let outcomes = self.write_round(&records).await;
            self.metrics.batch_size.record(records.len() as f64);
            self.metrics.write_seconds.record(started.0.elapsed());
            let delivered = outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::Delivered))
                .count();
            self.metrics.written.increment(delivered as u64);
            self.judge_health(delivered, &outcomes);
            if delivered > 0 {
                backoff.reset();
            }
            let delay = backoff.next_delay(None);
            let mut again: Vec<(usize, (Delivery, Budget))> = Vec::new();
            let mut example: Option<SinkError> = None;
            let round = places.into_iter().zip(records).zip(budgets).zip(outcomes);
            for (((place, d), mut budget), outcome) in round {
                let e = match outcome {
                    Outcome::Delivered => {
                        d.ack.settle();
                        continue;
                    }
                    Outcome::HeldBack => {
                        again.push((place, (d, budget)));
                        continue;
                    }
                    Outcome::Failed(e) => e,
                };
                budget.attempts += 1;
                let (first, _) = *budget.first.get_or_insert(started);
                // A delay the endpoint asked for holds this record (and its topic) back.
                let wait = e.retry_after.map_or(delay, |asked| asked.max(delay));
                let retry = match e.kind {
                    ErrorKind::Permanent => false,
                    ErrorKind::Transient => {
                        retry::allows(&self.retry, budget.attempts, first.elapsed(), wait)
                    }
                    ErrorKind::Panic => budget.attempts < PANIC_ATTEMPTS,
                };
                if retry {
                    self.metrics.retried.increment(1);
                    budget.not_before = (wait > delay).then(|| Instant::now() + wait);
                    example.get_or_insert(e);
                    again.push((place, (d, budget)));
                } else {
                    self.dead_letter(d, &e, &budget).await;
                }
            }
            again.extend(waiting);
            if again.is_empty() {
                return;
            }
            again.sort_by_key(|&(place, _)| place);
            if let Some(e) = example {
                tracing::warn!(sink = %self.name, records = again.len(), retry_in = ?delay, error = %e, "write failed, will retry");
            }
            tokio::time::sleep(delay).await;
            pending = again.into_iter().map(|(_, p)| p).collect();
        }
    }

    /// One write of `part`, with a panic in the sink caught: the part is halved until the
    /// record that panics is alone (its outcome is then a failure of kind
    /// [`ErrorKind::Panic`]). After a half that did not fully succeed, the next half is held
    /// back, which keeps every topic in order.
    fn write_round<'a>(&'a self, part: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let written = AssertUnwindSafe(self.sink.write(part)).catch_unwind().await;
            let mut outcomes = match written {
                Ok(outcomes) if outcomes.len() == part.len() => outcomes,
                Ok(outcomes) => {
                    let e = format!(
                        "sink bug: {} outcomes for {} records",
                        outcomes.len(),
                        part.len()
                    );
                    tracing::error!(sink = %self.name, "{e}");
                    vec![Outcome::Failed(SinkError::transient(e)); part.len()]
                }
                Err(panic) if part.len() == 1 => {
                    let what = panic_message(&*panic);
                    let o = &part[0].origin;
                    tracing::error!(sink = %self.name, rule = %o.rule, topic = %o.topic, panic = %what, "sink panicked writing a record");
                    vec![Outcome::Failed(SinkError {
                        kind: ErrorKind::Panic,
                        message: format!("sink panicked: {what}"),
                        retry_after: None,
                    })]
                }
                Err(panic) => {
                    tracing::error!(sink = %self.name, records = part.len(), panic = %panic_message(&*panic), "sink panicked writing a batch; writing it in halves to find the record");
                    let (left, right) = part.split_at(part.len() / 2);
                    let mut out = self.write_round(left).await;
                    let clean = out.iter().all(|o| match o {
                        Outcome::Delivered => true,
                        Outcome::Failed(e) => e.kind == ErrorKind::Permanent,
                        Outcome::HeldBack => false,
                    });
                    if clean {
                        out.extend(self.write_round(right).await);
                    } else {
                        out.extend(std::iter::repeat_n(Outcome::HeldBack, right.len()));
                    }
                    out
                }
            };
            // A round that attempts nothing would never end: count it as a failure.
            if outcomes.iter().all(|o| matches!(o, Outcome::HeldBack)) {
                let e = SinkError::transient("sink bug: every record held back");
                outcomes.fill(Outcome::Failed(e));
            }
            outcomes
        })
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

    /// A round that wrote anything makes the sink healthy; one that wrote nothing and
    /// failed transiently (or panicked), unhealthy; permanent failures alone say nothing
    /// about the destination.
    fn judge_health(&self, delivered: usize, outcomes: &[Outcome]) {
        if delivered > 0 {
            if self.health.set_ready() {
                self.metrics.healthy.set(1.0);
                tracing::info!(sink = %self.name, "sink healthy again");
            }
            return;
        }
        let failure = outcomes.iter().find_map(|o| match o {
            Outcome::Failed(e) if e.kind != ErrorKind::Permanent => Some(e),
            _ => None,
        });
        if let Some(e) = failure
            && self
                .health
                .set_not_ready(format!("last write failed: {}", e.message))
        {
            self.metrics.healthy.set(0.0);
        }
    }

    async fn dead_letter(&self, d: Delivery, err: &SinkError, budget: &Budget) {
        self.metrics.dead_lettered.increment(1);
        let failure = Failure {
            sink: Some(&self.name),
            kind: err.kind,
            error: &err.message,
            attempts: budget.attempts,
            first_attempt: budget.first.map_or_else(jiff::Timestamp::now, |(_, at)| at),
        };
        self.dead_letter
            .send(d.origin, &d.record, failure, d.ack)
            .await;
    }
}

/// One record's retry budget.
#[derive(Default, Clone, Copy)]
struct Budget {
    /// Attempts made (a round that held the record back does not count).
    attempts: u32,
    /// When its first attempt started.
    first: Option<(Instant, jiff::Timestamp)>,
    /// Not to be sent before this: the endpoint asked for a longer wait (Retry-After)
    /// than the round's backoff.
    not_before: Option<Instant>,
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
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
    /// No dead-letter sink: failures are logged and dropped. Also what the dead-letter
    /// sink's own driver gets (a separate target that is never set, so the dead-letter
    /// queue never holds itself open).
    pub fn none() -> DeadLetter {
        DeadLetter::default()
    }

    /// The latest letters this target (every clone) took.
    pub fn recent(&self) -> Arc<Recent> {
        Arc::clone(&self.recent)
    }

    /// Dead letters go to `queue`.
    pub fn to(queue: SinkQueue) -> DeadLetter {
        let d = DeadLetter::default();
        d.set(Some(queue));
        d
    }

    /// Sends later dead letters to `queue` (every clone); returns the previous queue.
    pub fn set(&self, queue: Option<SinkQueue>) -> Option<SinkQueue> {
        let mut target = self.target.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *target, queue)
    }

    fn queue(&self) -> Option<SinkQueue> {
        self.target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a dead letter carrying `ack`, which settles once the letter is written.
    /// Without a dead-letter sink the failure is logged and the message settled.
    pub async fn send(&self, origin: Arc<Origin>, record: &Record, failure: Failure<'_>, ack: Ack) {
        let record = dead_letter_record(&origin, record, &failure);
        let Some(queue) = self.queue() else {
            tracing::error!(sink = failure.sink, rule = %origin.rule, topic = %origin.topic, error = %failure.error, "message dropped: it failed and no dead_letter sink is configured");
            let mut dropped = record;
            dropped["dropped"] = true.into();
            self.recent.push(dropped);
            ack.settle();
            return;
        };
        self.recent.push(record.clone());
        let letter = Delivery {
            record: record.into(),
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
pub fn dead_letter_record(origin: &Origin, record: &Record, f: &Failure<'_>) -> serde_json::Value {
    let (payload, encoding) = crate::rule::payload_text(&origin.payload);
    serde_json::json!({
        "message_id": origin.id(),
        "topic": &*origin.topic,
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
    use crate::config::sinks::RateLimit;
    use crate::delivery::Count;

    /// Without a dead-letter sink a failure is still listed (marked dropped), and the
    /// list keeps the latest `Recent::KEPT`, newest first.
    #[tokio::test]
    async fn the_latest_dead_letters_are_kept_newest_first() {
        let dead = DeadLetter::none();
        for i in 0..Recent::KEPT + 5 {
            let d = Delivery::detached(&format!("t/{i}"), json!({"i": i}));
            let failure = Failure {
                sink: Some("db"),
                kind: ErrorKind::Permanent,
                error: "no such column",
                attempts: 1,
                first_attempt: jiff::Timestamp::now(),
            };
            dead.send(d.origin, &d.record, failure, d.ack).await;
        }
        let latest = dead.recent().latest(usize::MAX);
        assert_eq!(latest.len(), Recent::KEPT);
        assert_eq!(latest[0]["topic"], format!("t/{}", Recent::KEPT + 4));
        assert_eq!(latest[Recent::KEPT - 1]["topic"], "t/5");
        assert_eq!(latest[0]["error"], "no such column");
        assert_eq!(latest[0]["dropped"], true);
        assert_eq!(latest[0]["replayed_at"], serde_json::Value::Null);
        assert_eq!(dead.recent().latest(3).len(), 3);
        // The id is the one a dead-letter file's line of the letter has.
        let id = latest[0]["id"].as_str().unwrap();
        let (letter, replayed) = dead.recent().get(id).unwrap();
        assert!(!replayed);
        assert_eq!(letter_id(&letter.to_string()), id);
        dead.recent().mark_replayed(id);
        assert!(dead.recent().get(id).unwrap().1);
        assert_ne!(
            dead.recent().latest(1)[0]["replayed_at"],
            serde_json::Value::Null
        );
    }

    /// Records what was written; fails per a script, record by record where a real sink
    /// can tell records apart.
    #[derive(Default)]
    struct Scripted {
        written: Mutex<Vec<(String, i64)>>,
        /// Everything written, as given.
        records: Mutex<Vec<serde_json::Value>>,
        /// Fail the first N write calls as a whole, transiently (a database down).
        transient_failures: AtomicUsize,
        /// Records with this seq fail permanently (a constraint).
        poison: Option<i64>,
        /// Random-ish delay per write, to shuffle lanes.
        jitter: bool,
        /// A record with this seq never gets through (transiently); the records after it
        /// in its topic are held back, like the webhook's.
        stuck: Option<i64>,
        /// Each record fails (transiently) this many of its attempts before it gets
        /// through; the records after it in its topic are held back meanwhile.
        fails_first: u32,
        /// Attempts seen per seq.
        attempts: Mutex<HashMap<i64, u32>>,
        /// Writing a batch with a record whose seq is a multiple of this panics.
        panic_every: Option<i64>,
    }

    impl Sink for Scripted {
        fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
            Box::pin(async move {
                if self.jitter {
                    tokio::time::sleep(Duration::from_micros(rand::random::<u64>() % 2000)).await;
                }
                if self.transient_failures.load(Ordering::SeqCst) > 0 {
                    self.transient_failures.fetch_sub(1, Ordering::SeqCst);
                    return crate::sink::all(
                        batch.len(),
                        Err(SinkError::transient("connection refused")),
                    );
                }
                if let Some(n) = self.panic_every
                    && batch.iter().any(|d| seq(d) % n == 0)
                {
                    panic!("scripted panic");
                }
                let mut failed_topics = Vec::new();
                let mut out = Vec::new();
                for d in batch {
                    let (topic, seq) = (d.origin.topic.clone(), seq(d));
                    if failed_topics.contains(&topic) {
                        out.push(Outcome::HeldBack);
                        continue;
                    }
                    let attempt = {
                        let mut a = self.attempts.lock().unwrap();
                        let n = a.entry(seq).or_default();
                        *n += 1;
                        *n
                    };
                    if Some(seq) == self.poison {
                        out.push(Outcome::Failed(SinkError::permanent("constraint violated")));
                    } else if Some(seq) == self.stuck || attempt <= self.fails_first {
                        failed_topics.push(topic);
                        out.push(Outcome::Failed(SinkError::transient("HTTP 503")));
                    } else {
                        self.written.lock().unwrap().push((topic.to_string(), seq));
                        self.records
                            .lock()
                            .unwrap()
                            .push(d.record.to_value().into_owned());
                        out.push(Outcome::Delivered);
                    }
                }
                out
            })
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
        let record = d.record.to_value();
        (record.pointer("/seq"))
            .or(record.pointer("/record/seq"))
            .and_then(|v| v.as_i64())
            .unwrap()
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
            DeadLetter::none(),
            &tracker,
        );
        let queue = spawn(Arc::from("s"), sink, common, DeadLetter::to(dlq), &tracker);
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
    async fn giving_up_dead_letters_only_the_record_whose_budget_is_spent() {
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
        assert_eq!(
            sink.seqs(),
            vec![0, 1, 2, 3, 4, 5, 6, 8, 9],
            "each of the others written once, in order"
        );
        assert_eq!(sink.attempts.lock().unwrap()[&7], 3);
        assert_eq!(
            sink.attempts.lock().unwrap()[&8],
            1,
            "held back: no attempt counted"
        );
        assert_eq!(settled.load(Ordering::SeqCst), 10);
    }

    /// Every record needs 3 attempts, and waits behind the records of its topic before
    /// it: with the budget per record none is given up on, and the backoff starts over
    /// after each round that delivered something, so the run takes a few short waits per
    /// record, not the longest wait per round. (Time is paused: virtual, deterministic.)
    #[tokio::test(start_paused = true)]
    async fn each_record_has_its_own_budget_and_progress_resets_the_backoff() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            fails_first: 2,
            ..Scripted::default()
        });
        let mut c = common(1, None);
        c.retry = RetryConfig {
            max_attempts: 3,
            initial_delay: crate::config::units::Duration(Duration::from_millis(10)),
            max_delay: crate::config::units::Duration(Duration::from_secs(1)),
            max_elapsed: None,
        };
        let started = Instant::now();
        let records = (0..20)
            .map(|i| delivery(if i % 2 == 0 { "a" } else { "b" }, i, &settled))
            .collect();
        let dead = run(Arc::clone(&sink), c, records).await;
        assert_eq!(dead, Vec::<i64>::new());
        assert_eq!(sink.seqs().len(), 20);
        assert!(sink.attempts.lock().unwrap().values().all(|&n| n == 3));
        assert_eq!(settled.load(Ordering::SeqCst), 20);
        // 10 records per topic, 3 rounds each: 30 rounds, each waiting 10–20 ms or
        // 20–40 ms after the reset. Without the reset the waits would grow to 1–2 s.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_record_is_dead_lettered_and_the_rest_delivered() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            panic_every: Some(100),
            ..Scripted::default()
        });
        let (dead, letters) = {
            let tracker = TaskTracker::new();
            let dead: Arc<Scripted> = Arc::default();
            let dlq = spawn(
                Arc::from("dlq"),
                dead.clone(),
                common(1, None),
                DeadLetter::none(),
                &tracker,
            );
            let queue = spawn(
                Arc::from("s"),
                Arc::clone(&sink) as Arc<dyn Sink>,
                common(2, None),
                DeadLetter::to(dlq),
                &tracker,
            );
            for i in 1..=300 {
                let topic = format!("t{}", i % 5);
                assert!(queue.send(delivery(&topic, i, &settled)).await.is_ok());
            }
            drop(queue);
            tracker.close();
            tracker.wait().await;
            let letters = dead.records.lock().unwrap().clone();
            (dead.seqs(), letters)
        };
        let mut dead = dead;
        dead.sort();
        assert_eq!(dead, vec![100, 200, 300]);
        assert!(
            letters
                .iter()
                .all(|l| l["error_kind"] == "panic" && l["attempts"] == PANIC_ATTEMPTS),
            "{letters:?}"
        );
        assert_eq!(sink.seqs().len(), 297, "every other record delivered");
        assert_eq!(settled.load(Ordering::SeqCst), 300, "every ack given");
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

    /// Health as `/readyz` reads it: a write that failed transiently makes the sink
    /// unhealthy, with the error; the next write that succeeds makes it healthy again.
    #[tokio::test]
    async fn a_sink_is_unhealthy_after_a_transient_failure_until_a_write_succeeds() {
        let settled = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(Scripted {
            transient_failures: AtomicUsize::new(usize::MAX / 2),
            ..Scripted::default()
        });
        let mut c = common(1, None);
        c.retry.max_attempts = 2;
        let tracker = TaskTracker::new();
        let queue = spawn(
            Arc::from("s"),
            Arc::clone(&sink) as Arc<dyn Sink>,
            c,
            DeadLetter::none(),
            &tracker,
        );
        let health = queue.health().clone();
        let probe = queue.probe();
        assert!(health.is_ready(), "healthy once opened");
        let settled_after = |n: usize| {
            let settled = Arc::clone(&settled);
            async move {
                while settled.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        assert!(queue.send(delivery("a", 1, &settled)).await.is_ok());
        settled_after(1).await; // given up on (no dead-letter sink: dropped)
        assert_eq!(
            health.problem().as_deref(),
            Some("last write failed: connection refused")
        );
        sink.transient_failures.store(0, Ordering::SeqCst);
        assert!(queue.send(delivery("a", 2, &settled)).await.is_ok());
        settled_after(2).await;
        assert!(health.is_ready());
        assert_eq!(sink.seqs(), vec![2]);
        assert_eq!(probe.depth(), 0);
        drop(queue);
        tracker.close();
        tracker.wait().await;
        assert_eq!(
            probe.capacity(),
            0,
            "a probe does not keep the sink's queues open"
        );
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
