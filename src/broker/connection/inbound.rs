//! PUBLISH from the client: topic aliases, the receive maximum, the ACL, QoS 2
//! duplicates (acknowledged again, never routed twice), routing to subscribers, and the
//! hand-off to the pipeline. A QoS 1/2 message is acknowledged only once its [`Ack`]
//! settles, and acknowledgements go out in arrival order ([`AckSequencer`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Conn, ProtocolError};
use crate::broker::Counters;
use crate::broker::codec::{Outgoing, Publish, Version};
use crate::broker::session::{Qos2, Stored};
use crate::delivery::{Ack, AckSequencer, Settled};
use crate::message::{Message, Properties};
use crate::topic::validate_topic_name;

/// Topic aliases a v5 client may use towards us.
pub(super) const TOPIC_ALIAS_MAX: u16 = 64;
/// The [`Message::source`] of everything the embedded broker hands to the rules.
pub(super) const SOURCE: &str = "embedded";

/// The client → server half of a connection: its PUBLISHes on their way to the pipeline,
/// and their acknowledgements waiting for settlement.
pub(super) struct FromClient {
    /// The pipeline; dropped on `stop` so that it can drain.
    pub(super) out: Option<mpsc::Sender<Message>>,
    /// QoS 1/2 acknowledgements in arrival order; each goes out once its message and
    /// every earlier one settled.
    pub(super) acks: AckSequencer<PendingAck>,
    /// Settlements ([`ReportSettled`]) on their way to the read loop.
    settled_tx: mpsc::UnboundedSender<u64>,
    pub(super) settled_rx: mpsc::UnboundedReceiver<u64>,
    /// QoS 2 packet ids of this connection waiting for settlement.
    qos2_pending_here: HashSet<u16>,
    aliases: TopicAliases,
    source: Arc<str>,
}

impl FromClient {
    pub(super) fn new(out: mpsc::Sender<Message>) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        FromClient {
            out: Some(out),
            acks: AckSequencer::default(),
            settled_tx,
            settled_rx,
            qos2_pending_here: HashSet::new(),
            aliases: TopicAliases::default(),
            source: Arc::from(SOURCE),
        }
    }

    /// Queues an acknowledgement in arrival order; it goes out once `seq` is reported
    /// settled (and every earlier one was).
    fn arrive(&mut self, pkid: u16, qos: u8, reason: u8) -> u64 {
        self.acks.arrive(PendingAck { pkid, qos, reason })
    }
}

/// An acknowledgement waiting for settlement (and for earlier ones).
pub(super) struct PendingAck {
    pkid: u16,
    qos: u8,
    reason: u8,
}

/// Tells the read loop that the message with acknowledgement `seq` settled.
struct ReportSettled {
    seq: u64,
    tx: mpsc::UnboundedSender<u64>,
}

impl Settled for ReportSettled {
    fn settled(&self) {
        // A closed channel means the connection is gone: the client resends.
        let _ = self.tx.send(self.seq);
    }
}

/// Topic aliases a v5 client set up towards us (1 to [`TOPIC_ALIAS_MAX`]).
#[derive(Debug, Default)]
struct TopicAliases(HashMap<u16, String>);

impl TopicAliases {
    /// Takes the alias off `p`: with a topic it (re)sets the alias, without one it names
    /// the topic.
    fn resolve(&mut self, p: &mut Publish) -> Result<(), ProtocolError> {
        let Some(alias) = p.properties.as_mut().and_then(|pp| pp.topic_alias.take()) else {
            return Ok(());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(ProtocolError::TopicAliasInvalid(alias));
        }
        if p.topic.is_empty() {
            match self.0.get(&alias) {
                Some(t) => p.topic = t.clone(),
                None => return Err(ProtocolError::TopicAliasUnknown(alias)),
            }
        } else {
            self.0.insert(alias, p.topic.clone());
        }
        Ok(())
    }
}

impl Conn {
    /// QoS 1/2 messages from the client not yet completed: waiting for settlement, or
    /// (QoS 2) for the PUBREL.
    fn inbound_inflight(&self) -> usize {
        let recorded = self
            .with_session(|s| {
                s.incoming_qos2
                    .values()
                    .filter(|q| **q == Qos2::Recorded)
                    .count()
            })
            .unwrap_or(0);
        self.inbound.acks.pending() + recorded
    }

    /// PUBREL: the QoS 2 exchange is complete.
    pub(super) async fn released(&mut self, pkid: u16) -> Result<(), ProtocolError> {
        self.with_session(|s| s.incoming_qos2.remove(&pkid));
        self.send(Outgoing::PubComp { pkid }).await
    }

