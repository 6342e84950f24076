//! Listeners: plain TCP, TLS (rustls), and WebSocket (`/mqtt`, subprotocol `mqtt`) over
//! either. Each accepted socket becomes one byte stream ([`Io`]) that the connection task
//! reads MQTT from, whatever carried it.
//!
//! A WebSocket connection is bridged to an in-memory pipe by a small task: binary
//! messages in are written to the pipe, bytes out are sent as binary messages. MQTT
//! packets may span messages or share one (MQTT 5 §6), so the connection's own framing is
//! all that is needed. The TLS and WebSocket handshakes run on the connection's task
//! (never on the accept loop), bounded by the CONNECT timeout.
//!
//! With `tls.client_ca_file`, both TLS transports (`mqtts` and `wss`) ask for a client
//! certificate ([`super::client_cert`]); the name it gives, if any, goes with the stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::client_cert::{self, CertUser};
use crate::config::EmbeddedPlan;
use crate::config::plan::TlsPlan;
use crate::config::raw::CertName;

/// Why the listeners cannot be set up; each error names the address or file to change.
/// The cause is part of the message (not a `source`), followed by a hint where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("embedded broker: cannot listen on {addr}: {error}{hint}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
        /// How to move the address, when it is taken.
        hint: String,
    },
    #[error("embedded.tls.cert_file {}: cannot read certificates: {error}", path.display())]
    ReadCertificates {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("embedded.tls.cert_file {}: no certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("embedded.tls.key_file {}: cannot read a private key: {error}", path.display())]
    ReadKey {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error(
        "embedded.tls: {} and {} do not make a usable certificate: {error}",
        cert.display(),
        key.display()
    )]
    UnusableCertificate {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    /// `message` names the file.
    #[error("embedded.tls.client_ca_file: {message}")]
    ClientCa { message: String },
}

/// Why a connection's TLS or WebSocket handshake failed (logged; the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] std::io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
}

/// A byte stream over TLS or WebSocket.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A client's byte stream, whatever the transport. Plain TCP (the common case) is kept
/// apart so that its halves are split without the lock `tokio::io::split` takes on every
/// read and write.
pub enum Stream {
    Tcp(TcpStream),
    Other(Box<dyn Io>),
}

impl Stream {
    pub fn split(self) -> (StreamReader, StreamWriter) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (StreamReader::Tcp(r), StreamWriter::Tcp(w))
            }
            Stream::Other(s) => {
                let (r, w) = tokio::io::split(s);
                (StreamReader::Other(r), StreamWriter::Other(w))
            }
        }
    }
}

/// The reading half of a [`Stream`].
pub enum StreamReader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Other(tokio::io::ReadHalf<Box<dyn Io>>),
}

