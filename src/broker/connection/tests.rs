//! The connection state machine driven through an in-memory pipe: each test client is
//! one end of a `tokio::io::duplex`, the other end served by [`serve`] exactly as a TCP
//! socket would be (as `listener::Stream::Other`), on a broker built from a config
//! snippet. The pipeline is a channel the test reads, so a test settles each message's
//! `Ack` itself, in any order.
//!
//! Waiting is bounded by [`DEADLINE`], never a sleep: "nothing was sent" is shown by a
//! PINGREQ whose PINGRESP comes next (the broker answers packets in order), and "nothing
//! was routed" by the pipeline or an offline subscriber's queue after that barrier.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::{QoS as Qos4, v4};
use rumqttc::v5::mqttbytes::{QoS as Qos5, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Incoming, serve};
use crate::broker::client_cert::CertUser;
use crate::broker::codec::{self, Version};
use crate::broker::listener::Stream;
use crate::broker::{Broker, Shared};
use crate::config::raw::CertName;
use crate::message::Message;
use crate::source::intake::Handoff;

/// How long a test waits for anything it expects.
const DEADLINE: Duration = Duration::from_secs(10);

/// A broker whose connections are in-memory pipes.
struct TestBroker {
    shared: Arc<Shared>,
    handoff: Handoff,
    /// What the rules would receive.
    pipeline: mpsc::Receiver<Message>,
    stop: CancellationToken,
    done: CancellationToken,
    /// The broker's timer task (session expiry, delayed wills), as `serve` runs it.
    timers: JoinHandle<()>,
}

/// A broker with the `embedded:` settings `settings` (indented lines), anonymous clients
/// allowed unless they say otherwise.
async fn broker(settings: &str) -> TestBroker {
    let anonymous = if settings.contains("allow_anonymous") {
        ""
    } else {
        "  allow_anonymous: true\n"
    };
    let yaml = format!("embedded:\n{anonymous}{settings}\n");
    let plan = crate::config::parse(&yaml, "t.yaml", |_| None)
        .map_err(|e| e.to_string())
        .expect("a valid config")
        .embedded
        .expect("embedded");
    let shared = Broker::open(plan).await.unwrap().shared;
    let (out, pipeline) = mpsc::channel(16);
    let handoff = Handoff::new(out);
    let stop = CancellationToken::new();
    let timers = tokio::spawn(crate::broker::timers::run(
        Arc::clone(&shared),
        handoff.clone(),
        stop.clone(),
    ));
    TestBroker {
        shared,
        handoff,
        pipeline,
        stop,
        done: CancellationToken::new(),
        timers,
    }
}

impl TestBroker {
    /// The broker's public face, for its snapshots.
    fn handle(&self) -> Broker {
        Broker {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A new connection, nothing sent on it yet.
    fn open(&self, version: Version) -> Client {
        self.open_with(version, CertUser::None)
    }

    /// A new connection whose TLS client certificate gave `cert`.
    fn open_with(&self, version: Version, cert: CertUser) -> Client {
        self.open_over(version, cert, |theirs| Stream::Other(Box::new(theirs)))
    }

    /// A new connection over the pipe as `transport` wraps the broker's end.
    fn open_over(
        &self,
        version: Version,
        cert: CertUser,
        transport: impl FnOnce(DuplexStream) -> Stream,
    ) -> Client {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve(
            Incoming::Ready(transport(theirs), cert),
            "127.0.0.1:1".parse().unwrap(),
            Arc::clone(&self.shared),
            self.handoff.clone(),
            self.stop.clone(),
            self.done.clone(),
        ));
        Client {
            io: ours,
            buf: BytesMut::new(),
            version,
            task,
        }
    }

    /// A connection past a successful CONNACK.
    async fn connect(&self, version: Version, hello: Hello<'_>) -> Client {
        let mut c = self.open(version);
        c.send(&hello.bytes(version)).await;
        assert!(
            matches!(c.recv().await, Got::ConnAck { code: 0, .. }),
            "connected"
        );
        c
    }

    /// The next message handed to the rules.
    async fn message(&mut self) -> Message {
        tokio::time::timeout(DEADLINE, self.pipeline.recv())
            .await
            .expect("a message for the rules within the deadline")
            .expect("pipeline open")
    }

    /// Nothing more was handed to the rules (call after a barrier).
    fn no_message(&mut self) {
        match self.pipeline.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("expected no message for the rules, got {other:?}"),
        }
    }
}

/// A CONNECT.
#[derive(Default, Clone, Copy)]
struct Hello<'a> {
    client_id: &'a str,
    /// Seconds; 0: none.
    keep_alive: u16,
    login: Option<(&'a str, &'a str)>,
    /// The will's topic (payload "gone", QoS 0).
    will: Option<&'a str>,
    /// 3.1.1 clean session / MQTT 5 clean start is the opposite.
    persistent: bool,
    /// MQTT 5 session expiry interval (seconds).
    session_expiry: Option<u32>,
    /// MQTT 5 will delay interval (seconds).
    will_delay: Option<u32>,
}

