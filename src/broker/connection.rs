//! One task per client connection: the CONNECT handshake, then a loop that reads and
//! handles packets, sends acknowledgements once messages settle, pulls the session's
//! queue into the socket, and enforces the keepalive (1.5 × the negotiated interval).
//!
//! Writes go through a small bounded channel to a writer task, so a client that does not
//! read never blocks this loop's reading; the session queue is pulled only while that
//! channel has room, which is what bounds a slow consumer's memory.
//!
//! Any error (malformed, oversized or unexpected packet, invalid topic) ends this
//! connection only, with a v5 DISCONNECT carrying the reason code where one applies.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::auth::Login;
use super::codec::{
    self, CodecError, ConnAckProperties, Connect, Outgoing, Packet, Publish, SubscribeFilter,
    Version, Will,
};
use super::listener::{Stream, StreamReader, StreamWriter};
use super::session::{Link, Outbound, Qos2, Session, Stored, Subscription};
use crate::delivery::{Ack, AckSequencer, Settled};
use crate::message::{Message, Properties};
use crate::topic::{validate_filter, validate_topic_name};

/// How long a new connection may take to send its CONNECT.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded packets waiting for the writer task.
const WRITE_QUEUE: usize = 64;
/// Topic aliases a v5 client may use towards us.
const TOPIC_ALIAS_MAX: u16 = 64;

/// Why the read loop ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client (reason 0x04 asks for the will anyway).
    Disconnected { send_will: bool },
    /// Socket closed, keepalive expired, protocol error: the will is sent.
    Lost,
    /// Another connection took the session over.
    TakenOver,
    /// mqbridge is shutting down.
    Shutdown,
}

/// An acknowledgement waiting for settlement (and for earlier ones).
struct PendingAck {
    pkid: u16,
    qos: u8,
    reason: u8,
}

struct ReportSettled {
    seq: u64,
    tx: mpsc::UnboundedSender<u64>,
}

impl Settled for ReportSettled {
    fn settled(&self) {
        // A closed channel means the connection is gone: the client resends.
        let _ = self.tx.send(self.seq);
    }
}

/// Entry point of a connection task.
pub(super) async fn serve(
    socket: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    out: mpsc::Sender<Message>,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let count = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
    let result = handle(socket, &shared, count, out, stop, done).await;
    shared.connections.fetch_sub(1, Ordering::AcqRel);
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "embedded broker: connection closed");
    }
}

async fn read_more(rd: &mut StreamReader, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    rd.read_buf(buf).await
}

async fn handle(
    socket: Stream,
    shared: &Arc<Shared>,
    count: usize,
    out: mpsc::Sender<Message>,
    stop: CancellationToken,
    done: CancellationToken,
) -> anyhow::Result<()> {
    let (mut rd, mut wr) = socket.split();
    let max_packet = shared.plan.max_packet_size;
    let mut buf = BytesMut::with_capacity(4096);

    // The CONNECT (a client that never sends one must not hold up a shutdown).
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if buf.first().is_some_and(|&b| b != 0x10) {
                anyhow::bail!("first packet is not CONNECT");
            }
            if let Some(frame) = codec::take_frame(&mut buf, max_packet)? {
                return Ok::<_, anyhow::Error>(frame);
            }
            if read_more(&mut rd, &mut buf).await? == 0 {
                anyhow::bail!("closed before CONNECT");
            }
        }
    });
    let frame = tokio::select! {
        r = connecting => r.map_err(|_| anyhow::anyhow!("no CONNECT within {CONNECT_TIMEOUT:?}"))??,
        _ = stop.cancelled() => anyhow::bail!("shutting down"),
    };
    let version = match codec::detect_version(&frame) {
        Ok(v) => v,
        Err(e @ CodecError::UnsupportedProtocol { .. }) => {
            // 3.1.1's "unacceptable protocol version"; understood by 3.1 clients too.
            let _ = wr.write_all(&[0x20, 2, 0, 1]).await;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let connect = match codec::decode(frame, version) {
        Ok(Packet::Connect(c)) => c,
        Ok(_) => anyhow::bail!("first packet is not CONNECT"),
        Err(e) => {
            if version == Version::V5 {
                let mut b = BytesMut::new();
                refuse(&mut b, version, e.reason_code());
                let _ = wr.write_all(&b).await;
            }
            return Err(e.into());
        }
    };

    let (wtx, wrx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let notify = Arc::new(Notify::new());
    let writer_gone = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        wr,
        wrx,
        Arc::clone(&notify),
        writer_gone.clone(),
    ));

    let mut conn = match Conn::accept(
        shared,
        *connect,
        count,
        wtx.clone(),
        Arc::clone(&notify),
        out,
    )
    .await
    {
        Ok(conn) => conn,
        Err(e) => {
            drop(wtx);
            let _ = writer.await;
            return Err(e);
        }
    };
    let end = conn.run(&mut rd, buf, &stop, &done, &writer_gone).await;
    conn.finish(&end).await;
    drop(conn);
    drop(wtx);
    // Let queued packets (DISCONNECT, last acks) out, briefly; then read until the
    // client closes, so that closing with unread input does not reset the connection
    // and destroy the DISCONNECT before the client reads it.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    if end == End::Lost {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut sink = [0u8; 4096];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
    tracing::debug!(?end, "embedded broker: connection ended");
    Ok(())
}

