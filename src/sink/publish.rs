//! Where the publishing sinks' messages go ([`Publish`]), and [`Connection`], publishing
//! over a connection of its own to a broker: the `mqtt` sink's remote broker, and the
//! external broker of a `republish` sink (the app wires the latter, see `app::publish`).
//!
//! A message is delivered once the broker has confirmed it (PUBACK at QoS 1, PUBCOMP at
//! QoS 2; sent, at QoS 0), each matched to its confirmation by packet id. A message the
//! broker refuses (MQTT 5: a PUBACK or PUBREC reason code of 0x80 or more) fails
//! permanently, with the broker's reason. If the connection drops or confirmation times
//! out, the connection is discarded and what was not confirmed fails as transient: the
//! driver publishes it again on a fresh connection (clean session), so no stale
//! confirmation can be counted for a later batch. The broker confirms QoS 1/2 messages in
//! the order it received them, so what was not confirmed is the tail of the batch, and
//! publishing it again keeps every topic in order; a message whose confirmation was lost
//! with the connection reaches subscribers twice (at least once).

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};

use super::{Outcome, SinkError};
use crate::config::ConnectionPlan;
use crate::mqtt::{self, Client, Incoming, OutgoingProperties, Session};

/// How long a batch waits for the broker's confirmations.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting (TCP, TLS, CONNECT/CONNACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One message to publish: its topic, payload and MQTT 5 properties (the `mqtt` sink's
/// `properties:`; a publisher to the embedded broker is never given any).
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub properties: Option<OutgoingProperties>,
}

/// Where a publishing sink's messages go.
pub trait Publish: Send + Sync + 'static {
    /// Publishes `messages` in order; one outcome per message: delivered
    /// once the broker has it (confirmed, at QoS 1 and 2), else failed (transiently when
    /// the connection or the confirmation was lost).
    fn publish_all(
        &self,
        messages: Vec<Outgoing>,
        qos: u8,
        retain: bool,
    ) -> BoxFuture<'_, Vec<Outcome>>;
}

/// Publishing to a broker on a connection of its own, made on first use and again after
/// a failure. `label` names it in errors (`mqtt`, `republish`).
pub struct Connection {
    plan: ConnectionPlan,
    client_id: String,
    label: &'static str,
    live: Mutex<Option<Live>>,
}

/// One live connection.
struct Live {
    client: Client,
    /// Events (Ok) and the connection's end (Err) from its poll task.
    events: mpsc::UnboundedReceiver<Result<Incoming, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// A publisher to the broker of `plan`, connecting as `client_id`.
    pub fn new(plan: &ConnectionPlan, client_id: String, label: &'static str) -> Self {
        Connection {
            plan: plan.clone(),
            client_id,
            label,
            live: Mutex::new(None),
        }
    }

    fn transient(&self, what: impl std::fmt::Display) -> SinkError {
        SinkError::transient(format!("{}: {what}", self.label))
    }

    async fn connect(&self) -> Result<Live, SinkError> {
        let (client, mut eventloop) =
            mqtt::connect(&self.plan, &self.client_id, Session::Publisher)
                .map_err(|e| self.transient(e))?;
        let (tx, mut events) = mpsc::unbounded_channel();
        // Polls the event loop and does nothing else (it must never wait on the client).
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(
                        ev @ (Incoming::Connected { .. }
                        | Incoming::Sent(_)
                        | Incoming::Confirmed { .. }),
                    ) => Ok(ev),
                    Ok(_) => continue,
                    Err(e) => Err(e),
                };
                let end = ev.is_err();
                if tx.send(ev).is_err() || end {
                    break;
                }
            }
        });
        match tokio::time::timeout(CONNECT_TIMEOUT, events.recv()).await {
            Ok(Some(Ok(_))) => Ok(Live {
                client,
                events,
                task,
            }),
            Ok(Some(Err(e))) => Err(self.transient(format_args!("cannot connect: {e}"))),
            _ => Err(self.transient("cannot connect: timed out")),
        }
    }

    /// Publishes `messages` on `live` and waits for the broker's answers; returns one
    /// outcome per message, and whether the connection is still good for the next batch.
    async fn send_and_confirm(
        &self,
        live: &mut Live,
        messages: Vec<Outgoing>,
        qos: u8,
        retain: bool,
    ) -> (Vec<Outcome>, bool) {
        let mut answers: Vec<Option<Outcome>> = vec![None; messages.len()];
        let mut confirmations = Confirmations::new(qos);
        let mut broken = None;
        for m in messages {
            let published = live
                .client
                .publish(m.topic, qos, retain, m.payload, m.properties);
            if let Err(e) = published.await {
                broken = Some(self.transient(e));
                break;
            }
        }
        let mut refused = false;
        if broken.is_none() {
            let wait = async {
                while confirmations.answered < answers.len() {
                    match live.events.recv().await {
                        Some(Ok(ev)) => {
                            if let Some((i, answer)) = confirmations.on(ev, self.label) {
                                refused |= !matches!(answer, Outcome::Delivered);
                                answers[i] = Some(answer);
                            }
                        }
                        Some(Err(e)) => {
                            return Err(self.transient(format_args!("connection lost: {e}")));
                        }
                        None => return Err(self.transient("connection closed")),
                    }
                }
                Ok(())
            };
            broken = match tokio::time::timeout(CONFIRM_TIMEOUT, wait).await {
                Ok(r) => r.err(),
                Err(_) => Some(self.transient("broker did not confirm in time")),
            };
        }
        let failed = broken.clone().map(Outcome::Failed);
        let outcomes = answers
            .into_iter()
            .map(|a| {
                a.or_else(|| failed.clone())
                    .expect("every message answered unless the connection broke")
            })
            .collect();
        // After a refusal rumqttc may keep the packet id in flight for good: start afresh.
        (outcomes, broken.is_none() && !refused)
    }
}