impl Hello<'_> {
    fn new(client_id: &str) -> Hello<'_> {
        Hello {
            client_id,
            ..Hello::default()
        }
    }

    fn bytes(&self, version: Version) -> BytesMut {
        let mut buf = BytesMut::new();
        match version {
            Version::V311 => {
                let mut c = v4::Connect::new(self.client_id);
                c.keep_alive = self.keep_alive;
                c.clean_session = !self.persistent;
                if let Some((u, p)) = self.login {
                    c.set_login(u, p);
                }
                c.last_will = self
                    .will
                    .map(|t| v4::LastWill::new(t, "gone", Qos4::AtMostOnce, false));
                v4::Packet::Connect(c).write(&mut buf, usize::MAX).unwrap();
            }
            Version::V5 => {
                let c = v5::Connect {
                    keep_alive: self.keep_alive,
                    client_id: self.client_id.into(),
                    clean_start: !self.persistent,
                    properties: self.session_expiry.map(|e| v5::ConnectProperties {
                        session_expiry_interval: Some(e),
                        ..v5::ConnectProperties::new()
                    }),
                };
                let delay = self.will_delay.map(|d| v5::LastWillProperties {
                    delay_interval: Some(d),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                });
                let will = self
                    .will
                    .map(|t| v5::LastWill::new(t, "gone", Qos5::AtMostOnce, false, delay));
                let login = self.login.map(|(u, p)| v5::Login::new(u, p));
                v5::Packet::Connect(c, will, login)
                    .write(&mut buf, None)
                    .unwrap();
            }
        }
        buf
    }
}

/// A PUBLISH with payload "x"; `alias` is an MQTT 5 topic alias.
fn publish(version: Version, topic: &str, qos: u8, pkid: u16, alias: Option<u16>) -> BytesMut {
    let mut buf = BytesMut::new();
    match version {
        Version::V311 => {
            let qos = rumqttc::mqttbytes::qos(qos).unwrap();
            let mut p = v4::Publish::new(topic, qos, "x");
            p.pkid = pkid;
            v4::Packet::Publish(p).write(&mut buf, usize::MAX).unwrap();
        }
        Version::V5 => {
            let qos = rumqttc::v5::mqttbytes::qos(qos).unwrap();
            let props = alias.map(|a| v5::PublishProperties {
                topic_alias: Some(a),
                ..Default::default()
            });
            let mut p = v5::Publish::new(topic, qos, "x", props);
            p.pkid = pkid;
            v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        }
    }
    buf
}

fn pubrel(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x62, 2, hi, lo]
}

/// A packet from the broker, as far as the tests look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    ConnAck { session_present: bool, code: u8 },
    Publish { topic: String, qos: u8 },
    PubAck { pkid: u16, reason: u8 },
    PubRec { pkid: u16, reason: u8 },
    PubComp { pkid: u16, reason: u8 },
    SubAck { pkid: u16, codes: Vec<u8> },
    PingResp,
    Disconnect { reason: u8 },
    Other(u8),
}

/// Reads a packet the broker encoded (first byte, remaining length, body).
fn parse(frame: BytesMut, version: Version) -> Got {
    let byte1 = frame[0];
    let header = 1 + frame[1..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    let mut body = frame.freeze().slice(header..);
    let ack = |body: &mut bytes::Bytes| {
        let pkid = body.get_u16();
        (pkid, body.first().copied().unwrap_or(0))
    };
    match byte1 >> 4 {
        2 => Got::ConnAck {
            session_present: body[0] & 1 == 1,
            code: body[1],
        },
        3 => {
            let len = body.get_u16() as usize;
            Got::Publish {
                topic: String::from_utf8(body[..len].to_vec()).unwrap(),
                qos: (byte1 >> 1) & 3,
            }
        }
        4 => {
            let (pkid, reason) = ack(&mut body);
            Got::PubAck { pkid, reason }
        }
        5 => {
            let (pkid, reason) = ack(&mut body);
            Got::PubRec { pkid, reason }
        }
        7 => {
            let (pkid, reason) = ack(&mut body);
            Got::PubComp { pkid, reason }
        }
        9 => {
            let pkid = body.get_u16();
            if version == Version::V5 {
                let props = body.get_u8();
                assert!(props < 0x80, "short properties in the tests");
                body.advance(props as usize);
            }
            Got::SubAck {
                pkid,
                codes: body.to_vec(),
            }
        }
        13 => Got::PingResp,
        14 => Got::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        other => Got::Other(other),
    }
}

/// The client end of a connection.
struct Client {
    io: DuplexStream,
    buf: BytesMut,
    version: Version,
    /// The connection's task; it ends when the connection has.
    task: JoinHandle<()>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next packet, or None when the broker closed the connection.
    async fn next(&mut self) -> Option<Got> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(frame) = codec::take_frame(&mut self.buf, 1 << 20).unwrap() {
                    return Some(parse(frame, self.version));
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a packet or the close within the deadline")
    }

    async fn recv(&mut self) -> Got {
        self.next().await.expect("a packet, not the close")
    }

    /// The broker closes the connection after sending nothing more.
    async fn closed(mut self) {
        assert_eq!(self.next().await, None, "closed");
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the connection task ends")
            .unwrap();
    }

    /// The client's end goes away without a DISCONNECT; returns once the broker has ended
    /// the connection (its will and its session's deadlines are settled).
    async fn lose(self) {
        drop(self.io);
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the connection task ends")
            .unwrap();
    }

    /// PINGREQ, and its PINGRESP as the very next packet: everything the broker did for
    /// the packets before it is done, and it sent nothing else meanwhile.
    async fn ping(&mut self) {
        self.send(&[0xC0, 0]).await;
        assert_eq!(self.recv().await, Got::PingResp, "nothing before PINGRESP");
    }
}

/// Waits, in steps of 10 ms, until `f` holds, for at most [`DEADLINE`].
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within the deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_3_1_client_is_told_unacceptable_protocol_version() {
    let b = broker("").await;
    let mut c = b.open(Version::V311);
    // MQTT 3.1: protocol "MQIsdp", level 3.
    let mut connect = vec![0x10, 0, 0, 6];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[3, 2, 0, 10, 0, 1, b'x']);
    connect[1] = (connect.len() - 2) as u8;
    c.send(&connect).await;
    c.io.read_buf(&mut c.buf).await.unwrap();
    assert_eq!(&c.buf[..], &[0x20, 2, 0, 1]);
    c.buf.clear();
    c.closed().await;
}

