//! The ACL an authenticator hands one client: a token's `acl` claim ([`super::jwt`]), or
//! the `acl` of an HTTP authentication answer ([`super::http`]), in either of EMQX's
//! formats:
//!
//! - **rules** (EMQX 5.5+): `[{"permission": "allow"|"deny", "action":
//!   "publish"|"subscribe"|"all", "topic": "t/${clientid}", "qos": [0, 1], "retain":
//!   false}, …]`. The first rule that matches decides; when none does, the next source
//!   (the HTTP authorizer, then the local ACL) decides.
//! - **lists** (older): `{"pub": [...], "sub": [...], "all": [...]}`, filters the client
//!   may publish to, subscribe to, or both. What they do not list is denied.
//!
//! In a topic, `${clientid}` and `${username}` (or `%c` and `%u`) are replaced by the
//! client's when it logs in; a rule with a placeholder is skipped when the value would
//! widen it (it holds `+` or `#`), and a `${username}` rule for a client without one.
//! `eq t/#` matches the filter `t/#` itself, not what it matches. A publish rule matches
//! a topic its filter matches; a subscribe rule matches a SUBSCRIBE whose filter its own
//! covers (`a/#` covers `a/+/b`). A rule with a field mqbridge does not know (newer EMQX
//! conditions such as `clientid_re`) makes the whole ACL invalid, and the login fails:
//! ignoring the condition would grant more than the issuer meant.

use serde::Deserialize;

use super::Identity;
use crate::topic::{covers, filter_matches, validate_filter};

/// What a client did, as the ACL sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish { qos: u8, retain: bool },
    Subscribe { qos: u8 },
}

/// One client's ACL, placeholders written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    rules: Vec<Rule>,
    /// What no rule matches: None, the next source decides; Some(false), denied.
    otherwise: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    allow: bool,
    publish: bool,
    subscribe: bool,
    filter: String,
    /// `eq`: only the filter itself (a SUBSCRIBE to exactly it, or a topic equal to it).
    exact: bool,
    /// None: any.
    qos: Option<Vec<u8>>,
    /// None: either; publishes only.
    retain: Option<bool>,
}

/// One rule of the rules format, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    permission: Permission,
    action: RawAction,
    topic: String,
    #[serde(default)]
    qos: Option<Vec<u8>>,
    #[serde(default)]
    retain: Option<bool>,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Permission {
    Allow,
    Deny,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    #[serde(alias = "pub")]
    Publish,
    #[serde(alias = "sub")]
    Subscribe,
    All,
}

/// The lists format, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLists {
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
    #[serde(default, rename = "sub")]
    subscribe: Vec<String>,
    #[serde(default)]
    all: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAcl {
    Rules(Vec<RawRule>),
    Lists(RawLists),
}

impl ClientAcl {
    /// The ACL `value` says `who` has; an error names what is wrong with it.
    pub fn parse(value: &serde_json::Value, who: Identity) -> Result<ClientAcl, String> {
        let raw = RawAcl::deserialize(value).map_err(|_| {
            "not an ACL: a list of {permission, action, topic[, qos, retain]} rules, or {pub, sub, all} lists".to_string()
        })?;
        let (raw_rules, otherwise) = match raw {
            RawAcl::Rules(rules) => (rules, None),
            RawAcl::Lists(l) => {
                let allow = |action, topics: Vec<String>| {
                    topics.into_iter().map(move |topic| RawRule {
                        permission: Permission::Allow,
                        action,
                        topic,
                        qos: None,
                        retain: None,
                    })
                };
                let rules = allow(RawAction::Publish, l.publish)
                    .chain(allow(RawAction::Subscribe, l.subscribe))
                    .chain(allow(RawAction::All, l.all))
                    .collect();
                (rules, Some(false))
            }
        };
        let mut rules = Vec::with_capacity(raw_rules.len());
        for r in raw_rules {
            let (exact, written) = match r.topic.strip_prefix("eq ") {
                Some(t) => (true, t.to_string()),
                None => match substitute(&r.topic, who) {
                    Some(t) => (false, t),
                    None => continue,
                },
            };
            validate_filter(&written).map_err(|e| format!("topic {:?}: {e}", r.topic))?;
            if r.qos.as_ref().is_some_and(|q| q.iter().any(|&q| q > 2)) {
                return Err(format!("topic {:?}: qos must be 0, 1 or 2", r.topic));
            }
            rules.push(Rule {
                allow: r.permission == Permission::Allow,
                publish: r.action != RawAction::Subscribe,
                subscribe: r.action != RawAction::Publish,
                filter: written,
                exact,
                qos: r.qos,
                retain: r.retain,
            });
        }
        Ok(ClientAcl { rules, otherwise })
    }

