//! A client's session: what outlives one connection when the client asks for a
//! persistent session (3.1.1 clean session 0, MQTT 5 session expiry > 0).
//!
//! It owns the client's subscriptions, the bounded queue of messages waiting to be sent,
//! the outbound QoS 1/2 messages in flight (resent with DUP after a reconnect), and the
//! state of inbound QoS 2 exchanges. The connection task pulls from the queue only as
//! fast as its socket writes and the client's receive window allow, so a slow consumer
//! fills its queue, not memory: beyond `max_queued_messages` new messages are dropped and
//! counted (QoS 0 first: they are never queued while the client is offline).
//!
//! While offline it also holds its deadlines ([`Session::detach`]): when it ends, and its
//! will waiting for the will delay, which the broker's [`timers`] fire and a reconnect
//! cancels ([`Session::reconnected`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::codec::{Outgoing, Publish, PublishProperties, Version, Will};
use super::stats::{Counters, Dropped};
use super::timers;

/// A published message as the broker keeps it (shared by every subscriber's queue).
#[derive(Debug)]
pub struct Stored {
    pub topic: String,
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: u8,
    /// MQTT 5 properties to forward (topic alias and subscription ids removed).
    pub properties: Option<PublishProperties>,
    /// Message expiry.
    pub expires_at: Option<Instant>,
    /// Publishing client (for no-local).
    pub from: Option<String>,
}

impl Stored {
    /// A message from `client_id` (a PUBLISH or its will) as the broker keeps it for
    /// subscribers: the properties to forward, the expiry as a deadline.
    pub fn of(p: &Publish, client_id: &str) -> Arc<Stored> {
        let expiry = p
            .properties
            .as_ref()
            .and_then(|pp| pp.message_expiry_interval);
        Arc::new(Stored {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            expires_at: expiry.map(|s| Instant::now() + Duration::from_secs(s as u64)),
            properties: p.properties.clone().map(|mut pp| {
                pp.subscription_identifiers.clear();
                pp.topic_alias = None;
                pp.message_expiry_interval = None;
                pp
            }),
            from: Some(client_id.to_string()),
        })
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// One message for one subscriber.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub msg: Arc<Stored>,
    /// Delivery QoS: min(published, granted).
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<usize>,
}

/// What a subscription asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter without a `$share/GROUP/` prefix.
    pub filter: String,
    /// Share group of a shared subscription.
    pub share: Option<String>,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub id: Option<usize>,
    /// Granted whole by a source of `embedded.auth` (a token's ACL, the HTTP service):
    /// it carries every message its filter matches while `embedded.auth` is configured.
    /// False: the local ACL decides what it carries.
    pub granted: bool,
}

/// An outbound QoS 1/2 message not yet acknowledged by the client.
#[derive(Debug)]
struct Inflight {
    publish: Publish,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    released: bool,
}

/// How the broker reaches a connected client's task: a wake-up to pull from the
/// session's queue, and what a connection that took the session over did with it. One
/// allocation per connection, where a cancellation token would be another, and another
/// future in its loop.
#[derive(Debug, Default)]
pub struct Signal {
    pub notify: Notify,
    /// [`NOT_TAKEN`], [`RESUMED`] or [`ENDED`].
    taken_over: AtomicU8,
}

const NOT_TAKEN: u8 = 0;
/// Taken over by a connection that resumed the session: the will is not published
/// ([MQTT-3.1.3-9]: a new connection to the session came before the will delay passed).
const RESUMED: u8 = 1;
/// Taken over by a clean start: the session ended, and the will goes out at once.
const ENDED: u8 = 2;

impl Signal {
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Tells the connection that another one took its session over, and whether that one
    /// resumed the session (clean start 0) or ended it.
    pub fn take_over(&self, resumed: bool) {
        let how = if resumed { RESUMED } else { ENDED };
        self.taken_over.store(how, Ordering::Release);
        self.notify.notify_one();
    }

    pub fn taken_over(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) != NOT_TAKEN
    }

    /// Taken over by a connection that resumed the session.
    pub fn resumed(&self) -> bool {
        self.taken_over.load(Ordering::Acquire) == RESUMED
    }
}

/// The live connection attached to a session.
#[derive(Debug, Clone)]
pub struct Link {
    pub conn_id: u64,
    /// Wakes the connection to pull from the queue, or to end (taken over).
    pub signal: Arc<Signal>,
    /// Where the client connects from, how, and since when (for `/api/v1/clients`).
    pub peer: std::net::SocketAddr,
    pub version: Version,
    pub since: jiff::Timestamp,
}

