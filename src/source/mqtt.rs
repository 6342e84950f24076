//! The external-broker source: an MQTT client (3.1.1 or 5) with a persistent session and
//! manual acknowledgements.
//!
//! Two tasks, so that the task polling the connection never waits on anything but the
//! network (rumqttc#1025):
//! - the **poll loop** reads events, keeps the subscriptions in line with the rules
//!   ([`Subscriptions`]: after each ConnAck, since rumqttc does not (#250), and when a
//!   reload changes the rules' filters), backs off between failed connects, and hands
//!   PUBLISHes to its
//!   [`Intake`], which also tells it which messages to acknowledge, in arrival order
//!   (rumqttc#846);
//! - the **ack task** queues those PUBACK/PUBRECs, waiting for room in rumqttc's request
//!   channel when it must (acks must not be lost, and the poll loop must not wait).
//!   With 3.1.1 the poll loop writes them itself, between two polls, a batch in one
//!   write ([`mqtt::EventLoop::ack_at_once`]); the ack task then only carries the
//!   DISCONNECT and the acks of the last batch, after the loop.
//!
//! QoS 1/2 messages in flight are bounded by the broker's window (our MQTT 5 receive
//! maximum, or the broker's inflight limit with 3.1.1). While the pipeline is full they
//! wait in the intake and the connection stays alive. A broker that sends past the window
//! meanwhile is held up to `max_buffered` bytes. Past that, mqbridge drops what waits and
//! takes nothing more from this connection (it keeps reading it, so it stays alive),
//! acknowledges what it had handed over as that settles, then reconnects: the broker
//! sends the rest again, as none of it was acknowledged. Each round thus moves the
//! pipeline's worth of messages on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Source;
use super::intake::{Handoff, Intake};
use crate::config::BrokerPlan;
use crate::delivery::Ack;
use crate::health::Status;
use crate::message::Message;
use crate::mqtt::{self, AckToken, Client, Incoming, ReconnectBackoff};

/// The external broker as a [`Source`]. `connected` is ready while connected (for
/// `/readyz`; `mqbridge_source_connected` follows it). `filters` are the topic filters
/// to subscribe to (`plan.subscriptions` at first; a config reload sends new ones).
pub struct External {
    pub plan: BrokerPlan,
    pub connected: Status,
    pub filters: watch::Receiver<Vec<String>>,
}

impl Source for External {
    type Error = mqtt::ConnectError;

    /// After `stop` the connection is kept, so that acknowledgements of settling messages
    /// still go out.
    async fn run(
        self,
        handoff: Handoff,
        stop: CancellationToken,
        done: CancellationToken,
    ) -> Result<(), mqtt::ConnectError> {
        let subscriptions = Subscriptions::new(self.filters, self.plan.qos);
        run(
            self.plan,
            handoff,
            self.connected,
            subscriptions,
            stop,
            done,
        )
        .await
    }
}

/// What the broker is asked to send us: the rules' topic filters, kept in line as they
/// change. Subscribing again to a filter the session has is harmless (with MQTT 5 its
/// retained messages are not sent again), so whenever it is unknown what the session
/// holds (this process has not subscribed on it yet) every filter is subscribed to; a
/// filter the rules no longer have is unsubscribed once it is known to be there.
struct Subscriptions {
    wanted: watch::Receiver<Vec<String>>,
    /// False once the sender is gone (shutdown): nothing changes any more.
    open: bool,
    /// What this process asked for on the broker's session; None: not known.
    asked: Option<Vec<String>>,
    /// The filters of each SUBSCRIBE not answered yet, in order.
    awaiting: VecDeque<Vec<String>>,
    qos: u8,
}

/// The filters to subscribe to and to unsubscribe from to get from `asked` (None: not
/// known) to `wanted`.
fn changes(asked: Option<&[String]>, wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let asked = asked.unwrap_or_default();
    let add = wanted.iter().filter(|f| !asked.contains(f)).cloned();
    let remove = asked.iter().filter(|f| !wanted.contains(f)).cloned();
    (add.collect(), remove.collect())
}

impl Subscriptions {
    fn new(wanted: watch::Receiver<Vec<String>>, qos: u8) -> Subscriptions {
        Subscriptions {
            wanted,
            open: true,
            asked: None,
            awaiting: VecDeque::new(),
            qos,
        }
    }

    /// At a ConnAck. A new session has nothing; a kept one has what this process asked
    /// for on it, if it asked (at the first ConnAck it is not known).
    fn connected(&mut self, client: &Client, session_present: bool) {
        if !session_present {
            self.asked = Some(Vec::new());
        }
        self.awaiting.clear();
        self.sync(client);
    }

