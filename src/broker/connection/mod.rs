//! One task per client connection: the CONNECT handshake, then a loop that reads and
//! handles packets, sends acknowledgements once messages settle, pulls the session's
//! queue into the socket, and enforces the keepalive (1.5 × the negotiated interval).
//!
//! The same task writes: packets are encoded into the connection's [`outbox`], written
//! in one go when the socket takes them, while the loop goes on reading, so a client that
//! does not read never blocks this loop's reading; the session queue is pulled only while
//! the outbox has room, which is what bounds a slow consumer's memory.
//!
//! An idle connection costs little memory: its read buffer and its outbox hold
//! memory only while bytes pass, and what a connection needs once (the CONNECT, the
//! login) is not kept in its task.
//!
//! Any error (malformed, oversized or unexpected packet, invalid topic) ends this
//! connection only, with a v5 DISCONNECT carrying the reason code where one applies.
//!
//! Here the task's life from socket to close, and the connection state ([`Conn`]) the
//! phases share. The phases, in the order a connection meets them:
//! - `connect`: reading the CONNECT, authentication, attaching the session, the CONNACK.
//! - `read_loop`: the loop, and the dispatch of each packet to the phase it belongs to.
//! - `inbound`: PUBLISH from the client, QoS 2 state, and the hand-off to the pipeline
//!   through the connection's [`Intake`](crate::source::intake::Intake), shared with the
//!   external-broker source: acknowledgements released in arrival order once messages
//!   settle, QoS 1/2 messages held (not the loop) while the pipeline is full.
//! - `subscribe`: SUBSCRIBE (retained messages included) and UNSUBSCRIBE.
//! - `outbound`: the session's queue into the outbox, server → client topic aliases.
//! - `end`: the will, detaching the session, and its expiry.
//! - `outbox`: the packets waiting for the socket, and writing them.
//! - `error`: [`ProtocolError`], why a connection is refused or closed, with the reason
//!   code that tells the client.
//!
//! The unit tests (`tests`) serve connections over in-memory pipes, so that every state
//! above can be driven packet by packet without a socket.

mod connect;
mod end;
mod error;
mod inbound;
mod outbound;
mod outbox;
mod read_loop;
mod subscribe;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::auth::chain::{Grants, Subscribed};
use super::auth::{Auth, Identity};
use super::codec::{Outgoing, Version, Will};
use super::listener::{StreamReader, Transport};
use super::session::Session;
use super::stats::TimedOut;
use crate::source::intake::Handoff;
pub(super) use end::publish_will;
use error::ProtocolError;
use inbound::FromClient;
use outbound::ToClient;
use outbox::Outbox;

/// Why the read loop ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client (any reason but 0x00 asks for the will anyway).
    Disconnected { send_will: bool },
    /// Socket closed, keepalive expired, protocol error: the will is sent.
    Lost,
    /// Another connection took the session over.
    TakenOver,
    /// mqbridge is shutting down.
    Shutdown,
}

/// A connection as it arrives.
pub(super) enum Incoming {
    /// An accepted socket, the transport (TLS, WebSocket) whose handshakes open it, and
    /// its `max_connecting` permit, held until the CONNACK.
    Socket(TcpStream, Transport, OwnedSemaphorePermit),
    /// A stream MQTT flows in already (the unit tests' in-memory pipes), and who a client
    /// certificate would say the client is.
    #[cfg(test)]
    Ready(super::listener::Stream, super::client_cert::CertUser),
}

/// Entry point of a connection task.
pub(super) async fn serve(
    incoming: Incoming,
    peer: SocketAddr,
    shared: Arc<Shared>,
    handoff: Handoff,
    stop: CancellationToken,
    done: CancellationToken,
) {
    let counted = Counted::new(&shared);
    // The handshake on the heap, freed once done: its state (the CONNECT, the login)
    // would otherwise be part of the task, and of its memory, for the connection's life.
    // (Nothing here is held by value across the loop but `live`: every byte this
    // function keeps while it waits is part of every connection's task.)
    let opened = open(incoming, peer, &shared, counted.0, handoff, &stop);
    let mut live = match Box::pin(opened).await {
        Ok(live) => live,
        Err(e) => {
            if matches!(
                e,
                ProtocolError::ConnectTimeout(_) | ProtocolError::HandshakeTimeout(..)
            ) {
                shared.counters.timed_out(TimedOut::Connect);
            }
            tracing::debug!(%peer, error = %e, "embedded broker: connection closed");
            return;
        }
    };
    let end = live.run(&stop, &done).await;
    // Boxed like the handshake: it runs once, and would add its state to the task's.
    Box::pin(live.close(end)).await;
}

/// Counts a connection in [`Shared::connections`] while it lives; holds the count
/// including itself.
struct Counted<'a>(usize, &'a Shared);

