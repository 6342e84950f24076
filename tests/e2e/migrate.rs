//! The migration guide's worked example (docs/migrate.md, "From Mosquitto"), run as the
//! page shows it: the password file made by the real `mosquitto_passwd` with the page's
//! commands, and the page's ACL file, serve a real Mosquitto (configured with the page's
//! `mosquitto.conf` lines) and mqbridge's embedded broker (the page's `embedded:` block).
//! The same clients get the same answers from both, and those are the answers the page
//! states. Then a reload reads the password file again.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rumqttc::{Packet, QoS};

use crate::embedded::V4;
use crate::util::*;

const GUIDE: &str = include_str!("../../docs/migrate.md");

/// The fenced block after `<!-- migrate-test: NAME -->` in the guide.
fn block(name: &str) -> String {
    let marker = format!("<!-- migrate-test: {name} -->\n");
    let (_, after) = GUIDE
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker:?} in docs/migrate.md"));
    let (fence, body) = after.split_once('\n').unwrap();
    assert!(fence.starts_with("```"), "a fenced block after {marker:?}");
    body.split_once("```").unwrap().0.to_string()
}

/// A block of the guide with its `/etc/mosquitto/` files in `dir`, and `replace`
/// (each of which must be in it) done.
fn guide_block(name: &str, dir: &Path, replace: &[(&str, &str)]) -> String {
    let mut text = block(name).replace("/etc/mosquitto/", &format!("{}/", dir.display()));
    for (from, to) in replace {
        assert!(text.contains(from), "{from:?} not in the {name} block");
        text = text.replace(from, to);
    }
    text
}

/// Makes the guide's password file (running its `mosquitto_passwd` commands) and ACL
/// file in `dir`.
fn make_files(dir: &Path) {
    for line in guide_block("passwd", dir, &[]).lines() {
        let args: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(args[0], "mosquitto_passwd", "{line}");
        run_ok(Command::new(args[0]).args(&args[1..]));
    }
    std::fs::write(dir.join("aclfile"), block("aclfile")).unwrap();
}

/// Connects as `login` with client id `id`: Err when refused.
async fn connect(port: u16, id: &str, login: Option<(&str, &str)>) -> Result<V4, String> {
    V4::try_connect_as(port, id, true, None, login)
        .await
        .map_err(|code| format!("{code:?}"))
}

/// Connects a client that must be accepted.
async fn client(port: u16, id: &str, user: &str) -> V4 {
    let password = format!("{user}-secret");
    connect(port, id, Some((user, &password)))
        .await
        .unwrap_or_else(|code| panic!("{user} ({id}) refused: {code}"))
}

/// Publishes at QoS 1 (the payload: who sent it) and waits for the PUBACK. Both brokers
/// acknowledge a PUBLISH the ACL refuses too, and route an accepted one to the
/// subscribers' queues before acknowledging it: what reaches a subscriber after this
/// returns was sent after this message, if this message reached it at all.
async fn publish(c: &mut V4, id: &str, topic: &str) {
    c.client
        .publish(topic, QoS::AtLeastOnce, false, id.to_string())
        .await
        .unwrap();
    c.expect(|p| matches!(p, Packet::PubAck(_))).await;
}

/// The messages `c` receives (as `topic from sender`) until one `end` on each of
/// `markers` arrived, the markers left out.
async fn received_until(c: &mut V4, markers: &[&str]) -> Vec<String> {
    let mut waiting: Vec<&str> = markers.to_vec();
    let mut got = Vec::new();
    while !waiting.is_empty() {
        let p = c.publish_msg().await;
        let from = String::from_utf8_lossy(&p.payload).into_owned();
        match waiting.iter().position(|m| *m == p.topic && from == "end") {
            Some(i) => {
                waiting.remove(i);
            }
            None => got.push(format!("{} from {from}", p.topic)),
        }
    }
    got
}

/// The guide's clients against the broker on `port`: what each was answered.
async fn answers(port: u16) -> BTreeMap<String, String> {
    let mut answers = BTreeMap::new();
    for (what, id, login) in [
        (
            "monitor, right password",
            "m0",
            Some(("monitor", "monitor-secret")),
        ),
        (
            "sensor1 ($6$), right password",
            "s0",
            Some(("sensor1", "sensor1-secret")),
        ),
        (
            "dashboard, wrong password",
            "d0",
            Some(("dashboard", "wrong")),
        ),
        (
            "mallory, not in the file",
            "x0",
            Some(("mallory", "monitor-secret")),
        ),
        ("no username", "a0", None),
    ] {
        let answer = match connect(port, id, login).await {
            Ok(c) => {
                c.client.disconnect().await.unwrap();
                "accepted"
            }
            Err(_) => "refused",
        };
        answers.insert(format!("connect: {what}"), answer.to_string());
    }

    let mut monitor = client(port, "monitor", "monitor").await;
    let mut dashboard = client(port, "dash", "dashboard").await;
    let mut device = client(port, "dev-42", "sensor2").await;
    for (who, c, filters) in [
        ("monitor", &mut monitor, &["#"][..]),
        ("dashboard", &mut dashboard, &["sensors/#", "secrets/#"]),
        ("sensor2 (dev-42)", &mut device, &["commands/#"]),
    ] {
        for filter in filters {
            let answer = match c.subscribe_acked(filter, QoS::AtLeastOnce).await {
                Packet::SubAck(ack) => format!("{:?}", ack.return_codes),
                _ => unreachable!(),
            };
            answers.insert(format!("subscribe: {who} to {filter}"), answer);
        }
    }

    for (user, id, topics) in [
        (
            "sensor1",
            "dev-17",
            &[
                "sensors/sensor1/temp",
                "sensors/sensor1/raw",
                "sensors/sensor1/firmware",
                "sensors/sensor2/temp",
                "commands/dev-17",
            ][..],
        ),
        (
            "backend",
            "backend-1",
            &[
                "commands/dev-42",
                "commands/dev-17",
                "sensors/backend/status",
            ],
        ),
        ("dashboard", "dash-pub", &["sensors/sensor1/temp"]),
        ("monitor", "monitor-pub", &["status/monitor"]),
        ("sensor2", "dev+1", &["sensors/sensor2/temp"]),
    ] {
        let mut c = client(port, id, user).await;
        for topic in topics {
            publish(&mut c, id, topic).await;
        }
        c.client.disconnect().await.unwrap();
    }
    // The markers, published after every message above was acknowledged.
    let mut backend = client(port, "backend-end", "backend").await;
    for topic in ["sensors/backend/end", "commands/dev-42"] {
        publish(&mut backend, "end", topic).await;
    }
    for (who, c, markers) in [
        (
            "monitor",
            &mut monitor,
            &["sensors/backend/end", "commands/dev-42"][..],
        ),
        ("dashboard", &mut dashboard, &["sensors/backend/end"]),
        ("sensor2 (dev-42)", &mut device, &["commands/dev-42"]),
    ] {
        let got = received_until(c, markers).await;
        answers.insert(format!("received by {who}"), got.join(", "));
    }
    answers
}

