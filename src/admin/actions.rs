//! The admin routes that act on the running bridge (the dashboard's buttons call them):
//!
//! - `POST /api/v1/try`: a topic and payload through the running config's rules, as
//!   `mqbridge try` does ([`crate::dryrun`]): each record and what each sink would do.
//!   Nothing is written.
//! - `GET /api/v1/rules/{name}/tail`: the rule's next outcomes as they happen
//!   ([`crate::tap`]), streamed as JSON lines.
//! - `POST /api/v1/dead-letters/{id}/replay`: one of the latest dead letters sent again
//!   through its sink (or its rule, when the rule failed it) by [`Replayer::replay`],
//!   under the running config. When the dead-letter sink is a `file`, a letter that
//!   succeeds is marked in that file's sidecar, as `mqbridge replay` marks it, so neither
//!   sends it again.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State as Extract};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::State;
use super::api::query;
use crate::config::Plan;
use crate::config::sinks::SinkSettings;
use crate::eval_pool::EvalPool;
use crate::message::Message;
use crate::replay::sidecar::{self, Sidecar};
use crate::replay::{Letter, ReplayError, Replayed, Replayer};

/// The most outcomes one tail request waits for, and the longest it waits.
const TAIL_MAX: usize = 1000;
const TAIL_MAX_WAIT: Duration = Duration::from_secs(600);

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct TryRequest {
    topic: String,
    /// The payload as text; `payload_base64` carries a binary one (CBOR, Protobuf, …).
    payload: Option<String>,
    payload_base64: Option<String>,
    #[serde(default = "qos1")]
    qos: u8,
}

impl TryRequest {
    /// The payload's bytes, or what is wrong with the request's payload fields.
    fn payload(&mut self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        match (self.payload.take(), self.payload_base64.take()) {
            (Some(_), Some(_)) => Err("payload, payload_base64: one or the other".into()),
            (Some(text), None) => Ok(text.into_bytes()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| format!("payload_base64: not valid base64: {e}")),
            (None, None) => Ok(Vec::new()),
        }
    }
}

fn qos1() -> u8 {
    1
}