#[tokio::test]
async fn bad_credentials_and_anonymous_clients_are_refused_with_each_versions_code() {
    let hash = crate::broker::auth::hash_password("right");
    let b = broker(&format!(
        "  allow_anonymous: false\n  users: [{{ username: u, password_hash: \"{hash}\" }}]"
    ))
    .await;
    let wrong = Hello {
        login: Some(("u", "wrong")),
        ..Hello::new("c")
    };
    for (version, hello, code) in [
        (Version::V5, wrong, 0x86),
        (Version::V311, wrong, 0x04),
        (Version::V5, Hello::new("c"), 0x87),
        (Version::V311, Hello::new("c"), 0x05),
    ] {
        let mut c = b.open(version);
        c.send(&hello.bytes(version)).await;
        assert_eq!(
            c.recv().await,
            Got::ConnAck {
                session_present: false,
                code
            },
            "{version:?}"
        );
        c.closed().await;
    }
    let right = Hello {
        login: Some(("u", "right")),
        ..Hello::new("c")
    };
    b.connect(Version::V5, right).await;
}

/// A config reload replaces the users: the next CONNECT is checked against the new ones.
#[tokio::test]
async fn logins_after_set_auth_use_the_new_users() {
    let hash = crate::broker::auth::hash_password("right");
    let b = broker(&format!(
        "  allow_anonymous: false\n  users: [{{ username: u, password_hash: \"{hash}\" }}]"
    ))
    .await;
    let u = Hello {
        login: Some(("u", "right")),
        ..Hello::new("c")
    };
    b.connect(Version::V5, u).await;
    let broker = Broker {
        shared: Arc::clone(&b.shared),
    };
    broker.set_auth(
        vec![(
            "v".into(),
            crate::config::Credential::Argon2(crate::config::plan::Secret(hash.clone())),
        )],
        false,
        crate::config::Acl::default(),
        &Default::default(),
    );
    let mut c = b.open(Version::V5);
    c.send(&u.bytes(Version::V5)).await;
    assert_eq!(
        c.recv().await,
        Got::ConnAck {
            session_present: false,
            code: 0x86
        },
        "u was removed"
    );
    c.closed().await;
    b.connect(
        Version::V5,
        Hello {
            login: Some(("v", "right")),
            ..Hello::new("d")
        },
    )
    .await;
}

/// `tls` with client certificates naming the users; the files are not read here (the
/// connections are pipes, their certificate's name given by the test).
const CERT_USERS: &str = "  allow_anonymous: false\n  tls: { listen: [], cert_file: s.pem, key_file: s.key, client_ca_file: ca.pem, username_from: cn }";

#[tokio::test]
async fn a_certificates_name_is_the_username_and_the_connects_login_is_not_looked_at() {
    let mut b = broker(&format!(
        "{CERT_USERS}\n  acl:\n    - {{ username: device-7, action: allow, publish: [\"d/7/#\"] }}\n    - {{ username: \"*\", action: deny, publish: [\"#\"] }}"
    ))
    .await;
    for (version, login) in [
        (Version::V5, None),
        (Version::V311, Some(("other", "wrong"))),
    ] {
        let mut c = b.open_with(version, CertUser::Name("device-7".into()));
        let hello = Hello {
            login,
            ..Hello::new("dev")
        };
        c.send(&hello.bytes(version)).await;
        assert!(
            matches!(c.recv().await, Got::ConnAck { code: 0, .. }),
            "{version:?}: no password, no user entry, anonymous clients refused"
        );
        let client = b.handle().clients();
        assert_eq!(client[0].username.as_deref(), Some("device-7"));
        // The ACL applies to the certificate's name: its topics are allowed, others not.
        c.send(&publish(version, "d/7/temp", 1, 1, None)).await;
        let m = b.message().await;
        assert_eq!(&*m.topic, "d/7/temp");
        m.ack.settle();
        assert_eq!(c.recv().await, Got::PubAck { pkid: 1, reason: 0 });
        c.send(&publish(version, "d/8/temp", 1, 2, None)).await;
        let denied = if version == Version::V5 { 0x87 } else { 0 };
        assert_eq!(
            c.recv().await,
            Got::PubAck {
                pkid: 2,
                reason: denied
            }
        );
        b.no_message();
    }
}

