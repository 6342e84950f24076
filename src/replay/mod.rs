//! `mqbridge replay`: dead letters sent again, once their cause is fixed.
//!
//! A dead-letter file (JSON lines, as the `file` sink writes them; see [`letter`]) is read
//! top to bottom. Each letter goes back the way it failed, under the *current* config:
//!
//! - **A sink failed it** (`sink` is set): its `record` is written to that sink again,
//!   with the original origin (message id, topic, payload, received_at, rule, source), so
//!   templates render as before and the webhook's `Idempotency-Key` is the original
//!   message's id. The rule's topic captures (`vars`), which a letter does not keep, are
//!   taken again from the rule of that name when it still matches the topic.
//! - **The rule failed it** (`sink: null`: invalid JSON, a failing jq program): the
//!   message is rebuilt and evaluated by the rule named in the letter, and its records
//!   are written to each of that rule's sinks. If one of them fails after another took
//!   the records, the letter is not marked, and a later replay writes to all of them again
//!   (at least once: the webhook's key and a conflict key let the receiver drop repeats).
//!   A message the rule now filters out counts as replayed, with nothing written.
//!
//! Writes run as [`Replayer::replay`] for one letter (what a dashboard's replay button
//! calls) and [`replay_file`] for a file. A transient failure is retried up to
//! [`ATTEMPTS`] times with the sink's own backoff (`retry:`); what still fails, or fails
//! permanently, is reported and left for next time. Nothing is dead-lettered again.
//!
//! A letter that succeeds is marked in the file's [`sidecar`] (`FILE.replayed`, appended
//! and fsynced), which later replays skip. The dead-letter file itself is only read: a
//! running mqbridge may be appending to it.

pub mod letter;
pub mod sidecar;

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt as _;
use tokio::sync::OnceCell;

use crate::config::Plan;
use crate::eval_pool::{EvalError, EvalPool};
use crate::record::Record;
use crate::rule::Evaluation;
use crate::sink::retry::Backoff;
use crate::sink::{self, Delivery, ErrorKind, OpenContext, Origin, Outcome, Sink, SinkError};
use crate::topic::Vars;
pub use letter::{Letter, LetterError};
use sidecar::Sidecar;

/// Attempts in all for a record that fails transiently (fewer when the sink's
/// `retry.max_attempts` says so): replay is run by a person waiting for it, and what
/// still fails is left for the next replay.
pub const ATTEMPTS: u32 = 3;

/// Why one letter was not replayed. It is left for a later replay either way.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("sink {0:?} is not in the config")]
    NoSink(String),
    #[error("rule {0:?} is not in the config")]
    NoRule(Arc<str>),
    #[error("rule {rule} no longer matches topic {topic:?}")]
    NotMatched { rule: Arc<str>, topic: String },
    /// The sink's error quotes its cause (see [`sink::OpenError`]).
    #[error("sink {sink}: cannot open: {error}")]
    Open {
        sink: Arc<str>,
        error: sink::OpenError,
    },
    #[error("sink {sink}: {} error after {attempts} attempt(s): {error}", kind(error.kind))]
    Write {
        sink: Arc<str>,
        error: SinkError,
        attempts: u32,
    },
    #[error("rule {rule}: {stage} failed: {error}")]
    Rule {
        rule: Arc<str>,
        stage: &'static str,
        error: String,
    },
    #[error("rule {rule}: {error}")]
    Eval { rule: Arc<str>, error: EvalError },
}

fn kind(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Transient => "transient",
        ErrorKind::Permanent => "permanent",
        ErrorKind::Panic => "panic",
    }
}

/// Why a dead-letter file could not be replayed at all.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot record replayed letters in {}: {error}", path.display())]
    Sidecar {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What a replayed letter came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// Its records were written (one for a sink's letter; a rule's may make several, or none).
    Written { records: usize },
    /// Its rule now filters the message out: nothing to write.
    FilteredOut,
}

/// Which letters to replay (`--sink`, `--rule`, `--since`); empty: all of them.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only letters of this sink (rule failures have none).
    pub sink: Option<String>,
    pub rule: Option<String>,
    /// Only letters whose last attempt was at or after this.
    pub since: Option<jiff::Timestamp>,
}

impl Filter {
    pub fn admits(&self, l: &Letter) -> bool {
        self.sink
            .as_ref()
            .is_none_or(|s| l.sink.as_ref() == Some(s))
            && self.rule.as_ref().is_none_or(|r| **r == *l.rule)
            && self.since.is_none_or(|t| l.last_attempt_at >= t)
    }
}

