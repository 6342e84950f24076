//! PUBLISH from the client: topic aliases, the receive maximum, the ACL, QoS 2
//! duplicates (acknowledged again, never routed twice), routing to subscribers, and the
//! hand-off to the pipeline through the connection's [`Intake`], the one every source
//! uses: a QoS 1/2 message is acknowledged only once it settles, acknowledgements go out
//! in arrival order, and while the pipeline is full the read loop goes on (QoS 1/2
//! messages wait in the intake, within the receive maximum; QoS 0 ones are dropped).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Conn, ProtocolError};
use crate::broker::codec::{Outgoing, Publish, Version};
use crate::broker::session::{Qos2, Stored};
use crate::broker::stats::Dropped;
use crate::delivery::Ack;
use crate::message::{Message, Properties};
use crate::source::intake::{Handoff, Intake};
use crate::topic::validate_topic_name;

/// Topic aliases a v5 client may use towards us.
pub(super) const TOPIC_ALIAS_MAX: u16 = 64;
/// The [`Message::source`] of everything the embedded broker hands to the rules.
pub(super) const SOURCE: &str = "embedded";

/// The client → server half of a connection: its PUBLISHes on their way to the pipeline,
/// and their acknowledgements waiting for settlement.
pub(super) struct FromClient {
    /// The hand-off to the pipeline, and the QoS 1/2 acknowledgements in arrival order;
    /// closed on `stop` so that the pipeline can drain.
    pub(super) intake: Intake<PendingAck>,
    /// QoS 2 packet ids of this connection waiting for settlement.
    qos2_pending_here: HashSet<u16>,
    aliases: TopicAliases,
    source: Arc<str>,
    /// The client id, shared by the messages it publishes (made at its first PUBLISH:
    /// an idle connection does not keep a copy).
    client_id: Option<Arc<str>>,
    /// `max_publish_rate`, where one is set (boxed: most deployments have none).
    pub(super) rate: Option<Box<PublishRate>>,
}

impl FromClient {
    /// `max_bytes` bounds what waits for a full pipeline; the receive maximum keeps
    /// well within it, so it is only a backstop. `max_publish_rate`: 0 for none.
    pub(super) fn new(handoff: Handoff, max_bytes: usize, max_publish_rate: f64) -> Self {
        FromClient {
            intake: Intake::new(handoff, max_bytes),
            qos2_pending_here: HashSet::new(),
            aliases: TopicAliases::default(),
            source: Arc::from(SOURCE),
            client_id: None,
            rate: (max_publish_rate > 0.0).then(|| Box::new(PublishRate::new(max_publish_rate))),
        }
    }
}

/// A client's PUBLISHes against `max_publish_rate`: a bucket of one second's worth of
/// tokens (at least one), each PUBLISH taking one. Once it is empty the read loop stops
/// reading the connection until it has refilled to zero (TCP then holds the client
/// back); the client is slowed, not closed.
pub(super) struct PublishRate {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl PublishRate {
    fn new(per_second: f64) -> Self {
        PublishRate {
            per_second,
            tokens: per_second.max(1.0),
            at: Instant::now(),
        }
    }

    /// One PUBLISH.
    fn take(&mut self) {
        let now = Instant::now();
        let refilled = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refilled).min(self.per_second.max(1.0)) - 1.0;
        self.at = now;
    }

    /// When reading may go on: None now, else when the bucket is back to zero.
    pub(super) fn resume_at(&self) -> Option<Instant> {
        if self.tokens >= 0.0 {
            return None;
        }
        let at = self.at + Duration::from_secs_f64(-self.tokens / self.per_second);
        (at > Instant::now()).then_some(at)
    }
}

/// An acknowledgement waiting for settlement (and for earlier ones).
pub(super) struct PendingAck {
    pkid: u16,
    qos: u8,
    reason: u8,
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
        self.inbound.intake.unacknowledged() + recorded
    }

    /// PUBREL: the QoS 2 exchange is complete. Every PUBREL is answered [MQTT-4.3.3-11]
    /// (3.1.1: [MQTT-4.3.3-2]); one for an identifier whose PUBREC has not gone out
    /// changes nothing and gets 0x92 (packet identifier not found) in MQTT 5.
    pub(super) async fn released(&mut self, pkid: u16) -> Result<(), ProtocolError> {
        let known = self.with_session(|s| {
            let recorded = s.incoming_qos2.get(&pkid) == Some(&Qos2::Recorded);
            if recorded {
                s.incoming_qos2.remove(&pkid);
            }
            recorded
        });
        let reason = if known == Some(true) { 0 } else { 0x92 };
        self.send(Outgoing::PubComp { pkid, reason }).await
    }

    /// Sends the acknowledgements the intake released, in order.
    pub(super) async fn release_acks(
        &mut self,
        acks: Vec<PendingAck>,
    ) -> Result<(), ProtocolError> {
        for a in acks {
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
    pub(super) async fn publish(&mut self, mut p: Publish) -> Result<(), ProtocolError> {
        self.inbound.aliases.resolve(&mut p)?;
        validate_topic_name(&p.topic)
            .and_then(|()| self.shared.plan.topic_limits.check(&p.topic))
            .map_err(ProtocolError::TopicNameInvalid)?;
        self.shared.counters.received();
        if let Some(rate) = &mut self.inbound.rate {
            rate.take();
        }
        let max_inflight = self.shared.plan.max_inflight;
        if p.qos > 0
            && self.version == Version::V5
            && self.inbound_inflight() >= max_inflight as usize
        {
            return Err(ProtocolError::ReceiveMaximumExceeded(max_inflight));
        }
        if self.inbound.intake.handoff().is_none() {
            // Shutting down: not acknowledged, so the client sends it again later.
            return Ok(());
        }

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

        if !self.may_publish(&p.topic, p.qos, p.retain).await {
            self.refuse(&p);
            return Ok(());
        }
        if route {
            self.shared
                .route(&p.topic, p.retain, || Stored::of(&p, &self.client_id));
        }
        let token = (p.qos > 0).then_some(PendingAck {
            pkid: p.pkid,
            qos: p.qos,
            reason: 0,
        });
        let source = Arc::clone(&self.inbound.source);
        let client_id = self
            .inbound
            .client_id
            .get_or_insert_with(|| Arc::from(self.client_id.as_str()));
        let msg = message(p, Arc::clone(client_id), source, Ack::detached());
        // Within the receive maximum (checked above) this never overflows; a 3.1.1
        // client is not read while its window is full.
        self.inbound
            .intake
            .offer(msg, token)
            .map_err(|_| ProtocolError::ReceiveMaximumExceeded(max_inflight))
    }

    /// A PUBLISH the ACL refuses: counted, and (QoS 1/2) acknowledged in its turn
    /// without the message; with 0x87 in MQTT 5.
    fn refuse(&mut self, p: &Publish) {
        let n = self.shared.counters.dropped(Dropped::Acl);
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
        self.inbound.intake.pass(PendingAck {
            pkid: p.pkid,
            qos: p.qos,
            reason: if v5 { 0x87 } else { 0 },
        });
    }
}

/// A message from `client_id` (a PUBLISH or its will) for the rules.
pub(super) fn message(p: Publish, client_id: Arc<str>, source: Arc<str>, ack: Ack) -> Message {
    let props = p.properties.unwrap_or_default();
    Message {
        topic: p.topic.into(),
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: Properties {
            user_properties: props.user_properties,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
        },
        client_id: Some(client_id),
        received_at: jiff::Timestamp::now(),
        source,
        ack,
    }
}
