//! Messages to the client: the pump that moves the session's queue into the outbox
//! while it has room (and the client's receive window allows), server → client topic
//! aliases, and the client's acknowledgements of what it was sent (PUBACK; PUBREC,
//! answered by PUBREL; PUBCOMP).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Conn, ProtocolError};
use crate::broker::codec::{Connect, Outgoing, Publish};
use crate::broker::session::Signal;

/// The server → client half of a connection: what the pump may send.
pub(super) struct ToClient {
    /// Wakes the read loop to pull from the session's queue, or to end (its `Link`
    /// holds it too).
    pub(super) signal: Arc<Signal>,
    /// Outbound window: the client's receive maximum, capped by `max_inflight`.
    window: usize,
    /// The largest packet the client accepts.
    max_packet: Option<u32>,
    aliases: AliasesOut,
}

impl ToClient {
    pub(super) fn new(signal: Arc<Signal>, c: &Connect, max_inflight: u16) -> Self {
        ToClient {
            signal,
            window: (c.receive_maximum as usize).min(max_inflight as usize),
            max_packet: c.max_packet_size,
            aliases: AliasesOut {
                max: c.topic_alias_max,
                by_topic: HashMap::new(),
            },
        }
    }
}

/// Server → client topic aliases (MQTT 5, up to the client's topic alias maximum).
struct AliasesOut {
    max: u16,
    by_topic: HashMap<String, u16>,
}

impl AliasesOut {
    /// Replaces a repeated topic by its alias when the client accepts aliases: the first
    /// PUBLISH on a topic carries topic and alias, later ones the alias only.
    fn apply(&mut self, p: &mut Publish) {
        if self.max == 0 {
            return;
        }
        let known = self.by_topic.get(&p.topic).copied();
        let alias = match known {
            Some(a) => a,
            None if self.by_topic.len() < self.max as usize => {
                let a = self.by_topic.len() as u16 + 1;
                self.by_topic.insert(p.topic.clone(), a);
                a
            }
            None => return,
        };
        p.properties
            .get_or_insert_with(Default::default)
            .topic_alias = Some(alias);
        if known.is_some() {
            p.topic.clear();
        }
    }
}

impl Conn {
    /// PUBACK of a QoS 1 message sent to the client: room in its window.
    pub(super) fn acked(&mut self, pkid: u16) {
        self.with_session(|s| s.acked(pkid));
        self.pump();
    }

    /// PUBREC of a QoS 2 message sent to the client: PUBREL, unless the client refused it.
    pub(super) async fn received(&mut self, pkid: u16, reason: u8) -> Result<(), ProtocolError> {
        let release = self.with_session(|s| s.received(pkid, reason >= 0x80));
        if release == Some(true) {
            self.send(Outgoing::PubRel { pkid }).await?;
        }
        self.pump();
        Ok(())
    }

    /// PUBCOMP: the QoS 2 message sent to the client is complete.
    pub(super) fn completed(&mut self, pkid: u16) {
        self.with_session(|s| s.completed(pkid));
        self.pump();
    }

    /// Moves queued messages to the outbox while it has room.
    pub(super) fn pump(&mut self) {
        let room = self.out.room();
        if room == 0 {
            return;
        }
        let packets = {
            let mut state = self.shared.lock();
            match state.sessions.get_mut(&self.client_id) {
                Some(s) if s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id) => {
                    let to = &self.outbound;
                    s.take_sendable(
                        room,
                        to.window,
                        to.max_packet,
                        self.version,
                        &self.shared.counters,
                    )
                }
                _ => Vec::new(),
            }
        };
        let mut sent = 0;
        for mut p in packets {
            if let Outgoing::Publish(publish) = &mut p {
                self.outbound.aliases.apply(publish);
            }
            // One that cannot be encoded stays in flight, to be resent after a reconnect.
            if self.out.push(&p, self.version).is_ok() {
                sent += 1;
            }
        }
        self.shared.counters.sent(sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str) -> Publish {
        Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: Default::default(),
            properties: None,
        }
    }

    fn sent(aliases: &mut AliasesOut, topic: &str) -> (String, Option<u16>) {
        let mut p = publish(topic);
        aliases.apply(&mut p);
        (p.topic, p.properties.and_then(|pp| pp.topic_alias))
    }

    #[test]
    fn a_topic_goes_once_then_its_alias_alone_up_to_the_clients_maximum() {
        let mut aliases = AliasesOut {
            max: 1,
            by_topic: HashMap::new(),
        };
        assert_eq!(sent(&mut aliases, "a"), ("a".into(), Some(1)));
        assert_eq!(sent(&mut aliases, "a"), (String::new(), Some(1)));
        // The client's maximum is reached: other topics go without an alias.
        assert_eq!(sent(&mut aliases, "b"), ("b".into(), None));
        let mut none = AliasesOut {
            max: 0,
            by_topic: HashMap::new(),
        };
        assert_eq!(sent(&mut none, "a"), ("a".into(), None));
        assert_eq!(sent(&mut none, "a"), ("a".into(), None));
    }
}
