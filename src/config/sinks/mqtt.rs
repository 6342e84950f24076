//! Settings of the `mqtt` sink: records published to a broker of their own, e.g. from an
//! edge site to a cloud broker. The connection is written as `broker:` is
//! ([`ConnectionConfig`]), the publishing as the `republish` sink's ([`PublishConfig`]);
//! the sink itself is a [`RepublishSink`](crate::sink::republish::RepublishSink) on a
//! connection to that broker (see [`crate::sink::open`]).

use super::republish::{self, PublishConfig};
use super::{Common, HasCommon, Problems, SinkSpec};
use crate::config::connection::{ConnectionConfig, ConnectionPlan};

super::sink_config! {
    /// `type: mqtt`.
    pub struct Config {
        #[serde(flatten)]
        pub connection: ConnectionConfig,
        #[serde(flatten)]
        pub publish: PublishConfig,
    }
}

/// The `mqtt` sink's settings: where it connects, and how it publishes.
#[derive(Debug)]
pub struct Settings {
    pub connection: ConnectionPlan,
    pub publish: republish::Settings,
}

impl Config {
    /// Validates the connection and the publishing settings; every problem of both.
    pub fn compile(self) -> Result<Settings, Problems> {
        let common = self.common();
        let connection = self.connection.validate();
        let publish = self.publish.compile(common);
        match (connection, publish) {
            (Ok(connection), Ok(publish)) => Ok(Settings {
                connection,
                publish,
            }),
            (connection, publish) => Err([connection.err(), publish.err()]
                .into_iter()
                .flatten()
                .flatten()
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
            "mqtt {} qos {} retain {} to {}",
            self.publish.topic.source(),
            self.publish.qos,
            self.publish.retain,
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
            "{type: mqtt, url: mqtt://h, client_id: c, topic: t, ca_file: ca.pem, password_file: p, username: u}",
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
    fn passwords_are_never_shown() {
        let plan = parse(CLOUD, "rules.yaml", |_| None).unwrap();
        let settings = &plan.sinks[0].settings;
        let origin = crate::sink::Delivery::detached("s/d1", serde_json::json!({})).origin;
        for shown in [
            format!("{plan:?}"),
            settings.spec().describe(),
            crate::sink::would(settings, &origin, &serde_json::json!({})),
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
