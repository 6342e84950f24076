//! What the broker counts, and the snapshots the admin server reads.
//!
//! Counters are atomics added to where things happen, and read, with the gauges
//! (connections, sessions, subscriptions, retained messages), by [`super::Broker::stats`]:
//! the admin server when it is scraped, and `$SYS` ([`super::sys`]) on its interval. The
//! rare ones that only the admin server reports (connections refused or rate limited)
//! are `metrics` handles looked up once when the broker opens. [`Client`] is one session as
//! `/api/v1/clients` lists it. Labels are fixed values only, never client ids or topics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use metrics::Counter;

use super::codec::Version;

/// Why a message did not reach a subscriber (or, [`Dropped::Acl`], was not taken from its
/// publisher): the `reason` label of `mqbridge_broker_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The subscriber's queue held `max_queued_messages`.
    QueueFull,
    /// A QoS 0 message for a subscriber that is offline (never queued).
    OfflineQos0,
    /// Its message expiry passed while it waited in a queue.
    Expired,
    /// Larger than the subscriber's maximum packet size (MQTT 5).
    TooLarge,
    /// A PUBLISH the ACL refused.
    Acl,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::QueueFull,
        Dropped::OfflineQos0,
        Dropped::Expired,
        Dropped::TooLarge,
        Dropped::Acl,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::OfflineQos0 => "offline_qos0",
            Dropped::Expired => "expired",
            Dropped::TooLarge => "too_large",
            Dropped::Acl => "acl",
        }
    }
}

/// Which deadline closed a connection: the `timeout` label of
/// `mqbridge_broker_connections_timed_out_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimedOut {
    /// `connect_timeout`: no TLS or WebSocket handshake and CONNECT in time.
    Connect,
    /// 1.5 × the keepalive without a whole packet from the client.
    KeepAlive,
    /// `send_timeout`: the client's socket took nothing the broker sent it.
    Send,
}

impl TimedOut {
    const ALL: [TimedOut; 3] = [TimedOut::Connect, TimedOut::KeepAlive, TimedOut::Send];

    fn label(self) -> &'static str {
        match self {
            TimedOut::Connect => "connect",
            TimedOut::KeepAlive => "keepalive",
            TimedOut::Send => "send",
        }
    }
}

/// The broker's counters: the `metrics` series, and atomics for [`Stats`].
#[derive(Debug)]
pub struct Counters {
    /// CONNECTs refused because `max_connections` clients were connected.
    connections_refused: AtomicU64,
    /// PUBLISHes from clients, and to subscribers.
    received: AtomicU64,
    sent: AtomicU64,
    /// By [`Dropped`] as an index.
    dropped: [AtomicU64; Dropped::ALL.len()],
    refused: Counter,
    rate_limited: Counter,
    /// By [`TimedOut`] as an index.
    timed_out: [Counter; TimedOut::ALL.len()],
}

impl Default for Counters {
    /// Handles from the recorder installed now (no-ops without one): every series
    /// exists from the start, at 0.
    fn default() -> Self {
        Counters {
            connections_refused: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            dropped: Default::default(),
            refused: metrics::counter!("mqbridge_broker_connections_refused_total"),
            rate_limited: metrics::counter!("mqbridge_broker_connections_rate_limited_total"),
            timed_out: TimedOut::ALL.map(|t| {
                metrics::counter!("mqbridge_broker_connections_timed_out_total", "timeout" => t.label())
            }),
        }
    }
}

impl Counters {
    /// A PUBLISH from a client.
    pub fn received(&self) {
        self.received.fetch_add(1, Relaxed);
    }

    /// `n` PUBLISHes written to subscribers.
    pub fn sent(&self, n: u64) {
        if n > 0 {
            self.sent.fetch_add(n, Relaxed);
        }
    }

    /// A message dropped; returns how many were for this reason so far.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].fetch_add(1, Relaxed) + 1
    }

    /// A connection closed at once: its address opened more than `connection_rate_per_ip`.
    pub fn rate_limited(&self) {
        self.rate_limited.increment(1);
    }

    /// A connection closed by one of its deadlines.
    pub fn timed_out(&self, which: TimedOut) {
        self.timed_out[which as usize].increment(1);
    }

    /// A CONNECT refused because `max_connections` clients were connected.
    pub fn connection_refused(&self) {
        self.refused.increment(1);
        self.connections_refused.fetch_add(1, Relaxed);
    }
}