impl Counted<'_> {
    fn new(shared: &Shared) -> Counted<'_> {
        Counted(
            shared.connections.fetch_add(1, Ordering::AcqRel) + 1,
            shared,
        )
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.1.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a read reserves when the buffer has less than a quarter of it left.
const READ_CHUNK: usize = 4096;

/// Reads more of the client's input into `buf`, which holds memory only while input
/// comes: when the socket has nothing to read and `buf` is empty, the buffer is released
/// before waiting, and taken again once input arrives. An idle connection thus holds no
/// read buffer; a busy one keeps its buffer from read to read. (Over TLS and WebSocket
/// the transport keeps buffers of its own; those read as plain reads do.)
async fn read_more(rd: &mut StreamReader, buf: &mut BytesMut) -> std::io::Result<usize> {
    let StreamReader::Tcp(tcp) = rd else {
        reserve_read(buf);
        return rd.read_buf(buf).await;
    };
    // With a buffer at hand, read before waiting: a busy connection keeps its buffer.
    // Polled for readiness rather than awaiting `readable()`, whose future would be part
    // of every connection's task.
    let mut try_now = buf.capacity() > 0;
    std::future::poll_fn(|cx| {
        // Each read takes a unit of the task's budget, as tokio's own reads do (`try_read`
        // does not): a client whose input never stops (a flood) would otherwise keep its
        // worker thread from every other connection.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            if !try_now {
                std::task::ready!(tcp.as_ref().poll_read_ready(cx))?;
            }
            reserve_read(buf);
            match tcp.try_read_buf(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                    try_now = false;
                }
                r => {
                    coop.made_progress();
                    return Poll::Ready(r);
                }
            }
        }
    })
    .await
}

fn reserve_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// A connection up to its CONNACK: the transport's handshakes, the CONNECT, the writer
/// task, the login and the session.
async fn open(
    incoming: Incoming,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    count: usize,
    handoff: Handoff,
    stop: &CancellationToken,
) -> Result<Live, ProtocolError> {
    // One deadline for the handshakes and the CONNECT.
    let timeout = shared.plan.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let (socket, cert, _permit) = match incoming {
        Incoming::Socket(socket, transport, permit) => {
            let opened = tokio::select! {
                r = tokio::time::timeout_at(deadline, transport.open(socket)) => r,
                _ = stop.cancelled() => return Err(ProtocolError::ServerShuttingDown),
            };
            match opened {
                Ok(Ok((stream, cert))) => (stream, cert, Some(permit)),
                Ok(Err(e)) => return Err(ProtocolError::Handshake(transport.name(), e)),
                Err(_) => {
                    let name = transport.name();
                    return Err(ProtocolError::HandshakeTimeout(name, timeout));
                }
            }
        }
        #[cfg(test)]
        Incoming::Ready(stream, cert) => (stream, cert, None),
    };
    let (mut rd, wr) = socket.split();
    let mut out = Outbox::new(wr);
    let max_packet = shared.plan.max_packet_size;
    let send_timeout = shared.plan.send_timeout;
    let mut buf = BytesMut::new();
    let read = connect::read_connect(
        &mut rd,
        &mut out,
        &mut buf,
        max_packet,
        (deadline, timeout),
        stop,
    );
    let connect = match read.await {
        Ok(c) => *c,
        Err(e) => {
            // With the refusal, if there is one.
            out.close(send_timeout).await;
            return Err(e);
        }
    };
    let client = connect::Client { peer, cert, count };
    let conn = Conn::accept(shared, connect, client, out, handoff).await?;
    Ok(Live { conn, rd, buf })
}

/// A connected client's task state, all it holds while it waits: the connection (its
/// outbox included), the reading half and its buffer.
struct Live {
    conn: Conn,
    rd: StreamReader,
    buf: BytesMut,
}

impl Live {
    /// The read loop, and the end of the session.
    async fn run(&mut self, stop: &CancellationToken, done: &CancellationToken) -> End {
        let buf = std::mem::take(&mut self.buf);
        let end = self.conn.run(&mut self.rd, buf, stop, done).await;
        self.conn.finish(&end).await;
        end
    }

