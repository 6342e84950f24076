//! One publisher of numbered messages over the raw client ([`crate::mqtt`]), for every
//! mode: the caller encodes each message (topic and payload) from its sequence number, its
//! packet id and the time it is written; this sends them, many per write, and at QoS 1
//! keeps at most `window` unacknowledged. Unpaced, it writes as fast as TCP (QoS 0) or
//! the broker's PUBACKs (QoS 1) let it; paced, message `seq` is not written before
//! `seq / per_second` seconds after it started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Semaphore;

use crate::mqtt::{self, Client};

/// Bytes of messages a publisher encodes before each write.
const WRITE_BATCH: usize = 32 * 1024;

#[derive(Clone, Debug)]
pub struct Plan {
    pub qos: u8,
    pub messages: u64,
    /// QoS 1: messages that may be unacknowledged.
    pub window: u32,
    /// None: as fast as the broker takes them.
    pub per_second: Option<f64>,
}

/// Encodes message `seq` (packet id `pkid`, written at `now_ns` since the run's start)
/// into the buffer, with [`mqtt::put_publish`].
pub trait Encode: FnMut(&mut BytesMut, u64, u16, u64) + Send + 'static {}
impl<F: FnMut(&mut BytesMut, u64, u16, u64) + Send + 'static> Encode for F {}

/// Publishes the plan's messages; returns when the last was written (QoS 0) or
/// acknowledged (QoS 1), as time since `epoch`.
pub async fn publish(
    c: Client,
    plan: Plan,
    epoch: Instant,
    mut encode: impl Encode,
) -> anyhow::Result<Duration> {
    let (rd, mut wr) = c.socket.into_split();
    let window = Arc::new(Semaphore::new(plan.window as usize));
    let acks = (plan.qos == 1).then(|| {
        let window = Arc::clone(&window);
        tokio::spawn(count_acks(rd, c.buf, plan.messages, window))
    });
    let started = Instant::now();
    let mut out = BytesMut::with_capacity(WRITE_BATCH + 1024);
    let mut seq = 0;
    while seq < plan.messages {
        let mut room = plan.messages - seq;
        if let Some(rate) = plan.per_second {
            let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
            if due <= seq {
                let at = started + Duration::from_secs_f64(seq as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
            room = room.min(due - seq);
        }
        let mut permits = 0;
        if plan.qos == 1 {
            // Only this task takes permits: what is available now stays available.
            let k = (window.available_permits().max(1) as u64).min(room);
            window.acquire_many(k as u32).await?.forget();
            (room, permits) = (k, k);
        }
        let now = epoch.elapsed().as_nanos() as u64;
        while room > 0 && out.len() < WRITE_BATCH {
            let pkid = (seq % 65_535) as u16 + 1;
            encode(&mut out, seq, pkid, now);
            seq += 1;
            room -= 1;
            permits = permits.saturating_sub(1);
        }
        if permits > 0 {
            // The batch filled before the permits ran out: give the rest back.
            window.add_permits(permits as usize);
        }
        wr.write_all(&out).await?;
        out.clear();
    }
    if let Some(acks) = acks {
        acks.await??;
    }
    Ok(epoch.elapsed())
}

/// Reads a QoS 1 publisher's PUBACKs, returning each to the window, until `n` came.
async fn count_acks(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    n: u64,
    window: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let mut acked = 0;
    while acked < n {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        if rd.read_buf(&mut buf).await? == 0 {
            bail!("the broker closed a publisher's connection ({acked} of {n} acknowledged)");
        }
        let (mut at, mut now) = (0, 0);
        while let Some(f) = mqtt::frame_at(&buf, at)? {
            ensure!(
                f.kind() == mqtt::PUBACK,
                "publisher got packet {:#x}",
                f.header
            );
            at = f.body.end;
            now += 1;
        }
        buf.advance(at);
        acked += now;
        window.add_permits(now as usize);
    }
    Ok(())
}
