//! The CONNECT handshake: reading the first packet (by the `connect_timeout` deadline),
//! refusing what cannot be served with the CONNACK code that says why, authenticating
//! (argon2, off the async threads), attaching the session (taking it over from another
//! connection) and answering the CONNACK with what was negotiated.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::inbound::{FromClient, TOPIC_ALIAS_MAX};
use super::outbound::ToClient;
use super::outbox::Outbox;
use super::{Conn, ProtocolError, read_more};
use crate::broker::Shared;
use crate::broker::auth::chain::Grants;
use crate::broker::auth::{Identity, Login};
use crate::broker::client_cert::CertUser;
use crate::broker::codec::{
    self, CodecError, ConnAckProperties, Connect, Outgoing, Packet, Version,
};
use crate::broker::listener::StreamReader;
use crate::broker::session::{Link, Session, Signal};
use crate::source::intake::Handoff;
use crate::topic::{TopicLimits, validate_topic_name};

/// Reads the CONNECT by `deadline` (the connection's `connect_timeout`, which its
/// transport's handshakes took their share of); a client that never sends one must not
/// hold up a shutdown either.
/// An unsupported protocol, or a v5 CONNECT that does not decode, is refused: the
/// CONNACK that says so is put in `out`.
pub(super) async fn read_connect(
    rd: &mut StreamReader,
    out: &mut Outbox,
    buf: &mut BytesMut,
    max_packet: usize,
    (deadline, timeout): (Instant, Duration),
    stop: &CancellationToken,
) -> Result<Box<Connect>, ProtocolError> {
    let connecting = tokio::time::timeout_at(deadline, async {
        loop {
            if buf.first().is_some_and(|&b| b != 0x10) {
                return Err(ProtocolError::NotConnect);
            }
            if let Some(frame) = codec::take_frame(buf, max_packet)? {
                return Ok(frame);
            }
            if read_more(rd, buf).await? == 0 {
                return Err(ProtocolError::ClosedBeforeConnect);
            }
        }
    });
    let frame = tokio::select! {
        r = connecting => r.map_err(|_| ProtocolError::ConnectTimeout(timeout))??,
        _ = stop.cancelled() => return Err(ProtocolError::ServerShuttingDown),
    };
    let version = match codec::detect_version(&frame) {
        Ok(v) => v,
        Err(e @ CodecError::UnsupportedProtocol { .. }) => {
            // 3.1.1's "unacceptable protocol version"; understood by 3.1 clients too.
            let e = ProtocolError::Codec(e);
            refuse(out, Version::V311, &e);
            return Err(e);
        }
        Err(e) => return Err(e.into()),
    };
    match codec::decode(frame, version) {
        Ok(Packet::Connect(c)) => Ok(c),
        Ok(_) => Err(ProtocolError::NotConnect),
        Err(e) => {
            let e = ProtocolError::Codec(e);
            if version == Version::V5 {
                refuse(out, version, &e);
            }
            Err(e)
        }
    }
}

/// Puts in `out` a CONNACK refusing the CONNECT because of `e`.
fn refuse(out: &mut Outbox, version: Version, e: &ProtocolError) {
    let refusal = Outgoing::ConnAck {
        session_present: false,
        code: e.connack_code(version),
        properties: None,
    };
    let _ = out.push(&refusal, version);
}

/// Who connects, beside what its CONNECT says.
pub(super) struct Client {
    pub peer: std::net::SocketAddr,
    /// The name its TLS client certificate gives, if any.
    pub cert: CertUser,
    /// Connections open, this one included.
    pub count: usize,
}

/// The checks before the password's: the number of connections, enhanced
/// authentication, the client id.
fn check_connect(shared: &Shared, c: &Connect, count: usize) -> Result<(), ProtocolError> {
    if count > shared.plan.max_connections {
        shared.counters.connection_refused();
        return Err(ProtocolError::ServerBusy);
    }
    if c.auth_method.is_some() {
        return Err(ProtocolError::EnhancedAuthUnsupported);
    }
    if c.client_id.is_empty() && c.version == Version::V311 && !c.clean_start {
        return Err(ProtocolError::ClientIdRejected);
    }
    Ok(())
}

/// The checks after the password's: the login's outcome, the will's topic.
fn check_login(login: Login, c: &Connect, limits: TopicLimits) -> Result<(), ProtocolError> {
    match login {
        Login::Ok => {}
        Login::BadCredentials => return Err(ProtocolError::BadCredentials),
        Login::NotAuthorized => return Err(ProtocolError::NotAuthorized),
    }
    match &c.will {
        Some(w) => validate_topic_name(&w.topic)
            .and_then(|()| limits.check(&w.topic))
            .map_err(ProtocolError::WillTopicInvalid),
        None => Ok(()),
    }
}

