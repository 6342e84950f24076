//! Just enough MQTT 3.1.1 for the load tool, encoded and parsed by hand on a raw tokio
//! socket: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH and PUBACK. No allocation per
//! message and many packets per write, so the client costs little of the cores the broker
//! under test needs; TCP_NODELAY on every socket.
//!
//! It checks only what the tool relies on (a CONNACK that accepts, a SUBACK that grants);
//! anything unexpected is an error that ends the run.

use std::net::SocketAddr;

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const CONNACK: u8 = 0x20;
pub const PUBLISH: u8 = 0x30;
pub const PUBACK: u8 = 0x40;
pub const SUBACK: u8 = 0x90;

/// A complete packet at the front of a read buffer.
pub struct Frame {
    /// The first byte: packet type in the high nibble, flags in the low one.
    pub header: u8,
    /// Where the variable header starts and the packet ends, in the buffer.
    pub body: std::ops::Range<usize>,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.header & 0xF0
    }
}

/// The packet starting at `buf[at..]`, if all of it is there.
pub fn frame_at(buf: &[u8], at: usize) -> anyhow::Result<Option<Frame>> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(at + 1 + i) else {
            return Ok(None);
        };
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let start = at + 2 + i;
            return Ok((buf.len() >= start + len).then_some(Frame {
                header: buf[at],
                body: start..start + len,
            }));
        }
    }
    bail!("malformed remaining length")
}

fn put_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            return;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// PUBLISH with `payload` written by `fill` (which gets exactly `payload_len` bytes).
pub fn put_publish(
    out: &mut BytesMut,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    out.put_u8(PUBLISH | (qos << 1));
    put_len(
        out,
        2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len,
    );
    put_str(out, topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    let at = out.len();
    out.resize(at + payload_len, 0);
    fill(&mut out[at..]);
}

/// CONNECT: 3.1.1, clean session, `keep_alive` seconds (0: none).
pub fn put_connect(out: &mut BytesMut, client_id: &str, keep_alive: u16) {
    out.put_u8(0x10);
    put_len(out, 10 + 2 + client_id.len());
    put_str(out, "MQTT");
    out.put_slice(&[4, 0x02]); // 3.1.1, clean session
    out.put_u16(keep_alive);
    put_str(out, client_id);
}

/// SUBSCRIBE (packet identifier 1) of `filter` at `qos`.
pub fn put_subscribe(out: &mut BytesMut, filter: &str, qos: u8) {
    out.put_u8(0x82);
    put_len(out, 2 + 2 + filter.len() + 1);
    out.put_u16(1);
    put_str(out, filter);
    out.put_u8(qos);
}

pub fn put_puback(out: &mut BytesMut, pkid: u16) {
    out.put_slice(&[PUBACK, 2]);
    out.put_u16(pkid);
}

/// A PUBLISH's QoS, packet id and payload (`body` is the frame's body).
pub fn parse_publish(header: u8, body: &[u8]) -> anyhow::Result<(u8, u16, &[u8])> {
    let qos = (header >> 1) & 3;
    ensure!(body.len() >= 2, "short PUBLISH");
    let topic_end = 2 + u16::from_be_bytes([body[0], body[1]]) as usize;
    let (pkid, at) = if qos > 0 {
        ensure!(body.len() >= topic_end + 2, "short PUBLISH");
        (
            u16::from_be_bytes([body[topic_end], body[topic_end + 1]]),
            topic_end + 2,
        )
    } else {
        (0, topic_end)
    };
    ensure!(body.len() >= at, "short PUBLISH");
    Ok((qos, pkid, &body[at..]))
}

/// A connected client: the socket and what was read from it and not parsed yet.
pub struct Client {
    pub socket: TcpStream,
    pub buf: BytesMut,
}

impl Client {
    /// Connects, sends CONNECT (clean session, `keep_alive` seconds, 0 for none) and
    /// waits for a CONNACK that accepts.
    pub async fn connect(
        broker: SocketAddr,
        client_id: &str,
        keep_alive: u16,
    ) -> anyhow::Result<Client> {
        let socket = TcpStream::connect(broker)
            .await
            .with_context(|| format!("connecting to {broker}"))?;
        socket.set_nodelay(true)?;
        let mut c = Client {
            socket,
            buf: BytesMut::with_capacity(64),
        };
        let mut out = BytesMut::new();
        put_connect(&mut out, client_id, keep_alive);
        c.socket.write_all(&out).await?;
        let (kind, body) = c.next_packet().await?;
        ensure!(kind == CONNACK, "expected CONNACK, got {kind:#x}");
        ensure!(body.get(1) == Some(&0), "CONNACK refused: {body:?}");
        Ok(c)
    }

    /// Subscribes to `filter` at `qos` and waits for a SUBACK that grants it.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        put_subscribe(&mut out, filter, qos);
        self.socket.write_all(&out).await?;
        let (kind, body) = self.next_packet().await?;
        ensure!(kind == SUBACK, "expected SUBACK, got {kind:#x}");
        ensure!(
            body.get(2) == Some(&qos),
            "SUBACK did not grant QoS {qos}: {body:?}"
        );
        Ok(())
    }

    /// Reads until one whole packet is buffered, and takes it: (type, body).
    async fn next_packet(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = frame_at(&self.buf, 0)? {
                let packet = (f.kind(), self.buf[f.body.clone()].to_vec());
                self.buf.advance(f.body.end);
                return Ok(packet);
            }
            if self.socket.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }
}
