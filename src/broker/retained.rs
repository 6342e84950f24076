//! Retained messages: the last message published with the retain flag on each topic,
//! sent to every new matching subscription. An empty payload clears the topic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::session::Stored;
use crate::topic::filter_matches;

#[derive(Debug, Default)]
pub struct Retained {
    by_topic: HashMap<String, Arc<Stored>>,
    /// Topics set or cleared since [`super::store`] last wrote them.
    changed: HashSet<String>,
}

impl Retained {
    /// Stores, replaces or (empty payload) clears the retained message of its topic.
    pub fn set(&mut self, msg: Arc<Stored>) {
        self.changed.insert(msg.topic.clone());
        if msg.payload.is_empty() {
            self.by_topic.remove(&msg.topic);
        } else {
            self.by_topic.insert(msg.topic.clone(), msg);
        }
    }

    /// Unexpired retained messages whose topic matches `filter`.
    pub fn matching(&mut self, filter: &str) -> Vec<Arc<Stored>> {
        let now = Instant::now();
        let changed = &mut self.changed;
        self.by_topic.retain(|topic, m| {
            let keep = !m.expired(now);
            if !keep {
                changed.insert(topic.clone());
            }
            keep
        });
        let mut found: Vec<Arc<Stored>> = self
            .by_topic
            .values()
            .filter(|m| filter_matches(filter, &m.topic))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        found
    }

    /// Takes the topics changed since the last call, each with its message (None: cleared).
    pub fn take_changes(&mut self) -> Vec<(String, Option<Arc<Stored>>)> {
        self.changed
            .drain()
            .map(|t| {
                let m = self.by_topic.get(&t).cloned();
                (t, m)
            })
            .collect()
    }

    /// Every retained message (to write the whole store again).
    pub fn all(&self) -> Vec<(String, Option<Arc<Stored>>)> {
        self.by_topic
            .iter()
            .map(|(t, m)| (t.clone(), Some(Arc::clone(m))))
            .collect()
    }

    /// Puts back a persisted message (not a change).
    pub fn restore(&mut self, msg: Arc<Stored>) {
        self.by_topic.insert(msg.topic.clone(), msg);
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &'static str) -> Arc<Stored> {
        Arc::new(Stored {
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: 1,
            properties: None,
            expires_at: None,
            from: None,
        })
    }

    #[test]
    fn set_replace_clear() {
        let mut r = Retained::default();
        r.set(msg("a/b", "1"));
        r.set(msg("a/c", "2"));
        r.set(msg("a/b", "3"));
        let found = r.matching("a/+");
        assert_eq!(found.len(), 2);
        assert_eq!(&found[0].payload[..], b"3");
        r.set(msg("a/b", ""));
        assert_eq!(r.matching("#").len(), 1);
        assert!(r.matching("$SYS/#").is_empty());
        r.set(msg("$SYS/x", "1"));
        assert_eq!(r.matching("#").len(), 1, "'#' does not match $ topics");
        assert_eq!(r.len(), 2);
    }
}
