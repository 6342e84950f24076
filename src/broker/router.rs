//! The broker's shared state and message routing: sessions by client id, retained
//! messages, the subscription index over the sessions, and the fan-out of one published
//! message to every matching subscription.
//!
//! A subscriber receives a message once even when several of its subscriptions match,
//! at the highest QoS they granted, with the identifiers of all of them. A shared
//! subscription (`$share/GROUP/filter`) delivers each message to one member of the group
//! (round robin, connected members first). Matching goes through the [`Index`], a topic
//! trie, so it costs what the message matches, not one check per session; the ACL's
//! part was decided when each subscription was indexed ([`Auth::receive`]).
//!
//! Locks ([`State`]), always taken in this order: the index (a `RwLock`: publishers
//! match concurrently), then the sessions ([`Router`], a `Mutex`: held only to queue
//! the matched deliveries, or by one connection to pull its queue). The users and ACL
//! sit beside the index because its entries hold decisions made with them. Changing
//! subscriptions or the set of sessions takes both ([`Change`]); a routing holds the
//! index (read) until its messages are queued, so no subscription changes between the
//! matching and the queueing of one message (a retained message and the subscription
//! made beside it see each other, and a clean start never gets what its previous
//! session subscribed to).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use super::auth::{Auth, Identity, Receive};
use super::index::{Fanout, Index};
use super::retained::Retained;
use super::session::{Outbound, Session, Stored, Subscription};
use super::stats::Counters;

/// Sessions, retained messages and subscriptions, with the users and ACL; see the
/// module docs for its locks.
#[derive(Debug, Default)]
pub struct State {
    /// Users and ACL; a config reload replaces them ([`State::set_auth`]).
    auth: RwLock<Arc<Auth>>,
    index: RwLock<Index>,
    router: Mutex<Router>,
}

/// Sessions by client id and retained messages (under the [`State`]'s mutex).
#[derive(Debug, Default)]
pub struct Router {
    /// Every session, connected or offline (boxed: the map's slots stay small, where
    /// thousands of devices each hold one). Insert and remove sessions, and change their
    /// subscriptions, through [`Change`], which keeps the index in step.
    pub sessions: HashMap<String, Box<Session>>,
    pub retained: Retained,
    /// Round-robin position per (group, filter) of shared subscriptions.
    shared_next: HashMap<(String, String), usize>,
}

/// Both locks of the [`State`], to change subscriptions or the set of sessions; derefs
/// to the [`Router`] for the rest.
pub struct Change<'a> {
    /// The ACL in force: a reload waits for this change to end.
    auth: Arc<Auth>,
    index: RwLockWriteGuard<'a, Index>,
    router: MutexGuard<'a, Router>,
}

// A panic while holding a lock leaves consistent-enough state: keep serving.
fn unpoison<G>(r: Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

impl State {
    /// The state of `router` (sessions restored from persistence, say), its sessions'
    /// subscriptions indexed under `auth`.
    pub fn new(router: Router, auth: Auth) -> State {
        let state = State {
            auth: RwLock::new(Arc::new(auth)),
            ..State::default()
        };
        *unpoison(state.router.lock()) = router;
        state.change().reindex();
        state
    }

    /// The users and ACL in force now.
    pub fn auth(&self) -> Arc<Auth> {
        Arc::clone(&*unpoison(self.auth.read()))
    }

    /// The sessions and retained messages, for anything but changing subscriptions or
    /// adding and removing sessions.
    pub fn lock(&self) -> MutexGuard<'_, Router> {
        unpoison(self.router.lock())
    }

    /// Both locks, to change subscriptions or add and remove sessions.
    pub fn change(&self) -> Change<'_> {
        let index = unpoison(self.index.write());
        Change {
            auth: self.auth(),
            index,
            router: self.lock(),
        }
    }

    /// Replaces the users and ACL, and decides again what every existing subscription
    /// may receive.
    pub fn set_auth(&self, auth: Auth) {
        let mut change = self.change();
        let auth = Arc::new(auth);
        *unpoison(self.auth.write()) = Arc::clone(&auth);
        change.auth = auth;
        change.reindex();
    }

    /// Delivers a message on `topic` to every matching subscription's queue, and keeps
    /// it as its topic's retained message when `retain` is set; returns how many
    /// sessions got it (the others' drops are counted in `counters`). `stored` makes the
    /// message; it is called only when a subscription matches or `retain` is set, and
    /// the sessions are locked only then.
    pub fn route(
        &self,
        topic: &str,
        retain: bool,
        stored: impl FnOnce() -> Arc<Stored>,
        max_queued: usize,
        counters: &Counters,
    ) -> usize {
        // Read-locked until the messages are queued (see the module docs).
        let index = unpoison(self.index.read());
        let found = index.matching(topic);
        if found.is_empty() && !retain {
            return 0;
        }
        let msg = stored();
        let fanout = Fanout::new(found, &msg, retain);
        let mut router = self.lock();
        if retain {
            router.retained.set(Arc::clone(&msg));
        }
        router.deliver(&msg, fanout, max_queued, counters)
    }
}