/// A letter that was not replayed: its line (from 1), its message id when it could be
/// read, and why.
#[derive(Debug)]
pub struct Failed {
    pub line: usize,
    pub message_id: Option<String>,
    pub reason: String,
}

/// What [`replay_file`] did.
#[derive(Debug, Default)]
pub struct Summary {
    pub replayed: usize,
    pub failed: Vec<Failed>,
    /// Marked in the sidecar by an earlier replay.
    pub skipped: usize,
    pub filtered_out: usize,
    /// The file ended in a line without its line feed (being written): left alone.
    pub incomplete_tail: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replayed {}, failed {}, skipped {} (already replayed), filtered out {}",
            self.replayed,
            self.failed.len(),
            self.skipped,
            self.filtered_out
        )
    }
}

/// Sends letters again under one config; opens each sink the first time a letter needs
/// it and keeps it open.
pub struct Replayer {
    plan: Arc<Plan>,
    eval: EvalPool,
    /// By the plan's sink index.
    sinks: Vec<OnceCell<Arc<dyn Sink>>>,
}

impl Replayer {
    /// A replayer for `plan`, running rules and `columns:` programs on `eval`. Republish
    /// sinks cannot be opened (there is no broker connection here).
    pub fn new(plan: Arc<Plan>, eval: EvalPool) -> Replayer {
        let sinks = plan.sinks.iter().map(|_| OnceCell::new()).collect();
        Replayer { plan, eval, sinks }
    }

    /// Replays one letter (not looking at any sidecar: the caller marks it).
    pub async fn replay(&self, letter: &Letter) -> Result<Replayed, ReplayError> {
        match &letter.sink {
            Some(name) => {
                let i = self.sink_index(name)?;
                let origin = letter.origin(self.vars(letter));
                self.write(i, Arc::new(origin), vec![letter.record.clone().into()])
                    .await?;
                Ok(Replayed::Written { records: 1 })
            }
            None => self.rerun(letter).await,
        }
    }