    /// Lets what the outbox holds out, then lingers for the last packets.
    async fn close(self, end: End) {
        let Live { conn, mut rd, .. } = self;
        let send_timeout = conn.shared.plan.send_timeout;
        // The rest of the connection (its intake, its signal) goes now, not after the wait.
        let out = conn.into_outbox();
        // Let waiting packets (DISCONNECT, last acks) out, briefly; then read until the
        // client closes, so that closing with unread input does not reset the connection
        // and destroy the DISCONNECT before the client reads it.
        let _ = tokio::time::timeout(Duration::from_secs(2), out.close(send_timeout)).await;
        if end == End::Lost {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                // On the heap: an array here would make every connection's task this much larger.
                let mut sink = vec![0u8; 4096];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        tracing::debug!(?end, "embedded broker: connection ended");
    }
}

/// A connected client: who it is, what it negotiated, and the state of each direction.
struct Conn {
    shared: Arc<Shared>,
    version: Version,
    client_id: String,
    username: Option<String>,
    /// This connection in its session's `Link`: once another connection took the session
    /// over, it is no longer this one's to pump or detach.
    conn_id: u64,
    /// 1.5 × the negotiated keepalive (zero: none): silence this long ends the connection.
    keep_alive: Duration,
    /// Sent when the connection ends other than by a normal DISCONNECT; taken by `finish`.
    /// Boxed: most clients have none, and every connection's task holds this field.
    will: Option<Box<Will>>,
    /// What the login gave for authorization, and the HTTP answers cached, with
    /// `embedded.auth`; None without it (boxed: most deployments have none).
    grants: Option<Box<Grants>>,
    /// Packets waiting for the socket, and its writing half.
    out: Outbox,
    inbound: FromClient,
    outbound: ToClient,
}

impl Conn {
    /// Puts `packet` in the outbox, for the read loop to write; past the outbox's bound,
    /// writes what waits first. Encoded before any wait, so that the packet is not held
    /// meanwhile (this future is part of every connection's task).
    fn send(&mut self, packet: Outgoing) -> impl Future<Output = Result<(), ProtocolError>> + '_ {
        let pushed = self.out.push(&packet, self.version);
        async move {
            pushed.map_err(ProtocolError::Encode)?;
            if self.out.full() {
                // Boxed: it waits rarely, and its state would be part of every task's.
                let limit = self.shared.plan.send_timeout;
                if let Err(e) = Box::pin(self.out.write_all(limit)).await {
                    self.write_failed(e);
                    return Err(ProtocolError::ConnectionClosed);
                }
            }
            Ok(())
        }
    }

    /// The outbox, the rest dropped.
    fn into_outbox(self) -> Outbox {
        self.out
    }

    /// Writing to the client failed with `e`, which ends the connection; counted when
    /// the socket took nothing for `send_timeout` (a client that does not read).
    fn write_failed(&self, e: std::io::Error) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            tracing::debug!(
                client_id = %self.client_id,
                send_timeout = ?self.shared.plan.send_timeout,
                "embedded broker: the client takes nothing sent to it; closing"
            );
            self.shared.counters.timed_out(TimedOut::Send);
        }
    }

    /// Ends the connection because of `e`: logged, and told to an MQTT 5 client in a
    /// DISCONNECT with its reason code (3.1.1 has no DISCONNECT from the server).
    async fn disconnect(&mut self, e: &ProtocolError) {
        tracing::debug!(client_id = %self.client_id, error = %e, "embedded broker: closing the connection");
        if self.version == Version::V5 {
            let reason = e.reason_code(self.version);
            let _ = self.send(Outgoing::Disconnect { reason }).await;
        }
    }

    /// Who this client is, for the ACL.
    fn identity(&self) -> Identity<'_> {
        Identity {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }

    /// Makes the connection's [`Grants`] when a reload brought `embedded.auth` after this
    /// client logged in (with where it connected from).
    fn ensure_grants(&mut self, auth: &Auth) {
        if self.grants.is_none() && auth.external() {
            let peer = self.with_session(|s| s.link.as_ref().map(|l| l.peer.ip()));
            let peer = peer
                .flatten()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            self.grants = Some(Box::new(Grants::new(peer)));
        }
    }

    /// What decides for this client: the users and ACL in force, who it is, and (with
    /// `embedded.auth`) its grants, made on first use.
    fn deciders(&mut self) -> (Arc<Auth>, Identity<'_>, Option<&mut Grants>) {
        let auth = self.shared.auth();
        self.ensure_grants(&auth);
        let who = Identity {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        };
        (auth, who, self.grants.as_deref_mut())
    }

    /// May this client publish on `topic` (a PUBLISH or its will)? See
    /// [`crate::broker::auth::chain`]. Without `embedded.auth`, the local ACL answers at
    /// once; with it, the chain runs boxed, so that its state (an HTTP request's) is no
    /// part of every connection's task.
    async fn may_publish(&mut self, topic: &str, qos: u8, retain: bool) -> bool {
        let (auth, who, grants) = self.deciders();
        match grants {
            None => auth.can_publish(who, topic),
            Some(g) => Box::pin(auth.may_publish(Some(g), who, topic, qos, retain)).await,
        }
    }

    /// How a SUBSCRIBE to `filter` at `qos` is decided, as [`Conn::may_publish`].
    async fn may_subscribe(&mut self, filter: &str, qos: u8) -> Subscribed {
        let (auth, who, grants) = self.deciders();
        match grants {
            None if auth.can_subscribe(who, filter) => Subscribed::Local,
            None => Subscribed::Refused,
            Some(g) => Box::pin(auth.may_subscribe(Some(g), who, filter, qos)).await,
        }
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> Option<T> {
        let mut state = self.shared.lock();
        state.sessions.get_mut(&self.client_id).map(|s| f(s))
    }
}

#[cfg(test)]
mod tests;
