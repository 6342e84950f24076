//! The embedded MQTT broker: devices connect to mqbridge itself (MQTT 3.1.1 and 5.0 on
//! the same listener), and every message they publish goes to the rules in-process.
//!
//! ```text
//!  client ──TCP──▶ connection (one task per client: read ▶ decode ▶ handle; keepalive)
//!                     │ PUBLISH ──▶ router ──▶ each matching session's bounded queue ──▶ its connection ──▶ subscriber
//!                     │         └─▶ retained (retain flag)
//!                     │         └─▶ pipeline as a Message (the same channel source::mqtt feeds)
//!                     └◀── PUBACK / PUBREC once the Message's Ack fired, in arrival order (AckSequencer)
//! ```
//!
//! Modules, in the order a packet meets them:
//! - [`codec`]: framing, version detection on the CONNECT, decode/encode through
//!   rumqttc's packet codecs into one normalized packet enum.
//! - [`auth`]: users (argon2 hashes, or a Mosquitto password file's) and the ACL (ordered
//!   rules, or a Mosquitto ACL file); before them, with `embedded.auth`, JSON Web Tokens
//!   and an HTTP service (EMQX's shape), composed as [`auth::chain`] says.
//! - [`listener`]: TCP, TLS and WebSocket listeners, each giving a byte stream;
//!   [`client_cert`]: mutual TLS, and the username a client certificate gives.
//! - `connection`: the per-client task.
//! - [`session`]: subscriptions, queue, in-flight windows, persistent sessions.
//! - [`router`]: sessions by client id, fan-out to subscriptions (incl. shared ones),
//!   and the locks of the broker's state.
//! - [`index`]: the subscriptions in a topic trie, with their ACL decisions.
//! - [`retained`]: retained messages.
//! - [`timers`]: session expiry and delayed wills of offline sessions, one ordered map
//!   and one task for all of them.
//! - [`store`]: optional persistence of sessions and retained messages (SQLite).
//! - [`stats`]: the counters (Prometheus, through `metrics`), and the snapshots the
//!   admin server reads: [`Broker::stats`], [`Broker::clients`].
//!
//! Guarantees: a publisher's QoS 1/2 message is acknowledged only after every rule
//! record made from it settled (written or dead-lettered); subscribers receive it at
//! once, like from any broker. Sessions and retained messages live in memory; with
//! `persistence` they are also saved to a SQLite file every `flush_interval` and restored
//! at start (acknowledged messages are stored by the sinks either way).
//!
//! Shutdown: `stop` closes the listeners and makes connections ignore new PUBLISHes (they
//! are not acknowledged, so clients resend them after reconnecting) while the
//! acknowledgements of settling messages still go out, and ends the [`timers`] task
//! (without persistence, the wills still waiting for their delay are published then);
//! `done` sends a DISCONNECT (v5: 0x8B server shutting down, no will) and closes every
//! connection. The timers task is tracked with the accept loops and the connections; a
//! deadline is an entry in its map, never a task of its own.

pub mod auth;
pub mod client_cert;
pub mod codec;
mod connection;
pub mod index;
pub mod listener;
pub mod retained;
pub mod router;
pub mod session;
pub mod stats;
pub mod store;
pub mod sys;
pub mod timers;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::auth::AuthPlan;
use crate::config::{Acl, Credential, EmbeddedPlan};
use crate::source::Source;
use crate::source::intake::Handoff;
use auth::Auth;
use router::{Change, Router, State};
use stats::Counters;
pub use stats::{Client, Connection, Dropped, Stats};

/// What every connection shares.
pub(crate) struct Shared {
    plan: EmbeddedPlan,
    /// Sessions, subscriptions, retained messages, users and ACL.
    state: State,
    /// Live connections (bounded by `max_connections`).
    connections: AtomicUsize,
    /// Permits for connections not yet past their CONNECT (`max_connecting`).
    connecting: Arc<Semaphore>,
    /// New connections per source address (`connection_rate_per_ip`); None: no limit.
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    next_conn_id: AtomicU64,
    counters: Counters,
    /// The state file, taken by the flusher when serving starts.
    store: Mutex<Option<store::Store>>,
    /// Deadlines of offline sessions (expiry, delayed will), fired by [`timers::run`].
    timers: timers::Timers,
}

impl Shared {
    /// The users and ACL in force now.
    fn auth(&self) -> Arc<Auth> {
        self.state.auth()
    }

