//! The admin HTTP server: health for orchestrators, metrics for Prometheus, a view of
//! the running config, the actions the dashboard offers, and the dashboard itself.
//!
//! | route | token | answers |
//! |---|---|---|
//! | `GET /healthz` | no | 200 while the process serves HTTP at all |
//! | `GET /readyz` | no | 200, or 503 with the components that are not ready ([`crate::health`]) |
//! | `GET /metrics` | yes | the Prometheus text format ([`exporter`]) |
//! | `GET /api/v1/rules`, `/api/v1/sinks` | yes | JSON ([`api`]) |
//! | `GET /api/v1/clients` | yes | JSON: the embedded broker's sessions ([`api`]); 404 without one |
//! | `GET /api/v1/dead-letters`, `/api/v1/spool` | yes | JSON: the latest dead letters, the spool's figures ([`api`]) |
//! | `POST /api/v1/try`, `GET /api/v1/rules/{name}/tail`, `POST /api/v1/dead-letters/{id}/replay` | yes | try a message, watch a rule, replay a dead letter ([`actions`]) |
//! | `GET /dashboard/` | no (the page asks for the token) | the dashboard ([`dashboard`]) |
//!
//! "Token" means `Authorization: Bearer <admin.token>` ([`auth`]); with no token
//! configured, which config validation allows on a loopback address only, those routes
//! are open to every process on this machine. [`app`] builds the router from a
//! [`State`] (tests call it directly); [`serve`] runs it on a bound listener until the
//! shutdown token fires, then finishes the requests in progress.

pub mod actions;
pub mod api;
pub mod auth;
pub mod dashboard;
pub mod exporter;
mod process;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::broker::stats::Dropped;
use crate::config::{AdminPlan, Plan};
use crate::health::Readiness;
use crate::sink::driver::Recent;
pub use api::{RuleView, SinkView};
pub use auth::{Token, TokenError};

/// What the admin server reads. `app` creates it before the components start (so that
/// `/healthz` answers and `/readyz` says `bridge: starting` while sinks open) and adds each
/// component as it starts.
pub struct State {
    pub readiness: Readiness,
    /// None: the protected routes are open (loopback only, see the module docs).
    pub token: Option<Arc<Token>>,
    pub metrics: PrometheusHandle,
    /// The config running now (a reload replaces it): its rules are listed, and tried.
    pub plan: Mutex<Arc<Plan>>,
    /// Added as each sink starts (a lock taken at start and per admin request only).
    pub sinks: Mutex<Vec<SinkView>>,
    /// The embedded broker, once opened (unset when mqbridge reads an external broker):
    /// its gauges are read when `/metrics` is scraped, its sessions by `/api/v1/clients`.
    pub broker: OnceLock<Broker>,
    /// The latest dead letters, once the sinks are wired (`/api/v1/dead-letters`).
    pub dead_letters: OnceLock<Arc<Recent>>,
    /// The spool's figures, when there is one (`/api/v1/spool`).
    pub spool: OnceLock<crate::spool::Probe>,
    /// Watchers of the rules' outcomes (`/api/v1/rules/{name}/tail`); the router offers
    /// them every outcome.
    pub taps: Arc<crate::tap::Taps>,
    /// Dead-letter replay (`/api/v1/dead-letters/{id}/replay`).
    pub replays: actions::Replays,
}

impl State {
    /// The state of an admin server for the config `plan`, before any component started.
    pub fn new(token: Option<Arc<Token>>, metrics: PrometheusHandle, plan: Arc<Plan>) -> State {
        State {
            readiness: Readiness::default(),
            token,
            metrics,
            plan: Mutex::new(plan),
            sinks: Mutex::default(),
            broker: OnceLock::new(),
            dead_letters: OnceLock::new(),
            spool: OnceLock::new(),
            taps: Arc::default(),
            replays: actions::Replays::default(),
        }
    }

