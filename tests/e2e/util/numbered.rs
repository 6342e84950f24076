//! Issue 5's "prove the promise" harness: numbered QoS 1 messages from publishers that
//! behave like devices (they publish again whatever the server has not acknowledged, until
//! it has), the two PostgreSQL tables they end up in (one with a conflict key on the
//! number, one without), and the tally `sent N / stored S / lost L / duplicates D`.
//!
//! A scenario: create [`NUMBERED_TABLES`], run mqbridge with [`numbered_bridge`],
//! hurt something while [`publish_numbered_resending`] runs, then [`assert_numbered_stored_once`].

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};

use super::{pg_count, within};

/// QoS 1 messages a publisher keeps in flight (and the embedded broker's default window).
const INFLIGHT: u16 = 100;

/// How often a publisher connected and how many PUBLISH packets it sent (resends
/// included), summed over publishers.
#[derive(Debug, Default, Clone, Copy)]
pub struct PublisherStats {
    pub connections: u64,
    pub publishes: u64,
}

impl std::ops::AddAssign for PublisherStats {
    fn add_assign(&mut self, o: PublisherStats) {
        self.connections += o.connections;
        self.publishes += o.publishes;
    }
}

/// A count of the messages the server acknowledged so far, shared between publishers and
/// whoever waits for their progress.
pub type Acked = Rc<Cell<i64>>;

/// A QoS 1 publisher that behaves like a device's MQTT client: it keeps every message the
/// server has not acknowledged, and when the connection drops (the server was killed or
/// restarted) it connects again, with backoff, and publishes them again, until each one got
/// its PUBACK.
///
/// rumqttc alone does not do this: its event loop forgets its unacknowledged publishes when
/// the server answers with a new session (`session_present` false, rumqttc 0.25
/// `EventLoop::poll`), which a clean-session client always gets, and so does a persistent
/// one from a server that lost its state. So each connection is a fresh rumqttc client
/// (clean session), and this type keeps the unacknowledged messages itself.
pub struct ResendingPublisher {
    port: u16,
    id: String,
    acked: Acked,
    pub stats: PublisherStats,
}

impl ResendingPublisher {
    /// A publisher to the server on `port` with client id `id`, counting each acknowledged
    /// message into `acked`.
    pub fn new(port: u16, id: &str, acked: &Acked) -> ResendingPublisher {
        ResendingPublisher {
            port,
            id: id.to_string(),
            acked: Rc::clone(acked),
            stats: PublisherStats::default(),
        }
    }

    /// Publishes every message at QoS 1 and returns once the server acknowledged each;
    /// panics when that takes longer than `timeout`.
    pub async fn publish_all(
        &mut self,
        messages: impl IntoIterator<Item = (String, String)>,
        timeout: Duration,
    ) {
        let mut unacked: BTreeMap<usize, (String, String)> =
            messages.into_iter().enumerate().collect();
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        let mut last_error = None;
        while !unacked.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.connection(&mut unacked)).await {
                Ok(Ok(())) => {}
                Ok(Err(lost)) => {
                    // The server is gone (or not back yet): try again, more slowly while
                    // connecting fails.
                    backoff = if lost.made_progress {
                        Duration::from_millis(50)
                    } else {
                        (backoff * 2).min(Duration::from_secs(1))
                    };
                    last_error = Some(lost.error);
                    tokio::time::sleep(backoff.min(left)).await;
                }
                Err(_) => panic!(
                    "{}: {} messages still unacknowledged after {timeout:?} ({:?}, last \
                     connection error: {last_error:?})",
                    self.id,
                    unacked.len(),
                    self.stats
                ),
            }
        }
    }

    /// One connection: publishes everything in `unacked` and removes what the server
    /// acknowledges; returns when all is acknowledged, or why the connection ended.
    async fn connection(
        &mut self,
        unacked: &mut BTreeMap<usize, (String, String)>,
    ) -> Result<(), ConnectionLost> {
        let mut opts = MqttOptions::new(&self.id, "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(5))
            .set_inflight(INFLIGHT)
            .set_clean_session(true);
        let (client, mut events) = AsyncClient::new(opts, 10);
        let lost = |made_progress: bool| {
            move |error: String| ConnectionLost {
                error,
                made_progress,
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) if c.code == ConnectReturnCode::Success => {
            }
            other => return Err(lost(false)(format!("connect: {other:?}"))),
        }
        self.stats.connections += 1;

        let batch: Vec<(usize, String, String)> = unacked
            .iter()
            .map(|(n, (topic, payload))| (*n, topic.clone(), payload.clone()))
            .collect();
        // Numbers handed to rumqttc and not yet sent, in order: rumqttc reports each
        // PUBLISH it writes (with its packet id) in the order it was handed them.
        let queued = RefCell::new(VecDeque::new());
        let feed = async {
            for (n, topic, payload) in batch {
                queued.borrow_mut().push_back(n);
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // Everything is queued; the connection decides how this ends.
            std::future::pending::<Result<(), String>>().await
        };
        let mut in_flight: HashMap<u16, usize> = HashMap::new();
        let mut acked_here = 0;
        let read = async {
            loop {
                match events.poll().await.map_err(|e| e.to_string())? {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        let n = queued.borrow_mut().pop_front().expect("a queued number");
                        in_flight.insert(pkid, n);
                        self.stats.publishes += 1;
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        let n = in_flight.remove(&ack.pkid).ok_or("unexpected PUBACK")?;
                        unacked.remove(&n);
                        acked_here += 1;
                        self.acked.set(self.acked.get() + 1);
                        if unacked.is_empty() {
                            return Ok::<(), String>(());
                        }
                    }
                    _ => {}
                }
            }
        };
        let result = tokio::select! {
            r = read => r,
            r = feed => r,
        };
        result.map_err(lost(acked_here > 0))
    }
}

