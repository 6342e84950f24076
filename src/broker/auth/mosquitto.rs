//! A Mosquitto password and ACL file (`embedded.password_file`, `embedded.acl_file`,
//! parsed by [`crate::config::mosquitto`]) with the meaning Mosquitto 2.0.11 gives them
//! (`src/security_default.c`: `mosquitto_unpwd_check_default`, `pw__digest`,
//! `mosquitto_acl_check_default`), so that the same clients get the same answers.
//!
//! **Passwords**: `$7$` is PBKDF2-HMAC-SHA512 of the password with the salt, `$6$` one
//! SHA-512 of the password followed by the salt; the 64 bytes are compared in constant
//! time.
//!
//! **ACL**, for a client with a username, client id and an operation (write: a PUBLISH
//! or a will; read: a message delivered to one of its subscriptions):
//! 1. its user's block (a client without a username: the lines before the first `user`):
//!    a matching `deny` entry denies; else a matching entry granting the operation allows;
//! 2. if the file has patterns and the username or client id holds `+` or `#`: denied
//!    (such an id could widen a pattern);
//! 3. the patterns, `%c` replaced by the client id and `%u` by the username (a pattern
//!    with `%u` is skipped for a client without one), `deny` first as in 1;
//! 4. anything else is denied.
//!
//! A SUBSCRIBE itself is always granted, as Mosquitto 2.0's default check grants every
//! one; [`super::Auth::receive`] works out from [`entries`] which of its messages it may
//! carry when it is made, and they are checked against that (Mosquitto checks `read` for
//! each message delivered, with the same result). `deny` entries come first in each
//! block because Mosquitto puts them first, whatever their place in the file.
//!
//! Cost: a PUBLISH is checked against the client's block and the patterns; a pattern
//! with `%c` or `%u` is written out for each check (one small allocation, as in
//! Mosquitto).

use std::borrow::Cow;

use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use super::Identity;
use crate::config::mosquitto::{
    Access, AclEntry, HASH_LEN, HashAlgorithm, MosquittoAcl, MosquittoHash,
};

/// What a client does with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Receive a message on it.
    Read,
    /// Publish on it.
    Write,
}

/// Does `password` match `hash`? The digests are compared in constant time.
pub fn verify(hash: &MosquittoHash, password: &[u8]) -> bool {
    let mut digest = [0u8; HASH_LEN];
    match hash.algorithm {
        HashAlgorithm::Sha512 => {
            let sha = Sha512::new()
                .chain_update(password)
                .chain_update(hash.salt)
                .finalize();
            digest.copy_from_slice(&sha);
        }
        HashAlgorithm::Pbkdf2Sha512 { iterations } => {
            pbkdf2::pbkdf2_hmac::<Sha512>(password, &hash.salt, iterations, &mut digest);
        }
    }
    digest.ct_eq(&hash.hash).into()
}

/// The entries that decide `op` for `who`, as (filter, allowed) in the order of the
/// module docs, patterns written out: the first whose filter matches a topic decides,
/// and a topic none matches is denied.
pub fn entries<'a>(
    acl: &'a MosquittoAcl,
    who: Identity<'a>,
    op: Op,
) -> impl Iterator<Item = (Cow<'a, str>, bool)> + 'a {
    let block = match who.username {
        Some(user) => acl.users.get(user).map_or(&[][..], Vec::as_slice),
        None => &acl.anonymous,
    };
    let widening = [Some(who.client_id), who.username]
        .into_iter()
        .flatten()
        .any(|id| id.contains(['+', '#']));
    let patterns = if widening { &[][..] } else { &acl.patterns };
    let own = deny_first(block, op).map(|(e, allowed)| (Cow::Borrowed(e.filter.as_str()), allowed));
    let patterns = deny_first(patterns, op)
        .filter(move |(e, _)| who.username.is_some() || !e.filter.contains("%u"))
        .map(move |(e, allowed)| (substitute(&e.filter, who), allowed));
    own.chain(patterns)
}

/// The `deny` entries of `block`, then those granting `op`, each with whether it allows.
fn deny_first(block: &[AclEntry], op: Op) -> impl Iterator<Item = (&AclEntry, bool)> {
    let denies = block.iter().filter(|e| e.access == Access::Deny);
    let grants = block.iter().filter(move |e| {
        matches!(
            (e.access, op),
            (Access::ReadWrite, _) | (Access::Read, Op::Read) | (Access::Write, Op::Write)
        )
    });
    denies.map(|e| (e, false)).chain(grants.map(|e| (e, true)))
}

/// `pattern` with each `%c` replaced by the client id and each `%u` by the username,
/// scanned left to right as Mosquitto does (`%%c` is `%` and the client id).
fn substitute<'a>(pattern: &'a str, who: Identity) -> Cow<'a, str> {
    if !pattern.contains('%') {
        return Cow::Borrowed(pattern);
    }
    let mut out = String::with_capacity(pattern.len() + who.client_id.len());
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        let value = match (c, chars.peek(), who.username) {
            ('%', Some('c'), _) => who.client_id,
            ('%', Some('u'), Some(user)) => user,
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(value);
        chars.next();
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests;
