//! The two file formats as Mosquitto 2.0.11 reads them: good files, and each kind of
//! malformed line with its line and column. The hashes are lines written by Debian's
//! `mosquitto_passwd` 2.0.11 (their verification is tested in `broker::auth`).

use super::*;

/// `mosquitto_passwd -c -b FILE alice alice-secret` (`$7$`, the default), then `-H sha512
/// -b FILE bob 'bob secret:with colon'` (`$6$`) and `-b FILE 'carol smith' 'ümlaut-pässword'`.
pub(crate) const PASSWD: &str = "\
alice:$7$101$tqCAZeAq9NF7tliG$CCDSd6jegabuhyVOIQEmfILlCLyNY3VQFotTGuVyFkGAl5TGotpHZeNhmaZTkTuW0z81OGzOeSrE7M5conE/ZA==
bob:$6$qEA36UJbrgZLBnqM$TzxqaSZjsa/hdeNTsu95HUtg4aIWEY6HJ8McVZ8nIrDz/GfUQNvKQqStpGvP/tY9Hh+18Tspm7DXYlBUvLZxYg==
carol smith:$7$101$CNW5fu5oQd9IyKBQ$Hlt8CvVDdTDzXZGVXmqZiLOwMvlR+2dnyJLKkaYFahBGD1JHw9ZqH6tRUHPXsJcSa3TOvv+9QRCBfIRgkPT3Sw==
";

fn line_errors(result: Result<impl fmt::Debug, Vec<LineError>>) -> Vec<(usize, usize, String)> {
    result
        .expect_err("expected malformed lines")
        .into_iter()
        .map(|e| (e.line, e.column, e.message))
        .collect()
}

#[test]
fn a_password_file_from_mosquitto_passwd() {
    let users = parse_passwd(PASSWD).unwrap();
    let summary: Vec<(&str, HashAlgorithm, usize)> = users
        .iter()
        .map(|u| (u.username.as_str(), u.hash.algorithm, u.line))
        .collect();
    assert_eq!(
        summary,
        [
            ("alice", HashAlgorithm::Pbkdf2Sha512 { iterations: 101 }, 1),
            ("bob", HashAlgorithm::Sha512, 2),
            (
                "carol smith",
                HashAlgorithm::Pbkdf2Sha512 { iterations: 101 },
                3
            ),
        ]
    );
    assert_eq!(BASE64.encode(users[0].hash.salt), "tqCAZeAq9NF7tliG");
    // Comments, blank lines, CRLF endings, blanks around the fields, no base64 padding.
    let text = format!(
        "# made by mosquitto_passwd\n\n  \r\n dave :{}\r\n",
        "$6$qEA36UJbrgZLBnqM$TzxqaSZjsa/hdeNTsu95HUtg4aIWEY6HJ8McVZ8nIrDz/GfUQNvKQqStpGvP/tY9Hh+18Tspm7DXYlBUvLZxYg "
    );
    let users = parse_passwd(&text).unwrap();
    assert_eq!((users[0].username.as_str(), users[0].line), ("dave", 4));
    assert!(parse_passwd("").unwrap().is_empty());
}

#[test]
fn each_malformed_password_line_is_reported_with_its_place() {
    let good = "$7$101$tqCAZeAq9NF7tliG$CCDSd6jegabuhyVOIQEmfILlCLyNY3VQFotTGuVyFkGAl5TGotpHZeNhmaZTkTuW0z81OGzOeSrE7M5conE/ZA==";
    let salt12 = "tqCAZeAq9NF7tliG";
    let hash64 = &good[good.len() - 88..];
    let text = [
        "no colon here".to_string(),
        format!(":{good}"),
        "eve:plain-text-password".into(),
        format!("eve:$5${salt12}${hash64}"),
        format!("eve:$7$0${salt12}${hash64}"),
        format!("eve:$7$many${salt12}${hash64}"),
        format!("eve:$6$not*base64${hash64}"),
        format!("eve:$6$c2hvcnQ=${hash64}"),
        format!("eve:$6${salt12}"),
        format!("eve:$6${salt12}${salt12}"),
        format!("eve:$6${salt12}${hash64}$extra"),
        format!("alice:{good}"),
        format!("alice:  {good}"),
    ]
    .join("\n");
    let errors = line_errors(parse_passwd(&text));
    let not_a_hash = "user \"eve\": not a $6$ or $7$ hash (a plain-text password? `mosquitto_passwd -U FILE` hashes a whole file)";
    assert_eq!(
        errors,
        [
            (1, 1, "expected `username:hash`".to_string()),
            (2, 1, "the username is empty".into()),
            (3, 5, not_a_hash.into()),
            (4, 5, not_a_hash.into()),
            (
                5,
                5,
                "user \"eve\": the $7$ hash's iteration count is not a positive number".into()
            ),
            (
                6,
                5,
                "user \"eve\": the $7$ hash's iteration count is not a positive number".into()
            ),
            (7, 5, "user \"eve\": the salt is not base64".into()),
            (8, 5, "user \"eve\": the salt is 5 bytes, not 12".into()),
            (9, 5, "user \"eve\": the hash has no hash".into()),
            (10, 5, "user \"eve\": the hash is 12 bytes, not 64".into()),
            (
                11,
                5,
                "user \"eve\": the hash has more `$`-separated fields than $6$ and $7$ hashes have"
                    .into()
            ),
            (13, 1, "user \"alice\" is also on line 12".into()),
        ]
    );
    // No message quotes any part of a hash or a password.
    let text_words: Vec<&str> = text
        .split(['$', ':', '\n'])
        .filter(|w| w.len() > 8)
        .collect();
    for (_, _, message) in &errors {
        for word in &text_words {
            assert!(!message.contains(word), "{message:?} quotes {word:?}");
        }
    }
}