    /// Sessions and retained messages (see [`State::lock`]).
    fn lock(&self) -> std::sync::MutexGuard<'_, Router> {
        self.state.lock()
    }

    /// To change subscriptions, or add and remove sessions (see [`State::change`]).
    fn change(&self) -> Change<'_> {
        self.state.change()
    }

    /// Delivers a message on `topic` to every matching subscription, and keeps it as the
    /// topic's retained message when `retain` is set. `stored` makes the message as
    /// subscribers get it, only when one does or it is retained: a device publishing to
    /// the rules alone costs no copy of it.
    fn route(&self, topic: &str, retain: bool, stored: impl FnOnce() -> Arc<session::Stored>) {
        let max = self.plan.max_queued_messages;
        self.state.route(topic, retain, stored, max, &self.counters);
    }
}

/// A broker ready to serve; cheap to clone. Created before the sinks so that a
/// `republish` sink can publish into it in-process.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    /// A broker for `plan`; with `persistence`, opens its state file and restores the
    /// retained messages and sessions it holds.
    pub async fn open(plan: EmbeddedPlan) -> Result<Broker, store::OpenError> {
        let (store, router) = match &plan.persistence {
            Some(p) => {
                let (store, router) = store::Store::open(&p.path).await?;
                (Some(store), router)
            }
            None => (None, Router::default()),
        };
        let auth =
            Auth::new(plan.users.clone(), plan.allow_anonymous, plan.acl.clone()).with(&plan.auth);
        let (max_connecting, connection_rate) = (plan.max_connecting, plan.connection_rate_per_ip);
        let broker = Broker {
            shared: Arc::new(Shared {
                plan,
                state: State::new(router, auth),
                connections: AtomicUsize::new(0),
                connecting: Arc::new(Semaphore::new(max_connecting)),
                per_ip: per_ip_limiter(connection_rate),
                next_conn_id: AtomicU64::new(1),
                counters: Counters::default(),
                store: Mutex::new(store),
                timers: timers::Timers::default(),
            }),
        };
        // Restored sessions are offline, their deadlines counted from the restore.
        let shared = &broker.shared;
        for (id, s) in shared.lock().sessions.iter_mut() {
            shared.timers.arm(id, s);
        }
        Ok(broker)
    }

    /// Replaces the users, `allow_anonymous` and the ACL (a config reload). They apply
    /// to logins, publishes and subscriptions from now on; connected clients stay
    /// connected, and subscriptions made before keep what the old ACL allowed them to
    /// subscribe to (the ACL's `can_subscribe` applies when a subscription is made),
    /// though what each carries from now on follows the new ACL's `can_receive`
    /// (decided again here for every subscription), queued messages excepted. The same
    /// goes for `embedded.auth` (`external`): its endpoints and keys apply from now on
    /// (connections drop the HTTP answers they cached from the old ones), and what it
    /// granted before stays granted while it is configured.
    pub fn set_auth(
        &self,
        users: Vec<(String, Credential)>,
        allow_anonymous: bool,
        acl: Acl,
        external: &AuthPlan,
    ) {
        let auth = Auth::new(users, allow_anonymous, acl).with(external);
        self.shared.state.set_auth(auth);
    }

    /// The current gauges and counters (one pass over the sessions, under the lock).
    pub fn stats(&self) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let connections = self.shared.connections.load(Relaxed);
        Stats::read(connections, &self.shared.counters, &self.shared.lock())
    }

    /// Every session, connected or offline, by client id.
    pub fn clients(&self) -> Vec<Client> {
        let state = self.shared.lock();
        let mut clients: Vec<Client> = state
            .sessions
            .iter()
            .map(|(id, s)| Client::of(id, s))
            .collect();
        drop(state);
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        clients
    }

    /// Binds the plan's listeners: then the broker is a [`Source`] to run.
    pub async fn listen(self) -> Result<Listening, listener::ListenError> {
        let listeners = listener::bind_all(&self.shared.plan).await?;
        Ok(Listening {
            broker: self,
            listeners,
        })
    }

    /// Serves MQTT on `listeners` until `done`; see the module docs for `stop` and
    /// `done`. Returns after every connection has ended.
    async fn serve(
        self,
        listeners: Vec<listener::Listener>,
        handoff: Handoff,
        stop: CancellationToken,
        done: CancellationToken,
    ) {
        let tasks = TaskTracker::new();
        for listener in listeners {
            let transport = listener.transport.name();
            match listener.tcp.local_addr() {
                Ok(addr) => tracing::info!(%addr, transport, "embedded broker listening"),
                Err(_) => tracing::info!(transport, "embedded broker listening"),
            }
            tasks.spawn(accept_loop(
                listener,
                Arc::clone(&self.shared),
                handoff.clone(),
                stop.clone(),
                done.clone(),
                tasks.clone(),
            ));
        }
        tasks.spawn(timers::run(Arc::clone(&self.shared), handoff, stop.clone()));
        if let Some(every) = self.shared.plan.sys_interval {
            tasks.spawn(sys::run(Arc::clone(&self.shared), every, stop.clone()));
        }
        tasks.close();
        let store = self
            .shared
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let flusher = store
            .map(|store| tokio::spawn(flush_loop(Arc::clone(&self.shared), store, done.clone())));
        done.cancelled().await;
        tasks.wait().await;
        // Every connection has ended (sessions detached): the last flush.
        if let Some(flusher) = flusher
            && let Ok(mut store) = flusher.await
        {
            let changes = store.take_changes(&mut self.shared.lock());
            store.write(changes).await;
        }
    }

    /// Publishes a message from inside mqbridge (the `republish` sink) to the broker's
    /// subscribers and retained store. It does not go through the rules again (a sink
    /// waiting on the rules that feed it could deadlock).
    pub fn publish(&self, topic: &str, payload: bytes::Bytes, qos: u8, retain: bool) {
        let stored = || {
            Arc::new(session::Stored {
                topic: topic.to_string(),
                payload,
                qos,
                properties: None,
                expires_at: None,
                from: None,
            })
        };
        self.shared.route(topic, retain, stored);
    }
}

