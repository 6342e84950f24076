//! Who may connect, publish and subscribe.
//!
//! Users are checked against argon2 password hashes (PHC strings, made with
//! `mqbridge passwd`), or against the `$7$`/`$6$` hashes of a Mosquitto password file
//! ([`mosquitto::verify`]). The access rules are one of two kinds ([`Acl`]):
//!
//! **`embedded.acl`**, an ordered list: for each request the first rule whose username
//! matches (`*` matches everyone, anonymous clients included) and whose filters apply
//! decides. A request no rule applies to is allowed, so a list that should be restrictive
//! ends with a catch-all `{username: "*", action: deny, publish: ["#"], subscribe: ["#"]}`.
//! A publish rule applies when one of its filters matches the topic. A subscribe rule
//! applies to a SUBSCRIBE when one of its filters covers the requested filter entirely,
//! and to every message delivered when one of its filters matches the message's topic:
//! with `deny subscribe secret/#`, a subscription to `#` is granted but never carries
//! messages on `secret/…`.
//!
//! **`embedded.acl_file`**, a Mosquitto ACL file, with Mosquitto 2.0's meaning (see
//! [`mosquitto`]): what it does not grant is denied, and every SUBSCRIBE is granted while
//! each message is delivered only where the file grants `read`.
//!
//! Either way, what a subscription carries is decided when it is made, not for every
//! message: [`Auth::receive`] keeps, for one client's filter, only the rules that can
//! decide something for the topics it matches. Most subscriptions overlap no deny rule
//! and are checked for nothing ([`Receive::All`]); one to `#` beside `deny secret/#`
//! keeps that one exclusion to test each message against.
//!
//! **`embedded.auth`** adds sources asked before these: JSON Web Tokens ([`jwt`]) and an
//! HTTP service ([`http`]), each of which may hand the client an ACL of its own
//! ([`client_acl`]). [`chain`] says in which order they are asked and how "ignore" falls
//! through to the users and the ACL above.

pub mod chain;
pub mod client_acl;
pub mod http;
pub mod jwt;
pub mod mosquitto;

use std::sync::Arc;

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::config::auth::AuthPlan;
use crate::config::{Acl, AclRule, Credential};
use crate::topic::{covers, filter_matches, overlaps};
use mosquitto::Op;

/// Users and ACL.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    users: HashMap<String, Credential>,
    pub allow_anonymous: bool,
    acl: Acl,
    /// `embedded.auth.http`; None: not configured.
    http: Option<Arc<http::HttpAuth>>,
    /// `embedded.auth.jwt`; None: not configured.
    jwt: Option<Arc<jwt::Jwt>>,
}

/// The client a request comes from, as the ACL sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    /// None: connected without a username.
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

/// What a subscription may receive, as the ACL decided when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receive {
    /// Every message its filter matches: no deny rule applies to any of them.
    All,
    /// None of them: a deny rule covers the whole filter.
    Nothing,
    /// Decided per message: the first of `rules` (filter, allowed) whose filter matches
    /// the topic decides; none: `otherwise`. Only the ACL's rules whose filters overlap
    /// the subscription's are kept, up to the first that covers it.
    Checked {
        rules: Box<[(Box<str>, bool)]>,
        otherwise: bool,
    },
}

impl Receive {
    /// May the subscription carry a message on `topic`?
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            Receive::All => true,
            Receive::Nothing => false,
            Receive::Checked { rules, otherwise } => {
                first_match(rules.iter().map(|(f, a)| (&**f, *a)), topic, *otherwise)
            }
        }
    }
}

/// The first of `rules` (filter, allowed) whose filter matches `topic` decides; none:
/// `otherwise`.
fn first_match<S: AsRef<str>>(
    rules: impl IntoIterator<Item = (S, bool)>,
    topic: &str,
    otherwise: bool,
) -> bool {
    rules
        .into_iter()
        .find(|(f, _)| filter_matches(f.as_ref(), topic))
        .map_or(otherwise, |(_, allowed)| allowed)
}

/// What a subscription to `filter` may receive when each topic is decided by
/// [`first_match`]`(rules, topic, otherwise)`, worked out once: the rules that overlap
/// `filter`, up to the first that covers it; [`Receive::All`] or [`Receive::Nothing`]
/// when they (and what decides the topics none of them matches) all agree.
fn receive_of<S: AsRef<str>>(
    rules: impl IntoIterator<Item = (S, bool)>,
    otherwise: bool,
    filter: &str,
) -> Receive {
    let mut kept: Vec<(Box<str>, bool)> = Vec::new();
    let mut rest = otherwise;
    for (f, allowed) in rules {
        let f = f.as_ref();
        if !overlaps(f, filter) {
            continue;
        }
        kept.push((f.into(), allowed));
        if covers(f, filter) {
            rest = allowed;
            break;
        }
    }
    if kept.iter().all(|&(_, allowed)| allowed == rest) {
        if rest { Receive::All } else { Receive::Nothing }
    } else {
        Receive::Checked {
            rules: kept.into(),
            otherwise,
        }
    }
}

