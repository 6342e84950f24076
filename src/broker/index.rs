//! The subscription index: every subscription of every session in a topic trie, so that
//! routing a message costs in proportion to the subscriptions it matches, not to the
//! number of sessions.
//!
//! A filter is a path of levels from the root (`+` and `#` are levels like others); each
//! subscription sits at the node its filter ends on. A topic walks down the trie one
//! level at a time into three children at most: its own level, `+` (one level, any
//! value), and `#` (this level and all below, collected at once). A topic starting with
//! `$` skips the root's `+` and `#`.
//!
//! Each entry carries the ACL decision for its subscription ([`Receive`]), made when it
//! was indexed, so a message costs no ACL work unless the subscription overlaps a deny
//! rule. The index is derived from the sessions' subscriptions and changed only with
//! them (see [`super::router::Change`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::auth::Receive;
use super::session::{Outbound, Stored, Subscription};

/// The trie of every indexed subscription.
#[derive(Debug, Default)]
pub struct Index {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// By level as written in filters, `+` and `#` included.
    children: HashMap<Box<str>, Node>,
    /// Subscriptions whose filter ends here.
    entries: Vec<Entry>,
}

/// One session's subscription.
#[derive(Debug)]
pub struct Entry {
    pub client_id: Box<str>,
    /// The filter as the client wrote it (`$share/GROUP/` included): its key in the
    /// session's subscriptions.
    key: Box<str>,
    pub sub: Subscription,
    receive: Receive,
}

/// Where one message goes, as found in the index: one delivery per session (its
/// non-shared subscriptions merged), and the candidates of each shared subscription
/// group that wants it, for the router to pick one of.
#[derive(Debug)]
pub struct Fanout<'a> {
    pub deliveries: Vec<(&'a str, Outbound)>,
    /// By (share group, filter): every member's entry.
    pub groups: HashMap<(&'a str, &'a str), Vec<&'a Entry>>,
}

impl Index {
    /// Indexes `client_id`'s subscription `key` (replacing none: remove it first).
    pub fn insert(&mut self, client_id: &str, key: &str, sub: &Subscription, receive: Receive) {
        let mut node = &mut self.root;
        for level in sub.filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.entries.push(Entry {
            client_id: client_id.into(),
            key: key.into(),
            sub: sub.clone(),
            receive,
        });
    }

    /// Removes `client_id`'s subscription `key` to `filter`, and the nodes left empty.
    pub fn remove(&mut self, client_id: &str, key: &str, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_from(&mut self.root, &levels, client_id, key);
    }

    /// The subscriptions whose filter matches `topic`, unfiltered by the ACL.
    pub fn matching<'a>(&'a self, topic: &str) -> Vec<&'a Entry> {
        let mut found = Vec::new();
        collect(
            &self.root,
            topic.split('/'),
            topic.starts_with('$'),
            &mut found,
        );
        found
    }
}

impl<'a> Fanout<'a> {
    /// Where `msg` goes: of the subscriptions `found` [matching](Index::matching) its
    /// topic, those the ACL lets carry it, merged into one delivery per session (the
    /// highest QoS, every subscription identifier; no-local honoured) or collected by
    /// shared group. `retain` is the flag as published.
    pub fn new(found: Vec<&'a Entry>, msg: &Arc<Stored>, retain: bool) -> Fanout<'a> {
        let mut by_client: HashMap<&'a str, Outbound> = HashMap::new();
        let mut groups: HashMap<(&'a str, &'a str), Vec<&'a Entry>> = HashMap::new();
        for e in found {
            if !e.receive.allows(&msg.topic) {
                continue;
            }
            let sub = &e.sub;
            if let Some(group) = &sub.share {
                groups.entry((group, &sub.filter)).or_default().push(e);
                continue;
            }
            if sub.no_local && msg.from.as_deref() == Some(&*e.client_id) {
                continue;
            }
            let qos = sub.qos.min(msg.qos);
            let out = by_client.entry(&e.client_id).or_insert_with(|| Outbound {
                msg: Arc::clone(msg),
                qos,
                retain: false,
                subscription_ids: Vec::new(),
            });
            out.qos = out.qos.max(qos);
            out.retain |= retain && sub.retain_as_published;
            out.subscription_ids.extend(sub.id);
        }
        Fanout {
            deliveries: by_client.into_iter().collect(),
            groups,
        }
    }
}

/// Adds the entries under `node` that match the topic's remaining `levels`; `dollar`:
/// at the root of a topic starting with `$`, which wildcards do not match.
fn collect<'a>(
    node: &'a Node,
    mut levels: std::str::Split<'_, char>,
    dollar: bool,
    found: &mut Vec<&'a Entry>,
) {
    if !dollar && let Some(hash) = node.children.get("#") {
        found.extend(&hash.entries);
    }
    let Some(level) = levels.next() else {
        found.extend(&node.entries);
        return;
    };
    if let Some(child) = node.children.get(level) {
        collect(child, levels.clone(), false, found);
    }
    if !dollar && let Some(plus) = node.children.get("+") {
        collect(plus, levels, false, found);
    }
}