#[tokio::test]
async fn an_acl_files_user_block_applies_to_a_certificates_name() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user device-7\ntopic write d/7/#\n").unwrap();
    let mut b = broker(&format!("{CERT_USERS}\n  acl_file: {}", acl.display())).await;
    let mut c = b.open_with(Version::V5, CertUser::Name("device-7".into()));
    c.send(&Hello::new("dev").bytes(Version::V5)).await;
    assert!(matches!(c.recv().await, Got::ConnAck { code: 0, .. }));
    c.send(&publish(Version::V5, "d/8/temp", 1, 1, None)).await;
    assert_eq!(
        c.recv().await,
        Got::PubAck {
            pkid: 1,
            reason: 0x87
        }
    );
    c.send(&publish(Version::V5, "d/7/temp", 1, 2, None)).await;
    b.message().await.ack.settle();
    assert_eq!(c.recv().await, Got::PubAck { pkid: 2, reason: 0 });
}

#[tokio::test]
async fn a_certificate_without_the_name_is_refused_as_bad_credentials() {
    let b = broker(CERT_USERS).await;
    for (version, code) in [(Version::V5, 0x86), (Version::V311, 0x04)] {
        let mut c = b.open_with(version, CertUser::Unnamed(CertName::Cn));
        let hello = Hello {
            login: Some(("u", "p")),
            ..Hello::new("c")
        };
        c.send(&hello.bytes(version)).await;
        assert_eq!(
            c.recv().await,
            Got::ConnAck {
                session_present: false,
                code
            }
        );
        c.closed().await;
    }
    // Without a certificate (one not required), the CONNECT logs in as usual: here
    // anonymous clients are refused.
    let mut c = b.open(Version::V5);
    c.send(&Hello::new("c").bytes(Version::V5)).await;
    assert!(matches!(c.recv().await, Got::ConnAck { code: 0x87, .. }));
}

#[tokio::test]
async fn an_empty_client_id_needs_a_clean_session_on_3_1_1() {
    let b = broker("").await;
    let mut c = b.open(Version::V311);
    let hello = Hello {
        persistent: true,
        ..Hello::new("")
    };
    c.send(&hello.bytes(Version::V311)).await;
    assert!(matches!(c.recv().await, Got::ConnAck { code: 0x02, .. }));
    c.closed().await;
}

/// A client need not wait for the CONNACK (3.1.4 in both versions): what it sent with
/// the CONNECT is handled without waiting for more input (it used to wait in the buffer).
#[tokio::test]
async fn packets_sent_with_the_connect_are_handled_at_once() {
    let mut b = broker("").await;
    for version in [Version::V311, Version::V5] {
        let mut c = b.open(version);
        let hello = Hello::new("eager").bytes(version);
        c.send(&[hello, publish(version, "t/eager", 0, 0, None)].concat())
            .await;
        assert!(matches!(c.recv().await, Got::ConnAck { code: 0, .. }));
        assert_eq!(&*b.message().await.topic, "t/eager");
    }
}

#[tokio::test]
async fn qos1_pubacks_wait_for_settlement_and_go_out_in_arrival_order() {
    let mut b = broker("").await;
    let mut c = b.connect(Version::V311, Hello::new("c")).await;
    for pkid in 1..=3 {
        c.send(&publish(Version::V311, "t/a", 1, pkid, None)).await;
    }
    let mut acks = Vec::new();
    let mut ids = Vec::new();
    for _ in 1..=3 {
        let m = b.message().await;
        ids.push(m.client_id.expect("the publisher's id"));
        acks.push(m.ack);
    }
    assert_eq!(&*ids[0], "c");
    assert!(
        ids.iter().all(|id| Arc::ptr_eq(id, &ids[0])),
        "a connection's messages share its id"
    );
    c.ping().await;
    let first = acks.remove(0);
    // Settled out of order: the third, then the second. Nothing may go out yet.
    acks.pop().unwrap().settle();
    acks.pop().unwrap().settle();
    c.ping().await;
    first.settle();
    for pkid in 1..=3 {
        assert_eq!(c.recv().await, Got::PubAck { pkid, reason: 0 });
    }
}

/// An offline persistent subscriber to `filter` (QoS 1, so that its queue keeps what
/// is routed to it), to count routed messages.
async fn offline_subscriber(b: &TestBroker, filter: &str) {
    let hello = Hello {
        persistent: true,
        ..Hello::new("sub")
    };
    let mut s = b.connect(Version::V311, hello).await;
    s.send(&subscribe_v311(1, filter)).await;
    assert_eq!(
        s.recv().await,
        Got::SubAck {
            pkid: 1,
            codes: vec![1]
        }
    );
    s.send(&[0xE0, 0]).await;
    s.closed().await;
}

