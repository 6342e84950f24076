//! `decode: sparkplug_b`: Sparkplug B, the Eclipse standard for industrial MQTT. Topics
//! are `spBv1.0/{group}/{message type}/{edge node}[/{device}]`, payloads Protobuf
//! messages of the schema the specification publishes (`sparkplug/sparkplug_b.proto`,
//! compiled by protox the first time a rule needs it).
//!
//! One message makes **one record per metric** (the rule's filter and transform then run
//! on each as `.payload`), named and typed even when the message only gave aliases: the
//! decoder remembers each edge node's NBIRTH and each device's DBIRTH ([`state`]). That
//! is why this decoder, unlike the others, must see the messages in arrival order:
//! [`Sparkplug::observe`] does so (the router calls it before handing the message to the
//! evaluation threads), [`Sparkplug::peek`] reads against the state without changing it
//! (`mqbridge try`, replays).
//!
//! The record of a metric, every key always present:
//!
//! | key | value |
//! |---|---|
//! | `group`, `edge_node`, `device` | from the topic; `device` null for a node's own messages |
//! | `message_type` | `NBIRTH`, `NDATA`, `NDEATH`, `NCMD`, `DBIRTH`, `DDATA`, `DDEATH`, `DCMD` |
//! | `seq` | the payload's `seq` (null when it has none) |
//! | `online` | true in a birth's records, false in a death's, null otherwise |
//! | `name` | as sent, or the name the birth gave the alias (null when the alias is not known) |
//! | `alias` | as sent (null when not) |
//! | `datatype` | its `DataType` name (`Float`, `Int64`, ...), as sent or as in the birth |
//! | `value` | read as the datatype says (below); null when `is_null` |
//! | `timestamp` | the metric's, else the payload's, as RFC 3339 UTC text |
//! | `is_historical`, `is_transient` | as sent (false when not) |
//! | `properties` | the property set as an object (`{"engUnit": "°C"}`), null when none |
//!
//! Flattening: a Template instance makes one record per member metric, named
//! `{template metric}/{member}` (nested templates likewise), with the member's datatype,
//! value and properties, its timestamp or else the template's; the instance's parameters
//! are dropped, and a template definition (in a birth) makes no record. A DataSet is one
//! record whose value is its rows, each an object of the row's values by column name.
//!
//! An NDEATH makes one record for the node and one per device that had a DBIRTH, a DDEATH
//! one for the device: `online` false, the metric keys null. An NDEATH whose `bdSeq` is
//! not the one of the node's NBIRTH is the late will of an earlier session: no record. A
//! birth without metrics makes one record (`online` true, the metric keys null). A STATE
//! message (`spBv1.0/STATE/...`, host applications) makes none.

mod payload;
mod state;

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use jaq_json::Val;
use prost_reflect::prost::Message as _;
use prost_reflect::{DynamicMessage, EnumDescriptor, MessageDescriptor, Value};

use super::{Command, Gap, Observed};
use payload::{Metric, Payload, Raw, datatype};
use state::State;

/// The topic namespace of Sparkplug B.
const NAMESPACE: &str = "spBv1.0";

/// The schema, as published, and its name for protox.
const SCHEMA_FILE: &str = "sparkplug_b.proto";
const SCHEMA: &str = include_str!("sparkplug/sparkplug_b.proto");

/// A message type (the third topic level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NData,
    NDeath,
    NCmd,
    DBirth,
    DData,
    DDeath,
    DCmd,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "NBIRTH" => Kind::NBirth,
            "NDATA" => Kind::NData,
            "NDEATH" => Kind::NDeath,
            "NCMD" => Kind::NCmd,
            "DBIRTH" => Kind::DBirth,
            "DDATA" => Kind::DData,
            "DDEATH" => Kind::DDeath,
            "DCMD" => Kind::DCmd,
            _ => return None,
        })
    }

    fn is_device(self) -> bool {
        matches!(self, Kind::DBirth | Kind::DData | Kind::DDeath | Kind::DCmd)
    }
}