    /// Asks the broker for what is wanted now (never awaits: called from the poll loop).
    fn sync(&mut self, client: &Client) {
        let wanted = self.wanted.borrow_and_update().clone();
        let (add, remove) = changes(self.asked.as_deref(), &wanted);
        let mut asked = wanted;
        if !add.is_empty() {
            match client.try_subscribe_many(&add, self.qos) {
                Ok(()) => self.awaiting.push_back(add),
                Err(e) => {
                    // Not asked: the next ConnAck or change tries again.
                    tracing::error!(error = %e, "cannot queue SUBSCRIBE");
                    asked.retain(|f| !add.contains(f));
                }
            }
        }
        for filter in remove {
            match client.try_unsubscribe(&filter) {
                Ok(()) => tracing::info!(%filter, "unsubscribed: no rule reads it any more"),
                Err(e) => {
                    tracing::error!(%filter, error = %e, "cannot queue UNSUBSCRIBE");
                    asked.push(filter);
                }
            }
        }
        self.asked = Some(asked);
    }

    /// A SUBACK: the answer to the oldest SUBSCRIBE not answered yet.
    fn acknowledged(&mut self, codes: &[Result<u8, String>]) {
        let filters = self.awaiting.pop_front().unwrap_or_default();
        for (code, filter) in codes.iter().zip(&filters) {
            match code {
                Ok(granted) => tracing::info!(%filter, granted, "subscribed"),
                Err(why) => {
                    tracing::error!(%filter, reason = %why, "broker refused the subscription")
                }
            }
        }
    }

    /// Resolves when the wanted filters change (never, once the sender is gone).
    async fn changed(&mut self) {
        if !self.open || self.wanted.changed().await.is_err() {
            self.open = false;
            std::future::pending::<()>().await;
        }
    }
}