impl Conn {
    /// Authenticates, attaches the session (taking it over from another connection) and
    /// answers the CONNACK; a CONNECT that cannot be served is refused with a CONNACK
    /// that says why.
    ///
    /// A name from a verified client certificate is the client's username and its
    /// credential: the CONNECT's username and password are not looked at (as Mosquitto's
    /// `use_identity_as_username`). Without one, the CONNECT logs in as usual.
    pub(super) async fn accept(
        shared: &Arc<Shared>,
        c: Connect,
        Client { peer, cert, count }: Client,
        out: Outbox,
        handoff: Handoff,
    ) -> Result<Conn, ProtocolError> {
        let version = c.version;
        let plan = &shared.plan;
        // The refusal written (within `send_timeout`) and the connection closed.
        let refused = async |mut out: Outbox, e: ProtocolError| {
            refuse(&mut out, version, &e);
            out.close(plan.send_timeout).await;
            e
        };
        if let Err(e) = check_connect(shared, &c, count) {
            return Err(refused(out, e).await);
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            let id = format!("mqb-{:016x}", rand::random::<u64>());
            if version == Version::V5 {
                assigned = Some(id.clone());
            }
            id
        } else {
            c.client_id.clone()
        };
        // With `embedded.auth`: what the login gave, for authorization.
        let auth = shared.auth();
        let mut grants = auth.external().then(|| Box::new(Grants::new(peer.ip())));
        let (username, login) = match cert {
            CertUser::Name(name) => (Some(name), Login::Ok),
            CertUser::Unnamed(from) => {
                return Err(refused(out, ProtocolError::CertificateUnnamed(from)).await);
            }
            CertUser::None => {
                let who = Identity {
                    username: c.username.as_deref(),
                    client_id: &client_id,
                };
                let (login, given) = auth
                    .authenticate(who, c.password.as_deref(), peer.ip())
                    .await
                    .map_err(ProtocolError::LoginFailed)?;
                grants = given;
                (c.username.clone(), login)
            }
        };
        if let Err(e) = check_login(login, &c, plan.topic_limits) {
            return Err(refused(out, e).await);
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

        let signal = Arc::new(Signal::default());
        let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let link = Link {
            conn_id,
            signal: Arc::clone(&signal),
            peer,
            version,
            since: jiff::Timestamp::now(),
        };
        let (session_present, resend, ended_will) = {
            let mut state = shared.change();
            // A session of this client id: taken over from its connection, or offline
            // with its expiry and maybe a will pending, which this connection cancels
            // ([MQTT-3.1.3-9]) or, when it ends the session, publishes. (One whose
            // expiry passed a moment ago, before the timers removed it, has ended.)
            let (existing, ended_will) = match state.remove_session(&client_id) {
                Some(mut old) => {
                    shared.timers.disarm(&mut old);
                    let expired = old.ends_at.is_some_and(|t| t <= Instant::now());
                    let resume = !c.clean_start && !expired;
                    if let Some(link) = &old.link {
                        link.signal.take_over(resume);
                    }
                    let will = old.reconnected().filter(|_| !resume);
                    (Some(old).filter(|_| resume), will)
                }
                None => (None, None),
            };
            let (mut session, present) = match existing {
                Some(s) => (s, true),
                None => (Box::new(Session::new(c.session_expiry)), false),
            };
            session.expiry = expiry;
            session.touch();
            session.link = Some(link);
            session.username = username.clone();
            let resend = session.resend();
            state.insert_session(client_id.clone(), session);
            (present, resend, ended_will)
        };
        // Outside the state lock, which routing takes.
        if let Some(will) = ended_will {
            super::end::publish_will(shared, &client_id, will, Some(&handoff));
        }

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
        let mut conn = Conn {
            shared: Arc::clone(shared),
            version,
            client_id,
            username,
            conn_id,
            keep_alive: Duration::from_secs(keep_alive as u64) * 3 / 2,
            out,
            inbound: FromClient::new(
                handoff,
                (plan.max_inflight as usize).saturating_mul(plan.max_packet_size),
                plan.max_publish_rate,
            ),
            outbound: ToClient::new(signal, &c, plan.max_inflight),
            will: c.will.map(Box::new),
            grants,
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
        conn.outbound.signal.wake();
        tracing::debug!(client_id = %conn.client_id, username = ?conn.username, ?version, session_present, "embedded broker: client connected");
        Ok(conn)
    }
}
