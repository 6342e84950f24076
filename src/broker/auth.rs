//! Who may connect, publish and subscribe.
//!
//! Users are checked against argon2 password hashes (PHC strings, made with
//! `mqbridge passwd`). The ACL is an ordered list; for each request the first rule whose
//! username matches (`*` matches everyone, anonymous clients included) and whose filters
//! apply decides. A request no rule applies to is allowed, so a list that should be
//! restrictive ends with a catch-all `{username: "*", action: deny, publish: ["#"],
//! subscribe: ["#"]}`.
//!
//! A publish rule applies when one of its filters matches the topic. A subscribe rule
//! applies to a SUBSCRIBE when one of its filters covers the requested filter entirely,
//! and to every message delivered when one of its filters matches the message's topic:
//! with `deny subscribe secret/#`, a subscription to `#` is granted but never carries
//! messages on `secret/…`.
//!
//! That last check is made when the subscription is made, not for every message:
//! [`Auth::receive`] keeps, for one user's filter, only the rules that can decide
//! something for the topics it matches. Most subscriptions overlap no deny rule and
//! are checked for nothing ([`Receive::All`]); one to `#` beside `deny secret/#` keeps
//! that one exclusion to test each message against.

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::config::AclRule;
use crate::topic::{covers, filter_matches, overlaps};

/// Users and ACL.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// username → PHC hash string.
    users: HashMap<String, String>,
    pub allow_anonymous: bool,
    acl: Vec<AclRule>,
}

/// What a subscription may receive, as the ACL decided when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receive {
    /// Every message its filter matches: no deny rule applies to any of them.
    All,
    /// None of them: a deny rule covers the whole filter.
    Nothing,
    /// Decided per message by these rules, in order: the ACL's rules whose `subscribe`
    /// filters overlap the subscription's (only those filters kept), up to the first
    /// that covers it. As in [`Auth::can_receive`], the first whose filters match the
    /// topic decides; none: allowed.
    Checked(Box<[AclRule]>),
}

impl Receive {
    /// May the subscription carry a message on `topic`?
    pub fn allows(&self, topic: &str) -> bool {
        match self {
            Receive::All => true,
            Receive::Nothing => false,
            Receive::Checked(rules) => decide(rules.iter(), topic),
        }
    }
}