/// Matches the broker's answers to the messages of one batch, by packet id.
struct Confirmations {
    qos: u8,
    /// Messages written so far: the next `Sent` is message number `sent`.
    sent: usize,
    /// Packet id → message number, for messages written and not answered yet.
    waiting: HashMap<u16, usize>,
    answered: usize,
}

impl Confirmations {
    fn new(qos: u8) -> Confirmations {
        Confirmations {
            qos,
            sent: 0,
            waiting: HashMap::new(),
            answered: 0,
        }
    }

    /// What `ev` answers: (message number, outcome), if anything.
    fn on(&mut self, ev: Incoming, label: &str) -> Option<(usize, Outcome)> {
        match ev {
            Incoming::Sent(pkid) => {
                let i = self.sent;
                self.sent += 1;
                if self.qos == 0 {
                    self.answered += 1;
                    return Some((i, Outcome::Delivered));
                }
                self.waiting.insert(pkid, i);
                None
            }
            Incoming::Confirmed { pkid, refused } => {
                let i = self.waiting.remove(&pkid)?;
                self.answered += 1;
                Some((
                    i,
                    match refused {
                        None => Outcome::Delivered,
                        Some(reason) => Outcome::Failed(SinkError::permanent(format!(
                            "{label}: the broker refused the message: {reason}"
                        ))),
                    },
                ))
            }
            _ => None,
        }
    }
}

impl Publish for Connection {
    fn publish_all(
        &self,
        messages: Vec<Outgoing>,
        qos: u8,
        retain: bool,
    ) -> BoxFuture<'_, Vec<Outcome>> {
        Box::pin(async move {
            let mut guard = self.live.lock().await;
            // A connection that ended while idle is replaced before publishing on it.
            if let Some(live) = guard.as_mut() {
                while let Ok(ev) = live.events.try_recv() {
                    if let Err(e) = ev {
                        tracing::debug!(publisher = self.label, error = %e, "connection ended while idle; reconnecting");
                        *guard = None;
                        break;
                    }
                }
            }
            if guard.is_none() {
                match self.connect().await {
                    Ok(live) => *guard = Some(live),
                    Err(e) => return vec![Outcome::Failed(e); messages.len()],
                }
            }
            let live = guard.as_mut().expect("connected above");
            let (outcomes, keep) = self.send_and_confirm(live, messages, qos, retain).await;
            if !keep {
                *guard = None;
            }
            outcomes
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(o: &Option<(usize, Outcome)>) -> Option<usize> {
        match o {
            Some((i, Outcome::Delivered)) => Some(*i),
            _ => None,
        }
    }

    #[test]
    fn confirmations_are_matched_to_messages_by_packet_id() {
        let mut c = Confirmations::new(2);
        assert!(c.on(Incoming::Sent(7), "t").is_none());
        assert!(c.on(Incoming::Sent(8), "t").is_none());
        // A refusal at PUBREC may come before an earlier message's PUBCOMP.
        let refused = c.on(
            Incoming::Confirmed {
                pkid: 8,
                refused: Some("NotAuthorized".into()),
            },
            "mqtt",
        );
        assert!(
            matches!(&refused, Some((1, Outcome::Failed(e))) if e.kind == super::super::ErrorKind::Permanent && e.message.contains("NotAuthorized")),
            "{refused:?}"
        );
        let ok = c.on(
            Incoming::Confirmed {
                pkid: 7,
                refused: None,
            },
            "mqtt",
        );
        assert_eq!(delivered(&ok), Some(0));
        assert_eq!(c.answered, 2);
        // An answer to nothing of this batch counts for nothing.
        assert!(
            c.on(
                Incoming::Confirmed {
                    pkid: 7,
                    refused: None
                },
                "mqtt"
            )
            .is_none()
        );
    }

    #[test]
    fn at_qos_0_a_message_is_delivered_once_sent() {
        let mut c = Confirmations::new(0);
        assert_eq!(delivered(&c.on(Incoming::Sent(0), "t")), Some(0));
        assert_eq!(delivered(&c.on(Incoming::Sent(0), "t")), Some(1));
        assert_eq!(c.answered, 2);
    }
}