#[cfg(test)]
impl Link {
    /// A connection from 127.0.0.1:1 (tests).
    pub fn for_test(conn_id: u64) -> Link {
        Link {
            conn_id,
            signal: Arc::default(),
            peer: ([127, 0, 0, 1], 1).into(),
            version: Version::V5,
            since: jiff::Timestamp::UNIX_EPOCH,
        }
    }
}

/// State of an inbound QoS 2 message (by packet id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2 {
    /// Received; PUBREC not sent yet (waits for settlement).
    Received,
    /// PUBREC sent; waiting for PUBREL.
    Recorded,
}

#[derive(Debug)]
pub struct Session {
    /// Subscriptions by the filter as the client wrote it (incl. `$share/G/`).
    pub subscriptions: HashMap<String, Subscription>,
    queue: VecDeque<Outbound>,
    inflight: VecDeque<Inflight>,
    last_pkid: u16,
    pub incoming_qos2: HashMap<u16, Qos2>,
    /// Seconds the session outlives its connection (u32::MAX: forever).
    pub expiry: u32,
    pub link: Option<Link>,
    /// The user the client logged in as (for the ACL on delivery).
    pub username: Option<String>,
    /// While offline: when the session ends (None: connected, or it never does).
    pub ends_at: Option<tokio::time::Instant>,
    /// While offline: the will waiting for its delay (MQTT 5 will delay interval).
    pub will: Option<DelayedWill>,
    /// The entry of the broker's [`timers`] for the earlier of `ends_at` and the will's
    /// deadline; taken away by a reconnect.
    pub timer: Option<timers::Key>,
    /// Messages dropped because the queue was full.
    pub dropped: u64,
    /// What changed since [`super::store`] last wrote it.
    dirty: Dirty,
}

/// A will waiting for its delay while its session is offline.
#[derive(Debug)]
pub struct DelayedWill {
    pub will: Box<Will>,
    /// When it is published: its delay after the disconnect, at most the session's end.
    pub at: tokio::time::Instant,
}

/// Changes of a session not yet written by [`super::store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dirty {
    Clean,
    /// Only messages appended to the queue, from this index on (an offline subscriber's
    /// queue growing): written as new rows, not by rewriting the session.
    Appended {
        from: usize,
    },
    /// Anything else: the session is written again as a whole.
    Changed,
}

/// What [`super::store`] keeps of a session: everything but the live connection, the
/// inbound QoS 2 state (a publisher resends after a restart) and the counters.
#[derive(Debug, Clone)]
pub struct SessionImage {
    pub expiry: u32,
    pub username: Option<String>,
    pub subscriptions: Vec<(String, Subscription)>,
    pub queued: Vec<Outbound>,
    /// Sent, not yet acknowledged; true: PUBREL sent (QoS 2).
    pub inflight: Vec<(Publish, bool)>,
    pub last_pkid: u16,
    /// The will waiting for its delay; its `delay` is what remains to wait after a
    /// restart (the whole delay, at most the session expiry: both count from the start).
    pub will: Option<Will>,
}

impl Session {
    pub fn new(expiry: u32) -> Self {
        Session {
            subscriptions: HashMap::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            last_pkid: 0,
            incoming_qos2: HashMap::new(),
            expiry,
            link: None,
            username: None,
            ends_at: None,
            will: None,
            timer: None,
            dropped: 0,
            dirty: Dirty::Changed,
        }
    }