    fn sink_index(&self, name: &str) -> Result<usize, ReplayError> {
        self.plan
            .sinks
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| ReplayError::NoSink(name.to_string()))
    }

    /// The topic captures of the letter's rule, when it still exists and matches.
    fn vars(&self, letter: &Letter) -> Vars {
        self.plan
            .rules
            .iter()
            .find(|r| r.name == letter.rule)
            .and_then(|r| r.matches(&letter.topic))
            .map(|v| Vars::new(&v))
            .unwrap_or_default()
    }

    /// The message through its rule again, and the records to the rule's sinks.
    async fn rerun(&self, letter: &Letter) -> Result<Replayed, ReplayError> {
        let rule_name = Arc::clone(&letter.rule);
        let Some(i) = self.plan.rules.iter().position(|r| r.name == rule_name) else {
            return Err(ReplayError::NoRule(rule_name));
        };
        let msg = letter.message();
        let plan = Arc::clone(&self.plan);
        let limit = self.eval.limit();
        let evaluated = self
            .eval
            .run(move || {
                let rule = &plan.rules[i];
                let out = rule.matches(&msg.topic).map(|vars| {
                    let evaluation = rule.evaluate(&msg, &vars, limit);
                    (Vars::new(&vars), evaluation)
                });
                msg.ack.settle();
                out
            })
            .await
            .map_err(|error| ReplayError::Eval {
                rule: Arc::clone(&rule_name),
                error,
            })?;
        let Some((vars, evaluation)) = evaluated else {
            return Err(ReplayError::NotMatched {
                rule: rule_name,
                topic: letter.topic.clone(),
            });
        };
        let records = match evaluation {
            Evaluation::Records(records) => records,
            Evaluation::Filtered => return Ok(Replayed::FilteredOut),
            Evaluation::Failed { stage, error } => {
                return Err(ReplayError::Rule {
                    rule: rule_name,
                    stage,
                    error,
                });
            }
        };
        let origin = Arc::new(letter.origin(vars));
        let n = records.len();
        if n > 0 {
            for &s in &self.plan.rules[i].to {
                self.write(s, Arc::clone(&origin), records.to_vec()).await?;
            }
        }
        Ok(Replayed::Written { records: n })
    }

    /// The sink of index `i`, opened on first use.
    async fn sink(&self, i: usize) -> Result<&Arc<dyn Sink>, ReplayError> {
        let sp = &self.plan.sinks[i];
        self.sinks[i]
            .get_or_try_init(|| async {
                let ctx = OpenContext {
                    publisher: None,
                    eval: &self.eval,
                };
                sink::open(&sp.settings, ctx)
                    .await
                    .map_err(|error| ReplayError::Open {
                        sink: Arc::clone(&sp.name),
                        error,
                    })
            })
            .await
    }

    /// Writes `records` of `origin` to sink `i` as one batch, retrying what fails
    /// transiently (see [`ATTEMPTS`]); the first error that remains, if any.
    async fn write(
        &self,
        i: usize,
        origin: Arc<Origin>,
        records: Vec<Record>,
    ) -> Result<(), ReplayError> {
        let sink = self.sink(i).await?;
        let sp = &self.plan.sinks[i];
        let retry = sp.settings.spec().common().retry;
        let attempts = match retry.max_attempts {
            0 => ATTEMPTS,
            n => n.min(ATTEMPTS),
        };
        let mut backoff = Backoff::new(retry);
        let mut pending: Vec<Record> = records;
        let mut attempt = 0;
        let mut permanent: Option<SinkError> = None;
        loop {
            attempt += 1;
            let batch: Vec<Delivery> = pending
                .iter()
                .map(|record| Delivery {
                    record: record.clone(),
                    origin: Arc::clone(&origin),
                    ack: crate::delivery::Ack::detached(),
                })
                .collect();
            let outcomes = match AssertUnwindSafe(sink.write(&batch)).catch_unwind().await {
                Ok(o) if o.len() == batch.len() => o,
                Ok(_) => vec![
                    Outcome::Failed(SinkError::transient("sink bug: outcomes missing"));
                    batch.len()
                ],
                Err(_) => vec![
                    Outcome::Failed(SinkError {
                        kind: ErrorKind::Panic,
                        message: "sink panicked".into(),
                        retry_after: None,
                    });
                    batch.len()
                ],
            };
            let mut again = Vec::new();
            let mut transient: Option<SinkError> = None;
            for (d, outcome) in batch.into_iter().zip(outcomes) {
                match outcome.result() {
                    Ok(()) => d.ack.settle(),
                    Err(e) if e.kind == ErrorKind::Permanent => {
                        d.ack.settle();
                        permanent.get_or_insert(e);
                    }
                    Err(e) => {
                        d.ack.settle();
                        again.push(d.record);
                        transient.get_or_insert(e);
                    }
                }
            }
            match transient {
                Some(e) if attempt < attempts => {
                    pending = again;
                    tokio::time::sleep(backoff.next_delay(e.retry_after)).await;
                }
                transient => {
                    return match permanent.or(transient) {
                        None => Ok(()),
                        Some(error) => Err(ReplayError::Write {
                            sink: Arc::clone(&sp.name),
                            error,
                            attempts: attempt,
                        }),
                    };
                }
            }
        }
    }
}

/// Replays the letters of the file at `path` that `filter` admits and its sidecar does
/// not list, marking each that succeeds. Only failing to read the file or to write the
/// sidecar stops it; each letter's failure is in the summary.
pub async fn replay_file(
    replayer: &Replayer,
    path: &Path,
    filter: &Filter,
) -> Result<Summary, FileError> {
    let bytes = std::fs::read(path).map_err(|error| FileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let sidecar_path = sidecar::path_for(path);
    let sidecar_error = |error| FileError::Sidecar {
        path: sidecar_path.clone(),
        error,
    };
    let mut marks = Sidecar::open(sidecar_path.clone()).map_err(sidecar_error)?;
    let mut summary = Summary::default();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // The text after the last line feed: empty, or a letter still being written.
    let tail = lines.pop().unwrap_or_default();
    summary.incomplete_tail = !tail.is_empty();
    for (n, line) in lines.into_iter().enumerate() {
        let line_no = n + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let failed = |message_id: Option<String>, reason: String| Failed {
            line: line_no,
            message_id,
            reason,
        };
        let letter = match std::str::from_utf8(line)
            .map_err(|e| format!("not UTF-8: {e}"))
            .and_then(|l| Letter::parse(l).map_err(|e| e.to_string()))
        {
            Ok(l) => l,
            Err(reason) => {
                summary.failed.push(failed(None, reason));
                continue;
            }
        };
        if !filter.admits(&letter) {
            summary.filtered_out += 1;
        } else if marks.contains(&letter.id) {
            summary.skipped += 1;
        } else {
            match replayer.replay(&letter).await {
                Ok(_) => {
                    marks
                        .mark(&letter.id, &letter.message_id)
                        .map_err(sidecar_error)?;
                    summary.replayed += 1;
                }
                Err(e) => summary
                    .failed
                    .push(failed(Some(letter.message_id), e.to_string())),
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
