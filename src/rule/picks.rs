//! The common transform without the interpreter: a program that only picks values out of
//! the message, `.payload` or `{device: .vars.device, temp: .payload.temp, body: .payload}`,
//! is recognized when it compiles and evaluated here, by walking the decoded payload,
//! without building the whole context object that jq programs see (DESIGN.md §2): each
//! path's first key is made on its own, by the code that makes it for the context
//! ([`super::context_field`]). That is most telemetry rules, and where jaq spent most of
//! a message's time (BENCHMARKS.md, "The database path").
//!
//! **The subset.** A path (`.a.b`, `.a["b"]`, `."b"`, `.a[2]`, `.a[-1]`, starting at a
//! context key), or an object literal whose keys are names or plain strings and whose
//! values are such paths. Anything else (`?`, pipes, functions, variables, `.` alone, a
//! key that is a jq keyword) is left to jaq, and so is any message on which walking a
//! path meets a value it cannot index (a number where an object was expected): jq
//! reports that error, in its own words. On everything else the result is jq's: a
//! missing key or index is null, null indexed is null, a negative index counts from the
//! end. The tests compare both on the same messages.
//!
//! **Without jq values at all.** A rule with no filter whose JSON payload only feeds such
//! picks reads the payload with serde_json straight into the record's values
//! ([`Picks::record_from_json`]): what a path takes from the payload is moved out of it
//! when no other path needs it (`body: .payload` beside `.payload.temp`), so neither a jq
//! value nor a copy of the payload is made.
//!
//! **The payload kept as text.** When an object takes the payload whole
//! (`body: .payload`) and reads nothing else of it deeper than one key
//! (`temp: .payload.temp`), the payload is read in one pass that makes only the values
//! those keys hold and checks the rest, and the record keeps the payload's text for the
//! whole ([`Picks::record_from_text`], [`crate::record::Json`]): no map of it is made.
//!
//! **Keys made once.** An object's keys are the program's: they are made when it compiles
//! ([`Keys`]), and each record holds only its values, in the slots of those keys
//! ([`Record::object`]).

use std::sync::Arc;

use bytestring::ByteString;
use jaq_json::Val;
use serde_json::Value as J;

use super::text;
use crate::message::Message;
use crate::record::{Json, Keys, Record, Slot};
use smallvec::SmallVec;

/// A transform in the subset.
#[derive(Debug, Clone, PartialEq)]
pub enum Picks {
    /// One path: the record is what it points at.
    Path(Path),
    /// `{key: path, …}`: the record is an object of what each path points at, with
    /// these keys (the rule's, shared by its records), read in one pass over a JSON
    /// payload when it can be.
    Object(Vec<Field>, Arc<Keys>, Option<Scan>),
}

/// How an object's fields read a JSON payload in one pass, keeping it as text: one
/// field takes the payload whole, and every other path into it is one key deep.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    /// The payload's keys the fields read, each once.
    keys: Vec<String>,
    /// What each field (in order) reads.
    reads: Vec<Read>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Read {
    /// The payload, as its text.
    Whole,
    /// The value of `keys[key]`, moved out when no later field reads it (`take`).
    Key { key: usize, take: bool },
    /// Anything but the payload.
    Context,
}

impl Scan {
    /// The scan for `fields`, when they read the payload so.
    fn of(fields: &[Field]) -> Option<Scan> {
        let mut keys: Vec<String> = Vec::new();
        let mut reads = Vec::with_capacity(fields.len());
        for f in fields {
            let read = match (f.path.root.as_str(), &f.path.steps[..]) {
                ("payload", []) => Read::Whole,
                ("payload", [Step::Key(Val::TStr(k))]) => {
                    let k = std::str::from_utf8(k).ok()?;
                    let key = keys.iter().position(|x| x == k).unwrap_or_else(|| {
                        keys.push(k.to_string());
                        keys.len() - 1
                    });
                    Read::Key { key, take: true }
                }
                ("payload", _) => return None,
                _ => Read::Context,
            };
            reads.push(read);
        }
        // Of the fields that read one key, the last takes its value; the others copy.
        for i in 0..reads.len() {
            if let Read::Key { key: k, .. } = reads[i] {
                let later = reads[i + 1..]
                    .iter()
                    .any(|r| matches!(r, Read::Key { key, .. } if *key == k));
                reads[i] = Read::Key {
                    key: k,
                    take: !later,
                };
            }
        }
        let keeps_whole = fields
            .iter()
            .zip(&reads)
            .any(|(f, r)| *r == Read::Whole && !f.shadowed);
        keeps_whole.then_some(Scan { keys, reads })
    }
}