    pub fn image(&self) -> SessionImage {
        SessionImage {
            expiry: self.expiry,
            username: self.username.clone(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            queued: self.queue.iter().cloned().collect(),
            inflight: self
                .inflight
                .iter()
                .map(|i| (i.publish.clone(), i.released))
                .collect(),
            last_pkid: self.last_pkid,
            will: self.will.as_ref().map(|w| Will {
                delay: w.will.delay.min(self.expiry),
                ..(*w.will).clone()
            }),
        }
    }

    /// A session as it was persisted, offline, its deadlines counted from `now` (the
    /// clock did not run for the session while mqbridge was stopped).
    pub fn restore(img: SessionImage, now: tokio::time::Instant) -> Session {
        let mut s = Session::new(img.expiry);
        s.username = img.username;
        s.subscriptions = img.subscriptions.into_iter().collect();
        s.queue = img.queued.into();
        s.inflight = img
            .inflight
            .into_iter()
            .map(|(publish, released)| Inflight { publish, released })
            .collect();
        s.last_pkid = img.last_pkid;
        s.detach(now, None);
        s.will = img.will.map(|will| DelayedWill {
            at: now + Duration::from_secs(will.delay as u64),
            will: Box::new(will),
        });
        s.dirty = Dirty::Clean;
        s
    }

    /// The session loses its connection at `now`: sets when it ends (after its expiry)
    /// and when `will` is due (after its delay, at the latest when the session ends,
    /// MQTT 5 §3.1.3.2.2). Returns the will when it is due now (no delay, or a session
    /// that ends with its connection). Arm the broker's timers after.
    pub fn detach(
        &mut self,
        now: tokio::time::Instant,
        will: Option<Box<Will>>,
    ) -> Option<Box<Will>> {
        self.link = None;
        let after = |secs: u32| now + Duration::from_secs(secs as u64);
        self.ends_at = (self.expiry != u32::MAX).then(|| after(self.expiry));
        match will {
            Some(will) if will.delay > 0 && self.expiry > 0 => {
                let at = after(will.delay.min(self.expiry));
                self.will = Some(DelayedWill { will, at });
                self.touch();
                None
            }
            due => due,
        }
    }

    /// A connection came for the session's client id: the offline deadlines no longer
    /// apply. Returns the pending will, for the caller to publish if the session ends
    /// (clean start) or drop if it is resumed. Disarm the broker's timers first.
    pub fn reconnected(&mut self) -> Option<Box<Will>> {
        self.ends_at = None;
        let will = self.will.take().map(|w| w.will);
        if will.is_some() {
            self.touch();
        }
        will
    }

    /// The earlier of the session's end and its will's deadline (None: connected, or
    /// neither).
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        let will = self.will.as_ref().map(|w| w.at);
        match (self.ends_at, will) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The pending will, when it is due at `now` or the session `ends`.
    pub fn take_will(&mut self, now: tokio::time::Instant, ends: bool) -> Option<Box<Will>> {
        if !(ends || self.will.as_ref().is_some_and(|w| w.at <= now)) {
            return None;
        }
        let will = self.will.take()?;
        self.touch();
        Some(will.will)
    }

    /// Marks a change the store must write (anything but a queue append).
    pub fn touch(&mut self) {
        self.dirty = Dirty::Changed;
    }

    /// What changed since the last call (then clean).
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::replace(&mut self.dirty, Dirty::Clean)
    }

    /// The messages queued from index `from` on (see [`Dirty::Appended`]).
    pub fn queued_from(&self, from: usize) -> Vec<Outbound> {
        self.queue.iter().skip(from).cloned().collect()
    }

    /// Queues a message, or says why it was dropped (queue full, or QoS 0 while offline).
    pub fn enqueue(&mut self, out: Outbound, max_queued: usize) -> Result<(), Dropped> {
        let offline = self.link.is_none();
        let dropped = if out.qos == 0 && offline {
            Some(Dropped::OfflineQos0)
        } else if self.queue.len() >= max_queued {
            Some(Dropped::QueueFull)
        } else {
            None
        };
        if let Some(dropped) = dropped {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    "embedded broker: dropping messages for a subscriber (queue full, or QoS 0 while offline)"
                );
            }
            return Err(dropped);
        }
        if self.dirty == Dirty::Clean {
            self.dirty = Dirty::Appended {
                from: self.queue.len(),
            };
        }
        self.queue.push_back(out);
        if let Some(link) = &self.link {
            link.signal.wake();
        }
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1).max(1);
            let id = self.last_pkid;
            if !self.inflight.iter().any(|i| i.publish.pkid == id) {
                return id;
            }
        }
    }

    /// Takes up to `room` messages off the queue for sending, keeping at most `window`
    /// QoS 1/2 messages in flight. Messages larger than `max_packet` (the client's limit)
    /// are dropped, as MQTT 5 requires; expired ones too (each counted in `counters`).
    pub fn take_sendable(
        &mut self,
        mut room: usize,
        window: usize,
        max_packet: Option<u32>,
        version: Version,
        counters: &Counters,
    ) -> Vec<Outgoing> {
        let now = Instant::now();
        let mut out = Vec::new();
        while room > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.msg.expired(now) {
                self.queue.pop_front();
                self.touch();
                counters.dropped(Dropped::Expired);
                continue;
            }
            if front.qos > 0 && self.inflight.len() >= window {
                break;
            }
            let o = self.queue.pop_front().expect("front exists");
            self.touch();
            let pkid = if o.qos > 0 { self.next_pkid() } else { 0 };
            let publish = build_publish(&o, pkid, version, now);
            if let Some(max) = max_packet
                && super::codec::publish_len(&publish, version) > max as usize
            {
                counters.dropped(Dropped::TooLarge);
                continue;
            }
            if o.qos > 0 {
                self.inflight.push_back(Inflight {
                    publish: publish.clone(),
                    released: false,
                });
            }
            out.push(Outgoing::Publish(publish));
            room -= 1;
        }
        out
    }

    /// PUBACK from the client.
    pub fn acked(&mut self, pkid: u16) {
        self.touch();
        self.settle(|i| i.publish.pkid == pkid && i.publish.qos == 1);
    }

    /// PUBREC from the client: true when a PUBREL should follow (false: unknown id, or the
    /// client refused the message, which then ends here).
    pub fn received(&mut self, pkid: u16, refused: bool) -> bool {
        self.touch();
        if refused {
            self.settle(|i| i.publish.pkid == pkid);
            return false;
        }
        match self
            .inflight
            .iter_mut()
            .find(|i| i.publish.pkid == pkid && i.publish.qos == 2)
        {
            Some(i) => {
                i.released = true;
                true
            }
            None => false,
        }
    }

    /// PUBCOMP from the client.
    pub fn completed(&mut self, pkid: u16) {
        self.touch();
        self.settle(|i| i.publish.pkid == pkid && i.released);
    }

    /// Removes the message in flight that `is` picks (packet ids in flight are unique).
    /// Clients mostly acknowledge in order: the oldest is looked at first, and removing it
    /// moves nothing (a `retain` moved the whole window on every acknowledgement).
    fn settle(&mut self, is: impl Fn(&Inflight) -> bool) {
        if let Some(i) = self.inflight.iter().position(is) {
            self.inflight.remove(i);
        }
    }

    /// What to resend on a resumed session, in the original order: PUBLISH with DUP for
    /// unacknowledged messages, PUBREL for released QoS 2 ones.
    pub fn resend(&mut self) -> Vec<Outgoing> {
        self.touch();
        self.inflight
            .iter_mut()
            .map(|i| {
                if i.released {
                    Outgoing::PubRel {
                        pkid: i.publish.pkid,
                    }
                } else {
                    i.publish.dup = true;
                    Outgoing::Publish(i.publish.clone())
                }
            })
            .collect()
    }
}

