//! MQTT topic names and topic filters: validation and matching exactly per
//! MQTT 3.1.1 / 5.0 section 4.7, plus mqbridge's named captures `{name}`, which
//! stand for a whole `+` level and bind the matched level to a variable, and the
//! `$share/GROUP/filter` form for shared subscriptions.
//!
//! Levels are separated by `/`; empty levels are valid (`a//b`, `/a`, `a/`).
//! `+` matches exactly one level (possibly empty); `#` must be the last level and
//! matches the parent level plus any number of child levels. Filters whose first
//! level is a wildcard never match topic names starting with `$`.
//!
//! What a filter's captures bind in one topic is kept with the records made from it as
//! [`Vars`].

/// Largest topic name or filter MQTT can carry (a two-byte length prefix).
const MAX_LEN: usize = 65535;

/// Why a topic name, topic filter or share group was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic filter is empty")]
    EmptyFilter,
    #[error("topic name is empty")]
    EmptyName,
    #[error("topic longer than 65535 bytes")]
    TooLong,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name must not contain wildcards")]
    WildcardInName,
    #[error("'#' must be the last level")]
    HashNotLast,
    #[error("'#' must occupy a whole level")]
    HashNotWholeLevel,
    #[error("'+' must occupy a whole level")]
    PlusNotWholeLevel,
    #[error("a capture must occupy a whole level, like '{{name}}' (found level '{0}')")]
    CaptureNotWholeLevel(String),
    #[error("capture name is empty ('{{}}')")]
    EmptyCaptureName,
    #[error("capture name '{0}' is not an identifier")]
    InvalidCaptureName(String),
    #[error("duplicate capture name '{0}'")]
    DuplicateCapture(String),
    #[error(
        "write the filter without '$share/GROUP/'; shared subscriptions take the group separately"
    )]
    SharedPattern,
    #[error("share group must be non-empty and contain no '/', '+' or '#'")]
    InvalidShareGroup,
    #[error("topic longer than the {0} bytes allowed here")]
    LongerThan(usize),
    #[error("topic of more than the {0} levels allowed here")]
    DeeperThan(usize),
}

/// Limits a server sets below MQTT's own on the topic names and filters clients send (the
/// embedded broker's `max_topic_length` and `max_topic_levels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicLimits {
    /// Bytes.
    pub length: usize,
    pub levels: usize,
}

impl TopicLimits {
    /// Whether `topic` (a name or a filter) is within the limits.
    pub fn check(&self, topic: &str) -> Result<(), TopicError> {
        if topic.len() > self.length {
            return Err(TopicError::LongerThan(self.length));
        }
        if topic.split('/').nth(self.levels).is_some() {
            return Err(TopicError::DeeperThan(self.levels));
        }
        Ok(())
    }
}

/// One pre-split level of a parsed filter (a trailing `#` is kept separately).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    Plus,
    Capture(Box<str>),
}

/// A topic filter from the rules file, possibly with named captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    pattern: String,
    mqtt: String,
    levels: Vec<Level>,
    /// The filter ends with a `#` level.
    multi: bool,
}

/// A filter's captures of one topic: (name, level value), in the filter's order.
pub type Captures<'f, 't> = smallvec::SmallVec<[(&'f str, &'t str); 4]>;

impl TopicFilter {
    /// Parses a filter as written in the rules file: MQTT wildcards `+`, `#` and named
    /// captures `{name}` (a whole level; name = `[A-Za-z_][A-Za-z0-9_]*`, unique in the
    /// filter). Braces are only allowed as a whole-level capture.
    pub fn parse(pattern: &str) -> Result<Self, TopicError> {
        if pattern.is_empty() {
            return Err(TopicError::EmptyFilter);
        }
        if pattern.contains('\0') {
            return Err(TopicError::Nul);
        }
        if pattern.starts_with("$share/") {
            return Err(TopicError::SharedPattern);
        }
        let mut levels = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        let mut multi = false;
        let mut mqtt = String::with_capacity(pattern.len());
        let mut parts = pattern.split('/').peekable();
        let mut first = true;
        while let Some(part) = parts.next() {
            let last = parts.peek().is_none();
            if !std::mem::take(&mut first) {
                mqtt.push('/');
            }
            if part == "#" {
                if !last {
                    return Err(TopicError::HashNotLast);
                }
                multi = true;
                mqtt.push('#');
                continue;
            }
            check_wildcards(part)?;
            let level = if part == "+" {
                Level::Plus
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() {
                    return Err(TopicError::EmptyCaptureName);
                }
                if !is_identifier(name) {
                    return Err(TopicError::InvalidCaptureName(name.to_owned()));
                }
                if names.contains(&name) {
                    return Err(TopicError::DuplicateCapture(name.to_owned()));
                }
                names.push(name);
                Level::Capture(name.into())
            } else if part.contains(['{', '}']) {
                return Err(TopicError::CaptureNotWholeLevel(part.to_owned()));
            } else {
                Level::Literal(part.into())
            };
            mqtt.push_str(if matches!(level, Level::Literal(_)) {
                part
            } else {
                "+"
            });
            levels.push(level);
        }
        if mqtt.len() > MAX_LEN {
            return Err(TopicError::TooLong);
        }
        Ok(Self {
            pattern: pattern.to_owned(),
            mqtt,
            levels,
            multi,
        })
    }

