//! The webhook sink's receiver: hyper (HTTP/1.1, keep-alive) on a loopback port, in the
//! tool's process. A request's body is one record or a JSON array of records; each
//! record's `p` (publisher), `seq` (sequence number) and `t` (send time, ns since the
//! run's start) go into a [`Tally`], so lost and duplicated records are counted the same
//! way as in the other modes. It answers 200 with an empty body, or 503 while set down
//! (an endpoint in an outage: the sink retries).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::tally::Tally;

/// The fields of a record the receiver reads (the rest is parsed over and ignored).
#[derive(Deserialize)]
struct Stamp {
    p: usize,
    seq: usize,
    t: u64,
}

struct Shared {
    tally: Mutex<Tally>,
    epoch: Instant,
    /// Requests answered 200.
    requests: AtomicU64,
    /// Answer 503 to everything.
    down: AtomicBool,
}

/// A running receiver; it stops listening when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Listens on a free loopback port, expecting records `0..per_publisher` from each
    /// of `publishers`; `epoch` is the clock their `t` counts from.
    pub async fn start(
        publishers: usize,
        per_publisher: usize,
        epoch: Instant,
    ) -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            tally: Mutex::new(Tally::new(publishers, per_publisher)),
            epoch,
            requests: AtomicU64::new(0),
            down: AtomicBool::new(false),
        });
        let serving = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| handle(Arc::clone(&shared), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Receiver { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    /// Answer 503 to every request (`true`) or take them again (`false`).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// Records received at least once so far.
    pub fn distinct(&self) -> u64 {
        self.tally(|t| t.distinct)
    }

    /// Requests answered 200 so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Looks at the tally.
    pub fn tally<T>(&self, f: impl FnOnce(&mut Tally) -> T) -> T {
        f(&mut self.shared.tally.lock().unwrap())
    }

    /// Waits until `n` distinct records arrived; fails when none arrived for `stall`.
    pub async fn wait_for(&self, n: u64, stall: Duration) -> anyhow::Result<()> {
        let (mut seen, mut progress) = (self.distinct(), Instant::now());
        while seen < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.distinct();
            if now > seen {
                (seen, progress) = (now, Instant::now());
            } else if progress.elapsed() > stall {
                bail!("stalled at {seen} of {n} records for {stall:?}");
            }
        }
        Ok(())
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let status = match req.into_body().collect().await {
        _ if shared.down.load(Ordering::Relaxed) => StatusCode::SERVICE_UNAVAILABLE,
        Err(_) => StatusCode::BAD_REQUEST,
        Ok(body) => match record(&shared, &body.to_bytes()) {
            Ok(()) => {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                StatusCode::OK
            }
            Err(_) => StatusCode::BAD_REQUEST,
        },
    };
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    Ok(resp)
}

/// Parses a body (a record or an array of them) into the tally.
fn record(shared: &Shared, body: &[u8]) -> anyhow::Result<()> {
    let stamps: Vec<Stamp> = if body.first() == Some(&b'[') {
        serde_json::from_slice(body)?
    } else {
        vec![serde_json::from_slice(body)?]
    };
    let now = shared.epoch.elapsed().as_nanos() as u64;
    let mut tally = shared.tally.lock().unwrap();
    for s in stamps {
        tally.record(s.p, s.seq, s.t, now)?;
    }
    Ok(())
}
