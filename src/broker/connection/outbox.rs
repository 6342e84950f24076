//! What a connection sends: the socket's writing half, and the packets waiting for it,
//! encoded one after another into one buffer. The connection's own task writes them,
//! between reads, when the socket takes them; no task of its own, no queue between tasks.
//!
//! - **Batched.** Whatever a turn of the read loop produced (a group commit's PUBACKs, a
//!   burst of messages from the session's queue) goes out in one write: one system call,
//!   not one per packet.
//! - **Bounded.** The pump pulls the session's queue only while fewer than
//!   [`MAX_PACKETS`] packets and [`MAX_BYTES`] bytes wait. A packet sent past
//!   [`MAX_BYTES`] (an acknowledgement, a reply) waits until everything before it is
//!   written, so a client that reads nothing holds at most that much of the broker's
//!   memory, and one packet.
//! - **Never blocking reads on a slow reader.** Writing waits for the socket in the read
//!   loop beside reading; only a send past the bound waits for it alone.
//! - **`send_timeout`.** A socket that takes no byte for that long ends the connection
//!   (a client that does not read, its window shut). A slow reader that keeps taking some
//!   is never cut off.
//! - **Memory while idle: none.** The buffer is released once written, so an idle
//!   connection holds no write buffer.
//! - **Flushed.** Over TLS, bytes the socket did not take stay in the TLS layer until
//!   flushed; every batch is flushed, so a last packet never waits for the next.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio::time::Instant;

use crate::broker::codec::{self, CodecError, Outgoing, Version};
use crate::broker::listener::StreamWriter;

/// Packets at most waiting for the socket before the pump stops pulling the session's
/// queue.
pub(super) const MAX_PACKETS: usize = 64;

/// Bytes at most waiting for the socket before the pump stops, and a send waits.
pub(super) const MAX_BYTES: usize = 64 << 10;

/// What an empty buffer reserves for the first packet, so that a batch of small packets
/// is encoded without growing the buffer packet by packet.
const FIRST_CHUNK: usize = 4096;

pub(super) struct Outbox {
    wr: StreamWriter,
    /// Encoded packets, not yet written.
    buf: BytesMut,
    /// Packets in `buf` (counted until all of it is written).
    packets: usize,
    /// Bytes written and not flushed since.
    unflushed: bool,
    /// Since when the socket has taken none of `buf`; None while it takes them.
    stalled: Option<Instant>,
}

impl Outbox {
    pub(super) fn new(wr: StreamWriter) -> Outbox {
        Outbox {
            wr,
            buf: BytesMut::new(),
            packets: 0,
            unflushed: false,
            stalled: None,
        }
    }

