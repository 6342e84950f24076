//! The router: runs each message through every rule whose filters match it, sends the
//! records to the rules' sink queues (a batch's records for one sink at once, waiting
//! when its queue is full: backpressure), and
//! dead-letters messages a rule cannot process. Each record carries a share of the
//! message's [`Ack`](crate::delivery::Ack); the router's own share is settled once
//! everything was handed on, so a message with no records settles at once.
//!
//! Rules are evaluated in batches of up to [`EVAL_BATCH`] messages, with up to one batch
//! per pool thread in flight; the verdicts are dispatched in arrival order. The router
//! evaluates a batch on its own worker first, for up to [`INLINE_BUDGET`]: moving a batch
//! to another thread and back costs more than evaluating a usual one (as a client, where
//! batches are small, a tenth of mqbridge's CPU per message: BENCHMARKS.md, "Where the
//! CPU goes"). What is left when the budget is spent, or from the first payload larger
//! than [`INLINE_PAYLOAD`] on (decoding one cannot be stopped halfway), goes to the
//! [`EvalPool`]'s threads, so a slow or runaway program holds the worker for at most
//! about the budget. A message whose rule the budget stopped is evaluated again there,
//! whole. Each rule may take [`EvalPool::limit`] per message: a runaway jq program is
//! stopped there and costs that one message (dead-lettered), and its thread goes on with
//! the next one. The router evaluates on its worker only on a runtime whose threads have
//! the stack programs need ([`crate::eval_pool::runtime`]), and never with a decoder that
//! keeps state (below).
//!
//! The `mqbridge_rule_*` metrics are counted here, as verdicts are dispatched, labelled
//! with the rule's name: messages matched, filtered out, records emitted, errors by
//! stage, and the evaluation time measured on the pool's thread. Each outcome is also
//! offered to the rule's watchers ([`crate::tap`]; free while nobody watches).
//!
//! **Decoders that keep state** (Sparkplug B: births, `seq`) must see the messages in
//! arrival order, which the pool's threads do not keep across batches. So the router
//! runs them itself, in order, as it hands a batch to the pool ([`Decoder::observe`]);
//! the pool then filters and transforms what they made. Here too a `seq` gap is logged
//! and counted (`mqbridge_sparkplug_seq_gaps_total`), and a command the decoder asks for
//! (a rebirth request) is handed to [`Pipeline::commands`], which publishes it to the
//! broker mqbridge reads from. A new routing takes over what the old one's decoders
//! remembered, rule by rule (by name).
//!
//! [`Decoder::observe`]: crate::rule::Decoder::observe

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytestring::ByteString;
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::delivery::{Ack, Watch};
use crate::eval_pool::{EvalPool, panic_message};
use crate::message::Message;
use crate::record::Record;
use crate::rule::{Command, Evaluation, Observed, Rule, jq};
use crate::sink::driver::{DeadLetter, Failure};
use crate::sink::publish::{Outgoing, Publish};
use crate::sink::queue::SinkQueue;
use crate::sink::{Delivery, ErrorKind, Origin, Outcome};
use crate::tap::{Event, Taps};
use crate::topic::Vars;

/// Most messages evaluated per hand-off to the pool.
pub const EVAL_BATCH: usize = 256;

/// How long the router evaluates a batch on its own worker before it hands the rest to
/// the pool (see the module's docs).
pub const INLINE_BUDGET: Duration = Duration::from_millis(2);

/// The largest payload the router evaluates on its own worker. Decoding a payload cannot
/// be stopped halfway and costs in proportion to its size, so a larger one (up to the
/// broker's maximum packet size), and the batch's messages after it, go to the pool.
pub const INLINE_PAYLOAD: usize = 64 << 10;

/// Every matching rule's verdict on one message: usually one, kept inline.
pub type Verdicts = SmallVec<[Verdict; 1]>;

/// A matching rule's verdict on one message.
pub struct Verdict {
    pub rule: usize,
    pub vars: Vars,
    pub evaluation: Evaluation,
    /// How long decoding, filtering and transforming took.
    pub took: Duration,
}

/// What the decoders that keep state made of one message, read in arrival order: for
/// each such rule that matches it (by index), its payloads or why it cannot be read.
pub type Observations = Vec<(usize, Result<Vec<jaq_json::Val>, String>)>;

/// Evaluates every rule against a message, each for at most `limit`; a rule among
/// `observed` filters and transforms what its decoder already read, any other decodes
/// the message itself (a decoder that keeps state reads it against that state without
/// changing it: `mqbridge try` passes no observations).
pub fn evaluate(
    rules: &[Rule],
    msg: &Message,
    mut observed: Observations,
    limit: Duration,
) -> Verdicts {
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let vars = rule.matches(&msg.topic)?;
            let started = Instant::now();
            let evaluation = match observed.iter().position(|(r, _)| *r == i) {
                Some(at) => {
                    let payloads = observed.swap_remove(at).1;
                    rule.evaluate_observed(msg, &vars, payloads, limit)
                }
                None => rule.evaluate(msg, &vars, limit),
            };
            let took = started.elapsed();
            Some(Verdict {
                rule: i,
                vars: Vars::new(&vars),
                evaluation,
                took,
            })
        })
        .collect()
}