/// Writes a refusing CONNACK with `code` (v5 reason code; mapped for 3.1.1).
fn refuse(buf: &mut BytesMut, version: Version, code: u8) {
    let code = match version {
        Version::V5 => code,
        Version::V311 => match code {
            0x84 => 0x01,
            0x85 => 0x02,
            0x88 | 0x89 | 0x97 => 0x03,
            0x86 => 0x04,
            _ => 0x05,
        },
    };
    let _ = codec::encode(
        &Outgoing::ConnAck {
            session_present: false,
            code,
            properties: None,
        },
        version,
        buf,
    );
}

async fn write_loop(
    mut wr: StreamWriter,
    mut rx: mpsc::Receiver<Bytes>,
    notify: Arc<Notify>,
    gone: CancellationToken,
) {
    while let Some(bytes) = rx.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
        // Room in the queue again: let the connection pull more messages.
        notify.notify_one();
    }
    let _ = wr.shutdown().await;
    gone.cancel();
}

/// A connected client.
struct Conn {
    shared: Arc<Shared>,
    version: Version,
    client_id: String,
    username: Option<String>,
    conn_id: u64,
    keep_alive: Duration,
    will: Option<Will>,
    /// Outbound window: the client's receive maximum, capped by `max_inflight`.
    window: usize,
    client_max_packet: Option<u32>,
    wtx: mpsc::Sender<Bytes>,
    notify: Arc<Notify>,
    kick: CancellationToken,
    /// The pipeline; dropped on `stop` so that it can drain.
    out: Option<mpsc::Sender<Message>>,
    acks: AckSequencer<PendingAck>,
    settled_tx: mpsc::UnboundedSender<u64>,
    settled_rx: mpsc::UnboundedReceiver<u64>,
    /// QoS 2 packet ids of this connection waiting for settlement.
    qos2_pending_here: HashSet<u16>,
    aliases: HashMap<u16, String>,
    /// Server → client topic aliases (MQTT 5, up to the client's topic alias maximum).
    aliases_out: HashMap<String, u16>,
    client_alias_max: u16,
    source: Arc<str>,
}

