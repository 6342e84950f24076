//! Readiness: what `/readyz` reports, kept by the components themselves.
//!
//! Each component that can stop the bridge from doing its job holds a [`Status`] and
//! says when it starts or stops being able to: the source (connected to the external
//! broker, or the embedded broker listening), each sink (its last write round did not
//! fail transiently), the spool (not full). `app` collects them in a [`Readiness`],
//! which the admin server reads. A status update is an atomic store on the hot path and
//! takes a lock only when the state changes; reading it takes no part in delivery.
//!
//! This module imports nothing of the crate: any component may use it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One component's readiness; cheap to clone (every clone is the same status).
#[derive(Clone, Debug)]
pub struct Status(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    ok: AtomicBool,
    /// Why it is not ready (kept while `ok` is false; set before `ok` is cleared).
    reason: Mutex<String>,
}

impl Status {
    /// A status that starts ready.
    pub fn ready() -> Status {
        Status(Arc::new(Inner {
            ok: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
        }))
    }

    /// A status that starts not ready, for `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Status {
        Status(Arc::new(Inner {
            ok: AtomicBool::new(false),
            reason: Mutex::new(reason.into()),
        }))
    }

    /// Marks it ready; returns whether that is a change.
    pub fn set_ready(&self) -> bool {
        !self.0.ok.swap(true, Ordering::AcqRel)
    }

    /// Marks it not ready for `reason` (the latest reason is kept); returns whether that
    /// is a change.
    pub fn set_not_ready(&self, reason: impl Into<String>) -> bool {
        *self.0.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
        self.0.ok.swap(false, Ordering::AcqRel)
    }

    pub fn is_ready(&self) -> bool {
        self.0.ok.load(Ordering::Acquire)
    }

    /// None when ready; otherwise why not.
    pub fn problem(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        let reason = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
        // Ready again between the two reads: report it as ready.
        (!self.is_ready()).then(|| reason.clone())
    }
}

/// Every component's status, by name (`bridge`, `spool`, `sink <name>`, `source`);
/// cheap to clone (every clone is the same registry). Components are added as they
/// start, so a component not started yet is not listed: `app` adds a `bridge` status
/// first, ready once everything runs.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Vec<(String, Status)>>>,
    /// Components whose problems are reported as warnings: they do not make the bridge
    /// unready (`config`: the last reload failed, the previous config still runs).
    warnings: Arc<Mutex<Vec<(String, Status)>>>,
}

/// A component that is not ready, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub component: String,
    pub reason: String,
}

impl Readiness {
    /// Adds a component, or replaces the status of one of that name (a sink a config
    /// reload started again); its name appears in reports.
    pub fn add(&self, component: impl Into<String>, status: Status) {
        let component = component.into();
        let mut checks = self.checks();
        match checks.iter_mut().find(|(name, _)| *name == component) {
            Some(entry) => entry.1 = status,
            None => checks.push((component, status)),
        }
    }

    /// Removes a component (a sink a config reload removed).
    pub fn remove(&self, component: &str) {
        self.checks().retain(|(name, _)| name != component);
    }

    /// Adds a component whose problems are warnings (see [`Readiness::warnings`]).
    pub fn add_warning(&self, component: impl Into<String>, status: Status) {
        self.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((component.into(), status));
    }

    /// The warning components that have a problem: reported, but the bridge is ready.
    pub fn warnings(&self) -> Vec<Problem> {
        report(&self.warnings.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, Vec<(String, Status)>> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The components that are not ready, in the order they were added; empty: ready.
    pub fn problems(&self) -> Vec<Problem> {
        report(&self.checks())
    }

    /// The status of `component`, if it was added.
    pub fn get(&self, component: &str) -> Option<Status> {
        self.checks()
            .iter()
            .find(|(name, _)| name == component)
            .map(|(_, s)| s.clone())
    }
}

/// The components of `checks` that have a problem.
fn report(checks: &[(String, Status)]) -> Vec<Problem> {
    checks
        .iter()
        .filter_map(|(component, status)| {
            status.problem().map(|reason| Problem {
                component: component.clone(),
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reports_changes_and_the_latest_reason() {
        let s = Status::ready();
        assert!(s.is_ready() && s.problem().is_none());
        assert!(s.set_not_ready("connection refused"));
        assert!(!s.set_not_ready("timed out"), "no change");
        assert_eq!(s.problem().as_deref(), Some("timed out"));
        assert!(s.set_ready());
        assert!(!s.set_ready());
        assert_eq!(s.problem(), None);
    }

    #[test]
    fn readiness_names_every_component_that_is_not_ready() {
        let source = Status::not_ready("not connected yet");
        let sink = Status::ready();
        let spool = Status::ready();
        let r = Readiness::default();
        r.add("source", source.clone());
        r.add("sink db", sink.clone());
        r.add("spool", spool.clone());
        assert_eq!(r.problems().len(), 1);
        source.set_ready();
        assert!(r.problems().is_empty());
        sink.set_not_ready("write failed: connection refused");
        spool.set_not_ready("full");
        assert_eq!(
            r.problems(),
            vec![
                Problem {
                    component: "sink db".into(),
                    reason: "write failed: connection refused".into()
                },
                Problem {
                    component: "spool".into(),
                    reason: "full".into()
                },
            ]
        );
        assert!(r.get("spool").is_some_and(|s| !s.is_ready()));
    }
}
