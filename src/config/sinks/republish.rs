//! Settings of the `republish` sink ([`crate::sink::republish`]), and what every sink that
//! publishes records as MQTT messages writes ([`PublishConfig`]: also the `mqtt` sink's):
//! the topic template is compiled here.

use serde::{Deserialize, Serialize};

use super::{Common, HasCommon, Problems, SinkSpec};
use crate::rule::template::Template;

super::sink_config! {
    /// `type: republish`.
    pub struct Config {
        #[serde(flatten)]
        pub publish: PublishConfig,
    }
}

/// How a record is published: its topic, QoS and retain flag.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Topic template, e.g. `processed/{{ topic }}` or `alerts/{{ vars.device }}`.
    pub topic: String,
    /// QoS of the messages published (0, 1 or 2); at 1 and 2 a record is delivered once
    /// the broker confirmed it (PUBACK, PUBCOMP).
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

fn default_qos() -> u8 {
    1
}

/// The `republish` sink's settings, compiled (also the publishing part of the `mqtt`
/// sink's).
#[derive(Debug)]
pub struct Settings {
    pub topic: Template,
    pub qos: u8,
    pub retain: bool,
    pub common: Common,
}

impl Config {
    /// Validates the settings and compiles the topic template.
    pub fn compile(self) -> Result<Settings, Problems> {
        let common = self.common();
        self.publish.compile(common)
    }
}

impl PublishConfig {
    /// Validates the fields and compiles the topic template, into the settings of a sink
    /// with the shared settings `common`.
    pub fn compile(self, common: Common) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let topic = Template::compile(&self.topic);
        if let Err(e) = &topic {
            errs.push(("topic".into(), format!("template: {e}")));
        }
        if self.qos > 2 {
            errs.push(("qos".into(), "must be 0, 1 or 2".into()));
        }
        match topic {
            Ok(topic) if errs.is_empty() => Ok(Settings {
                topic,
                qos: self.qos,
                retain: self.retain,
                common,
            }),
            _ => Err(errs),
        }
    }
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!("republish {} qos {}", self.topic.source(), self.qos)
    }
}