impl Conn {
    /// Authenticates, attaches the session (taking it over from another connection) and
    /// answers the CONNACK.
    async fn accept(
        shared: &Arc<Shared>,
        c: Connect,
        count: usize,
        wtx: mpsc::Sender<Bytes>,
        notify: Arc<Notify>,
        out: mpsc::Sender<Message>,
    ) -> anyhow::Result<Conn> {
        let version = c.version;
        let plan = &shared.plan;
        let send_refusal = async |code: u8| {
            let mut b = BytesMut::new();
            refuse(&mut b, version, code);
            let _ = wtx.send(b.freeze()).await;
        };
        if count > plan.max_connections {
            shared
                .counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            send_refusal(0x97).await;
            anyhow::bail!("too many connections");
        }
        if c.auth_method.is_some() {
            send_refusal(0x8C).await;
            anyhow::bail!("enhanced authentication is not supported");
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            if version == Version::V311 && !c.clean_start {
                send_refusal(0x85).await;
                anyhow::bail!("empty client id without clean session");
            }
            let id = format!("mqb-{:016x}", rand::random::<u64>());
            if version == Version::V5 {
                assigned = Some(id.clone());
            }
            id
        } else {
            c.client_id.clone()
        };
        let auth = shared.auth.clone();
        let (user, pass) = (c.username.clone(), c.password.clone());
        let login =
            tokio::task::spawn_blocking(move || auth.login(user.as_deref(), pass.as_deref()))
                .await?;
        match login {
            Login::Ok => {}
            Login::BadCredentials => {
                send_refusal(0x86).await;
                anyhow::bail!("bad username or password");
            }
            Login::NotAuthorized => {
                send_refusal(0x87).await;
                anyhow::bail!("anonymous clients are not allowed");
            }
        }
        if let Some(w) = &c.will
            && let Err(e) = validate_topic_name(&w.topic)
        {
            send_refusal(0x90).await;
            anyhow::bail!("invalid will topic: {e}");
        }

        // Keepalive: MQTT 5 clients are told the server's maximum.
        let mut server_keep_alive = None;
        let mut keep_alive = c.keep_alive;
        if version == Version::V5
            && plan.max_keepalive > 0
            && (keep_alive == 0 || keep_alive > plan.max_keepalive)
        {
            keep_alive = plan.max_keepalive;
            server_keep_alive = Some(keep_alive);
        }

        // Session expiry: 3.1.1 persistent sessions get the configured one; MQTT 5 clients
        // at most that, and are told when they get less than they asked for.
        let (expiry, granted_expiry) = match (version, c.session_expiry) {
            (Version::V311, u32::MAX) => (plan.session_expiry, None),
            (Version::V5, e) if e > plan.session_expiry => {
                (plan.session_expiry, Some(plan.session_expiry))
            }
            (_, e) => (e, None),
        };

        let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        let link = Link {
            conn_id,
            notify: Arc::clone(&notify),
            kick: kick.clone(),
        };
        let (session_present, resend) = {
            let mut state = shared.lock();
            let existing = state.sessions.remove(&client_id);
            if let Some(link) = existing.as_ref().and_then(|s| s.link.as_ref()) {
                link.kick.cancel();
            }
            let (mut session, present) = match existing {
                Some(s) if !c.clean_start => (s, true),
                _ => (Session::new(c.session_expiry), false),
            };
            session.expiry = expiry;
            session.touch();
            // Unique across sessions, so a timer of an earlier session never matches.
            session.generation = conn_id;
            session.link = Some(link);
            session.username = c.username.clone();
            let resend = session.resend();
            state.sessions.insert(client_id.clone(), session);
            (present, resend)
        };

        let properties = (version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: granted_expiry,
            receive_max: Some(plan.max_inflight),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(plan.max_packet_size as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        let conn = Conn {
            shared: Arc::clone(shared),
            version,
            client_id,
            username: c.username,
            conn_id,
            keep_alive: Duration::from_secs(keep_alive as u64) * 3 / 2,
            will: c.will,
            window: (c.receive_maximum as usize).min(plan.max_inflight as usize),
            client_max_packet: c.max_packet_size,
            wtx,
            notify,
            kick,
            out: Some(out),
            acks: AckSequencer::default(),
            settled_tx,
            settled_rx,
            qos2_pending_here: HashSet::new(),
            aliases: HashMap::new(),
            aliases_out: HashMap::new(),
            client_alias_max: c.topic_alias_max,
            source: Arc::from("embedded"),
        };
        conn.send(Outgoing::ConnAck {
            session_present,
            code: 0,
            properties,
        })
        .await?;
        for packet in resend {
            conn.send(packet).await?;
        }
        conn.notify.notify_one();
        tracing::debug!(client_id = %conn.client_id, ?version, session_present, "embedded broker: client connected");
        Ok(conn)
    }

    async fn send(&self, packet: Outgoing) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        codec::encode(&packet, self.version, &mut buf)?;
        if !buf.is_empty() {
            self.wtx
                .send(buf.freeze())
                .await
                .map_err(|_| anyhow::anyhow!("connection closed"))?;
        }
        Ok(())
    }

    /// Ends the connection with a v5 DISCONNECT `reason` (nothing for 3.1.1).
    async fn disconnect(&self, reason: u8) {
        if self.version == Version::V5 {
            let _ = self.send(Outgoing::Disconnect { reason }).await;
        }
    }

    /// QoS 1/2 messages from the client not yet completed: waiting for settlement, or
    /// (QoS 2) for the PUBREL.
    fn inbound_inflight(&self) -> usize {
        let recorded = self
            .shared
            .lock()
            .sessions
            .get(&self.client_id)
            .map_or(0, |s| {
                s.incoming_qos2
                    .values()
                    .filter(|q| **q == Qos2::Recorded)
                    .count()
            });
        self.acks.pending() + recorded
    }

    async fn run(
        &mut self,
        rd: &mut StreamReader,
        mut buf: BytesMut,
        stop: &CancellationToken,
        done: &CancellationToken,
        writer_gone: &CancellationToken,
    ) -> End {
        let mut deadline = Instant::now() + self.keep_alive;
        let max_packet = self.shared.plan.max_packet_size;
        let max_inflight = self.shared.plan.max_inflight as usize;
        loop {
            // 3.1.1 clients have no receive maximum: stop reading while too many of their
            // messages wait for settlement (TCP pushes back on them).
            let paused = self.version == Version::V311 && self.acks.pending() >= max_inflight;
            if paused {
                deadline = Instant::now() + self.keep_alive;
            }
            tokio::select! {
                biased;
                _ = done.cancelled() => {
                    self.disconnect(0x8B).await;
                    return End::Shutdown;
                }
                _ = self.kick.cancelled() => {
                    self.disconnect(0x8E).await;
                    return End::TakenOver;
                }
                _ = writer_gone.cancelled() => return End::Lost,
                _ = stop.cancelled(), if self.out.is_some() => {
                    self.out = None;
                }
                Some(seq) = self.settled_rx.recv() => {
                    if self.release_acks(seq).await.is_err() {
                        return End::Lost;
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !self.keep_alive.is_zero() => {
                    tracing::debug!(client_id = %self.client_id, "embedded broker: keepalive expired");
                    self.disconnect(0x8D).await;
                    return End::Lost;
                }
                r = read_more(rd, &mut buf), if !paused => {
                    match r {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(_) => {}
                    }
                    loop {
                        let frame = match codec::take_frame(&mut buf, max_packet) {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(client_id = %self.client_id, error = %e, "embedded broker: bad input");
                                self.disconnect(e.reason_code()).await;
                                return End::Lost;
                            }
                        };
                        deadline = Instant::now() + self.keep_alive;
                        let packet = match codec::decode(frame, self.version) {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::debug!(client_id = %self.client_id, error = %e, "embedded broker: bad packet");
                                self.disconnect(e.reason_code()).await;
                                return End::Lost;
                            }
                        };
                        match self.handle(packet, done).await {
                            Ok(None) => {}
                            Ok(Some(end)) => return end,
                            Err(reason) => {
                                self.disconnect(reason).await;
                                return End::Lost;
                            }
                        }
                    }
                }
                // After reading: a subscriber with a full queue must not starve its input.
                _ = self.notify.notified() => self.pump(),
            }
        }
    }

    /// Sends the acknowledgements `seq` released.
    async fn release_acks(&mut self, seq: u64) -> anyhow::Result<()> {
        for a in self.acks.settle(seq) {
            if a.qos == 1 {
                self.send(Outgoing::PubAck {
                    pkid: a.pkid,
                    reason: a.reason,
                })
                .await?;
            } else {
                self.qos2_pending_here.remove(&a.pkid);
                if a.reason < 0x80
                    && let Some(s) = self.shared.lock().sessions.get_mut(&self.client_id)
                {
                    s.incoming_qos2.insert(a.pkid, Qos2::Recorded);
                }
                self.send(Outgoing::PubRec {
                    pkid: a.pkid,
                    reason: a.reason,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Moves queued messages to the writer while it has room.
    fn pump(&mut self) {
        let room = self.wtx.capacity();
        if room == 0 {
            return;
        }
        let packets = {
            let mut state = self.shared.lock();
            match state.sessions.get_mut(&self.client_id) {
                Some(s) if s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id) => {
                    s.take_sendable(room, self.window, self.client_max_packet, self.version)
                }
                _ => Vec::new(),
            }
        };
        for mut p in packets {
            if let Outgoing::Publish(publish) = &mut p {
                self.alias_topic(publish);
            }
            let mut buf = BytesMut::new();
            if codec::encode(&p, self.version, &mut buf).is_ok() {
                // Room was reserved above; a full queue here would mean a bug, and the
                // message stays in flight to be resent after a reconnect.
                let _ = self.wtx.try_send(buf.freeze());
            }
        }
    }

    /// Replaces a repeated topic by its alias when the client accepts aliases: the first
    /// PUBLISH on a topic carries topic and alias, later ones the alias only.
    fn alias_topic(&mut self, p: &mut Publish) {
        if self.client_alias_max == 0 {
            return;
        }
        let known = self.aliases_out.get(&p.topic).copied();
        let alias = match known {
            Some(a) => a,
            None if self.aliases_out.len() < self.client_alias_max as usize => {
                let a = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(p.topic.clone(), a);
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

    /// Handles one packet; Ok(Some) ends the connection normally, Err(reason) with a
    /// protocol error.
    async fn handle(
        &mut self,
        packet: Packet,
        done: &CancellationToken,
    ) -> Result<Option<End>, u8> {
        match packet {
            Packet::Connect(_) => return Err(0x82),
            Packet::ServerOnly(what) => {
                tracing::debug!(client_id = %self.client_id, what, "embedded broker: client sent a server packet");
                return Err(0x82);
            }
            Packet::Auth => return Err(0x8C),
            Packet::PingReq => self.send(Outgoing::PingResp).await.map_err(|_| 0x80)?,
            Packet::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(expiry) = session_expiry {
                    let mut state = self.shared.lock();
                    if let Some(s) = state.sessions.get_mut(&self.client_id) {
                        if s.expiry == 0 && expiry != 0 {
                            drop(state);
                            return Err(0x82);
                        }
                        s.expiry = expiry.min(self.shared.plan.session_expiry);
                        s.touch();
                    }
                }
                return Ok(Some(End::Disconnected {
                    send_will: reason == 0x04,
                }));
            }
            Packet::PubAck(pkid) => {
                self.with_session(|s| s.acked(pkid));
                self.pump();
            }
            Packet::PubRec(pkid, reason) => {
                let release = self.with_session(|s| s.received(pkid, reason >= 0x80));
                if release == Some(true) {
                    self.send(Outgoing::PubRel { pkid })
                        .await
                        .map_err(|_| 0x80)?;
                }
                self.pump();
            }
            Packet::PubComp(pkid) => {
                self.with_session(|s| s.completed(pkid));
                self.pump();
            }
            Packet::PubRel(pkid) => {
                self.with_session(|s| s.incoming_qos2.remove(&pkid));
                self.send(Outgoing::PubComp { pkid })
                    .await
                    .map_err(|_| 0x80)?;
            }
            Packet::Subscribe { pkid, filters, id } => self.subscribe(pkid, filters, id).await?,
            Packet::Unsubscribe { pkid, filters } => {
                let codes = self
                    .with_session(|s| {
                        s.touch();
                        filters
                            .iter()
                            .map(|f| {
                                if s.subscriptions.remove(f).is_some() {
                                    0x00
                                } else {
                                    0x11
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.send(Outgoing::UnsubAck { pkid, codes })
                    .await
                    .map_err(|_| 0x80)?;
            }
            Packet::Publish(p) => self.publish(p, done).await?,
        }
        Ok(None)
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> Option<T> {
        let mut state = self.shared.lock();
        state.sessions.get_mut(&self.client_id).map(f)
    }

    async fn subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<SubscribeFilter>,
        id: Option<usize>,
    ) -> Result<(), u8> {
        let v5 = self.version == Version::V5;
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for f in filters {
            let (share, filter) = match f.filter.strip_prefix("$share/") {
                Some(rest) => match rest.split_once('/') {
                    Some((group, filter)) if !group.is_empty() && !group.contains(['+', '#']) => {
                        (Some(group.to_string()), filter.to_string())
                    }
                    _ => {
                        codes.push(if v5 { 0x8F } else { 0x80 });
                        continue;
                    }
                },
                None => (None, f.filter.clone()),
            };
            if share.is_some() && f.no_local {
                return Err(0x82);
            }
            if validate_filter(&filter).is_err() {
                codes.push(if v5 { 0x8F } else { 0x80 });
                continue;
            }
            if !self
                .shared
                .auth
                .can_subscribe(self.username.as_deref(), &filter)
            {
                tracing::info!(client_id = %self.client_id, %filter, "embedded broker: subscription refused by the ACL");
                codes.push(if v5 { 0x87 } else { 0x80 });
                continue;
            }
            let sub = Subscription {
                filter: filter.clone(),
                share: share.clone(),
                qos: f.qos,
                no_local: f.no_local,
                retain_as_published: f.retain_as_published,
                id,
            };
            let mut state = self.shared.lock();
            let router = &mut *state;
            let Some(session) = router.sessions.get_mut(&self.client_id) else {
                return Err(0x80);
            };
            let existed = session
                .subscriptions
                .insert(f.filter.clone(), sub)
                .is_some();
            session.touch();
            let send_retained =
                share.is_none() && (f.retain_handling == 0 || (f.retain_handling == 1 && !existed));
            if send_retained {
                let user = self.username.as_deref();
                for m in router.retained.matching(&filter) {
                    if !self.shared.auth.can_receive(user, &m.topic) {
                        continue;
                    }
                    retained.push(Outbound {
                        qos: m.qos.min(f.qos),
                        msg: m,
                        retain: true,
                        subscription_ids: id.into_iter().collect(),
                    });
                }
            }
            codes.push(f.qos);
        }
        self.send(Outgoing::SubAck { pkid, codes })
            .await
            .map_err(|_| 0x80)?;
        if !retained.is_empty() {
            let max = self.shared.plan.max_queued_messages;
            self.with_session(|s| {
                for r in retained {
                    s.enqueue(r, max);
                }
            });
            self.pump();
        }
        Ok(())
    }

    async fn publish(&mut self, mut p: Publish, done: &CancellationToken) -> Result<(), u8> {
        let v5 = self.version == Version::V5;
        // Topic alias (client → server).
        if let Some(props) = p.properties.as_mut()
            && let Some(alias) = props.topic_alias.take()
        {
            if alias == 0 || alias > TOPIC_ALIAS_MAX {
                return Err(0x94);
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(0x82),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        if validate_topic_name(&p.topic).is_err() {
            return Err(if v5 { 0x90 } else { 0x82 });
        }
        if p.qos > 0 && v5 && self.inbound_inflight() >= self.shared.plan.max_inflight as usize {
            return Err(0x93);
        }
        let Some(out) = self.out.clone() else {
            // Shutting down: not acknowledged, so the client sends it again later.
            return Ok(());
        };

        // QoS 2 duplicates: acknowledge again, never route twice.
        let mut route = true;
        if p.qos == 2 {
            let state = self.with_session(|s| s.incoming_qos2.get(&p.pkid).copied());
            match state.flatten() {
                Some(Qos2::Recorded) => {
                    return self
                        .send(Outgoing::PubRec {
                            pkid: p.pkid,
                            reason: 0,
                        })
                        .await
                        .map_err(|_| 0x80);
                }
                Some(Qos2::Received) if self.qos2_pending_here.contains(&p.pkid) => return Ok(()),
                // Received on an earlier connection that ended before settlement: the
                // subscribers have it; hand it to the rules again (at least once).
                Some(Qos2::Received) => route = false,
                None => {
                    self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Received));
                }
            }
            self.qos2_pending_here.insert(p.pkid);
        }

        if !self
            .shared
            .auth
            .can_publish(self.username.as_deref(), &p.topic)
        {
            let n = self
                .shared
                .counters
                .publish_denied
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            tracing::info!(client_id = %self.client_id, topic = %p.topic, refused_total = n, "embedded broker: publish refused by the ACL");
            if p.qos > 0 {
                let reason = if v5 { 0x87 } else { 0 };
                if p.qos == 2 && !v5 {
                    // 3.1.1 cannot refuse: complete the exchange without the message.
                    self.with_session(|s| s.incoming_qos2.insert(p.pkid, Qos2::Recorded));
                } else if p.qos == 2 {
                    self.with_session(|s| s.incoming_qos2.remove(&p.pkid));
                }
                let seq = self.acks.arrive(PendingAck {
                    pkid: p.pkid,
                    qos: p.qos,
                    reason,
                });
                let _ = self.settled_tx.send(seq);
            }
            return Ok(());
        }

        let props = p.properties.clone().unwrap_or_default();
        let stored = Arc::new(Stored {
            topic: p.topic.clone(),
            payload: p.payload.clone(),
            qos: p.qos,
            expires_at: props
                .message_expiry_interval
                .map(|s| std::time::Instant::now() + Duration::from_secs(s as u64)),
            properties: p.properties.clone().map(|mut pp| {
                pp.subscription_identifiers.clear();
                pp.topic_alias = None;
                pp.message_expiry_interval = None;
                pp
            }),
            from: Some(self.client_id.clone()),
        });
        if route {
            let max = self.shared.plan.max_queued_messages;
            let mut state = self.shared.lock();
            if p.retain {
                state.retained.set(Arc::clone(&stored));
            }
            state.route(&stored, p.retain, max, &self.shared.auth);
        }

        let ack = if p.qos == 0 {
            Ack::detached()
        } else {
            let seq = self.acks.arrive(PendingAck {
                pkid: p.pkid,
                qos: p.qos,
                reason: 0,
            });
            Ack::new(ReportSettled {
                seq,
                tx: self.settled_tx.clone(),
            })
        };
        let msg = Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: Properties {
                user_properties: props.user_properties,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
            },
            client_id: Some(self.client_id.clone()),
            received_at: jiff::Timestamp::now(),
            source: Arc::clone(&self.source),
            ack,
        };
        match out.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) if msg.qos == 0 => {
                let n = self
                    .shared
                    .counters
                    .pipeline_dropped_qos0
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "embedded broker: pipeline full, QoS 0 messages not handed to the rules"
                    );
                }
                msg.ack.settle();
            }
            Err(mpsc::error::TrySendError::Full(msg)) => {
                // Backpressure: this client waits (its socket is not read meanwhile).
                tokio::select! {
                    r = out.send(msg) => if r.is_err() { return Err(0x8B) },
                    _ = done.cancelled() => return Err(0x8B),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(0x8B),
        }
        Ok(())
    }

    /// After the loop: the will, and detaching (or dropping) the session.
    async fn finish(&mut self, end: &End) {
        let send_will = match end {
            End::Disconnected { send_will } => *send_will,
            End::Lost => true,
            End::TakenOver => true,
            End::Shutdown => false,
        };
        let will = self.will.take().filter(|w| {
            send_will
                && self
                    .shared
                    .auth
                    .can_publish(self.username.as_deref(), &w.topic)
        });
        let mut delayed = None;
        {
            let mut state = self.shared.lock();
            let mine = state
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id));
            if mine {
                let s = state.sessions.get_mut(&self.client_id).expect("checked");
                s.link = None;
                let (expiry, generation) = (s.expiry, s.generation);
                if expiry == 0 {
                    state.sessions.remove(&self.client_id);
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
                    let out = self.out.as_ref().map(|o| o.downgrade());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(secs as u64)).await;
                        let reconnected = shared
                            .lock()
                            .sessions
                            .get(&client_id)
                            .is_some_and(|s| s.generation != generation);
                        if !reconnected {
                            let out = out.and_then(|o| o.upgrade());
                            publish_will(&shared, &client_id, w, out.as_ref());
                        }
                    });
                }
                None => publish_will(&self.shared, &self.client_id, w, self.out.as_ref()),
            }
        }
    }
}

/// Removes a session still offline after `expiry` seconds.
pub(super) fn schedule_expiry(shared: &Arc<Shared>, client_id: &str, generation: u64, expiry: u32) {
    let shared = Arc::clone(shared);
    let client_id = client_id.to_string();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(expiry as u64)).await;
        let mut state = shared.lock();
        if state
            .sessions
            .get(&client_id)
            .is_some_and(|s| s.generation == generation && s.link.is_none())
        {
            state.sessions.remove(&client_id);
        }
    });
}

/// Publishes a will message to subscribers and the rules (no one to acknowledge).
fn publish_will(
    shared: &Arc<Shared>,
    client_id: &str,
    w: Will,
    out: Option<&mpsc::Sender<Message>>,
) {
    let props = w.properties.clone().unwrap_or_default();
    let stored = Arc::new(Stored {
        topic: w.topic.clone(),
        payload: w.payload.clone(),
        qos: w.qos,
        expires_at: props
            .message_expiry_interval
            .map(|s| std::time::Instant::now() + Duration::from_secs(s as u64)),
        properties: w.properties.clone().map(|mut p| {
            p.message_expiry_interval = None;
            p
        }),
        from: Some(client_id.to_string()),
    });
    {
        let max = shared.plan.max_queued_messages;
        let mut state = shared.lock();
        if w.retain {
            state.retained.set(Arc::clone(&stored));
        }
        state.route(&stored, w.retain, max, &shared.auth);
    }
    if let Some(out) = out {
        let msg = Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: Properties {
                user_properties: props.user_properties,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
            },
            client_id: Some(client_id.to_string()),
            received_at: jiff::Timestamp::now(),
            source: Arc::from("embedded"),
            ack: Ack::detached(),
        };
        if let Err(e) = out.try_send(msg) {
            tracing::warn!("embedded broker: will message not handed to the rules: pipeline full");
            match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => {
                    m.ack.settle()
                }
            }
        }
    }
}
