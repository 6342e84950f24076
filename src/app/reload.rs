//! Config reload: load the file again, and swap the new rules, sinks and dead-letter
//! target in without losing or duplicating a message.
//!
//! 1. The file is loaded as `run` and `check` load it ([`config::load`] with the
//!    preflight checks). On any error the running config stays, every error is logged
//!    with its file:line:col, the `config` warning of `/readyz` names the failure and
//!    `mqbridge_config_reload_failures_total` counts it.
//! 2. Sinks: a sink whose settings (as written, after `${VAR}` expansion) and role (dead
//!    letter or not) are unchanged keeps running: same queue, same driver, same
//!    connections, so its per-topic order holds. A new or changed sink is opened and its
//!    driver started; if one fails to open, the reload fails and those already opened end
//!    (nothing was routed to them).
//! 3. The dead-letter target is switched for every driver at once ([`DeadLetter::set`]).
//! 4. The router gets the new rules and sink queues ([`Routing`]) and takes them between
//!    two batches (see [`crate::pipeline::Pipeline::run`]): each message is routed once,
//!    by the old routing or the new.
//! 5. A changed or removed sink is no longer held here; the router drops its queue once
//!    the batches evaluated with the old routing are dispatched, and its driver then
//!    delivers what is queued and ends. Its records settle as before, so acknowledgements
//!    keep their order (they follow settlement, whichever driver settles).
//!
//! 6. The external broker's subscriptions follow the rules' topic filters: new ones are
//!    subscribed to, those no rule reads any more unsubscribed, on the running
//!    connection (see [`crate::source::mqtt`]).
//!
//! What a reload does not apply (listeners, the broker connection, the spool, `admin`,
//! the timeouts) is logged as a warning naming each changed setting. While `broker:`
//! itself waits for a restart, so do the subscriptions (a `share_group` is part of them).

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::Wiring;
use super::trigger::Cause;
use crate::broker::Broker;
use crate::config::fingerprint::{self, Fingerprint};
use crate::config::{self, Plan};
use crate::health::Status;
use crate::pipeline::Routing;
use crate::sink::driver::DeadLetter;
use crate::sink::queue::SinkQueue;

/// What tells a running sink from another, for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SinkKey<'a> {
    pub name: &'a str,
    pub fingerprint: Fingerprint,
    pub dead_letter: bool,
}

impl<'a> SinkKey<'a> {
    fn of_plan(plan: &'a Plan) -> Vec<SinkKey<'a>> {
        plan.sinks
            .iter()
            .enumerate()
            .map(|(i, sp)| SinkKey {
                name: &sp.name,
                fingerprint: sp.fingerprint,
                dead_letter: plan.dead_letter == Some(i),
            })
            .collect()
    }
}

/// For each new sink, the running sink it keeps (same name, settings and role), if any.
pub(crate) fn reuse(running: &[SinkKey<'_>], new: &[SinkKey<'_>]) -> Vec<Option<usize>> {
    new.iter()
        .map(|n| running.iter().position(|r| r == n))
        .collect()
}

/// A running sink.
struct Running {
    name: Arc<str>,
    fingerprint: Fingerprint,
    dead_letter: bool,
    queue: SinkQueue,
}

/// Applies reloads; lives as long as the bridge runs.
pub(super) struct Reloader<'a> {
    sinks: Vec<Running>,
    restart_only: Vec<(&'static str, Fingerprint)>,
    routing: mpsc::Sender<Routing>,
    dead_letter: DeadLetter,
    wiring: &'a Wiring<'a>,
    /// The embedded broker, whose users and ACL a reload replaces.
    broker: Option<&'a Broker>,
    /// The `config` warning of `/readyz`: the last reload failed.
    status: Status,
    /// The external broker's topic filters, which its source subscribes to.
    filters: Option<watch::Sender<Vec<String>>>,
}

impl<'a> Reloader<'a> {
    pub fn new(
        plan: &Plan,
        queues: &[SinkQueue],
        routing: mpsc::Sender<Routing>,
        dead_letter: DeadLetter,
        wiring: &'a Wiring<'a>,
        broker: Option<&'a Broker>,
        filters: Option<watch::Sender<Vec<String>>>,
    ) -> Reloader<'a> {
        let status = Status::ready();
        wiring.readiness.add_warning("config", status.clone());
        metrics::gauge!("mqbridge_config_last_reload_success").set(1.0);
        metrics::counter!("mqbridge_config_reload_failures_total").absolute(0);
        Reloader {
            sinks: SinkKey::of_plan(plan)
                .into_iter()
                .zip(queues)
                .map(|(k, q)| Running {
                    name: Arc::from(k.name),
                    fingerprint: k.fingerprint,
                    dead_letter: k.dead_letter,
                    queue: q.clone(),
                })
                .collect(),
            restart_only: plan.restart_only.clone(),
            routing,
            dead_letter,
            wiring,
            broker,
            status,
            filters,
        }
    }

