//! Persistence of the embedded broker's state (`embedded.persistence`): retained messages
//! and persistent sessions (subscriptions, queued and unacknowledged messages) in a SQLite
//! file of their own (WAL, busy timeout), so that they survive a restart.
//!
//! Batched, not write-through: connections only mark what they change (a session's
//! [`Dirty`] state, the retained store's changed topics, both under the broker lock they
//! already hold); every `flush_interval` the flusher takes those changes under the lock
//! (cloning `Arc`s and `Bytes`, no I/O there) and writes them in one transaction: new
//! rows for messages appended to an offline session's queue, the whole session again for
//! any other change (so a busy online subscriber costs its queue's size per flush). A graceful stop flushes once more after every connection
//! has ended. A crash (`kill -9`) loses at most the last interval of broker state; it
//! never loses a publisher's acknowledged message, which the sinks stored before the
//! acknowledgement went out (this file plays no part in that).
//!
//! Restored sessions are offline; their expiry counts from the restart. So does the delay
//! of a will that was waiting for it when mqbridge stopped: it is saved with its session
//! and published after the restart unless the client reconnects first (MQTT 5 counts a
//! will delay and a session expiry on the server's clock, which did not run meanwhile).
//! Messages that were in flight to a subscriber are resent with DUP (or PUBREL) when it
//! reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection as _, Row as _};

use super::codec::{Publish, PublishProperties, Will};
use super::router::Router;
use super::session::{Dirty, Outbound, Session, SessionImage, Stored, Subscription};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS retained (
    topic       TEXT PRIMARY KEY,
    payload     BLOB NOT NULL,
    qos         INTEGER NOT NULL,
    properties  TEXT,
    expires_at  INTEGER
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id   TEXT PRIMARY KEY,
    expiry      INTEGER NOT NULL,
    username    TEXT,
    last_pkid   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id   TEXT NOT NULL,
    key         TEXT NOT NULL,
    filter      TEXT NOT NULL,
    share       TEXT,
    qos         INTEGER NOT NULL,
    no_local    INTEGER NOT NULL,
    retain_as_published INTEGER NOT NULL,
    id          INTEGER,
    granted     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, key)
);
CREATE TABLE IF NOT EXISTS session_messages (
    client_id   TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    state       INTEGER NOT NULL,  -- 0 queued, 1 sent (waiting for PUBACK/PUBREC), 2 PUBREL sent
    pkid        INTEGER NOT NULL,
    dup         INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    published_qos INTEGER NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    properties  TEXT,
    subscription_ids TEXT NOT NULL,
    expires_at  INTEGER,
    PRIMARY KEY (client_id, seq)
);
-- The will of an offline session waiting for its delay (MQTT 5); `delay`: seconds to
-- wait after the restart.
CREATE TABLE IF NOT EXISTS session_wills (
    client_id   TEXT PRIMARY KEY,
    topic       TEXT NOT NULL,
    payload     BLOB NOT NULL,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    properties  TEXT,
    delay       INTEGER NOT NULL
);
";

/// The state file cannot be opened or read. The cause is part of the message.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker: cannot open its state file {}: {error}", path.display())]
pub struct OpenError {
    path: PathBuf,
    error: OpenCause,
}

/// What failed: creating the file's folder (I/O), or opening, creating or reading it.
#[derive(Debug, thiserror::Error)]
enum OpenCause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sqlite(#[from] sqlx::Error),
}

/// The broker's state file, and what it holds (to delete sessions that went away).
pub struct Store {
    conn: SqliteConnection,
    path: PathBuf,
    /// Client ids of the sessions in the file, with the next free message `seq` of each.
    known: HashMap<String, i64>,
    /// After a failed write: write everything again next time.
    resync: bool,
}

/// What changed since the last flush, taken under the broker lock.
#[derive(Default)]
pub struct Changes {
    /// (topic, message; None: cleared). With `all`, every retained message.
    retained: Vec<(String, Option<Arc<Stored>>)>,
    sessions: Vec<(String, SessionImage)>,
    /// Messages appended to a session's queue: (client id, seq of the first, messages).
    appended: Vec<(String, i64, Vec<Outbound>)>,
    removed: Vec<String>,
    /// Replace the whole file's content (after a failed write).
    all: bool,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.retained.is_empty()
            && self.sessions.is_empty()
            && self.appended.is_empty()
            && self.removed.is_empty()
    }
}

