//! The router: runs each message through every rule whose filters match it, sends the
//! records to the rules' sink queues (waiting when a queue is full: backpressure), and
//! dead-letters messages a rule cannot process. Each record carries a share of the
//! message's [`Ack`](crate::delivery::Ack); the router's own share is settled once
//! everything was handed on, so a message with no records settles at once.
//!
//! Rule evaluation runs on a blocking thread with a deadline: a runaway jq program costs
//! that one message (dead-lettered) instead of stalling the stream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::delivery::Ack;
use crate::message::Message;
use crate::rule::{Evaluation, Rule};
use crate::sink::driver::{DeadLetter, Failure, SinkQueue};
use crate::sink::{Delivery, ErrorKind, Origin};

/// Longest one message may spend in rule evaluation.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Most messages evaluated per hand-off to a blocking thread.
const EVAL_BATCH: usize = 256;

/// A matching rule's verdict on one message.
pub struct Verdict {
    pub rule: usize,
    pub vars: Vec<(String, String)>,
    pub evaluation: Evaluation,
}

/// Evaluates every rule against a message (pure; also used by `mqbridge try`).
pub fn evaluate(rules: &[Rule], msg: &Message) -> Vec<Verdict> {
    rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let vars = rule.matches(&msg.topic)?;
            let evaluation = rule.evaluate(msg, &vars, EVAL_TIMEOUT);
            Some(Verdict {
                rule: i,
                vars: vars
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                evaluation,
            })
        })
        .collect()
}

pub struct Pipeline {
    pub rules: Arc<Vec<Rule>>,
    /// Queue of each sink, by index.
    pub sinks: Vec<SinkQueue>,
    pub dead_letter: DeadLetter,
}

