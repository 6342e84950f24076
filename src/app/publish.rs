//! What the republish sink and the rules' commands (Sparkplug B rebirth requests)
//! publish through ([`Publish`]): the broker mqbridge reads from.
//!
//! - **Embedded broker**: no connection; records are handed to its subscribers in-process
//!   (and to its retained store), which settles them at once. They do not go through the
//!   rules again.
//! - **External broker**: each republish sink has a connection of its own (client id
//!   `<client_id>-republish-<sink>`: two sinks sharing one id would take each other's
//!   connection over), so publishing never waits on the source's event loop and
//!   the source's flow control never blocks publishing. A batch is published when the
//!   broker confirmed every message in it (PUBACK at QoS 1, PUBCOMP at QoS 2, sent at QoS
//!   0). If the connection drops or confirmation times out, the connection is discarded
//!   and the batch fails as transient: the driver retries it on a fresh connection, so no
//!   stale confirmation can be counted for a later batch.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};

use crate::broker::Broker;
use crate::config::BrokerPlan;
use crate::mqtt::{self, Client, Incoming};
use crate::sink::SinkError;
use crate::sink::republish::Publish;

/// How long a batch waits for the broker's confirmations.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// The broker mqbridge reads from, which the republish sinks publish to.
#[derive(Clone, Copy)]
pub enum Upstream<'a> {
    Embedded(&'a Broker),
    External(&'a BrokerPlan),
}

impl Upstream<'_> {
    /// A publisher for the sink named `sink`.
    pub fn publisher(self, sink: &str) -> Arc<dyn Publish> {
        match self {
            Upstream::Embedded(broker) => Arc::new(broker.clone()),
            Upstream::External(plan) => Arc::new(Connection::new(
                plan,
                republish_client_id(&plan.client_id, sink),
            )),
        }
    }

    /// The publisher of the rules' commands: with an external broker, a connection of
    /// its own (client id `<client_id>-commands`, which no republish sink's id is: see
    /// [`republish_client_id`]), made when the first command is sent.
    pub fn commands(self) -> Arc<dyn Publish> {
        match self {
            Upstream::Embedded(broker) => Arc::new(broker.clone()),
            Upstream::External(plan) => Arc::new(Connection::new(
                plan,
                format!("{}-commands", plan.client_id),
            )),
        }
    }
}

impl Publish for Broker {
    fn publish_all(
        &self,
        messages: Vec<(String, Vec<u8>)>,
        qos: u8,
        retain: bool,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        for (topic, payload) in messages {
            self.publish(&topic, payload.into(), qos, retain);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Publishing to the external broker on a connection of its own, made on first use and
/// again after a failure.
struct Connection {
    broker: BrokerPlan,
    client_id: String,
    live: Mutex<Option<Live>>,
}

/// The client id of the sink `sink`'s connection: one per sink, since a broker lets only
/// one connection hold a client id.
fn republish_client_id(client_id: &str, sink: &str) -> String {
    format!("{client_id}-republish-{sink}")
}

/// What a connection's poll task reports.
enum Event {
    Connected,
    /// One of our publishes went out (all a QoS 0 publish gets).
    Sent,
    /// The broker confirmed one of our publishes (PUBACK or PUBCOMP).
    Confirmed,
}

/// One live connection.
struct Live {
    client: Client,
    /// Events (Ok) and the connection's end (Err) from its poll task.
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    fn new(broker: &BrokerPlan, client_id: String) -> Self {
        Connection {
            broker: broker.clone(),
            client_id,
            live: Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<Live, SinkError> {
        let (client, mut eventloop) = mqtt::connect(&self.broker, &self.client_id, false, false)
            .map_err(|e| SinkError::transient(e.to_string()))?;
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Incoming::Connected { .. }) => Ok(Event::Connected),
                    Ok(Incoming::Sent) => Ok(Event::Sent),
                    Ok(Incoming::Confirmed) => Ok(Event::Confirmed),
                    Ok(_) => continue,
                    Err(e) => Err(e),
                };
                let end = ev.is_err();
                if tx.send(ev).is_err() || end {
                    break;
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Ok(_))) => Ok(Live {
                client,
                events,
                task,
            }),
            Ok(Some(Err(e))) => Err(SinkError::transient(format!(
                "republish: cannot connect: {e}"
            ))),
            _ => Err(SinkError::transient("republish: cannot connect: timed out")),
        }
    }

    async fn send_and_confirm(
        live: &mut Live,
        messages: Vec<(String, Vec<u8>)>,
        qos: u8,
        retain: bool,
    ) -> Result<(), SinkError> {
        let expected = messages.len();
        for (topic, payload) in messages {
            live.client
                .publish(topic, qos, retain, payload)
                .await
                .map_err(|e| SinkError::transient(format!("republish: {e}")))?;
        }
        let mut confirmed = 0;
        let wait = async {
            while confirmed < expected {
                match live.events.recv().await {
                    Some(Ok(Event::Confirmed)) if qos > 0 => confirmed += 1,
                    Some(Ok(Event::Sent)) if qos == 0 => confirmed += 1,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        return Err(SinkError::transient(format!(
                            "republish: connection lost: {e}"
                        )));
                    }
                    None => return Err(SinkError::transient("republish: connection closed")),
                }
            }
            Ok(())
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| {
                Err(SinkError::transient(
                    "republish: broker did not confirm in time",
                ))
            })
    }
}

impl Publish for Connection {
    fn publish_all(
        &self,
        messages: Vec<(String, Vec<u8>)>,
        qos: u8,
        retain: bool,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let mut guard = self.live.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let live = guard.as_mut().expect("connected above");
            let result = Self::send_and_confirm(live, messages, qos, retain).await;
            if result.is_err() {
                *guard = None;
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_republish_sink_connects_with_a_client_id_of_its_own() {
        let ids = ["alerts", "mirror"].map(|sink| super::republish_client_id("bridge-1", sink));
        assert_eq!(
            ids,
            ["bridge-1-republish-alerts", "bridge-1-republish-mirror"]
        );
    }
}
