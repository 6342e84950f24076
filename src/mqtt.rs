//! Glue to rumqttc, the MQTT client, for both protocol versions (3.1.1 and 5): one
//! [`Client`] / [`EventLoop`] pair whose events are normalised into [`Incoming`], so the
//! source and the publishing sinks (`republish` to an external broker, `mqtt`) are
//! written once. Kept in one place so that the client library could be swapped.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{Event as Event4, Outgoing, Packet as Packet4, TlsConfiguration, Transport};

use crate::config::raw::Protocol;
use crate::config::{BrokerPlan, ConnectionPlan};
use crate::message::Properties;

/// Capacity of rumqttc's request channel (publishes, acks, subscribes waiting for the
/// event loop).
const REQUEST_CAPACITY: usize = 1024;

/// MQTT 5 properties of a message mqbridge publishes (the `mqtt` sink's `properties:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingProperties {
    /// Seconds the broker keeps the message for subscribers that have not got it.
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// A connection's handle for requests. Cheap to clone.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The connection itself; must be polled for anything to happen.
pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// Why a connection could not be set up (before any network I/O).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("client id must not be empty")]
    EmptyClientId,
    #[error("ca_file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("password_file {}: {source}", path.display())]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What an acknowledgement needs to know of a received PUBLISH.
#[derive(Debug, Clone, Copy)]
pub struct AckToken {
    pkid: u16,
    qos: u8,
}

/// A PUBLISH received.
#[derive(Debug)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub properties: Properties,
    /// None for QoS 0.
    pub ack: Option<AckToken>,
}

/// Normalised events.
#[derive(Debug)]
pub enum Incoming {
    Connected {
        session_present: bool,
    },
    /// Per filter: the granted QoS, or why it was refused.
    SubAck(Vec<Result<u8, String>>),
    Publish(Box<Received>),
    /// The broker answered our publish of packet id `pkid` for good: confirmed it
    /// (PUBACK, PUBCOMP), or, MQTT 5 only, refused it with a reason code (PUBACK or
    /// PUBREC of 0x80 or more: not authorized, quota exceeded, …; `refused` names it).
    Confirmed {
        pkid: u16,
        refused: Option<String>,
    },
    /// One of our publishes went out, with packet id `pkid` (0 at QoS 0, for which this
    /// is all there is). Publishes go out in the order they were queued.
    Sent(u16),
    DisconnectSent,
    Other,
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// What a connection is for, which decides its session.
#[derive(Clone, Copy)]
pub enum Session<'a> {
    /// Reading from `broker:` (the source): a persistent session (clean session/start
    /// off, the plan's session expiry for MQTT 5), so the broker keeps our subscriptions
    /// and unacknowledged messages while we are away; its `receive_maximum`; and
    /// PUBACK/PUBREC left to [`Client::ack`].
    Subscriber(&'a BrokerPlan),
    /// Publishing (the publishing sinks): a clean session. What the broker had not
    /// confirmed when a connection ended is published again on a new one.
    Publisher,
}

/// Opens a connection to the broker of `plan` as `client_id` (the plan's id or a derived
/// one); the event loop connects on first poll.
pub fn connect(
    plan: &ConnectionPlan,
    client_id: &str,
    session: Session<'_>,
) -> Result<(Client, EventLoop), ConnectError> {
    if client_id.is_empty() {
        return Err(ConnectError::EmptyClientId);
    }
    let credentials = match &plan.username {
        Some(user) => Some((user.clone(), password(plan)?.unwrap_or_default())),
        None => None,
    };
    let transport = transport(plan)?;
    let subscriber = match session {
        Session::Subscriber(b) => Some(b),
        Session::Publisher => None,
    };
    let persistent = subscriber.is_some();
    Ok(match plan.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, plan.host.clone(), plan.port);
            o.set_keep_alive(plan.keep_alive)
                .set_clean_session(!persistent)
                .set_manual_acks(persistent)
                .set_max_packet_size(plan.max_packet_size, plan.max_packet_size);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::AsyncClient::new(o, REQUEST_CAPACITY);
            (Client::V4(c), EventLoop::V4(Box::new(e)))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, plan.host.clone(), plan.port);
            o.set_keep_alive(plan.keep_alive)
                .set_clean_start(!persistent)
                .set_manual_acks(persistent)
                .set_max_packet_size(Some(plan.max_packet_size as u32));
            if let Some(b) = subscriber {
                o.set_receive_maximum(Some(b.receive_maximum))
                    .set_session_expiry_interval(Some(
                        b.session_expiry.as_secs().min(u32::MAX as u64) as u32,
                    ));
            }
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(o, REQUEST_CAPACITY);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
    })
}

