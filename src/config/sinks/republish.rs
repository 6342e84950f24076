//! Settings of the `republish` sink ([`crate::sink::republish`]).

use super::SinkSpec;
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
}