impl Change<'_> {
    /// Adds a session (replacing any of the same client id) with its subscriptions.
    pub fn insert_session(&mut self, client_id: String, session: Box<Session>) {
        self.remove_session(&client_id);
        for (key, sub) in &session.subscriptions {
            let who = Identity {
                username: session.username.as_deref(),
                client_id: &client_id,
            };
            let receive = receive(&self.auth, who, sub);
            self.index.insert(&client_id, key, sub, receive);
        }
        self.router.sessions.insert(client_id, session);
    }

    /// Removes a session and its subscriptions.
    pub fn remove_session(&mut self, client_id: &str) -> Option<Box<Session>> {
        let session = self.router.sessions.remove(client_id)?;
        for (key, sub) in &session.subscriptions {
            self.index.remove(client_id, key, &sub.filter);
        }
        Some(session)
    }

    /// Adds or replaces the subscription `key` (the filter as the client wrote it) of a
    /// session: whether it replaced one; None: no such session.
    pub fn subscribe(&mut self, client_id: &str, key: String, sub: Subscription) -> Option<bool> {
        let session = self.router.sessions.get_mut(client_id)?;
        session.touch();
        let who = Identity {
            username: session.username.as_deref(),
            client_id,
        };
        let receive = receive(&self.auth, who, &sub);
        let replaced = session.subscriptions.insert(key.clone(), sub.clone());
        if let Some(old) = &replaced {
            self.index.remove(client_id, &key, &old.filter);
        }
        self.index.insert(client_id, &key, &sub, receive);
        Some(replaced.is_some())
    }

    /// Removes the subscription `key` of a session: whether it existed; None: no such
    /// session.
    pub fn unsubscribe(&mut self, client_id: &str, key: &str) -> Option<bool> {
        let session = self.router.sessions.get_mut(client_id)?;
        session.touch();
        let sub = session.subscriptions.remove(key);
        if let Some(sub) = &sub {
            self.index.remove(client_id, key, &sub.filter);
        }
        Some(sub.is_some())
    }

    /// Indexes every session's subscriptions again, under the ACL in force.
    fn reindex(&mut self) {
        let sessions = std::mem::take(&mut self.router.sessions);
        *self.index = Index::default();
        for (client_id, session) in sessions {
            self.insert_session(client_id, session);
        }
    }
}

/// What `sub` of `who` may receive under `auth`: everything, when `embedded.auth`
/// granted it whole and is still configured; else what the local ACL allows.
fn receive(auth: &Auth, who: Identity, sub: &Subscription) -> Receive {
    if sub.granted && auth.external() {
        Receive::All
    } else {
        auth.receive(who, &sub.filter)
    }
}

impl Deref for Change<'_> {
    type Target = Router;
    fn deref(&self) -> &Router {
        &self.router
    }
}

impl DerefMut for Change<'_> {
    fn deref_mut(&mut self) -> &mut Router {
        &mut self.router
    }
}