fn queued(b: &TestBroker, client_id: &str) -> usize {
    b.shared.lock().sessions[client_id].queued()
}

#[tokio::test]
async fn qos2_duplicates_get_pubrec_again_and_are_never_routed_twice() {
    let mut b = broker("").await;
    offline_subscriber(&b, "t/#").await;
    let mut c = b.connect(Version::V311, Hello::new("c")).await;
    let p = publish(Version::V311, "t/a", 2, 7, None);
    c.send(&p).await;
    let msg = b.message().await;
    // Resent while the first is settling: ignored.
    c.send(&p).await;
    c.ping().await;
    b.no_message();
    msg.ack.settle();
    assert_eq!(c.recv().await, Got::PubRec { pkid: 7, reason: 0 });
    // Resent after the PUBREC (lost on its way): PUBREC again.
    c.send(&p).await;
    assert_eq!(c.recv().await, Got::PubRec { pkid: 7, reason: 0 });
    c.ping().await;
    b.no_message();
    assert_eq!(queued(&b, "sub"), 1, "routed once");
}

#[tokio::test]
async fn pubrel_gets_pubcomp_and_frees_the_packet_id() {
    let mut b = broker("").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, "t/a", 2, 7, None)).await;
    b.message().await.ack.settle();
    assert_eq!(c.recv().await, Got::PubRec { pkid: 7, reason: 0 });
    c.send(&pubrel(7)).await;
    assert_eq!(c.recv().await, Got::PubComp { pkid: 7, reason: 0 });
    assert!(b.shared.lock().sessions["c"].incoming_qos2.is_empty());
    // The id is free: the same id is a new message.
    c.send(&publish(Version::V5, "t/b", 2, 7, None)).await;
    assert_eq!(&*b.message().await.topic, "t/b");
}

#[tokio::test]
async fn v5_topic_alias_0_or_above_the_maximum_is_disconnect_0x94() {
    let b = broker("").await;
    for alias in [0, 65] {
        let mut c = b.connect(Version::V5, Hello::new("c")).await;
        c.send(&publish(Version::V5, "t/a", 0, 0, Some(alias)))
            .await;
        assert_eq!(c.recv().await, Got::Disconnect { reason: 0x94 });
        c.closed().await;
    }
}

#[tokio::test]
async fn v5_topic_aliases_name_their_topic_and_an_unknown_one_is_a_protocol_error() {
    let mut b = broker("").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    c.send(&publish(Version::V5, "t/a", 0, 0, Some(1))).await;
    c.send(&publish(Version::V5, "", 0, 0, Some(1))).await;
    assert_eq!(&*b.message().await.topic, "t/a");
    assert_eq!(&*b.message().await.topic, "t/a");
    c.send(&publish(Version::V5, "", 0, 0, Some(2))).await;
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x82 });
    c.closed().await;
}

#[tokio::test]
async fn v5_publishing_beyond_the_receive_maximum_is_disconnect_0x93() {
    let mut b = broker("  max_inflight: 2").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    for pkid in 1..=2 {
        c.send(&publish(Version::V5, "t/a", 1, pkid, None)).await;
    }
    // Both unsettled; the third is one too many.
    let (first, second) = (b.message().await, b.message().await);
    c.send(&publish(Version::V5, "t/a", 1, 3, None)).await;
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x93 });
    c.closed().await;
    b.no_message();
    drop((first, second));
}

/// The pipeline full (it takes 16): the client's QoS 1 messages wait in its intake and
/// the read loop goes on, so the client still gets its PINGRESP, and a QoS 0 message is
/// dropped and counted. As the rules take messages they move on in order, and each is
/// acknowledged once it settles. (The connection used to wait for room inside its read
/// loop, deaf to pings and blind to settlements.)
#[tokio::test]
async fn a_full_pipeline_holds_messages_back_without_stopping_the_connection() {
    let mut b = broker("  max_inflight: 100").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    for pkid in 1..=40 {
        c.send(&publish(Version::V5, &format!("t/{pkid}"), 1, pkid, None))
            .await;
    }
    c.send(&publish(Version::V5, "t/qos0", 0, 0, None)).await;
    c.ping().await;
    let dropped = &b.handoff.stats().dropped;
    assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    for pkid in 1..=40 {
        let m = b.message().await;
        assert_eq!(&*m.topic, format!("t/{pkid}"));
        m.ack.settle();
    }
    for pkid in 1..=40 {
        assert_eq!(c.recv().await, Got::PubAck { pkid, reason: 0 });
    }
    b.no_message();
}

#[tokio::test]
async fn a_publish_the_acl_refuses_is_acknowledged_without_the_message() {
    let mut b = broker("  acl: [{ username: \"*\", action: deny, publish: [\"secret/#\"] }]").await;
    for (version, client_id, reason) in [(Version::V5, "c5", 0x87), (Version::V311, "c3", 0)] {
        let mut c = b.connect(version, Hello::new(client_id)).await;
        c.send(&publish(version, "secret/a", 1, 5, None)).await;
        assert_eq!(c.recv().await, Got::PubAck { pkid: 5, reason });
        b.no_message();
    }
    assert_eq!(b.handle().stats().publish_denied, 2);
}