/// One `key: path` of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    key: String,
    path: Path,
    /// Whether, read from a serde_json payload, the value is moved out of it: no other
    /// path of the object points at it or above it (of equal paths, the last one takes).
    takes: bool,
    /// Whether a later field has the same key (jq keeps the last): its path is walked,
    /// for the failure jq would report, and its value left out.
    shadowed: bool,
    /// Where its value goes in the record ([`Keys::slot`]).
    slot: usize,
}

/// `.root` then steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    root: String,
    steps: Vec<Step>,
    /// A path into `payload` by keys alone, whose value can be moved out of a serde_json
    /// payload. Index steps are never moved (`[0]` and `[-1]` may be the same element).
    movable: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// `.name` or `["name"]` (the key made once, as a jq value).
    Key(Val),
    /// `[n]`.
    Index(isize),
}

/// jq's keywords, which this parser does not take as names (jq reads them otherwise).
const KEYWORDS: &[&str] = &[
    "and", "or", "not", "if", "then", "elif", "else", "end", "as", "def", "reduce", "foreach",
    "try", "catch", "label", "import", "include", "__loc__",
];

impl Picks {
    /// The program `code` as picks, or None when it is not in the subset.
    pub fn parse(code: &str) -> Option<Picks> {
        let mut p = Parser {
            s: code.as_bytes(),
            at: 0,
        };
        p.blank();
        let picks = if p.eat(b'{') {
            let mut fields = Vec::new();
            loop {
                p.blank();
                let key = match p.peek()? {
                    b'"' => p.string()?,
                    _ => p.name()?,
                };
                p.blank();
                if !p.eat(b':') {
                    return None;
                }
                p.blank();
                let path = p.path()?;
                fields.push(Field {
                    key,
                    path,
                    takes: false,
                    shadowed: false,
                    slot: 0,
                });
                p.blank();
                if p.eat(b'}') {
                    break;
                }
                if !p.eat(b',') {
                    return None;
                }
            }
            for i in 0..fields.len() {
                let takes = fields[i].path.movable
                    && fields.iter().enumerate().all(|(j, other)| {
                        let (a, b) = (&other.path, &fields[i].path);
                        let above = j != i && a.root == b.root && b.steps.starts_with(&a.steps);
                        !above || (a.steps == b.steps && j < i)
                    });
                fields[i].shadowed = fields[i + 1..].iter().any(|f| f.key == fields[i].key);
                fields[i].takes = takes && !fields[i].shadowed;
            }
            let keys = Keys::new(fields.iter().map(|f| f.key.clone()));
            for f in &mut fields {
                f.slot = keys.slot(&f.key).expect("a field's key is a key");
            }
            let scan = Scan::of(&fields);
            Picks::Object(fields, keys, scan)
        } else {
            Picks::Path(p.path()?)
        };
        p.blank();
        (p.at == p.s.len()).then_some(picks)
    }

    /// The record for `msg` (whose payload decoded to `payload`, and whose topic matched
    /// with `vars`), or None when a path cannot be walked (jq would fail: let it say how).
    pub fn record(&self, msg: &Message, vars: &[(&str, &str)], payload: &Val) -> Option<Record> {
        let pick = |path: &Path| {
            path.walk(msg, vars, payload)
                .map(|v| super::jq::to_json(&v))
        };
        match self {
            Picks::Path(path) => pick(path).map(Record::from),
            Picks::Object(fields, keys, _) => {
                let mut values = nulls(keys.len());
                for f in fields {
                    let value = pick(&f.path)?;
                    if !f.shadowed {
                        values[f.slot] = value.into();
                    }
                }
                Some(Record::object(keys, values))
            }
        }
    }

    /// [`Picks::record`] for a JSON payload serde_json read (as `decode: json` would,
    /// the same values): the paths that may take their value move it out of `payload`,
    /// after every other path copied what it points at.
    pub fn record_from_json(
        &self,
        msg: &Message,
        vars: &[(&str, &str)],
        mut payload: J,
    ) -> Option<Record> {
        match self {
            Picks::Path(path) => path
                .pick_json(msg, vars, &mut payload, true)
                .map(Record::from),
            Picks::Object(fields, keys, _) => {
                // Keys are unique once the shadowed fields are left out, so each value
                // has its own slot: the copies first, then what is taken.
                let mut values = nulls(keys.len());
                for taking in [false, true] {
                    for f in fields.iter().filter(|f| f.takes == taking) {
                        let value = f.path.pick_json(msg, vars, &mut payload, taking)?;
                        if !f.shadowed {
                            values[f.slot] = value.into();
                        }
                    }
                }
                Some(Record::object(keys, values))
            }
        }
    }