    /// The pattern as the user wrote it.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The plain MQTT filter to subscribe with: captures replaced by `+`
    /// (`sensors/{device}/t` -> `sensors/+/t`).
    pub fn mqtt_filter(&self) -> &str {
        &self.mqtt
    }

    /// True when the topic NAME matches this filter per the MQTT spec. Does not allocate.
    pub fn matches(&self, topic: &str) -> bool {
        self.walk(topic, |_, _| {})
    }

    /// None when it does not match; otherwise the named captures in filter order:
    /// (name, level value). Made for every message a rule matches: up to four are kept
    /// inline, without an allocation.
    pub fn captures<'f, 't>(&'f self, topic: &'t str) -> Option<Captures<'f, 't>> {
        let mut out = Captures::new();
        self.walk(topic, |name, value| out.push((name, value)))
            .then_some(out)
    }

    /// `$share/{group}/{mqtt_filter}`.
    pub fn shared(&self, group: &str) -> Result<String, TopicError> {
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(TopicError::InvalidShareGroup);
        }
        if group.contains('\0') {
            return Err(TopicError::Nul);
        }
        let shared = format!("$share/{group}/{}", self.mqtt);
        if shared.len() > MAX_LEN {
            return Err(TopicError::TooLong);
        }
        Ok(shared)
    }

    /// Walks `topic` against the pre-split levels, reporting each capture to `bind`.
    fn walk<'f, 't>(&'f self, topic: &'t str, mut bind: impl FnMut(&'f str, &'t str)) -> bool {
        let first_is_wildcard = match self.levels.first() {
            Some(Level::Literal(_)) => false,
            Some(_) => true,
            None => self.multi,
        };
        if first_is_wildcard && topic.starts_with('$') {
            return false;
        }
        let mut parts = topic.split('/');
        for level in &self.levels {
            let Some(part) = parts.next() else {
                return false;
            };
            match level {
                Level::Literal(literal) if **literal != *part => return false,
                Level::Literal(_) | Level::Plus => {}
                Level::Capture(name) => bind(name, part),
            }
        }
        self.multi || parts.next().is_none()
    }
}

/// Validates a topic NAME (what a PUBLISH carries): non-empty, no '+' or '#', no NUL,
/// at most 65535 bytes.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::EmptyName);
    }
    if topic.len() > MAX_LEN {
        return Err(TopicError::TooLong);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Validates a plain MQTT filter (no captures) for SUBSCRIBE.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::EmptyFilter);
    }
    if filter.len() > MAX_LEN {
        return Err(TopicError::TooLong);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let mut parts = filter.split('/').peekable();
    while let Some(part) = parts.next() {
        if part == "#" && parts.peek().is_some() {
            return Err(TopicError::HashNotLast);
        }
        check_wildcards(part)?;
    }
    Ok(())
}

/// Validates a SUBSCRIBE's or UNSUBSCRIBE's filter, which may name a share group
/// (`$share/GROUP/filter`): returns the group and the filter. The group is not empty and
/// holds no `/`, `+` or `#` (MQTT 5.0 [MQTT-4.8.2-1], [MQTT-4.8.2-2]); U+0000 anywhere is
/// [`TopicError::Nul`].
pub fn split_shared(filter: &str) -> Result<(Option<&str>, &str), TopicError> {
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let (group, filter) = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) if !group.is_empty() && !group.contains(['+', '#']) => {
                (Some(group), filter)
            }
            _ => return Err(TopicError::InvalidShareGroup),
        },
        None => (None, filter),
    };
    validate_filter(filter)?;
    Ok((group, filter))
}