/// [`evaluate`], with a panic costing its message (its error), not the caller.
fn evaluate_caught(
    rules: &[Rule],
    msg: &Message,
    observed: Observations,
    limit: Duration,
) -> Evaluated {
    catch_unwind(AssertUnwindSafe(|| evaluate(rules, msg, observed, limit)))
        .map_err(|p| format!("rule evaluation panicked: {}", panic_message(p.as_ref())))
}

/// Evaluates `msgs` in order, each for at most `limit`, until `until` or a payload larger
/// than [`INLINE_PAYLOAD`]: the verdicts of the first ones, as many as were done by then.
/// A message that failed once `until` had passed is left out, with the ones after it:
/// `until` may have stopped a rule before its `limit`, so it is to be evaluated again with
/// the whole `limit`. (Evaluating again is safe: only the decoders that keep state have
/// effects, and they are not run here.)
fn evaluate_until(
    rules: &[Rule],
    msgs: &[Message],
    limit: Duration,
    until: Instant,
) -> Vec<Evaluated> {
    let mut done = Vec::with_capacity(msgs.len());
    for m in msgs {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || m.payload.len() > INLINE_PAYLOAD {
            break;
        }
        let verdicts = evaluate_caught(rules, m, Observations::new(), limit.min(left));
        let failed = verdicts.as_ref().map_or(true, |v| {
            v.iter()
                .any(|v| matches!(v.evaluation, Evaluation::Failed { .. }))
        });
        if failed && Instant::now() >= until {
            break;
        }
        done.push(verdicts);
    }
    done
}

/// What the router routes by: the rules, and the sinks' queues by index (as the rules'
/// `to` names them). A config reload hands the router a new one.
pub struct Routing {
    pub rules: Arc<[Rule]>,
    pub sinks: Vec<SinkQueue>,
    /// Told once the router routes by this routing (every message it takes from then on).
    pub applied: Option<tokio::sync::oneshot::Sender<()>>,
}

pub struct Pipeline {
    pub routing: Routing,
    /// Every message taken is tracked here until it settles.
    pub watch: Arc<Watch>,
    pub dead_letter: DeadLetter,
    /// Where the rules run, and for how long each may run per message.
    pub eval: EvalPool,
    /// How long the router evaluates a batch on its own worker before it hands the rest
    /// to `eval` ([`INLINE_BUDGET`]; zero: always to `eval`).
    pub inline: Duration,
    /// New routings (config reloads); None: the routing never changes. A new routing is
    /// taken between two batches: see [`Pipeline::run`].
    pub reloads: Option<mpsc::Receiver<Routing>>,
    /// Watchers of the rules' outcomes (the admin API's live tail).
    pub taps: Arc<Taps>,
    /// Where the commands decoders ask for (Sparkplug B rebirth requests) are published:
    /// the broker mqbridge reads from. None: they are logged and dropped.
    pub commands: Option<Arc<dyn Publish>>,
}

/// Commands waiting to be published; past this many, a new one is dropped (logged): the
/// next gap asks again.
const COMMANDS_QUEUED: usize = 64;

/// A routing in use, with its rules' metric handles. Each batch holds the one it was
/// evaluated with, so that its verdicts (rule and sink indexes) are dispatched by it.
struct Active {
    rules: Arc<[Rule]>,
    sinks: Vec<SinkQueue>,
    metrics: Vec<RuleMetrics>,
    /// Whether a rule's decoder reads messages in arrival order (then the router runs
    /// it: see the module's docs).
    in_order: bool,
}

impl Active {
    fn new(routing: Routing) -> Arc<Active> {
        Arc::new(Active {
            metrics: routing.rules.iter().map(RuleMetrics::new).collect(),
            in_order: routing.rules.iter().any(|r| r.decode.in_order()),
            rules: routing.rules,
            sinks: routing.sinks,
        })
    }

    /// Lets each rule's decoder take over what the same rule's decoder in `earlier`
    /// remembered.
    fn carry_over(&self, earlier: &Active) {
        for rule in self.rules.iter().filter(|r| r.decode.in_order()) {
            if let Some(before) = earlier.rules.iter().find(|r| r.name == rule.name) {
                rule.decode.carry_over(&before.decode);
            }
        }
    }
}

/// The router's parts that a reload does not replace.
struct Router {
    watch: Arc<Watch>,
    dead_letter: DeadLetter,
    eval: EvalPool,
    inline: Duration,
    taps: Arc<Taps>,
    /// To the task that publishes the decoders' commands.
    commands: Option<mpsc::Sender<Command>>,
}

/// Messages evaluated together; their acks stay here, with the router.
struct Batch {
    /// Shared with the pool's job while it evaluates; an `Arc` of the `Vec` itself, not
    /// of a slice, so that the messages are not copied into a new allocation.
    msgs: Arc<Vec<Message>>,
    acks: Vec<Ack>,
    /// The routing its messages were evaluated with, and are dispatched with.
    active: Arc<Active>,
}