impl Router {
    /// Queues the deliveries of `fanout` (one member picked per shared group); returns
    /// how many sessions got `msg`.
    fn deliver(
        &mut self,
        msg: &Arc<Stored>,
        fanout: Fanout<'_>,
        max_queued: usize,
        counters: &Counters,
    ) -> usize {
        let Fanout {
            mut deliveries,
            groups,
        } = fanout;
        for ((group, filter), mut members) in groups {
            let sessions = &self.sessions;
            let online = |id: &str| sessions.get(id).is_some_and(|s| s.link.is_some());
            members.sort_by(|a, b| {
                online(&b.client_id)
                    .cmp(&online(&a.client_id))
                    .then_with(|| a.client_id.cmp(&b.client_id))
            });
            let connected = members.iter().filter(|e| online(&e.client_id)).count();
            let next = self
                .shared_next
                .entry((group.to_string(), filter.to_string()))
                .or_default();
            let member = members[*next % connected.max(1)];
            *next = next.wrapping_add(1);
            deliveries.push((
                &member.client_id,
                Outbound {
                    msg: Arc::clone(msg),
                    qos: member.sub.qos.min(msg.qos),
                    retain: false,
                    subscription_ids: member.sub.id.into_iter().collect(),
                },
            ));
        }
        let mut delivered = 0;
        for (client_id, out) in deliveries {
            if let Some(s) = self.sessions.get_mut(client_id) {
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
    use super::super::session::Link;
    use super::*;
    use crate::config::{Acl, AclRule};
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
            granted: false,
        }
    }

    fn session(subs: Vec<(&str, Subscription)>) -> Box<Session> {
        let mut s = Session::new(0);
        s.link = Some(Link::for_test(1));
        for (k, v) in subs {
            s.subscriptions.insert(k.into(), v);
        }
        Box::new(s)
    }

    /// Routes `msg` (not retained, queues of 10): how many sessions got it.
    fn route(state: &State, msg: &Arc<Stored>) -> usize {
        state.route(
            &msg.topic,
            false,
            || Arc::clone(msg),
            10,
            &Counters::default(),
        )
    }

    /// A message is made only for a subscriber or the retained store: one that no
    /// subscription matches, not retained, costs neither it nor the sessions' lock.
    #[test]
    fn a_message_is_made_only_when_someone_takes_it() {
        let state = State::default();
        let made = std::cell::Cell::new(0);
        let make = |topic: &str| {
            made.set(made.get() + 1);
            msg(topic, 1, None)
        };
        let route =
            |topic, retain| state.route(topic, retain, || make(topic), 10, &Counters::default());
        assert_eq!(route("a/x", false), 0);
        assert_eq!(made.get(), 0, "nobody subscribed: not made");
        assert_eq!(route("a/x", true), 0);
        assert_eq!(made.get(), 1, "retained: made, for the store");
        assert_eq!(state.lock().retained.len(), 1);
        state
            .change()
            .insert_session("c".into(), session(vec![("a/+", sub("a/+", 1))]));
        assert_eq!(route("b/x", false), 0);
        assert_eq!(made.get(), 1, "no subscription matches: not made");
        assert_eq!(route("a/y", false), 1);
        assert_eq!(made.get(), 2, "a subscriber: made once");
    }

    /// `deny subscribe secret/#` for everyone.
    fn deny_secret() -> Auth {
        let deny = AclRule {
            username: None,
            allow: false,
            publish: vec![],
            subscribe: vec!["secret/#".into()],
        };
        Auth::new(vec![], true, Acl::Rules(vec![deny]))
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_at_highest_qos() {
        let state = State::default();
        let mut a = sub("a/#", 1);
        a.id = Some(7);
        let mut b = sub("a/+", 2);
        b.id = Some(9);
        state
            .change()
            .insert_session("c".into(), session(vec![("a/#", a), ("a/+", b)]));
        assert_eq!(route(&state, &msg("a/x", 2, None)), 1);
        let mut router = state.lock();
        let s = router.sessions.get_mut("c").unwrap();
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
        let state = State::default();
        let mut own = sub("t", 1);
        own.no_local = true;
        state
            .change()
            .insert_session("me".into(), session(vec![("#", sub("#", 1)), ("t", own)]));
        assert_eq!(route(&state, &msg("$SYS/x", 1, None)), 0);
        // '#' still matches for "me": no-local applies per subscription.
        assert_eq!(route(&state, &msg("t", 1, Some("me"))), 1);
        assert_eq!(state.change().unsubscribe("me", "#"), Some(true));
        assert_eq!(route(&state, &msg("t", 1, Some("me"))), 0);
        assert_eq!(route(&state, &msg("t", 1, Some("other"))), 1);
    }

    #[test]
    fn shared_subscription_delivers_to_one_member() {
        let state = State::default();
        for id in ["a", "b", "off"] {
            let mut s = session(vec![]);
            if id == "off" {
                s.link = None;
            }
            state.change().insert_session(id.into(), s);
            let mut sub = sub("work/+", 1);
            sub.share = Some("g".into());
            state.change().subscribe(id, "$share/g/work/+".into(), sub);
        }
        for _ in 0..4 {
            assert_eq!(route(&state, &msg("work/1", 1, None)), 1);
        }
        let router = state.lock();
        assert_eq!(router.sessions["a"].queued(), 2);
        assert_eq!(router.sessions["b"].queued(), 2);
        assert_eq!(
            router.sessions["off"].queued(),
            0,
            "connected members first"
        );
    }

    #[test]
    fn removed_sessions_and_subscriptions_leave_the_index() {
        let state = State::default();
        state
            .change()
            .insert_session("c".into(), session(vec![("a/#", sub("a/#", 1))]));
        assert_eq!(
            state.change().subscribe("c", "b".into(), sub("b", 1)),
            Some(false)
        );
        assert_eq!(
            state.change().subscribe("c", "b".into(), sub("b", 2)),
            Some(true)
        );
        assert_eq!(
            state.change().subscribe("gone", "b".into(), sub("b", 1)),
            None
        );
        assert_eq!(route(&state, &msg("b", 1, None)), 1);
        assert_eq!(state.change().unsubscribe("c", "b"), Some(true));
        assert_eq!(state.change().unsubscribe("c", "b"), Some(false));
        assert_eq!(route(&state, &msg("b", 1, None)), 0);
        // A clean start: the new session has none of the old one's subscriptions.
        state.change().insert_session("c".into(), session(vec![]));
        assert_eq!(route(&state, &msg("a/x", 1, None)), 0);
        state
            .change()
            .insert_session("c".into(), session(vec![("a/#", sub("a/#", 1))]));
        assert!(state.change().remove_session("c").is_some());
        assert_eq!(route(&state, &msg("a/x", 1, None)), 0);
    }

    #[test]
    fn restored_sessions_are_indexed_and_offline_ones_queue() {
        let mut router = Router::default();
        let mut offline = session(vec![("a/#", sub("a/#", 1))]);
        offline.link = None;
        router.sessions.insert("off".into(), offline);
        let state = State::new(router, Auth::default());
        assert_eq!(route(&state, &msg("a/x", 1, None)), 1);
        assert_eq!(state.lock().sessions["off"].queued(), 1);
    }

    #[test]
    fn a_deny_inside_a_broad_filter_withholds_its_topics() {
        let state = State::new(Router::default(), deny_secret());
        state.change().insert_session(
            "c".into(),
            session(vec![("#", sub("#", 1)), ("public/+", sub("public/+", 1))]),
        );
        assert_eq!(route(&state, &msg("secret/x", 1, None)), 0);
        assert_eq!(route(&state, &msg("public/x", 1, None)), 1);
        assert_eq!(route(&state, &msg("other", 1, None)), 1);
    }

    #[test]
    fn an_acl_reload_applies_to_existing_subscriptions() {
        let state = State::default();
        state
            .change()
            .insert_session("c".into(), session(vec![("#", sub("#", 1))]));
        assert_eq!(route(&state, &msg("secret/x", 1, None)), 1);
        state.set_auth(deny_secret());
        assert_eq!(route(&state, &msg("secret/x", 1, None)), 0);
        assert_eq!(route(&state, &msg("public/x", 1, None)), 1);
        // Subscriptions made after the reload, and a reload back.
        state
            .change()
            .subscribe("c", "secret/+".into(), sub("secret/+", 1));
        assert_eq!(route(&state, &msg("secret/x", 1, None)), 0);
        state.set_auth(Auth::default());
        assert_eq!(route(&state, &msg("secret/x", 1, None)), 1);
    }
}
