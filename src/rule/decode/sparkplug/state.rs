//! What the Sparkplug B decoder remembers of each edge node, from the messages it saw in
//! arrival order: the metrics of its last NBIRTH and of each of its devices' last DBIRTH
//! (their aliases and datatypes, which DATA messages leave out), the `seq` of its last
//! message (to see gaps), the `bdSeq` of its NBIRTH (to tell an NDEATH of an earlier
//! session from its own) and when a rebirth was last asked of it.
//!
//! Bounded: at most [`MAX_NODES`] edge nodes and [`MAX_DEVICES`] devices per node; past
//! that the one seen least recently is forgotten (its data is then read as if its birth
//! had not been seen, and with `rebirth_on_gap` a rebirth is asked for).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::payload::{Metric, Payload};
use super::{Kind, Topic};

/// The most edge nodes remembered.
pub const MAX_NODES: usize = 10_000;
/// The most devices remembered per edge node.
pub const MAX_DEVICES: usize = 10_000;
/// How long after asking an edge node for a rebirth the next request may go out, so that
/// a burst of gaps or unknown aliases asks once.
pub const REBIRTH_INTERVAL: Duration = Duration::from_secs(10);

/// Every edge node's state, by (group, edge node).
#[derive(Debug, Clone)]
pub struct State {
    nodes: HashMap<(String, String), Node>,
    /// Counts messages; a node's or device's `used` is the count when it was last seen.
    tick: u64,
    rebirth_on_gap: bool,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Whether its NBIRTH was seen (a node first seen by its data has not).
    born: bool,
    /// The `seq` of the last message from it that had one.
    seq: Option<u8>,
    /// The `bdSeq` metric of its NBIRTH.
    bd_seq: Option<u64>,
    metrics: Births,
    devices: HashMap<String, Device>,
    rebirth_asked: Option<Instant>,
    used: u64,
}

#[derive(Debug, Clone, Default)]
struct Device {
    metrics: Births,
    used: u64,
}

/// The metrics a birth announced: by alias (name and datatype) and by name (datatype).
#[derive(Debug, Clone, Default)]
struct Births {
    aliases: HashMap<u64, (String, Option<u32>)>,
    datatypes: HashMap<String, u32>,
}

/// A `seq` that is not the one after the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub expected: u8,
    pub got: u8,
}

/// What seeing one message told.
#[derive(Debug, Default, PartialEq)]
pub struct Seen {
    pub gap: Option<Gap>,
    /// Why to ask the edge node for a rebirth now (only with `rebirth_on_gap`, and not
    /// within [`REBIRTH_INTERVAL`] of the last request).
    pub rebirth: Option<String>,
    /// An NDEATH whose `bdSeq` is not the one of the node's NBIRTH: it ends an earlier
    /// session (its will, delivered late) and the node is still online.
    pub stale: bool,
    /// NDEATH: the devices of the node that had a DBIRTH, which go offline with it.
    pub devices: Vec<String>,
}

impl Births {
    fn of(metrics: &[Metric]) -> Births {
        let mut births = Births::default();
        for m in metrics {
            let Some(name) = &m.name else { continue };
            if let Some(alias) = m.alias {
                births.aliases.insert(alias, (name.clone(), m.datatype));
            }
            if let Some(dt) = m.datatype {
                births.datatypes.insert(name.clone(), dt);
            }
        }
        births
    }

    /// Gives each metric its name (from its alias) and datatype when the message left
    /// them out; false when an alias is not known.
    fn resolve(births: Option<&Births>, metrics: &mut [Metric]) -> bool {
        let mut known = true;
        for m in metrics {
            match (&m.name, m.alias) {
                (None, Some(alias)) => match births.and_then(|b| b.aliases.get(&alias)) {
                    Some((name, dt)) => {
                        m.name = Some(name.clone());
                        m.datatype = m.datatype.or(*dt);
                    }
                    None => known = false,
                },
                (Some(name), _) if m.datatype.is_none() => {
                    m.datatype = births.and_then(|b| b.datatypes.get(name)).copied();
                }
                _ => {}
            }
        }
        known
    }
}

impl State {
    pub fn new(rebirth_on_gap: bool) -> State {
        State {
            nodes: HashMap::new(),
            tick: 0,
            rebirth_on_gap,
        }
    }

    /// The same state, asking for rebirths or not as `yes` says.
    pub fn with_rebirth_on_gap(self, yes: bool) -> State {
        State {
            rebirth_on_gap: yes,
            ..self
        }
    }

