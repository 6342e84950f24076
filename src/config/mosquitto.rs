//! Mosquitto's password and ACL files (`embedded.password_file`, `embedded.acl_file`),
//! read as Mosquitto 2.0 reads them, so that a deployment moves to the embedded broker
//! with its files unchanged. Parsing only: what the entries allow is decided in
//! [`crate::broker::auth`].
//!
//! **Password file** (made by `mosquitto_passwd`): one `username:hash` per line, the hash
//! either `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, Mosquitto 2's default) or
//! `$6$SALT$HASH` (SHA-512 of the password followed by the salt, Mosquitto 1.6's), salt
//! (12 bytes) and hash (64 bytes) in base64. A line starting with `#`, and a blank line,
//! are skipped.
//!
//! **ACL file**: `user NAME` starts a user's block (the rest of the line is the name);
//! `topic [read|write|readwrite|deny] FILTER` adds an entry to the current block, or,
//! before any `user` line, to the block of clients without a username; `pattern [ACCESS]
//! FILTER` applies to every client, `%c` standing for its client id and `%u` for its
//! username. Without an access word an entry is `readwrite`. Words are separated by
//! spaces (a tab is part of a word, as in Mosquitto); `#` in the first column starts a
//! comment.
//!
//! One departure: a password-file line Mosquitto skips with a warning (no `:`, a hash it
//! cannot decode, a plain-text password) is an error here, and so is a user listed twice,
//! so that a typo does not quietly lock a device out. The ACL lines Mosquitto refuses (an
//! unknown keyword, a missing topic or username, an invalid filter) are errors in both.
//! No message names a hash or any part of one.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::topic::validate_filter;

/// Bytes of the salt in a Mosquitto hash.
pub const SALT_LEN: usize = 12;
/// Bytes of a SHA-512 digest, and of a Mosquitto hash.
pub const HASH_LEN: usize = 64;

/// Standard base64, padded or not (`mosquitto_passwd` pads; hand-made files may not).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// One user of a password file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdUser {
    pub username: String,
    pub hash: MosquittoHash,
    /// 1-based line in the file, for the error about a name also in `embedded.users`.
    pub line: usize,
}

/// A password hash from a password file. Its `Debug` shows the algorithm only.
#[derive(Clone, PartialEq, Eq)]
pub struct MosquittoHash {
    pub algorithm: HashAlgorithm,
    pub salt: [u8; SALT_LEN],
    pub hash: [u8; HASH_LEN],
}

impl fmt::Debug for MosquittoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MosquittoHash")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// How a Mosquitto hash was made from the password and the salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    /// `$6$`: SHA-512 of the password followed by the salt.
    Sha512,
    /// `$7$`: PBKDF2-HMAC-SHA512 with this many iterations.
    Pbkdf2Sha512 { iterations: u32 },
}

/// The entries of an ACL file, each block in the file's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MosquittoAcl {
    /// `topic` lines before the first `user` line: for clients without a username.
    pub anonymous: Vec<AclEntry>,
    /// Each user's `topic` lines (a user with two blocks has the lines of both).
    pub users: HashMap<String, Vec<AclEntry>>,
    /// `pattern` lines, wherever they are: for every client.
    pub patterns: Vec<AclEntry>,
}

impl MosquittoAcl {
    /// How many `topic` and `pattern` lines the file holds.
    pub fn entry_count(&self) -> usize {
        self.anonymous.len()
            + self.users.values().map(Vec::len).sum::<usize>()
            + self.patterns.len()
    }
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    pub access: Access,
    /// A topic filter; in a pattern, `%c` and `%u` are still in it.
    pub filter: String,
}

/// The access word of an ACL line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

/// A line that cannot be used: where (1-based line and column) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a file named in the config cannot be used.
#[derive(Debug)]
pub enum FileError {
    Unreadable(std::io::Error),
    /// Every malformed line.
    Lines(Vec<LineError>),
}

/// Reads and parses a password file.
pub fn read_passwd(path: &Path) -> Result<Vec<PasswdUser>, FileError> {
    let text = std::fs::read_to_string(path).map_err(FileError::Unreadable)?;
    parse_passwd(&text).map_err(FileError::Lines)
}

/// Reads and parses an ACL file.
pub fn read_acl(path: &Path) -> Result<MosquittoAcl, FileError> {
    let text = std::fs::read_to_string(path).map_err(FileError::Unreadable)?;
    parse_acl(&text).map_err(FileError::Lines)
}