impl Store {
    /// Opens (creating) the file and reads the state it holds.
    pub async fn open(path: &Path) -> Result<(Store, Router), OpenError> {
        let fail = |error: OpenCause| OpenError {
            path: path.to_path_buf(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.into()))?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| fail(e.into()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Broker state, not the stored messages: a power cut may lose the last flush.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let mut conn = SqliteConnection::connect_with(&opts)
            .await
            .map_err(|e| fail(e.into()))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&mut conn)
            .await
            .map_err(|e| fail(e.into()))?;
        // Files written before subscriptions could be granted by `embedded.auth`.
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('subscriptions')")
                .fetch_all(&mut conn)
                .await
                .map_err(|e| fail(e.into()))?;
        if !columns.iter().any(|c| c == "granted") {
            sqlx::raw_sql(
                "ALTER TABLE subscriptions ADD COLUMN granted INTEGER NOT NULL DEFAULT 0",
            )
            .execute(&mut conn)
            .await
            .map_err(|e| fail(e.into()))?;
        }
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            known: HashMap::new(),
            resync: false,
        };
        let router = store.load().await.map_err(|e| fail(e.into()))?;
        tracing::info!(
            path = %path.display(),
            sessions = router.sessions.len(),
            retained = router.retained.len(),
            "embedded broker: state restored"
        );
        Ok((store, router))
    }

    async fn load(&mut self) -> Result<Router, sqlx::Error> {
        let mut router = Router::default();
        let now = Instant::now();
        for r in sqlx::query("SELECT topic, payload, qos, properties, expires_at FROM retained")
            .fetch_all(&mut self.conn)
            .await?
        {
            let msg = Stored {
                topic: r.get("topic"),
                payload: Bytes::from(r.get::<Vec<u8>, _>("payload")),
                qos: r.get::<i64, _>("qos") as u8,
                properties: props_from_json(r.get("properties")),
                expires_at: r.get::<Option<i64>, _>("expires_at").map(from_unix_ms),
                from: None,
            };
            if !msg.expired(now) {
                router.retained.restore(Arc::new(msg));
            }
        }

        let mut images: HashMap<String, SessionImage> = HashMap::new();
        for r in sqlx::query("SELECT client_id, expiry, username, last_pkid FROM sessions")
            .fetch_all(&mut self.conn)
            .await?
        {
            images.insert(
                r.get("client_id"),
                SessionImage {
                    expiry: r.get::<i64, _>("expiry") as u32,
                    username: r.get("username"),
                    subscriptions: Vec::new(),
                    queued: Vec::new(),
                    inflight: Vec::new(),
                    last_pkid: r.get::<i64, _>("last_pkid") as u16,
                    will: None,
                },
            );
        }
        for r in sqlx::query(
            "SELECT client_id, key, filter, share, qos, no_local, retain_as_published, id, granted FROM subscriptions",
        )
        .fetch_all(&mut self.conn)
        .await?
        {
            if let Some(img) = images.get_mut(r.get::<&str, _>("client_id")) {
                img.subscriptions.push((
                    r.get("key"),
                    Subscription {
                        filter: r.get("filter"),
                        share: r.get("share"),
                        qos: r.get::<i64, _>("qos") as u8,
                        no_local: r.get("no_local"),
                        retain_as_published: r.get("retain_as_published"),
                        granted: r.get("granted"),
                        id: r.get::<Option<i64>, _>("id").map(|i| i as usize),
                    },
                ));
            }
        }
        for r in sqlx::query(
            "SELECT client_id, state, pkid, dup, topic, payload, published_qos, qos, retain, properties, subscription_ids, expires_at
             FROM session_messages ORDER BY client_id, seq",
        )
        .fetch_all(&mut self.conn)
        .await?
        {
            let Some(img) = images.get_mut(r.get::<&str, _>("client_id")) else {
                continue;
            };
            let state: i64 = r.get("state");
            let topic: String = r.get("topic");
            let payload = Bytes::from(r.get::<Vec<u8>, _>("payload"));
            let qos = r.get::<i64, _>("qos") as u8;
            let retain: bool = r.get("retain");
            let properties = props_from_json(r.get("properties"));
            if state == 0 {
                let ids: String = r.get("subscription_ids");
                img.queued.push(Outbound {
                    msg: Arc::new(Stored {
                        topic,
                        payload,
                        qos: r.get::<i64, _>("published_qos") as u8,
                        properties,
                        expires_at: r.get::<Option<i64>, _>("expires_at").map(from_unix_ms),
                        from: None,
                    }),
                    qos,
                    retain,
                    subscription_ids: serde_json::from_str(&ids).unwrap_or_default(),
                });
            } else {
                img.inflight.push((
                    Publish {
                        dup: r.get("dup"),
                        qos,
                        retain,
                        topic,
                        pkid: r.get::<i64, _>("pkid") as u16,
                        payload,
                        properties,
                    },
                    state == 2,
                ));
            }
        }
        let next_seq: HashMap<String, i64> = sqlx::query(
            "SELECT client_id, MAX(seq) + 1 AS next FROM session_messages GROUP BY client_id",
        )
        .fetch_all(&mut self.conn)
        .await?
        .iter()
        .map(|r| (r.get("client_id"), r.get("next")))
        .collect();
        for r in sqlx::query(
            "SELECT client_id, topic, payload, qos, retain, properties, delay FROM session_wills",
        )
        .fetch_all(&mut self.conn)
        .await?
        {
            if let Some(img) = images.get_mut(r.get::<&str, _>("client_id")) {
                img.will = Some(Will {
                    topic: r.get("topic"),
                    payload: Bytes::from(r.get::<Vec<u8>, _>("payload")),
                    qos: r.get::<i64, _>("qos") as u8,
                    retain: r.get("retain"),
                    properties: props_from_json(r.get("properties")),
                    delay: r.get::<i64, _>("delay") as u32,
                });
            }
        }
        // Deadlines (expiry, delayed will) count from now: see the module docs.
        let restored_at = tokio::time::Instant::now();
        for (client_id, img) in images {
            let next = next_seq.get(&client_id).copied().unwrap_or(1);
            self.known.insert(client_id.clone(), next);
            router
                .sessions
                .insert(client_id, Box::new(Session::restore(img, restored_at)));
        }
        Ok(router)
    }

    /// Takes what changed since the last call (call under the broker lock; no I/O).
    pub fn take_changes(&mut self, router: &mut Router) -> Changes {
        let all = std::mem::take(&mut self.resync);
        let mut c = Changes {
            all,
            ..Changes::default()
        };
        c.retained = if all {
            router.retained.take_changes();
            router.retained.all()
        } else {
            router.retained.take_changes()
        };
        // `$SYS` figures are made again at start: not kept.
        c.retained
            .retain(|(topic, _)| !crate::broker::sys::is_sys(topic));
        for (id, s) in router.sessions.iter_mut() {
            let dirty = s.take_dirty();
            if s.expiry == 0 {
                continue;
            }
            match (dirty, self.known.get_mut(id)) {
                (Dirty::Clean, _) if !all => {}
                (Dirty::Appended { from }, Some(next)) if !all => {
                    let added = s.queued_from(from);
                    let first = *next;
                    *next += added.len() as i64;
                    c.appended.push((id.clone(), first, added));
                }
                _ => {
                    let img = s.image();
                    let rows = (img.inflight.len() + img.queued.len()) as i64;
                    self.known.insert(id.clone(), rows + 1);
                    c.sessions.push((id.clone(), img));
                }
            }
        }
        let router = &*router;
        self.known.retain(|id, _| {
            let live = router.sessions.get(id).is_some_and(|s| s.expiry > 0);
            if !live {
                c.removed.push(id.clone());
            }
            live
        });
        c
    }

    /// Writes `c` in one transaction; on failure the next flush writes everything.
    pub async fn write(&mut self, c: Changes) {
        if c.is_empty() && !c.all {
            return;
        }
        if let Err(e) = self.try_write(&c).await {
            tracing::error!(path = %self.path.display(), error = %e, "embedded broker: cannot save its state; retrying at the next flush");
            self.resync = true;
        }
    }

    async fn try_write(&mut self, c: &Changes) -> Result<(), sqlx::Error> {
        let mut tx = self.conn.begin().await?;
        if c.all {
            sqlx::raw_sql(
                "DELETE FROM retained; DELETE FROM sessions; DELETE FROM subscriptions; DELETE FROM session_messages; DELETE FROM session_wills;",
            )
            .execute(&mut *tx)
            .await?;
        }
        for (topic, msg) in &c.retained {
            match msg {
                Some(m) => {
                    sqlx::query(
                        "INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at) VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(topic)
                    .bind(m.payload.as_ref())
                    .bind(m.qos as i64)
                    .bind(props_to_json(m.properties.as_ref()))
                    .bind(m.expires_at.map(to_unix_ms))
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM retained WHERE topic = ?")
                        .bind(topic)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        let changed = c.sessions.iter().map(|(id, _)| id);
        for id in c.removed.iter().chain(changed) {
            for table in [
                "sessions",
                "subscriptions",
                "session_messages",
                "session_wills",
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE client_id = ?"
                )))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        for (id, s) in &c.sessions {
            sqlx::query(
                "INSERT INTO sessions (client_id, expiry, username, last_pkid) VALUES (?, ?, ?, ?)",
            )
            .bind(id)
            .bind(s.expiry as i64)
            .bind(&s.username)
            .bind(s.last_pkid as i64)
            .execute(&mut *tx)
            .await?;
            for (key, sub) in &s.subscriptions {
                sqlx::query(
                    "INSERT INTO subscriptions (client_id, key, filter, share, qos, no_local, retain_as_published, id, granted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(id)
                .bind(key)
                .bind(&sub.filter)
                .bind(&sub.share)
                .bind(sub.qos as i64)
                .bind(sub.no_local)
                .bind(sub.retain_as_published)
                .bind(sub.id.map(|i| i as i64))
                .bind(sub.granted)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(w) = &s.will {
                sqlx::query(
                    "INSERT INTO session_wills (client_id, topic, payload, qos, retain, properties, delay) VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(id)
                .bind(&w.topic)
                .bind(w.payload.as_ref())
                .bind(w.qos as i64)
                .bind(w.retain)
                .bind(props_to_json(w.properties.as_ref()))
                .bind(w.delay as i64)
                .execute(&mut *tx)
                .await?;
            }
            let mut seq = 0i64;
            for (p, released) in &s.inflight {
                seq += 1;
                insert_message(
                    &mut tx,
                    id,
                    seq,
                    if *released { 2 } else { 1 },
                    p,
                    p.qos,
                    "[]",
                    None,
                )
                .await?;
            }
            for o in &s.queued {
                seq += 1;
                insert_queued(&mut tx, id, seq, o).await?;
            }
        }
        for (id, first, added) in &c.appended {
            for (i, o) in added.iter().enumerate() {
                insert_queued(&mut tx, id, first + i as i64, o).await?;
            }
        }
        tx.commit().await
    }
}

/// A queued (not yet sent) message's row.
async fn insert_queued(
    conn: &mut SqliteConnection,
    client_id: &str,
    seq: i64,
    o: &Outbound,
) -> Result<(), sqlx::Error> {
    let p = Publish {
        dup: false,
        qos: o.qos,
        retain: o.retain,
        topic: o.msg.topic.clone(),
        pkid: 0,
        payload: o.msg.payload.clone(),
        properties: o.msg.properties.clone(),
    };
    let ids = serde_json::to_string(&o.subscription_ids).unwrap_or_default();
    let expires_at = o.msg.expires_at.map(to_unix_ms);
    insert_message(conn, client_id, seq, 0, &p, o.msg.qos, &ids, expires_at).await
}

#[allow(clippy::too_many_arguments)]
async fn insert_message(
    conn: &mut SqliteConnection,
    client_id: &str,
    seq: i64,
    state: i64,
    p: &Publish,
    published_qos: u8,
    subscription_ids: &str,
    expires_at: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO session_messages (client_id, seq, state, pkid, dup, topic, payload, published_qos, qos, retain, properties, subscription_ids, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(client_id)
    .bind(seq)
    .bind(state)
    .bind(p.pkid as i64)
    .bind(p.dup)
    .bind(&p.topic)
    .bind(p.payload.as_ref())
    .bind(published_qos as i64)
    .bind(p.qos as i64)
    .bind(p.retain)
    .bind(props_to_json(p.properties.as_ref()))
    .bind(subscription_ids)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// The MQTT 5 properties kept with a message (rumqttc's type has no serde).
#[derive(Serialize, Deserialize, Default)]
struct Props {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_format_indicator: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_expiry_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user_properties: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    subscription_identifiers: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
}

fn props_to_json(p: Option<&PublishProperties>) -> Option<String> {
    let p = p?;
    serde_json::to_string(&Props {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: p.subscription_identifiers.clone(),
        content_type: p.content_type.clone(),
    })
    .ok()
}

fn props_from_json(s: Option<String>) -> Option<PublishProperties> {
    let p: Props = serde_json::from_str(&s?).ok()?;
    Some(PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(Bytes::from),
        user_properties: p.user_properties,
        subscription_identifiers: p.subscription_identifiers,
        content_type: p.content_type,
    })
}

/// An `Instant` as Unix milliseconds (for message expiry).
fn to_unix_ms(at: Instant) -> i64 {
    let (now_i, now_s) = (Instant::now(), SystemTime::now());
    let wall = match at.checked_duration_since(now_i) {
        Some(ahead) => now_s + ahead,
        None => now_s - now_i.duration_since(at),
    };
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn from_unix_ms(ms: i64) -> Instant {
    let wall = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    let (now_i, now_s) = (Instant::now(), SystemTime::now());
    match wall.duration_since(now_s) {
        Ok(ahead) => now_i + ahead,
        Err(past) => now_i.checked_sub(past.duration()).unwrap_or(now_i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(topic: &str, payload: &'static str) -> Arc<Stored> {
        Arc::new(Stored {
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: 1,
            properties: Some(PublishProperties {
                user_properties: vec![("k".into(), "v".into())],
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                ..Default::default()
            }),
            expires_at: Some(Instant::now() + Duration::from_secs(3600)),
            from: None,
        })
    }

    #[tokio::test]
    async fn an_unusable_path_is_named_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let path = file.join("state.db");
        let err = Store::open(&path).await.err().expect("fails").to_string();
        let start = format!(
            "embedded broker: cannot open its state file {}: ",
            path.display()
        );
        assert!(err.starts_with(&start) && err.len() > start.len(), "{err}");
    }

    #[tokio::test]
    async fn sessions_and_retained_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/broker.db");
        let (mut store, mut router) = Store::open(&path).await.unwrap();
        router.retained.set(stored("r/1", "one"));
        router.retained.set(stored("r/2", "two"));
        let mut s = Session::new(u32::MAX);
        s.subscriptions.insert(
            "jobs/#".into(),
            Subscription {
                filter: "jobs/#".into(),
                share: None,
                qos: 2,
                no_local: false,
                retain_as_published: true,
                granted: false,
                id: Some(4),
            },
        );
        s.link = Some(super::super::session::Link::for_test(1));
        for t in ["jobs/1", "jobs/2", "jobs/3"] {
            s.enqueue(
                Outbound {
                    msg: stored(t, "x"),
                    qos: 1,
                    retain: false,
                    subscription_ids: vec![4],
                },
                10,
            )
            .unwrap();
        }
        // One in flight, two queued.
        let sent = s.take_sendable(
            1,
            10,
            None,
            super::super::codec::Version::V5,
            &Default::default(),
        );
        assert_eq!(sent.len(), 1);
        router.sessions.insert("keeper".into(), Box::new(s));
        router
            .sessions
            .insert("clean".into(), Box::new(Session::new(0)));
        let c = store.take_changes(&mut router);
        store.write(c).await;
        // A later change: clear one retained topic.
        router.retained.set(Arc::new(Stored {
            topic: "r/2".into(),
            payload: Bytes::new(),
            qos: 0,
            properties: None,
            expires_at: None,
            from: None,
        }));
        let c = store.take_changes(&mut router);
        assert!(c.sessions.is_empty(), "nothing else changed");
        store.write(c).await;
        drop(store);

        let (mut store, mut router) = Store::open(&path).await.unwrap();
        let r = router.retained.matching("#");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].topic, "r/1");
        assert_eq!(
            r[0].properties
                .as_ref()
                .unwrap()
                .correlation_data
                .as_deref(),
            Some(&b"\x00\x01"[..])
        );
        assert!(!router.sessions.contains_key("clean"));
        let s = router.sessions.get_mut("keeper").unwrap();
        assert_eq!(s.subscriptions["jobs/#"].id, Some(4));
        assert_eq!((s.inflight(), s.queued()), (1, 2));
        let resent = s.resend();
        assert!(
            matches!(&resent[..], [super::super::codec::Outgoing::Publish(p)] if p.dup && p.topic == "jobs/1")
        );

        // A removed session leaves the file too.
        router.sessions.remove("keeper");
        let c = store.take_changes(&mut router);
        store.write(c).await;
        drop(store);
        let (_, router) = Store::open(&path).await.unwrap();
        assert!(router.sessions.is_empty());
    }

    #[tokio::test]
    async fn an_offline_queue_grows_by_appending_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let out = |t: &str| Outbound {
            msg: stored(t, "x"),
            qos: 1,
            retain: false,
            subscription_ids: vec![],
        };
        let (mut store, mut router) = Store::open(&path).await.unwrap();
        let mut s = Session::new(3600);
        s.enqueue(out("q/0"), 100).unwrap();
        router.sessions.insert("off".into(), Box::new(s));
        let c = store.take_changes(&mut router);
        assert_eq!((c.sessions.len(), c.appended.len()), (1, 0));
        store.write(c).await;
        for round in 1..=2 {
            router
                .sessions
                .get_mut("off")
                .unwrap()
                .enqueue(out(&format!("q/{round}")), 100)
                .unwrap();
            let c = store.take_changes(&mut router);
            assert_eq!(
                (c.sessions.len(), c.appended.len()),
                (0, 1),
                "appended only"
            );
            store.write(c).await;
            if round == 1 {
                // Reopening in between: appends continue after the rows in the file.
                drop(store);
                (store, router) = Store::open(&path).await.unwrap();
            }
        }
        drop(store);
        let (_, mut router) = Store::open(&path).await.unwrap();
        let s = router.sessions.get_mut("off").unwrap();
        s.link = Some(super::super::session::Link::for_test(1));
        let topics: Vec<String> = s
            .take_sendable(
                10,
                10,
                None,
                super::super::codec::Version::V311,
                &Default::default(),
            )
            .into_iter()
            .map(|p| match p {
                super::super::codec::Outgoing::Publish(p) => p.topic,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(topics, ["q/0", "q/1", "q/2"]);
    }

    /// A will waiting for its delay is part of the session state (MQTT 5 §4.1): saved with
    /// its session, its delay at most the session expiry, both counted from the reopening;
    /// once published, it leaves the file.
    #[tokio::test]
    async fn a_pending_will_is_saved_with_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.db");
        let (mut store, mut router) = Store::open(&path).await.unwrap();
        let mut s = Session::new(20);
        let will = Will {
            topic: "will/c".into(),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: true,
            properties: stored("t", "x").properties.clone(),
            delay: 50,
        };
        let now = tokio::time::Instant::now();
        assert!(s.detach(now, Some(Box::new(will.clone()))).is_none());
        router.sessions.insert("c".into(), Box::new(s));
        let c = store.take_changes(&mut router);
        store.write(c).await;
        drop(store);

        let before = tokio::time::Instant::now();
        let (mut store, mut router) = Store::open(&path).await.unwrap();
        let s = router.sessions.get_mut("c").unwrap();
        let pending = s.will.as_ref().expect("restored");
        assert_eq!(*pending.will, Will { delay: 20, ..will });
        assert!(pending.at >= before + Duration::from_secs(20));
        assert_eq!(
            s.deadline(),
            Some(pending.at),
            "the will, with the session's end"
        );
        assert!(s.take_will(pending.at, false).is_some());
        let c = store.take_changes(&mut router);
        store.write(c).await;
        drop(store);
        let (_, router) = Store::open(&path).await.unwrap();
        assert!(router.sessions["c"].will.is_none());
    }

    #[test]
    fn unix_time_round_trip() {
        let at = Instant::now() + Duration::from_secs(90);
        let back = from_unix_ms(to_unix_ms(at));
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_millis(5), "{diff:?}");
    }
}