/// `{"topic", "payload" | "payload_base64", "qos"}` → `{"topic", "outcomes": [...]}`
/// (see [`crate::dryrun::RuleOutcome`]); an empty list: no rule matches the topic.
pub async fn try_message(
    Extract(state): Extract<Arc<State>>,
    Json(mut req): Json<TryRequest>,
) -> Response {
    if req.topic.is_empty() || req.topic.contains(['+', '#', '\0']) {
        return error(
            StatusCode::BAD_REQUEST,
            "topic: a topic name to publish to (not empty, no wildcards)",
        );
    }
    if req.qos > 2 {
        return error(StatusCode::BAD_REQUEST, "qos: 0, 1 or 2");
    }
    let payload = match req.payload() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let plan = state.plan();
    let topic = req.topic.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        let msg = Message::detached(req.topic, payload, req.qos);
        let outcomes = crate::dryrun::outcomes(&plan, &msg);
        msg.ack.settle();
        outcomes
    })
    .await;
    match outcomes {
        Ok(outcomes) => {
            Json(serde_json::json!({ "topic": topic, "outcomes": outcomes })).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `?n=N&timeout=SECONDS` (defaults 20 and 60): a stream of JSON lines, first
/// `{"kind": "watching", ...}` once the rule is watched, then one line per outcome
/// ([`crate::tap::Event`]) until `n` of them or the timeout. 404 for a rule the running
/// config does not have.
pub async fn tail(
    Extract(state): Extract<Arc<State>>,
    Path(rule): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    if !state.plan().rules.iter().any(|r| *r.name == *rule) {
        return error(StatusCode::NOT_FOUND, format!("no rule named {rule:?}"));
    }
    let n = query(q.as_deref(), "n").unwrap_or(20).clamp(1, TAIL_MAX);
    let wait = query(q.as_deref(), "timeout")
        .map_or(Duration::from_secs(60), Duration::from_secs)
        .min(TAIL_MAX_WAIT);
    let rx = state.taps.watch(&rule, n);
    let first = serde_json::json!({ "kind": "watching", "rule": rule, "n": n });
    let deadline = tokio::time::Instant::now() + wait;
    // The watch ends with the n-th outcome, before it is sent.
    let outcomes = futures::stream::unfold(Some((rx, n)), move |watching| async move {
        let (mut rx, left) = watching?;
        let event = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        let line = serde_json::to_value(&event).ok()?;
        Some((line, (left > 1).then_some((rx, left - 1))))
    });
    let lines = futures::StreamExt::map(
        futures::StreamExt::chain(futures::stream::iter([first]), outcomes),
        |v| Ok::<_, Infallible>(Bytes::from(format!("{v}\n"))),
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Replays dead letters for the admin API: one [`Replayer`] for the running config (a
/// new one after a reload), one letter at a time (so that two clicks on one letter
/// cannot both find it unreplayed and send it twice).
#[derive(Default)]
pub struct Replays {
    eval: OnceLock<EvalPool>,
    /// Held from a letter's checks to its marks.
    one_at_a_time: tokio::sync::Mutex<()>,
    current: tokio::sync::Mutex<Option<(Arc<Plan>, Arc<Replayer>)>>,
}

impl Replays {
    /// Replays run rules on `eval` (set once the bridge has started it).
    pub fn start(&self, eval: EvalPool) {
        let _ = self.eval.set(eval);
    }

    async fn replay(&self, plan: Arc<Plan>, letter: &Letter) -> Result<Replayed, Response> {
        let Some(eval) = self.eval.get() else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the bridge is still starting",
            ));
        };
        let mut current = self.current.lock().await;
        let replayer = match &*current {
            Some((p, r)) if Arc::ptr_eq(p, &plan) => Arc::clone(r),
            _ => {
                let r = Arc::new(Replayer::new(Arc::clone(&plan), eval.clone()));
                *current = Some((plan, Arc::clone(&r)));
                r
            }
        };
        replayer.replay(letter).await.map_err(|e| {
            let status = match e {
                ReplayError::Open { .. } | ReplayError::Write { .. } => StatusCode::BAD_GATEWAY,
                _ => StatusCode::CONFLICT,
            };
            error(status, e)
        })
    }
}

/// The dead-letter file of `plan`, when its dead-letter sink is a `file`.
fn dead_letter_file(plan: &Plan) -> Option<PathBuf> {
    match &plan.sinks[plan.dead_letter?].settings {
        SinkSettings::File(f) => Some(f.path.clone()),
        _ => None,
    }
}

/// Opens the sidecar of the dead-letter file (off the runtime: it reads the file).
async fn open_sidecar(file: PathBuf) -> Result<Sidecar, Response> {
    let path = sidecar::path_for(&file);
    tokio::task::spawn_blocking(move || Sidecar::open(path))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))
}

/// Replays the dead letter `id` (as `/api/v1/dead-letters` lists it): 200 with
/// `{"replayed": true, "records": N}` (or `"filtered_out": true`); 404 for a letter no
/// longer among the latest; 409 when it was replayed already, or its rule or sink is gone;
/// 502 when its sink still fails.
pub async fn replay(Extract(state): Extract<Arc<State>>, Path(id): Path<String>) -> Response {
    match replay_letter(&state, &id).await {
        Ok(done) => Json(done).into_response(),
        Err(response) => response,
    }
}

async fn replay_letter(state: &State, id: &str) -> Result<serde_json::Value, Response> {
    let _one_at_a_time = state.replays.one_at_a_time.lock().await;
    let recent = state
        .dead_letters
        .get()
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "the bridge is starting"))?;
    let (written, replayed) = recent.get(id).ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "no such dead letter among the latest ones",
        )
    })?;
    let already = || {
        error(
            StatusCode::CONFLICT,
            "this dead letter was replayed already",
        )
    };
    if replayed {
        return Err(already());
    }
    let letter = Letter::parse(&written.to_string())
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let plan = state.plan();
    let mut marks = match dead_letter_file(&plan) {
        Some(file) => Some(open_sidecar(file).await?),
        None => None,
    };
    if marks.as_ref().is_some_and(|m| m.contains(id)) {
        recent.mark_replayed(id);
        return Err(already());
    }
    let outcome = state.replays.replay(plan, &letter).await?;
    if let Some(mut marks) = marks.take() {
        let (id, message_id) = (id.to_string(), letter.message_id.clone());
        tokio::task::spawn_blocking(move || marks.mark(&id, &message_id))
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?
            .map_err(|e| {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("replayed, but not marked as replayed: {e}"),
                )
            })?;
    }
    recent.mark_replayed(id);
    Ok(match outcome {
        Replayed::Written { records } => {
            serde_json::json!({ "replayed": true, "records": records })
        }
        Replayed::FilteredOut => serde_json::json!({ "replayed": true, "filtered_out": true }),
    })
}