/// Spec matcher on plain strings, no allocation: does MQTT `filter` match topic
/// `name`? Assumes both are valid.
pub fn filter_matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut name_levels = name.split('/');
    loop {
        match (filter_levels.next(), name_levels.next()) {
            // '#' also matches the parent level, i.e. when the name has ended.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(n)) if f == n => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Rejects `+` or `#` that share a level with other characters.
fn check_wildcards(level: &str) -> Result<(), TopicError> {
    if level != "#" && level.contains('#') {
        Err(TopicError::HashNotWholeLevel)
    } else if level != "+" && level.contains('+') {
        Err(TopicError::PlusNotWholeLevel)
    } else {
        Ok(())
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// True when every topic that `f` matches is also matched by `g`.
pub fn covers(g: &str, f: &str) -> bool {
    let mut gl = g.split('/');
    let mut fl = f.split('/');
    let mut first = true;
    loop {
        match (gl.next(), fl.next()) {
            (Some("#"), Some(fl_level)) => return !(first && fl_level.starts_with('$')),
            (Some("#"), None) => return true,
            (Some("+"), Some(x)) => {
                if x == "#" || (first && x.starts_with('$')) {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// True when some topic name matches both filters (both valid): the subscriptions they
/// make may receive a common message.
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut al = a.split('/');
    let mut bl = b.split('/');
    let mut first = true;
    loop {
        match (al.next(), bl.next()) {
            // '#' matches the rest (its parent level too), but no first level with '$'.
            (Some("#"), other) | (other, Some("#")) => {
                return !(first && other.is_some_and(|l| l.starts_with('$')));
            }
            (Some("+"), Some(x)) | (Some(x), Some("+")) => {
                if first && x.starts_with('$') {
                    return false;
                }
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

/// A message's topic captures for one rule (`{device}` → `d1`), kept with its records
/// for templates and dead letters. A list is made for every message a rule matches and
/// freed on a sink's thread, so names and values sit in one buffer (a `Vec` of `String`
/// pairs made 1 + 2n allocations), inline up to [`VARS_INLINE`] bytes (one short capture
/// costs no allocation): each as its length (4 bytes, little-endian), then its text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Vars(smallvec::SmallVec<[u8; VARS_INLINE]>);

/// Bytes of [`Vars`] held without an allocation: `{device}` → a 14-byte id.
pub const VARS_INLINE: usize = 28;

impl Vars {
    /// The `(name, value)` pairs, in this order.
    pub fn new(pairs: &[(&str, &str)]) -> Vars {
        let len = pairs.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut b = smallvec::SmallVec::with_capacity(len);
        for text in pairs.iter().flat_map(|&(k, v)| [k, v]) {
            let n = u32::try_from(text.len()).expect("a topic level is shorter than 4 GiB");
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(text.as_bytes());
        }
        Vars(b)
    }

    /// The pairs, in order.
    pub fn iter(&self) -> VarsIter<'_> {
        VarsIter(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// [`Vars::iter`].
pub struct VarsIter<'a>(&'a [u8]);

/// The next text of a list, moving `b` past it.
fn next_text<'a>(b: &mut &'a [u8]) -> &'a str {
    let (n, rest) = b.split_at(4);
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let (text, rest) = rest.split_at(n);
    *b = rest;
    std::str::from_utf8(text).expect("made from text")
}

impl<'a> Iterator for VarsIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        if self.0.is_empty() {
            return None;
        }
        Some((next_text(&mut self.0), next_text(&mut self.0)))
    }
}

impl std::fmt::Debug for Vars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// As a map of name to value.
impl serde::Serialize for Vars {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (filter, topic, expected): spec examples from MQTT 3.1.1 §4.7.1.2, §4.7.1.3,
    /// §4.7.2, §4.7.3 and the level rules.
    const MATCH_CASES: &[(&str, &str, bool)] = &[
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/tennis/player1/#", "sport/tennis", false),
        ("sport/#", "sport", true),
        ("sport/#", "sport/", true),
        ("sport/#", "sport/a/b", true),
        ("sport/#", "sports", false),
        ("#", "a", true),
        ("#", "/", true),
        ("#", "a/b/c", true),
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player2", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("sport/+/player1", "sport/tennis/player1", true),
        ("+/tennis/#", "sport/tennis", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("+", "finance", true),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        ("/a", "a", false),
        ("a/", "a", false),
        ("#", "$SYS/monitor/Clients", false),
        ("#", "$SYS", false),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("$SYS/#", "$SYS/monitor/Clients", true),
        ("$SYS/#", "$SYS", true),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("a/$x", "a/$x", true),
        ("a/+", "a/$x", true),
        ("a/#", "a/$x", true),
        ("ACCOUNTS", "Accounts", false),
        ("Accounts payable", "Accounts payable", true),
        ("/", "/", true),
        ("caf\u{e9}", "cafe\u{301}", false),
    ];

    #[test]
    fn spec_matching() {
        for &(filter, topic, expected) in MATCH_CASES {
            assert_eq!(validate_filter(filter), Ok(()), "{filter}");
            assert_eq!(validate_topic_name(topic), Ok(()), "{topic}");
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "{filter} ~ {topic}"
            );
            let parsed = TopicFilter::parse(filter).unwrap();
            assert_eq!(parsed.mqtt_filter(), filter);
            assert_eq!(parsed.matches(topic), expected, "{filter} ~ {topic}");
            assert_eq!(parsed.captures(topic).is_some(), expected);
        }
    }

    #[test]
    fn filter_errors() {
        use TopicError::*;
        let long = "a".repeat(MAX_LEN + 1);
        let cases: &[(&str, TopicError)] = &[
            ("", EmptyFilter),
            ("sport/tennis#", HashNotWholeLevel),
            ("sport/tennis/#/ranking", HashNotLast),
            ("#/a", HashNotLast),
            ("##", HashNotWholeLevel),
            ("sport+", PlusNotWholeLevel),
            ("a/+b/c", PlusNotWholeLevel),
            ("++", PlusNotWholeLevel),
            ("a/\0", Nul),
            (&long, TooLong),
        ];
        for (filter, err) in cases {
            assert_eq!(validate_filter(filter).as_ref(), Err(err), "{filter:?}");
            assert_eq!(TopicFilter::parse(filter).as_ref(), Err(err), "{filter:?}");
        }
        for ok in [
            "#",
            "+",
            "sport/tennis/#",
            "+/tennis/#",
            "/",
            "//",
            "a/{b}",
            "$share/g/a",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter(&"a".repeat(MAX_LEN)), Ok(()));
    }

    #[test]
    fn parse_errors() {
        use TopicError::*;
        let cases = [
            ("a{b}", CaptureNotWholeLevel("a{b}".into())),
            ("{b}c", CaptureNotWholeLevel("{b}c".into())),
            ("x/{b", CaptureNotWholeLevel("{b".into())),
            ("x/b}", CaptureNotWholeLevel("b}".into())),
            ("{}", EmptyCaptureName),
            ("a/{x y}", InvalidCaptureName("x y".into())),
            ("{1a}", InvalidCaptureName("1a".into())),
            ("{a-b}", InvalidCaptureName("a-b".into())),
            ("{a}b}", InvalidCaptureName("a}b".into())),
            ("{device}/x/{device}", DuplicateCapture("device".into())),
            ("{a}/#/{b}", HashNotLast),
            ("$share/g/a/+", SharedPattern),
        ];
        for (pattern, err) in cases {
            assert_eq!(TopicFilter::parse(pattern), Err(err), "{pattern}");
        }
        assert_eq!(
            InvalidCaptureName("x y".into()).to_string(),
            "capture name 'x y' is not an identifier"
        );
        assert_eq!(EmptyCaptureName.to_string(), "capture name is empty ('{}')");
    }

    #[test]
    fn topic_name_validation() {
        use TopicError::*;
        let long = "a".repeat(MAX_LEN + 1);
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("/", Ok(())),
            ("a//b", Ok(())),
            ("$SYS/x", Ok(())),
            ("a/{b}", Ok(())),
            ("", Err(EmptyName)),
            ("a/+", Err(WildcardInName)),
            ("a/#", Err(WildcardInName)),
            ("a+b", Err(WildcardInName)),
            ("a\0b", Err(Nul)),
            (&long, Err(TooLong)),
        ];
        for (topic, expected) in cases {
            assert_eq!(&validate_topic_name(topic), expected, "{topic:?}");
        }
        assert_eq!(validate_topic_name(&"a".repeat(MAX_LEN)), Ok(()));
    }

    #[test]
    fn vars_keep_their_pairs_in_order() {
        let pairs = [("device", "d1"), ("site", ""), ("é", "naïve/𝄞"), ("", "x")];
        let vars = Vars::new(&pairs);
        assert_eq!(vars.iter().collect::<Vec<_>>(), pairs);
        assert!(!vars.is_empty());
        assert_eq!(
            serde_json::to_value(&vars).unwrap(),
            serde_json::json!({"device": "d1", "site": "", "é": "naïve/𝄞", "": "x"})
        );
        assert_eq!(format!("{:?}", Vars::new(&[("a", "b")])), r#"{"a": "b"}"#);
        let none = Vars::new(&[]);
        assert!(none.is_empty());
        assert_eq!(none, Vars::default());
        assert_eq!(none.iter().count(), 0);
    }

    #[test]
    fn captures() {
        let f = TopicFilter::parse("sensors/{device}/telemetry").unwrap();
        assert_eq!(f.pattern(), "sensors/{device}/telemetry");
        assert_eq!(f.mqtt_filter(), "sensors/+/telemetry");
        assert_eq!(
            f.captures("sensors/d1/telemetry"),
            Some(smallvec::smallvec![("device", "d1")])
        );
        assert_eq!(
            f.captures("sensors//telemetry"),
            Some(smallvec::smallvec![("device", "")])
        );
        assert_eq!(f.captures("sensors/d1/status"), None);
        assert!(!f.matches("sensors/d1/telemetry/x"));

        let two = TopicFilter::parse("{site}/+/{_dev2}/t").unwrap();
        assert_eq!(two.mqtt_filter(), "+/+/+/t");
        let got = two.captures("s1/x/d9/t").unwrap();
        assert_eq!(got[..], [("site", "s1"), ("_dev2", "d9")]);
        assert_eq!(two.captures("$s1/x/d9/t"), None);

        let hash = TopicFilter::parse("home/{room}/#").unwrap();
        assert_eq!(hash.mqtt_filter(), "home/+/#");
        assert_eq!(
            hash.captures("home/kitchen"),
            Some(smallvec::smallvec![("room", "kitchen")])
        );
        assert_eq!(
            hash.captures("home/kitchen/a/b"),
            Some(smallvec::smallvec![("room", "kitchen")])
        );
        assert_eq!(hash.captures("home"), None);
        assert_eq!(
            TopicFilter::parse("a/b").unwrap().captures("a/b"),
            Some(smallvec::smallvec![])
        );
    }

    #[test]
    fn shared_subscriptions() {
        let f = TopicFilter::parse("sensors/{device}/#").unwrap();
        assert_eq!(f.shared("workers").unwrap(), "$share/workers/sensors/+/#");
        for bad in ["", "a/b", "a+", "#"] {
            assert_eq!(f.shared(bad), Err(TopicError::InvalidShareGroup), "{bad}");
        }
        assert_eq!(f.shared("a\0"), Err(TopicError::Nul));
    }

    #[test]
    fn a_clients_filter_is_split_from_its_share_group() {
        use TopicError::*;
        for (filter, want) in [
            ("a/+/#", Ok((None, "a/+/#"))),
            ("$share/g/a/#", Ok((Some("g"), "a/#"))),
            ("$share/g//", Ok((Some("g"), "/"))),
            ("$shared/a", Ok((None, "$shared/a"))),
            ("$share//a", Err(InvalidShareGroup)),
            ("$share/g", Err(InvalidShareGroup)),
            ("$share/g+/a", Err(InvalidShareGroup)),
            ("$share/#/a", Err(InvalidShareGroup)),
            ("$share/g/", Err(EmptyFilter)),
            ("$share/g/a#", Err(HashNotWholeLevel)),
            ("$share/g\0/a", Err(Nul)),
            ("a/\0", Err(Nul)),
        ] {
            assert_eq!(split_shared(filter), want, "{filter:?}");
        }
    }

    /// Deliberately simple reference matcher over level slices (without the '$' rule).
    fn reference(filter: &[&str], topic: &[&str]) -> bool {
        match (filter, topic) {
            (["#"], _) => true,
            ([], []) => true,
            (["+", f @ ..], [_, t @ ..]) => reference(f, t),
            ([fl, f @ ..], [tl, t @ ..]) => fl == tl && reference(f, t),
            _ => false,
        }
    }

    fn reference_matches(filter: &str, topic: &str) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let topic_levels: Vec<&str> = topic.split('/').collect();
        let dollar_excluded = topic.starts_with('$') && (filter[0] == "+" || filter[0] == "#");
        !dollar_excluded && reference(&filter, &topic_levels)
    }

    fn topic_levels() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "$x", ""]), 1..6)
            .prop_filter("topic name must be non-empty", |l| !l.join("/").is_empty())
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "+", "", "$x"]);
        (prop::collection::vec(level, 0..6), any::<bool>())
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                levels.join("/")
            })
            .prop_filter("filter must be non-empty", |f| !f.is_empty())
    }

    proptest! {
        #[test]
        fn matchers_agree_with_reference(levels in topic_levels(), filter in filter_strategy()) {
            let topic = levels.join("/");
            prop_assert_eq!(validate_topic_name(&topic), Ok(()));
            prop_assert_eq!(validate_filter(&filter), Ok(()));
            let expected = reference_matches(&filter, &topic);
            prop_assert_eq!(filter_matches(&filter, &topic), expected);
            let parsed = TopicFilter::parse(&filter).unwrap();
            prop_assert_eq!(parsed.mqtt_filter(), filter.as_str());
            prop_assert_eq!(parsed.matches(&topic), expected);

            // Same filter with every '+' turned into a capture binds the matching levels.
            let mut n = 0;
            let with_captures: Vec<String> = filter
                .split('/')
                .map(|l| if l == "+" { n += 1; format!("{{c{n}}}") } else { l.to_owned() })
                .collect();
            let captured = TopicFilter::parse(&with_captures.join("/")).unwrap();
            prop_assert_eq!(captured.mqtt_filter(), filter.as_str());
            let expected_caps = expected.then(|| {
                with_captures.iter().zip(&levels)
                    .filter(|(f, _)| f.starts_with('{'))
                    .map(|(f, t)| (&f[1..f.len() - 1], *t))
                    .collect::<Captures>()
            });
            prop_assert_eq!(captured.captures(&topic), expected_caps);
        }

        #[test]
        fn generalised_topic_matches(
            levels in topic_levels(),
            plus in prop::collection::vec(any::<bool>(), 6),
            cut in prop::option::of(0usize..6),
        ) {
            let topic = levels.join("/");
            let mut filter: Vec<&str> = levels
                .iter()
                .zip(&plus)
                .map(|(&l, &p)| if p { "+" } else { l })
                .collect();
            if let Some(cut) = cut {
                filter.truncate(cut.min(filter.len()));
                filter.push("#");
            }
            let first_wild = filter[0] == "+" || filter[0] == "#";
            let expected = !(topic.starts_with('$') && first_wild);
            let filter = filter.join("/");
            prop_assert_eq!(filter_matches(&filter, &topic), expected, "{} ~ {}", filter, topic);
            prop_assert_eq!(TopicFilter::parse(&filter).unwrap().matches(&topic), expected);
        }
    }

    #[test]
    fn covering_filters() {
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("#", "a/+/#"));
        assert!(!covers("#", "$SYS/x"));
        assert!(!covers("+/x", "$SYS/x"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
    }

    #[test]
    fn overlapping_filters() {
        assert!(overlaps("a/#", "a"));
        assert!(overlaps("a/+", "+/b"));
        assert!(overlaps("#", "secret/#"));
        assert!(overlaps("a/b", "a/b"));
        assert!(overlaps("$SYS/#", "$SYS/+"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(!overlaps("+/#", "$SYS/#"));
        assert!(!overlaps("a/+", "a/b/c"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a", "a/+"));
    }

    /// Small filters and topics over a few levels, `$` included, for the relations
    /// between filters (`covers`, `overlaps`) to be checked against matching.
    fn small_filters_and_topics() -> (BoxedStrategy<String>, BoxedStrategy<String>) {
        let level = prop::sample::select(vec!["a", "b", "+", "$s"]);
        let filter =
            (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(mut v, hash)| {
                if hash {
                    v.push("#");
                }
                v.join("/")
            });
        let topic = prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..5)
            .prop_map(|v| v.join("/"));
        (filter.boxed(), topic.boxed())
    }

    #[test]
    fn covers_agrees_with_matching() {
        let (filter, topic) = small_filters_and_topics();
        proptest!(|(g in filter.clone(), f in filter, t in topic)| {
            if covers(&g, &f) && filter_matches(&f, &t) {
                prop_assert!(filter_matches(&g, &t), "{g} covers {f} but misses {t}");
            }
        });
    }

    #[test]
    fn overlaps_agrees_with_matching() {
        let (filter, topic) = small_filters_and_topics();
        proptest!(|(a in filter.clone(), b in filter, t in topic)| {
            if filter_matches(&a, &t) && filter_matches(&b, &t) {
                prop_assert!(overlaps(&a, &b), "{a} and {b} both match {t}");
            }
            prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
        });
    }
}
