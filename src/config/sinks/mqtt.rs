//! Settings of the `mqtt` sink: records published to a broker of their own, e.g. from an
//! edge site to a cloud broker. The connection is written as `broker:` is
//! ([`ConnectionConfig`]), the publishing as the `republish` sink's ([`PublishConfig`]);
//! the sink itself is a [`RepublishSink`](crate::sink::republish::RepublishSink) on a
//! connection to that broker (see [`crate::sink::open`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::republish::{self, PublishConfig};
use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::connection::{ConnectionConfig, ConnectionPlan};
use crate::config::raw::Protocol;
use crate::config::units;
use crate::rule::template::Template;

super::sink_config! {
    /// `type: mqtt`.
    pub struct Config {
        #[serde(flatten)]
        pub connection: ConnectionConfig,
        #[serde(flatten)]
        pub publish: PublishConfig,
        /// MQTT 5 properties of each message (`protocol: 5` only).
        #[serde(default)]
        pub properties: Option<PropertiesConfig>,
    }
}

/// `properties:`, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertiesConfig {
    /// How long the broker keeps a message for subscribers that have not got it yet
    /// (message expiry interval, whole seconds).
    #[serde(default)]
    pub message_expiry: Option<units::Duration>,
    /// Content type, e.g. `application/json`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Response topic template.
    #[serde(default)]
    pub response_topic: Option<String>,
    /// User properties: name → value template.
    #[serde(default)]
    pub user_properties: BTreeMap<String, String>,
}

/// `properties:`, compiled: the templates each message renders.
#[derive(Debug, Clone)]
pub struct MessageProperties {
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<Template>,
    pub user_properties: Vec<(String, Template)>,
}

impl PropertiesConfig {
    fn compile(&self, problem: &mut impl FnMut(String, String)) -> MessageProperties {
        let message_expiry = self.message_expiry.and_then(|d| {
            let secs = d.0.as_secs();
            if d.0.subsec_nanos() != 0 || secs == 0 || secs > u64::from(u32::MAX) {
                problem(
                    "properties.message_expiry".into(),
                    "must be whole seconds, from 1s to 4294967295s".into(),
                );
            }
            u32::try_from(secs).ok()
        });
        let mut template = |field: String, source: &str| match Template::compile(source) {
            Ok(t) => Some(t),
            Err(e) => {
                problem(field, format!("template: {e}"));
                None
            }
        };
        let response_topic = self
            .response_topic
            .as_deref()
            .and_then(|t| template("properties.response_topic".into(), t));
        let user_properties = self
            .user_properties
            .iter()
            .filter_map(|(name, value)| {
                let field = format!("properties.user_properties.{name}");
                Some((name.clone(), template(field, value)?))
            })
            .collect();
        MessageProperties {
            message_expiry,
            content_type: self.content_type.clone(),
            response_topic,
            user_properties,
        }
    }
}

/// The `mqtt` sink's settings: where it connects, and how it publishes.
#[derive(Debug)]
pub struct Settings {
    pub connection: ConnectionPlan,
    pub publish: republish::Settings,
    pub properties: Option<MessageProperties>,
}

impl Config {
    /// Validates the connection and the publishing settings; every problem of both.
    pub fn compile(self) -> Result<Settings, Problems> {
        let common = self.common();
        let mut errs = Problems::new();
        let properties = self.properties.as_ref().map(|p| {
            if self.connection.protocol != Protocol::V5 {
                errs.push((
                    "properties".into(),
                    "MQTT 5 properties need `protocol: 5`".into(),
                ));
            }
            p.compile(&mut |field, message| errs.push((field, message)))
        });
        let connection = self.connection.validate();
        let publish = self.publish.compile(common);
        match (connection, publish) {
            (Ok(connection), Ok(publish)) if errs.is_empty() => Ok(Settings {
                connection,
                publish,
                properties,
            }),
            (connection, publish) => Err([connection.err(), publish.err()]
                .into_iter()
                .flatten()
                .flatten()
                .chain(errs)
                .collect()),
        }
    }

