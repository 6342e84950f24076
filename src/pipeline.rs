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
            let evaluation = rule.evaluate(msg, &vars);
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
        while let Some(msg) = rx.recv().await {
            self.process(msg).await;
        }
        tracing::debug!("source closed, router done");
    }

    async fn process(&self, mut msg: Message) {
        let ack = std::mem::replace(&mut msg.ack, Ack::detached());
        let msg = Arc::new(msg);
        let rules = Arc::clone(&self.rules);
        let job = {
            let msg = Arc::clone(&msg);
            tokio::task::spawn_blocking(move || evaluate(&rules, &msg))
        };
        let verdicts = match tokio::time::timeout(EVAL_TIMEOUT, job).await {
            Ok(Ok(v)) => v,
            Ok(Err(panic)) => {
                let error = format!("rule evaluation panicked: {panic}");
                self.fail_all(&msg, &error, ack).await;
                return;
            }
            Err(_) => {
                let error = format!("rule evaluation took longer than {EVAL_TIMEOUT:?}");
                tracing::error!(topic = %msg.topic, "{error}; a blocking thread stays busy until the program ends");
                self.fail_all(&msg, &error, ack).await;
                return;
            }
        };
        for v in verdicts {
            let rule = &self.rules[v.rule];
            let origin = Arc::new(origin(&msg, rule, v.vars));
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
            let origin = Arc::new(origin(msg, rule, Vec::new()));
            self.dead_letter
                .send(origin, &serde_json::Value::Null, failure, ack.part())
                .await;
        }
        ack.settle();
    }
}

fn origin(msg: &Message, rule: &Rule, vars: Vec<(String, String)>) -> Origin {
    Origin {
        id: crate::sink::message_id(&msg.topic, &msg.payload),
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos,
        retain: msg.retain,
        vars,
        received_at: msg.received_at,
        rule: Arc::clone(&rule.name),
        source: Arc::clone(&msg.source),
    }
}