    /// Sends the acknowledgements `seq` released.
    pub(super) async fn release_acks(&mut self, seq: u64) -> Result<(), ProtocolError> {
        for a in self.inbound.acks.settle(seq) {
            if a.qos == 1 {
                self.send(Outgoing::PubAck {
                    pkid: a.pkid,
                    reason: a.reason,
                })
                .await?;
            } else {
                self.inbound.qos2_pending_here.remove(&a.pkid);
                if a.reason < 0x80 {
                    self.with_session(|s| s.incoming_qos2.insert(a.pkid, Qos2::Recorded));
                }
                self.send(Outgoing::PubRec {
                    pkid: a.pkid,
                    reason: a.reason,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// A PUBLISH from the client: to the subscribers at once, to the rules through the
    /// pipeline; a QoS 1/2 message is acknowledged once its [`Ack`] settled.
    pub(super) async fn publish(
        &mut self,
        mut p: Publish,
        done: &CancellationToken,
    ) -> Result<(), ProtocolError> {
        self.inbound.aliases.resolve(&mut p)?;
        validate_topic_name(&p.topic).map_err(ProtocolError::TopicNameInvalid)?;
        let max_inflight = self.shared.plan.max_inflight;
        if p.qos > 0
            && self.version == Version::V5
            && self.inbound_inflight() >= max_inflight as usize
        {
            return Err(ProtocolError::ReceiveMaximumExceeded(max_inflight));
        }
        let Some(out) = self.inbound.out.clone() else {
            // Shutting down: not acknowledged, so the client sends it again later.
            return Ok(());
        };

        // QoS 2 duplicates: acknowledge again, never route twice.
        let mut route = true;
        if p.qos == 2 {
            let state = self.with_session(|s| s.incoming_qos2.get(&p.pkid).copied());
            match state.flatten() {
                Some(Qos2::Recorded) => {
                    return self
                        .send(Outgoing::PubRec {
                            pkid: p.pkid,
                            reason: 0,
                        })
                        .await;
                }
                Some(Qos2::Received) if self.inbound.qos2_pending_here.contains(&p.pkid) => {
                    return Ok(());
                }
                // Received on an earlier connection that ended before settlement: the
                // subscribers have it; hand it to the rules again (at least once).
                Some(Qos2::Received) => route = false,
                None => {
                    self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Received));
                }
            }
            self.inbound.qos2_pending_here.insert(p.pkid);
        }

        if !self
            .shared
            .auth
            .can_publish(self.username.as_deref(), &p.topic)
        {
            self.refuse(&p);
            return Ok(());
        }
        if route {
            self.shared.route(stored(&p, &self.client_id), p.retain);
        }
        let ack = if p.qos == 0 {
            Ack::detached()
        } else {
            Ack::new(ReportSettled {
                seq: self.inbound.arrive(p.pkid, p.qos, 0),
                tx: self.inbound.settled_tx.clone(),
            })
        };
        let source = Arc::clone(&self.inbound.source);
        let msg = message(p, &self.client_id, source, ack);
        hand_off(&out, msg, &self.shared.counters, done).await
    }

    /// A PUBLISH the ACL refuses: counted, and (QoS 1/2) acknowledged in its turn
    /// without the message; with 0x87 in MQTT 5.
    fn refuse(&mut self, p: &Publish) {
        let n = self
            .shared
            .counters
            .publish_denied
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        tracing::info!(client_id = %self.client_id, topic = %p.topic, refused_total = n, "embedded broker: publish refused by the ACL");
        if p.qos == 0 {
            return;
        }
        let v5 = self.version == Version::V5;
        if p.qos == 2 && !v5 {
            // 3.1.1 cannot refuse: complete the exchange without the message.
            self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Recorded));
        } else if p.qos == 2 {
            self.with_session(|s| s.incoming_qos2.remove(&p.pkid));
        }
        let seq = self
            .inbound
            .arrive(p.pkid, p.qos, if v5 { 0x87 } else { 0 });
        let _ = self.inbound.settled_tx.send(seq);
    }
}

/// A message from `client_id` (a PUBLISH or its will) as the broker keeps it for
/// subscribers: the properties to forward, the expiry as a deadline.
pub(super) fn stored(p: &Publish, client_id: &str) -> Arc<Stored> {
    let expiry = p
        .properties
        .as_ref()
        .and_then(|pp| pp.message_expiry_interval);
    Arc::new(Stored {
        topic: p.topic.clone(),
        payload: p.payload.clone(),
        qos: p.qos,
        expires_at: expiry.map(|s| std::time::Instant::now() + Duration::from_secs(s as u64)),
        properties: p.properties.clone().map(|mut pp| {
            pp.subscription_identifiers.clear();
            pp.topic_alias = None;
            pp.message_expiry_interval = None;
            pp
        }),
        from: Some(client_id.to_string()),
    })
}

/// A message from `client_id` (a PUBLISH or its will) for the rules.
pub(super) fn message(p: Publish, client_id: &str, source: Arc<str>, ack: Ack) -> Message {
    let props = p.properties.unwrap_or_default();
    Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: Properties {
            user_properties: props.user_properties,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
        },
        client_id: Some(client_id.to_string()),
        received_at: jiff::Timestamp::now(),
        source,
        ack,
    }
}

/// Hands a message to the pipeline. When the pipeline is full, a QoS 0 message is
/// dropped (counted, and settled so that nothing waits for it); a QoS 1/2 message waits
/// for room, and so does its client, whose socket is not read meanwhile. Fails when the
/// pipeline is closed, or `done` ends the wait: mqbridge is shutting down.
async fn hand_off(
    out: &mpsc::Sender<Message>,
    msg: Message,
    counters: &Counters,
    done: &CancellationToken,
) -> Result<(), ProtocolError> {
    match out.try_send(msg) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(msg)) if msg.qos == 0 => {
            let n = counters
                .pipeline_dropped_qos0
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "embedded broker: pipeline full, QoS 0 messages not handed to the rules"
                );
            }
            msg.ack.settle();
        }
        Err(mpsc::error::TrySendError::Full(msg)) => {
            // Backpressure: this client waits (its socket is not read meanwhile).
            tokio::select! {
                r = out.send(msg) => if r.is_err() { return Err(ProtocolError::ServerShuttingDown) },
                _ = done.cancelled() => return Err(ProtocolError::ServerShuttingDown),
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(ProtocolError::ServerShuttingDown),
    }
    Ok(())
}
