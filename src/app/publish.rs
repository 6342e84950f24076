//! What the republish sink and the rules' commands (Sparkplug B rebirth requests)
//! publish through ([`Publish`]): the broker mqbridge reads from.
//!
//! - **Embedded broker**: no connection; records are handed to its subscribers in-process
//!   (and to its retained store), which settles them at once. They do not go through the
//!   rules again.
//! - **External broker**: each republish sink has a connection of its own (client id
//!   `<client_id>-republish-<sink>`: two sinks sharing one id would take each other's
//!   connection over), so publishing never waits on the source's event loop and the
//!   source's flow control never blocks publishing. It is the `mqtt` sink's publisher
//!   ([`publish::Connection`]), which says how confirmations are matched and failures
//!   retried.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::broker::Broker;
use crate::config::BrokerPlan;
use crate::sink::Outcome;
use crate::sink::publish::{self, Outgoing, Publish};

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
            Upstream::External(plan) => Arc::new(publish::Connection::new(
                &plan.connection,
                republish_client_id(&plan.connection.client_id, sink),
                "republish",
            )),
        }
    }

    /// The publisher of the rules' commands: with an external broker, a connection of
    /// its own (client id `<client_id>-commands`, which no republish sink's id is: see
    /// [`republish_client_id`]), made when the first command is sent.
    pub fn commands(self) -> Arc<dyn Publish> {
        match self {
            Upstream::Embedded(broker) => Arc::new(broker.clone()),
            Upstream::External(plan) => Arc::new(publish::Connection::new(
                &plan.connection,
                format!("{}-commands", plan.connection.client_id),
                "commands",
            )),
        }
    }
}

impl Publish for Broker {
    fn publish_all(
        &self,
        messages: Vec<Outgoing>,
        qos: u8,
        retain: bool,
    ) -> BoxFuture<'_, Vec<Outcome>> {
        let n = messages.len();
        // No properties: only the `mqtt` sink sets them, and it publishes elsewhere.
        for m in messages {
            self.publish(&m.topic, m.payload.into(), qos, retain);
        }
        Box::pin(std::future::ready(vec![Outcome::Delivered; n]))
    }
}

/// The client id of the sink `sink`'s connection: one per sink, since a broker lets only
/// one connection hold a client id.
fn republish_client_id(client_id: &str, sink: &str) -> String {
    format!("{client_id}-republish-{sink}")
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