/// A Sparkplug B topic, read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Topic<'t> {
    pub group: &'t str,
    pub kind: Kind,
    pub edge_node: &'t str,
    pub device: Option<&'t str>,
}

impl<'t> Topic<'t> {
    /// The topic's parts; None for a STATE topic (`spBv1.0/STATE/{host}`).
    fn parse(topic: &'t str) -> Result<Option<Topic<'t>>, String> {
        let levels: Vec<&str> = topic.split('/').collect();
        let not = |why: &str| Err(format!("topic {topic:?} is not a Sparkplug B topic: {why}"));
        if levels[0] != NAMESPACE {
            return not(&format!("it does not start with {NAMESPACE}/"));
        }
        if levels.get(1) == Some(&"STATE") {
            return Ok(None);
        }
        let (Some(&group), Some(&kind), Some(&edge_node)) =
            (levels.get(1), levels.get(2), levels.get(3))
        else {
            return not("it has fewer than 4 levels");
        };
        let Some(kind) = Kind::parse(kind) else {
            return not(&format!("unknown message type {kind:?}"));
        };
        let device = levels.get(4).copied();
        match (kind.is_device(), levels.len()) {
            (false, 4) | (true, 5) => {}
            (false, _) => return not("a node's message has 4 levels"),
            (true, _) => return not("a device's message has 5 levels"),
        }
        Ok(Some(Topic {
            group,
            kind,
            edge_node,
            device,
        }))
    }
}

/// The variables a Sparkplug B topic gives the rules: `group`, `message_type`,
/// `edge_node` and, for a device's message, `device` (none for other topics).
pub fn vars(topic: &str) -> Vec<(&'static str, &str)> {
    let Ok(Some(t)) = Topic::parse(topic) else {
        return Vec::new();
    };
    let kind = topic.split('/').nth(2).unwrap_or_default();
    let mut vars = vec![
        ("group", t.group),
        ("message_type", kind),
        ("edge_node", t.edge_node),
    ];
    vars.extend(t.device.map(|d| ("device", d)));
    vars
}

/// The compiled schema: the messages and enum the decoder reads and writes.
struct Schema {
    payload: MessageDescriptor,
    metric: MessageDescriptor,
    datatypes: EnumDescriptor,
}

/// The schema, compiled on first use.
fn schema() -> Result<&'static Schema, String> {
    static COMPILED: OnceLock<Result<Schema, String>> = OnceLock::new();
    COMPILED.get_or_init(compile).as_ref().map_err(Clone::clone)
}

fn compile() -> Result<Schema, String> {
    /// Serves the schema built into mqbridge, and nothing else.
    struct BuiltIn;
    impl protox::file::FileResolver for BuiltIn {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match name {
                SCHEMA_FILE => protox::file::File::from_source(name, SCHEMA),
                _ => Err(protox::Error::file_not_found(name)),
            }
        }
    }
    let mut compiler = protox::Compiler::with_file_resolver(BuiltIn);
    compiler
        .open_file(SCHEMA_FILE)
        .map_err(|e| format!("the built-in {SCHEMA_FILE}: {e}"))?;
    let pool = compiler.descriptor_pool();
    let message = |name: &str| {
        pool.get_message_by_name(name)
            .ok_or_else(|| format!("the built-in {SCHEMA_FILE} has no {name}"))
    };
    Ok(Schema {
        payload: message("org.eclipse.tahu.protobuf.Payload")?,
        metric: message("org.eclipse.tahu.protobuf.Payload.Metric")?,
        datatypes: pool
            .get_enum_by_name("org.eclipse.tahu.protobuf.DataType")
            .ok_or_else(|| format!("the built-in {SCHEMA_FILE} has no DataType"))?,
    })
}

/// A rule's Sparkplug B decoder, with what it remembers of the edge nodes.
pub struct Sparkplug {
    schema: &'static Schema,
    rebirth_on_gap: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Sparkplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sparkplug")
            .field("rebirth_on_gap", &self.rebirth_on_gap)
            .finish_non_exhaustive()
    }
}