#[tokio::test]
async fn clients_lists_connected_and_offline_sessions_and_stats_count_them() {
    let b = broker("").await;
    offline_subscriber(&b, "t/#").await;
    let before = jiff::Timestamp::now();
    let mut live = b.connect(Version::V5, Hello::new("live")).await;
    live.ping().await;
    let clients = b.handle().clients();
    assert_eq!(clients.len(), 2, "{clients:?}");
    let (l, sub) = (&clients[0], &clients[1]);
    assert_eq!(l.client_id, "live");
    let conn = l.connection.as_ref().expect("connected");
    assert_eq!(conn.peer, "127.0.0.1:1".parse().unwrap());
    assert_eq!(conn.version.name(), "5.0");
    assert!(conn.since >= before, "{conn:?}");
    assert!(l.subscriptions.is_empty());
    assert_eq!(sub.client_id, "sub");
    assert_eq!(sub.connection, None, "offline");
    assert_eq!(sub.subscriptions, vec![("t/#".to_string(), 1)]);
    assert_eq!(sub.queued, 0);
    let stats = b.handle().stats();
    assert_eq!(
        (stats.sessions, stats.subscriptions, stats.retained),
        (2, 1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn keepalive_expiry_is_disconnect_0x8d_after_one_and_a_half_intervals() {
    let b = broker("").await;
    for version in [Version::V5, Version::V311] {
        let hello = Hello {
            keep_alive: 2,
            ..Hello::new("c")
        };
        let mut c = b.connect(version, hello).await;
        let start = tokio::time::Instant::now();
        match version {
            // Time only passes here when nothing else can run: the expiry is the only
            // timer the connection waits on.
            Version::V5 => assert_eq!(c.recv().await, Got::Disconnect { reason: 0x8D }),
            Version::V311 => assert_eq!(c.next().await, None, "closed without a DISCONNECT"),
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
            "{version:?}: {waited:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_keepalive_counts_from_the_last_packet() {
    // The loop's one timer is set for the first expiry and moved only closer: packets
    // within the keepalive make it fire early, and it is set again from the last one.
    let b = broker("").await;
    let hello = Hello {
        keep_alive: 2,
        ..Hello::new("c")
    };
    let mut c = b.connect(Version::V5, hello).await;
    let start = tokio::time::Instant::now();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.ping().await;
    }
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x8D });
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_session_taken_over_disconnects_the_old_connection_with_0x8e() {
    let b = broker("").await;
    let mut old = b.connect(Version::V5, Hello::new("dev")).await;
    let _new = b.connect(Version::V5, Hello::new("dev")).await;
    assert_eq!(old.recv().await, Got::Disconnect { reason: 0x8E });
    old.closed().await;
}

#[tokio::test]
async fn shutting_down_disconnects_with_0x8b() {
    let b = broker("").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    b.done.cancel();
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x8B });
    c.closed().await;
}

#[tokio::test]
async fn the_will_goes_out_when_the_connection_is_lost_not_after_a_normal_disconnect() {
    let mut b = broker("").await;
    let with_will = Hello {
        will: Some("will/c"),
        ..Hello::new("c")
    };
    for version in [Version::V311, Version::V5] {
        let mut c = b.connect(version, with_will).await;
        c.send(&[0xE0, 0]).await;
        c.closed().await;
        b.no_message();
    }
    // MQTT 5 DISCONNECT 0x04: disconnect with the will.
    let mut c = b.connect(Version::V5, with_will).await;
    c.send(&[0xE0, 1, 0x04]).await;
    let will = b.message().await;
    assert_eq!((&*will.topic, &will.payload[..]), ("will/c", &b"gone"[..]));
    c.closed().await;
    // Lost: the client's end is gone without a DISCONNECT.
    let c = b.connect(Version::V311, with_will).await;
    drop(c.io);
    assert_eq!(&*b.message().await.topic, "will/c");
    tokio::time::timeout(DEADLINE, c.task)
        .await
        .expect("the connection task ends")
        .unwrap();
}

/// A packet both specifications call malformed closes its own connection (an MQTT 5
/// client is told 0x81 first), is not routed, and leaves the other clients alone.
#[tokio::test]
async fn a_malformed_packet_closes_that_connection_only() {
    let mut b = broker("").await;
    let mut bystander = b.connect(Version::V5, Hello::new("bystander")).await;
    #[rustfmt::skip]
    let cases: [(Version, &[u8]); 4] = [
        // QoS 0 PUBLISH with DUP [MQTT-3.3.1-2]: it must not reach the rules.
        (Version::V311, &[0x38, 5, 0, 3, b't', b'/', b'd']),
        (Version::V5, &[0x38, 6, 0, 3, b't', b'/', b'd', 0]),
        // SUBSCRIBE with packet identifier 0 [MQTT-2.2.1-3].
        (Version::V5, &[0x82, 7, 0, 0, 0, 0, 1, b't', 0]),
        // Reserved subscription option bits [MQTT-3.8.3-4].
        (Version::V311, &[0x82, 6, 0, 1, 0, 1, b't', 0x04]),
    ];
    for (version, bytes) in cases {
        let mut c = b.connect(version, Hello::new("offender")).await;
        c.send(bytes).await;
        if version == Version::V5 {
            assert_eq!(
                c.recv().await,
                Got::Disconnect { reason: 0x81 },
                "{bytes:?}"
            );
        }
        c.closed().await;
        bystander.ping().await;
    }
    bystander
        .send(&publish(Version::V5, "t/ok", 0, 0, None))
        .await;
    assert_eq!(
        &*b.message().await.topic,
        "t/ok",
        "only the bystander's message"
    );
}

/// A v5 SUBSCRIBE of `filters` at QoS 1.
/// A 3.1.1 SUBSCRIBE to `filter` at QoS 1.
fn subscribe_v311(pkid: u16, filter: &str) -> BytesMut {
    let mut subscribe = v4::Subscribe::new(filter, Qos4::AtLeastOnce);
    subscribe.pkid = pkid;
    let mut buf = BytesMut::new();
    v4::Packet::Subscribe(subscribe)
        .write(&mut buf, usize::MAX)
        .unwrap();
    buf
}

fn subscribe_v5(pkid: u16, filters: &[&str]) -> BytesMut {
    let filters = filters
        .iter()
        .map(|f| v5::Filter::new(*f, Qos5::AtLeastOnce))
        .collect::<Vec<_>>();
    let mut buf = BytesMut::new();
    v5::Packet::Subscribe(v5::Subscribe::new_many(filters, None))
        .write(&mut buf, None)
        .unwrap();
    // rumqttc numbers packets itself; the id is the two bytes after the fixed header.
    buf[2..4].copy_from_slice(&pkid.to_be_bytes());
    buf
}

/// A subscriber that never reads is closed once its socket has taken nothing for
/// `send_timeout`, while a subscriber that reads gets every message and goes on.
#[tokio::test]
async fn a_client_that_does_not_read_is_closed_after_send_timeout() {
    let mut b = broker("  send_timeout: 300ms\n  max_queued_messages: 100000").await;
    let mut pipeline = std::mem::replace(&mut b.pipeline, mpsc::channel(1).1);
    tokio::spawn(async move { while pipeline.recv().await.is_some() {} });
    let mut lazy = b.connect(Version::V5, Hello::new("lazy")).await;
    let mut reader = b.connect(Version::V5, Hello::new("reader")).await;
    for c in [&mut lazy, &mut reader] {
        c.send(&subscribe_v5(1, &["t/#"])).await;
        assert!(matches!(c.recv().await, Got::SubAck { .. }));
    }
    let mut publisher = b.connect(Version::V311, Hello::new("p")).await;
    // 256 KiB: more than the lazy client's pipe (64 KiB) and outbox hold.
    let mut big = BytesMut::new();
    v4::Packet::Publish(v4::Publish::new(
        "t/big",
        Qos4::AtMostOnce,
        vec![b'x'; 1024],
    ))
    .write(&mut big, usize::MAX)
    .unwrap();
    for _ in 0..256 {
        publisher.send(&big).await;
        assert!(matches!(reader.recv().await, Got::Publish { .. }));
    }
    tokio::time::timeout(DEADLINE, &mut lazy.task)
        .await
        .expect("the client that does not read is closed")
        .unwrap();
    publisher.send(&big).await;
    assert!(matches!(reader.recv().await, Got::Publish { .. }));
    reader.ping().await;
}

/// A transport that keeps what is written until it is flushed (TLS keeps the records the
/// socket did not take) gets every packet at once, the last one too: the broker flushes
/// what it writes.
#[tokio::test]
async fn packets_written_to_a_transport_that_buffers_are_flushed() {
    let mut b = broker("").await;
    let buffered = |theirs| Stream::Other(Box::new(tokio::io::BufWriter::new(theirs)));
    let mut sub = b.open_over(Version::V311, CertUser::None, buffered);
    sub.send(&Hello::new("s").bytes(Version::V311)).await;
    assert!(matches!(sub.recv().await, Got::ConnAck { code: 0, .. }));
    sub.send(&subscribe_v311(1, "t")).await;
    assert!(matches!(sub.recv().await, Got::SubAck { .. }));
    let mut publisher = b.connect(Version::V311, Hello::new("p")).await;
    publisher
        .send(&publish(Version::V311, "t", 1, 1, None))
        .await;
    let routed = b.message().await;
    routed.ack.settle();
    assert_eq!(publisher.recv().await, Got::PubAck { pkid: 1, reason: 0 });
    let got = sub.recv().await;
    assert_eq!(
        got,
        Got::Publish {
            topic: "t".into(),
            qos: 1
        }
    );
    sub.ping().await;
}

/// A client publishing faster than `max_publish_rate` is read at that rate, not closed:
/// 30 PUBLISHes at 10 per second (one second's worth at once, then ten a second) are
/// answered after about two seconds, while another client is served at once meanwhile.
#[tokio::test]
async fn a_client_over_max_publish_rate_is_slowed_to_it_not_closed() {
    let mut b = broker("  max_publish_rate: 10").await;
    let mut pipeline = std::mem::replace(&mut b.pipeline, mpsc::channel(1).1);
    tokio::spawn(async move {
        while let Some(m) = pipeline.recv().await {
            m.ack.settle();
        }
    });
    let mut fast = b.connect(Version::V311, Hello::new("fast")).await;
    let mut other = b.connect(Version::V311, Hello::new("other")).await;
    let started = tokio::time::Instant::now();
    let mut burst = BytesMut::new();
    for pkid in 1..=30 {
        burst.extend_from_slice(&publish(Version::V311, "t/fast", 1, pkid, None));
    }
    fast.send(&burst).await;
    other.ping().await;
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the other client is not held up: {:?}",
        started.elapsed()
    );
    for pkid in 1..=30 {
        assert_eq!(fast.recv().await, Got::PubAck { pkid, reason: 0 });
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1800) && elapsed < Duration::from_secs(5),
        "30 at 10 per second, 10 of them at once: {elapsed:?}"
    );
    fast.ping().await;
}