    /// Loads `path` and applies it, or keeps the running config and reports why not.
    pub async fn reload(&mut self, path: &Path, cause: Cause) {
        tracing::info!(file = %path.display(), %cause, "reloading the config");
        let file = path.to_path_buf();
        let loaded =
            tokio::task::spawn_blocking(move || config::load(&file, config::Checks::ForRun)).await;
        let result = match loaded {
            Ok(Ok(plan)) => self.apply(plan).await,
            Ok(Err(errs)) => {
                for e in &errs.0 {
                    tracing::error!("{e}");
                }
                Err(format!(
                    "{} error(s) in the new config, the previous one still runs: {errs}",
                    errs.0.len()
                ))
            }
            Err(e) => Err(format!("loading the config failed: {e}")),
        };
        match result {
            Ok(()) => {
                self.status.set_ready();
                metrics::gauge!("mqbridge_config_last_reload_success").set(1.0);
            }
            Err(reason) => {
                tracing::error!(file = %path.display(), "config reload failed; the previous config still runs: {reason}");
                self.status
                    .set_not_ready(format!("reload failed: {reason}"));
                metrics::gauge!("mqbridge_config_last_reload_success").set(0.0);
                metrics::counter!("mqbridge_config_reload_failures_total").increment(1);
            }
        }
    }