/// Two decoders are alike when their settings are.
impl PartialEq for Sparkplug {
    fn eq(&self, other: &Sparkplug) -> bool {
        self.rebirth_on_gap == other.rebirth_on_gap
    }
}

impl std::fmt::Display for Sparkplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rebirth_on_gap {
            true => f.write_str("sparkplug_b (rebirth on gap)"),
            false => f.write_str("sparkplug_b"),
        }
    }
}

impl Sparkplug {
    /// A decoder that remembers nothing yet; with `rebirth_on_gap` it asks edge nodes
    /// for a rebirth (see [`Observed::command`]).
    pub fn new(rebirth_on_gap: bool) -> Result<Sparkplug, String> {
        Ok(Sparkplug {
            schema: schema()?,
            rebirth_on_gap,
            state: Mutex::new(State::new(rebirth_on_gap)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between any two of its statements that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes over what `earlier` (the same rule's decoder before a config reload)
    /// remembers, so that the reload costs no rebirth.
    pub fn carry_over(&self, earlier: &Sparkplug) {
        let taken = std::mem::replace(&mut *earlier.state(), State::new(false));
        *self.state() = taken.with_rebirth_on_gap(self.rebirth_on_gap);
    }

    /// Reads a message in arrival order: its records, what it told of the edge node's
    /// `seq`, and the rebirth request to publish, if one is due.
    pub fn observe(&self, topic: &str, payload: &Bytes) -> Observed {
        let (t, mut p) = match self.parse(topic, payload) {
            Ok(Some(read)) => read,
            Ok(None) => return Observed::records(Ok(Vec::new())),
            Err(e) => return Observed::records(Err(e)),
        };
        let seen = self.state().see(&t, &mut p, Instant::now());
        let node = || format!("{}/{}", t.group, t.edge_node);
        Observed {
            gap: seen.gap.map(|g| Gap {
                node: node(),
                expected: g.expected,
                got: g.got,
            }),
            command: seen.rebirth.as_ref().map(|why| Command {
                topic: format!("{NAMESPACE}/{}/NCMD/{}", t.group, t.edge_node),
                payload: self.rebirth_request(),
                why: format!("asking {} for a rebirth: {why}", node()),
            }),
            payloads: self.records(&t, p, &seen),
        }
    }

    /// Reads a message against what is remembered, changing nothing.
    pub fn peek(&self, topic: &str, payload: &Bytes) -> Result<Vec<Val>, String> {
        let Some((t, mut p)) = self.parse(topic, payload)? else {
            return Ok(Vec::new());
        };
        let mut scratch = self.state().snapshot(t.group, t.edge_node);
        let seen = scratch.see(&t, &mut p, Instant::now());
        self.records(&t, p, &seen)
    }

    /// The topic and payload read; None for a STATE message.
    fn parse<'t>(
        &self,
        topic: &'t str,
        payload: &Bytes,
    ) -> Result<Option<(Topic<'t>, Payload)>, String> {
        let Some(t) = Topic::parse(topic)? else {
            return Ok(None);
        };
        let msg =
            DynamicMessage::decode(self.schema.payload.clone(), payload.clone()).map_err(|e| {
                let e = e.to_string();
                let why = e.strip_prefix("failed to decode Protobuf message: ");
                format!(
                    "payload is not a valid Sparkplug B payload: {}",
                    why.unwrap_or(&e)
                )
            })?;
        Ok(Some((t, Payload::read(msg)?)))
    }

    /// `Node Control/Rebirth` = true, in an NCMD payload.
    fn rebirth_request(&self) -> Vec<u8> {
        let now = jiff::Timestamp::now().as_millisecond() as u64;
        let mut metric = DynamicMessage::new(self.schema.metric.clone());
        metric.set_field_by_number(1, Value::String("Node Control/Rebirth".into()));
        metric.set_field_by_number(3, Value::U64(now));
        metric.set_field_by_number(4, Value::U32(datatype::BOOLEAN));
        metric.set_field_by_number(14, Value::Bool(true));
        let mut payload = DynamicMessage::new(self.schema.payload.clone());
        payload.set_field_by_number(1, Value::U64(now));
        payload.set_field_by_number(2, Value::List(vec![Value::Message(metric)]));
        payload.encode_to_vec()
    }

    /// The records of one message (see the module's docs).
    fn records(&self, t: &Topic<'_>, p: Payload, seen: &state::Seen) -> Result<Vec<Val>, String> {
        let kind = match t.kind {
            Kind::NBirth => "NBIRTH",
            Kind::NData => "NDATA",
            Kind::NDeath => "NDEATH",
            Kind::NCmd => "NCMD",
            Kind::DBirth => "DBIRTH",
            Kind::DData => "DDATA",
            Kind::DDeath => "DDEATH",
            Kind::DCmd => "DCMD",
        };
        let online = match t.kind {
            Kind::NBirth | Kind::DBirth => Val::Bool(true),
            Kind::NDeath | Kind::DDeath => Val::Bool(false),
            _ => Val::Null,
        };
        let text = |s: &str| Val::from(s.to_string());
        let common = |device: Option<&str>| {
            vec![
                (text("group"), text(t.group)),
                (text("edge_node"), text(t.edge_node)),
                (text("device"), device.map_or(Val::Null, text)),
                (text("message_type"), text(kind)),
                (
                    text("seq"),
                    p.seq.map_or(Val::Null, |s| super::int(i128::from(s))),
                ),
                (text("online"), online.clone()),
            ]
        };
        let status = |device: Option<&str>| {
            let mut record = common(device);
            record.extend(Record::status(p.timestamp).into_entries(&self.schema.datatypes));
            Val::obj(record.into_iter().collect())
        };
        Ok(match t.kind {
            Kind::NDeath if seen.stale => Vec::new(),
            Kind::NDeath => std::iter::once(None)
                .chain(seen.devices.iter().map(|d| Some(d.as_str())))
                .map(status)
                .collect(),
            Kind::DDeath => vec![status(t.device)],
            Kind::NBirth | Kind::DBirth if p.metrics.is_empty() => vec![status(t.device)],
            _ => {
                let mut records = Vec::new();
                for m in p.metrics {
                    let flat = Record::flatten(m, None, p.timestamp, &mut records);
                    flat.map_err(|e| format!("payload is not a valid Sparkplug B payload: {e}"))?;
                }
                records
                    .into_iter()
                    .map(|r| {
                        let mut record = common(t.device);
                        record.extend(r.into_entries(&self.schema.datatypes));
                        Val::obj(record.into_iter().collect())
                    })
                    .collect()
            }
        })
    }
}

/// A metric's own part of a record.
struct Record {
    name: Option<String>,
    alias: Option<u64>,
    datatype: Option<u32>,
    value: Val,
    timestamp: Option<u64>,
    is_historical: bool,
    is_transient: bool,
    properties: Option<Val>,
}

impl Record {
    /// The records of one metric: its own, or its members' for a Template instance
    /// (named `{prefix}/{name}`, their timestamp defaulting to `timestamp`).
    fn flatten(
        m: Metric,
        prefix: Option<&str>,
        timestamp: Option<u64>,
        out: &mut Vec<Record>,
    ) -> Result<(), String> {
        let name = match (prefix, m.name) {
            (Some(p), Some(n)) => Some(format!("{p}/{n}")),
            (Some(p), None) => Some(p.to_string()),
            (None, n) => n,
        };
        let timestamp = m.timestamp.or(timestamp);
        if let Raw::Template(t) = m.value {
            if !t.is_definition && !m.is_null {
                for member in t.metrics {
                    Record::flatten(member, name.as_deref(), timestamp, out)?;
                }
            }
            return Ok(());
        }
        let value = match m.is_null {
            true => Val::Null,
            false => payload::value(m.value, m.datatype).map_err(|e| match &name {
                Some(n) => format!("metric {n:?}: {e}"),
                None => format!("metric of alias {}: {e}", m.alias.unwrap_or_default()),
            })?,
        };
        out.push(Record {
            name,
            alias: if prefix.is_none() { m.alias } else { None },
            datatype: m.datatype,
            value,
            timestamp,
            is_historical: m.is_historical,
            is_transient: m.is_transient,
            properties: m.properties,
        });
        Ok(())
    }

    fn into_entries(self, types: &EnumDescriptor) -> Vec<(Val, Val)> {
        let text = |s: &str| Val::from(s.to_string());
        vec![
            (text("name"), self.name.map_or(Val::Null, Val::from)),
            (
                text("alias"),
                self.alias.map_or(Val::Null, |a| super::int(i128::from(a))),
            ),
            (
                text("datatype"),
                self.datatype
                    .map_or(Val::Null, |d| payload::datatype_name(types, d)),
            ),
            (text("value"), self.value),
            (
                text("timestamp"),
                self.timestamp.map_or(Val::Null, payload::timestamp),
            ),
            (text("is_historical"), Val::Bool(self.is_historical)),
            (text("is_transient"), Val::Bool(self.is_transient)),
            (text("properties"), self.properties.unwrap_or(Val::Null)),
        ]
    }

    /// The metric part of a record that stands for the node or device itself.
    fn status(timestamp: Option<u64>) -> Record {
        Record {
            name: None,
            alias: None,
            datatype: None,
            value: Val::Null,
            timestamp,
            is_historical: false,
            is_transient: false,
            properties: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value as Json, json};

    use super::*;

    /// At 2026-12-02T16:45:28Z, in ms.
    const AT: u64 = 1_796_229_928_000;

    /// A payload: the `Payload` `fields` (proto3 JSON) describe, encoded by prost-reflect
    /// against the built-in schema.
    fn encode(fields: Json) -> Bytes {
        let desc = schema().unwrap().payload.clone();
        Bytes::from(
            DynamicMessage::deserialize(desc, fields)
                .unwrap()
                .encode_to_vec(),
        )
    }

    fn json_of(v: &[Val]) -> Vec<Json> {
        v.iter().map(crate::rule::jq::to_json).collect()
    }

    fn observe(s: &Sparkplug, topic: &str, fields: Json) -> Vec<Json> {
        json_of(&s.observe(topic, &encode(fields)).payloads.unwrap())
    }

    fn birth() -> Json {
        json!({"timestamp": AT, "seq": 0, "metrics": [
            {"name": "bdSeq", "datatype": 4, "longValue": 3},
            {"name": "Temperature", "alias": 1, "datatype": 9, "floatValue": 20.5,
             "properties": {"keys": ["engUnit"], "values": [{"type": 12, "stringValue": "°C"}]}},
            {"name": "Offset", "alias": 2, "datatype": 3, "intValue": 4294967291_u32},
        ]})
    }

    #[test]
    fn a_birth_then_data_by_alias_make_one_named_record_per_metric() {
        let s = Sparkplug::new(false).unwrap();
        let records = observe(&s, "spBv1.0/Plant/NBIRTH/Gw", birth());
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[1],
            json!({
                "group": "Plant", "edge_node": "Gw", "device": null, "message_type": "NBIRTH",
                "seq": 0, "online": true, "name": "Temperature", "alias": 1,
                "datatype": "Float", "value": 20.5, "timestamp": "2026-12-02T16:45:28Z",
                "is_historical": false, "is_transient": false, "properties": {"engUnit": "°C"}
            })
        );
        assert_eq!(
            records[2]["value"],
            json!(-5),
            "an Int32 in two's complement"
        );

        let records = observe(
            &s,
            "spBv1.0/Plant/NDATA/Gw",
            json!({"timestamp": AT + 500, "seq": 1, "metrics": [
                {"alias": 2, "intValue": 7},
                {"alias": 1, "timestamp": AT + 250, "floatValue": 0.1},
                {"alias": 1, "isNull": true},
            ]}),
        );
        let picked: Vec<Json> = records
            .iter()
            .map(|r| {
                json!([
                    r["name"],
                    r["datatype"],
                    r["value"],
                    r["timestamp"],
                    r["online"]
                ])
            })
            .collect();
        assert_eq!(
            picked,
            [
                json!(["Offset", "Int32", 7, "2026-12-02T16:45:28.5Z", null]),
                json!(["Temperature", "Float", 0.1, "2026-12-02T16:45:28.25Z", null]),
                json!(["Temperature", "Float", null, "2026-12-02T16:45:28.5Z", null]),
            ]
        );
    }

    #[test]
    fn templates_flatten_into_their_members_and_data_sets_into_rows() {
        let s = Sparkplug::new(false).unwrap();
        let records = observe(
            &s,
            "spBv1.0/Plant/DBIRTH/Gw/Pump1",
            json!({"timestamp": AT, "seq": 1, "metrics": [
                // A definition: no record.
                {"name": "_types_/Pump", "datatype": 19, "templateValue": {
                    "isDefinition": true,
                    "metrics": [{"name": "Speed", "datatype": 3, "intValue": 0}]}},
                {"name": "Pump", "alias": 5, "datatype": 19, "templateValue": {
                    "templateRef": "Pump",
                    "parameters": [{"name": "Model", "type": 12, "stringValue": "X"}],
                    "metrics": [
                        {"name": "Speed", "datatype": 3, "intValue": 4294967295_u32},
                        {"name": "Motor", "datatype": 19, "timestamp": AT + 1000, "templateValue": {
                            "templateRef": "Motor",
                            "metrics": [{"name": "Amps", "datatype": 10, "doubleValue": 1.5}]}},
                    ]}},
                {"name": "Runs", "datatype": 16, "datasetValue": {
                    "numOfColumns": 3, "columns": ["at", "ok", "note"], "types": [13, 11, 12],
                    "rows": [
                        {"elements": [{"longValue": AT}, {"booleanValue": true}, {"stringValue": "a"}]},
                        {"elements": [{"longValue": AT + 1}, {"booleanValue": false}, {}]},
                    ]}},
            ]}),
        );
        let picked: Vec<Json> = records
            .iter()
            .map(|r| {
                json!([
                    r["device"],
                    r["name"],
                    r["alias"],
                    r["datatype"],
                    r["value"],
                    r["timestamp"]
                ])
            })
            .collect();
        assert_eq!(
            picked,
            [
                json!([
                    "Pump1",
                    "Pump/Speed",
                    null,
                    "Int32",
                    -1,
                    "2026-12-02T16:45:28Z"
                ]),
                json!([
                    "Pump1",
                    "Pump/Motor/Amps",
                    null,
                    "Double",
                    1.5,
                    "2026-12-02T16:45:29Z"
                ]),
                json!(["Pump1", "Runs", null, "DataSet", [
                    {"at": "2026-12-02T16:45:28Z", "ok": true, "note": "a"},
                    {"at": "2026-12-02T16:45:28.001Z", "ok": false, "note": null},
                ], "2026-12-02T16:45:28Z"]),
            ]
        );
    }

    #[test]
    fn packed_arrays_read_as_arrays() {
        let s = Sparkplug::new(false).unwrap();
        let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
        let mut dates = Vec::new();
        dates.extend((AT as i64).to_le_bytes());
        dates.extend(0_i64.to_le_bytes());
        let records = observe(
            &s,
            "spBv1.0/G/NBIRTH/E",
            json!({"seq": 0, "metrics": [
                {"name": "i16", "datatype": 23, "bytesValue": b64(&[0xff, 0xff, 0x02, 0x00])},
                {"name": "f32", "datatype": 30, "bytesValue": b64(&0.1_f32.to_le_bytes())},
                // 10 booleans, the first in the highest bit.
                {"name": "bools", "datatype": 32,
                 "bytesValue": b64(&[10, 0, 0, 0, 0b1010_0000, 0b0100_0000])},
                {"name": "strings", "datatype": 33, "bytesValue": b64(b"ab\0\0c\0")},
                {"name": "dates", "datatype": 34, "bytesValue": b64(&dates)},
                {"name": "raw", "datatype": 17, "bytesValue": b64(&[0, 159, 146])},
            ]}),
        );
        let values: Vec<&Json> = records.iter().map(|r| &r["value"]).collect();
        assert_eq!(
            values,
            [
                &json!([-1, 2]),
                &json!([0.1]),
                &json!([
                    true, false, true, false, false, false, false, false, false, true
                ]),
                &json!(["ab", "", "c"]),
                &json!(["2026-12-02T16:45:28Z", "1970-01-01T00:00:00Z"]),
                &json!("AJ+S"),
            ]
        );
        let odd = encode(json!({"seq": 0, "metrics": [
            {"name": "i32", "datatype": 24, "bytesValue": b64(&[1, 2, 3])}]}));
        assert_eq!(
            s.observe("spBv1.0/G/NBIRTH/E", &odd).payloads.unwrap_err(),
            "payload is not a valid Sparkplug B payload: metric \"i32\": \
             3 bytes are not a whole number of 4-byte values"
        );
    }

    #[test]
    fn deaths_mark_the_node_and_its_devices_offline() {
        let s = Sparkplug::new(false).unwrap();
        observe(&s, "spBv1.0/G/NBIRTH/E", birth());
        let dbirth = observe(
            &s,
            "spBv1.0/G/DBIRTH/E/D1",
            json!({"timestamp": AT, "seq": 1}),
        );
        assert_eq!(
            (
                &dbirth[0]["device"],
                &dbirth[0]["online"],
                &dbirth[0]["name"]
            ),
            (&json!("D1"), &json!(true), &json!(null)),
            "a birth without metrics: one record"
        );
        let ddeath = observe(
            &s,
            "spBv1.0/G/DDEATH/E/D1",
            json!({"timestamp": AT, "seq": 2}),
        );
        assert_eq!(
            ddeath,
            [json!({
                "group": "G", "edge_node": "E", "device": "D1", "message_type": "DDEATH",
                "seq": 2, "online": false, "name": null, "alias": null, "datatype": null,
                "value": null, "timestamp": "2026-12-02T16:45:28Z", "is_historical": false,
                "is_transient": false, "properties": null
            })]
        );
        observe(&s, "spBv1.0/G/DBIRTH/E/D2", json!({"seq": 3}));
        let death =
            |bd: u64| json!({"metrics": [{"name": "bdSeq", "datatype": 4, "longValue": bd}]});
        assert_eq!(
            observe(&s, "spBv1.0/G/NDEATH/E", death(2)),
            Vec::<Json>::new(),
            "stale"
        );
        let ndeath = observe(&s, "spBv1.0/G/NDEATH/E", death(3));
        let offline: Vec<Json> = ndeath
            .iter()
            .map(|r| json!([r["device"], r["online"], r["seq"]]))
            .collect();
        assert_eq!(
            offline,
            [json!([null, false, null]), json!(["D2", false, null])]
        );
    }

    #[test]
    fn a_gap_asks_for_a_rebirth_in_an_ncmd() {
        let s = Sparkplug::new(true).unwrap();
        observe(&s, "spBv1.0/G/NBIRTH/E", birth());
        let o = s.observe("spBv1.0/G/NDATA/E", &encode(json!({"seq": 1})));
        assert_eq!((o.gap, o.command), (None, None));
        let o = s.observe("spBv1.0/G/NDATA/E", &encode(json!({"seq": 5})));
        assert_eq!(
            o.gap,
            Some(Gap {
                node: "G/E".into(),
                expected: 2,
                got: 5
            })
        );
        let command = o.command.unwrap();
        assert_eq!(command.topic, "spBv1.0/G/NCMD/E");
        assert_eq!(
            command.why,
            "asking G/E for a rebirth: seq gap: expected 2, got 5"
        );
        let sent =
            DynamicMessage::decode(s.schema.payload.clone(), command.payload.as_slice()).unwrap();
        let sent = Payload::read(sent).unwrap();
        assert_eq!(sent.metrics.len(), 1);
        let m = &sent.metrics[0];
        assert_eq!(
            (
                m.name.as_deref(),
                m.datatype,
                matches!(m.value, Raw::Bool(true))
            ),
            (Some("Node Control/Rebirth"), Some(datatype::BOOLEAN), true)
        );
    }

    #[test]
    fn peek_reads_against_the_state_without_changing_it() {
        let s = Sparkplug::new(true).unwrap();
        observe(&s, "spBv1.0/G/NBIRTH/E", birth());
        let data = encode(json!({"seq": 1, "metrics": [{"alias": 1, "floatValue": 1.0}]}));
        let peeked = json_of(&s.peek("spBv1.0/G/NDATA/E", &data).unwrap());
        assert_eq!(peeked[0]["name"], "Temperature");
        // Peeking again, and then observing, sees seq 1 as the next one still.
        s.peek("spBv1.0/G/NDATA/E", &data).unwrap();
        assert_eq!(s.observe("spBv1.0/G/NDATA/E", &data).gap, None);
    }

    #[test]
    fn a_reloaded_rule_carries_over_what_its_decoder_remembered() {
        let before = Sparkplug::new(false).unwrap();
        observe(&before, "spBv1.0/G/NBIRTH/E", birth());
        let after = Sparkplug::new(true).unwrap();
        after.carry_over(&before);
        let o = after.observe(
            "spBv1.0/G/NDATA/E",
            &encode(json!({"seq": 2, "metrics": [{"alias": 1, "floatValue": 1.0}]})),
        );
        assert_eq!(json_of(&o.payloads.unwrap())[0]["name"], "Temperature");
        // The seq carried over too, and the new setting holds.
        assert_eq!(o.gap.map(|g| (g.expected, g.got)), Some((1, 2)));
        assert!(o.command.is_some());
    }

    #[test]
    fn topics_give_vars_and_others_are_errors() {
        assert_eq!(
            vars("spBv1.0/Plant/DDATA/Gw/Pump1"),
            [
                ("group", "Plant"),
                ("message_type", "DDATA"),
                ("edge_node", "Gw"),
                ("device", "Pump1")
            ]
        );
        assert_eq!(
            vars("spBv1.0/Plant/NDATA/Gw"),
            [
                ("group", "Plant"),
                ("message_type", "NDATA"),
                ("edge_node", "Gw")
            ]
        );
        assert!(vars("spBv1.0/STATE/host").is_empty());
        let s = Sparkplug::new(false).unwrap();
        let empty = Bytes::new();
        assert_eq!(
            s.observe("spBv1.0/STATE/host", &b"ONLINE"[..].into())
                .payloads,
            Ok(vec![])
        );
        for (topic, why) in [
            ("sensors/a", "it does not start with spBv1.0/"),
            ("spBv1.0/G/NDATA", "it has fewer than 4 levels"),
            ("spBv1.0/G/NDATA/E/D", "a node's message has 4 levels"),
            ("spBv1.0/G/DDATA/E", "a device's message has 5 levels"),
            ("spBv1.0/G/NFOO/E", "unknown message type \"NFOO\""),
        ] {
            assert_eq!(
                s.observe(topic, &empty).payloads,
                Err(format!("topic {topic:?} is not a Sparkplug B topic: {why}"))
            );
        }
        // Field 2 (metrics) claiming 100 bytes, with 1.
        let broken = Bytes::from_static(&[0x12, 100, 0]);
        let err = s
            .observe("spBv1.0/G/NDATA/E", &broken)
            .payloads
            .unwrap_err();
        assert!(
            err.starts_with("payload is not a valid Sparkplug B payload: ")
                && err.contains("buffer underflow"),
            "{err}"
        );
    }

    #[test]
    fn any_bytes_are_records_or_an_error_never_a_panic() {
        use proptest::prelude::*;
        let s = Sparkplug::new(true).unwrap();
        proptest!(|(payload in proptest::collection::vec(any::<u8>(), 0..256))| {
            let _ = s.observe("spBv1.0/G/NDATA/E", &Bytes::from(payload));
        });
    }
}