    /// [`Picks::record_from_json`] in one pass over the JSON payload, for an object that
    /// can [`Scan`] it: the keys its fields read are made into values, the rest of the
    /// payload is only checked (as strictly as serde_json reads it into a value), and the
    /// field that takes it whole keeps its text. None when the object cannot scan, or the
    /// payload is not a JSON object: [`Picks::record_from_json`] reads it then.
    pub fn record_from_text(&self, msg: &Message, vars: &[(&str, &str)]) -> Option<Record> {
        let Picks::Object(fields, keys, Some(scan)) = self else {
            return None;
        };
        let text = ByteString::try_from(msg.payload.clone()).ok()?;
        let mut de = serde_json::Deserializer::from_str(&text);
        let mut found = serde::de::Deserializer::deserialize_any(&mut de, Top(&scan.keys)).ok()?;
        de.end().ok()?;
        let mut values = nulls(keys.len());
        for (f, read) in fields.iter().zip(&scan.reads) {
            let value = match *read {
                Read::Whole => Slot::Json(Json::checked(text.clone())),
                Read::Key { key, take: true } => found[key].take().unwrap_or_default().into(),
                Read::Key { key, take: false } => found[key].clone().unwrap_or_default().into(),
                Read::Context => f.path.pick_json(msg, vars, &mut J::Null, false)?.into(),
            };
            if !f.shadowed {
                values[f.slot] = value;
            }
        }
        Some(Record::object(keys, values))
    }
}

/// The values a payload object holds under some keys (the last of a key written twice,
/// as serde_json keeps it); every other value is only checked. Anything but an object is
/// an error.
struct Top<'k>(&'k [String]);

impl<'de> serde::de::Visitor<'de> for Top<'_> {
    type Value = SmallVec<[Option<J>; 4]>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: Self::Value = std::iter::repeat_with(|| None).take(self.0.len()).collect();
        while let Some(key) = map.next_key_seed(KeyIn(self.0))? {
            match key {
                Some(i) => found[i] = Some(map.next_value()?),
                None => map.next_value::<Checked>().map(drop)?,
            }
        }
        Ok(found)
    }
}

/// A map key: which of some keys it is, if any.
struct KeyIn<'k>(&'k [String]);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIn<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIn<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|k| k == key))
    }
}

/// Any JSON value, read as a `serde_json::Value` would be (the same checks, the same
/// errors) but kept nowhere.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

impl Path {
    /// What the path points at in a serde_json payload (moved out of it when `take` and
    /// the path is movable, else copied); None where jq would fail.
    fn pick_json(
        &self,
        msg: &Message,
        vars: &[(&str, &str)],
        payload: &mut J,
        take: bool,
    ) -> Option<J> {
        if self.root != "payload" {
            // `.vars.name`, a string as it is, else through jq's value.
            if let ("vars", [Step::Key(Val::TStr(name))]) = (&*self.root, &self.steps[..]) {
                return Some(var(vars, name).map_or(J::Null, |v| J::String(v.to_string())));
            }
            return self
                .walk(msg, vars, &Val::Null)
                .map(|v| super::jq::to_json(&v));
        }
        let mut at = payload;
        for step in &self.steps {
            at = match (at, step) {
                (J::Null, _) => return Some(J::Null),
                (J::Object(o), Step::Key(Val::TStr(k))) => {
                    match o.get_mut(std::str::from_utf8(k).ok()?) {
                        Some(v) => v,
                        None => return Some(J::Null),
                    }
                }
                (J::Array(a), Step::Index(i)) => match index(a.len(), *i) {
                    Some(i) => &mut a[i],
                    None => return Some(J::Null),
                },
                _ => return None,
            };
        }
        Some(match take && self.movable {
            true => std::mem::take(at),
            false => at.clone(),
        })
    }

