//! Wiring and supervision: builds the sinks, the router and the source from a validated
//! [`Plan`], runs them, and orders the shutdown.
//!
//! With a spool the source feeds the [spool](crate::spool), which acknowledges messages
//! once they are on disk and feeds the router; without one the source feeds the router
//! and messages are acknowledged once their records settle.
//!
//! Shutdown order, so that nothing settled goes unacknowledged and nothing unsettled is
//! acknowledged: the source stops taking messages (the spool's writer commits what it was
//! handed; its reader stops) → the router drains and closes the sink queues → each sink
//! driver flushes and ends → the dead-letter driver ends → the spool saves its cursor →
//! the source sends the remaining acknowledgements and disconnects. Whatever has not
//! settled by `shutdown_timeout` stays unacknowledged (or in the spool) and is delivered
//! again after a restart. The admin server, started first, stops last, so `/healthz`
//! and `/metrics` answer while the rest drains.
//!
//! Readiness ([`crate::health`]): each component is added to the admin server's registry
//! as it starts, behind a `bridge` status: not ready while starting (sinks opening) and
//! once shutting down, so that a load balancer stops sending work while the rest drains.

mod publish;
mod reload;
mod trigger;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::SinkView;
use crate::config::{Plan, SinkPlan};
use crate::delivery::Watch;
use crate::eval_pool::{EVAL_TIMEOUT, EvalPool};
use crate::health::{Readiness, Status};
use crate::pipeline::{INLINE_BUDGET, Pipeline, Routing};
use crate::sink::OpenContext;
use crate::sink::driver::{self, DeadLetter};
use crate::sink::queue::SinkQueue;
use crate::source::Source;
use crate::source::intake::Handoff;
use crate::source::mqtt::External;
use publish::Upstream;
use reload::Reloader;
use trigger::Triggers;

/// Messages buffered between the source and the router.
const SOURCE_BUFFER: usize = 4096;

/// Runs mqbridge until `shutdown` is cancelled, then shuts down in order.
pub async fn run(plan: Plan, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_from(plan, None, shutdown).await
}

