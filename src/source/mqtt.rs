//! The external-broker source: an MQTT client (rumqttc) with a persistent session and
//! manual acknowledgements.
//!
//! Three parts, so that the task polling the connection never waits on anything but the
//! network (rumqttc#1025):
//! - the **poll loop** reads events, (re)subscribes after a ConnAck without a session,
//!   turns PUBLISHes into [`Message`]s and hands them to the pipeline with `try_send`;
//! - the **ack task** owns the [`AckSequencer`]: it learns of arrivals and settlements and
//!   sends PUBACK/PUBREC for the settled prefix, in arrival order (rumqttc#846);
//! - each message's [`Ack`] reports its settlement to the ack task.
//!
//! QoS 1/2 messages in flight are bounded by the broker's window (its inflight limit), so
//! the pipeline's buffer only fills when the broker sends without limit; then the poll loop
//! waits (QoS 1/2) or drops and counts QoS 0 messages, as QoS 0 allows.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerPlan;
use crate::delivery::{Ack, AckSequencer, Settled};
use crate::message::{Message, Properties};
use crate::mqtt::{self, ReconnectBackoff};

/// What the ack task hears about.
enum AckEvent {
    /// A QoS 1/2 PUBLISH arrived (kept without payload: an ack needs pkid and QoS).
    Arrived(Publish),
    /// Message number `n` (counting arrivals since start) settled.
    Settled(u64),
    /// A new connection: forget pending arrivals, the broker redelivers them.
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

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
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
    let mut opts = mqtt::options(&plan, &plan.client_id, true)?;
    opts.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let source: Arc<str> = Arc::from("broker");

    // Ack events are bounded by the messages in flight, which the broker's window bounds.
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acker = tokio::spawn(ack_task(client.clone(), ack_rx));

    let filters: Vec<SubscribeFilter> = plan
        .subscriptions
        .iter()
        .map(|f| SubscribeFilter::new(f.clone(), qos(plan.qos)))
        .collect();
    let mut backoff = ReconnectBackoff::new();
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
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff.reset();
                let _ = ack_tx.send(AckEvent::Reset);
                tracing::info!(host = %plan.host, port = plan.port, client_id = %plan.client_id, session_present = connack.session_present, "connected to broker");
                if !connack.session_present && !filters.is_empty() {
                    // try_: never await the client from the poll loop.
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "cannot queue SUBSCRIBE");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                for (code, filter) in suback.return_codes.iter().zip(&plan.subscriptions) {
                    match code {
                        SubscribeReasonCode::Failure => {
                            tracing::error!(%filter, "broker refused the subscription")
                        }
                        SubscribeReasonCode::Success(q) => {
                            tracing::info!(%filter, granted = ?q, "subscribed")
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Some(out) = &out else {
                    continue; // draining: unacknowledged, so the broker redelivers it
                };
                let ack = if publish.qos == QoS::AtMostOnce {
                    Ack::detached()
                } else {
                    let seq = arrivals;
                    arrivals += 1;
                    let mut lite = publish.clone();
                    lite.payload = bytes::Bytes::new();
                    lite.topic = String::new();
                    let _ = ack_tx.send(AckEvent::Arrived(lite));
                    Ack::new(ReportSettled {
                        seq,
                        tx: ack_tx.clone(),
                    })
                };
                let msg = Message {
                    topic: publish.topic,
                    payload: publish.payload,
                    qos: publish.qos as u8,
                    retain: publish.retain,
                    properties: Properties::default(),
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
                let delay = backoff.failed();
                tracing::warn!(error = %e, retry_in = ?delay, "broker connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = done.cancelled() => break,
                }
            }
        }
    }
    // Let queued acknowledgements out, then say goodbye.
    drop(ack_tx);
    // Ends when every message's Ack is gone; unsettled ones may still be held elsewhere.
    let _ = tokio::time::timeout(Duration::from_secs(2), acker).await;
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    Ok(())
}

async fn ack_task(client: AsyncClient, mut rx: mpsc::UnboundedReceiver<AckEvent>) {
    let mut seq = AckSequencer::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            AckEvent::Arrived(p) => {
                seq.arrive(p);
            }
            AckEvent::Reset => seq.reset(),
            AckEvent::Settled(n) => {
                for p in seq.settle(n) {
                    // try_ack: this task must not wait on a poll loop that may be gone.
                    if let Err(e) = client.try_ack(&p) {
                        tracing::warn!(pkid = p.pkid, error = %e, "cannot queue ack; the broker will redeliver");
                    }
                }
            }
        }
    }
}