    /// The files the sink reads when it connects, as (field, path).
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        self.connection.files()
    }
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.publish.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!(
            "mqtt {} qos {} retain {}{} to {}",
            self.publish.topic.source(),
            self.publish.qos,
            self.publish.retain,
            if self.properties.is_some() {
                " with MQTT 5 properties"
            } else {
                ""
            },
            self.connection.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::SinkSettings;
    use crate::config::parse;

    const CLOUD: &str = r#"embedded: { allow_anonymous: true }
sinks:
  cloud:
    type: mqtt
    url: mqtts://edge:url-s3cret@cloud.test
    client_id: edge-1
    password: inline-s3cret
    protocol: 5
    topic: "cloud/{{ vars.device }}"
    qos: 2
    retain: true
rules:
  - { name: r, from: "s/{device}", to: cloud }
"#;

    /// Every field the sink reads (as it serializes back) is a property of its variant in
    /// the JSON schema, and the schema has no other.
    #[test]
    fn the_schema_has_every_setting() {
        let properties = crate::config::sinks::schema_properties_are_the_settings(
            "{type: mqtt, url: mqtt://h, client_id: c, topic: t, ca_file: ca.pem, password_file: p, username: u, \
             protocol: 5, properties: {message_expiry: 1h}}",
            "mqtt",
        );
        for key in [
            "url",
            "client_id",
            "topic",
            "qos",
            "retain",
            "protocol",
            "ca_file",
            "properties",
        ] {
            assert!(properties.iter().any(|p| p == key), "{key}");
        }
    }

    #[test]
    fn the_connection_and_the_publishing_settings_are_compiled() {
        let plan = parse(CLOUD, "rules.yaml", |_| None).unwrap();
        let SinkSettings::Mqtt(s) = &plan.sinks[0].settings else {
            panic!("an mqtt sink")
        };
        let c = &s.connection;
        assert_eq!((c.host.as_str(), c.port, c.tls), ("cloud.test", 8883, true));
        assert_eq!(c.username.as_deref(), Some("edge"));
        assert_eq!(c.password.as_ref().unwrap().0, "inline-s3cret");
        assert_eq!((s.publish.qos, s.publish.retain), (2, true));
    }

    #[test]
    fn mqtt5_properties_are_compiled_and_checked() {
        let with = |props: &str, protocol: &str| {
            CLOUD
                .replace("protocol: 5", &format!("protocol: {protocol}"))
                .replace(
                    "retain: true",
                    &format!("retain: true\n    properties: {props}"),
                )
        };
        let text = with(
            "{message_expiry: 2m, content_type: text/plain, response_topic: \"r/{{ vars.device }}\", user_properties: {d: \"{{ vars.device }}\"}}",
            "5",
        );
        let plan = parse(&text, "rules.yaml", |_| None).unwrap();
        let SinkSettings::Mqtt(s) = &plan.sinks[0].settings else {
            panic!("an mqtt sink")
        };
        let p = s.properties.as_ref().unwrap();
        assert_eq!(p.message_expiry, Some(120));
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.user_properties[0].0, "d");
        let origin = crate::sink::Origin::from_message(
            &crate::message::Message::detached("s/d1", "{}", 1),
            &std::sync::Arc::from("r"),
            crate::topic::Vars::new(&[("device", "d1")]),
        );
        let shown = crate::sink::would(
            &plan.sinks[0].settings,
            &origin,
            &serde_json::json!({}).into(),
        );
        assert!(
            shown.contains("with properties")
                && shown.contains("text/plain")
                && shown.contains("\"r/d1\""),
            "{shown}"
        );

        for (props, protocol, want) in [
            (
                "{content_type: a}",
                "3.1.1",
                "sinks.cloud.properties: MQTT 5 properties need `protocol: 5`",
            ),
            (
                "{message_expiry: 1500ms}",
                "5",
                "sinks.cloud.properties.message_expiry: must be whole seconds",
            ),
            (
                "{user_properties: {a: \"{{ x\"}}",
                "5",
                "sinks.cloud.properties.user_properties.a: template",
            ),
        ] {
            let errs = match parse(&with(props, protocol), "rules.yaml", |_| None) {
                Ok(_) => panic!("{props}: expected an error"),
                Err(e) => e.to_string(),
            };
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
    }

    #[test]
    fn passwords_are_never_shown() {
        let plan = parse(CLOUD, "rules.yaml", |_| None).unwrap();
        let settings = &plan.sinks[0].settings;
        let origin = crate::sink::Delivery::detached("s/d1", serde_json::json!({})).origin;
        for shown in [
            format!("{plan:?}"),
            settings.spec().describe(),
            crate::sink::would(settings, &origin, &serde_json::json!({}).into()),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn problems_of_both_parts_are_reported_at_their_fields() {
        let text = CLOUD
            .replace("mqtts://edge:url-s3cret@cloud.test", "http://cloud.test")
            .replace("qos: 2", "qos: 3")
            .replace("client_id: edge-1", "client_id: \"\"");
        let errs = match parse(&text, "rules.yaml", |_| None) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e.to_string(),
        };
        for want in [
            "rules.yaml:5:10: sinks.cloud.url: unsupported scheme \"http\"",
            "rules.yaml:6:16: sinks.cloud.client_id: must not be empty",
            "rules.yaml:10:10: sinks.cloud.qos: must be 0, 1 or 2",
        ] {
            assert!(errs.contains(want), "missing {want:?} in\n{errs}");
        }
    }
}