/// Parses the text of a password file; on failure, every malformed line.
pub fn parse_passwd(text: &str) -> Result<Vec<PasswdUser>, Vec<LineError>> {
    let mut users: Vec<PasswdUser> = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.starts_with('#') || raw.trim().is_empty() {
            continue;
        }
        let error = |column, message: String| LineError {
            line,
            column,
            message,
        };
        let Some((name, hash)) = raw.split_once(':') else {
            errors.push(error(1, "expected `username:hash`".into()));
            continue;
        };
        let username = name.trim();
        if username.is_empty() {
            errors.push(error(1, "the username is empty".into()));
            continue;
        }
        let hash_column = column_of(raw, hash.trim_start());
        match parse_hash(hash.trim()) {
            Ok(hash) => match users.iter().find(|u| u.username == username) {
                Some(first) => errors.push(error(
                    1,
                    format!("user {username:?} is also on line {}", first.line),
                )),
                None => users.push(PasswdUser {
                    username: username.to_string(),
                    hash,
                    line,
                }),
            },
            Err(why) => errors.push(error(hash_column, format!("user {username:?}: {why}"))),
        }
    }
    if errors.is_empty() {
        Ok(users)
    } else {
        Err(errors)
    }
}

/// Parses `$6$SALT$HASH` or `$7$ITERATIONS$SALT$HASH`. Errors never quote the text.
fn parse_hash(text: &str) -> Result<MosquittoHash, String> {
    let mut fields = text.split('$');
    let algorithm = match (fields.next(), fields.next()) {
        (Some(""), Some("6")) => HashAlgorithm::Sha512,
        (Some(""), Some("7")) => {
            let iterations = fields
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .ok_or("the $7$ hash's iteration count is not a positive number")?;
            HashAlgorithm::Pbkdf2Sha512 { iterations }
        }
        _ => {
            return Err("not a $6$ or $7$ hash (a plain-text password? \
                 `mosquitto_passwd -U FILE` hashes a whole file)"
                .into());
        }
    };
    let salt = decode(fields.next(), "salt")?;
    let hash = decode(fields.next(), "hash")?;
    if fields.next().is_some() {
        return Err("the hash has more `$`-separated fields than $6$ and $7$ hashes have".into());
    }
    Ok(MosquittoHash {
        algorithm,
        salt,
        hash,
    })
}

/// Decodes one base64 field of a hash into exactly `N` bytes.
fn decode<const N: usize>(field: Option<&str>, what: &str) -> Result<[u8; N], String> {
    let field = field.ok_or_else(|| format!("the hash has no {what}"))?;
    let bytes = BASE64
        .decode(field)
        .map_err(|_| format!("the {what} is not base64"))?;
    <[u8; N]>::try_from(bytes.as_slice())
        .map_err(|_| format!("the {what} is {} bytes, not {N}", bytes.len()))
}

/// Parses the text of an ACL file; on failure, every malformed line.
pub fn parse_acl(text: &str) -> Result<MosquittoAcl, Vec<LineError>> {
    let mut acl = MosquittoAcl::default();
    let mut user: Option<String> = None;
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let text = raw.trim_end();
        if text.starts_with('#') {
            continue;
        }
        let error = |at: &str, message: String| LineError {
            line,
            column: column_of(raw, at),
            message,
        };
        let Some((keyword, rest)) = next_word(text) else {
            continue;
        };
        match keyword {
            "topic" | "pattern" => {
                let Some((first, after)) = next_word(rest) else {
                    errors.push(error(keyword, format!("`{keyword}` needs a topic filter")));
                    continue;
                };
                let (access, filter) = if after.is_empty() {
                    (Access::ReadWrite, first)
                } else {
                    let access = match first {
                        "read" => Access::Read,
                        "write" => Access::Write,
                        "readwrite" => Access::ReadWrite,
                        "deny" => Access::Deny,
                        other => {
                            errors.push(error(
                                first,
                                format!(
                                    "unknown access {other:?}: use read, write, readwrite or deny"
                                ),
                            ));
                            continue;
                        }
                    };
                    (access, after.trim())
                };
                if let Err(e) = validate_filter(filter) {
                    errors.push(error(filter, format!("{filter:?}: {e}")));
                    continue;
                }
                let entry = AclEntry {
                    access,
                    filter: filter.to_string(),
                };
                match (keyword, &user) {
                    ("pattern", _) => acl.patterns.push(entry),
                    (_, None) => acl.anonymous.push(entry),
                    (_, Some(name)) => acl.users.entry(name.clone()).or_default().push(entry),
                }
            }
            "user" => match rest.trim() {
                "" => errors.push(error(keyword, "`user` needs a username".into())),
                name => user = Some(name.to_string()),
            },
            other => errors.push(error(
                other,
                format!(
                    "unknown keyword {other:?}: expected topic, pattern or user \
                     (a comment starts with # in the first column)"
                ),
            )),
        }
    }
    if errors.is_empty() {
        Ok(acl)
    } else {
        Err(errors)
    }
}

/// The first word of `s` and what follows the space that ends it, split on spaces only,
/// as Mosquitto's `strtok_r(…, " ")` splits; None when `s` holds only spaces.
fn next_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    Some(s.split_once(' ').unwrap_or((s, "")))
}

/// The 1-based column, in characters, where `part` (a slice of `line`) starts.
fn column_of(line: &str, part: &str) -> usize {
    let offset = (part.as_ptr() as usize)
        .saturating_sub(line.as_ptr() as usize)
        .min(line.len());
    line[..offset].chars().count() + 1
}

#[cfg(test)]
pub(crate) mod tests;