    /// Whether `action` on `topic` (a topic name to publish to, or a filter to subscribe
    /// to) is allowed; None: no rule matches and the next source decides.
    pub fn decide(&self, topic: &str, action: Action) -> Option<bool> {
        let applies = |r: &&Rule| match action {
            Action::Publish { qos, retain } => {
                r.publish
                    && r.qos.as_ref().is_none_or(|q| q.contains(&qos))
                    && r.retain.is_none_or(|want| want == retain)
                    && if r.exact {
                        r.filter == topic
                    } else {
                        filter_matches(&r.filter, topic)
                    }
            }
            Action::Subscribe { qos } => {
                r.subscribe
                    && r.qos.as_ref().is_none_or(|q| q.contains(&qos))
                    && if r.exact {
                        r.filter == topic
                    } else {
                        covers(&r.filter, topic)
                    }
            }
        };
        self.rules
            .iter()
            .find(applies)
            .map(|r| r.allow)
            .or(self.otherwise)
    }
}

/// `topic` with `${clientid}`/`%c` and `${username}`/`%u` written out for `who`; None when
/// the rule must be skipped (a value that would widen it, or no username to put in).
fn substitute(topic: &str, who: Identity) -> Option<String> {
    let mut out = topic.to_string();
    for (names, value) in [
        (["${clientid}", "%c"], Some(who.client_id)),
        (["${username}", "%u"], who.username),
    ] {
        if names.iter().any(|n| out.contains(n)) {
            let value = value.filter(|v| !v.contains(['+', '#']))?;
            for n in names {
                out = out.replace(n, value);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const WHO: Identity = Identity {
        username: Some("u1"),
        client_id: "c1",
    };

    fn publish(acl: &ClientAcl, topic: &str) -> Option<bool> {
        acl.decide(
            topic,
            Action::Publish {
                qos: 1,
                retain: false,
            },
        )
    }

    #[test]
    fn rules_decide_in_order_and_leave_the_rest_to_the_next_source() {
        let acl = ClientAcl::parse(
            &json!([
                {"permission": "deny", "action": "all", "topic": "t/secret/#"},
                {"permission": "allow", "action": "publish", "topic": "t/${clientid}/#"},
                {"permission": "allow", "action": "subscribe", "topic": "eq cmd/#", "qos": [0, 1]},
                {"permission": "deny", "action": "publish", "topic": "r/x", "retain": true},
            ]),
            WHO,
        )
        .unwrap();
        assert_eq!(publish(&acl, "t/c1/temp"), Some(true));
        assert_eq!(publish(&acl, "t/c2/temp"), None, "no rule: the next source");
        assert_eq!(publish(&acl, "t/secret/x"), Some(false));
        let sub = |f, qos| acl.decide(f, Action::Subscribe { qos });
        assert_eq!(sub("cmd/#", 1), Some(true));
        assert_eq!(sub("cmd/#", 2), None, "qos not listed");
        assert_eq!(sub("cmd/a", 1), None, "eq: the filter itself only");
        assert_eq!(sub("t/secret/+", 0), Some(false));
        let retained = Action::Publish {
            qos: 0,
            retain: true,
        };
        assert_eq!(acl.decide("r/x", retained), Some(false));
        assert_eq!(publish(&acl, "r/x"), None);
    }

    #[test]
    fn lists_deny_what_they_do_not_list() {
        let acl = ClientAcl::parse(
            &json!({"pub": ["up/%u"], "sub": ["down/${clientid}/#"], "all": ["both/#"]}),
            WHO,
        )
        .unwrap();
        assert_eq!(publish(&acl, "up/u1"), Some(true));
        assert_eq!(publish(&acl, "up/u2"), Some(false));
        assert_eq!(publish(&acl, "down/c1/x"), Some(false), "sub only");
        assert_eq!(publish(&acl, "both/x"), Some(true));
        let sub = |f| acl.decide(f, Action::Subscribe { qos: 2 });
        assert_eq!(sub("down/c1/+"), Some(true));
        assert_eq!(sub("down/#"), Some(false), "wider than the rule");
        assert_eq!(sub("both/#"), Some(true));
    }

    #[test]
    fn placeholders_that_would_widen_a_rule_skip_it() {
        let wide = Identity {
            username: None,
            client_id: "a/#",
        };
        let acl = ClientAcl::parse(
            &json!({"pub": ["t/${clientid}", "u/${username}", "plain"]}),
            wide,
        )
        .unwrap();
        assert_eq!(acl.rules.len(), 1);
        assert_eq!(publish(&acl, "t/a/x"), Some(false));
        assert_eq!(publish(&acl, "plain"), Some(true));
    }

    #[test]
    fn what_mqbridge_cannot_honour_is_an_error() {
        for bad in [
            json!([{"permission": "allow", "action": "all", "topic": "t", "clientid_re": "^x"}]),
            json!([{"permission": "maybe", "action": "all", "topic": "t"}]),
            json!([{"permission": "allow", "action": "all", "topic": "a/#/b"}]),
            json!({"pub": ["t"], "admin": true}),
            json!("t/#"),
        ] {
            assert!(ClientAcl::parse(&bad, WHO).is_err(), "{bad}");
        }
    }
}
