//! `/api/v1/…`: the running config as JSON, read-only. What a route answers is built
//! from the plan once at start (names, filters, targets, types; nothing secret: sink
//! descriptions are the ones `mqbridge check` prints, URLs without passwords) plus the
//! live values read per request (queue depths, health, the embedded broker's clients).

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State as Extract};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::State;
use crate::broker::Client;
use crate::config::SinkPlan;
use crate::health::Status;
use crate::rule::Rule;
use crate::sink::driver::Recent;
use crate::sink::queue::QueueProbe;

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
    let plan = state.plan();
    let rules: Vec<RuleView> = plan
        .rules
        .iter()
        .map(|r| RuleView::of(r, &plan.sinks))
        .collect();
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

/// The embedded broker's sessions, connected or offline (persistent sessions waiting
/// for their client), by client id; 404 when mqbridge reads an external broker.
pub async fn clients(Extract(state): Extract<Arc<State>>) -> Response {
    let Some(broker) = state.broker.get() else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": "no embedded broker: mqbridge reads an external broker (`broker:`), whose clients it does not see",
            })),
        )
            .into_response();
    };
    let clients: Vec<serde_json::Value> = broker.clients().iter().map(client_json).collect();
    Json(serde_json::json!({ "clients": clients })).into_response()
}

/// The latest dead letters, newest first: `?limit=N` (default 20, at most
/// [`Recent::KEPT`]), each as the dead-letter sink got it (reason in `error_kind` and
/// `error`), or with `"dropped": true` when no dead-letter sink is configured.
pub async fn dead_letters(
    Extract(state): Extract<Arc<State>>,
    RawQuery(q): RawQuery,
) -> Json<serde_json::Value> {
    let limit = query(q.as_deref(), "limit").unwrap_or(20).min(Recent::KEPT);
    let letters = state
        .dead_letters
        .get()
        .map_or_else(Vec::new, |r| r.latest(limit));
    Json(serde_json::json!({ "dead_letters": letters, "kept": Recent::KEPT }))
}

/// The value of `key` in a query string, parsed.
pub(super) fn query<T: std::str::FromStr>(query: Option<&str>, key: &str) -> Option<T> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// The spool's figures (bytes, bound, backlog, cursor, segments, full), or 404 without
/// a spool.
pub async fn spool(Extract(state): Extract<Arc<State>>) -> Response {
    match state.spool.get() {
        Some(probe) => Json(probe.stats()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "no spool configured (`spool:`)" })),
        )
            .into_response(),
    }
}

/// One session as `/api/v1/clients` lists it: `connected`, and (while connected) the
/// peer address, protocol version and connection time (RFC 3339); null when offline.
fn client_json(c: &Client) -> serde_json::Value {
    let conn = c.connection.as_ref();
    let subscriptions: Vec<serde_json::Value> = c
        .subscriptions
        .iter()
        .map(|(filter, qos)| serde_json::json!({ "filter": filter, "qos": qos }))
        .collect();
    serde_json::json!({
        "client_id": c.client_id,
        "username": c.username,
        "connected": conn.is_some(),
        "peer": conn.map(|c| c.peer.to_string()),
        "protocol": conn.map(|c| c.version.name()),
        "connected_since": conn.map(|c| c.since.to_string()),
        "subscriptions": subscriptions,
        "queued": c.queued,
        "inflight": c.inflight,
        "session_expiry": c.session_expiry,
    })
}

/// Any other path: 404 with a JSON body that lists the routes.
pub async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({
            "error": "no such route",
            "routes": [
                "/healthz", "/readyz", "/metrics", "/dashboard/",
                "/api/v1/rules", "/api/v1/rules/{name}/tail", "/api/v1/sinks", "/api/v1/clients",
                "/api/v1/dead-letters", "/api/v1/dead-letters/{id}/replay", "/api/v1/spool",
                "/api/v1/try",
            ],
        })),
    )
        .into_response()
}
