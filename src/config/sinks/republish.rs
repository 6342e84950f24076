//! Settings of the `republish` sink ([`crate::sink::republish`]): the topic template is
//! compiled here.

use super::{Common, HasCommon, Problems, SinkSpec};
use crate::rule::template::Template;

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

fn default_qos() -> u8 {
    1
}

/// The `republish` sink's settings, compiled.
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
                common: self.common(),
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