/// The PUBLISH for one delivery: v5 properties carry the remaining expiry and the
/// matching subscription identifiers.
fn build_publish(o: &Outbound, pkid: u16, version: Version, now: Instant) -> Publish {
    let properties = match version {
        Version::V311 => None,
        Version::V5 => {
            let mut p = o.msg.properties.clone().unwrap_or_default();
            if let Some(at) = o.msg.expires_at {
                p.message_expiry_interval =
                    Some(at.saturating_duration_since(now).as_secs().max(1) as u32);
            }
            p.subscription_identifiers = o.subscription_ids.clone();
            (p != PublishProperties::default()).then_some(p)
        }
    };
    Publish {
        dup: false,
        qos: o.qos,
        retain: o.retain,
        topic: o.msg.topic.clone(),
        pkid,
        payload: o.msg.payload.clone(),
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(qos: u8) -> Outbound {
        Outbound {
            msg: Arc::new(Stored {
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                qos,
                properties: None,
                expires_at: None,
                from: None,
            }),
            qos,
            retain: false,
            subscription_ids: vec![],
        }
    }

    fn online() -> Session {
        let mut s = Session::new(0);
        s.link = Some(Link::for_test(1));
        s
    }

    #[test]
    fn bounded_queue_drops_when_full_and_qos0_offline() {
        let mut s = online();
        assert!(s.enqueue(out(1), 2).is_ok());
        assert!(s.enqueue(out(0), 2).is_ok());
        assert_eq!(s.enqueue(out(2), 2), Err(Dropped::QueueFull));
        assert_eq!(s.dropped, 1);
        s.link = None;
        s.take_sendable(10, 10, None, Version::V311, &Counters::default());
        assert_eq!(
            s.enqueue(out(0), 2),
            Err(Dropped::OfflineQos0),
            "QoS 0 is not queued offline"
        );
        assert!(s.enqueue(out(1), 2).is_ok());
    }

    #[test]
    fn window_limits_inflight_and_resend_sets_dup() {
        let mut s = online();
        for _ in 0..5 {
            s.enqueue(out(1), 100).unwrap();
        }
        let sent = s.take_sendable(10, 2, None, Version::V5, &Counters::default());
        assert_eq!(sent.len(), 2);
        assert_eq!(s.inflight(), 2);
        let Outgoing::Publish(first) = &sent[0] else {
            panic!()
        };
        s.acked(first.pkid);
        assert_eq!(
            s.take_sendable(10, 2, None, Version::V5, &Counters::default())
                .len(),
            1
        );
        let again = s.resend();
        assert_eq!(again.len(), 2);
        assert!(
            again
                .iter()
                .all(|p| matches!(p, Outgoing::Publish(p) if p.dup))
        );
    }

    #[test]
    fn acknowledgements_in_any_order_settle_their_own_message_only() {
        let mut s = online();
        for qos in [1, 1, 2, 1] {
            s.enqueue(out(qos), 100).unwrap();
        }
        let sent = s.take_sendable(10, 10, None, Version::V5, &Counters::default());
        let pkids: Vec<(u16, u8)> = sent
            .iter()
            .map(|p| match p {
                Outgoing::Publish(p) => (p.pkid, p.qos),
                _ => panic!("a publish"),
            })
            .collect();
        let left =
            |s: &Session| -> Vec<u16> { s.inflight.iter().map(|i| i.publish.pkid).collect() };
        // Out of order: the third QoS 1 message, then the first.
        s.acked(pkids[3].0);
        s.acked(pkids[0].0);
        assert_eq!(left(&s), [pkids[1].0, pkids[2].0]);
        // A PUBACK for the QoS 2 message, or a PUBCOMP before its PUBREC, settles nothing.
        s.acked(pkids[2].0);
        s.completed(pkids[2].0);
        assert_eq!(left(&s), [pkids[1].0, pkids[2].0]);
        // An unknown packet id neither.
        s.acked(60_000);
        assert_eq!(s.inflight(), 2);
        assert!(s.received(pkids[2].0, false));
        s.completed(pkids[2].0);
        s.acked(pkids[1].0);
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn qos2_outbound_flow() {
        let mut s = online();
        s.enqueue(out(2), 10).unwrap();
        let sent = s.take_sendable(10, 10, None, Version::V311, &Counters::default());
        let Outgoing::Publish(p) = &sent[0] else {
            panic!()
        };
        assert!(s.received(p.pkid, false));
        assert!(matches!(s.resend()[0], Outgoing::PubRel { .. }));
        s.completed(p.pkid);
        assert_eq!(s.inflight(), 0);
    }

    fn will(delay: u32) -> Option<Box<Will>> {
        Some(Box::new(Will {
            topic: "will/c".into(),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: false,
            properties: None,
            delay,
        }))
    }

    /// MQTT 5 §3.1.3.2.2: the will is due after its delay or when the session ends,
    /// whichever comes first; §3.1.2.11.2: the session ends after its expiry (0: with
    /// its connection, u32::MAX: never).
    #[test]
    fn detaching_sets_the_session_end_and_the_will_at_the_earlier_of_the_two() {
        let now = tokio::time::Instant::now();
        let secs = |s: u64| now + std::time::Duration::from_secs(s);

        let mut s = online();
        s.expiry = 100;
        assert!(s.detach(now, will(5)).is_none(), "delayed");
        assert!(s.link.is_none());
        assert_eq!(s.ends_at, Some(secs(100)));
        assert_eq!(s.will.as_ref().map(|w| w.at), Some(secs(5)));
        assert_eq!(s.deadline(), Some(secs(5)));
        assert!(s.take_will(secs(4), false).is_none(), "not yet");
        assert!(s.take_will(secs(5), false).is_some());
        assert_eq!(s.deadline(), Some(secs(100)), "then the session's end");

        let mut s = Session::new(5);
        assert!(s.detach(now, will(50)).is_none());
        assert_eq!(s.deadline(), Some(secs(5)), "capped by the expiry");
        assert!(
            s.take_will(now, true).is_some(),
            "due when the session ends"
        );

        let mut s = Session::new(u32::MAX);
        assert!(s.detach(now, will(5)).is_none());
        assert_eq!((s.ends_at, s.deadline()), (None, Some(secs(5))));

        // Due at once: no delay, or a session that ends with its connection.
        assert!(Session::new(100).detach(now, will(0)).is_some());
        assert!(Session::new(0).detach(now, will(30)).is_some());

        // A reconnect: no deadline left, the will handed back.
        let mut s = Session::new(100);
        s.detach(now, will(5));
        assert!(s.reconnected().is_some());
        assert_eq!((s.ends_at.is_none(), s.deadline()), (true, None));
    }

    #[test]
    fn oversized_messages_are_dropped_for_small_clients() {
        let mut s = online();
        s.enqueue(out(1), 10).unwrap();
        assert!(
            s.take_sendable(10, 10, Some(5), Version::V5, &Counters::default())
                .is_empty()
        );
        assert_eq!(s.inflight(), 0);
    }
}
