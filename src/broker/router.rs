//! The broker's shared state and message routing: sessions by client id, retained
//! messages, and the fan-out of one published message to every matching subscription.
//!
//! A subscriber receives a message once even when several of its subscriptions match,
//! at the highest QoS they granted, with the identifiers of all of them. A shared
//! subscription (`$share/GROUP/filter`) delivers each message to one member of the group
//! (round robin, connected members first). Matching is a scan over the sessions with
//! [`crate::topic::filter_matches`]: simple and fast enough for the device fleets one
//! mqbridge serves; an index (a topic trie) can replace it without changing callers.

use std::collections::HashMap;
use std::sync::Arc;

use super::auth::Auth;
use super::retained::Retained;
use super::session::{Outbound, Session, Stored};
use super::stats::Counters;
use crate::topic::filter_matches;

/// A member of a shared subscription group: (client id, qos, subscription id, online).
type Member = (String, u8, Option<usize>, bool);

#[derive(Debug, Default)]
pub struct Router {
    pub sessions: HashMap<String, Session>,
    pub retained: Retained,
    /// Round-robin position per (group, filter) of shared subscriptions.
    shared_next: HashMap<(String, String), usize>,
}

impl Router {
    /// Delivers `msg` to every matching subscription's queue; returns how many sessions
    /// got it (the others' drops are counted in `counters`). `retain` is the flag as
    /// published (kept only for retain-as-published).
    pub fn route(
        &mut self,
        msg: &Arc<Stored>,
        retain: bool,
        max_queued: usize,
        auth: &Auth,
        counters: &Counters,
    ) -> usize {
        let topic = msg.topic.as_str();
        let mut deliveries: Vec<(String, Outbound)> = Vec::new();
        let mut groups: HashMap<(String, String), Vec<Member>> = HashMap::new();
        for (client_id, session) in &self.sessions {
            if !auth.can_receive(session.username.as_deref(), topic) {
                continue;
            }
            let mut best: Option<Outbound> = None;
            for sub in session.subscriptions.values() {
                if !filter_matches(&sub.filter, topic) {
                    continue;
                }
                if let Some(group) = &sub.share {
                    groups
                        .entry((group.clone(), sub.filter.clone()))
                        .or_default()
                        .push((client_id.clone(), sub.qos, sub.id, session.link.is_some()));
                    continue;
                }
                if sub.no_local && msg.from.as_deref() == Some(client_id.as_str()) {
                    continue;
                }
                let qos = sub.qos.min(msg.qos);
                let b = best.get_or_insert_with(|| Outbound {
                    msg: Arc::clone(msg),
                    qos,
                    retain: false,
                    subscription_ids: Vec::new(),
                });
                b.qos = b.qos.max(qos);
                b.retain |= retain && sub.retain_as_published;
                b.subscription_ids.extend(sub.id);
            }
            if let Some(b) = best {
                deliveries.push((client_id.clone(), b));
            }
        }
        for (key, mut members) in groups {
            members.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| a.0.cmp(&b.0)));
            let online = members.iter().filter(|m| m.3).count().max(1);
            let next = self.shared_next.entry(key).or_default();
            let (client_id, qos, id, _) = members.swap_remove(*next % online);
            *next = next.wrapping_add(1);
            deliveries.push((
                client_id,
                Outbound {
                    msg: Arc::clone(msg),
                    qos: qos.min(msg.qos),
                    retain: false,
                    subscription_ids: id.into_iter().collect(),
                },
            ));
        }
        let mut delivered = 0;
        for (client_id, out) in deliveries {
            if let Some(s) = self.sessions.get_mut(&client_id) {
                match s.enqueue(out, max_queued) {
                    Ok(()) => delivered += 1,
                    Err(why) => {
                        counters.dropped(why);
                    }
                }
            }
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::super::session::{Link, Subscription};
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, qos: u8, from: Option<&str>) -> Arc<Stored> {
        Arc::new(Stored {
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            qos,
            properties: None,
            expires_at: None,
            from: from.map(String::from),
        })
    }

    fn sub(filter: &str, qos: u8) -> Subscription {
        Subscription {
            filter: filter.into(),
            share: None,
            qos,
            no_local: false,
            retain_as_published: false,
            id: None,
        }
    }

    fn session(subs: Vec<(&str, Subscription)>) -> Session {
        let mut s = Session::new(0);
        s.link = Some(Link::for_test(1));
        for (k, v) in subs {
            s.subscriptions.insert(k.into(), v);
        }
        s
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_highest_qos() {
        let mut r = Router::default();
        let mut a = sub("a/#", 1);
        a.id = Some(7);
        let mut b = sub("a/+", 2);
        b.id = Some(9);
        r.sessions
            .insert("c".into(), session(vec![("a/#", a), ("a/+", b)]));
        assert_eq!(
            r.route(
                &msg("a/x", 2, None),
                false,
                10,
                &Auth::default(),
                &Counters::default()
            ),
            1
        );
        let s = r.sessions.get_mut("c").unwrap();
        assert_eq!(s.queued(), 1);
        let sent = s.take_sendable(
            10,
            10,
            None,
            super::super::codec::Version::V5,
            &Counters::default(),
        );
        let super::super::codec::Outgoing::Publish(p) = &sent[0] else {
            panic!()
        };
        assert_eq!(p.qos, 2);
        let mut ids = p
            .properties
            .as_ref()
            .unwrap()
            .subscription_identifiers
            .clone();
        ids.sort();
        assert_eq!(ids, vec![7, 9]);
    }

    #[test]
    fn dollar_topics_and_no_local() {
        let mut r = Router::default();
        let mut own = sub("t", 1);
        own.no_local = true;
        r.sessions
            .insert("me".into(), session(vec![("#", sub("#", 1)), ("t", own)]));
        assert_eq!(
            r.route(
                &msg("$SYS/x", 1, None),
                false,
                10,
                &Auth::default(),
                &Counters::default()
            ),
            0
        );
        // '#' still matches for "me": no-local applies per subscription.
        assert_eq!(
            r.route(
                &msg("t", 1, Some("me")),
                false,
                10,
                &Auth::default(),
                &Counters::default()
            ),
            1
        );
        r.sessions.get_mut("me").unwrap().subscriptions.remove("#");
        assert_eq!(
            r.route(
                &msg("t", 1, Some("me")),
                false,
                10,
                &Auth::default(),
                &Counters::default()
            ),
            0
        );
    }

    #[test]
    fn shared_subscription_delivers_to_one_member() {
        let mut r = Router::default();
        for id in ["a", "b"] {
            let mut s = sub("work/+", 1);
            s.share = Some("g".into());
            r.sessions
                .insert(id.into(), session(vec![("$share/g/work/+", s)]));
        }
        for _ in 0..4 {
            assert_eq!(
                r.route(
                    &msg("work/1", 1, None),
                    false,
                    10,
                    &Auth::default(),
                    &Counters::default()
                ),
                1
            );
        }
        assert_eq!(r.sessions["a"].queued(), 2);
        assert_eq!(r.sessions["b"].queued(), 2);
    }
}