    /// A copy holding only the edge node `group`/`edge_node`: what `try` and replays
    /// read a message against, leaving the state itself as it is.
    pub fn snapshot(&self, group: &str, edge_node: &str) -> State {
        let key = (group.to_string(), edge_node.to_string());
        State {
            nodes: self
                .nodes
                .get_key_value(&key)
                .map(|(k, n)| (k.clone(), n.clone()))
                .into_iter()
                .collect(),
            tick: self.tick,
            rebirth_on_gap: self.rebirth_on_gap,
        }
    }

    /// Takes in one message (in arrival order): fills in the names and datatypes its
    /// metrics left to the births, and updates what is known of its node.
    pub fn see(&mut self, t: &Topic<'_>, payload: &mut Payload, now: Instant) -> Seen {
        self.tick += 1;
        let key = (t.group.to_string(), t.edge_node.to_string());
        let mut seen = Seen::default();
        match t.kind {
            Kind::NBirth => {
                let node = self.node(key);
                *node = Node {
                    born: true,
                    seq: seq(payload.seq),
                    bd_seq: bd_seq(payload),
                    metrics: Births::of(&payload.metrics),
                    used: node.used,
                    ..Node::default()
                };
            }
            Kind::NDeath => {
                let stale = self.nodes.get(&key).is_some_and(|node| {
                    matches!((node.bd_seq, bd_seq(payload)), (Some(born), Some(died)) if born != died)
                });
                if stale {
                    seen.stale = true;
                } else if let Some(node) = self.nodes.remove(&key) {
                    seen.devices = node.devices.into_keys().collect();
                    seen.devices.sort();
                }
            }
            Kind::NCmd | Kind::DCmd => {
                // Commands to the node: read with its births, changing nothing.
                let node = self.nodes.get(&key);
                let births = match t.device {
                    Some(d) => node.and_then(|n| n.devices.get(d)).map(|d| &d.metrics),
                    None => node.map(|n| &n.metrics),
                };
                Births::resolve(births, &mut payload.metrics);
            }
            Kind::NData | Kind::DBirth | Kind::DData | Kind::DDeath => {
                let tick = self.tick;
                let rebirth_on_gap = self.rebirth_on_gap;
                let node = self.node(key);
                let mut why = None;
                if let Some(got) = seq(payload.seq) {
                    if let Some(last) = node.seq {
                        let expected = last.wrapping_add(1);
                        if got != expected {
                            seen.gap = Some(Gap { expected, got });
                            why = Some(format!("seq gap: expected {expected}, got {got}"));
                        }
                    }
                    node.seq = Some(got);
                }
                if !node.born {
                    why.get_or_insert_with(|| "data before its NBIRTH".into());
                }
                let device = t.device.unwrap_or_default();
                match t.kind {
                    Kind::NData => {
                        if !Births::resolve(Some(&node.metrics), &mut payload.metrics) {
                            why.get_or_insert_with(|| "an alias its NBIRTH did not define".into());
                        }
                    }
                    Kind::DBirth => {
                        if !node.devices.contains_key(device) && node.devices.len() >= MAX_DEVICES {
                            forget_oldest(&mut node.devices, |d| d.used);
                        }
                        let metrics = Births::of(&payload.metrics);
                        node.devices.insert(
                            device.to_string(),
                            Device {
                                metrics,
                                used: tick,
                            },
                        );
                    }
                    Kind::DData => match node.devices.get_mut(device) {
                        Some(d) => {
                            d.used = tick;
                            if !Births::resolve(Some(&d.metrics), &mut payload.metrics) {
                                why.get_or_insert_with(|| {
                                    format!("an alias the DBIRTH of {device} did not define")
                                });
                            }
                        }
                        None => {
                            Births::resolve(None, &mut payload.metrics);
                            why.get_or_insert_with(|| {
                                format!("data of {device} before its DBIRTH")
                            });
                        }
                    },
                    _ => {
                        node.devices.remove(device);
                    }
                }
                let due = node
                    .rebirth_asked
                    .is_none_or(|asked| now.saturating_duration_since(asked) >= REBIRTH_INTERVAL);
                if rebirth_on_gap && due && why.is_some() {
                    node.rebirth_asked = Some(now);
                    seen.rebirth = why;
                }
            }
        }
        seen
    }

    /// The node of `key`, made (not born) when it is new, marked as seen now.
    fn node(&mut self, key: (String, String)) -> &mut Node {
        if !self.nodes.contains_key(&key) && self.nodes.len() >= MAX_NODES {
            forget_oldest(&mut self.nodes, |n| n.used);
        }
        let node = self.nodes.entry(key).or_default();
        node.used = self.tick;
        node
    }
}

