//! A real HTTP receiver for the webhook tests: hyper on a loopback port, injecting the
//! faults a test asks for (500s, 503s, 429 with Retry-After, answers slower than the sink's
//! timeout, connections reset mid-request), scripted request by request or drawn at random.
//! It checks HMAC signatures itself (401 when one does not verify), answers 400 to records
//! marked bad, and records every request it saw and what it answered. Its port can be
//! reserved before it listens, so an endpoint can start out down (connections refused).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::Mac;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::Notify;

/// How long a `Slow` answer takes; the sinks under test time out after 500ms.
pub const SLOW: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer 500.
    Error500,
    /// Answer 503 (no Retry-After).
    Unavailable,
    /// Answer 429 with `Retry-After: 1`.
    TooMany,
    /// Accept the request (200) but answer after [`SLOW`].
    Slow,
    /// Drop the connection (RST) after the request head, before reading the body.
    Reset,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub path: String,
    pub query: Option<String>,
    /// The `Authorization` header, when sent.
    pub authorization: Option<String>,
    pub key: Option<String>,
    pub content_type: Option<String>,
    /// The templated `X-Device` header, when sent.
    pub device: Option<String>,
    pub body: Bytes,
    /// Whether the signature header verified (None: the path is not signed).
    pub signature_ok: Option<bool>,
    /// The status answered; None when the connection was reset.
    pub status: Option<u16>,
    pub fault: Option<Fault>,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
pub struct State {
    /// Faults for the next requests, one per request, in arrival order.
    pub faults: VecDeque<Fault>,
    /// When `faults` is empty: request number k (counting from 1) gets the first of these
    /// faults whose period divides k.
    pub every: Vec<(u64, Fault)>,
    /// Requests seen so far, for `every`.
    pub count: u64,
    /// When neither of the above applies: each request gets one of these faults with its
    /// probability (the rest are answered normally).
    pub random: Vec<(Fault, f64)>,
    /// HMAC key; requests to a path in `signed` must carry a valid signature header.
    pub secret: Vec<u8>,
    pub signed: Vec<(&'static str, &'static str)>,
    pub seen: Vec<Seen>,
}

impl State {
    fn next_fault(&mut self) -> Option<Fault> {
        if let Some(f) = self.faults.pop_front() {
            return Some(f);
        }
        self.count += 1;
        if let Some(&(_, f)) = self
            .every
            .iter()
            .find(|(n, _)| self.count.is_multiple_of(*n))
        {
            return Some(f);
        }
        let mut draw = rand::random::<f64>();
        for &(fault, p) in &self.random {
            if draw < p {
                return Some(fault);
            }
            draw -= p;
        }
        None
    }
}

pub struct HookServer {
    addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port held but not listened on: connections to it are refused, like an
/// endpoint that is down. [`Reserved::listen`] brings the server up on it.
pub struct Reserved {
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl Reserved {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn listen(self) -> HookServer {
        let listener = self.socket.listen(1024).unwrap();
        let addr = self.addr;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&shared)));
            }
        });
        HookServer { addr, state, task }
    }
}

impl HookServer {
    pub async fn start() -> HookServer {
        HookServer::reserve().listen()
    }

    /// A port for a server that is not up yet.
    pub fn reserve() -> Reserved {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = socket.local_addr().unwrap();
        Reserved { socket, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// From now on, answers request number k (counting from 1) with the first fault whose
    /// period divides k, e.g. `[(7, TooMany), (3, Error500)]`.
    pub fn fail_every(&self, pattern: &[(u64, Fault)]) {
        self.state.lock().unwrap().every = pattern.to_vec();
    }

    /// From now on, answers each request with a fault drawn from `mix` (fault,
    /// probability), or normally for the remaining probability.
    pub fn fail_at_random(&self, mix: &[(Fault, f64)]) {
        self.state.lock().unwrap().random = mix.to_vec();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Looks at the requests seen so far without copying them.
    pub fn with_seen<T>(&self, f: impl FnOnce(&[Seen]) -> T) -> T {
        f(&self.state.lock().unwrap().seen)
    }
}

async fn serve(stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    // Linger 0: closing the socket sends RST, so `Reset` is a real reset (and with a zero
    // linger time the close cannot block).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = Arc::clone(&reset);
        hyper::service::service_fn(move |req| handle(Arc::clone(&state), Arc::clone(&reset), req))
    };
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection mid-request.
        _ = reset.notified() => {}
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    reset: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let fault = state.lock().unwrap().next_fault();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let signature_header = state
        .lock()
        .unwrap()
        .signed
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, h)| *h);
    let mut seen = Seen {
        at: Instant::now(),
        query,
        authorization: header("authorization"),
        key: header("idempotency-key"),
        content_type: header("content-type"),
        device: header("x-device"),
        signature_ok: None,
        body: Bytes::new(),
        status: None,
        fault,
        path,
    };
    let signature = signature_header.and_then(header);
    if fault == Some(Fault::Reset) {
        state.lock().unwrap().seen.push(seen);
        reset.notify_one();
        // Never answers: the connection is dropped under it.
        return std::future::pending().await;
    }
    // A copy: the body hyper hands over is a slice of the connection's read buffer, and
    // keeping it would keep that whole buffer alive (~8 KiB a request).
    seen.body = req
        .into_body()
        .collect()
        .await
        .map(|b| Bytes::copy_from_slice(&b.to_bytes()))
        .unwrap_or_default();
    if signature_header.is_some() {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&state.lock().unwrap().secret).unwrap();
        mac.update(&seen.body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        seen.signature_ok = Some(signature.as_deref() == Some(want.as_str()));
    }
    let bad = seen.json().get("bad") == Some(&Value::Bool(true));
    let (status, body) = match fault {
        Some(Fault::Error500) => (500, "injected failure"),
        Some(Fault::Unavailable) => (503, "down for maintenance"),
        Some(Fault::TooMany) => (429, "slow down"),
        _ if seen.signature_ok == Some(false) => (401, "bad signature"),
        // An endpoint that never comes back (for giving-up tests).
        _ if seen.path.ends_with("/down") => (503, "down for good"),
        _ if bad => (400, r#"{"error":"bad payload"}"#),
        _ => (200, "ok"),
    };
    seen.status = Some(status);
    state.lock().unwrap().seen.push(seen);
    if fault == Some(Fault::Slow) && status == 200 {
        tokio::time::sleep(SLOW).await;
    }
    let mut resp = Response::builder().status(status);
    if status == 429 {
        resp = resp.header("retry-after", "1");
    }
    Ok(resp.body(Full::new(Bytes::from(body))).unwrap())
}