/// The writing half of a [`Stream`].
pub enum StreamWriter {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Other(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            StreamReader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            StreamReader::Other(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            StreamWriter::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            StreamWriter::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            StreamWriter::Tcp(w) => Pin::new(w).poll_flush(cx),
            StreamWriter::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            StreamWriter::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            StreamWriter::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// What runs on top of an accepted TCP socket.
#[derive(Clone)]
pub struct Transport {
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// What names the user in a client certificate (`tls.username_from`).
    username_from: Option<CertName>,
    websocket: bool,
    /// Largest WebSocket message or frame accepted.
    max_message: usize,
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match (self.websocket, self.tls.is_some()) {
            (false, false) => "mqtt",
            (false, true) => "mqtts",
            (true, false) => "ws",
            (true, true) => "wss",
        }
    }

    /// The handshakes of this transport, then the stream MQTT flows in and who the
    /// client's certificate says it is.
    pub async fn open(&self, socket: TcpStream) -> Result<(Stream, CertUser), HandshakeError> {
        let (stream, user): (Box<dyn Io>, _) = match &self.tls {
            None if !self.websocket => return Ok((Stream::Tcp(socket), CertUser::None)),
            None => (Box::new(socket), CertUser::None),
            Some(acceptor) => {
                let tls = acceptor.accept(socket).await?;
                let user = client_cert::user(tls.get_ref().1, self.username_from);
                if !self.websocket {
                    return Ok((Stream::Other(Box::new(tls)), user));
                }
                (Box::new(tls), user)
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message));
        let ws =
            tokio_tungstenite::accept_hdr_async_with_config(stream, check_request, Some(config))
                .await
                .map_err(Box::new)?;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(bridge(ws, theirs));
        Ok((Stream::Other(Box::new(ours)), user))
    }
}

/// A bound listener with its transport.
pub struct Listener {
    pub tcp: TcpListener,
    pub transport: Transport,
}

/// Binds every listener of `plan`; errors name the address or the certificate file.
pub async fn bind_all(plan: &EmbeddedPlan) -> Result<Vec<Listener>, ListenError> {
    let max_message = plan.max_packet_size.max(64 * 1024);
    let plain = Transport {
        tls: None,
        username_from: None,
        websocket: false,
        max_message,
    };
    let tls = plan.tls.as_ref().map(acceptor).transpose()?;
    let username_from = plan
        .tls
        .as_ref()
        .and_then(|t| t.client_auth.as_ref())
        .and_then(|c| c.username_from);
    // Each address with its transport and what would move it elsewhere.
    let mut wanted: Vec<(SocketAddr, Transport, Setting)> = plan
        .listen
        .iter()
        .map(|a| {
            let setting = match &plan.listen_var {
                Some(var) => Setting::Variable(var),
                None => Setting::Field("embedded.listen"),
            };
            (*a, plain.clone(), setting)
        })
        .collect();
    if let Some(t) = &plan.tls {
        for a in &t.listen {
            let transport = Transport {
                tls: tls.clone(),
                username_from,
                ..plain.clone()
            };
            wanted.push((*a, transport, Setting::Field("embedded.tls.listen")));
        }
    }
    if let Some(w) = &plan.websocket {
        for a in &w.listen {
            let transport = Transport {
                tls: if w.tls { tls.clone() } else { None },
                username_from: if w.tls { username_from } else { None },
                websocket: true,
                max_message,
            };
            wanted.push((*a, transport, Setting::Field("embedded.websocket.listen")));
        }
    }
    let mut out = Vec::new();
    for (addr, transport, setting) in wanted {
        out.push(Listener {
            tcp: bind(addr, setting).await?,
            transport,
        });
    }
    Ok(out)
}

/// Where a listener's address comes from, for the hint when it is taken.
enum Setting<'a> {
    /// A config field such as `embedded.tls.listen`.
    Field(&'static str),
    /// The environment variable the address was written as.
    Variable(&'a str),
}

/// Binds one address; the error names it (and, when it is taken, how to move it).
async fn bind(addr: SocketAddr, setting: Setting<'_>) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr).await.map_err(|error| {
        let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
            let change = match setting {
                Setting::Field(field) => format!("change `{field}`"),
                Setting::Variable(var) => {
                    let port = addr.port().checked_add(1).unwrap_or(addr.port() - 1);
                    format!("set {var}={}", SocketAddr::new(addr.ip(), port))
                }
            };
            format!(" (another broker running? {change}, or stop it)")
        } else {
            String::new()
        };
        ListenError::Bind { addr, error, hint }
    })
}

