//! Why a connection is refused or closed ([`ProtocolError`]), and the reason code that
//! tells the client: in the CONNACK that refuses a CONNECT, or in the MQTT 5 DISCONNECT
//! that closes the connection (a 3.1.1 client only sees the connection close). The
//! Display says what happened, for the logs.

use std::time::Duration;

use tokio::task::JoinError;

use super::inbound::TOPIC_ALIAS_MAX;
use crate::broker::codec::{CodecError, Version};
use crate::broker::listener::HandshakeError;
use crate::topic::TopicError;

/// Why a connection is refused or closed; see the module docs.
#[derive(Debug, thiserror::Error)]
pub(super) enum ProtocolError {
    // Before MQTT starts.
    #[error("{0} handshake failed: {1}")]
    Handshake(&'static str, HandshakeError),
    #[error("{0} handshake: not done within {1:?}")]
    HandshakeTimeout(&'static str, Duration),

    // Before the CONNECT is read.
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("closed before CONNECT")]
    ClosedBeforeConnect,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Malformed, oversized or invalid input (its own reason code).
    #[error(transparent)]
    Codec(#[from] CodecError),

    // CONNECT refusals.
    #[error("too many connections")]
    ServerBusy,
    #[error("enhanced authentication (AUTH) is not supported")]
    EnhancedAuthUnsupported,
    #[error("empty client id without clean session")]
    ClientIdRejected,
    #[error("bad username or password")]
    BadCredentials,
    #[error("anonymous clients are not allowed")]
    NotAuthorized,
    #[error(
        "the client certificate has no {} to take the username from",
        crate::broker::client_cert::describe(*.0)
    )]
    CertificateUnnamed(crate::config::raw::CertName),
    #[error("the password check failed: {0}")]
    LoginFailed(JoinError),
    #[error("invalid will topic: {0}")]
    WillTopicInvalid(TopicError),

    // A connected client's packets.
    #[error("a second CONNECT")]
    SecondConnect,
    #[error("the client sent a {0}, which only a server sends")]
    ServerPacket(&'static str),
    #[error("AUTH, but the CONNECT named no authentication method")]
    UnexpectedAuth,
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(TopicError),
    #[error("invalid topic filter: {0}")]
    FilterInvalid(TopicError),
    #[error("topic alias {0} outside 1..={TOPIC_ALIAS_MAX}")]
    TopicAliasInvalid(u16),
    #[error("topic alias {0} used before a PUBLISH set it")]
    TopicAliasUnknown(u16),
    #[error("more QoS 1/2 messages in flight than the receive maximum ({0})")]
    ReceiveMaximumExceeded(u16),
    #[error("no local on a shared subscription")]
    SharedNoLocal,
    #[error("session expiry set on DISCONNECT after 0 on CONNECT")]
    SessionExpiryRaised,
    #[error("the session is gone")]
    SessionGone,

    // This side.
    #[error("cannot encode a packet for the client: {0}")]
    Encode(CodecError),
    #[error("the connection's writer has stopped")]
    ConnectionClosed,
    #[error("mqbridge is shutting down")]
    ServerShuttingDown,
    #[error("no packet within {0:?} (1.5 × the keepalive)")]
    KeepAliveTimeout(Duration),
    #[error("another connection took the session over")]
    SessionTakenOver,
}

impl ProtocolError {
    /// The MQTT 5 reason code for it, in the terms of `version`: 3.1.1 has no "topic name
    /// invalid", so there an invalid topic is a protocol error. U+0000 in a topic or a
    /// filter makes the packet malformed [MQTT-1.5.4-2]; an empty topic name without a
    /// topic alias, and a filter the wildcard rules refuse, are protocol errors.
    pub fn reason_code(&self, version: Version) -> u8 {
        use ProtocolError::*;
        match self {
            Codec(e) => e.reason_code(),
            TopicNameInvalid(TopicError::Nul) | FilterInvalid(TopicError::Nul) => 0x81,
            NotConnect
            | SecondConnect
            | ServerPacket(_)
            | UnexpectedAuth
            | TopicAliasUnknown(_)
            | SharedNoLocal
            | SessionExpiryRaised
            | FilterInvalid(_)
            | TopicNameInvalid(TopicError::EmptyName) => 0x82,
            TopicNameInvalid(_) => match version {
                Version::V5 => 0x90,
                Version::V311 => 0x82,
            },
            Handshake(..) | HandshakeTimeout(..) | ConnectTimeout(_) | ClosedBeforeConnect
            | Io(_) | LoginFailed(_) | SessionGone | Encode(_) | ConnectionClosed => 0x80,
            ClientIdRejected => 0x85,
            BadCredentials | CertificateUnnamed(_) => 0x86,
            NotAuthorized => 0x87,
            ServerShuttingDown => 0x8B,
            EnhancedAuthUnsupported => 0x8C,
            KeepAliveTimeout(_) => 0x8D,
            SessionTakenOver => 0x8E,
            WillTopicInvalid(_) => 0x90,
            ReceiveMaximumExceeded(_) => 0x93,
            TopicAliasInvalid(_) => 0x94,
            ServerBusy => 0x97,
        }
    }

