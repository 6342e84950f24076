//! `$SYS/broker/…`: the broker's figures, published to its own clients every
//! `embedded.sys_interval` under Mosquitto's topic names, so that dashboards and
//! `mosquitto_sub -t '$SYS/#' -v` made for Mosquitto keep working.
//!
//! Each figure is a retained QoS 0 message, published when it changed since the last
//! round (the version once). Clients read them like any topic, by subscribing to
//! `$SYS/#` or below (a filter starting with a wildcard never matches a `$` topic); the
//! ACL decides who may. No client may publish to a `$SYS` topic ([`is_sys`]). They count
//! among the retained messages, as in Mosquitto, but `persistence` does not keep them:
//! they are made again at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Shared;
use super::session::Stored;
use super::stats::Stats;

/// Is `topic` one of the broker's own?
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Publishes the figures every `every` until `stop`.
pub(super) async fn run(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let started = Instant::now();
    let mut last: HashMap<&'static str, String> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let stats = super::Broker {
            shared: Arc::clone(&shared),
        }
        .stats();
        for (topic, value) in figures(&stats, started.elapsed()) {
            if last.get(topic) == Some(&value) {
                continue;
            }
            let stored = || {
                Arc::new(Stored {
                    topic: topic.to_string(),
                    payload: value.clone().into(),
                    qos: 0,
                    properties: None,
                    expires_at: None,
                    from: None,
                })
            };
            shared.route(topic, true, stored);
            last.insert(topic, value);
        }
    }
}

/// Each topic and its value now.
fn figures(s: &Stats, uptime: Duration) -> [(&'static str, String); 14] {
    let stored = (s.queued + s.retained).to_string();
    let dropped: u64 = s.dropped.iter().sum();
    [
        (
            "$SYS/broker/version",
            format!("mqbridge version {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            (s.sessions - s.offline).to_string(),
        ),
        ("$SYS/broker/clients/disconnected", s.offline.to_string()),
        ("$SYS/broker/clients/total", s.sessions.to_string()),
        ("$SYS/broker/messages/received", s.received.to_string()),
        ("$SYS/broker/messages/sent", s.sent.to_string()),
        ("$SYS/broker/messages/stored", stored.clone()),
        ("$SYS/broker/store/messages/count", stored),
        (
            "$SYS/broker/publish/messages/received",
            s.received.to_string(),
        ),
        ("$SYS/broker/publish/messages/sent", s.sent.to_string()),
        ("$SYS/broker/publish/messages/dropped", dropped.to_string()),
        (
            "$SYS/broker/retained messages/count",
            s.retained.to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            s.subscriptions.to_string(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_use_mosquittos_names_and_forms() {
        let stats = Stats {
            connections: 2,
            sessions: 3,
            offline: 1,
            subscriptions: 4,
            queued: 5,
            retained: 6,
            received: 7,
            sent: 8,
            dropped: [1, 0, 2, 0, 0],
            ..Stats::default()
        };
        let figures: HashMap<&str, String> = figures(&stats, Duration::from_secs(61))
            .into_iter()
            .collect();
        for (topic, want) in [
            ("$SYS/broker/uptime", "61 seconds"),
            ("$SYS/broker/clients/connected", "2"),
            ("$SYS/broker/clients/disconnected", "1"),
            ("$SYS/broker/clients/total", "3"),
            ("$SYS/broker/messages/received", "7"),
            ("$SYS/broker/publish/messages/sent", "8"),
            ("$SYS/broker/publish/messages/dropped", "3"),
            ("$SYS/broker/messages/stored", "11"),
            ("$SYS/broker/retained messages/count", "6"),
            ("$SYS/broker/subscriptions/count", "4"),
        ] {
            assert_eq!(figures[topic], want, "{topic}");
        }
        assert!(figures["$SYS/broker/version"].starts_with("mqbridge version "));
        assert!(figures.keys().all(|t| is_sys(t)));
        assert!(!is_sys("$SYSTEM/x") && !is_sys("a/$SYS") && is_sys("$SYS"));
    }
}
