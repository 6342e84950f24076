//! The external-broker source: an MQTT client (3.1.1 or 5) with a persistent session and
//! manual acknowledgements.
//!
//! Three parts, so that the task polling the connection never waits on anything but the
//! network (rumqttc#1025):
//! - the **poll loop** reads events, (re)subscribes after a ConnAck without a session
//!   (rumqttc#250), backs off between failed connects, turns PUBLISHes into [`Message`]s
//!   and hands them to the pipeline with `try_send`;
//! - the **ack task** owns the [`AckSequencer`]: it learns of arrivals and settlements and
//!   queues PUBACK/PUBREC for the settled prefix, in arrival order (rumqttc#846), waiting
//!   for room in rumqttc's request channel (acks must not be lost);
//! - each message's [`Ack`] reports its settlement to the ack task.
//!
//! QoS 1/2 messages in flight are bounded by the broker's window (its inflight limit, or
//! our MQTT 5 receive maximum), so the pipeline's buffer only fills when a broker sends
//! without limit; then the poll loop waits (QoS 1/2) or drops and counts QoS 0 messages,
//! as QoS 0 allows.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerPlan;
use crate::delivery::{Ack, AckSequencer, Settled};
use crate::message::Message;
use crate::mqtt::{self, AckToken, Client, Incoming, ReconnectBackoff};

/// What the ack task hears about.
enum AckEvent {
    /// A QoS 1/2 PUBLISH arrived.
    Arrived(AckToken),
    /// Message number `n` (counting QoS 1/2 arrivals since start) settled.
    Settled(u64),
    /// The connection ended, or a new one began: forget pending arrivals (the broker
    /// redelivers them) so that none is acknowledged on a later connection.
    Reset,
}

struct ReportSettled {
    seq: u64,
    tx: mpsc::UnboundedSender<AckEvent>,
}

impl Settled for ReportSettled {
    fn settled(&self) {
        // The ack task ends only after the source stops; a failed send means shutdown.
        let _ = self.tx.send(AckEvent::Settled(self.seq));
    }
}

/// Runs the source until `done` is cancelled. After `stop` is cancelled it takes no new
/// messages (they stay unacknowledged and the broker redelivers them) but keeps the
/// connection so acknowledgements of settling messages still go out.
pub async fn run(
    plan: BrokerPlan,
    out: mpsc::Sender<Message>,
    stop: CancellationToken,
    done: CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = mqtt::connect(&plan, &plan.client_id, true, true)?;
    let source: Arc<str> = Arc::from("broker");

    // Ack events are bounded by the messages in flight, which the broker's window bounds.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_task(client.clone(), ack_rx));

    let mut backoff = ReconnectBackoff::default();
    let mut arrivals: u64 = 0;
    let mut dropped_qos0: u64 = 0;
    // Dropped on `stop`, which lets the pipeline drain and finish.
    let mut out = Some(out);
    loop {
        let event = tokio::select! {
            _ = done.cancelled() => break,
            _ = stop.cancelled(), if out.is_some() => {
                out = None;
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Incoming::Connected { session_present }) => {
                backoff.reset();
                let _ = ack_tx.send(AckEvent::Reset);
                tracing::info!(host = %plan.host, port = plan.port, client_id = %plan.client_id, session_present, "connected to broker");
                if !session_present && !plan.subscriptions.is_empty() {
                    // try_: never await the client from the poll loop.
                    if let Err(e) = client.try_subscribe_many(&plan.subscriptions, plan.qos) {
                        tracing::error!(error = %e, "cannot queue SUBSCRIBE");
                    }
                }
            }
            Ok(Incoming::SubAck(codes)) => {
                for (code, filter) in codes.iter().zip(&plan.subscriptions) {
                    match code {
                        Ok(granted) => tracing::info!(%filter, granted, "subscribed"),
                        Err(why) => {
                            tracing::error!(%filter, reason = %why, "broker refused the subscription")
                        }
                    }
                }
            }
            Ok(Incoming::Publish(received)) => {
                let Some(out) = &out else {
                    continue; // draining: unacknowledged, so the broker redelivers it
                };
                let mqtt::Received {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    ack,
                } = *received;
                let ack = match ack {
                    None => Ack::detached(),
                    Some(token) => {
                        let seq = arrivals;
                        arrivals += 1;
                        let _ = ack_tx.send(AckEvent::Arrived(token));
                        Ack::new(ReportSettled {
                            seq,
                            tx: ack_tx.clone(),
                        })
                    }
                };
                let msg = Message {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    client_id: None,
                    received_at: jiff::Timestamp::now(),
                    source: Arc::clone(&source),
                    ack,
                };
                match out.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(msg)) if msg.qos == 0 => {
                        dropped_qos0 += 1;
                        if dropped_qos0.is_power_of_two() {
                            tracing::warn!(
                                dropped = dropped_qos0,
                                "pipeline full: dropping QoS 0 messages"
                            );
                        }
                        msg.ack.settle();
                    }
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        // The broker sends beyond any window; wait (the connection idles meanwhile).
                        tokio::select! {
                            r = out.send(msg) => if r.is_err() { break },
                            _ = done.cancelled() => break,
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Acks of this connection's messages must not go out on the next one,
                // where the same packet ids may name other messages (a lost session).
                let _ = ack_tx.send(AckEvent::Reset);
                let delay = backoff.failed();
                tracing::warn!(error = %e, retry_in = ?delay, "broker connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = done.cancelled() => break,
                }
            }
        }
    }
    // Let the queued acknowledgements out, then say goodbye. The event loop must keep
    // being polled meanwhile: it is what drains rumqttc's request channel, which the ack
    // task may be waiting on. New PUBLISHes are not taken any more (not acknowledged).
    drop(ack_tx);
    tracing::debug!(arrivals, dropped_qos0, "source stopped taking messages");
    let _ = tokio::time::timeout(FAREWELL, async {
        // Ends when every message's Ack is gone; unsettled ones may still be held elsewhere.
        let mut acker = acker;
        loop {
            tokio::select! {
                _ = &mut acker => break,
                ev = eventloop.poll() => if let Err(e) = ev {
                    tracing::debug!(error = %e, "connection ended while acknowledging");
                    return;
                },
            }
        }
        tracing::debug!("acknowledgements queued; disconnecting");
        if client.try_disconnect().is_ok() {
            // Keep reading until the broker closes the connection after our DISCONNECT:
            // closing first, with its data unread, would reset the connection and the
            // broker could drop the last acknowledgements still in its receive buffer.
            while eventloop.poll().await.is_ok() {}
        }
    })
    .await;
    Ok(())
}

/// How long the source may take, after the pipeline has drained, to send the last
/// acknowledgements and disconnect.
const FAREWELL: Duration = Duration::from_secs(5);

async fn ack_task(client: Client, mut rx: mpsc::UnboundedReceiver<AckEvent>) {
    let mut seq = AckSequencer::default();
    let mut sent: u64 = 0;
    while let Some(ev) = rx.recv().await {
        match ev {
            AckEvent::Arrived(token) => {
                seq.arrive(token);
            }
            AckEvent::Reset => seq.reset(),
            AckEvent::Settled(n) => {
                for token in seq.settle(n) {
                    // Waits while rumqttc's request channel is full: the poll loop never
                    // waits on this task, so the channel drains. A lost ack would hold a
                    // slot of the broker's window until the next reconnect.
                    match client.ack(&token).await {
                        Ok(()) => sent += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot queue ack (connection closing); the broker will redeliver")
                        }
                    }
                }
            }
        }
    }
    tracing::debug!(sent, pending = seq.pending(), "ack task done");
}