/// [`run`], with the file `plan` was loaded from: it is loaded again on SIGHUP and when it
/// changes (see [`reload`]).
pub async fn run_from(
    plan: Plan,
    config_file: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if plan.broker.is_none() && plan.embedded.is_none() {
        anyhow::bail!("nothing to read from: configure `broker:` or `embedded:`");
    }
    // Shared with the admin server, which shows it and tries messages on it.
    let plan = Arc::new(plan);
    // First, so that a SIGHUP while starting is a reload (taken once running), not an exit.
    let mut triggers = match &config_file {
        Some(path) => Triggers::start(path.clone(), shutdown.child_token()),
        None => Triggers::none(),
    };
    let admin = match &plan.admin {
        Some(a) => Some(crate::admin::start(a, Arc::clone(&plan)).await?),
        None => None,
    };
    // Without an admin server, nobody reads it.
    let readiness = admin
        .as_ref()
        .map_or_else(Readiness::default, |a| a.state.readiness.clone());
    let lifecycle = Status::not_ready("starting");
    readiness.add("bridge", lifecycle.clone());
    let spool = plan
        .spool
        .as_ref()
        .map(crate::spool::Spool::open)
        .transpose()?;
    if let Some(spool) = &spool {
        readiness.add("spool", spool.health());
        if let Some(admin) = &admin {
            let _ = admin.state.spool.set(spool.probe());
        }
    }
    let broker = plan.broker.clone();
    let embedded = match plan.embedded.clone() {
        Some(p) => Some(crate::broker::Broker::open(p).await?),
        None => None,
    };
    if let (Some(admin), Some(embedded)) = (&admin, &embedded) {
        let _ = admin.state.broker.set(embedded.clone());
    }
    let upstream = match (&embedded, &broker) {
        (Some(embedded), _) => Upstream::Embedded(embedded),
        (None, Some(broker)) => Upstream::External(broker),
        (None, None) => unreachable!("checked above"),
    };
    let drivers = TaskTracker::new();
    // Rules and `columns:` programs run here, on threads of their own.
    let eval = EvalPool::start("mqb-eval", plan.eval_threads, EVAL_TIMEOUT)
        .context("starting the evaluation threads")?;
    if let Some(admin) = &admin {
        admin.state.replays.start(eval.clone());
    }
    let wiring = Wiring {
        upstream,
        eval: &eval,
        drivers: &drivers,
        readiness: &readiness,
        admin: admin.as_ref().map(|a| &a.state),
    };

    // The dead-letter sink first: every other sink's driver holds its queue.
    let dead_letter = DeadLetter::none();
    if let Some(admin) = &admin {
        let _ = admin.state.dead_letters.set(dead_letter.recent());
    }
    let mut queues: Vec<Option<SinkQueue>> = vec![None; plan.sinks.len()];
    for i in plan.dead_letter.into_iter().chain(0..plan.sinks.len()) {
        if queues[i].is_none() {
            let is_dead_letter = plan.dead_letter == Some(i);
            let queue = wiring
                .open(&plan.sinks[i], &dead_letter, is_dead_letter)
                .await?;
            wiring.register(&plan.sinks[i], &queue, is_dead_letter);
            if is_dead_letter {
                dead_letter.set(Some(queue.clone()));
            }
            queues[i] = Some(queue);
        }
    }
    let queues: Vec<SinkQueue> = queues
        .into_iter()
        .map(|q| q.expect("every sink started"))
        .collect();
    let watch = Arc::new(Watch::default());
    tokio::spawn(Arc::clone(&watch).run(plan.unsettled_warning, shutdown.child_token()));
    let (reload_tx, reloads) = mpsc::channel(1);
    // The external broker's subscriptions: the rules' filters, which a reload may change.
    let filters = broker
        .as_ref()
        .map(|b| watch::channel(b.subscriptions.clone()));
    let (filters_tx, filters_rx) = filters.unzip();
    let mut reloader = Reloader::new(
        &plan,
        &queues,
        reload_tx,
        dead_letter.clone(),
        &wiring,
        embedded.as_ref(),
        filters_tx,
    );
    let shutdown_timeout = plan.shutdown_timeout;
    let pipeline = Pipeline {
        routing: Routing {
            rules: Arc::clone(&plan.rules),
            sinks: queues,
            applied: None,
        },
        watch,
        dead_letter,
        eval: eval.clone(),
        inline: INLINE_BUDGET,
        reloads: Some(reloads),
        taps: admin
            .as_ref()
            .map_or_else(Arc::default, |a| Arc::clone(&a.state.taps)),
        // Made on first use: a connection (to an external broker) only once one is sent.
        commands: Some(upstream.commands()),
    };
    let (tx, rx) = mpsc::channel(SOURCE_BUFFER);
    drivers.spawn(pipeline.run(rx));
    drivers.close();

    let stop = shutdown.child_token();
    let done = CancellationToken::new();
    let (tx, mut spool) = match spool {
        Some(spool) => {
            let (source_tx, spool_rx) = mpsc::channel(SOURCE_BUFFER);
            (source_tx, Some(spool.start(spool_rx, tx, stop.clone())?))
        }
        None => (tx, None),
    };
    let mut source = match (broker.clone(), embedded.clone()) {
        (Some(broker), _) => {
            let filters = filters_rx.expect("made with `broker`");
            let connected = Status::not_ready("not connected to the broker yet");
            readiness.add("source", connected.clone());
            metrics::gauge!("mqbridge_source_connected").set(0.0);
            let external = External {
                plan: broker,
                connected,
                filters,
            };
            spawn_source(external, Handoff::new(tx), stop.clone(), done.clone())
        }
        (None, Some(embedded)) => {
            // Bound here, so that the source is ready (listening) once this returns.
            let listening = embedded.listen().await?;
            readiness.add("source", Status::ready());
            metrics::gauge!("mqbridge_source_connected").set(1.0);
            spawn_source(listening, Handoff::new(tx), stop.clone(), done.clone())
        }
        (None, None) => unreachable!("checked above"),
    };
    lifecycle.set_ready();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = &mut source => {
                return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.context("source failed")),
                    Err(e) => Err(anyhow::anyhow!("source task failed: {e}")),
                };
            }
            e = async {
                match spool.as_mut() {
                    Some(spool) => spool.failed().await,
                    None => std::future::pending().await,
                }
            } => return Err(e.into()),
            Some(cause) = triggers.next() => {
                let path = config_file.as_deref().expect("triggers only with a file");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = reloader.reload(path, cause) => {}
                }
            }
        }
    }
    drop(reloader);
    stop.cancel();
    lifecycle.set_not_ready("shutting down");
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    if let Some(spool) = &mut spool {
        // Quick: the writer only commits what the source had handed over.
        match tokio::time::timeout_at(deadline, spool.writer_done()).await {
            Ok(r) => r?,
            Err(_) => tracing::warn!("the spool writer did not finish by the shutdown deadline"),
        }
    }
    if tokio::time::timeout_at(deadline, drivers.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?shutdown_timeout, "shutdown deadline passed; unsettled messages will be delivered again after restart");
    }
    if let Some(spool) = spool {
        spool.close().await?;
    }
    done.cancel();
    source.await.context("source task")??;
    if let Some(admin) = admin {
        admin.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs `source` on a task of its own.
fn spawn_source(
    source: impl Source,
    handoff: Handoff,
    stop: CancellationToken,
    done: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move { Ok(source.run(handoff, stop, done).await?) })
}