/// What the guide says both brokers answer.
fn expected() -> BTreeMap<String, String> {
    let granted = "[Success(AtLeastOnce)]";
    [
        ("connect: monitor, right password", "accepted"),
        ("connect: sensor1 ($6$), right password", "accepted"),
        ("connect: dashboard, wrong password", "refused"),
        ("connect: mallory, not in the file", "refused"),
        ("connect: no username", "refused"),
        ("subscribe: monitor to #", granted),
        ("subscribe: dashboard to sensors/#", granted),
        ("subscribe: dashboard to secrets/#", granted),
        ("subscribe: sensor2 (dev-42) to commands/#", granted),
        (
            "received by monitor",
            "sensors/sensor1/temp from dev-17, sensors/sensor1/raw from dev-17, \
             commands/dev-42 from backend-1, commands/dev-17 from backend-1, \
             sensors/backend/status from backend-1",
        ),
        (
            "received by dashboard",
            "sensors/sensor1/temp from dev-17, sensors/backend/status from backend-1",
        ),
        (
            "received by sensor2 (dev-42)",
            "commands/dev-42 from backend-1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Issue 13's migration test: one password file and one ACL file, a real Mosquitto and
/// mqbridge, the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_mosquitto_files_get_the_same_answers_from_mosquitto_and_mqbridge() {
    let mosquitto = Mosquitto::start_with(|dir, port| {
        make_files(dir);
        guide_block(
            "mosquitto.conf",
            dir,
            &[("listener 1883", &format!("listener {port} 127.0.0.1"))],
        )
    })
    .await;
    let from_mosquitto = answers(mosquitto.port).await;

    let port = free_port();
    let yaml = guide_block(
        "mqbridge.yaml",
        mosquitto.dir.path(),
        &[("0.0.0.0:1883", &format!("127.0.0.1:{port}"))],
    );
    let bridge = crate::embedded::start(port, &yaml).await;
    let from_mqbridge = answers(port).await;
    bridge.stop().await.unwrap();

    assert_eq!(
        from_mqbridge, from_mosquitto,
        "mqbridge (left) and Mosquitto (right) answered differently"
    );
    assert_eq!(
        from_mosquitto,
        expected(),
        "not what docs/migrate.md states"
    );
}

/// Whether the broker on `port` accepts `user` with `password`.
async fn accepts(port: u16, user: &str, password: &str) -> bool {
    match connect(port, &format!("{user}-probe"), Some((user, password))).await {
        Ok(c) => {
            c.client.disconnect().await.unwrap();
            true
        }
        Err(_) => false,
    }
}

/// SIGHUP reads the password file again (as Mosquitto does): a user added with
/// `mosquitto_passwd` can log in; a file that became malformed is reported with its line
/// and keeps the users in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_password_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let add = |args: &[&str]| {
        run_ok(
            Command::new("mosquitto_passwd")
                .args(&args[..args.len() - 2])
                .arg(&passwd)
                .args(&args[args.len() - 2..]),
        )
    };
    add(&["-c", "-b", "first", "first-secret"]);
    let port = free_port();
    let config = dir.path().join("mqbridge.yaml");
    std::fs::write(
        &config,
        format!(
            "embedded:\n  listen: 127.0.0.1:{port}\n  password_file: {}\n",
            passwd.display()
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start(&config);
    wait_listening(port, "mqbridge to listen").await;
    assert!(accepts(port, "first", "first-secret").await);
    assert!(!accepts(port, "second", "second-secret").await);

    add(&["-b", "second", "second-secret"]);
    bridge.signal("HUP");
    bridge
        .wait_for_log("config reloaded", Duration::from_secs(20))
        .await;
    assert!(accepts(port, "second", "second-secret").await);

    let mut text = std::fs::read_to_string(&passwd).unwrap();
    text.push_str("third:third-secret\n");
    std::fs::write(&passwd, text).unwrap();
    bridge.signal("HUP");
    bridge
        .wait_for_log("config reload failed", Duration::from_secs(20))
        .await;
    let at = format!("{}:3:7: embedded.password_file: ", passwd.display());
    assert!(bridge.log_count(&at) > 0, "no log line with {at:?}");
    assert_eq!(
        bridge.log_count("third-secret"),
        0,
        "the password is not logged"
    );
    assert!(accepts(port, "first", "first-secret").await);
    assert!(accepts(port, "second", "second-secret").await);
    assert!(!accepts(port, "third", "third-secret").await);
}
