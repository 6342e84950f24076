//! Configuration: the YAML rules file in two phases.
//!
//! 1. [`env`] expands `${VAR}` in the raw text; yaml_serde parses it, then reads it into
//!    the [`raw`] types (a syntax error, or else a shape error, stops here, with its
//!    location and the path being read).
//! 2. [`plan`] validates everything else (topic filters, jq programs, templates, sink
//!    references, identifiers, addresses; each sink's settings through [`sinks`],
//!    `admin:` through [`admin`]) and, for `run` and `check`, [`preflight`] checks what
//!    the config needs from this machine (files readable, environment variables set).
//!    A broker connection (`broker:`, an `mqtt` sink) is validated by [`connection`].
//!    The Mosquitto password and ACL files `embedded:` names are read and parsed by
//!    [`mosquitto`] on every load (their users and rules are part of the plan), and
//!    the `.proto` files or descriptor sets of `decode: {protobuf: ...}` are read and
//!    compiled by [`protobuf`] (a problem inside a `.proto` file is reported at the
//!    field that names it, with that file, its line and column).
//!    *Every* problem is reported at once, each located in the file through
//!    [`locate`], as
//!    `FILE:LINE:COL: field.path: message` (a malformed line of a Mosquitto file with
//!    that file, its line and column, and the field that names it).
//!
//! No I/O happens beyond reading the file and those, and opening the files it
//! names; sinks and connections are built by `app`.

pub mod admin;
pub mod auth;
pub mod connection;
pub mod env;
pub mod fingerprint;
pub mod locate;
pub mod mosquitto;
pub mod plan;
pub mod preflight;
pub mod protobuf;
pub mod raw;
pub mod sinks;
pub mod units;

use std::fmt;
use std::path::Path;

pub use admin::{AdminPlan, SecretError, TokenSource};
pub use connection::ConnectionPlan;
pub use plan::{Acl, AclRule, BrokerPlan, Credential, EmbeddedPlan, Plan, SinkPlan, SpoolPlan};
pub use raw::{Fsync, RawConfig};

use locate::{Locations, Position};
use mosquitto::FileError;
use plan::AuthFiles;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub position: Option<Position>,
    /// Field path such as `rules[0].filter`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What [`load`] verifies beyond the file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// Only the file (and the Mosquitto files it names, part of the plan): enough to run
    /// its rules (`try`).
    FileOnly,
    /// Also what `run` needs from this machine (see [`preflight`]): for `run` and `check`.
    ForRun,
}

/// Reads, expands, parses and validates a rules file.
pub fn load(path: &Path, checks: Checks) -> Result<Plan, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            position: None,
            path: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse_checked(&text, &file, |name| std::env::var(name).ok(), checks)
}