    /// Swaps `plan` in (see the module docs).
    async fn apply(&mut self, plan: Plan) -> Result<(), String> {
        let plan = Arc::new(plan);
        let running: Vec<SinkKey> = self
            .sinks
            .iter()
            .map(|r| SinkKey {
                name: &r.name,
                fingerprint: r.fingerprint,
                dead_letter: r.dead_letter,
            })
            .collect();
        let new = SinkKey::of_plan(&plan);
        let reuse = reuse(&running, &new);
        let mut queues: Vec<Option<SinkQueue>> = reuse
            .iter()
            .map(|r| r.map(|j| self.sinks[j].queue.clone()))
            .collect();
        // Open what is new or changed, the dead-letter sink first.
        let mut opened = Vec::new();
        for i in plan.dead_letter.into_iter().chain(0..plan.sinks.len()) {
            if queues[i].is_none() {
                let is_dead_letter = plan.dead_letter == Some(i);
                let queue = self
                    .wiring
                    .open(&plan.sinks[i], &self.dead_letter, is_dead_letter)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                queues[i] = Some(queue);
                opened.push(i);
            }
        }
        let queues: Vec<SinkQueue> = queues
            .into_iter()
            .map(|q| q.expect("every sink kept or opened"))
            .collect();

        // Everything opened: from here on nothing fails.
        self.dead_letter
            .set(plan.dead_letter.map(|i| queues[i].clone()));
        let stopped: Vec<Arc<str>> = self
            .sinks
            .iter()
            .enumerate()
            .filter(|(j, _)| !reuse.contains(&Some(*j)))
            .map(|(_, r)| Arc::clone(&r.name))
            .collect();
        for name in &stopped {
            if !plan.sinks.iter().any(|sp| sp.name == *name) {
                self.wiring.unregister(name);
            }
        }
        for &i in &opened {
            self.wiring
                .register(&plan.sinks[i], &queues[i], plan.dead_letter == Some(i));
        }
        if let Some(admin) = self.wiring.admin {
            admin.set_plan(Arc::clone(&plan));
        }
        if let (Some(broker), Some(embedded)) = (self.broker, &plan.embedded) {
            broker.set_auth(
                embedded.users.clone(),
                embedded.allow_anonymous,
                embedded.acl.clone(),
                &embedded.auth,
            );
        }
        let needs_restart = fingerprint::changed(&self.restart_only, &plan.restart_only);
        for setting in &needs_restart {
            tracing::warn!(
                setting,
                "config reload: this setting changed but needs a restart; the running value stays"
            );
        }
        // The running list keeps the values in force (the restart-only ones are not).
        let kept = reuse.iter().filter(|r| r.is_some()).count();
        self.sinks = new
            .iter()
            .zip(&queues)
            .map(|(k, q)| Running {
                name: Arc::from(k.name),
                fingerprint: k.fingerprint,
                dead_letter: k.dead_letter,
                queue: q.clone(),
            })
            .collect();
        let rules = plan.rules.len();
        let started: Vec<&str> = opened.iter().map(|&i| &*plan.sinks[i].name).collect();
        tracing::info!(
            rules,
            sinks_kept = kept,
            sinks_started = ?started,
            sinks_stopping = ?stopped,
            "config reloaded"
        );
        let (applied, routed) = oneshot::channel();
        let routing = Routing {
            rules: Arc::clone(&plan.rules),
            sinks: queues,
            applied: Some(applied),
        };
        if self.routing.send(routing).await.is_err() || routed.await.is_err() {
            tracing::debug!("config reload: the router has ended");
            return Ok(());
        }
        // Only now that the router has the new rules: a message on a new filter must not
        // meet the old ones.
        if let (Some(filters), Some(b)) = (&self.filters, &plan.broker) {
            if needs_restart.contains(&"broker") {
                tracing::warn!(
                    "config reload: the broker's subscriptions change with `broker:` at the next restart"
                );
            } else {
                filters.send_if_modified(|running| {
                    let changed = *running != b.subscriptions;
                    if changed {
                        running.clone_from(&b.subscriptions);
                    }
                    changed
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, fingerprint: Fingerprint, dead_letter: bool) -> SinkKey<'_> {
        SinkKey {
            name,
            fingerprint,
            dead_letter,
        }
    }

    #[test]
    fn unchanged_sinks_are_kept_and_changed_ones_replaced() {
        let running = [key("a", 1, false), key("b", 2, false), key("dlq", 3, true)];
        let new = [
            key("dlq", 3, true), // unchanged, moved: kept
            key("b", 20, false), // settings changed: new
            key("c", 4, false),  // added: new
            key("a", 1, false),  // unchanged: kept
        ];
        assert_eq!(reuse(&running, &new), vec![Some(2), None, None, Some(0)]);
    }

    #[test]
    fn a_sink_that_becomes_or_stops_being_the_dead_letter_is_replaced() {
        // The dead-letter sink's driver dead-letters nowhere; the others' to it: a role
        // change needs a driver of the other kind.
        let running = [key("a", 1, false), key("dlq", 3, true)];
        let new = [key("a", 1, true), key("dlq", 3, false)];
        assert_eq!(reuse(&running, &new), vec![None, None]);
    }

    #[test]
    fn a_renamed_sink_is_a_new_one() {
        let running = [key("a", 1, false)];
        assert_eq!(reuse(&running, &[key("b", 1, false)]), vec![None]);
    }
}
