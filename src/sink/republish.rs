//! `republish` sink: publishes each record to the broker mqbridge reads from, on a
//! connection of its own (client id `<client_id>-republish`), so publishing never waits
//! on the source's event loop and the source's flow control never blocks publishing.
//! With the embedded broker there is no connection: records are handed to its
//! subscribers in-process (and to its retained store), which settles them at once; they
//! do not go through the rules again.
//!
//! A batch is written when the broker confirmed every message in it (PUBACK at QoS 1,
//! PUBCOMP at QoS 2, sent at QoS 0). If the connection drops or confirmation times out,
//! the connection is discarded and the batch fails as transient: the driver retries it on
//! a fresh connection, so no stale confirmation can be counted for a later batch.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};

use super::{Delivery, OpenContext, Origin, Outcome, Sink, SinkError, SinkSpec};
use crate::config::BrokerPlan;
use crate::mqtt::{self, Client, Incoming};
use crate::rule::template::Template;
use crate::topic::validate_topic_name;

/// How long a batch waits for the broker's confirmations.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

super::sink_config! {
    /// `type: republish`.
    pub struct Config {
        /// Topic template, e.g. `processed/{{ topic }}` or `alerts/{{ vars.device }}`.
        pub topic: String,
        #[serde(default = "default_qos")]
        pub qos: u8,
        #[serde(default)]
        pub retain: bool,
    }
}

impl SinkSpec for Config {
    fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        if let Err(e) = Template::compile(&self.topic) {
            errs.push(("topic", format!("template: {e}")));
        }
        if self.qos > 2 {
            errs.push(("qos", "must be 0, 1 or 2".into()));
        }
        errs
    }
    fn describe(&self) -> String {
        format!("republish {} qos {}", self.topic, self.qos)
    }
    fn would(&self, origin: &Origin, record: &serde_json::Value) -> String {
        match Template::compile(&self.topic)
            .and_then(|t| t.render(&origin.template_context(record)))
        {
            Ok(t) => format!("publish to {t:?} qos {} retain {}", self.qos, self.retain),
            Err(e) => format!("topic template fails: {e}"),
        }
    }
    fn open<'a>(&'a self, ctx: OpenContext<'a>) -> BoxFuture<'a, anyhow::Result<Arc<dyn Sink>>> {
        Box::pin(async move {
            if let Some(embedded) = ctx.embedded {
                return Ok(Arc::new(EmbeddedRepublish {
                    broker: embedded.clone(),
                    topic: Template::compile(&self.topic).map_err(anyhow::Error::msg)?,
                    qos: self.qos,
                    retain: self.retain,
                }) as Arc<dyn Sink>);
            }
            let broker = ctx
                .broker
                .ok_or_else(|| anyhow::anyhow!("republish needs `broker:` or `embedded:`"))?;
            Ok(Arc::new(RepublishSink::new(self, broker)?) as Arc<dyn Sink>)
        })
    }
}

fn default_qos() -> u8 {
    1
}

/// One live connection.
struct Conn {
    client: Client,
    /// Confirmations (Ok) and the connection's end (Err) from its poll task.
    events: mpsc::UnboundedReceiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct RepublishSink {
    broker: BrokerPlan,
    client_id: String,
    topic: Template,
    qos: u8,
    retain: bool,
    conn: Mutex<Option<Conn>>,
}

impl RepublishSink {
    pub fn new(cfg: &Config, broker: &BrokerPlan) -> anyhow::Result<Self> {
        Ok(RepublishSink {
            broker: broker.clone(),
            client_id: format!("{}-republish", broker.client_id),
            topic: Template::compile(&cfg.topic).map_err(anyhow::Error::msg)?,
            qos: cfg.qos,
            retain: cfg.retain,
            conn: Mutex::new(None),
        })
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let (client, mut eventloop) = mqtt::connect(&self.broker, &self.client_id, false, false)
            .map_err(|e| SinkError::transient(e.to_string()))?;
        let (tx, mut events) = mpsc::unbounded_channel();
        let qos0 = self.qos == 0;
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(Incoming::Connected { .. } | Incoming::Confirmed) => Ok(()),
                    Ok(Incoming::Sent) if qos0 => Ok(()),
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
            Ok(Some(Ok(()))) => Ok(Conn {
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

    /// Publishes the rendered records over the connection (made on first use, and again
    /// after a failure); they succeed or fail as a whole.
    async fn publish_all(&self, out: Vec<(String, Vec<u8>)>) -> Result<(), SinkError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            *guard = Some(self.connect().await?);
        }
        let conn = guard.as_mut().expect("connected above");
        let result = Self::send_and_confirm(conn, out, self.qos, self.retain).await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    async fn send_and_confirm(
        conn: &mut Conn,
        out: Vec<(String, Vec<u8>)>,
        qos: u8,
        retain: bool,
    ) -> Result<(), SinkError> {
        let expected = out.len();
        for (topic, payload) in out {
            conn.client
                .publish(topic, qos, retain, payload)
                .await
                .map_err(|e| SinkError::transient(format!("republish: {e}")))?;
        }
        let mut confirmed = 0;
        let wait = async {
            while confirmed < expected {
                match conn.events.recv().await {
                    Some(Ok(())) => confirmed += 1,
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

/// The topic and payload a record is published as; a record whose topic cannot be
/// rendered fails on its own (permanently).
fn render(topic: &Template, d: &Delivery) -> Result<(String, Vec<u8>), SinkError> {
    let topic = topic
        .render(&d.origin.template_context(&d.record))
        .map_err(|e| SinkError::permanent(format!("topic template: {e}")))?;
    validate_topic_name(&topic)
        .map_err(|e| SinkError::permanent(format!("topic {topic:?}: {e}")))?;
    let payload = match &d.record {
        serde_json::Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    };
    Ok((topic, payload))
}

/// Republishing into the embedded broker, in-process.
struct EmbeddedRepublish {
    broker: crate::broker::Broker,
    topic: Template,
    qos: u8,
    retain: bool,
}

impl Sink for EmbeddedRepublish {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| render(&self.topic, d),
            move |out| async move {
                let n = out.len();
                for (topic, payload) in out {
                    self.broker
                        .publish(&topic, payload.into(), self.qos, self.retain);
                }
                vec![Outcome::Delivered; n]
            },
        ))
    }
}

impl Sink for RepublishSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| render(&self.topic, d),
            move |out| async move {
                let n = out.len();
                super::all(n, self.publish_all(out).await)
            },
        ))
    }
}
