//! `/api/v1/…`: the running config as JSON, read-only. What a route answers is built
//! from the plan once at start (names, filters, targets, types; nothing secret: sink
//! descriptions are the ones `mqbridge check` prints, URLs without passwords) plus the
//! live values read per request (queue depths, health).

use std::sync::Arc;

use axum::Json;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::State;
use crate::config::SinkPlan;
use crate::health::Status;
use crate::rule::Rule;
use crate::sink::driver::QueueProbe;

/// A rule as `/api/v1/rules` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleView {
    pub name: String,
    /// Topic filters as written (`{name}` captures included).
    pub from: Vec<String>,
    pub decode: String,
    pub filter: bool,
    pub transform: bool,
    /// Sink names.
    pub to: Vec<String>,
}

/// A sink as `/api/v1/sinks` lists it: what the plan says, and how to read its live state.
pub struct SinkView {
    pub name: Arc<str>,
    /// `postgres`, `sqlite`, `webhook`, `republish` or `file`.
    pub kind: &'static str,
    /// As `mqbridge check` prints it.
    pub description: String,
    pub dead_letter: bool,
    pub queue: QueueProbe,
    pub health: Status,
}

impl RuleView {
    /// `rule` as configured; `sinks` names its targets.
    pub fn of(rule: &Rule, sinks: &[SinkPlan]) -> RuleView {
        RuleView {
            name: rule.name.to_string(),
            from: rule.from.iter().map(|f| f.pattern().to_string()).collect(),
            decode: rule.decode.to_string(),
            filter: rule.filter.is_some(),
            transform: rule.transform.is_some(),
            to: rule.to.iter().map(|&i| sinks[i].name.to_string()).collect(),
        }
    }
}

pub async fn rules(Extract(state): Extract<Arc<State>>) -> Json<serde_json::Value> {
    let rules = state.rules().clone();
    Json(serde_json::json!({ "rules": rules }))
}

pub async fn sinks(Extract(state): Extract<Arc<State>>) -> Json<serde_json::Value> {
    let sinks: Vec<serde_json::Value> = state
        .sinks()
        .iter()
        .map(|s| {
            let problem = s.health.problem();
            serde_json::json!({
                "name": &*s.name,
                "type": s.kind,
                "description": s.description,
                "dead_letter": s.dead_letter,
                "queue_depth": s.queue.depth(),
                "queue_capacity": s.queue.capacity(),
                "healthy": problem.is_none(),
                "problem": problem,
            })
        })
        .collect();
    Json(serde_json::json!({ "sinks": sinks }))
}

/// Any other path: 404 with a JSON body that lists the routes.
pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error": "no such route",
            "routes": ["/healthz", "/readyz", "/metrics", "/api/v1/rules", "/api/v1/sinks"],
        })),
    )
        .into_response()
}