#[test]
fn a_hash_debug_shows_no_bytes() {
    let users = parse_passwd(PASSWD).unwrap();
    assert_eq!(
        format!("{:?}", users[1].hash),
        "MosquittoHash { algorithm: Sha512, .. }"
    );
}

#[test]
fn an_acl_file_in_blocks() {
    let text = "\
# anonymous clients
topic read public/#
topic status

user alice
topic readwrite alice/#
topic deny alice/secret
pattern write devices/%u/%c/#
  topic   write   spaced out/topic  
user carol smith
topic read carol/#
topic read
user alice
topic write more/alice
pattern deny devices/%u/%c/locked
";
    let acl = parse_acl(text).unwrap();
    let entry = |access, filter: &str| AclEntry {
        access,
        filter: filter.into(),
    };
    assert_eq!(
        acl.anonymous,
        [
            entry(Access::Read, "public/#"),
            entry(Access::ReadWrite, "status")
        ]
    );
    assert_eq!(
        acl.users["alice"],
        [
            entry(Access::ReadWrite, "alice/#"),
            entry(Access::Deny, "alice/secret"),
            entry(Access::Write, "spaced out/topic"),
            entry(Access::Write, "more/alice"),
        ]
    );
    // The rest of the line is the name; a lone word after `topic` is the filter.
    assert_eq!(
        acl.users["carol smith"],
        [
            entry(Access::Read, "carol/#"),
            entry(Access::ReadWrite, "read")
        ]
    );
    assert_eq!(
        acl.patterns,
        [
            entry(Access::Write, "devices/%u/%c/#"),
            entry(Access::Deny, "devices/%u/%c/locked"),
        ]
    );
    assert_eq!(acl.entry_count(), 10);
    assert_eq!(
        parse_acl("\n# nothing\n   \n").unwrap(),
        MosquittoAcl::default()
    );
}

#[test]
fn each_malformed_acl_line_is_reported_with_its_place() {
    let text = "\
topic
pattern   
topic sometimes a/b
topic read a/#/b
pattern write a/b+
user
user   
  # an indented comment
\ttopic read tabbed
topic read a # trailing comment
subscribe a/b
topic\tread\ta/b
";
    let errors = line_errors(parse_acl(text));
    assert_eq!(
        errors,
        [
            (1, 1, "`topic` needs a topic filter".to_string()),
            (2, 1, "`pattern` needs a topic filter".into()),
            (
                3,
                7,
                "unknown access \"sometimes\": use read, write, readwrite or deny".into()
            ),
            (
                4,
                12,
                "\"a/#/b\": '#' must be the last level".into()
            ),
            (
                5,
                15,
                "\"a/b+\": '+' must occupy a whole level".into()
            ),
            (6, 1, "`user` needs a username".into()),
            (7, 1, "`user` needs a username".into()),
            (
                8,
                3,
                "unknown keyword \"#\": expected topic, pattern or user (a comment starts with # in the first column)".into()
            ),
            (
                9,
                1,
                "unknown keyword \"\\ttopic\": expected topic, pattern or user (a comment starts with # in the first column)".into()
            ),
            (
                10,
                12,
                "\"a # trailing comment\": '#' must occupy a whole level".into()
            ),
            (
                11,
                1,
                "unknown keyword \"subscribe\": expected topic, pattern or user (a comment starts with # in the first column)".into()
            ),
            (
                12,
                1,
                "unknown keyword \"topic\\tread\\ta/b\": expected topic, pattern or user (a comment starts with # in the first column)".into()
            ),
        ]
    );
}