/// The `embedded.acl` rules for `user`, in order, flattened to (filter, allowed): the
/// `publish` or the `subscribe` filters of each.
fn rules_for<'a>(
    acl: &'a [AclRule],
    user: Option<&'a str>,
    filters: fn(&AclRule) -> &[String],
) -> impl Iterator<Item = (&'a str, bool)> + 'a {
    acl.iter()
        .filter(move |r| r.username.is_none() || r.username.as_deref() == user)
        .flat_map(move |r| filters(r).iter().map(|f| (f.as_str(), r.allow)))
}

fn publish(r: &AclRule) -> &[String] {
    &r.publish
}

fn subscribe(r: &AclRule) -> &[String] {
    &r.subscribe
}

/// Outcome of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    Ok,
    /// Unknown user or wrong password.
    BadCredentials,
    /// No username and anonymous clients are not allowed.
    NotAuthorized,
}

impl Auth {
    pub fn new(users: Vec<(String, Credential)>, allow_anonymous: bool, acl: Acl) -> Self {
        Auth {
            users: users.into_iter().collect(),
            allow_anonymous,
            acl,
            http: None,
            jwt: None,
        }
    }

    /// These users and ACL with the sources of `embedded.auth` before them.
    pub fn with(mut self, plan: &AuthPlan) -> Auth {
        if plan.http_authentication.is_some() || plan.http_authorization.is_some() {
            self.http = Some(Arc::new(http::HttpAuth::new(
                plan.http_authentication.clone(),
                plan.http_authorization.clone(),
            )));
        }
        self.jwt = plan.jwt.clone().map(|j| Arc::new(jwt::Jwt::new(j)));
        self
    }

    /// Does checking `username`'s login verify a password hash (slow by design, so off
    /// the async threads)? Not for an anonymous client or an unknown user: those are
    /// answered at once.
    pub fn login_hashes(&self, username: Option<&str>) -> bool {
        username.is_some_and(|u| self.users.contains_key(u))
    }

    /// Checks a CONNECT's credentials. Slow when it verifies a hash ([`Auth::login_hashes`]):
    /// then call it off the async threads.
    pub fn login(&self, username: Option<&str>, password: Option<&str>) -> Login {
        let Some(username) = username else {
            return if self.allow_anonymous && password.is_none() {
                Login::Ok
            } else if password.is_some() {
                Login::BadCredentials
            } else {
                Login::NotAuthorized
            };
        };
        let verified = match self.users.get(username) {
            None => false,
            Some(Credential::Argon2(phc)) => PasswordHash::new(&phc.0).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.unwrap_or("").as_bytes(), &parsed)
                    .is_ok()
            }),
            // As Mosquitto: a user of its file without a password is refused.
            Some(Credential::Mosquitto(hash)) => {
                password.is_some_and(|p| mosquitto::verify(hash, p.as_bytes()))
            }
        };
        if verified {
            Login::Ok
        } else {
            Login::BadCredentials
        }
    }

    /// May `who` publish to `topic`? Never to a `$SYS` topic: those are the broker's.
    pub fn can_publish(&self, who: Identity, topic: &str) -> bool {
        if super::sys::is_sys(topic) {
            return false;
        }
        match &self.acl {
            Acl::Rules(acl) => first_match(rules_for(acl, who.username, publish), topic, true),
            Acl::Mosquitto(acl) => {
                first_match(mosquitto::entries(acl, who, Op::Write), topic, false)
            }
        }
    }

    /// May `who` subscribe to `filter`? Always with an ACL file, as in Mosquitto 2.0
    /// (what the subscription carries is another matter: [`Auth::receive`]).
    pub fn can_subscribe(&self, who: Identity, filter: &str) -> bool {
        match &self.acl {
            Acl::Rules(acl) => rules_for(acl, who.username, subscribe)
                .find(|(f, _)| covers(f, filter))
                .is_none_or(|(_, allowed)| allowed),
            Acl::Mosquitto(_) => true,
        }
    }

    /// May a subscription of `who` carry a message on `topic`?
    pub fn can_receive(&self, who: Identity, topic: &str) -> bool {
        match &self.acl {
            Acl::Rules(acl) => first_match(rules_for(acl, who.username, subscribe), topic, true),
            Acl::Mosquitto(acl) => {
                first_match(mosquitto::entries(acl, who, Op::Read), topic, false)
            }
        }
    }

    /// What a subscription of `who` to `filter` may receive: [`Auth::can_receive`] for
    /// each topic `filter` matches, worked out once.
    pub fn receive(&self, who: Identity, filter: &str) -> Receive {
        match &self.acl {
            Acl::Rules(acl) => receive_of(rules_for(acl, who.username, subscribe), true, filter),
            Acl::Mosquitto(acl) => {
                receive_of(mosquitto::entries(acl, who, Op::Read), false, filter)
            }
        }
    }
}