/// Removes the entry seen least recently.
fn forget_oldest<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, used: fn(&V) -> u64) {
    if let Some(k) = map
        .iter()
        .min_by_key(|(_, v)| used(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&k);
    }
}

/// A `seq` as Sparkplug has it, 0 to 255 (anything else is not one).
fn seq(seq: Option<u64>) -> Option<u8> {
    seq.and_then(|s| u8::try_from(s).ok())
}

/// The value of the `bdSeq` metric, which ties an NDEATH to its NBIRTH.
fn bd_seq(payload: &Payload) -> Option<u64> {
    use super::payload::Raw;
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Raw::Long(v) => Some(v),
            Raw::Int(v) => Some(u64::from(v)),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::super::payload::Raw;
    use super::*;

    fn topic(kind: Kind, device: Option<&'static str>) -> Topic<'static> {
        Topic {
            group: "G",
            kind,
            edge_node: "E",
            device,
        }
    }

    fn metric(name: Option<&str>, alias: Option<u64>, datatype: Option<u32>, v: Raw) -> Metric {
        Metric {
            name: name.map(str::to_string),
            alias,
            datatype,
            value: v,
            ..Metric::default()
        }
    }

    fn payload(seq: u64, metrics: Vec<Metric>) -> Payload {
        Payload {
            timestamp: None,
            seq: Some(seq),
            metrics,
        }
    }

    fn birth(seq: u64) -> Payload {
        payload(
            seq,
            vec![
                metric(Some("bdSeq"), None, Some(4), Raw::Long(7)),
                metric(Some("Temperature"), Some(1), Some(9), Raw::Float(20.0)),
                metric(Some("Running"), Some(2), Some(11), Raw::Bool(true)),
                metric(Some("Label"), None, Some(12), Raw::Text("a".into())),
            ],
        )
    }

    fn names(p: &Payload) -> Vec<(Option<&str>, Option<u32>)> {
        p.metrics
            .iter()
            .map(|m| (m.name.as_deref(), m.datatype))
            .collect()
    }

    #[test]
    fn aliases_resolve_from_the_last_birth_of_the_node_or_device() {
        let mut state = State::new(false);
        let now = Instant::now();
        state.see(&topic(Kind::NBirth, None), &mut birth(0), now);
        let mut data = payload(
            1,
            vec![
                metric(None, Some(2), None, Raw::Bool(false)),
                metric(None, Some(1), None, Raw::Float(21.0)),
                metric(Some("Label"), None, None, Raw::Text("b".into())),
            ],
        );
        let seen = state.see(&topic(Kind::NData, None), &mut data, now);
        assert_eq!(seen, Seen::default());
        assert_eq!(
            names(&data),
            [
                (Some("Running"), Some(11)),
                (Some("Temperature"), Some(9)),
                (Some("Label"), Some(12))
            ]
        );

        // A device's aliases are its own: alias 1 is another metric there.
        let mut dbirth = payload(
            2,
            vec![metric(Some("Pump/Speed"), Some(1), Some(3), Raw::Int(5))],
        );
        state.see(&topic(Kind::DBirth, Some("D1")), &mut dbirth, now);
        let mut ddata = payload(3, vec![metric(None, Some(1), None, Raw::Int(6))]);
        state.see(&topic(Kind::DData, Some("D1")), &mut ddata, now);
        assert_eq!(names(&ddata), [(Some("Pump/Speed"), Some(3))]);

        // A new NBIRTH replaces the node's aliases and forgets its devices.
        let mut rebirth = payload(
            0,
            vec![metric(
                Some("Pressure"),
                Some(1),
                Some(10),
                Raw::Double(1.0),
            )],
        );
        state.see(&topic(Kind::NBirth, None), &mut rebirth, now);
        let mut data = payload(1, vec![metric(None, Some(1), None, Raw::Double(2.0))]);
        state.see(&topic(Kind::NData, None), &mut data, now);
        assert_eq!(names(&data), [(Some("Pressure"), Some(10))]);
        let mut ddata = payload(2, vec![metric(None, Some(1), None, Raw::Int(6))]);
        state.see(&topic(Kind::DData, Some("D1")), &mut ddata, now);
        assert_eq!(names(&ddata), [(None, None)], "D1 needs a DBIRTH again");
    }

    #[test]
    fn seq_wraps_from_255_to_0_and_a_jump_is_a_gap() {
        let mut state = State::new(false);
        let now = Instant::now();
        state.see(&topic(Kind::NBirth, None), &mut birth(254), now);
        let data = |s: &mut State, seq| {
            s.see(&topic(Kind::NData, None), &mut payload(seq, vec![]), now)
                .gap
        };
        assert_eq!(data(&mut state, 255), None);
        assert_eq!(data(&mut state, 0), None, "255 → 0 is the next one");
        assert_eq!(data(&mut state, 1), None);
        assert_eq!(
            data(&mut state, 4),
            Some(Gap {
                expected: 2,
                got: 4
            })
        );
        assert_eq!(
            data(&mut state, 5),
            None,
            "counted on from the one that came"
        );
        // Device messages count in the node's sequence.
        let device = state.see(
            &topic(Kind::DData, Some("D1")),
            &mut payload(6, vec![]),
            now,
        );
        assert_eq!(device.gap, None);
        assert_eq!(
            data(&mut state, 6),
            Some(Gap {
                expected: 7,
                got: 6
            }),
            "a repeat is a gap too"
        );
        // A seq beyond 255 is not one: not checked, not remembered.
        assert_eq!(data(&mut state, 300), None);
        assert_eq!(data(&mut state, 7), None);
    }

    #[test]
    fn a_rebirth_is_asked_for_gaps_unknown_aliases_and_data_before_birth_once_per_interval() {
        let mut state = State::new(true);
        let t0 = Instant::now();
        // Data from a node never seen born (e.g. after mqbridge restarted).
        let seen = state.see(&topic(Kind::NData, None), &mut payload(9, vec![]), t0);
        assert_eq!(seen.rebirth.as_deref(), Some("data before its NBIRTH"));
        let seen = state.see(
            &topic(Kind::NData, None),
            &mut payload(12, vec![]),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(
            seen.gap,
            Some(Gap {
                expected: 10,
                got: 12
            })
        );
        assert_eq!(seen.rebirth, None, "asked a second ago");
        // The birth comes; a gap later asks again, at once.
        state.see(
            &topic(Kind::NBirth, None),
            &mut birth(0),
            t0 + Duration::from_secs(2),
        );
        let seen = state.see(
            &topic(Kind::NData, None),
            &mut payload(3, vec![]),
            t0 + Duration::from_secs(2),
        );
        assert_eq!(seen.rebirth.as_deref(), Some("seq gap: expected 1, got 3"));
        let later = t0 + Duration::from_secs(2) + REBIRTH_INTERVAL;
        let mut unknown = payload(4, vec![metric(None, Some(99), None, Raw::Int(1))]);
        let seen = state.see(&topic(Kind::NData, None), &mut unknown, later);
        assert_eq!(
            seen.rebirth.as_deref(),
            Some("an alias its NBIRTH did not define")
        );

        // Without rebirth_on_gap, gaps are only reported.
        let mut quiet = State::new(false);
        let seen = quiet.see(&topic(Kind::NData, None), &mut payload(1, vec![]), t0);
        assert_eq!(seen, Seen::default());
    }

    #[test]
    fn an_ndeath_ends_the_node_and_its_devices_unless_it_is_of_an_earlier_birth() {
        let mut state = State::new(false);
        let now = Instant::now();
        state.see(&topic(Kind::NBirth, None), &mut birth(0), now);
        for d in ["D2", "D1"] {
            state.see(&topic(Kind::DBirth, Some(d)), &mut payload(1, vec![]), now);
        }
        // bdSeq 6: the will of the session before the NBIRTH's (bdSeq 7).
        let death = |bd: u64| payload(0, vec![metric(Some("bdSeq"), None, Some(4), Raw::Long(bd))]);
        let seen = state.see(&topic(Kind::NDeath, None), &mut death(6), now);
        assert!(seen.stale && seen.devices.is_empty(), "{seen:?}");
        let seen = state.see(&topic(Kind::NDeath, None), &mut death(7), now);
        assert_eq!(seen.devices, ["D1", "D2"]);
        assert!(state.nodes.is_empty());
    }

    #[test]
    fn nodes_and_devices_are_bounded_and_the_least_recent_goes() {
        let mut state = State::new(false);
        let now = Instant::now();
        for i in 0..=MAX_NODES {
            let edge = format!("E{i}");
            let t = Topic {
                edge_node: &edge,
                ..topic(Kind::NBirth, None)
            };
            state.see(&t, &mut birth(0), now);
            if i == 0 {
                continue;
            }
            // E0 stays in use.
            let t = Topic {
                edge_node: "E0",
                ..topic(Kind::NData, None)
            };
            state.see(&t, &mut payload(i as u64 % 256, vec![]), now);
        }
        assert_eq!(state.nodes.len(), MAX_NODES);
        assert!(state.nodes.contains_key(&("G".into(), "E0".into())));
        assert!(!state.nodes.contains_key(&("G".into(), "E1".into())));
    }
}
