//! Mosquitto's meaning of its files: logins against hashes written by the real
//! `mosquitto_passwd`, and the ACL's answers, as a table of client, topic and operation.

use super::*;
use crate::broker::auth::{Auth, Login, Receive};
use crate::config::mosquitto::{parse_acl, parse_passwd, tests::PASSWD};
use crate::config::{Acl, Credential};
use std::sync::Arc;

#[test]
fn hashes_made_by_mosquitto_passwd_verify() {
    let users = parse_passwd(PASSWD).unwrap();
    let hash = |name: &str| &users.iter().find(|u| u.username == name).unwrap().hash;
    // $7$ (PBKDF2-SHA512, 101 iterations) and $6$ (salted SHA-512).
    assert!(verify(hash("alice"), b"alice-secret"));
    assert!(!verify(hash("alice"), b"alice-secreT"));
    assert!(!verify(hash("alice"), b""));
    assert!(verify(hash("bob"), b"bob secret:with colon"));
    assert!(!verify(hash("bob"), b"bob secret"));
    assert!(verify(hash("carol smith"), "ümlaut-pässword".as_bytes()));

    let auth = Auth::new(
        users
            .into_iter()
            .map(|u| (u.username, Credential::Mosquitto(u.hash)))
            .collect(),
        false,
        Acl::default(),
    );
    assert_eq!(auth.login(Some("alice"), Some("alice-secret")), Login::Ok);
    assert_eq!(
        auth.login(Some("bob"), Some("bob secret:with colon")),
        Login::Ok
    );
    assert_eq!(
        auth.login(Some("alice"), Some("wrong")),
        Login::BadCredentials
    );
    assert_eq!(
        auth.login(Some("alice"), None),
        Login::BadCredentials,
        "as Mosquitto: a user of the file needs a password"
    );
    assert_eq!(
        auth.login(Some("mallory"), Some("alice-secret")),
        Login::BadCredentials
    );
    assert_eq!(auth.login(None, None), Login::NotAuthorized);
}

const ACL: &str = "\
# anonymous clients
topic read public/#
topic write anon/out

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic read shared/#
topic write shared/alice

user bob
topic read #
topic deny private/#

pattern readwrite devices/%u/%c/#
pattern read inbox/%c
pattern write outbox/%u
pattern deny devices/%u/%c/locked
pattern read %c-status/x
";

fn mosquitto_auth(acl: &str) -> Auth {
    Auth::new(
        vec![],
        true,
        Acl::Mosquitto(Arc::new(parse_acl(acl).unwrap())),
    )
}

fn who<'a>(username: Option<&'a str>, client_id: &'a str) -> Identity<'a> {
    Identity {
        username,
        client_id,
    }
}

/// (username, client id, topic, operation, allowed, why).
type Case<'a> = (Option<&'a str>, &'a str, &'a str, Op, bool, &'a str);

