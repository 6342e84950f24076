//! The end of a connection: the will (sent unless the client disconnected normally or
//! mqbridge is shutting down; delayed by its will delay), detaching the session from
//! this connection, and removing it once its expiry has passed.

use std::sync::Arc;
use std::time::Duration;

use super::inbound::{SOURCE, message, stored};
use super::{Conn, End, ProtocolError};
use crate::broker::Shared;
use crate::broker::codec::{Publish, Will};
use crate::delivery::Ack;
use crate::source::intake::Handoff;

impl Conn {
    /// The client's DISCONNECT, which may change the session expiry (but not from 0, 5.0
    /// 3.14.2.2.2). Only reason 0x00 discards the will [MQTT-3.14.4-3].
    pub(super) fn client_disconnected(
        &mut self,
        reason: u8,
        session_expiry: Option<u32>,
    ) -> Result<End, ProtocolError> {
        if let Some(expiry) = session_expiry {
            let mut state = self.shared.lock();
            if let Some(s) = state.sessions.get_mut(&self.client_id) {
                if s.expiry == 0 && expiry != 0 {
                    drop(state);
                    return Err(ProtocolError::SessionExpiryRaised);
                }
                s.expiry = expiry.min(self.shared.plan.session_expiry);
                s.touch();
            }
        }
        Ok(End::Disconnected {
            send_will: reason != 0x00,
        })
    }

    /// After the loop: the will, and detaching (or dropping) the session.
    pub(super) async fn finish(&mut self, end: &End) {
        let send_will = match end {
            End::Disconnected { send_will } => *send_will,
            End::Lost => true,
            End::TakenOver => true,
            End::Shutdown => false,
        };
        let will = self
            .will
            .take()
            .filter(|w| send_will && self.shared.auth().can_publish(self.identity(), &w.topic));
        let mut delayed = None;
        {
            let mut state = self.shared.change();
            let mine = state
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id));
            if mine {
                let s = state.sessions.get_mut(&self.client_id).expect("checked");
                s.link = None;
                let (expiry, generation) = (s.expiry, s.generation);
                if expiry == 0 {
                    state.remove_session(&self.client_id);
                } else if expiry != u32::MAX {
                    schedule_expiry(&self.shared, &self.client_id, generation, expiry);
                }
                if let Some(w) = &will
                    && w.delay > 0
                    && expiry > 0
                {
                    delayed = Some((generation, w.delay.min(expiry)));
                }
            }
        }
        if let Some(w) = will {
            match delayed {
                Some((generation, secs)) => {
                    let shared = Arc::clone(&self.shared);
                    let client_id = self.client_id.clone();
                    // Weak: a pending will must not keep the pipeline open at shutdown.
                    let handoff = self.inbound.intake.handoff().map(Handoff::downgrade);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(secs as u64)).await;
                        let reconnected = shared
                            .lock()
                            .sessions
                            .get(&client_id)
                            .is_some_and(|s| s.generation != generation);
                        if !reconnected {
                            let handoff = handoff.and_then(|h| h.upgrade());
                            publish_will(&shared, &client_id, w, handoff.as_ref());
                        }
                    });
                }
                None => publish_will(
                    &self.shared,
                    &self.client_id,
                    w,
                    self.inbound.intake.handoff(),
                ),
            }
        }
    }
}

/// Removes a session still offline after `expiry` seconds.
pub(in crate::broker) fn schedule_expiry(
    shared: &Arc<Shared>,
    client_id: &str,
    generation: u64,
    expiry: u32,
) {
    let shared = Arc::clone(shared);
    let client_id = client_id.to_string();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(expiry as u64)).await;
        let mut state = shared.change();
        if state
            .sessions
            .get(&client_id)
            .is_some_and(|s| s.generation == generation && s.link.is_none())
        {
            state.remove_session(&client_id);
        }
    });
}

/// Publishes a will message to subscribers and the rules (no one to acknowledge).
fn publish_will(shared: &Arc<Shared>, client_id: &str, w: Box<Will>, handoff: Option<&Handoff>) {
    let p = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic,
        pkid: 0,
        payload: w.payload,
        properties: w.properties,
    };
    shared.route(stored(&p, client_id), p.retain);
    if let Some(handoff) = handoff {
        handoff.try_hand(message(p, client_id, Arc::from(SOURCE), Ack::detached()));
    }
}