    /// The config running now.
    pub fn plan(&self) -> Arc<Plan> {
        Arc::clone(&self.plan.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A reload replaced the running config.
    pub fn set_plan(&self, plan: Arc<Plan>) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }

    /// The sinks started so far.
    pub fn sinks(&self) -> std::sync::MutexGuard<'_, Vec<SinkView>> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The admin routes over `state`.
pub fn app(state: Arc<State>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/rules", get(api::rules))
        .route("/api/v1/sinks", get(api::sinks))
        .route("/api/v1/clients", get(api::clients))
        .route("/api/v1/dead-letters", get(api::dead_letters))
        .route("/api/v1/spool", get(api::spool))
        .route("/api/v1/try", post(actions::try_message))
        .route("/api/v1/rules/{name}/tail", get(actions::tail))
        .route("/api/v1/dead-letters/{id}/replay", post(actions::replay))
        .route_layer(axum::middleware::from_fn_with_state(
            state.token.clone(),
            auth::require,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(dashboard::routes())
        .merge(protected)
        .fallback(api::not_found)
        .with_state(state)
}

/// Why the admin server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("admin.listen: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Binds the admin address; the error names the setting.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// A running admin server; [`Running::stop`] ends it (dropping it does too, without
/// waiting).
pub struct Running {
    pub state: Arc<State>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts the admin server for `plan` (of the config `running`): installs the metrics
/// recorder (first, so that every component's metric handles record to it), reads the
/// token, binds and serves.
pub async fn start(plan: &AdminPlan, running: Arc<Plan>) -> Result<Running, StartError> {
    let metrics = exporter::install();
    let token = plan
        .token
        .as_ref()
        .map(Token::resolve)
        .transpose()?
        .map(Arc::new);
    let listener = bind(plan.listen).await?;
    let state = Arc::new(State::new(token, metrics, running));
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, Arc::clone(&state), stop.clone()));
    Ok(Running {
        state,
        stop,
        task: Some(task),
    })
}

/// How long requests in progress may take to finish at shutdown.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Running {
    /// Stops taking requests and waits (briefly) for those in progress.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(STOP_GRACE, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin server failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "admin server task failed"),
                Err(_) => tracing::debug!("admin requests still in progress at shutdown"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves [`app`] on `listener` until `shutdown`, then lets requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, token = state.token.is_some(), "admin server listening");
    }
    tokio::spawn(exporter::upkeep(state.metrics.clone(), shutdown.clone()));
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 `{"ready": true}`, or 503 `{"ready": false, "not_ready": [{component, reason}]}`.
async fn readyz(Extract(state): Extract<Arc<State>>) -> Response {
    let problems = state.readiness.problems();
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Warnings (a config reload that failed) do not make the bridge unready: it still
    // delivers with the config it had.
    let warnings = state.readiness.warnings();
    let body = serde_json::json!({ "ready": problems.is_empty(), "not_ready": problems, "warnings": warnings });
    (status, axum::Json(body)).into_response()
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    // Gauges read from the components at scrape time.
    for sink in state.sinks().iter() {
        metrics::gauge!("mqbridge_sink_queue_depth", "sink" => sink.name.to_string())
            .set(sink.queue.depth() as f64);
    }
    if let Some(broker) = state.broker.get() {
        let stats = broker.stats();
        for (name, value) in [
            ("mqbridge_broker_connections", stats.connections),
            ("mqbridge_broker_sessions", stats.sessions),
            ("mqbridge_broker_subscriptions", stats.subscriptions),
            ("mqbridge_broker_queued_messages", stats.queued),
            ("mqbridge_broker_retained_messages", stats.retained),
        ] {
            metrics::gauge!(name).set(value as f64);
        }
        for (name, value) in [
            ("mqbridge_broker_messages_received_total", stats.received),
            ("mqbridge_broker_messages_sent_total", stats.sent),
        ] {
            metrics::counter!(name).absolute(value);
        }
        for (why, value) in Dropped::ALL.into_iter().zip(stats.dropped) {
            metrics::counter!("mqbridge_broker_messages_dropped_total", "reason" => why.reason())
                .absolute(value);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
