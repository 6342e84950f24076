//! Glue to rumqttc, the MQTT client: connection options from the validated broker plan.
//! Kept small and in one place so that the client library could be swapped.

use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::config::BrokerPlan;

/// Options for one connection to the configured broker.
///
/// `client_id` is the plan's id or a derived one (the republish connection); `persistent`
/// asks for a persistent session (clean session off) so the broker keeps our
/// subscriptions and unacknowledged messages while we are away.
pub fn options(
    plan: &BrokerPlan,
    client_id: &str,
    persistent: bool,
) -> anyhow::Result<MqttOptions> {
    anyhow::ensure!(!client_id.is_empty(), "client id must not be empty");
    let mut opts = MqttOptions::new(client_id, plan.host.clone(), plan.port);
    opts.set_keep_alive(plan.keep_alive)
        .set_clean_session(!persistent)
        .set_max_packet_size(plan.max_packet_size, plan.max_packet_size);
    if let Some(user) = &plan.username {
        opts.set_credentials(user.clone(), password(plan)?.unwrap_or_default());
    }
    if plan.tls {
        let transport = match &plan.ca_file {
            Some(path) => Transport::tls_with_config(TlsConfiguration::Simple {
                ca: std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("broker.ca_file {}: {e}", path.display()))?,
                alpn: None,
                client_auth: None,
            }),
            None => Transport::tls_with_default_config(),
        };
        opts.set_transport(transport);
    }
    Ok(opts)
}

/// The password from the plan or its `password_file`.
fn password(plan: &BrokerPlan) -> anyhow::Result<Option<String>> {
    if let Some(p) = &plan.password {
        return Ok(Some(p.0.clone()));
    }
    match &plan.password_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("broker.password_file {}: {e}", path.display()))?;
            Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
        }
        None => Ok(None),
    }
}

/// Reconnect backoff: exponential from 100 ms to 30 s, with full jitter.
#[derive(Debug)]
pub struct ReconnectBackoff {
    failures: u32,
}

impl ReconnectBackoff {
    pub fn new() -> Self {
        ReconnectBackoff { failures: 0 }
    }

    /// A connection attempt failed: how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let cap = Duration::from_millis(100)
            .saturating_mul(1u32 << self.failures.min(9))
            .min(Duration::from_secs(30));
        self.failures += 1;
        cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// Connected: start over.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self::new()
    }
}