/// A snapshot of the broker's gauges and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Open client connections (past the TLS/WebSocket handshake; counted before their
    /// CONNECT, as `max_connections` counts them).
    pub connections: usize,
    /// Sessions, with a connection or offline (persistent ones waiting for their client).
    pub sessions: usize,
    /// Of those, the offline ones.
    pub offline: usize,
    /// Subscriptions over every session.
    pub subscriptions: usize,
    /// Messages waiting in sessions' queues (not yet sent).
    pub queued: usize,
    /// Topics with a retained message.
    pub retained: usize,
    /// PUBLISHes refused by the ACL.
    pub publish_denied: u64,
    pub connections_refused: u64,
    /// PUBLISHes from clients, and to subscribers.
    pub received: u64,
    pub sent: u64,
    /// Messages dropped, by [`Dropped`] as an index.
    pub dropped: [u64; Dropped::ALL.len()],
}

impl Stats {
    pub(super) fn read(connections: usize, counters: &Counters, router: &super::Router) -> Stats {
        let (mut subscriptions, mut queued, mut offline) = (0, 0, 0);
        for s in router.sessions.values() {
            subscriptions += s.subscriptions.len();
            queued += s.queued();
            offline += usize::from(s.link.is_none());
        }
        Stats {
            connections,
            sessions: router.sessions.len(),
            offline,
            subscriptions,
            queued,
            retained: router.retained.len(),
            publish_denied: counters.dropped[Dropped::Acl as usize].load(Relaxed),
            connections_refused: counters.connections_refused.load(Relaxed),
            received: counters.received.load(Relaxed),
            sent: counters.sent.load(Relaxed),
            dropped: Dropped::ALL.map(|d| counters.dropped[d as usize].load(Relaxed)),
        }
    }
}

/// A session as `/api/v1/clients` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub client_id: String,
    pub username: Option<String>,
    /// None: offline (a persistent session waiting for its client).
    pub connection: Option<Connection>,
    /// (filter as the client wrote it, `$share/GROUP/` included; granted QoS), by filter.
    pub subscriptions: Vec<(String, u8)>,
    pub queued: usize,
    /// QoS 1/2 messages sent and not yet acknowledged by the client.
    pub inflight: usize,
    /// Seconds the session outlives its connection (u32::MAX: forever).
    pub session_expiry: u32,
}

/// The live connection of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub peer: SocketAddr,
    pub version: Version,
    pub since: jiff::Timestamp,
}

impl Client {
    pub(super) fn of(client_id: &str, s: &super::session::Session) -> Client {
        let mut subscriptions: Vec<(String, u8)> = s
            .subscriptions
            .iter()
            .map(|(filter, sub)| (filter.clone(), sub.qos))
            .collect();
        subscriptions.sort();
        Client {
            client_id: client_id.to_string(),
            username: s.username.clone(),
            connection: s.link.as_ref().map(|l| Connection {
                peer: l.peer,
                version: l.version,
                since: l.since,
            }),
            subscriptions,
            queued: s.queued(),
            inflight: s.inflight(),
            session_expiry: s.expiry,
        }
    }
}

impl Version {
    /// As MQTT names it: `3.1.1` or `5.0`.
    pub fn name(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn counters_count_apart_and_are_read_in_the_snapshot() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counters = metrics::with_local_recorder(&recorder, Counters::default);
        counters.received();
        counters.sent(2);
        counters.sent(0);
        assert_eq!(counters.dropped(Dropped::Acl), 1);
        assert_eq!(counters.dropped(Dropped::Acl), 2);
        assert_eq!(counters.dropped(Dropped::QueueFull), 1);
        counters.connection_refused();
        let stats = Stats::read(3, &counters, &super::super::Router::default());
        let mut dropped = [0; Dropped::ALL.len()];
        dropped[Dropped::Acl as usize] = 2;
        dropped[Dropped::QueueFull as usize] = 1;
        assert_eq!(
            stats,
            Stats {
                connections: 3,
                publish_denied: 2,
                connections_refused: 1,
                received: 1,
                sent: 2,
                dropped,
                ..Stats::default()
            }
        );
        // The admin server reports the rest from the snapshot when scraped.
        let text = handle.render();
        assert!(
            text.contains("mqbridge_broker_connections_refused_total 1\n"),
            "{text}"
        );
    }
}
