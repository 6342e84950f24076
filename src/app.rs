//! Wiring and supervision: builds the sinks, the router and the source from a validated
//! [`Plan`], runs them, and orders the shutdown.
//!
//! Shutdown order, so that nothing settled goes unacknowledged and nothing unsettled is
//! acknowledged: the source stops taking messages → the router drains and closes the sink
//! queues → each sink driver flushes and ends → the dead-letter driver ends → the source
//! sends the remaining acknowledgements and disconnects. Whatever has not settled by
//! `shutdown_timeout` stays unacknowledged and is redelivered after a restart.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::raw::SinkConfig;
use crate::config::{BrokerPlan, Plan, SinkPlan};
use crate::pipeline::Pipeline;
use crate::sink::driver::{DeadLetter, Driver};
use crate::sink::{Delivery, Sink, file, republish, sqlite};

/// Messages buffered between the source and the router.
const SOURCE_BUFFER: usize = 4096;

/// Opens one sink (connects, checks tables) from its plan.
pub async fn open_sink(
    sink: &SinkPlan,
    broker: Option<&BrokerPlan>,
) -> anyhow::Result<Arc<dyn Sink>> {
    let name = &sink.name;
    Ok(match &sink.config {
        SinkConfig::Sqlite(c) => Arc::new(
            sqlite::SqliteSink::open(c)
                .await
                .with_context(|| format!("sink {name}"))?,
        ),
        SinkConfig::File(c) => Arc::new(
            file::FileSink::open(c)
                .await
                .with_context(|| format!("sink {name}"))?,
        ),
        SinkConfig::Republish(c) => {
            let broker =
                broker.with_context(|| format!("sink {name}: republish needs `broker:`"))?;
            Arc::new(republish::RepublishSink::new(c, broker)?)
        }
    })
}

fn settings(
    c: &SinkConfig,
) -> (
    crate::sink::BatchConfig,
    crate::sink::retry::RetryConfig,
    usize,
) {
    match c {
        SinkConfig::Sqlite(c) => (c.batch, c.retry, c.queue),
        SinkConfig::File(c) => (c.batch, c.retry, c.queue),
        SinkConfig::Republish(c) => (c.batch, c.retry, c.queue),
    }
}

/// Runs mqbridge until `shutdown` is cancelled, then shuts down in order.
pub async fn run(plan: Plan, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = plan.broker.clone().context(
        "nothing to read from: configure `broker:` (the embedded broker is not available yet)",
    )?;
    let drivers = TaskTracker::new();

    // The dead-letter sink first: every other driver holds a sender to it.
    let mut queues: Vec<Option<mpsc::Sender<Delivery>>> = vec![None; plan.sinks.len()];
    let mut dead_letter = DeadLetter { queue: None };
    if let Some(i) = plan.dead_letter {
        let sp = &plan.sinks[i];
        let tx = start(
            sp,
            open_sink(sp, Some(&broker)).await?,
            DeadLetter { queue: None },
            &drivers,
        );
        queues[i] = Some(tx.clone());
        dead_letter.queue = Some(tx);
    }
    for (i, sp) in plan.sinks.iter().enumerate() {
        if queues[i].is_none() {
            let tx = start(
                sp,
                open_sink(sp, Some(&broker)).await?,
                dead_letter.clone(),
                &drivers,
            );
            queues[i] = Some(tx);
        }
    }
    let pipeline = Pipeline {
        rules: Arc::new(plan.rules),
        sinks: queues
            .into_iter()
            .map(|q| q.expect("every sink started"))
            .collect(),
        dead_letter,
    };
    let (tx, rx) = mpsc::channel(SOURCE_BUFFER);
    drivers.spawn(pipeline.run(rx));
    drivers.close();

    let stop = shutdown.child_token();
    let done = CancellationToken::new();
    let mut source = tokio::spawn(crate::source::mqtt::run(
        broker,
        tx,
        stop.clone(),
        done.clone(),
    ));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut source => {
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.context("source failed")),
                Err(e) => Err(anyhow::anyhow!("source task failed: {e}")),
            };
        }
    }
    stop.cancel();
    if tokio::time::timeout(plan.shutdown_timeout, drivers.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?plan.shutdown_timeout, "shutdown deadline passed; unsettled messages will be redelivered after restart");
    }
    done.cancel();
    source.await.context("source task")??;
    tracing::info!("stopped");
    Ok(())
}

/// Starts a sink's driver; returns its queue.
fn start(
    sp: &SinkPlan,
    sink: Arc<dyn Sink>,
    dead_letter: DeadLetter,
    tracker: &TaskTracker,
) -> mpsc::Sender<Delivery> {
    let (batch, retry, queue) = settings(&sp.config);
    let (tx, rx) = mpsc::channel(queue.max(1));
    let driver = Driver {
        name: Arc::clone(&sp.name),
        sink,
        batch,
        retry,
        dead_letter,
    };
    tracker.spawn(driver.run(rx));
    tx
}