    /// Appends the encoding of `packet`; nothing is appended when it cannot be encoded.
    pub(super) fn push(&mut self, packet: &Outgoing, version: Version) -> Result<(), CodecError> {
        if self.buf.capacity() == 0 {
            self.buf.reserve(FIRST_CHUNK);
        }
        let start = self.buf.len();
        match codec::encode(packet, version, &mut self.buf) {
            Ok(()) => {
                self.packets += usize::from(self.buf.len() > start);
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Packets the pump may add now.
    pub(super) fn room(&self) -> usize {
        if self.buf.len() >= MAX_BYTES {
            return 0;
        }
        MAX_PACKETS.saturating_sub(self.packets)
    }

    /// Past the bound in bytes: a send waits for the socket. (Not counted in packets: a
    /// group commit's acknowledgements, four bytes each, go out in one write.)
    pub(super) fn full(&self) -> bool {
        self.buf.len() >= MAX_BYTES
    }

    /// Something to write or to flush.
    pub(super) fn waiting(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// When the socket will have taken nothing for `limit`; None while it takes bytes.
    pub(super) fn stalled_until(&self, limit: Duration) -> Option<Instant> {
        self.stalled.map(|since| since + limit)
    }

    /// Writes and flushes what waits, as far as the socket takes it without waiting.
    /// Ready once some of it went out, or the socket's first refusal started the stall
    /// (so that the caller's timer can count from then); Pending while the stall lasts.
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut progressed = false;
        while !self.buf.is_empty() {
            match Pin::new(&mut self.wr).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    self.unflushed = true;
                    progressed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.buf.is_empty() {
            // Released: an idle connection holds no write buffer.
            self.buf = BytesMut::new();
            self.packets = 0;
            if self.unflushed {
                match Pin::new(&mut self.wr).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.unflushed = false;
                        progressed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
        }
        if progressed {
            self.stalled = None;
            return Poll::Ready(Ok(()));
        }
        if self.stalled.is_none() {
            self.stalled = Some(Instant::now());
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    /// Writes and flushes everything that waits; `TimedOut` once the socket has taken
    /// nothing for `limit`.
    pub(super) async fn write_all(&mut self, limit: Duration) -> std::io::Result<()> {
        while self.waiting() {
            let since = *self.stalled.get_or_insert_with(Instant::now);
            let wrote = std::future::poll_fn(|cx| self.poll_write(cx));
            tokio::time::timeout_at(since + limit, wrote)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        }
        Ok(())
    }

    /// Writes what waits (within `limit`, as [`Outbox::write_all`]), then closes the
    /// writing half.
    pub(super) async fn close(mut self, limit: Duration) {
        if self.write_all(limit).await.is_ok() {
            // Not waited for longer than a write: a client that does not read would hold it.
            let _ =
                tokio::time::timeout(limit, tokio::io::AsyncWriteExt::shutdown(&mut self.wr)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::broker::codec::Publish;
    use crate::broker::listener::Stream;

    /// An outbox writing into a pipe of `capacity` bytes, and the pipe's other end.
    fn outbox(capacity: usize) -> (Outbox, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        let (_, wr) = Stream::Other(Box::new(theirs)).split();
        (Outbox::new(wr), ours)
    }

    fn publish(payload: usize) -> Outgoing {
        Outgoing::Publish(Publish {
            dup: false,
            qos: 0,
            retain: false,
            topic: "t".into(),
            pkid: 0,
            payload: vec![b'x'; payload].into(),
            properties: None,
        })
    }

    #[tokio::test]
    async fn packets_go_out_together_in_order_and_the_buffer_is_released() {
        let (mut out, mut peer) = outbox(1 << 16);
        out.push(&Outgoing::PingResp, Version::V311).unwrap();
        out.push(&Outgoing::PubAck { pkid: 7, reason: 0 }, Version::V311)
            .unwrap();
        assert!(out.waiting());
        assert_eq!(out.room(), MAX_PACKETS - 2);
        std::future::poll_fn(|cx| out.poll_write(cx)).await.unwrap();
        assert!(!out.waiting());
        assert_eq!(out.buf.capacity(), 0, "released once written");
        assert_eq!(out.room(), MAX_PACKETS);
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0xD0, 0, 0x40, 2, 0, 7]);
    }

    #[tokio::test]
    async fn the_pump_stops_at_the_bound_and_a_send_waits_past_its_bytes() {
        let (mut out, _peer) = outbox(1 << 16);
        for _ in 0..MAX_PACKETS {
            out.push(&Outgoing::PingResp, Version::V311).unwrap();
        }
        assert_eq!(out.room(), 0, "as many packets as the bound");
        assert!(!out.full(), "a send still goes: the bytes are few");
        out.push(&publish(MAX_BYTES), Version::V311).unwrap();
        assert!(out.full());
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_takes_nothing_fails_the_write_after_the_limit() {
        let (mut out, mut peer) = outbox(64);
        out.push(&publish(1000), Version::V311).unwrap();
        let limit = Duration::from_secs(30);
        let started = Instant::now();
        let e = out.write_all(limit).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit);
        // What the pipe took meanwhile is the packet's start.
        let mut first = [0u8; 2];
        peer.read_exact(&mut first).await.unwrap();
        assert_eq!(first[0], 0x30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_bytes_is_never_cut_off() {
        let (mut out, mut peer) = outbox(64);
        out.push(&publish(1000), Version::V311).unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 64];
            while got.len() < 1000 {
                // Slower than the limit in all, faster than it each time.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = peer.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got.len()
        });
        out.write_all(Duration::from_secs(5)).await.unwrap();
        assert!(!out.waiting());
        assert!(reader.await.unwrap() >= 1000);
    }
}