/// What starting a sink needs, and where a started sink is listed.
pub(crate) struct Wiring<'a> {
    upstream: Upstream<'a>,
    eval: &'a EvalPool,
    drivers: &'a TaskTracker,
    readiness: &'a Readiness,
    admin: Option<&'a Arc<crate::admin::State>>,
}

impl Wiring<'_> {
    /// Opens a sink and starts its driver; returns its queue. The dead-letter sink's own
    /// driver dead-letters nowhere (it gets a target of its own that is never set).
    async fn open(
        &self,
        sp: &SinkPlan,
        dead_letter: &DeadLetter,
        is_dead_letter: bool,
    ) -> anyhow::Result<SinkQueue> {
        let upstream = self.upstream;
        let ctx = OpenContext {
            publisher: Some(&|| upstream.publisher(&sp.name)),
            eval: self.eval,
        };
        let sink = crate::sink::open(&sp.settings, ctx)
            .await
            .with_context(|| format!("sink {}", sp.name))?;
        let dead_letter = if is_dead_letter {
            DeadLetter::none()
        } else {
            dead_letter.clone()
        };
        Ok(driver::spawn(
            Arc::clone(&sp.name),
            sink,
            sp.settings.spec().common(),
            dead_letter,
            self.drivers,
        ))
    }

    /// Lists a started sink in the readiness registry and the admin API (replacing one of
    /// the same name).
    fn register(&self, sp: &SinkPlan, queue: &SinkQueue, is_dead_letter: bool) {
        self.readiness
            .add(format!("sink {}", sp.name), queue.health().clone());
        if let Some(admin) = self.admin {
            let mut sinks = admin.sinks();
            sinks.retain(|v| v.name != sp.name);
            sinks.push(SinkView {
                name: Arc::clone(&sp.name),
                kind: sp.settings.kind(),
                description: sp.settings.spec().describe(),
                dead_letter: is_dead_letter,
                queue: queue.probe(),
                health: queue.health().clone(),
            });
        }
    }

    /// Takes a sink a reload removed off the lists.
    fn unregister(&self, name: &str) {
        self.readiness.remove(&format!("sink {name}"));
        if let Some(admin) = self.admin {
            admin.sinks().retain(|v| &*v.name != name);
        }
    }
}
