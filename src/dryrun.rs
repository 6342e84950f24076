//! One message through the rules, without connecting to anything or writing anywhere:
//! each rule that matches, each record it makes, and what each sink would do with it.
//! [`outcomes`] is what the admin API's "try a message" answers (as JSON); [`explain`]
//! renders the same as text for `mqbridge try`. The rules run as in the pipeline: under
//! [`EVAL_TIMEOUT`], on a thread with the evaluation pool's stack.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::Plan;
use crate::eval_pool::EVAL_TIMEOUT;
use crate::message::Message;
use crate::pipeline::evaluate;
use crate::rule::Evaluation;
use crate::rule::jq::THREAD_STACK;
use crate::sink::Origin;
use crate::topic::Vars;

/// What one matching rule makes of the message.
#[derive(Debug, Serialize)]
pub struct RuleOutcome {
    pub rule: String,
    /// The topic captures (`{name}` in a `from` filter); an object in JSON.
    pub vars: Vars,
    #[serde(flatten)]
    pub result: RuleResult,
}

#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RuleResult {
    /// The rule's filter leaves the message out: nothing is written.
    Filtered,
    /// The rule cannot process it; `then` says where it would go.
    Failed {
        stage: &'static str,
        error: String,
        then: String,
    },
    Records {
        records: Vec<RecordOutcome>,
    },
}

/// A record, and what each of the rule's sinks would do with it.
#[derive(Debug, Serialize)]
pub struct RecordOutcome {
    pub record: crate::record::Record,
    pub sinks: Vec<SinkAction>,
}

#[derive(Debug, Serialize)]
pub struct SinkAction {
    pub sink: String,
    pub would: String,
}

/// What `plan`'s rules make of `msg` (empty: no rule matches its topic).
pub fn outcomes(plan: &Plan, msg: &Message) -> Vec<RuleOutcome> {
    let verdicts = std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(THREAD_STACK)
            .spawn_scoped(s, || evaluate(&plan.rules, msg, Vec::new(), EVAL_TIMEOUT))
            .expect("a thread to evaluate the rules")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    verdicts
        .into_iter()
        .map(|v| {
            let rule = &plan.rules[v.rule];
            let origin = Origin::from_message(msg, &rule.name, v.vars.clone());
            let result = match v.evaluation {
                Evaluation::Filtered => RuleResult::Filtered,
                Evaluation::Failed { stage, error } => RuleResult::Failed {
                    stage,
                    error,
                    then: match plan.dead_letter {
                        Some(i) => format!("dead letter to sink {}", plan.sinks[i].name),
                        None => "dropped (no dead_letter sink configured)".into(),
                    },
                },
                Evaluation::Records(records) => RuleResult::Records {
                    records: records
                        .into_iter()
                        .map(|record| RecordOutcome {
                            sinks: rule
                                .to
                                .iter()
                                .map(|&s| {
                                    let sink = &plan.sinks[s];
                                    SinkAction {
                                        sink: sink.name.to_string(),
                                        would: crate::sink::would(&sink.settings, &origin, &record),
                                    }
                                })
                                .collect(),
                            record,
                        })
                        .collect(),
                },
            };
            RuleOutcome {
                rule: rule.name.to_string(),
                vars: v.vars,
                result,
            }
        })
        .collect()
}

/// Renders the outcome of `msg` under `plan` as text.
pub fn explain(plan: &Plan, msg: &Message) -> String {
    let mut out = String::new();
    let outcomes = outcomes(plan, msg);
    if outcomes.is_empty() {
        let _ = writeln!(out, "no rule matches topic {:?}", msg.topic);
    }
    for o in outcomes {
        let vars: Vec<String> = o.vars.iter().map(|(k, x)| format!("{k}={x}")).collect();
        let _ = writeln!(
            out,
            "rule {} matched{}",
            o.rule,
            if vars.is_empty() {
                String::new()
            } else {
                format!(" ({})", vars.join(", "))
            }
        );
        match o.result {
            RuleResult::Filtered => {
                let _ = writeln!(out, "  filtered out: nothing is written");
            }
            RuleResult::Failed { stage, error, then } => {
                let _ = writeln!(out, "  {stage} failed: {error}");
                let _ = writeln!(out, "  -> {then}");
            }
            RuleResult::Records { records } => {
                if records.is_empty() {
                    let _ = writeln!(out, "  no records");
                }
                for r in records {
                    let _ = writeln!(out, "  record {}", r.record);
                    for s in r.sinks {
                        let _ = writeln!(out, "    -> {}: {}", s.sink, s.would);
                    }
                }
            }
        }
    }
    out
}
