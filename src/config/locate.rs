//! Maps field paths to positions in the YAML source.
//!
//! Errors found by serde carry a position, but errors found afterwards (by
//! validation of the parsed configuration) only know the field path, e.g.
//! `rules[0].filter` or `sinks.warehouse.type` — the syntax used by
//! `serde_path_to_error` (map keys joined with `.`, sequence indices as
//! `[N]`, no leading dot). [`Locations::index`] walks the YAML events of the
//! source once and records where each value and key starts, so that such
//! errors can still point at a line and column.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column (counted in characters) in the YAML source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
}

impl Position {
    fn from_marker(mark: Marker) -> Self {
        // yaml-rust2 markers have 1-based lines and 0-based columns.
        Self {
            line: mark.line().max(1),
            column: mark.col() + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Positions of the values and keys of a YAML document, by field path.
#[derive(Debug, Default, Clone)]
pub struct Locations {
    /// Path -> where the value starts (for a mapping or sequence: where the
    /// nested collection starts).
    values: HashMap<String, Position>,
    /// Path of a mapping entry -> where its key starts.
    keys: HashMap<String, Position>,
}

impl Locations {
    /// Indexes every mapping value and sequence element of the first document
    /// in `yaml`: the position where its value (scalar, or the start of the
    /// nested mapping/sequence) begins. The keys of mapping entries are
    /// indexed too (see [`Locations::key_position`]).
    ///
    /// Details:
    /// * a block mapping starts at its first key; a flow mapping or sequence
    ///   at its `{` / `[`; a block sequence at its first `-`;
    /// * a block scalar (`|`, `>`) starts at its first content line;
    /// * an implicit null (`key:` with nothing after it) is placed at its key;
    /// * an alias (`*name`) is placed at the alias; the aliased node's
    ///   children are not indexed under the alias' path (lookups fall back to
    ///   the alias);
    /// * keys that are not strings use their scalar text (`1`, `true`); a
    ///   key that is itself a mapping or sequence is named `?` and its
    ///   content is not indexed;
    /// * when a key is repeated, the first occurrence wins.
    ///
    /// Never fails: if the YAML does not parse, what was indexed before the
    /// error is kept (possibly nothing).
    #[must_use]
    pub fn index(yaml: &str) -> Self {
        let mut indexer = Indexer::default();
        // A syntax error merely ends the walk; serde reports it properly.
        let _ = Parser::new_from_str(yaml).load(&mut indexer, false);
        indexer.locations
    }

    /// Position of the value at `path` (e.g. `rules[1].to[0]`).
    ///
    /// When the exact path is absent, falls back to the longest existing
    /// ancestor (`rules[1].to[7]` -> `rules[1].to`). The root path (`""`, or
    /// `"."` as `serde_path_to_error` prints it) is the start of the
    /// document, if there is one.
    #[must_use]
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut path = normalize(path);
        loop {
            if let Some(position) = self.values.get(path) {
                return Some(*position);
            }
            path = parent(path)?;
        }
    }

    /// Position of the key of the entry at `path` (e.g. for "unknown field"
    /// errors). A sequence element has no key: its value position is used.
    /// Falls back to ancestors like [`Locations::locate`].
    #[must_use]
    pub fn key_position(&self, path: &str) -> Option<Position> {
        let mut path = normalize(path);
        loop {
            let found = if path.is_empty() || path.ends_with(']') {
                self.values.get(path)
            } else {
                self.keys.get(path)
            };
            if let Some(position) = found {
                return Some(*position);
            }
            path = parent(path)?;
        }
    }
}

/// `serde_path_to_error` displays the empty path as `.`.
fn normalize(path: &str) -> &str {
    if path == "." { "" } else { path }
}

/// The path without its last segment; `None` for the root.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(path.rfind(['.', '[']).map_or("", |at| &path[..at]))
}

/// Appends a mapping key to a path, `serde_path_to_error` style.
fn child_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A collection being walked.
#[derive(Debug)]
enum Frame {
    Mapping {
        path: String,
        /// The key just read, with its position, while its value is awaited.
        pending: Option<(String, Position)>,
        /// No key seen yet.
        first: bool,
        /// This mapping's position was recorded by this frame (not by an
        /// earlier duplicate), so it may be corrected.
        owns_position: bool,
    },
    Sequence {
        path: String,
        next: usize,
    },
    /// A mapping or sequence used as a mapping key: skipped until its end.
    ComplexKey {
        depth: usize,
    },
}

/// What kind of node an event starts.
enum Node {
    Scalar { text: String, implicit_null: bool },
    Alias(usize),
    Mapping,
    Sequence,
}

#[derive(Debug, Default)]
struct Indexer {
    locations: Locations,
    stack: Vec<Frame>,
    /// Anchor id -> scalar text, to name alias keys.
    anchors: HashMap<usize, String>,
    /// The first document has ended.
    done: bool,
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.done {
            return;
        }
        let position = Position::from_marker(mark);
        match event {
            Event::Nothing | Event::StreamStart | Event::DocumentStart => {}
            Event::DocumentEnd | Event::StreamEnd => self.done = true,
            Event::Scalar(text, style, anchor, _) => {
                if anchor > 0 {
                    self.anchors.insert(anchor, text.clone());
                }
                let implicit_null = style == TScalarStyle::Plain && text.is_empty();
                self.node(
                    Node::Scalar {
                        text,
                        implicit_null,
                    },
                    position,
                );
            }
            Event::Alias(id) => self.node(Node::Alias(id), position),
            Event::MappingStart(..) => self.node(Node::Mapping, position),
            Event::SequenceStart(..) => self.node(Node::Sequence, position),
            Event::MappingEnd | Event::SequenceEnd => self.end(),
        }
    }
}

