//! The end of a connection: the will (sent unless the client disconnected normally or
//! mqbridge is shutting down), detaching the session from this connection or removing
//! it (expiry 0). A will delay and a session expiry are left to the broker's timers
//! ([`crate::broker::timers`]).

use std::sync::Arc;

use tokio::time::Instant;

use super::inbound::{SOURCE, message};
use super::{Conn, End, ProtocolError};
use crate::broker::Shared;
use crate::broker::codec::{Publish, Will};
use crate::broker::session::Stored;
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

    /// After the loop: the will, and detaching (or dropping) the session. A will with a
    /// delay waits in the session for the broker's timers ([`crate::broker::timers`]),
    /// as does the session's expiry.
    pub(super) async fn finish(&mut self, end: &End) {
        let send_will = match end {
            End::Disconnected { send_will } => *send_will,
            End::Lost => true,
            End::TakenOver => true,
            End::Shutdown => false,
        };
        let will = match self.will.take() {
            Some(w) if send_will && self.may_publish(&w.topic, w.qos, w.retain).await => Some(w),
            _ => None,
        };
        let due_now = {
            let mut state = self.shared.change();
            let mine = state
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id));
            if mine {
                let s = state.sessions.get_mut(&self.client_id).expect("checked");
                let due_now = s.detach(Instant::now(), will);
                if s.expiry == 0 {
                    state.remove_session(&self.client_id);
                } else {
                    self.shared.timers.arm(&self.client_id, s);
                }
                due_now
            } else if self.outbound.signal.resumed() {
                // Another connection resumed the session before this one closed: the
                // will is not published ([MQTT-3.1.3-9]).
                None
            } else {
                // Taken over by a clean start: the session has ended.
                will
            }
        };
        if let Some(w) = due_now {
            publish_will(
                &self.shared,
                &self.client_id,
                w,
                self.inbound.intake.handoff(),
            );
        }
    }
}

/// Publishes a will message to subscribers and the rules (no one to acknowledge).
pub(in crate::broker) fn publish_will(
    shared: &Shared,
    client_id: &str,
    w: Box<Will>,
    handoff: Option<&Handoff>,
) {
    let p = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic,
        pkid: 0,
        payload: w.payload,
        properties: w.properties,
    };
    shared.route(&p.topic, p.retain, || Stored::of(&p, client_id));
    if let Some(handoff) = handoff {
        handoff.try_hand(message(
            p,
            Arc::from(client_id),
            Arc::from(SOURCE),
            Ack::detached(),
        ));
    }
}