fn transport(plan: &ConnectionPlan) -> Result<Option<Transport>, ConnectError> {
    if !plan.tls {
        return Ok(None);
    }
    Ok(Some(match &plan.ca_file {
        Some(path) => Transport::tls_with_config(TlsConfiguration::Simple {
            ca: std::fs::read(path).map_err(|source| ConnectError::CaFile {
                path: path.clone(),
                source,
            })?,
            alpn: None,
            client_auth: None,
        }),
        None => Transport::tls_with_default_config(),
    }))
}

/// The password from the plan or its `password_file`.
fn password(plan: &ConnectionPlan) -> Result<Option<String>, ConnectError> {
    if let Some(p) = &plan.password {
        return Ok(Some(p.0.clone()));
    }
    match &plan.password_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConnectError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
        }
        None => Ok(None),
    }
}

impl Client {
    /// Queues a SUBSCRIBE without waiting (safe from the polling task).
    pub fn try_subscribe_many(&self, filters: &[String], qos: u8) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_subscribe_many(
                filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos4(qos))),
            ),
            Client::V5(c) => {
                return c
                    .try_subscribe_many(filters.iter().map(|f| {
                        let mut filter = p5::Filter::new(f.clone(), qos5(qos));
                        // A filter the session already has is not sent its retained
                        // messages again.
                        filter.retain_forward_rule = p5::RetainForwardRule::OnNewSubscribe;
                        filter
                    }))
                    .map_err(|e| e.to_string());
            }
        }
        .map_err(|e| e.to_string())
    }

    /// Queues an UNSUBSCRIBE without waiting (safe from the polling task).
    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        }
    }

    /// Queues the acknowledgement of a received PUBLISH, waiting while the request
    /// channel is full. Never call it from the task that polls the event loop.
    pub async fn ack(&self, token: &AckToken) -> Result<(), String> {
        // rumqttc acks a Publish; only its packet id and QoS matter.
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos4(token.qos), Vec::new());
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let mut p = p5::Publish::new("", qos5(token.qos), Vec::new(), None);
                p.pkid = token.pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a PUBLISH, waiting while the request channel is full. `properties` go out
    /// on an MQTT 5 connection (config allows them only there).
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<OutgoingProperties>,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .publish(topic, qos4(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            Client::V5(c) => match properties {
                None => c.publish(topic, qos5(qos), retain, payload).await,
                Some(p) => {
                    let properties = p5::PublishProperties {
                        message_expiry_interval: p.message_expiry_interval,
                        content_type: p.content_type,
                        response_topic: p.response_topic,
                        user_properties: p.user_properties,
                        ..Default::default()
                    };
                    c.publish_with_properties(topic, qos5(qos), retain, payload, properties)
                        .await
                }
            }
            .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT, waiting while the request channel is full.
    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl EventLoop {
    /// Writes the acknowledgements (PUBACK, PUBREC) of messages received on the current
    /// connection straight to it, in order, and flushes them at once: one write for a
    /// whole batch. Through [`Client::ack`], rumqttc's loop takes one request per turn
    /// and flushes each on its own, so each ack costs a turn, a timer and a system call
    /// here, and a read for the broker (BENCHMARKS.md, "External mode"). Only 3.1.1
    /// connections offer that (rumqttc keeps the MQTT 5 connection to itself): an MQTT 5
    /// connection's acks are returned, for [`Client::ack`]. Without a connection, or when
    /// writing fails, the connection is gone and its acks with it (the broker sends the
    /// messages again); the next poll finds that out.
    ///
    /// Call it between polls only, never while a poll is pending: this is what keeps the
    /// order with the packets the loop itself writes.
    pub async fn ack_at_once(&mut self, tokens: Vec<AckToken>) -> Vec<AckToken> {
        let EventLoop::V4(e) = self else {
            return tokens;
        };
        let timeout = Duration::from_secs(e.network_options().connection_timeout());
        let Some(network) = e.network.as_mut() else {
            tracing::debug!(
                acks = tokens.len(),
                "connection gone; the broker sends these again"
            );
            return Vec::new();
        };
        for t in &tokens {
            // rumqttc's state keeps nothing for these but a log timestamp.
            let packet = match t.qos {
                2 => Packet4::PubRec(rumqttc::PubRec::new(t.pkid)),
                _ => Packet4::PubAck(rumqttc::PubAck::new(t.pkid)),
            };
            if let Err(e) = network.write(packet).await {
                tracing::debug!(error = %e, "cannot write acks; the connection is gone");
                return Vec::new();
            }
        }
        match tokio::time::timeout(timeout, network.flush()).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot flush acks; the connection is gone"),
            // Still buffered: the loop's next flush sends them.
            Err(_) => {
                tracing::debug!("acks not flushed in time; the connection's next write takes them")
            }
            Ok(Ok(())) => {}
        }
        Vec::new()
    }

    /// An event the last poll already read, if any, without polling. rumqttc reads up to
    /// ten packets at a time but hands them out one per poll, each poll a turn of the
    /// caller's `select!`; taking them here saves those turns.
    pub fn buffered(&mut self) -> Option<Incoming> {
        match self {
            EventLoop::V4(e) => e.state.events.pop_front().map(incoming4),
            EventLoop::V5(e) => e.state.events.pop_front().map(incoming5),
        }
    }

    /// The next event; an error means the connection is gone (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Incoming, String> {
        match self {
            EventLoop::V4(e) => e.poll().await.map(incoming4).map_err(|e| e.to_string()),
            EventLoop::V5(e) => e.poll().await.map(incoming5).map_err(|e| e.to_string()),
        }
    }
}