impl Indexer {
    fn node(&mut self, node: Node, mut position: Position) {
        let path = match self.stack.last_mut() {
            Some(Frame::ComplexKey { depth }) => {
                if matches!(node, Node::Mapping | Node::Sequence) {
                    *depth += 1;
                }
                return;
            }
            Some(Frame::Mapping {
                path,
                pending: pending @ None,
                first,
                owns_position,
            }) => {
                // A key.
                if std::mem::take(first) && *owns_position {
                    // yaml-rust2 marks a block mapping after its first key;
                    // the mapping really starts at that key.
                    if let Some(start) = self.locations.values.get_mut(path.as_str()) {
                        *start = (*start).min(position);
                    }
                }
                let complex = matches!(node, Node::Mapping | Node::Sequence);
                let key = match node {
                    Node::Scalar { text, .. } => text,
                    Node::Alias(id) => self
                        .anchors
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| "?".to_owned()),
                    Node::Mapping | Node::Sequence => "?".to_owned(),
                };
                let key_path = child_key(path, &key);
                self.locations
                    .keys
                    .entry(key_path.clone())
                    .or_insert(position);
                *pending = Some((key_path, position));
                if complex {
                    self.stack.push(Frame::ComplexKey { depth: 1 });
                }
                return;
            }
            Some(Frame::Mapping { pending, .. }) => {
                let Some((path, key_position)) = pending.take() else {
                    return;
                };
                if matches!(
                    node,
                    Node::Scalar {
                        implicit_null: true,
                        ..
                    }
                ) {
                    // The parser places an implicit null at the next token.
                    position = key_position;
                }
                path
            }
            Some(Frame::Sequence { path, next }) => {
                let element = format!("{path}[{next}]");
                *next += 1;
                element
            }
            None => String::new(),
        };
        let owns_position = match self.locations.values.entry(path.clone()) {
            Entry::Vacant(entry) => {
                entry.insert(position);
                true
            }
            Entry::Occupied(_) => false,
        };
        match node {
            Node::Mapping => self.stack.push(Frame::Mapping {
                path,
                pending: None,
                first: true,
                owns_position,
            }),
            Node::Sequence => self.stack.push(Frame::Sequence { path, next: 0 }),
            Node::Scalar { .. } | Node::Alias(_) => {}
        }
    }

    fn end(&mut self) {
        if let Some(Frame::ComplexKey { depth }) = self.stack.last_mut() {
            *depth -= 1;
            if *depth > 0 {
                return;
            }
        }
        self.stack.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(line: usize, column: usize) -> Option<Position> {
        Some(Position { line, column })
    }

    const RULES: &str = r##"# mqbridge rules
broker:
  url: "mqtt://broker.local:1883"
  client_id: mqbridge-1

sinks:
  warehouse: { type: sqlite, path: /var/lib/mqbridge/warehouse.db }
  archive: {type: file, path: "/tmp/archive.jsonl"}

rules:
  - name: temperatures
    from: [sensors/+/temperature, sensors/+/humidity]
    to: [warehouse]
    transform: |
      {{ payload | upper }}
      second line
  - name: "all"
    from:
      - "#"
    to: [warehouse, archive]
"##;

    #[test]
    fn realistic_rules_values() {
        let loc = Locations::index(RULES);
        assert_eq!(loc.locate("broker"), pos(3, 3));
        assert_eq!(loc.locate("broker.url"), pos(3, 8));
        assert_eq!(loc.locate("broker.client_id"), pos(4, 14));
        assert_eq!(loc.locate("sinks"), pos(7, 3));
        assert_eq!(loc.locate("sinks.warehouse"), pos(7, 14));
        assert_eq!(loc.locate("sinks.warehouse.type"), pos(7, 22));
        assert_eq!(loc.locate("sinks.warehouse.path"), pos(7, 36));
        assert_eq!(loc.locate("sinks.archive"), pos(8, 12));
        assert_eq!(loc.locate("sinks.archive.type"), pos(8, 19));
        assert_eq!(loc.locate("rules"), pos(11, 3));
        assert_eq!(loc.locate("rules[0]"), pos(11, 5));
        assert_eq!(loc.locate("rules[0].name"), pos(11, 11));
        assert_eq!(loc.locate("rules[0].from"), pos(12, 11));
        assert_eq!(loc.locate("rules[0].from[0]"), pos(12, 12));
        assert_eq!(loc.locate("rules[0].from[1]"), pos(12, 35));
        assert_eq!(loc.locate("rules[0].to[0]"), pos(13, 10));
        // A block scalar starts at its first content line.
        assert_eq!(loc.locate("rules[0].transform"), pos(15, 7));
        assert_eq!(loc.locate("rules[1]"), pos(17, 5));
        assert_eq!(loc.locate("rules[1].name"), pos(17, 11));
        assert_eq!(loc.locate("rules[1].from"), pos(19, 7));
        assert_eq!(loc.locate("rules[1].from[0]"), pos(19, 9));
        assert_eq!(loc.locate("rules[1].to[1]"), pos(20, 21));
    }

    #[test]
    fn realistic_rules_keys() {
        let loc = Locations::index(RULES);
        assert_eq!(loc.key_position("broker"), pos(2, 1));
        assert_eq!(loc.key_position("broker.client_id"), pos(4, 3));
        assert_eq!(loc.key_position("sinks.warehouse"), pos(7, 3));
        assert_eq!(loc.key_position("sinks.warehouse.type"), pos(7, 16));
        assert_eq!(loc.key_position("sinks.warehouse.path"), pos(7, 30));
        assert_eq!(loc.key_position("sinks.archive.path"), pos(8, 25));
        assert_eq!(loc.key_position("rules[0].transform"), pos(14, 5));
        assert_eq!(loc.key_position("rules[1].to"), pos(20, 5));
        // Sequence elements have no key: their value position is used.
        assert_eq!(loc.key_position("rules[1]"), pos(17, 5));
        assert_eq!(loc.key_position("rules[0].from[1]"), pos(12, 35));
    }

    #[test]
    fn fallback_to_longest_ancestor() {
        let loc = Locations::index(RULES);
        assert_eq!(loc.locate("rules[0].to[7]"), pos(13, 9));
        assert_eq!(loc.locate("rules[0].to[7].deeper.still"), pos(13, 9));
        assert_eq!(loc.locate("rules[5].from"), pos(11, 3));
        assert_eq!(loc.locate("sinks.warehouse.bogus"), pos(7, 14));
        assert_eq!(loc.locate("broker.url.x"), pos(3, 8));
        assert_eq!(loc.key_position("sinks.warehouse.bogus"), pos(7, 3));
        assert_eq!(loc.key_position("rules[3].name"), pos(10, 1));
        // Unknown top-level fields and the root fall back to the document.
        assert_eq!(loc.locate("nope"), pos(2, 1));
        assert_eq!(loc.locate(""), pos(2, 1));
        assert_eq!(loc.locate("."), pos(2, 1));
        assert_eq!(loc.key_position(""), pos(2, 1));
        assert_eq!(loc.key_position("nope"), pos(2, 1));
    }

    #[test]
    fn syntax_error_keeps_earlier_positions() {
        let yaml = "broker:\n  url: mqtt://x\n  client_id: [a, b\n  keepalive: 30\nrules: []\n";
        let loc = Locations::index(yaml);
        assert_eq!(loc.locate("broker.url"), pos(2, 8));
        assert_eq!(loc.key_position("broker.client_id"), pos(3, 3));
        assert_eq!(loc.locate("broker.client_id[0]"), pos(3, 15));
        assert_eq!(loc.locate("rules"), pos(1, 1));
        assert_eq!(loc.locate("broker.keepalive"), pos(2, 3));
    }

    #[test]
    fn unparsable_or_empty_yields_nothing() {
        for yaml in [
            "",
            "# just a comment\n",
            "\"unterminated",
            "]\n",
            "%BOGUS directive\n",
        ] {
            let loc = Locations::index(yaml);
            assert_eq!(loc.locate("a"), None, "{yaml:?}");
            assert_eq!(loc.key_position("a"), None, "{yaml:?}");
        }
        assert_eq!(Locations::default().locate(""), None);
        // An error inside the first collection keeps what precedes it.
        let loc = Locations::index("[a, b\n");
        assert_eq!(loc.locate("[0]"), pos(1, 2));
        assert_eq!(loc.locate("[1]"), pos(1, 5));
        assert_eq!(loc.locate("[2]"), pos(1, 1));
    }

    #[test]
    fn quoted_and_non_string_keys() {
        let yaml =
            "\"quoted key\": 1\n'single': {\"a b\": x}\n42: answer\ntrue: yes\n? explicit\n: v\n";
        let loc = Locations::index(yaml);
        assert_eq!(loc.locate("quoted key"), pos(1, 15));
        assert_eq!(loc.key_position("quoted key"), pos(1, 1));
        assert_eq!(loc.locate("single.a b"), pos(2, 19));
        assert_eq!(loc.key_position("single.a b"), pos(2, 12));
        assert_eq!(loc.locate("42"), pos(3, 5));
        assert_eq!(loc.locate("true"), pos(4, 7));
        assert_eq!(loc.key_position("explicit"), pos(5, 3));
        assert_eq!(loc.locate("explicit"), pos(6, 3));
    }

    #[test]
    fn complex_keys_are_skipped() {
        let yaml = "? [x, {y: z}]\n: 1\nafter: 2\n";
        let loc = Locations::index(yaml);
        assert_eq!(loc.key_position("?"), pos(1, 3));
        assert_eq!(loc.locate("?"), pos(2, 3));
        assert_eq!(loc.locate("after"), pos(3, 8));
        // The inside of a complex key is not indexed: falls back to the root.
        assert_eq!(loc.locate("y"), pos(1, 1));
    }

    #[test]
    fn anchors_and_aliases() {
        let yaml =
            "base: &b\n  qos: 1\nuse: *b\nname: &n hello\nother: *n\nmap:\n  *n : aliased key\n";
        let loc = Locations::index(yaml);
        assert_eq!(loc.locate("base"), pos(2, 3));
        assert_eq!(loc.locate("base.qos"), pos(2, 8));
        assert_eq!(loc.locate("use"), pos(3, 6));
        // Children of an alias fall back to the alias itself.
        assert_eq!(loc.locate("use.qos"), pos(3, 6));
        assert_eq!(loc.locate("name"), pos(4, 10));
        assert_eq!(loc.locate("other"), pos(5, 8));
        assert_eq!(loc.key_position("map.hello"), pos(7, 3));
        assert_eq!(loc.locate("map.hello"), pos(7, 8));
    }

    #[test]
    fn nested_flow_and_block_collections() {
        let yaml = "- a\n- {k: [1, {deep: v}], e: {}}\n- - x\n  - y\n-\n  - z\n";
        let loc = Locations::index(yaml);
        assert_eq!(loc.locate(""), pos(1, 1));
        assert_eq!(loc.locate("[0]"), pos(1, 3));
        assert_eq!(loc.locate("[1]"), pos(2, 3));
        assert_eq!(loc.locate("[1].k"), pos(2, 7));
        assert_eq!(loc.locate("[1].k[1]"), pos(2, 11));
        assert_eq!(loc.locate("[1].k[1].deep"), pos(2, 18));
        assert_eq!(loc.locate("[1].e"), pos(2, 26));
        assert_eq!(loc.locate("[1].e.missing"), pos(2, 26));
        assert_eq!(loc.locate("[2]"), pos(3, 3));
        assert_eq!(loc.locate("[2][1]"), pos(4, 5));
        assert_eq!(loc.locate("[3][0]"), pos(6, 5));
    }

    #[test]
    fn implicit_null_is_placed_at_its_key() {
        let loc = Locations::index("broker:\nsinks:\n  a: 1\n");
        assert_eq!(loc.locate("broker"), pos(1, 1));
        assert_eq!(loc.locate("sinks.a"), pos(3, 6));
        assert_eq!(loc.locate("sinks"), pos(3, 3));
    }

    #[test]
    fn duplicate_keys_keep_first() {
        let loc = Locations::index("a:\n  x: 1\nb: 2\na:\n  y: 3\n");
        assert_eq!(loc.locate("a"), pos(2, 3));
        assert_eq!(loc.key_position("a"), pos(1, 1));
        assert_eq!(loc.locate("a.y"), pos(5, 6));
    }

    #[test]
    fn only_first_document_is_indexed() {
        let loc = Locations::index("---\na: 1\n---\nb: 2\n");
        assert_eq!(loc.locate("a"), pos(2, 4));
        assert_eq!(loc.locate("b"), pos(2, 1));
    }

    #[test]
    fn columns_count_characters() {
        let loc = Locations::index("\"é\": ü\nnext: [ä, ö]\n");
        assert_eq!(loc.locate("é"), pos(1, 6));
        assert_eq!(loc.locate("next[1]"), pos(2, 11));
    }

    #[test]
    fn position_display() {
        assert_eq!(Position { line: 3, column: 8 }.to_string(), "3:8");
    }
}
