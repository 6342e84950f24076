//! Fingerprints of the settings a reload compares: what each sink was configured with,
//! and each setting that only takes effect at start. A fingerprint is a hash of the
//! setting as written (after `${VAR}` expansion), so the plan can say "this changed"
//! without keeping the text, which may hold secrets (a hash is safe to `Debug`).
//!
//! Only equality matters, within one process: two fingerprints are equal when the
//! settings serialize the same.

use std::hash::{Hash, Hasher};

use serde::Serialize;

use super::raw::RawConfig;

/// A setting's fingerprint.
pub type Fingerprint = u64;

/// The fingerprint of a setting as written.
pub fn of(value: &impl Serialize) -> Fingerprint {
    let text = serde_json::to_string(value).expect("config values serialize");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The settings a reload cannot apply (they need a restart), by the name a warning gives
/// them. The embedded broker's users, ACL and `allow_anonymous` (and `password_file` and
/// `acl_file`, read again by each reload), and `auth` (its JWT key file read again too),
/// are not among them: a reload applies those.
pub fn restart_only(raw: &RawConfig) -> Vec<(&'static str, Fingerprint)> {
    let embedded = raw.embedded.as_ref();
    vec![
        ("broker", of(&raw.broker)),
        ("embedded.listen", of(&embedded.map(|e| &e.listen))),
        // With the files it names (certificate, key, client CAs): read at start only. So
        // are the client certificate settings (`require_client_cert`, `username_from`).
        ("embedded.tls", of(&embedded.map(|e| &e.tls))),
        ("embedded.websocket", of(&embedded.map(|e| &e.websocket))),
        (
            "embedded.persistence",
            of(&embedded.map(|e| &e.persistence)),
        ),
        (
            "embedded limits (max_keepalive, max_packet_size, max_connections, max_inflight, max_queued_messages, connect_timeout, send_timeout, max_connecting, connection_rate_per_ip, max_publish_rate, max_subscriptions, max_topic_levels, max_topic_length, session_expiry, sys_interval)",
            of(&embedded.map(|e| {
                (
                    (
                        e.max_keepalive,
                        e.max_packet_size,
                        e.max_connections,
                        e.max_inflight,
                        e.max_queued_messages,
                    ),
                    (
                        e.connect_timeout,
                        e.send_timeout,
                        e.max_connecting,
                        e.connection_rate_per_ip.to_bits(),
                        e.max_publish_rate.to_bits(),
                        e.max_subscriptions,
                        e.max_topic_levels,
                        e.max_topic_length,
                    ),
                    e.session_expiry,
                    e.sys_interval,
                )
            })),
        ),
        ("embedded (on or off)", of(&embedded.is_some())),
        ("spool", of(&raw.spool)),
        ("admin", of(&raw.admin)),
        ("shutdown_timeout", of(&raw.shutdown_timeout)),
        ("unsettled_warning", of(&raw.unsettled_warning)),
        ("workers", of(&raw.workers)),
        ("eval_threads", of(&raw.eval_threads)),
    ]
}

/// The names of the restart-only settings that differ between two plans' lists.
pub fn changed(
    old: &[(&'static str, Fingerprint)],
    new: &[(&'static str, Fingerprint)],
) -> Vec<&'static str> {
    new.iter()
        .filter(|(name, fp)| old.iter().find(|(n, _)| n == name).map(|(_, f)| f) != Some(fp))
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> crate::config::Plan {
        crate::config::parse(text, "rules.yaml", |_| None).unwrap()
    }

    const BASE: &str = r#"
embedded: { listen: 127.0.0.1:1883, allow_anonymous: true }
sinks:
  a: { type: file, path: a.jsonl }
  b: { type: file, path: b.jsonl }
rules:
  - { name: r, from: "t/#", to: [a, b] }
"#;

    #[test]
    fn a_sink_fingerprint_changes_with_its_settings_only() {
        let before = plan(BASE);
        let after = plan(&BASE.replace("b.jsonl", "b2.jsonl").replace("t/#", "u/#"));
        assert_eq!(before.sinks[0].fingerprint, after.sinks[0].fingerprint);
        assert_ne!(before.sinks[1].fingerprint, after.sinks[1].fingerprint);
        assert!(changed(&before.restart_only, &after.restart_only).is_empty());
    }

    #[test]
    fn changed_restart_only_settings_are_named() {
        let before = plan(BASE);
        let after = plan(
            &(BASE
                .replace("1883", "1884")
                .replace(
                    "allow_anonymous: true",
                    r#"allow_anonymous: true, acl: [{ username: "*", action: deny, publish: ["x/#"] }]"#,
                )
                + "spool: { path: data/spool }\n"),
        );
        // The ACL is reloaded, not a restart-only setting.
        assert_eq!(
            changed(&before.restart_only, &after.restart_only),
            vec!["embedded.listen", "spool"]
        );
    }

    #[test]
    fn client_certificate_settings_need_a_restart() {
        let tls = |extra: &str| {
            BASE.replace(
                "allow_anonymous: true }",
                &format!("allow_anonymous: true, tls: {{ listen: [], cert_file: s.pem, key_file: s.key, client_ca_file: ca.pem{extra} }} }}"),
            )
        };
        let before = plan(&tls(""));
        for extra in [", username_from: cn", ", require_client_cert: false"] {
            let after = plan(&tls(extra));
            assert_eq!(
                changed(&before.restart_only, &after.restart_only),
                vec!["embedded.tls"]
            );
        }
    }
}