fn outgoing(o: Outgoing) -> Incoming {
    match o {
        Outgoing::Publish(pkid) => Incoming::Sent(pkid),
        Outgoing::Disconnect => Incoming::DisconnectSent,
        _ => Incoming::Other,
    }
}

fn incoming4(ev: Event4) -> Incoming {
    match ev {
        Event4::Incoming(Packet4::ConnAck(c)) => Incoming::Connected {
            session_present: c.session_present,
        },
        Event4::Incoming(Packet4::SubAck(s)) => Incoming::SubAck(
            s.return_codes
                .iter()
                .map(|c| match c {
                    rumqttc::SubscribeReasonCode::Success(q) => Ok(*q as u8),
                    rumqttc::SubscribeReasonCode::Failure => Err("refused".to_string()),
                })
                .collect(),
        ),
        Event4::Incoming(Packet4::Publish(p)) => {
            let qos = p.qos as u8;
            let ack = (qos > 0).then_some(AckToken { pkid: p.pkid, qos });
            Incoming::Publish(Box::new(Received {
                topic: p.topic,
                payload: p.payload,
                qos,
                retain: p.retain,
                properties: Properties::default(),
                ack,
            }))
        }
        Event4::Incoming(Packet4::PubAck(rumqttc::PubAck { pkid, .. }))
        | Event4::Incoming(Packet4::PubComp(rumqttc::PubComp { pkid, .. })) => {
            Incoming::Confirmed {
                pkid,
                refused: None,
            }
        }
        Event4::Incoming(_) => Incoming::Other,
        Event4::Outgoing(o) => outgoing(o),
    }
}

fn incoming5(ev: rumqttc::v5::Event) -> Incoming {
    use p5::Packet;
    use rumqttc::v5::Event;
    match ev {
        Event::Incoming(Packet::ConnAck(c)) => Incoming::Connected {
            session_present: c.session_present,
        },
        Event::Incoming(Packet::SubAck(s)) => Incoming::SubAck(
            s.return_codes
                .iter()
                .map(|c| match c {
                    p5::SubscribeReasonCode::Success(q) => Ok(*q as u8),
                    other => Err(format!("{other:?}")),
                })
                .collect(),
        ),
        Event::Incoming(Packet::Publish(p)) => {
            let qos = p.qos as u8;
            let ack = (qos > 0).then_some(AckToken { pkid: p.pkid, qos });
            let properties = p
                .properties
                .map(|pp| Properties {
                    user_properties: pp.user_properties,
                    content_type: pp.content_type,
                    response_topic: pp.response_topic,
                    correlation_data: pp.correlation_data,
                })
                .unwrap_or_default();
            Incoming::Publish(Box::new(Received {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                qos,
                retain: p.retain,
                properties,
                ack,
            }))
        }
        // rumqttc treats NoMatchingSubscribers as success, as the specification does.
        Event::Incoming(Packet::PubAck(a)) => Incoming::Confirmed {
            pkid: a.pkid,
            refused: (!matches!(
                a.reason,
                p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers
            ))
            .then(|| format!("{:?}", a.reason)),
        },
        // A refusal ends a QoS 2 exchange at the PUBREC: no PUBCOMP follows.
        Event::Incoming(Packet::PubRec(r))
            if !matches!(
                r.reason,
                p5::PubRecReason::Success | p5::PubRecReason::NoMatchingSubscribers
            ) =>
        {
            Incoming::Confirmed {
                pkid: r.pkid,
                refused: Some(format!("{:?}", r.reason)),
            }
        }
        Event::Incoming(Packet::PubComp(c)) => Incoming::Confirmed {
            pkid: c.pkid,
            refused: (c.reason != p5::PubCompReason::Success).then(|| format!("{:?}", c.reason)),
        },
        Event::Incoming(_) => Incoming::Other,
        Event::Outgoing(o) => outgoing(o),
    }
}

/// Reconnect backoff: exponential from 100 ms to 30 s, with jitter (50–100 % of the step).
#[derive(Debug, Default)]
pub struct ReconnectBackoff {
    failures: u32,
}

impl ReconnectBackoff {
    /// A connection attempt failed: how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let cap = Duration::from_millis(100)
            .saturating_mul(1u32 << self.failures.min(9))
            .min(Duration::from_secs(30));
        self.failures += 1;
        cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// Connected: start over.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}