/// The broker with its listeners bound, ready to serve.
pub struct Listening {
    broker: Broker,
    listeners: Vec<listener::Listener>,
}

impl Source for Listening {
    type Error = std::convert::Infallible;

    async fn run(
        self,
        handoff: Handoff,
        stop: CancellationToken,
        done: CancellationToken,
    ) -> Result<(), Self::Error> {
        self.broker.serve(self.listeners, handoff, stop, done).await;
        Ok(())
    }
}

/// Writes the broker's changes every `flush_interval` until `done`; returns the store for
/// the last flush.
async fn flush_loop(
    shared: Arc<Shared>,
    mut store: store::Store,
    done: CancellationToken,
) -> store::Store {
    let every = shared
        .plan
        .persistence
        .as_ref()
        .map_or(std::time::Duration::from_millis(100), |p| p.flush_interval);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = done.cancelled() => return store,
            _ = tick.tick() => {}
        }
        let changes = store.take_changes(&mut shared.lock());
        store.write(changes).await;
    }
}

/// The limiter of `connection_rate_per_ip` connections per second per address (None:
/// no limit), with bursts of one second's worth, at least one.
fn per_ip_limiter(rate: f64) -> Option<DefaultKeyedRateLimiter<IpAddr>> {
    if rate <= 0.0 {
        return None;
    }
    let burst = NonZeroU32::new(rate.ceil().clamp(1.0, u32::MAX as f64) as u32)?;
    let quota =
        Quota::with_period(std::time::Duration::from_secs_f64(1.0 / rate))?.allow_burst(burst);
    Some(RateLimiter::keyed(quota))
}

/// Accepted connections between two prunings of the per-address limiter's map (which
/// forgets addresses whose bucket is full again).
const PRUNE_EVERY: u32 = 1024;

async fn accept_loop(
    listener: listener::Listener,
    shared: Arc<Shared>,
    handoff: Handoff,
    stop: CancellationToken,
    done: CancellationToken,
    tasks: TaskTracker,
) {
    let mut accepted_since_prune = 0u32;
    loop {
        // A permit first: beyond `max_connecting` handshakes in progress, new
        // connections wait in the backlog and cost nothing here.
        let connecting = Arc::clone(&shared.connecting);
        let (permit, accepted) = tokio::select! {
            _ = stop.cancelled() => return,
            r = async {
                let permit = connecting.acquire_owned().await.expect("never closed");
                (permit, listener.tcp.accept().await)
            } => r,
        };
        match accepted {
            Ok((socket, peer)) => {
                if let Some(limiter) = &shared.per_ip {
                    accepted_since_prune += 1;
                    if accepted_since_prune >= PRUNE_EVERY {
                        limiter.retain_recent();
                        accepted_since_prune = 0;
                    }
                    if limiter.check_key(&peer.ip()).is_err() {
                        // Closed (with its permit) before a byte is read.
                        shared.counters.rate_limited();
                        tracing::debug!(%peer, "embedded broker: connection_rate_per_ip exceeded, closed");
                        continue;
                    }
                }
                let _ = socket.set_nodelay(true);
                let transport = listener.transport.clone();
                let incoming = connection::Incoming::Socket(socket, transport, permit);
                tasks.spawn(connection::serve(
                    incoming,
                    peer,
                    Arc::clone(&shared),
                    handoff.clone(),
                    stop.clone(),
                    done.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "embedded broker: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