/// The TLS server config from the PEM files (and the client CAs, with mutual TLS).
fn acceptor(t: &TlsPlan) -> Result<tokio_rustls::TlsAcceptor, ListenError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|error| ListenError::ReadCertificates {
            path: t.cert_file.clone(),
            error,
        })?;
    if certs.is_empty() {
        return Err(ListenError::NoCertificate {
            path: t.cert_file.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file).map_err(|error| ListenError::ReadKey {
        path: t.key_file.clone(),
        error,
    })?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &t.client_auth {
        Some(c) => builder.with_client_cert_verifier(client_cert::verifier(c)?),
        None => builder.with_no_client_auth(),
    };
    let config =
        builder
            .with_single_cert(certs, key)
            .map_err(|error| ListenError::UnusableCertificate {
                cert: t.cert_file.clone(),
                key: t.key_file.clone(),
                error,
            })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The WebSocket upgrade: path `/mqtt`; the `mqtt` subprotocol is chosen when offered
/// (`mqttv3.1` too, for old clients); a client offering none is served anyway.
#[allow(clippy::result_large_err)] // the callback type is tungstenite's
fn check_request(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != "/mqtt" {
        let mut r = ErrorResponse::new(Some("MQTT is served on /mqtt\n".into()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Err(r);
    }
    let offered = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| *p == "mqtt" || *p == "mqttv3.1")
        .map(str::to_string);
    if let Some(p) = offered
        && let Ok(v) = HeaderValue::from_str(&p)
    {
        resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
    }
    Ok(resp)
}

/// Copies between a WebSocket and the connection's pipe until either side ends.
async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, pipe: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ws_out, mut ws_in) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let inbound = async move {
        while let Some(Ok(msg)) = ws_in.next().await {
            match msg {
                WsMessage::Binary(b) if wr.write_all(&b).await.is_err() => break,
                WsMessage::Binary(_) => {}
                // MQTT over WebSocket is binary only [MQTT-6.0.0-1]: close.
                WsMessage::Text(_) | WsMessage::Close(_) => break,
                _ => {} // ping/pong: answered by tungstenite
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = WsMessage::Binary(buf[..n].to_vec().into());
                    if ws_out.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = ws_out.close().await;
    };
    tokio::pin!(inbound);
    tokio::select! {
        _ = &mut inbound => {}
        _ = outbound => {
            // The connection ended; give the client a moment to answer the close.
            let _ = tokio::time::timeout(Duration::from_secs(5), inbound).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(embedded: &str) -> Result<EmbeddedPlan, String> {
        let yaml = format!("embedded:\n  allow_anonymous: true\n{embedded}\n");
        crate::config::parse(&yaml, "t.yaml", |_| None)
            .map(|p| p.embedded.expect("embedded"))
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn certificate_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let p = plan(&format!(
            "  listen: []\n  tls: {{ listen: 127.0.0.1:0, cert_file: {m}, key_file: {m} }}",
            m = missing.display()
        ))
        .unwrap();
        let err = bind_all(&p).await.err().expect("fails").to_string();
        assert!(
            err.contains("embedded.tls.cert_file") && err.contains("missing.pem"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let p = plan(&format!(
            "  listen: []\n  tls: {{ listen: 127.0.0.1:0, cert_file: {e}, key_file: {e} }}",
            e = empty.display()
        ))
        .unwrap();
        let err = bind_all(&p).await.err().expect("fails").to_string();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[tokio::test]
    async fn a_taken_address_says_what_moves_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let next = SocketAddr::new(addr.ip(), addr.port() + 1);
        for (listen, hint) in [
            (
                format!("  listen: ${{MQBRIDGE_LISTEN:-{addr}}}"),
                format!("set MQBRIDGE_LISTEN={next}"),
            ),
            (
                format!("  listen: {addr}"),
                "change `embedded.listen`".into(),
            ),
            (
                format!("  listen: []\n  websocket: {{ listen: \"${{WS:-{addr}}}\" }}"),
                "change `embedded.websocket.listen`".into(),
            ),
        ] {
            let err = bind_all(&plan(&listen).unwrap())
                .await
                .err()
                .expect("fails");
            assert!(
                err.to_string().starts_with(&format!(
                    "embedded broker: cannot listen on {addr}: Address already in use"
                )),
                "{err}"
            );
            assert!(
                err.to_string()
                    .ends_with(&format!("(another broker running? {hint}, or stop it)")),
                "{err}"
            );
        }
    }

    /// [MQTT-6.0.0-2]: WebSocket messages are one byte stream to the connection (a
    /// packet split over two, two packets in one); what it writes goes out in binary
    /// messages; [MQTT-6.0.0-1]: a text message ends its input.
    #[tokio::test]
    async fn websocket_messages_are_one_byte_stream_and_a_text_message_closes() {
        use tokio::time::timeout;
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::protocol::Role;
        let wait = Duration::from_secs(10);
        let (server_io, client_io) = tokio::io::duplex(4096);
        let (pipe, mut mqtt) = tokio::io::duplex(4096);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let bridged = tokio::spawn(bridge(server, pipe));

        for part in [&[0xC0][..], &[0x00, 0xC0, 0x00, 0xC0, 0x00]] {
            let msg = WsMessage::Binary(part.to_vec().into());
            client.send(msg).await.unwrap();
        }
        let mut got = [0u8; 6];
        let read = timeout(wait, mqtt.read_exact(&mut got)).await;
        read.expect("three PINGREQs in time").unwrap();
        assert_eq!(got, [0xC0, 0, 0xC0, 0, 0xC0, 0]);

        mqtt.write_all(&[0xD0, 0]).await.unwrap();
        let out = timeout(wait, client.next())
            .await
            .expect("a message in time");
        assert_eq!(
            out.unwrap().unwrap(),
            WsMessage::Binary(vec![0xD0, 0].into())
        );

        client.send(WsMessage::Text("hello".into())).await.unwrap();
        let mut rest = Vec::new();
        let read = timeout(wait, mqtt.read_to_end(&mut rest)).await;
        read.expect("the input ends in time").unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        drop(mqtt);
        timeout(wait, bridged)
            .await
            .expect("the bridge ends in time")
            .unwrap();
    }

    #[test]
    fn listener_settings_are_validated() {
        let err = plan("  websocket: { listen: 127.0.0.1:8080, tls: true }").unwrap_err();
        assert!(
            err.contains("embedded.websocket.tls: needs the certificate"),
            "{err}"
        );
        let err = plan("  websocket: { listen: nowhere }").unwrap_err();
        assert!(err.contains("embedded.websocket.listen"), "{err}");
        let err = plan("  listen: []").unwrap_err();
        assert!(err.contains("needs at least one address"), "{err}");
        let p = plan("  listen: []\n  websocket: { listen: 127.0.0.1:8080 }").unwrap();
        assert!(p.listen.is_empty());
    }
}