/// Each message's verdicts, or why evaluating it broke down.
type Evaluated = Result<Verdicts, String>;

/// A rule's metric handles, looked up once.
struct RuleMetrics {
    matched: metrics::Counter,
    filtered: metrics::Counter,
    records: metrics::Counter,
    evaluation: metrics::Histogram,
    /// Sparkplug B rules only: `seq` gaps seen, rebirths asked for.
    sparkplug: Option<(metrics::Counter, metrics::Counter)>,
    rule: String,
}

impl RuleMetrics {
    fn new(rule: &Rule) -> RuleMetrics {
        let name = rule.name.to_string();
        RuleMetrics {
            matched: metrics::counter!("mqbridge_rule_messages_matched_total", "rule" => name.clone()),
            filtered: metrics::counter!("mqbridge_rule_messages_filtered_total", "rule" => name.clone()),
            records: metrics::counter!("mqbridge_rule_records_total", "rule" => name.clone()),
            evaluation: metrics::histogram!("mqbridge_rule_evaluation_seconds", "rule" => name.clone()),
            sparkplug: rule.decode.in_order().then(|| {
                (
                    metrics::counter!("mqbridge_sparkplug_seq_gaps_total", "rule" => name.clone()),
                    metrics::counter!("mqbridge_sparkplug_rebirths_requested_total", "rule" => name.clone()),
                )
            }),
            rule: name,
        }
    }

    /// Errors are rare: their handle is looked up when one happens.
    fn error(&self, stage: &'static str) {
        metrics::counter!("mqbridge_rule_errors_total", "rule" => self.rule.clone(), "stage" => stage)
            .increment(1);
    }
}

impl Pipeline {
    /// Processes messages until the source closes its channel.
    ///
    /// **Reloads.** A new routing replaces the active one between two batches, so every
    /// message is evaluated and dispatched by one routing, the old or the new: routed
    /// exactly once. Batches evaluated before the swap are still dispatched, in order, by
    /// the routing they hold; that keeps the old sinks' queues open until they are
    /// dispatched, and a sink the new routing no longer has ends once its queue is drained.
    pub async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let Pipeline {
            routing,
            watch,
            dead_letter,
            eval,
            inline,
            mut reloads,
            taps,
            commands,
        } = self;
        let commands = commands.map(|publisher| {
            let (tx, rx) = mpsc::channel(COMMANDS_QUEUED);
            tokio::spawn(publish_commands(publisher, rx));
            tx
        });
        let router = Router {
            watch,
            dead_letter,
            eval,
            inline,
            taps,
            commands,
        };
        let mut active = Active::new(routing);
        let mut evaluating = FuturesOrdered::new();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some((batch, verdicts)) = evaluating.next() => router.dispatch_batch(batch, verdicts).await,
                routing = next_routing(&mut reloads), if reloads.is_some() => match routing {
                    Some(mut routing) => {
                        let applied = routing.applied.take();
                        let earlier = std::mem::replace(&mut active, Active::new(routing));
                        active.carry_over(&earlier);
                        if let Some(applied) = applied {
                            let _ = applied.send(());
                        }
                        tracing::debug!(rules = active.rules.len(), "router: new routing");
                    }
                    None => reloads = None,
                },
                first = rx.recv(), if open && evaluating.len() < router.eval.threads() => match first {
                    Some(first) => {
                        let mut batch = Vec::with_capacity(EVAL_BATCH.min(rx.len() + 1));
                        batch.push(first);
                        while batch.len() < EVAL_BATCH {
                            match rx.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
                        evaluating.push_back(router.evaluate(&active, batch).await);
                    }
                    None => open = false,
                },
                else => break,
            }
        }
        tracing::debug!("source closed, router done");
    }
}

/// Publishes the decoders' commands, one at a time, until the router is gone. A command
/// that fails is logged, not retried: the decoder asks again if it still needs to.
async fn publish_commands(publisher: Arc<dyn Publish>, mut commands: mpsc::Receiver<Command>) {
    while let Some(c) = commands.recv().await {
        let topic = c.topic.clone();
        let outcome = publisher
            .publish_all(
                vec![Outgoing {
                    topic: c.topic,
                    payload: c.payload,
                    properties: None,
                }],
                0,
                false,
            )
            .await;
        match outcome.first() {
            Some(Outcome::Failed(e)) => {
                tracing::warn!(%topic, error = %e.message, "cannot publish a command")
            }
            _ => tracing::debug!(%topic, "command published"),
        }
    }
}