    /// What the path points at; None where jq would fail.
    fn walk(&self, msg: &Message, vars: &[(&str, &str)], payload: &Val) -> Option<Val> {
        let mut steps = self.steps.iter();
        let mut at = match (self.root.as_str(), steps.clone().next()) {
            // `.vars.name` and `.segments[i]`: one value, without making the whole.
            ("vars", Some(Step::Key(Val::TStr(name)))) => {
                steps.next();
                var(vars, name).map_or(Val::Null, text)
            }
            ("segments", Some(Step::Index(i))) => {
                steps.next();
                let segments: Vec<&str> = msg.topic.split('/').collect();
                index(segments.len(), *i).map_or(Val::Null, |i| text(segments[i]))
            }
            (root, _) => super::context_field(msg, vars, payload, root),
        };
        for step in steps {
            at = match (&at, step) {
                (Val::Null, _) => Val::Null,
                (Val::Obj(o), Step::Key(k)) => o.get(k).cloned().unwrap_or(Val::Null),
                (Val::Arr(a), Step::Index(i)) => {
                    index(a.len(), *i).map_or(Val::Null, |i| a[i].clone())
                }
                _ => return None,
            };
        }
        Some(at)
    }
}

/// `n` nulls, for an object's values to be put in (each made, not cloned: `vec![x; n]`
/// clones an enum through its match).
fn nulls(n: usize) -> Vec<Slot> {
    std::iter::repeat_with(|| Slot::Value(J::Null))
        .take(n)
        .collect()
}

/// The topic capture `name`, if the filter has one.
fn var<'v>(vars: &[(&str, &'v str)], name: &[u8]) -> Option<&'v str> {
    vars.iter()
        .find(|(k, _)| k.as_bytes() == name)
        .map(|(_, v)| *v)
}

/// Index `i` (negative: from the end) of `len` items, if there is one.
fn index(len: usize, i: isize) -> Option<usize> {
    let i = if i < 0 { len as isize + i } else { i };
    (0..len as isize).contains(&i).then_some(i as usize)
}

