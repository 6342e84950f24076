//! Messages to the client: the writer task that owns the socket's writing half, the
//! pump that moves the session's queue into it while it has room (and the client's
//! receive window allows), and server → client topic aliases.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Conn, ProtocolError};
use crate::broker::codec::{self, Outgoing, Publish};
use crate::broker::listener::StreamWriter;

pub(super) async fn write_loop(
    mut wr: StreamWriter,
    mut rx: mpsc::Receiver<Bytes>,
    notify: Arc<Notify>,
    gone: CancellationToken,
) {
    while let Some(bytes) = rx.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
        // Room in the queue again: let the connection pull more messages.
        notify.notify_one();
    }
    let _ = wr.shutdown().await;
    gone.cancel();
}

impl Conn {
    /// PUBACK of a QoS 1 message sent to the client: room in its window.
    pub(super) fn acked(&mut self, pkid: u16) {
        self.with_session(|s| s.acked(pkid));
        self.pump();
    }

    /// PUBREC of a QoS 2 message sent to the client: PUBREL, unless the client refused it.
    pub(super) async fn received(&mut self, pkid: u16, reason: u8) -> Result<(), ProtocolError> {
        let release = self.with_session(|s| s.received(pkid, reason >= 0x80));
        if release == Some(true) {
            self.send(Outgoing::PubRel { pkid }).await?;
        }
        self.pump();
        Ok(())
    }

    /// PUBCOMP: the QoS 2 message sent to the client is complete.
    pub(super) fn completed(&mut self, pkid: u16) {
        self.with_session(|s| s.completed(pkid));
        self.pump();
    }

    /// Moves queued messages to the writer while it has room.
    pub(super) fn pump(&mut self) {
        let room = self.wtx.capacity();
        if room == 0 {
            return;
        }
        let packets = {
            let mut state = self.shared.lock();
            match state.sessions.get_mut(&self.client_id) {
                Some(s) if s.link.as_ref().is_some_and(|l| l.conn_id == self.conn_id) => {
                    s.take_sendable(room, self.window, self.client_max_packet, self.version)
                }
                _ => Vec::new(),
            }
        };
        for mut p in packets {
            if let Outgoing::Publish(publish) = &mut p {
                self.alias_topic(publish);
            }
            let mut buf = BytesMut::new();
            if codec::encode(&p, self.version, &mut buf).is_ok() {
                // Room was reserved above; a full queue here would mean a bug, and the
                // message stays in flight to be resent after a reconnect.
                let _ = self.wtx.try_send(buf.freeze());
            }
        }
    }

    /// Replaces a repeated topic by its alias when the client accepts aliases: the first
    /// PUBLISH on a topic carries topic and alias, later ones the alias only.
    fn alias_topic(&mut self, p: &mut Publish) {
        if self.client_alias_max == 0 {
            return;
        }
        let known = self.aliases_out.get(&p.topic).copied();
        let alias = match known {
            Some(a) => a,
            None if self.aliases_out.len() < self.client_alias_max as usize => {
                let a = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(p.topic.clone(), a);
                a
            }
            None => return,
        };
        p.properties
            .get_or_insert_with(Default::default)
            .topic_alias = Some(alias);
        if known.is_some() {
            p.topic.clear();
        }
    }
}