/// The next routing from `reloads` (None once its sender is gone).
async fn next_routing(reloads: &mut Option<mpsc::Receiver<Routing>>) -> Option<Routing> {
    match reloads {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

impl Router {
    /// Evaluates a batch of messages: here for up to `self.inline`, the rest on the
    /// pool. The future resolves to every message's verdicts.
    async fn evaluate(
        &self,
        active: &Arc<Active>,
        mut batch: Vec<Message>,
    ) -> impl Future<Output = (Batch, Vec<Evaluated>)> + use<> {
        // In arrival order, here: see the module's docs.
        let observed: Option<Vec<Observations>> = active
            .in_order
            .then(|| batch.iter().map(|m| self.observe(active, m)).collect());
        self.watch
            .track(batch.iter_mut().map(|m| (&m.topic, &mut m.ack)));
        let acks: Vec<Ack> = batch.iter_mut().map(|m| m.ack.take()).collect();
        let limit = self.eval.limit();
        let inline = observed.is_none() && !self.inline.is_zero() && jq::has_program_stack();
        let done = match inline {
            true => evaluate_until(&active.rules, &batch, limit, Instant::now() + self.inline),
            false => Vec::new(),
        };
        let msgs = Arc::new(batch);
        let pending = if done.len() < msgs.len() {
            let (active, msgs, from) = (Arc::clone(active), Arc::clone(&msgs), done.len());
            let job = move || {
                let mut observed = observed.map(Vec::into_iter);
                msgs[from..]
                    .iter()
                    .map(|m| {
                        let observed = observed.as_mut().and_then(Iterator::next);
                        evaluate_caught(&active.rules, m, observed.unwrap_or_default(), limit)
                    })
                    .collect::<Vec<Evaluated>>()
            };
            Some(self.eval.submit(job).await)
        } else {
            None
        };
        let active = Arc::clone(active);
        async move {
            let mut verdicts = done;
            if let Some(pending) = pending {
                match pending.await {
                    Ok(rest) => verdicts.extend(rest),
                    Err(e) => {
                        let error = e.to_string();
                        verdicts.resize_with(msgs.len(), || Err(error.clone()));
                    }
                }
            }
            (Batch { msgs, acks, active }, verdicts)
        }
    }

    /// Runs the decoders that read in arrival order on one message: logs and counts the
    /// `seq` gaps they saw, and queues the commands they ask for.
    fn observe(&self, active: &Active, msg: &Message) -> Observations {
        let mut observed = Observations::new();
        for (i, rule) in active.rules.iter().enumerate() {
            if !rule.decode.in_order() || !rule.from.iter().any(|f| f.matches(&msg.topic)) {
                continue;
            }
            // A panic costs its message, as on the pool's threads.
            let observed_one = catch_unwind(AssertUnwindSafe(|| {
                rule.decode.observe(&msg.topic, &msg.payload)
            }));
            let o = match observed_one {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(p) => Observed::records(Err(format!(
                    "decoding panicked: {}",
                    panic_message(p.as_ref())
                ))),
            };
            let counters = active.metrics[i].sparkplug.as_ref();
            if let Some(gap) = &o.gap {
                tracing::warn!(rule = %rule.name, node = %gap.node, expected = gap.expected, got = gap.got, "Sparkplug B: seq gap");
                counters.inspect(|(gaps, _)| gaps.increment(1));
            }
            if let Some(command) = o.command {
                tracing::info!(rule = %rule.name, topic = %command.topic, "Sparkplug B: {}", command.why);
                counters.inspect(|(_, rebirths)| rebirths.increment(1));
                let queued = self.commands.as_ref().map(|tx| tx.try_send(command));
                if !matches!(queued, Some(Ok(()))) {
                    tracing::warn!(rule = %rule.name, "Sparkplug B: the rebirth request could not be queued (no publisher, or too many waiting)");
                }
            }
            observed.push((i, o.payloads));
        }
        observed
    }

    /// Dispatches a batch's verdicts, message by message in order, then hands each sink
    /// the records the batch made for it, in that order, at once (waiting while its queue
    /// is full).
    async fn dispatch_batch(&self, batch: Batch, verdicts: Vec<Evaluated>) {
        let Batch {
            mut msgs,
            acks,
            active,
        } = batch;
        let mut out: Vec<Vec<Delivery>> = active.sinks.iter().map(|_| Vec::new()).collect();
        for (i, (ack, verdicts)) in acks.into_iter().zip(verdicts).enumerate() {
            match verdicts {
                Ok(verdicts) => {
                    // Evaluated: the batch is the router's alone again (the pool's job is
                    // gone), so the message's last origin takes its topic and payload, not
                    // copies.
                    let taken = Arc::get_mut(&mut msgs).map(|m| {
                        let m = &mut m[i];
                        (std::mem::take(&mut m.topic), std::mem::take(&mut m.payload))
                    });
                    let msg = &msgs[i];
                    self.dispatch(&active, msg, taken, verdicts, ack, &mut out)
                        .await
                }
                Err(error) => self.fail_all(&active, &msgs[i], &error, ack).await,
            }
        }
        for (queue, records) in active.sinks.iter().zip(out) {
            if !records.is_empty() {
                // Err: shutting down; the records' shares are dropped unsettled, so
                // their messages are delivered again.
                let _ = queue.send_all(records).await;
            }
        }
    }

    /// Makes one message's records for the sinks, into `out` (by sink). `taken`: the
    /// message's topic and payload, when they were taken out of `msg`.
    async fn dispatch(
        &self,
        active: &Active,
        msg: &Message,
        mut taken: Option<(ByteString, Bytes)>,
        verdicts: Verdicts,
        ack: Ack,
        out: &mut [Vec<Delivery>],
    ) {
        let last = verdicts.len().saturating_sub(1);
        for (n, v) in verdicts.into_iter().enumerate() {
            let rule = &active.rules[v.rule];
            let m = &active.metrics[v.rule];
            m.matched.increment(1);
            m.evaluation.record(v.took);
            let parts = match n == last {
                true => taken.take(),
                false => taken.clone(),
            };
            let (topic, payload) =
                parts.unwrap_or_else(|| (msg.topic.clone(), msg.payload.clone()));
            let origin = Origin::taking(msg, topic, payload, &rule.name, v.vars);
            let origin = Arc::new(origin);
            let topic = &origin.topic;
            match v.evaluation {
                Evaluation::Records(records) => {
                    m.records.increment(records.len() as u64);
                    for record in records {
                        self.taps.offer(&rule.name, || Event::Record {
                            topic: topic.to_string(),
                            record: record.clone(),
                        });
                        // Each sink but the last gets a copy; the last takes the record.
                        let delivery = |record| Delivery {
                            record,
                            origin: Arc::clone(&origin),
                            ack: ack.part(),
                        };
                        if let Some((&last, others)) = rule.to.split_last() {
                            for &sink in others {
                                out[sink].push(delivery(record.clone()));
                            }
                            out[last].push(delivery(record));
                        }
                    }
                }
                Evaluation::Filtered => {
                    m.filtered.increment(1);
                    self.taps.offer(&rule.name, || Event::Filtered {
                        topic: topic.to_string(),
                    });
                }
                Evaluation::Failed { stage, error } => {
                    m.error(stage);
                    tracing::debug!(rule = %rule.name, %topic, stage, %error, "rule failed");
                    let error = format!("{stage}: {error}");
                    self.taps.offer(&rule.name, || Event::Failed {
                        topic: topic.to_string(),
                        error: error.clone(),
                    });
                    let failure = Failure {
                        sink: None,
                        kind: ErrorKind::Permanent,
                        error: &error,
                        attempts: 1,
                        first_attempt: jiff::Timestamp::now(),
                    };
                    self.dead_letter
                        .send(
                            origin,
                            &Record::from(serde_json::Value::Null),
                            failure,
                            ack.part(),
                        )
                        .await;
                }
            }
        }
        ack.settle();
    }

    /// Dead-letters a message once per matching rule when evaluation itself broke down.
    async fn fail_all(&self, active: &Active, msg: &Message, error: &str, ack: Ack) {
        let metrics = &active.metrics;
        for (i, rule) in active.rules.iter().enumerate() {
            if rule.matches(&msg.topic).is_none() {
                continue;
            }
            metrics[i].matched.increment(1);
            metrics[i].error("evaluation");
            let failure = Failure {
                sink: None,
                kind: ErrorKind::Permanent,
                error,
                attempts: 1,
                first_attempt: jiff::Timestamp::now(),
            };
            self.taps.offer(&rule.name, || Event::Failed {
                topic: msg.topic.to_string(),
                error: error.to_string(),
            });
            let origin = Arc::new(Origin::from_message(msg, &rule.name, Vars::default()));
            self.dead_letter
                .send(
                    origin,
                    &Record::from(serde_json::Value::Null),
                    failure,
                    ack.part(),
                )
                .await;
        }
        ack.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::sinks::{BatchConfig, Common};
    use crate::eval_pool::EVAL_TIMEOUT;
    use crate::rule::jq::JqProgram;
    use crate::sink::driver::spawn;
    use crate::sink::{Outcome, Sink};
    use crate::topic::TopicFilter;
    use futures::future::BoxFuture;
    use serde_json::json;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    use tokio_util::task::TaskTracker;

    /// Collects what it is given.
    #[derive(Default)]
    struct Collect(Mutex<Vec<serde_json::Value>>);
    impl Sink for Collect {
        fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
            self.0
                .lock()
                .unwrap()
                .extend(batch.iter().map(|d| d.record.to_value().into_owned()));
            Box::pin(async { vec![Outcome::Delivered; batch.len()] })
        }
    }

    fn rule(name: &str, from: &str, transform: &str, to: usize) -> Rule {
        Rule {
            name: Arc::from(name),
            from: vec![TopicFilter::parse(from).unwrap()],
            decode: crate::rule::Decode::Json.into(),
            filter: None,
            transform: Some(JqProgram::compile(transform).unwrap()),
            to: vec![to],
            keeps_payload_text: false,
        }
    }

    /// Runs `msgs` through `rules` (whose sink 0 collects) on `eval`, the router
    /// evaluating on its worker for up to `inline` per batch; returns what was stored and
    /// what was dead-lettered once everything settled.
    async fn run_pipeline(
        rules: Vec<Rule>,
        eval: EvalPool,
        inline: Duration,
        msgs: Vec<Message>,
    ) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
        let tracker = TaskTracker::new();
        let common = Common {
            batch: BatchConfig::default(),
            retry: Default::default(),
            queue: 100,
            concurrency: 1,
            rate_limit: None,
        };
        let out = Arc::new(Collect::default());
        let dead = Arc::new(Collect::default());
        let dlq = spawn(
            Arc::from("dlq"),
            dead.clone(),
            common,
            DeadLetter::none(),
            &tracker,
        );
        let sink = spawn(
            Arc::from("out"),
            out.clone(),
            common,
            DeadLetter::to(dlq.clone()),
            &tracker,
        );
        let pipeline = Pipeline {
            routing: Routing {
                rules: rules.into(),
                sinks: vec![sink],
                applied: None,
            },
            watch: Arc::default(),
            dead_letter: DeadLetter::to(dlq),
            eval,
            inline,
            reloads: None,
            taps: Arc::default(),
            commands: None,
        };
        let (tx, rx) = mpsc::channel(16);
        let feed = tokio::spawn(async move {
            for m in msgs {
                tx.send(m).await.unwrap();
            }
        });
        // On a worker, as mqbridge runs it (not on the thread that blocks on the runtime).
        tokio::spawn(pipeline.run(rx)).await.unwrap();
        feed.await.unwrap();
        tracker.close();
        tracker.wait().await;
        let out = std::mem::take(&mut *out.0.lock().unwrap());
        let dead = std::mem::take(&mut *dead.0.lock().unwrap());
        (out, dead)
    }

    /// mqbridge's own runtime, where the router evaluates on its worker first: the
    /// runaway is stopped there at the budget, then again on the pool at its limit.
    #[test]
    fn a_runaway_program_costs_one_message_not_the_stream() {
        let rules = vec![
            rule("fast", "ok/+", "{v: .payload.v}", 0),
            rule("slow", "slow", "last(range(1e15))", 0),
        ];
        let eval = EvalPool::start("pipeline-t", 2, EVAL_TIMEOUT).unwrap();
        let msgs = [("ok/a", 1), ("slow", 2), ("ok/b", 3)]
            .map(|(topic, v)| Message::detached(topic, format!(r#"{{"v": {v}}}"#), 1));
        let rt = crate::eval_pool::runtime(2).build().unwrap();
        let (out, dead) = rt.block_on(run_pipeline(rules, eval, INLINE_BUDGET, msgs.into()));
        assert_eq!(out, vec![json!({"v": 1}), json!({"v": 3})]);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0]["topic"], "slow");
        let error = dead[0]["error"].as_str().unwrap();
        assert_eq!(
            error,
            "transform: program ran longer than 2s and was stopped"
        );
    }

    fn numbered(topic: &str, n: usize) -> Vec<Message> {
        (0..n)
            .map(|v| Message::detached(topic, format!(r#"{{"v": {v}}}"#), 1))
            .collect()
    }

    /// The verdicts' records, by message; a failure as its stage and error.
    fn outcomes(evaluated: &[Evaluated]) -> Vec<Vec<String>> {
        let outcome = |v: &Verdict| match &v.evaluation {
            Evaluation::Records(records) => records
                .iter()
                .map(|r| r.to_value().to_string())
                .collect::<Vec<_>>()
                .join(" "),
            Evaluation::Filtered => "filtered".into(),
            Evaluation::Failed { stage, error } => format!("{stage}: {error}"),
        };
        evaluated
            .iter()
            .map(|e| e.as_ref().unwrap().iter().map(outcome).collect())
            .collect()
    }

    #[test]
    fn evaluating_until_a_time_keeps_what_was_done_by_then() {
        let rules = [rule("r", "ok/+", "{v: .payload.v}", 0)];
        let msgs = numbered("ok/a", 5);
        let far = Instant::now() + Duration::from_secs(60);
        let done = evaluate_until(&rules, &msgs, EVAL_TIMEOUT, far);
        let want: Vec<Vec<String>> = (0..5).map(|v| vec![format!(r#"{{"v":{v}}}"#)]).collect();
        assert_eq!(outcomes(&done), want);
        // A time already past: nothing is evaluated.
        assert!(evaluate_until(&rules, &msgs, EVAL_TIMEOUT, Instant::now()).is_empty());
    }

    /// A message its own error fails is done (it fails the same anywhere); one that was
    /// stopped because the time ran out is left out, with the messages after it, to be
    /// evaluated again with the whole limit.
    #[test]
    fn evaluating_until_a_time_leaves_out_what_the_time_stopped() {
        let rules = [
            rule("ok", "ok/+", "{v: .payload.v}", 0),
            rule("bad", "bad", r#"error("no")"#, 0),
            rule("slow", "slow", "last(range(1e15))", 0),
        ];
        let mut msgs = numbered("ok/a", 1);
        msgs.extend(numbered("bad", 1));
        msgs.extend(numbered("ok/b", 1));
        msgs.extend(numbered("slow", 1));
        msgs.extend(numbered("ok/c", 1));
        let started = Instant::now();
        // Long enough for the first three on a loaded machine, well short of the limit.
        let until = started + Duration::from_millis(500);
        let done = evaluate_until(&rules, &msgs, EVAL_TIMEOUT, until);
        assert_eq!(
            outcomes(&done),
            [
                vec![r#"{"v":0}"#.to_string()],
                vec![r#"transform: "no""#.to_string()],
                vec![r#"{"v":0}"#.to_string()],
            ]
        );
        // Stopped at `until`, not at the limit (2 s).
        assert!(started.elapsed() < EVAL_TIMEOUT, "{:?}", started.elapsed());
    }

    /// A payload too large to decode on the router's worker is left to the pool, with the
    /// messages after it, however much time is left.
    #[test]
    fn evaluating_until_a_time_leaves_a_large_payload_to_the_pool() {
        let rules = [rule("r", "ok/+", "{v: .payload.v}", 0)];
        let large = |v: usize, pad: usize| {
            let payload = format!(r#"{{"v": {v}, "pad": "{}"}}"#, "x".repeat(pad));
            Message::detached("ok/large", payload, 1)
        };
        // The largest payload taken here, then one byte more.
        let at_limit = large(1, INLINE_PAYLOAD - r#"{"v": 1, "pad": ""}"#.len());
        assert_eq!(at_limit.payload.len(), INLINE_PAYLOAD);
        let mut msgs = numbered("ok/a", 1);
        msgs.push(at_limit);
        msgs.push(large(2, INLINE_PAYLOAD));
        msgs.extend(numbered("ok/b", 1));
        let far = Instant::now() + Duration::from_secs(60);
        let done = evaluate_until(&rules, &msgs, EVAL_TIMEOUT, far);
        assert_eq!(
            outcomes(&done),
            [
                vec![r#"{"v":0}"#.to_string()],
                vec![r#"{"v":1}"#.to_string()]
            ]
        );
    }

    /// On mqbridge's runtime the router evaluates on its own worker: the stream goes
    /// through while the pool's only thread is held by another job.
    #[test]
    fn the_router_evaluates_on_its_worker_while_the_pool_is_busy() {
        let eval = EvalPool::start("pipeline-held", 1, EVAL_TIMEOUT).unwrap();
        let rt = crate::eval_pool::runtime(1).build().unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = rt.block_on(eval.submit(move || held.recv().is_ok()));
        let rules = vec![rule("r", "ok/+", "{v: .payload.v}", 0)];
        let far = Duration::from_secs(600);
        let run = run_pipeline(rules, eval.clone(), far, numbered("ok/a", 300));
        let (out, dead) = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), run).await })
            .expect("the stream went through without the pool");
        let want: Vec<_> = (0..300).map(|v| json!({"v": v})).collect();
        assert_eq!(out, want);
        assert!(dead.is_empty());
        release.send(()).unwrap();
        assert!(
            rt.block_on(blocker).unwrap(),
            "the pool's job was held until now"
        );
    }

    /// Counts settlements of one message.
    struct CountSettled(Arc<std::sync::atomic::AtomicUsize>);
    impl crate::delivery::Settled for CountSettled {
        fn settled(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A transform slow enough (a few hundred µs) that batches are being evaluated when
    /// the new routing comes.
    const SLOW_OLD: &str =
        r#"(reduce range(500) as $i (0; . + 1)) as $x | {seq: .payload.seq, by: "old"}"#;

    /// A reload mid-stream: each message is routed once, by the old routing or the new,
    /// the old-routed ones all before the new-routed ones (the swap is at a message
    /// boundary), and every message settles exactly once, including those the old sink,
    /// which the new routing no longer has, still held when the swap came.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_routing_routes_each_message_once_and_the_old_sink_drains() {
        const N: i64 = 3_000;
        let tracker = TaskTracker::new();
        let common = Common {
            batch: BatchConfig::default(),
            retry: Default::default(),
            queue: 64,
            concurrency: 2,
            rate_limit: None,
        };
        let (old, new) = (Arc::new(Collect::default()), Arc::new(Collect::default()));
        let old_q = spawn(
            Arc::from("old"),
            old.clone(),
            common,
            DeadLetter::none(),
            &tracker,
        );
        let new_q = spawn(
            Arc::from("new"),
            new.clone(),
            common,
            DeadLetter::none(),
            &tracker,
        );
        let (reload_tx, reloads) = mpsc::channel(1);
        let pipeline = Pipeline {
            routing: Routing {
                rules: vec![rule("r", "t/+", SLOW_OLD, 0)].into(),
                sinks: vec![old_q],
                applied: None,
            },
            watch: Arc::default(),
            dead_letter: DeadLetter::none(),
            eval: EvalPool::start("pipeline-r", 2, EVAL_TIMEOUT).unwrap(),
            inline: INLINE_BUDGET,
            reloads: Some(reloads),
            taps: Arc::default(),
            commands: None,
        };
        let settled: Vec<Arc<std::sync::atomic::AtomicUsize>> =
            (0..N).map(|_| Arc::default()).collect();
        let (tx, rx) = mpsc::channel(16);
        let counts = settled.clone();
        let feed = tokio::spawn(async move {
            for (i, count) in counts.into_iter().enumerate() {
                let mut m =
                    Message::detached(format!("t/{}", i % 7), format!(r#"{{"seq": {i}}}"#), 1);
                m.ack = Ack::new(CountSettled(count));
                tx.send(m).await.unwrap();
                if i as i64 == N / 2 {
                    // The new routing: another rule, to another sink; the old sink's
                    // queue is dropped with the old routing.
                    reload_tx
                        .send(Routing {
                            rules: vec![rule("r2", "t/+", "{seq: .payload.seq, by: \"new\"}", 0)]
                                .into(),
                            sinks: vec![new_q.clone()],
                            applied: None,
                        })
                        .await
                        .unwrap();
                }
            }
        });
        pipeline.run(rx).await;
        feed.await.unwrap();
        tracker.close();
        tracker.wait().await;
        let seqs = |c: &Collect| -> Vec<i64> {
            let mut v: Vec<i64> =
                c.0.lock()
                    .unwrap()
                    .iter()
                    .map(|r| r["seq"].as_i64().unwrap())
                    .collect();
            v.sort();
            v
        };
        let (old, new) = (seqs(&old), seqs(&new));
        assert!(
            !old.is_empty() && !new.is_empty(),
            "old {} new {}",
            old.len(),
            new.len()
        );
        assert!(
            old.last() < new.first(),
            "the swap is at a message boundary"
        );
        let all: Vec<i64> = old.iter().chain(&new).copied().collect();
        assert_eq!(
            all,
            (0..N).collect::<Vec<_>>(),
            "each message routed exactly once"
        );
        for (i, c) in settled.iter().enumerate() {
            assert_eq!(c.load(Ordering::SeqCst), 1, "message {i} settled once");
        }
    }

    /// Threads of this process whose name starts with `prefix`, with their CPU time so
    /// far (utime + stime, in clock ticks).
    fn threads(prefix: &str) -> Vec<u64> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .filter_map(|t| {
                let path = t.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                if !comm.starts_with(prefix) {
                    return None;
                }
                // After the `(comm)` field: state is field 3, utime 14 and stime 15.
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
            })
            .collect()
    }

    /// Issue 10's runaway test: 50 messages whose transform would loop ~forever (`n` =
    /// 1e12) among 500 good ones. The good ones are stored in order, the runaways
    /// dead-lettered; the threads the bridge runs on (its runtime's, blocking ones
    /// included, and the evaluation pool's) never exceed their fixed number, and once the
    /// stream is done they take no CPU: nothing is left running.
    #[test]
    fn runaway_messages_are_dead_lettered_and_leave_nothing_running() {
        const WORKERS: usize = 2;
        const POOL: usize = 2;
        const LIMIT: Duration = Duration::from_millis(100);
        let rt = crate::eval_pool::runtime(WORKERS)
            .thread_name("runaway-rt")
            .build()
            .unwrap();
        let eval = EvalPool::start("runaway-eval", POOL, LIMIT).unwrap();
        let transform = "{device: .vars.device, seq: .payload.seq, \
                          steps: (reduce range(.payload.n) as $i (0; . + 1))}";
        let rules = vec![rule("r", "sensors/{device}/telemetry", transform, 0)];
        let mut msgs = Vec::new();
        let mut seq = 0;
        for i in 0..550 {
            let topic = format!("sensors/d{}/telemetry", i % 7);
            let payload = if i % 11 == 5 {
                json!({"seq": -1, "n": 1e12})
            } else {
                seq += 1;
                json!({"seq": seq - 1, "n": 10})
            };
            msgs.push(Message::detached(topic, payload.to_string(), 1));
        }

        // Count the threads while the stream runs.
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = std::thread::spawn({
            let sampling = Arc::clone(&sampling);
            move || {
                let mut most = 0;
                while sampling.load(Ordering::Relaxed) {
                    most = most.max(threads("runaway-").len());
                    std::thread::sleep(Duration::from_millis(5));
                }
                most
            }
        });
        let started = Instant::now();
        let run = run_pipeline(rules, eval.clone(), INLINE_BUDGET, msgs);
        let (out, dead) = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), run).await })
            .expect("the stream ends");
        let took = started.elapsed();
        sampling.store(false, Ordering::Relaxed);
        let most_threads = sampler.join().unwrap();

        let seqs: Vec<i64> = out.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>(), "stored in order");
        assert!(out.iter().all(|r| r["steps"] == 10));
        assert_eq!(dead.len(), 50);
        for d in &dead {
            let error = d["error"].as_str().unwrap();
            assert!(error.contains("ran longer than 100ms"), "{d}");
        }
        assert!(
            most_threads <= WORKERS + POOL,
            "{most_threads} threads (runtime + pool) while the stream ran"
        );
        // Each runaway held a pool thread for about its deadline: 50 × 100 ms over two
        // threads is 2.5 s (the bound leaves room for a loaded machine).
        assert!(took < LIMIT * 50 * 2, "the stream took {took:?}");

        // Idle afterwards: the bridge's threads stop accumulating CPU time. (With threads
        // left running their programs, this would never hold.)
        let busy = || threads("runaway-").iter().sum::<u64>();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = busy();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = busy();
            if now - last <= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still busy: {} ticks in 300ms",
                now - last
            );
            last = now;
        }
        drop(eval);
    }
}
