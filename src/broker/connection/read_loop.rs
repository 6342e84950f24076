//! The read loop of a connected client: reads and decodes packets, dispatches each to
//! its phase, and in between releases settled acknowledgements, pumps the session's
//! queue, writes the outbox when the socket takes it, enforces the keepalive and the
//! `send_timeout`, and ends on takeover or shutdown.
//!
//! The keepalive also bounds a packet that arrives a byte at a time (slowloris): while
//! part of a packet waits, silence is allowed 1.5 × `max_keepalive` at most, even for a
//! 3.1.1 client that asked for a longer keepalive or none (a server may close a client
//! it finds unresponsive whatever its keepalive, 3.1.1 section 3.1.2.10). An idle client
//! with nothing half-sent keeps the keepalive it asked for.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::inbound::PublishRate;
use super::{Conn, End, ProtocolError, read_more};
use crate::broker::codec::{self, Outgoing, Packet, Version};
use crate::broker::listener::StreamReader;
use crate::broker::stats::TimedOut;

impl Conn {
    pub(super) async fn run(
        &mut self,
        rd: &mut StreamReader,
        mut buf: BytesMut,
        stop: &CancellationToken,
        done: &CancellationToken,
    ) -> End {
        // When the last whole packet arrived (or reading paused).
        let mut last = Instant::now();
        let max_inflight = self.shared.plan.max_inflight as usize;
        // What came with the CONNECT: a client need not wait for the CONNACK (3.1.4).
        // Boxed: it runs once, and would add its state to every connection's task.
        if let Some(end) = Box::pin(self.handle_frames(&mut buf, &mut last)).await {
            return end;
        }
        // The loop's waits live as long as it does: made (and registered with their
        // notifier or the timer wheel) once, not on every turn.
        let signal = Arc::clone(&self.outbound.signal);
        let mut shut_down = pin!(done.cancelled());
        let mut stopping = pin!(stop.cancelled());
        let mut woken = pin!(signal.notify.notified());
        // The timer is set no later than the earliest wait and moved only to bring it
        // closer: when it fires before its wait is due, the loop sets it again.
        let mut timer = pin!(tokio::time::sleep_until(last));
        let mut armed: Option<Instant> = None;
        loop {
            // Checked on every turn (not only when the signal wakes this loop), so that a
            // client whose input never stops still learns at once.
            if signal.taken_over() {
                self.disconnect(&ProtocolError::SessionTakenOver).await;
                return End::TakenOver;
            }
            // 3.1.1 clients have no receive maximum: stop reading while too many of their
            // messages wait for settlement (TCP pushes back on them).
            let paused = self.version == Version::V311
                && self.inbound.intake.unacknowledged() >= max_inflight;
            // Over `max_publish_rate`: not read until the rate allows.
            let resume = self
                .inbound
                .rate
                .as_deref()
                .and_then(PublishRate::resume_at);
            if paused || resume.is_some() {
                last = Instant::now();
            }
            let silence = self.silence_allowed(!buf.is_empty());
            // One timer for all: the keepalive, the end of a pause for the rate, and the
            // `send_timeout` of a socket that takes nothing.
            let keepalive = (!silence.is_zero()).then(|| last + silence);
            let stalled = self.out.stalled_until(self.shared.plan.send_timeout);
            let wake = [keepalive, resume, stalled].into_iter().flatten().min();
            if let Some(w) = wake
                && armed.is_none_or(|a| a > w)
            {
                timer.as_mut().reset(w);
                armed = Some(w);
            }
            // The pump stopped for lack of room: writing makes room for it.
            let pump_waits = self.out.room() == 0;
            tokio::select! {
                biased;
                _ = &mut shut_down => {
                    // What settled before the end is acknowledged first.
                    let last = self.inbound.intake.released_now();
                    let _ = self.release_acks(last).await;
                    self.disconnect(&ProtocolError::ServerShuttingDown).await;
                    return End::Shutdown;
                }
                _ = &mut stopping, if self.inbound.intake.handoff().is_some() => {
                    self.inbound.intake.close();
                }
                acks = self.inbound.intake.released() => {
                    if self.release_acks(acks).await.is_err() {
                        return End::Lost;
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if wake.is_none_or(|w| now < w) {
                        // Set for an earlier wait than the one now due (a packet came since).
                        continue;
                    }
                    if stalled.is_some_and(|t| t <= now) {
                        self.write_failed(std::io::ErrorKind::TimedOut.into());
                        return End::Lost;
                    }
                    if resume.is_some() {
                        // The pause for the rate is over (or the keepalive's turn came,
                        // which waits meanwhile): the packets already read go first.
                        if let Some(end) = self.handle_frames(&mut buf, &mut last).await {
                            return end;
                        }
                        continue;
                    }
                    self.shared.counters.timed_out(TimedOut::KeepAlive);
                    self.disconnect(&ProtocolError::KeepAliveTimeout(silence)).await;
                    return End::Lost;
                }
                // Before reading: what this loop produced goes out first, in one write.
                r = std::future::poll_fn(|cx| self.out.poll_write(cx)), if self.out.waiting() => {
                    if let Err(e) = r {
                        self.write_failed(e);
                        return End::Lost;
                    }
                    if pump_waits {
                        self.pump();
                    }
                }
                r = read_more(rd, &mut buf), if !paused && resume.is_none() => {
                    match r {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(_) => {}
                    }
                    if let Some(end) = self.handle_frames(&mut buf, &mut last).await {
                        return end;
                    }
                }
                // After reading: a subscriber with a full queue must not starve its input.
                // (A takeover wakes this too: the check above ends the loop.)
                _ = &mut woken => {
                    woken.set(signal.notify.notified());
                    self.pump();
                }
            }
        }
    }

    /// How long the client may send no whole packet (zero: no limit): 1.5 × its
    /// keepalive, and while part of a packet waits (`partial`) at most 1.5 ×
    /// `max_keepalive` (see the module's documentation).
    fn silence_allowed(&self, partial: bool) -> Duration {
        let max = Duration::from_secs(self.shared.plan.max_keepalive as u64) * 3 / 2;
        match (partial, self.keep_alive.is_zero(), max.is_zero()) {
            (true, true, false) => max,
            (true, false, false) => self.keep_alive.min(max),
            _ => self.keep_alive,
        }
    }

    /// Handles the whole packets in `buf`, each one setting `last` (the keepalive's
    /// start); Some when one ends the connection.
    /// Stops early, leaving the rest in `buf`, once the client is over `max_publish_rate`.
    async fn handle_frames(&mut self, buf: &mut BytesMut, last: &mut Instant) -> Option<End> {
        loop {
            if self
                .inbound
                .rate
                .as_deref()
                .is_some_and(|r| r.resume_at().is_some())
            {
                return None;
            }
            let frame = match codec::take_frame(buf, self.shared.plan.max_packet_size) {
                Ok(Some(f)) => f,
                Ok(None) => return None,
                Err(e) => {
                    self.disconnect(&e.into()).await;
                    return Some(End::Lost);
                }
            };
            *last = Instant::now();
            // The handler on the heap for the time it runs: its state (the largest of all
            // packets') would otherwise be part of every connection's task, idle or not.
            let handled = match codec::decode(frame, self.version) {
                Ok(packet) => Box::pin(self.handle(packet)).await,
                Err(e) => Err(e.into()),
            };
            match handled {
                Ok(None) => {}
                Ok(Some(end)) => return Some(end),
                Err(e) => {
                    self.disconnect(&e).await;
                    return Some(End::Lost);
                }
            }
        }
    }

    /// Handles one packet; Ok(Some) ends the connection normally, Err with a protocol
    /// error.
    async fn handle(&mut self, packet: Packet) -> Result<Option<End>, ProtocolError> {
        match packet {
            Packet::Connect(_) => return Err(ProtocolError::SecondConnect),
            Packet::ServerOnly(what) => return Err(ProtocolError::ServerPacket(what)),
            // No CONNECT with an authentication method is accepted [MQTT-4.12.0-7].
            Packet::Auth => return Err(ProtocolError::UnexpectedAuth),
            Packet::PingReq => self.send(Outgoing::PingResp).await?,
            Packet::Disconnect {
                reason,
                session_expiry,
            } => return self.client_disconnected(reason, session_expiry).map(Some),
            Packet::Publish(p) => self.publish(p).await?,
            Packet::PubRel(pkid) => self.released(pkid).await?,
            Packet::Subscribe { pkid, filters, id } => self.subscribe(pkid, filters, id).await?,
            Packet::Unsubscribe { pkid, filters } => self.unsubscribe(pkid, filters).await?,
            Packet::PubAck(pkid) => self.acked(pkid),
            Packet::PubRec(pkid, reason) => self.received(pkid, reason).await?,
            Packet::PubComp(pkid) => self.completed(pkid),
        }
        Ok(None)
    }
}