impl Pipeline {
    /// Processes messages until the source closes its channel.
    pub async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut batch = Vec::with_capacity(EVAL_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < EVAL_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.process(std::mem::take(&mut batch)).await;
        }
        tracing::debug!("source closed, router done");
    }

    /// Evaluates a run of messages on a blocking thread (one hand-off for many messages)
    /// and dispatches each message's records as its verdicts arrive, in order.
    async fn process(&self, batch: Vec<Message>) {
        let mut acks = Vec::with_capacity(batch.len());
        let mut msgs = Vec::with_capacity(batch.len());
        for mut m in batch {
            acks.push(std::mem::replace(&mut m.ack, Ack::detached()));
            msgs.push(Arc::new(m));
        }
        let msgs: Arc<[Arc<Message>]> = msgs.into();
        let mut acks = acks.into_iter();
        let mut next = 0;
        while next < msgs.len() {
            let (tx, mut results) = mpsc::unbounded_channel();
            let job = {
                let (rules, msgs) = (Arc::clone(&self.rules), Arc::clone(&msgs));
                tokio::task::spawn_blocking(move || {
                    for m in &msgs[next..] {
                        if tx.send(evaluate(&rules, m)).is_err() {
                            return;
                        }
                    }
                })
            };
            // Results come one per message, in order; a message that takes too long is
            // dead-lettered and the rest are evaluated again on a fresh thread.
            while next < msgs.len() {
                let msg = &msgs[next];
                let ack = acks.next().expect("one ack per message");
                next += 1;
                match tokio::time::timeout(EVAL_TIMEOUT, results.recv()).await {
                    Ok(Some(verdicts)) => self.dispatch(msg, verdicts, ack).await,
                    Ok(None) => {
                        let error = match job.await {
                            Err(e) if e.is_panic() => format!("rule evaluation panicked: {e}"),
                            _ => "rule evaluation stopped".to_string(),
                        };
                        self.fail_all(msg, &error, ack).await;
                        break;
                    }
                    Err(_) => {
                        let error = format!("rule evaluation took longer than {EVAL_TIMEOUT:?}");
                        tracing::error!(topic = %msg.topic, "{error}; a blocking thread stays busy until the program ends");
                        self.fail_all(msg, &error, ack).await;
                        break;
                    }
                }
            }
        }
    }

    /// Hands one message's records to the sinks (waiting when a queue is full).
    async fn dispatch(&self, msg: &Message, verdicts: Vec<Verdict>, ack: Ack) {
        for v in verdicts {
            let rule = &self.rules[v.rule];
            let origin = Arc::new(Origin::from_message(msg, &rule.name, v.vars));
            match v.evaluation {
                Evaluation::Records(records) => {
                    for record in records {
                        for &sink in &rule.to {
                            let d = Delivery {
                                record: record.clone(),
                                origin: Arc::clone(&origin),
                                ack: ack.part(),
                            };
                            if let Err(d) = self.sinks[sink].send(d).await {
                                // Shutting down: leave the message unsettled.
                                drop(d.ack);
                            }
                        }
                    }
                }
                Evaluation::Filtered => {}
                Evaluation::Failed { stage, error } => {
                    tracing::debug!(rule = %rule.name, topic = %msg.topic, stage, %error, "rule failed");
                    let error = format!("{stage}: {error}");
                    let failure = Failure {
                        sink: None,
                        kind: ErrorKind::Permanent,
                        error: &error,
                        attempts: 1,
                        first_attempt: jiff::Timestamp::now(),
                    };
                    self.dead_letter
                        .send(origin, &serde_json::Value::Null, failure, ack.part())
                        .await;
                }
            }
        }
        ack.settle();
    }

    /// Dead-letters a message once per matching rule when evaluation itself broke down.
    async fn fail_all(&self, msg: &Message, error: &str, ack: Ack) {
        for rule in self
            .rules
            .iter()
            .filter(|r| r.matches(&msg.topic).is_some())
        {
            let failure = Failure {
                sink: None,
                kind: ErrorKind::Permanent,
                error,
                attempts: 1,
                first_attempt: jiff::Timestamp::now(),
            };
            let origin = Arc::new(Origin::from_message(msg, &rule.name, Vec::new()));
            self.dead_letter
                .send(origin, &serde_json::Value::Null, failure, ack.part())
                .await;
        }
        ack.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::jq::JqProgram;
    use crate::sink::driver::spawn;
    use crate::sink::{BatchConfig, Common, Outcome, Sink};
    use crate::topic::TopicFilter;
    use futures::future::BoxFuture;
    use std::sync::Mutex;
    use tokio_util::task::TaskTracker;

    /// Collects what it is given.
    #[derive(Default)]
    struct Collect(Mutex<Vec<serde_json::Value>>);
    impl Sink for Collect {
        fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
            self.0
                .lock()
                .unwrap()
                .extend(batch.iter().map(|d| d.record.clone()));
            Box::pin(async { vec![Outcome::Delivered; batch.len()] })
        }
    }

    fn rule(name: &str, from: &str, transform: &str, to: usize) -> Rule {
        Rule {
            name: Arc::from(name),
            from: vec![TopicFilter::parse(from).unwrap()],
            decode: crate::rule::Decode::Json,
            filter: None,
            transform: Some(JqProgram::compile(transform).unwrap()),
            to: vec![to],
        }
    }

    #[test]
    fn a_runaway_program_costs_one_message_not_the_stream() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (out, dead) = rt.block_on(async {
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
                DeadLetter { queue: None },
                &tracker,
            );
            let sink = spawn(
                Arc::from("out"),
                out.clone(),
                common,
                DeadLetter {
                    queue: Some(dlq.clone()),
                },
                &tracker,
            );
            let pipeline = Pipeline {
                rules: Arc::new(vec![
                    rule("fast", "ok/+", "{v: .payload.v}", 0),
                    rule("slow", "slow", "last(range(1e15))", 0),
                ]),
                sinks: vec![sink],
                dead_letter: DeadLetter { queue: Some(dlq) },
            };
            let (tx, rx) = mpsc::channel(16);
            for (topic, v) in [("ok/a", 1), ("slow", 2), ("ok/b", 3)] {
                tx.send(Message::detached(topic, format!(r#"{{"v": {v}}}"#), 1))
                    .await
                    .unwrap();
            }
            drop(tx);
            pipeline.run(rx).await;
            tracker.close();
            tracker.wait().await;
            (out, dead)
        });
        // The stuck evaluation thread is abandoned, not waited for.
        rt.shutdown_timeout(Duration::from_millis(10));
        let out = out.0.lock().unwrap().clone();
        assert_eq!(
            out,
            vec![serde_json::json!({"v": 1}), serde_json::json!({"v": 3})]
        );
        let dead = dead.0.lock().unwrap().clone();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0]["topic"], "slow");
        assert!(
            dead[0]["error"]
                .as_str()
                .unwrap()
                .contains("longer than 2s"),
            "{}",
            dead[0]
        );
    }
}