    /// The CONNACK code refusing a CONNECT for it: the reason code in MQTT 5; in 3.1.1
    /// the nearest of its five return codes.
    pub fn connack_code(&self, version: Version) -> u8 {
        let code = self.reason_code(version);
        match version {
            Version::V5 => code,
            Version::V311 => match code {
                0x84 => 0x01,               // unacceptable protocol version
                0x85 => 0x02,               // identifier rejected
                0x88 | 0x89 | 0x97 => 0x03, // server unavailable
                0x86 => 0x04,               // bad user name or password
                _ => 0x05,                  // not authorized
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_by_version() {
        let topic = || ProtocolError::TopicNameInvalid(TopicError::WildcardInName);
        assert_eq!(topic().reason_code(Version::V5), 0x90);
        assert_eq!(topic().reason_code(Version::V311), 0x82);
        for (e, code) in [
            (ProtocolError::TopicNameInvalid(TopicError::Nul), 0x81),
            (ProtocolError::TopicNameInvalid(TopicError::EmptyName), 0x82),
            (ProtocolError::FilterInvalid(TopicError::Nul), 0x81),
            (ProtocolError::FilterInvalid(TopicError::HashNotLast), 0x82),
        ] {
            assert_eq!(e.reason_code(Version::V5), code, "{e}");
        }
        let codec = ProtocolError::Codec(CodecError::TooLarge(10));
        assert_eq!(codec.reason_code(Version::V5), 0x95);
        let unsupported = ProtocolError::Codec(CodecError::UnsupportedProtocol {
            name: "MQIsdp".into(),
            level: 3,
        });
        assert_eq!(unsupported.connack_code(Version::V311), 0x01);
        for (e, v5, v311) in [
            (ProtocolError::ClientIdRejected, 0x85, 0x02),
            (ProtocolError::ServerBusy, 0x97, 0x03),
            (ProtocolError::BadCredentials, 0x86, 0x04),
            (ProtocolError::NotAuthorized, 0x87, 0x05),
            (ProtocolError::EnhancedAuthUnsupported, 0x8C, 0x05),
            (
                ProtocolError::WillTopicInvalid(TopicError::EmptyName),
                0x90,
                0x05,
            ),
        ] {
            assert_eq!(e.connack_code(Version::V5), v5, "{e}");
            assert_eq!(e.connack_code(Version::V311), v311, "{e}");
        }
    }

    #[test]
    fn display_says_what_happened() {
        assert_eq!(
            ProtocolError::TopicAliasInvalid(65).to_string(),
            "topic alias 65 outside 1..=64"
        );
        assert_eq!(
            ProtocolError::KeepAliveTimeout(Duration::from_secs(45)).to_string(),
            "no packet within 45s (1.5 × the keepalive)"
        );
    }
}
