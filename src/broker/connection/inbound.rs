//! PUBLISH from the client: topic aliases, the receive maximum, the ACL, QoS 2
//! duplicates (acknowledged again, never routed twice), routing to subscribers, and the
//! hand-off to the pipeline. A QoS 1/2 message is acknowledged only once its [`Ack`]
//! settles, and acknowledgements go out in arrival order ([`AckSequencer`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Conn, ProtocolError};
use crate::broker::Counters;
use crate::broker::codec::{Outgoing, Publish, Version};
use crate::broker::session::{Qos2, Stored};
use crate::delivery::{Ack, Settled};
use crate::message::{Message, Properties};
use crate::topic::validate_topic_name;

/// Topic aliases a v5 client may use towards us.
pub(super) const TOPIC_ALIAS_MAX: u16 = 64;

/// An acknowledgement waiting for settlement (and for earlier ones).
pub(super) struct PendingAck {
    pkid: u16,
    qos: u8,
    reason: u8,
}

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

impl Conn {
    /// QoS 1/2 messages from the client not yet completed: waiting for settlement, or
    /// (QoS 2) for the PUBREL.
    pub(super) fn inbound_inflight(&self) -> usize {
        let recorded = self
            .shared
            .lock()
            .sessions
            .get(&self.client_id)
            .map_or(0, |s| {
                s.incoming_qos2
                    .values()
                    .filter(|q| **q == Qos2::Recorded)
                    .count()
            });
        self.acks.pending() + recorded
    }

    /// PUBREL: the QoS 2 exchange is complete.
    pub(super) async fn released(&mut self, pkid: u16) -> Result<(), ProtocolError> {
        self.with_session(|s| s.incoming_qos2.remove(&pkid));
        self.send(Outgoing::PubComp { pkid }).await
    }

    /// Sends the acknowledgements `seq` released.
    pub(super) async fn release_acks(&mut self, seq: u64) -> Result<(), ProtocolError> {
        for a in self.acks.settle(seq) {
            if a.qos == 1 {
                self.send(Outgoing::PubAck {
                    pkid: a.pkid,
                    reason: a.reason,
                })
                .await?;
            } else {
                self.qos2_pending_here.remove(&a.pkid);
                if a.reason < 0x80
                    && let Some(s) = self.shared.lock().sessions.get_mut(&self.client_id)
                {
                    s.incoming_qos2.insert(a.pkid, Qos2::Recorded);
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

    pub(super) async fn publish(
        &mut self,
        mut p: Publish,
        done: &CancellationToken,
    ) -> Result<(), ProtocolError> {
        let v5 = self.version == Version::V5;
        // Topic alias (client → server).
        if let Some(props) = p.properties.as_mut()
            && let Some(alias) = props.topic_alias.take()
        {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(ProtocolError::TopicAliasInvalid(alias));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(ProtocolError::TopicAliasUnknown(alias)),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        validate_topic_name(&p.topic).map_err(ProtocolError::TopicNameInvalid)?;
        let max_inflight = self.shared.plan.max_inflight;
        if p.qos > 0 && v5 && self.inbound_inflight() >= max_inflight as usize {
            return Err(ProtocolError::ReceiveMaximumExceeded(max_inflight));
        }
        let Some(out) = self.out.clone() else {
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
                Some(Qos2::Received) if self.qos2_pending_here.contains(&p.pkid) => return Ok(()),
                // Received on an earlier connection that ended before settlement: the
                // subscribers have it; hand it to the rules again (at least once).
                Some(Qos2::Received) => route = false,
                None => {
                    self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Received));
                }
            }
            self.qos2_pending_here.insert(p.pkid);
        }

        if !self
            .shared
            .auth
            .can_publish(self.username.as_deref(), &p.topic)
        {
            let n = self
                .shared
                .counters
                .publish_denied
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            tracing::info!(client_id = %self.client_id, topic = %p.topic, refused_total = n, "embedded broker: publish refused by the ACL");
            if p.qos > 0 {
                let reason = if v5 { 0x87 } else { 0 };
                if p.qos == 2 && !v5 {
                    // 3.1.1 cannot refuse: complete the exchange without the message.
                    self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Recorded));
                } else if p.qos == 2 {
                    self.with_session(|s| s.incoming_qos2.remove(&p.pkid));
                }
                let seq = self.acks.arrive(PendingAck {
                    pkid: p.pkid,
                    qos: p.qos,
                    reason,
                });
                let _ = self.settled_tx.send(seq);
            }
            return Ok(());
        }

        let props = p.properties.clone().unwrap_or_default();
        let stored = Arc::new(Stored {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            expires_at: props
                .message_expiry_interval
                .map(|s| std::time::Instant::now() + Duration::from_secs(s as u64)),
            properties: p.properties.clone().map(|mut pp| {
                pp.subscription_identifiers.clear();
                pp.topic_alias = None;
                pp.message_expiry_interval = None;
                pp
            }),
            from: Some(self.client_id.clone()),
        });
        if route {
            let max = self.shared.plan.max_queued_messages;
            let mut state = self.shared.lock();
            if p.retain {
                state.retained.set(Arc::clone(&stored));
            }
            state.route(&stored, p.retain, max, &self.shared.auth);
        }

        let ack = if p.qos == 0 {
            Ack::detached()
        } else {
            let seq = self.acks.arrive(PendingAck {
                pkid: p.pkid,
                qos: p.qos,
                reason: 0,
            });
            Ack::new(ReportSettled {
                seq,
                tx: self.settled_tx.clone(),
            })
        };
        let msg = Message {
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
            client_id: Some(self.client_id.clone()),
            received_at: jiff::Timestamp::now(),
            source: Arc::clone(&self.source),
            ack,
        };
        hand_off(&out, msg, &self.shared.counters, done).await
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