/// Like [`load`] with [`Checks::FileOnly`], for text already in memory; `lookup` resolves
/// environment variables.
pub fn parse(
    text: &str,
    file: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Plan, ConfigErrors> {
    parse_checked(text, file, lookup, Checks::FileOnly)
}

fn parse_checked(
    text: &str,
    file: &str,
    lookup: impl Fn(&str) -> Option<String>,
    checks: Checks,
) -> Result<Plan, ConfigErrors> {
    let error = |position, path: &str, message: String| ConfigError {
        file: file.to_string(),
        position,
        path: path.to_string(),
        message,
    };
    let expanded = env::expand(text, &lookup).map_err(|errs| {
        ConfigErrors(
            errs.into_iter()
                .map(|e| {
                    error(
                        Some(Position {
                            line: e.line,
                            column: e.column,
                        }),
                        "",
                        e.message,
                    )
                })
                .collect(),
        )
    })?;
    let locations = Locations::index(&expanded.text);
    let raw = parse_raw(&expanded.text, &locations)
        .map_err(|(pos, path, msg)| ConfigErrors(vec![error(pos, &path, msg)]))?;
    let listen_var = raw.embedded.as_ref().and_then(|e| match &e.listen {
        raw::OneOrMany::One(address) => expanded
            .variable_of(locations.locate("embedded.listen")?, address)
            .map(str::to_owned),
        raw::OneOrMany::Many(_) => None,
    });
    let mut errs = match checks {
        Checks::FileOnly => Vec::new(),
        Checks::ForRun => preflight::check(&raw, &lookup),
    };
    let (files, unreadable, malformed) = read_auth_files(raw.embedded.as_ref());
    errs.extend(unreadable);
    let base = Path::new(file).parent().unwrap_or(Path::new(""));
    let (decoders, undecodable) = protobuf::decoders(&raw.rules, base);
    errs.extend(undecodable);
    let plan = match plan::validate(raw, files, decoders) {
        Ok(plan) => Some(plan),
        Err(invalid) => {
            errs.extend(invalid);
            None
        }
    };
    match plan {
        Some(mut plan) if errs.is_empty() && malformed.is_empty() => {
            if let Some(embedded) = &mut plan.embedded {
                embedded.listen_var = listen_var;
            }
            Ok(plan)
        }
        _ => {
            let mut errs: Vec<ConfigError> = errs
                .into_iter()
                .map(|(path, msg)| error(locations.locate(&path), &path, msg))
                .collect();
            errs.sort_by_key(|e| e.position);
            errs.extend(malformed);
            Err(ConfigErrors(errs))
        }
    }
}

/// Reads the Mosquitto files `embedded:` names: what they hold, the files that cannot be
/// read (field path, message: a problem located in the config), and the malformed lines
/// (each located in its own file).
fn read_auth_files(
    embedded: Option<&raw::EmbeddedConfig>,
) -> (AuthFiles, plan::Errors, Vec<ConfigError>) {
    let mut files = AuthFiles::default();
    let (mut unreadable, mut malformed) = (Vec::new(), Vec::new());
    let mut report = |field: &str, path: &Path, error: FileError| match error {
        FileError::Unreadable(e) => unreadable.push((
            field.to_string(),
            format!("cannot read {}: {e}", path.display()),
        )),
        FileError::Lines(lines) => malformed.extend(lines.into_iter().map(|l| ConfigError {
            file: path.display().to_string(),
            position: Some(Position {
                line: l.line,
                column: l.column,
            }),
            path: field.to_string(),
            message: l.message,
        })),
    };
    if let Some(path) = embedded.and_then(|e| e.password_file.as_deref()) {
        files.passwd = mosquitto::read_passwd(path)
            .map_err(|e| report("embedded.password_file", path, e))
            .ok();
    }
    let jwt = embedded.and_then(|e| e.auth.as_ref()?.jwt.as_ref());
    let key_file = jwt.and_then(|j| {
        [
            ("secret_file", &j.secret_file),
            ("public_key_file", &j.public_key_file),
            ("jwks_file", &j.jwks_file),
        ]
        .into_iter()
        .find_map(|(field, path)| Some((field, path.as_deref()?)))
    });
    if let Some((field, path)) = key_file {
        match std::fs::read(path) {
            Ok(bytes) => files.jwt_key = Some(bytes),
            Err(e) => report(
                &format!("embedded.auth.jwt.{field}"),
                path,
                FileError::Unreadable(e),
            ),
        }
    }
    if let Some(path) = embedded.and_then(|e| e.acl_file.as_deref()) {
        files.acl = mosquitto::read_acl(path)
            .map_err(|e| report("embedded.acl_file", path, e))
            .ok();
    }
    (files, unreadable, malformed)
}

/// Parses YAML into [`RawConfig`]; on error returns (position, field path, message).
fn parse_raw(
    text: &str,
    locations: &Locations,
) -> Result<RawConfig, (Option<Position>, String, String)> {
    if text.trim().is_empty() {
        return Ok(serde_json::from_str("{}").expect("empty config"));
    }
    // The YAML itself first: a syntax error is then reported as one, rather than as a
    // problem of whichever field serde was reading when the parser gave up.
    let de = yaml_serde::Deserializer::from_str(text);
    if let Err(e) = serde_path_to_error::deserialize::<_, yaml_serde::Value>(de) {
        return Err(syntax_error(e));
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = known_path(e.path());
        let inner = e.into_inner();
        let message = plain_message(&inner.to_string());
        // An unknown key is best reported at the key itself.
        let unknown_key = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            .map(|k| {
                if path.is_empty() {
                    k.to_string()
                } else {
                    format!("{path}.{k}")
                }
            });
        let position = unknown_key
            .as_deref()
            .and_then(|p| locations.key_position(p))
            .or_else(|| {
                inner.location().map(|l| Position {
                    line: l.line(),
                    column: l.column(),
                })
            })
            .or_else(|| locations.locate(&path));
        (position, path, message)
    })
}

/// A YAML syntax error: where the parser stopped, the path of the value or collection it
/// was reading, and what it was doing, e.g. `did not find expected ',' or '}' (while
/// parsing a flow mapping that starts at 2:10)`.
fn syntax_error(
    e: serde_path_to_error::Error<yaml_serde::Error>,
) -> (Option<Position>, String, String) {
    let path = known_path(e.path());
    let inner = e.into_inner();
    let position = inner.location().map(|l| Position {
        line: l.line(),
        column: l.column(),
    });
    // libyaml's text: "PROBLEM at line L column C, while CONTEXT at line L column C".
    let text = inner.to_string();
    let (problem, context) = match text.split_once(", while ") {
        Some((problem, context)) => (problem, Some(context)),
        None => (text.as_str(), None),
    };
    let mut message = plain_message(problem);
    if let Some(context) = context {
        match without_mark(context) {
            (context, Some(start)) => {
                message = format!("{message} (while {context} that starts at {start})")
            }
            (context, None) => message = format!("{message} (while {context})"),
        }
    }
    (position, path, message)
}

/// A yaml_serde message without the position it appends (we print positions up front)
/// and without the partial field path it may prefix, e.g. "sinks: " (ours is better).
fn plain_message(text: &str) -> String {
    let message = without_mark(text).0;
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && !prefix.contains('`') => rest.to_string(),
        _ => message.to_string(),
    }
}

/// Splits yaml_serde's trailing " at line L column C" off a message.
fn without_mark(message: &str) -> (&str, Option<Position>) {
    let mark = message.rsplit_once(" at line ").and_then(|(head, mark)| {
        let (line, column) = mark.split_once(" column ")?;
        let position = Position {
            line: line.parse().ok()?,
            column: column.parse().ok()?,
        };
        Some((head, position))
    });
    match mark {
        Some((head, position)) => (head, Some(position)),
        None => (message, None),
    }
}

/// The field path, `serde_path_to_error` style, up to the first key it could not name
/// (its `?`: a key not read yet, or not a string).
fn known_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    out
}

#[cfg(test)]
mod tests;
