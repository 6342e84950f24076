//! The sink that publishes each record as an MQTT message, through a [`Publish`]er: the
//! `republish` sink's goes to the broker mqbridge reads from (into the embedded broker, or
//! over a connection of the sink's own: see `app::publish`), the `mqtt` sink's to a
//! broker of its own ([`publish::Connection`](super::publish::Connection)). The topic is
//! rendered from the `topic` template; the payload is the record, a string as it is and
//! anything else as JSON. A record whose topic cannot be rendered fails on its own
//! (permanently); the others are published, and each succeeds or fails as the broker
//! answered it.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::publish::{Outgoing, Publish};
use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::mqtt::MessageProperties;
use crate::config::sinks::republish::Settings;
use crate::mqtt::OutgoingProperties;
use crate::record::Record;
use crate::rule::template::Template;
use crate::topic::validate_topic_name;

/// What writing `record` would do, for `mqbridge try`: published as `settings` say, with
/// `properties` (the `mqtt` sink's).
pub fn would(
    settings: &Settings,
    properties: Option<&MessageProperties>,
    origin: &Origin,
    record: &Record,
) -> String {
    let rendered = settings
        .topic
        .render(&origin.template_context(record))
        .map_err(|e| format!("topic template fails: {e}"))
        .and_then(|t| {
            let p = properties
                .map(|p| render_properties(p, origin, record))
                .transpose()
                .map_err(|e| e.message)?;
            Ok((t, p))
        });
    match rendered {
        Ok((t, p)) => format!(
            "publish to {t:?} qos {} retain {}{}",
            settings.qos,
            settings.retain,
            match p {
                Some(p) => format!(" with properties {p:?}"),
                None => String::new(),
            }
        ),
        Err(e) => e,
    }
}

pub struct RepublishSink {
    publisher: Arc<dyn Publish>,
    topic: Template,
    qos: u8,
    retain: bool,
    properties: Option<MessageProperties>,
}

impl RepublishSink {
    /// Publishes through `publisher` as `settings` say, each message with `properties`
    /// rendered for its record (the `mqtt` sink's; None for `republish`).
    pub fn new(
        settings: &Settings,
        properties: Option<MessageProperties>,
        publisher: Arc<dyn Publish>,
    ) -> Self {
        RepublishSink {
            publisher,
            topic: settings.topic.clone(),
            qos: settings.qos,
            retain: settings.retain,
            properties,
        }
    }

    /// The message a record is published as; a record whose topic or properties cannot
    /// be rendered fails on its own (permanently).
    fn render(&self, d: &Delivery) -> Result<Outgoing, SinkError> {
        let topic = self
            .topic
            .render(&d.origin.template_context(&d.record))
            .map_err(|e| SinkError::permanent(format!("topic template: {e}")))?;
        validate_topic_name(&topic)
            .map_err(|e| SinkError::permanent(format!("topic {topic:?}: {e}")))?;
        Ok(Outgoing {
            topic,
            payload: payload(&d.record),
            properties: self
                .properties
                .as_ref()
                .map(|p| render_properties(p, &d.origin, &d.record))
                .transpose()?,
        })
    }
}

/// The MQTT 5 properties of `record`'s message.
fn render_properties(
    p: &MessageProperties,
    origin: &Origin,
    record: &Record,
) -> Result<OutgoingProperties, SinkError> {
    let ctx = origin.template_context(record);
    let response_topic = match &p.response_topic {
        Some(t) => {
            let topic = t.render(&ctx).map_err(|e| {
                SinkError::permanent(format!("properties.response_topic template: {e}"))
            })?;
            validate_topic_name(&topic).map_err(|e| {
                SinkError::permanent(format!("properties.response_topic {topic:?}: {e}"))
            })?;
            Some(topic)
        }
        None => None,
    };
    let user_properties = p
        .user_properties
        .iter()
        .map(|(name, value)| {
            value.render(&ctx).map(|v| (name.clone(), v)).map_err(|e| {
                SinkError::permanent(format!("properties.user_properties.{name} template: {e}"))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(OutgoingProperties {
        message_expiry_interval: p.message_expiry,
        content_type: p.content_type.clone(),
        response_topic,
        user_properties,
    })
}

/// The payload a record is published as (also by the `nats` sink): a string as it is,
/// anything else as JSON.
pub fn payload(record: &Record) -> Vec<u8> {
    match record.as_str() {
        Some(s) => s.as_bytes().to_vec(),
        None => record.to_string().into_bytes(),
    }
}

impl Sink for RepublishSink {
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(super::prepared(
            batch,
            |d| self.render(d),
            move |out| self.publisher.publish_all(out, self.qos, self.retain),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::config::sinks::republish::Config;
    use crate::sink::ErrorKind;

    /// (message, qos, retain).
    type Published = (Outgoing, u8, bool);

    /// Remembers what it was asked to publish; fails when told to.
    #[derive(Default)]
    struct Recorder {
        published: Mutex<Vec<Published>>,
        fail: bool,
    }

    impl Publish for Recorder {
        fn publish_all(
            &self,
            messages: Vec<Outgoing>,
            qos: u8,
            retain: bool,
        ) -> BoxFuture<'_, Vec<Outcome>> {
            let mut published = self.published.lock().unwrap();
            let n = messages.len();
            for m in messages {
                published.push((m, qos, retain));
            }
            let result = match self.fail {
                true => Err(SinkError::transient("broker gone")),
                false => Ok(()),
            };
            Box::pin(std::future::ready(crate::sink::all(n, result)))
        }
    }

    fn sink(publisher: &Arc<Recorder>) -> RepublishSink {
        let cfg: Config = serde_json::from_value(
            json!({"topic": "out/{{ record.to }}", "qos": 2, "retain": true}),
        )
        .unwrap();
        RepublishSink::new(
            &cfg.compile().unwrap(),
            None,
            Arc::clone(publisher) as Arc<dyn Publish>,
        )
    }

    #[tokio::test]
    async fn records_are_published_as_rendered_and_a_bad_topic_fails_alone() {
        let publisher = Arc::new(Recorder::default());
        let batch = [
            Delivery::detached("in", json!({"to": "a"})),
            Delivery::detached("in", json!({"to": "+"})),
        ];
        let outcomes = sink(&publisher).write(&batch).await;
        assert!(matches!(outcomes[0], Outcome::Delivered), "{outcomes:?}");
        assert!(
            matches!(&outcomes[1], Outcome::Failed(e) if e.kind == ErrorKind::Permanent),
            "{outcomes:?}"
        );
        assert_eq!(
            *publisher.published.lock().unwrap(),
            [(
                Outgoing {
                    topic: "out/a".to_string(),
                    payload: br#"{"to":"a"}"#.to_vec(),
                    properties: None
                },
                2,
                true
            )]
        );
    }

    #[tokio::test]
    async fn a_failed_publish_fails_its_records() {
        let publisher = Arc::new(Recorder {
            fail: true,
            ..Recorder::default()
        });
        let batch = [
            Delivery::detached("in", json!({"to": "a"})),
            Delivery::detached("in", json!({"to": "b"})),
        ];
        let outcomes = sink(&publisher).write(&batch).await;
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Failed(e) if e.kind == ErrorKind::Transient)),
            "{outcomes:?}"
        );
        assert_eq!(publisher.published.lock().unwrap().len(), 2);
    }
}