/// Removes the entry from the node at `levels` under `node`, and the nodes it leaves
/// empty.
fn remove_from(node: &mut Node, levels: &[&str], client_id: &str, key: &str) {
    let Some((level, rest)) = levels.split_first() else {
        node.entries
            .retain(|e| &*e.client_id != client_id || &*e.key != key);
        return;
    };
    let Some(child) = node.children.get_mut(*level) else {
        return;
    };
    remove_from(child, rest, client_id, key);
    if child.entries.is_empty() && child.children.is_empty() {
        node.children.remove(*level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::filter_matches;
    use proptest::prelude::*;

    fn sub(filter: &str) -> Subscription {
        Subscription {
            filter: filter.into(),
            share: None,
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
            granted: false,
        }
    }

    fn matching(index: &Index, topic: &str) -> Vec<String> {
        let mut keys: Vec<String> = index
            .matching(topic)
            .iter()
            .map(|e| e.key.to_string())
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let mut index = Index::default();
        for f in [
            "#", "+", "a/#", "a/+", "+/b", "a/b", "$SYS/#", "/+", "a/+/c",
        ] {
            index.insert("c", f, &sub(f), Receive::All);
        }
        assert_eq!(matching(&index, "a"), ["#", "+", "a/#"]);
        assert_eq!(matching(&index, "a/b"), ["#", "+/b", "a/#", "a/+", "a/b"]);
        assert_eq!(matching(&index, "a/x/c"), ["#", "a/#", "a/+/c"]);
        assert_eq!(matching(&index, "/x"), ["#", "/+"]);
        assert_eq!(matching(&index, "$SYS/x"), ["$SYS/#"]);
        assert_eq!(matching(&index, "$SYS"), ["$SYS/#"]);
    }

    #[test]
    fn removal_prunes_the_trie() {
        let mut index = Index::default();
        index.insert("c", "a/+/c", &sub("a/+/c"), Receive::All);
        index.insert("d", "a/+/c", &sub("a/+/c"), Receive::All);
        index.remove("c", "a/+/c", "a/+/c");
        index.remove("c", "a/+/c", "a/+/c");
        index.remove("c", "x", "x");
        assert_eq!(matching(&index, "a/b/c"), ["a/+/c"]);
        index.remove("d", "a/+/c", "a/+/c");
        assert!(matching(&index, "a/b/c").is_empty());
        assert!(index.root.children.is_empty(), "no empty nodes left");
    }

    proptest! {
        /// The trie finds exactly what a scan with `filter_matches` finds.
        #[test]
        fn agrees_with_a_scan(
            filters in prop::collection::vec(
                (prop::collection::vec(prop::sample::select(vec!["a", "b", "", "+", "$s"]), 1..4), any::<bool>())
                    .prop_map(|(mut v, hash)| { if hash { v.push("#") } v.join("/") }),
                0..20,
            ),
            topic in prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$s"]), 1..5)
                .prop_map(|v| v.join("/")),
        ) {
            let mut index = Index::default();
            for (i, f) in filters.iter().enumerate() {
                index.insert(&i.to_string(), f, &sub(f), Receive::All);
            }
            let mut found: Vec<usize> = index.matching(&topic).iter().map(|e| e.client_id.parse().unwrap()).collect();
            found.sort();
            let expected: Vec<usize> = (0..filters.len()).filter(|&i| filter_matches(&filters[i], &topic)).collect();
            prop_assert_eq!(found, expected);
        }
    }
}
