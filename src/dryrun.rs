//! `mqbridge try`: one message through the rules, printing each record and what each sink
//! would do with it, without connecting to anything or writing anywhere. The rules run as
//! in the pipeline: under [`EVAL_TIMEOUT`], on a thread with the evaluation pool's stack.

use std::fmt::Write as _;

use crate::config::Plan;
use crate::eval_pool::EVAL_TIMEOUT;
use crate::message::Message;
use crate::pipeline::evaluate;
use crate::rule::Evaluation;
use crate::rule::jq::THREAD_STACK;
use crate::sink::Origin;

/// Renders the outcome of `msg` under `plan` as text.
pub fn explain(plan: &Plan, msg: &Message) -> String {
    let mut out = String::new();
    let verdicts = std::thread::scope(|s| {
        std::thread::Builder::new()
            .stack_size(THREAD_STACK)
            .spawn_scoped(s, || evaluate(&plan.rules, msg, EVAL_TIMEOUT))
            .expect("a thread to evaluate the rules")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    if verdicts.is_empty() {
        let _ = writeln!(out, "no rule matches topic {:?}", msg.topic);
    }
    for v in verdicts {
        let rule = &plan.rules[v.rule];
        let vars: Vec<String> = v.vars.iter().map(|(k, x)| format!("{k}={x}")).collect();
        let _ = writeln!(
            out,
            "rule {} matched{}",
            rule.name,
            if vars.is_empty() {
                String::new()
            } else {
                format!(" ({})", vars.join(", "))
            }
        );
        let origin = Origin::from_message(msg, &rule.name, v.vars.clone());
        match v.evaluation {
            Evaluation::Filtered => {
                let _ = writeln!(out, "  filtered out: nothing is written");
            }
            Evaluation::Failed { stage, error } => {
                let _ = writeln!(out, "  {stage} failed: {error}");
                match plan.dead_letter {
                    Some(i) => {
                        let _ = writeln!(out, "  -> dead letter to sink {}", plan.sinks[i].name);
                    }
                    None => {
                        let _ = writeln!(out, "  -> dropped (no dead_letter sink configured)");
                    }
                }
            }
            Evaluation::Records(records) => {
                if records.is_empty() {
                    let _ = writeln!(out, "  no records");
                }
                for record in records {
                    let _ = writeln!(out, "  record {record}");
                    for &s in &rule.to {
                        let sink = &plan.sinks[s];
                        let _ = writeln!(
                            out,
                            "    -> {}: {}",
                            sink.name,
                            crate::sink::would(&sink.settings, &origin, &record)
                        );
                    }
                }
            }
        }
    }
    out
}