/// The first of `rules` with a `subscribe` filter matching `topic` decides; none: allowed.
fn decide<'a>(mut rules: impl Iterator<Item = &'a AclRule>, topic: &str) -> bool {
    rules
        .find(|r| r.subscribe.iter().any(|f| filter_matches(f, topic)))
        .is_none_or(|r| r.allow)
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
    pub fn new(users: Vec<(String, String)>, allow_anonymous: bool, acl: Vec<AclRule>) -> Self {
        Auth {
            users: users.into_iter().collect(),
            allow_anonymous,
            acl,
        }
    }

    /// Checks a CONNECT's credentials. Slow by design (argon2): call off the async threads.
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
        let Some(hash) = self.users.get(username) else {
            return Login::BadCredentials;
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return Login::BadCredentials;
        };
        match argon2::Argon2::default().verify_password(password.unwrap_or("").as_bytes(), &parsed)
        {
            Ok(()) => Login::Ok,
            Err(_) => Login::BadCredentials,
        }
    }

    fn rules_for<'a>(&'a self, user: Option<&'a str>) -> impl Iterator<Item = &'a AclRule> + 'a {
        self.acl
            .iter()
            .filter(move |r| r.username.is_none() || r.username.as_deref() == user)
    }

    /// May `user` publish to `topic`?
    pub fn can_publish(&self, user: Option<&str>, topic: &str) -> bool {
        self.rules_for(user)
            .find(|r| r.publish.iter().any(|f| filter_matches(f, topic)))
            .is_none_or(|r| r.allow)
    }

    /// May `user` subscribe to `filter`?
    pub fn can_subscribe(&self, user: Option<&str>, filter: &str) -> bool {
        self.rules_for(user)
            .find(|r| r.subscribe.iter().any(|f| covers(f, filter)))
            .is_none_or(|r| r.allow)
    }

    /// May a subscription of `user` carry a message on `topic`?
    pub fn can_receive(&self, user: Option<&str>, topic: &str) -> bool {
        self.acl.is_empty() || decide(self.rules_for(user), topic)
    }

    /// What a subscription of `user` to `filter` may receive: [`Auth::can_receive`]
    /// for each topic `filter` matches, worked out once.
    pub fn receive(&self, user: Option<&str>, filter: &str) -> Receive {
        let mut rules = Vec::new();
        let mut covered = false;
        for r in self.rules_for(user) {
            let subscribe: Vec<String> = r
                .subscribe
                .iter()
                .filter(|f| overlaps(f, filter))
                .cloned()
                .collect();
            if subscribe.is_empty() {
                continue;
            }
            covered = subscribe.iter().any(|f| covers(f, filter));
            rules.push(AclRule {
                username: None,
                allow: r.allow,
                publish: Vec::new(),
                subscribe,
            });
            if covered {
                break;
            }
        }
        if rules.iter().all(|r| r.allow) {
            Receive::All
        } else if covered && rules.iter().all(|r| !r.allow) {
            Receive::Nothing
        } else {
            Receive::Checked(rules.into())
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
        let auth = Auth::new(vec![("sensor".into(), hash)], false, vec![]);
        assert_eq!(auth.login(Some("sensor"), Some("s3cret")), Login::Ok);
        assert_eq!(
            auth.login(Some("sensor"), Some("wrong")),
            Login::BadCredentials
        );
        assert_eq!(auth.login(Some("nobody"), Some("x")), Login::BadCredentials);
        assert_eq!(auth.login(None, None), Login::NotAuthorized);
        let open = Auth::new(vec![], true, vec![]);
        assert_eq!(open.login(None, None), Login::Ok);
    }

    #[test]
    fn first_matching_rule_wins() {
        let auth = Auth::new(
            vec![],
            true,
            vec![
                rule("sensor", true, &["sensors/#"], &["cmd/+"]),
                rule("*", false, &["#"], &["secret/#"]),
            ],
        );
        assert!(auth.can_publish(Some("sensor"), "sensors/a/t"));
        assert!(!auth.can_publish(Some("sensor"), "other"));
        assert!(!auth.can_publish(None, "sensors/a/t"));
        assert!(auth.can_subscribe(Some("sensor"), "cmd/x"));
        assert!(!auth.can_subscribe(Some("sensor"), "secret/x"));
        assert!(auth.can_subscribe(None, "#"), "deny does not cover '#'");
        assert!(
            !auth.can_receive(None, "secret/x"),
            "but its messages are withheld"
        );
        assert!(auth.can_receive(None, "public/x"));
        assert!(auth.can_subscribe(None, "public/x"), "no rule applies");
    }

    #[test]
    fn receive_is_decided_per_subscription() {
        let auth = Auth::new(
            vec![],
            true,
            vec![
                rule("sensor", true, &[], &["secret/sensor/#"]),
                rule("*", false, &[], &["secret/#"]),
            ],
        );
        assert_eq!(auth.receive(None, "public/#"), Receive::All);
        assert_eq!(auth.receive(None, "secret/+"), Receive::Nothing);
        assert_eq!(
            auth.receive(Some("sensor"), "secret/sensor/+"),
            Receive::All
        );
        let broad = auth.receive(Some("sensor"), "#");
        assert!(matches!(&broad, Receive::Checked(rules) if rules.len() == 2));
        assert!(broad.allows("secret/sensor/t"));
        assert!(!broad.allows("secret/other"));
        assert!(broad.allows("public/x"));
        assert_eq!(Auth::default().receive(None, "#"), Receive::All);
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
            let auth = Auth::new(vec![], true, acl);
            if filter_matches(&f, &t) {
                prop_assert_eq!(auth.receive(user, &f).allows(&t), auth.can_receive(user, &t));
            }
        });
    }
}