/// A 3.1.1 client without a keepalive that sends a packet a byte at a time is closed
/// 1.5 × `max_keepalive` after its last whole packet; an idle client without a keepalive
/// and nothing half-sent stays connected.
#[tokio::test]
async fn a_packet_trickling_in_is_cut_off_after_one_and_a_half_max_keepalive() {
    let b = broker("  max_keepalive: 1s").await;
    let mut idle = b.connect(Version::V311, Hello::new("idle")).await;
    let mut slow = b.connect(Version::V311, Hello::new("slow")).await;
    let packet = publish(Version::V311, &"t/".repeat(50), 0, 0, None);
    let started = tokio::time::Instant::now();
    let mut next = 0;
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                r = slow.io.read_buf(&mut slow.buf) => return r,
                _ = tokio::time::sleep(Duration::from_millis(100)), if next < packet.len() - 1 => {
                    slow.io.write_all(&packet[next..=next]).await.unwrap();
                    next += 1;
                }
            }
        }
    })
    .await
    .expect("closed before the packet is whole");
    assert!(
        matches!(closed, Ok(0)),
        "closed, with nothing sent: {closed:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before 1.5 × max_keepalive: {:?}",
        started.elapsed()
    );
    assert!(next < packet.len() - 1, "cut off while the packet trickled");
    idle.ping().await;
}