async fn run(
    plan: BrokerPlan,
    handoff: Handoff,
    connected: Status,
    mut subscriptions: Subscriptions,
    stop: CancellationToken,
    done: CancellationToken,
) -> Result<(), mqtt::ConnectError> {
    let (client, mut eventloop) = mqtt::connect(
        &plan.connection,
        &plan.connection.client_id,
        mqtt::Session::Subscriber(&plan),
    )?;
    let source: Arc<str> = Arc::from("broker");
    let mut intake = Intake::new(handoff, plan.max_buffered);

    // Acks are bounded by the messages in flight, which the broker's window bounds. Each
    // batch carries the connection it belongs to: acks of a lost connection must not go
    // out on the next one, where the same packet ids may name other messages.
    let connection = Arc::new(AtomicU64::new(0));
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<AckJob>();
    let acker = tokio::spawn(ack_task(client.clone(), ack_rx, Arc::clone(&connection)));
    let lost = |intake: &mut Intake<AckToken>| {
        intake.reset();
        connection.fetch_add(1, Ordering::AcqRel);
    };

    let mut backoff = ReconnectBackoff::default();
    let mut arrivals: u64 = 0;
    let mut stopped = false;
    // After the broker sent past the window and `max_buffered`: nothing more is taken from
    // this connection, which ends once what was taken is acknowledged.
    let mut leaving = Leaving::No;
    let mut online = false;
    loop {
        // What the last poll read already goes first, without a turn of the select.
        let buffered = if online { eventloop.buffered() } else { None };
        let event = if let Some(event) = buffered {
            Ok(event)
        } else {
            tokio::select! {
                _ = done.cancelled() => break,
                () = subscriptions.changed(), if online => {
                    subscriptions.sync(&client);
                    continue;
                }
                _ = stop.cancelled(), if !stopped => {
                    // Lets the pipeline drain and finish.
                    stopped = true;
                    intake.close();
                    continue;
                }
                tokens = intake.released() => {
                    let of = connection.load(Ordering::Acquire);
                    let tokens = eventloop.ack_at_once(tokens).await;
                    if !tokens.is_empty() {
                        let _ = ack_tx.send(AckJob::Ack(of, tokens));
                    }
                    if leaving == Leaving::Draining && intake.unacknowledged() == 0 {
                        // After the acks, in the same queue, so they go out first.
                        let _ = ack_tx.send(AckJob::Disconnect(of));
                        leaving = Leaving::Disconnecting;
                    }
                    continue;
                }
                ev = eventloop.poll() => ev,
            }
        };
        match event {
            Ok(Incoming::Connected { session_present }) => {
                connected.set_ready();
                metrics::gauge!("mqbridge_source_connected").set(1.0);
                backoff.reset();
                leaving = Leaving::No;
                lost(&mut intake);
                tracing::info!(host = %plan.connection.host, port = plan.connection.port, client_id = %plan.connection.client_id, session_present, "connected to broker");
                online = true;
                subscriptions.connected(&client, session_present);
            }
            Ok(Incoming::SubAck(codes)) => subscriptions.acknowledged(&codes),
            // Not acknowledged: the broker sends it again after the reconnect.
            Ok(Incoming::Publish(_)) if leaving != Leaving::No => {}
            Ok(Incoming::Publish(received)) => {
                let mqtt::Received {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties,
                    ack,
                } = *received;
                arrivals += 1;
                let msg = Message {
                    topic: topic.into(),
                    payload,
                    qos,
                    retain,
                    properties,
                    client_id: None,
                    received_at: jiff::Timestamp::now(),
                    source: Arc::clone(&source),
                    ack: Ack::detached(),
                };
                if let Err(e) = intake.offer(msg, ack) {
                    tracing::warn!(error = %e, max_buffered = plan.max_buffered, "broker sent past the window while the pipeline was full; taking nothing more until what was taken is acknowledged, then reconnecting");
                    intake.shed();
                    leaving = Leaving::Draining;
                    if intake.unacknowledged() == 0 {
                        let _ = ack_tx.send(AckJob::Disconnect(connection.load(Ordering::Acquire)));
                        leaving = Leaving::Disconnecting;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                lost(&mut intake);
                online = false;
                // What the lost connection read but did not hand out yet: unacknowledged,
                // so the broker sends it again; its packet ids mean nothing on the next.
                while eventloop.buffered().is_some() {}
                connected.set_not_ready(format!("broker connection failed: {e}"));
                metrics::gauge!("mqbridge_source_connected").set(0.0);
                let delay = backoff.failed();
                tracing::warn!(error = %e, retry_in = ?delay, "broker connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = done.cancelled() => break,
                }
            }
        }
    }
    // Let the queued acknowledgements out, then say goodbye: first those of messages
    // that settled since the loop last looked (everything settled before `done`). The
    // event loop must keep being polled meanwhile: it is what drains rumqttc's request
    // channel, which the ack task may be waiting on. New PUBLISHes are not taken any more
    // (not acknowledged).
    let last = intake.released_now();
    if !last.is_empty() {
        let _ = ack_tx.send(AckJob::Ack(connection.load(Ordering::Acquire), last));
    }
    drop(ack_tx);
    tracing::debug!(
        arrivals,
        unacknowledged = intake.unacknowledged(),
        "source stopped taking messages"
    );
    let _ = tokio::time::timeout(FAREWELL, async {
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

/// Where a connection is after the broker sent past the window and `max_buffered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaving {
    No,
    /// Waiting for what was taken to be acknowledged.
    Draining,
    /// DISCONNECT queued; the next connection starts afresh.
    Disconnecting,
}

/// What the ack task does, in order, for connection number `.0`.
enum AckJob {
    Ack(u64, Vec<AckToken>),
    Disconnect(u64),
}

async fn ack_task(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<AckJob>,
    connection: Arc<AtomicU64>,
) {
    let mut sent: u64 = 0;
    while let Some(job) = rx.recv().await {
        let current = |of: u64| connection.load(Ordering::Acquire) == of;
        match job {
            AckJob::Ack(of, tokens) => {
                for token in tokens {
                    if !current(of) {
                        break; // the connection they belong to is gone
                    }
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
            AckJob::Disconnect(of) if current(of) => {
                if let Err(e) = client.disconnect().await {
                    tracing::warn!(error = %e, "cannot queue DISCONNECT");
                }
            }
            AckJob::Disconnect(_) => {}
        }
    }
    tracing::debug!(sent, "ack task done");
}

#[cfg(test)]
mod tests {
    use super::changes;

    fn v(filters: &[&str]) -> Vec<String> {
        filters.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn unknown_session_state_subscribes_to_everything_and_unsubscribes_nothing() {
        let (add, remove) = changes(None, &v(&["a/#", "b/+"]));
        assert_eq!((add, remove), (v(&["a/#", "b/+"]), v(&[])));
    }

    #[test]
    fn a_change_subscribes_to_the_new_filters_and_drops_the_old_ones() {
        let asked = v(&["a/#", "b/+"]);
        let (add, remove) = changes(Some(&asked), &v(&["b/+", "c"]));
        assert_eq!((add, remove), (v(&["c"]), v(&["a/#"])));
        let (add, remove) = changes(Some(&asked), &asked);
        assert!(add.is_empty() && remove.is_empty());
    }
}