#[test]
fn the_acl_answers_as_mosquitto_does() {
    use Op::{Read, Write};
    let auth = mosquitto_auth(ACL);
    #[rustfmt::skip]
    let table: &[Case] = &[
        (None, "anon1", "public/a", Read, true, "the anonymous block"),
        (None, "anon1", "public/a", Write, false, "read only"),
        (None, "anon1", "anon/out", Write, true, "write only"),
        (None, "anon1", "anon/out", Read, false, "write only"),
        (None, "anon1", "inbox/anon1", Read, true, "a %c pattern applies to anonymous clients"),
        (None, "anon1", "devices/anon1/x", Write, false, "a %u pattern does not"),
        (None, "anon1", "other", Read, false, "not granted: denied"),
        (Some("alice"), "a1", "alice/x", Write, true, "readwrite"),
        (Some("alice"), "a1", "alice/secret/x", Read, false, "deny wins, written after the grant"),
        (Some("alice"), "a1", "alice/secret", Write, false, "'#' covers its parent level"),
        (Some("alice"), "a1", "shared/x", Write, false, "read only"),
        (Some("alice"), "a1", "shared/alice", Write, true, "a later line grants it"),
        (Some("alice"), "a1", "public/a", Read, false, "the anonymous block is not alice's"),
        (Some("alice"), "a1", "devices/alice/a1/t", Write, true, "%u and %c"),
        (Some("alice"), "a1", "devices/alice/a2/t", Write, false, "another client id"),
        (Some("alice"), "a1", "devices/bob/a1/t", Write, false, "another username"),
        (Some("alice"), "a1", "devices/alice/a1/locked", Write, false, "a deny pattern wins"),
        (Some("alice"), "a1", "inbox/a1", Read, true, "read pattern"),
        (Some("alice"), "a1", "inbox/a1", Write, false, "read pattern"),
        (Some("alice"), "a1", "outbox/alice", Write, true, "write pattern with %u"),
        (Some("alice"), "k", "k-status/x", Read, true, "%c inside a level"),
        (Some("bob"), "b1", "x/y", Read, true, "read #"),
        (Some("bob"), "b1", "private/x", Read, false, "deny"),
        (Some("bob"), "b1", "devices/bob/b1/locked", Read, true, "the user's block decides before a deny pattern"),
        (Some("bob"), "b1", "$SYS/broker/uptime", Read, false, "'#' does not match $ topics"),
        (Some("carol"), "c1", "devices/carol/c1/x", Read, true, "no block: the patterns"),
        (Some("carol"), "c1", "x", Read, false, "not granted: denied"),
        (Some("alice"), "a+1", "alice/x", Write, true, "a widening id: the user's block still applies"),
        (Some("alice"), "a+1", "inbox/a+1", Read, false, "but no pattern"),
        (Some("alice"), "a#", "outbox/alice", Write, false, "'#' widens too"),
        (Some("m+"), "m1", "inbox/m1", Read, false, "a widening username"),
    ];
    let mut wrong = Vec::new();
    for &(user, id, topic, op, want, why) in table {
        let got = match op {
            Read => auth.can_receive(who(user, id), topic),
            Write => auth.can_publish(who(user, id), topic),
        };
        if got != want {
            wrong.push(format!(
                "{user:?} {id} {op:?} {topic}: {got}, want {want} ({why})"
            ));
        }
        // Whatever the file, a SUBSCRIBE is granted.
        assert!(auth.can_subscribe(who(user, id), topic));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let nothing = mosquitto_auth("# no entries\n");
    assert!(!nothing.can_receive(who(Some("alice"), "a1"), "a"));
    assert!(!nothing.can_publish(who(None, "a1"), "a"));
}

#[test]
fn what_a_subscription_carries_is_decided_when_it_is_made() {
    let auth = mosquitto_auth(ACL);
    let alice = who(Some("alice"), "a1");
    assert_eq!(auth.receive(alice, "alice/public/#"), Receive::All);
    assert_eq!(auth.receive(alice, "alice/secret/+"), Receive::Nothing);
    assert_eq!(auth.receive(alice, "elsewhere/#"), Receive::Nothing);
    let broad = auth.receive(alice, "#");
    assert!(
        matches!(
            &broad,
            Receive::Checked {
                otherwise: false,
                ..
            }
        ),
        "{broad:?}"
    );
    for (topic, want) in [
        ("alice/x", true),
        ("alice/secret/x", false),
        ("inbox/a1", true),
        ("devices/alice/a1/locked", false),
        ("devices/alice/a1/on", true),
        ("bob/x", false),
    ] {
        assert_eq!(broad.allows(topic), want, "{topic}");
    }
    // The patterns are written out for this client.
    assert_eq!(
        auth.receive(who(Some("alice"), "a2"), "inbox/a2"),
        Receive::All
    );
    assert_eq!(
        auth.receive(who(Some("alice"), "a2"), "inbox/a1"),
        Receive::Nothing
    );
}

#[test]
fn receive_agrees_with_can_receive() {
    use proptest::prelude::*;
    let level = || prop::sample::select(vec!["a", "b", "+", "%c", "%u", "$s"]);
    let filter = |max| {
        (prop::collection::vec(level(), 1..max), any::<bool>()).prop_map(|(mut v, hash)| {
            if hash {
                v.push("#");
            }
            v.join("/")
        })
    };
    let access = prop::sample::select(vec!["read", "write", "readwrite", "deny"]);
    let line = (
        prop::sample::select(vec!["topic", "pattern", "user a", "user b"]),
        access,
        filter(3),
    )
        .prop_map(
            |(keyword, access, filter)| match keyword.strip_prefix("user ") {
                Some(name) => format!("user {name}"),
                None => format!("{keyword} {access} {filter}"),
            },
        );
    let topic = prop::collection::vec(prop::sample::select(vec!["a", "b", "$s", ""]), 1..5)
        .prop_map(|v| v.join("/"));
    let user = prop::sample::select(vec![None, Some("a"), Some("b"), Some("b+")]);
    let id = prop::sample::select(vec!["a", "b", "a#"]);
    proptest!(|(lines in prop::collection::vec(line, 0..8), f in filter(4), t in topic, user in user, id in id)| {
        let text = lines.join("\n");
        let parsed = parse_acl(&text);
        prop_assume!(parsed.is_ok());
        let auth = mosquitto_auth(&text);
        let client = who(user, id);
        if crate::topic::filter_matches(&f, &t) {
            prop_assert_eq!(auth.receive(client, &f).allows(&t), auth.can_receive(client, &t), "{}", text);
        }
    });
}