/// A hand parser for the subset: it accepts what jq reads the same way, and gives up
/// (None) on anything else.
struct Parser<'s> {
    s: &'s [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.at += hit as usize;
        hit
    }

    /// Spaces and newlines; a comment is left to jaq.
    fn blank(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A name: `[A-Za-z_][A-Za-z0-9_]*`, not a keyword.
    fn name(&mut self) -> Option<String> {
        let start = self.at;
        while matches!(self.peek(), Some(c) if c == b'_' || c.is_ascii_alphanumeric()) {
            self.at += 1;
        }
        let name = std::str::from_utf8(&self.s[start..self.at]).ok()?;
        let first = name.bytes().next()?;
        (!first.is_ascii_digit() && !KEYWORDS.contains(&name)).then(|| name.to_string())
    }

    /// A string literal without escapes or interpolation.
    fn string(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' => return None,
                _ => self.at += 1,
            }
        }
        let s = std::str::from_utf8(&self.s[start..self.at])
            .ok()?
            .to_string();
        self.at += 1;
        Some(s)
    }

    /// `.root` then `.name`, `."name"`, `["name"]` or `[n]` steps (no spaces inside).
    fn path(&mut self) -> Option<Path> {
        if !self.eat(b'.') {
            return None;
        }
        let root = self.key()?;
        let mut steps = Vec::new();
        loop {
            if self.eat(b'.') {
                steps.push(Step::Key(Val::from(self.key()?)));
            } else if self.eat(b'[') {
                steps.push(match self.peek()? {
                    b'"' => Step::Key(Val::from(self.string()?)),
                    _ => Step::Index(self.integer()?),
                });
                if !self.eat(b']') {
                    return None;
                }
            } else {
                let movable = root == "payload"
                    && steps
                        .iter()
                        .all(|step| matches!(step, Step::Key(Val::TStr(_))));
                return Some(Path {
                    root,
                    steps,
                    movable,
                });
            }
        }
    }

    /// After a `.`: a name or a string.
    fn key(&mut self) -> Option<String> {
        match self.peek()? {
            b'"' => self.string(),
            _ => self.name(),
        }
    }

    fn integer(&mut self) -> Option<isize> {
        let start = self.at;
        self.eat(b'-');
        while matches!(self.peek(), Some(c) if c.is_ascii_digit()) {
            self.at += 1;
        }
        std::str::from_utf8(&self.s[start..self.at])
            .ok()?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::jq::{Deadline, JqProgram};
    use std::time::Duration;

    #[test]
    fn the_subset_is_recognized_and_the_rest_left_to_jq() {
        for code in [
            ".payload",
            " .payload.temp ",
            "{device: .vars.device, temp: .payload.temp, body: .payload}",
            "{\"a b\": .payload[\"x y\"][0], c: .segments[-1]}",
            "{a: .\"payload\".b}",
            "{\n  a: .payload.a,\n  b: .topic\n}",
        ] {
            assert!(Picks::parse(code).is_some(), "{code}");
        }
        for code in [
            ".",
            ".payload?",
            ".payload | .a",
            "{a: .payload.a + 1}",
            "{(.topic): 1}",
            "{a}",
            "{if: .payload}",
            ".payload.\"a\\nb\"",
            "{a: .payload.a,}",
            "{a: .payload[1:2]}",
            ".payload # comment",
            "{a: $__loc__}",
            ".payload .a",
        ] {
            assert_eq!(Picks::parse(code), None, "{code}");
        }
    }

    /// Picks and jq give the same records on the same messages, or picks leaves the
    /// message to jq.
    #[test]
    fn picks_agree_with_jq() {
        let mut gave_up = Vec::new();
        let programs = [
            ".payload",
            ".payload.a",
            ".payload.a.b",
            ".payload.list[0]",
            ".payload.list[-1]",
            ".payload.list[7]",
            ".payload[\"a\"]",
            ".missing.x",
            ".vars",
            ".segments",
            "{device: .vars.device, nothing: .vars.nope, temp: .payload.temp, body: .payload}",
            "{t: .topic, s: .segments[1], last: .segments[-1], far: .segments[9], q: .qos, r: .retain}",
            "{c: .client_id, at: .received_at, ms: .timestamp_ms, raw: .raw}",
            "{p: .properties, ct: .properties.content_type, u: .properties.user_properties}",
            "{a: .payload.a, a: .payload.temp}",
            // What serde_json payloads move out rather than copy, beside what copies.
            "{body: .payload, a: .payload.a, b: .payload.a.b}",
            "{x: .payload.a, y: .payload.a, z: .payload.list}",
            "{a: .payload, a: .payload.a}",
            "{a: .payload.a, a: .payload}",
            "{first: .payload.list[0], last: .payload.list[-1], l: .payload.list}",
            "{p: .payload, q: .payload}",
            "{s: .payload[\"a\"], t: .payload.temp, d: .vars.device}",
        ];
        let payloads: [&[u8]; 7] = [
            br#"{"a": {"b": 1}, "temp": 21.5, "list": [1, "two", null]}"#,
            br#"{"a": 3, "temp": -1e300, "big": 123456789012345678901}"#,
            br#"{"a": null, "list": []}"#,
            br#"[1, 2]"#,
            br#""text""#,
            br#"null"#,
            br#"{"a": "s", "list": {"0": 1}}"#,
        ];
        for code in programs {
            let picks = Picks::parse(code).unwrap_or_else(|| panic!("{code}"));
            let jq = JqProgram::compile(code).unwrap();
            for payload in payloads {
                let msg = Message::detached("sensors/d7/telemetry", payload.to_vec(), 1);
                let vars = [("device", "d7")];
                let decoded =
                    super::super::decode(super::super::Decode::Json, &msg.payload).unwrap();
                let ctx = super::super::context(&msg, &vars, decoded.clone());
                let by_jq = jq.run(ctx, Deadline::after(Duration::from_secs(2)));
                let record = picks.record(&msg, &vars, &decoded);
                let from_json = serde_json::from_slice(payload).unwrap();
                assert_eq!(
                    picks.record_from_json(&msg, &vars, from_json),
                    record,
                    "{code} on {:?}: read by serde_json",
                    String::from_utf8_lossy(payload)
                );
                if let Some(scanned) = picks.record_from_text(&msg, &vars) {
                    assert_eq!(
                        Some(scanned),
                        record,
                        "{code} on {:?}: scanned, the payload kept as text",
                        String::from_utf8_lossy(payload)
                    );
                }
                match record {
                    Some(record) => {
                        let by_jq = by_jq
                            .unwrap_or_else(|e| panic!("{code} on {payload:?}: jq failed: {e}"));
                        assert_eq!(by_jq.len(), 1);
                        assert_eq!(
                            record,
                            super::super::jq::to_json(&by_jq[0]),
                            "{code} on {:?}",
                            String::from_utf8_lossy(payload)
                        );
                    }
                    // Left to jq, which decides (it fails, or jaq reads it its own way).
                    None => gave_up.push(format!("{code} on {}", String::from_utf8_lossy(payload))),
                }
                msg.ack.settle();
            }
        }
        // Only where a path meets a value it cannot index: a key of the array or the
        // string payload, `.a.b` where `a` is 3 or "s", `[i]` of an object.
        assert_eq!(gave_up.len(), 36, "{gave_up:#?}");
    }

    /// An object that takes the payload whole and one key deep scans it: the record
    /// keeps the payload's text, stands for the value serde_json reads from it, and the
    /// payload is refused exactly where serde_json refuses it.
    #[test]
    fn a_payload_taken_whole_is_kept_as_its_text() {
        let code = "{d: .vars.device, t: .payload.t, u: .payload.t, body: .payload}";
        let picks = Picks::parse(code).unwrap();
        let vars = [("device", "d7")];
        let msg = |payload: &[u8]| Message::detached("s/d7", payload.to_vec(), 1);
        let text =
            br#" { "t" : 1.5e1, "x": ["\u00e9", {"y": null}], "t": 2, "s": "\ud83d\ude00" } "#;
        let r = picks.record_from_text(&msg(text), &vars).expect("scanned");
        let field = |k: &str| r.entries().unwrap().find(|(key, _)| *key == k).unwrap().1;
        let as_text = std::str::from_utf8(text).unwrap();
        assert_eq!(field("body").json_text(), Some(as_text));
        assert_eq!(field("t").json_text(), None);
        let value: J = serde_json::from_slice(text).unwrap();
        assert_eq!(
            r,
            serde_json::json!({"d": "d7", "t": 2, "u": 2, "body": value}),
            "the last of a key written twice, as serde_json keeps it"
        );
        assert_eq!(
            picks.record_from_json(&msg(text), &vars, value),
            Some(r.clone())
        );
        // Written as the equal value is, whatever the text's spacing and key order.
        assert_eq!(
            r.to_string(),
            r#"{"body":{"s":"😀","t":2,"x":["é",{"y":null}]},"d":"d7","t":2,"u":2}"#
        );

        let deep = "[".repeat(200) + &"]".repeat(200);
        let payloads: Vec<Vec<u8>> = [
            &br#"{"a": "\ud800"}"#[..],
            br#"{"a": 1e400}"#,
            br#"{"a": 1} x"#,
            br#"{"a": 1,}"#,
            b"{\"a\": \"\x01\"}",
            b"{\"a\": \"\xff\"}",
            br#"{"a": tru}"#,
            br#"{"a": 01}"#,
            br#"[1]"#,
            br#"null"#,
            br#"{}"#,
            br#"{"t": [1, {"b": -0.0}], "z": 18446744073709551616}"#,
        ]
        .into_iter()
        .map(<[u8]>::to_vec)
        .chain([format!(r#"{{"a": {deep}}}"#).into_bytes()])
        .collect();
        for p in payloads {
            let serde = serde_json::from_slice::<J>(&p);
            let scanned = picks.record_from_text(&msg(&p), &vars);
            assert_eq!(
                scanned.is_some(),
                matches!(serde, Ok(J::Object(_))),
                "{:?}: {serde:?}",
                String::from_utf8_lossy(&p)
            );
        }

        // Nothing taken whole, or a path deeper than one key: no scan.
        let payload = msg(br#"{"t": 1, "a": {"b": 2}}"#);
        for code in [
            "{t: .payload.t}",
            "{b: .payload, a: .payload.a.b}",
            "{b: .payload, b: .topic}",
        ] {
            let picks = Picks::parse(code).unwrap();
            assert_eq!(picks.record_from_text(&payload, &vars), None, "{code}");
        }
    }

    #[test]
    fn only_a_path_nothing_else_points_into_takes_its_value() {
        let takes = |code: &str| match Picks::parse(code).unwrap() {
            Picks::Object(fields, ..) => fields.iter().map(|f| f.takes).collect::<Vec<_>>(),
            Picks::Path(_) => unreachable!(),
        };
        // `.payload` is above `.payload.a`: the deeper one copies first, then the whole moves.
        assert_eq!(takes("{b: .payload, a: .payload.a}"), [true, false]);
        // Of equal paths, the last takes.
        assert_eq!(takes("{x: .payload.a, y: .payload.a}"), [false, true]);
        // Index steps always copy; so does anything outside the payload.
        assert_eq!(takes("{x: .payload.l[0], y: .topic}"), [false, false]);
        assert_eq!(takes("{x: .payload.a, y: .payload.b}"), [true, true]);
        assert_eq!(takes("{x: .payload.a, y: .payload}"), [false, true]);
        // A key written again is the later one's: the earlier is only walked.
        assert_eq!(takes("{a: .payload.b, a: .payload.c}"), [false, true]);
    }
}