/// Why a publisher's connection ended before everything was acknowledged.
#[derive(Debug)]
struct ConnectionLost {
    error: String,
    /// Some messages were acknowledged on it (so the server is back: no need to back off).
    made_progress: bool,
}

/// `n` numbered messages (`{"seq": i}` for i in 0..n) published at QoS 1 to the server on
/// `port` by `publishers` [`ResendingPublisher`]s side by side, each its share in order on
/// its own topic `{root}/p{k}`, counting acknowledged messages into `acked`. Returns once
/// every message was acknowledged; panics when that takes longer than `timeout`.
pub async fn publish_numbered_resending(
    port: u16,
    root: &str,
    n: i64,
    publishers: i64,
    timeout: Duration,
    acked: &Acked,
) -> PublisherStats {
    // Joined, not spawned: the futures borrow and need not be Send.
    let each = futures::future::join_all((0..publishers).map(|p| async move {
        let mut publisher = ResendingPublisher::new(port, &format!("{root}-pub-{p}"), acked);
        let (from, to) = (p * n / publishers, (p + 1) * n / publishers);
        publisher
            .publish_all(
                (from..to).map(|i| (format!("{root}/p{p}"), format!(r#"{{"seq": {i}}}"#))),
                timeout,
            )
            .await;
        publisher.stats
    }))
    .await;
    let mut total = PublisherStats::default();
    for s in each {
        total += s;
    }
    total
}

/// The tables numbered messages are stored in: `keyed` (the number is the primary key, so
/// a redelivered message adds no row) and `raw` (no key: every write adds a row).
pub const NUMBERED_TABLES: &str =
    "CREATE TABLE keyed (seq int PRIMARY KEY); CREATE TABLE raw (seq int)";

/// Writes `dir/bridge.yaml`: `source` (the `broker:` or `embedded:` section and any other
/// top-level ones, such as `spool:`), then sinks and a rule that store every message under
/// `{root}/#` of [`publish_numbered_resending`] into both [`NUMBERED_TABLES`] of the
/// database `db`. Returns its path.
pub fn numbered_bridge(dir: &Path, source: &str, db: &str, root: &str) -> PathBuf {
    let path = dir.join("bridge.yaml");
    std::fs::write(
        &path,
        format!(
            r#"{source}
sinks:
  keyed: {{ type: postgres, url: "{db}", table: keyed, on_conflict: {{ key: [seq], action: ignore }}, batch: {{ max_rows: 200 }} }}
  raw: {{ type: postgres, url: "{db}", table: raw, batch: {{ max_rows: 200 }} }}
rules:
  - {{ name: numbered, from: "{root}/#", transform: '{{seq: .payload.seq}}', to: [keyed, raw] }}
"#
        ),
    )
    .unwrap();
    path
}

/// Waits up to `timeout` for both tables to hold every number of `0..sent`, then prints
/// `sent N / stored S / lost L / duplicates D (table without key), K (table with conflict
/// key)` and asserts that nothing is lost and the keyed table has no duplicate. (The raw
/// table's duplicates are redeliveries, which at-least-once allows.)
pub async fn assert_numbered_stored_once(db: &str, sent: i64, timeout: Duration) {
    let distinct = |table: &str| {
        format!("SELECT count(DISTINCT seq)::text FROM {table} WHERE seq >= 0 AND seq < {sent}")
    };
    let count = async |sql: &str| pg_count(db, sql).await.unwrap_or(0);
    within(timeout, async || {
        (count(&distinct("raw")).await >= sent && count(&distinct("keyed")).await >= sent)
            .then_some(())
    })
    .await;
    let stored = count(&distinct("raw")).await;
    let keyed_stored = count(&distinct("keyed")).await;
    let raw_rows = count("SELECT count(*)::text FROM raw").await;
    let keyed_rows = count("SELECT count(*)::text FROM keyed").await;
    println!(
        "{} (table without key), {} (table with conflict key)",
        super::Tally::new(sent, stored, raw_rows),
        keyed_rows - keyed_stored
    );
    assert_eq!(stored, sent, "lost messages (table without key)");
    assert_eq!(
        keyed_stored, sent,
        "lost messages (table with conflict key)"
    );
    assert_eq!(
        keyed_rows, sent,
        "rows beyond the numbers sent in the keyed table"
    );
}