#[tokio::test]
async fn subscriptions_and_topics_beyond_the_configured_limits_are_refused() {
    let b = broker("  max_subscriptions: 2\n  max_topic_levels: 3\n  max_topic_length: 16").await;
    let mut c = b.connect(Version::V5, Hello::new("c")).await;
    // The third filter is beyond max_subscriptions (quota exceeded); a filter too deep or
    // too long is refused as invalid; the others are granted.
    c.send(&subscribe_v5(
        1,
        &["a", "b", "c", "a/b/c/d", "a-very-long-filter"],
    ))
    .await;
    assert_eq!(
        c.recv().await,
        Got::SubAck {
            pkid: 1,
            codes: vec![1, 1, 0x97, 0x8F, 0x8F]
        }
    );
    // Subscribing again to a filter held is not a new subscription.
    c.send(&subscribe_v5(2, &["a", "x/y/z"])).await;
    assert_eq!(
        c.recv().await,
        Got::SubAck {
            pkid: 2,
            codes: vec![1, 0x97]
        }
    );
    // A PUBLISH to a topic too deep is an invalid topic name.
    c.send(&publish(Version::V5, "a/b/c/d", 0, 0, None)).await;
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x90 });
    c.closed().await;
    // So is a will's topic: the CONNECT is refused.
    let mut w = b.open(Version::V5);
    let hello = Hello {
        will: Some("w/x/y/z"),
        ..Hello::new("w")
    };
    w.send(&hello.bytes(Version::V5)).await;
    assert!(
        matches!(w.recv().await, Got::ConnAck { code: 0x90, .. }),
        "will topic beyond max_topic_levels"
    );
}

/// A connection that sends nothing, or only part of a CONNECT, is closed once
/// `connect_timeout` has passed; a client connecting meanwhile is served.
#[tokio::test]
async fn a_connection_without_a_connect_is_closed_after_connect_timeout() {
    let b = broker("  connect_timeout: 200ms").await;
    let silent = b.open(Version::V311);
    let mut partial = b.open(Version::V311);
    let hello = Hello::new("slow").bytes(Version::V311);
    partial.send(&hello[..hello.len() - 1]).await;
    let mut ok = b.connect(Version::V5, Hello::new("ok")).await;
    let started = tokio::time::Instant::now();
    silent.closed().await;
    partial.closed().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed by connect_timeout, not by some later limit"
    );
    ok.ping().await;
}

mod conformance;
mod timers;