/// A PHC argon2id hash of `password` with a random salt (for `mqbridge passwd`).
pub fn hash_password(password: &str) -> String {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes make a valid salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::plan::Secret;

    /// A client `user` (None: anonymous), its client id unused by `embedded.acl`.
    fn who(user: Option<&str>) -> Identity<'_> {
        Identity {
            username: user,
            client_id: "c",
        }
    }

    fn rules(acl: Vec<AclRule>) -> Auth {
        Auth::new(vec![], true, Acl::Rules(acl))
    }

    fn rule(user: &str, allow: bool, publish: &[&str], subscribe: &[&str]) -> AclRule {
        AclRule {
            username: (user != "*").then(|| user.to_string()),
            allow,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn passwords() {
        let hash = hash_password("s3cret");
        use crate::config::plan::validate_hash;
        assert!(validate_hash(&hash).is_ok());
        assert!(validate_hash("plain").is_err());
        let auth = Auth::new(
            vec![("sensor".into(), Credential::Argon2(Secret(hash)))],
            false,
            Acl::default(),
        );
        assert_eq!(auth.login(Some("sensor"), Some("s3cret")), Login::Ok);
        assert_eq!(
            auth.login(Some("sensor"), Some("wrong")),
            Login::BadCredentials
        );
        assert_eq!(auth.login(Some("nobody"), Some("x")), Login::BadCredentials);
        assert_eq!(auth.login(None, None), Login::NotAuthorized);
        let open = rules(vec![]);
        assert_eq!(open.login(None, None), Login::Ok);
        // Only a known user's login verifies a hash (and goes off the async threads).
        assert!(auth.login_hashes(Some("sensor")));
        assert!(!auth.login_hashes(Some("nobody")));
        assert!(!auth.login_hashes(None));
    }

    #[test]
    fn first_matching_rule_wins() {
        let auth = rules(vec![
            rule("sensor", true, &["sensors/#"], &["cmd/+"]),
            rule("*", false, &["#"], &["secret/#"]),
        ]);
        assert!(auth.can_publish(who(Some("sensor")), "sensors/a/t"));
        assert!(!auth.can_publish(who(Some("sensor")), "other"));
        assert!(!auth.can_publish(who(None), "sensors/a/t"));
        assert!(auth.can_subscribe(who(Some("sensor")), "cmd/x"));
        assert!(!auth.can_subscribe(who(Some("sensor")), "secret/x"));
        assert!(
            auth.can_subscribe(who(None), "#"),
            "deny does not cover '#'"
        );
        assert!(
            !auth.can_receive(who(None), "secret/x"),
            "but its messages are withheld"
        );
        assert!(auth.can_receive(who(None), "public/x"));
        assert!(auth.can_subscribe(who(None), "public/x"), "no rule applies");
    }

    #[test]
    fn receive_is_decided_per_subscription() {
        let auth = rules(vec![
            rule("sensor", true, &[], &["secret/sensor/#"]),
            rule("*", false, &[], &["secret/#"]),
        ]);
        assert_eq!(auth.receive(who(None), "public/#"), Receive::All);
        assert_eq!(auth.receive(who(None), "secret/+"), Receive::Nothing);
        assert_eq!(
            auth.receive(who(Some("sensor")), "secret/sensor/+"),
            Receive::All
        );
        let broad = auth.receive(who(Some("sensor")), "#");
        assert!(matches!(&broad, Receive::Checked { rules, otherwise: true } if rules.len() == 2));
        assert!(broad.allows("secret/sensor/t"));
        assert!(!broad.allows("secret/other"));
        assert!(broad.allows("public/x"));
        assert_eq!(Auth::default().receive(who(None), "#"), Receive::All);
    }

    #[test]
    fn receive_agrees_with_can_receive() {
        use proptest::prelude::*;
        let level = || prop::sample::select(vec!["a", "b", "+", "$s"]);
        let filter = |max| {
            (prop::collection::vec(level(), 1..max), any::<bool>()).prop_map(|(mut v, hash)| {
                if hash {
                    v.push("#");
                }
                v.join("/")
            })
        };
        let acl_rule = (
            prop::sample::select(vec!["*", "u"]),
            any::<bool>(),
            prop::collection::vec(filter(3), 0..3),
        )
            .prop_map(|(user, allow, subscribe)| AclRule {
                username: (user != "*").then(|| user.to_string()),
                allow,
                publish: Vec::new(),
                subscribe,
            });
        let topic = prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..5)
            .prop_map(|v| v.join("/"));
        let user = prop::sample::select(vec![None, Some("u"), Some("v")]);
        proptest!(|(acl in prop::collection::vec(acl_rule, 0..4), f in filter(4), t in topic, user in user)| {
            let auth = rules(acl);
            if filter_matches(&f, &t) {
                prop_assert_eq!(auth.receive(who(user), &f).allows(&t), auth.can_receive(who(user), &t));
            }
        });
    }
}
