//! Config reload (issue 11, item 4): on SIGHUP and on a change of the file, while
//! messages stream in, nothing is lost and nothing duplicated; a new rule is listed by
//! `/api/v1/rules` and runs; an invalid edit keeps the running config and is reported.

use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// The numbered bridge of [`numbered_bridge`], with a dead-letter sink, in one of three
/// versions. `keyed` is the same in all (a reload keeps it running); `raw`, `dlq` and the
/// rule's name change with `version` (a reload replaces the sinks and the rule).
/// `keyed` takes 2,500 records/s, so that 20,000 messages stream for 8 s and both
/// reloads (the file's change is seen within about 2 s) land mid-stream.
fn versioned(dir: &Path, source: &str, db: &str, version: u32) -> String {
    let max_rows = [200, 100, 50][version as usize];
    format!(
        r#"{source}
sinks:
  keyed: {{ type: postgres, url: "{db}", table: keyed, on_conflict: {{ key: [seq], action: ignore }}, batch: {{ max_rows: 200 }}, rate_limit: {{ per_second: 2500 }} }}
  raw: {{ type: postgres, url: "{db}", table: raw, batch: {{ max_rows: {max_rows} }} }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - {{ name: numbered-v{version}, from: "reload/#", transform: '{{seq: .payload.seq}}', to: [keyed, raw] }}
dead_letter: {{ sink: dlq }}
"#,
        dlq = dir.join(format!("dead-{version}.jsonl")).display(),
    )
}

/// Issue 11's done-when: 20,000 numbered QoS 1 messages from 4 publishers while the
/// config is reloaded twice, once by SIGHUP (a quarter in) and once by editing the file
/// (half way), each reload replacing the `raw` sink, the dead-letter sink and the rule and
/// keeping `keyed`. Nothing is killed, so nothing is redelivered: the table without a key
/// must hold every number exactly once, which a message routed twice (or a record lost
/// by a driver that was stopped) would break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_while_20k_messages_stream_in_loses_and_duplicates_nothing() {
    reload_while_streaming(false).await;
}

/// The same with the spool between the source and the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_while_20k_messages_stream_in_with_the_spool_loses_and_duplicates_nothing() {
    reload_while_streaming(true).await;
}

async fn reload_while_streaming(spool: bool) {
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(&db, NUMBERED_TABLES).await;
    let spool = if spool {
        format!("spool: {{ path: {} }}", dir.path().join("spool").display())
    } else {
        String::new()
    };
    let source = format!(
        "broker: {{ url: \"mqtt://127.0.0.1:{}\", client_id: reload-20k, protocol: 5, receive_maximum: 200 }}\n{spool}",
        broker.port,
    );
    let path = dir.path().join("bridge.yaml");
    std::fs::write(&path, versioned(dir.path(), &source, &db, 0)).unwrap();
    let bridge = ChildBridge::start_subscribed(&path).await;

    const N: i64 = 20_000;
    let acked = Acked::default();
    let keyed_now = async || {
        pg_count(&db, "SELECT count(*)::text FROM keyed")
            .await
            .unwrap_or(0)
    };
    let reloads = async {
        let keyed = async |at_least: i64| {
            eventually(Duration::from_secs(120), "rows in keyed", async || {
                (pg_count(&db, "SELECT count(*)::text FROM keyed")
                    .await
                    .unwrap_or(0)
                    >= at_least)
                    .then_some(())
            })
            .await
        };
        keyed(N / 4).await;
        std::fs::write(&path, versioned(dir.path(), &source, &db, 1)).unwrap();
        bridge.signal("HUP");
        bridge
            .wait_for_log("config reloaded", Duration::from_secs(20))
            .await;
        let at_first = keyed_now().await;
        keyed(N / 2).await;
        // No signal: the file's change is seen by polling.
        std::fs::write(&path, versioned(dir.path(), &source, &db, 2)).unwrap();
        eventually(Duration::from_secs(20), "second reload", async || {
            (bridge.log_count("config reloaded") >= 2).then_some(())
        })
        .await;
        let at_second = keyed_now().await;
        println!("rows in keyed when the reloads were done: {at_first}, {at_second}");
        assert!(
            at_second < N * 9 / 10,
            "the second reload came after the stream"
        );
    };
    tokio::join!(
        publish_numbered_resending(
            broker.port,
            "reload",
            N,
            4,
            Duration::from_secs(120),
            &acked
        ),
        reloads
    );
    assert_numbered_stored_once(&db, N, Duration::from_secs(60)).await;
    let raw_rows = pg_count(&db, "SELECT count(*)::text FROM raw")
        .await
        .unwrap();
    assert_eq!(
        raw_rows, N,
        "rows in the table without a key: a message was routed twice"
    );
    let log = bridge.log.lock().unwrap().clone();
    let reloaded: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("config reloaded"))
        .collect();
    println!("reloads: {reloaded:#?}");
    assert_eq!(reloaded.len(), 2, "one reload per change");
    assert!(reloaded[0].contains("sinks_kept=1"), "{}", reloaded[0]);
    assert!(log.iter().any(|l| l.contains("cause=SIGHUP")));
    assert!(log.iter().any(|l| l.contains("cause=the file changed")));
    assert!(
        !log.iter().any(|l| l.contains("needs a restart")),
        "nothing restart-only changed"
    );
    for v in 0..3 {
        let letters = json_lines(&dir.path().join(format!("dead-{v}.jsonl")));
        assert!(letters.is_empty(), "dead letters: {letters:?}");
    }
    drop(bridge);
}

/// Two file sinks, the rules given, an admin server on `admin_port`.
fn rules_config(dir: &Path, broker_port: u16, admin_port: u16, rules: &str) -> String {
    format!(
        r#"broker: {{ url: "mqtt://127.0.0.1:{broker_port}", client_id: reload-rules }}
admin: {{ listen: 127.0.0.1:{admin_port} }}
sinks:
  first: {{ type: file, path: {first} }}
  second: {{ type: file, path: {second} }}
rules:
{rules}"#,
        first = dir.join("first.jsonl").display(),
        second = dir.join("second.jsonl").display(),
    )
}

/// A Mosquitto, and a rules file for it ([`rules_config`]) that a test rewrites.
struct RulesFile {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    admin_port: u16,
}

impl RulesFile {
    /// Starts the broker and writes the file with `rules`.
    async fn new(rules: &str) -> RulesFile {
        let dir = tempfile::tempdir().unwrap();
        let file = RulesFile {
            broker: Mosquitto::start().await,
            path: dir.path().join("bridge.yaml"),
            dir,
            admin_port: free_port(),
        };
        file.write(rules);
        file
    }

    fn write(&self, rules: &str) {
        let config = rules_config(self.dir.path(), self.broker.port, self.admin_port, rules);
        std::fs::write(&self.path, config).unwrap()
    }

    /// `http://127.0.0.1:<admin port>`.
    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
}

const RULE_A: &str =
    "  - { name: a, from: \"in/#\", transform: '{seq: .payload.seq}', to: [first] }\n";
const RULE_B: &str =
    "  - { name: b, from: \"in/+\", transform: '{seq: .payload.seq, by: \"b\"}', to: [second] }\n";
/// Two mistakes: a jq syntax error and a sink that does not exist.
const RULE_BAD: &str =
    "  - { name: c, from: \"in/#\", transform: '{seq: .payload.seq', to: [nowhere] }\n";

async fn get(url: &str) -> (u16, serde_json::Value) {
    mqbridge::install_crypto();
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

async fn rule_names(admin: &str) -> Vec<String> {
    let (_, body) = get(&format!("{admin}/api/v1/rules")).await;
    body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

async fn metric(admin: &str, name: &str) -> Option<f64> {
    mqbridge::install_crypto();
    let text = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Issue 11's done-when: SIGHUP after adding a rule makes `/api/v1/rules` list it, and it
/// runs, without a restart. Then an invalid edit: the errors are logged with
/// file:line:col, `/readyz` stays 200 with a `config` warning, the metrics count the
/// failure, and the rules that ran keep running. Fixing the file (no signal) clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_rule_and_an_invalid_edit_keeps_the_running_rules() {
    let file = RulesFile::new(RULE_A).await;
    let (broker, dir, path, admin) = (&file.broker, &file.dir, &file.path, file.admin());
    let write = |rules: &str| file.write(rules);
    let bridge = ChildBridge::start_subscribed(path).await;
    assert_eq!(rule_names(&admin).await, ["a"]);
    let client = TestClient::connect(broker.port, "reload-rules-pub").await;
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");

    write(&format!("{RULE_A}{RULE_B}"));
    bridge.signal("HUP");
    bridge
        .wait_for_log("config reloaded", Duration::from_secs(20))
        .await;
    assert_eq!(rule_names(&admin).await, ["a", "b"]);
    client
        .publish_all([("in/x".to_string(), r#"{"seq": 1}"#.to_string())])
        .await;
    eventually(Duration::from_secs(10), "seq 1 in both sinks", async || {
        (json_lines(&first).len() == 1 && json_lines(&second).len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        json_lines(&second)[0],
        serde_json::json!({"seq": 1, "by": "b"})
    );

    write(&format!("{RULE_A}{RULE_B}{RULE_BAD}"));
    bridge.signal("HUP");
    bridge
        .wait_for_log("config reload failed", Duration::from_secs(20))
        .await;
    let log = bridge.log.lock().unwrap().clone();
    let file = path.display().to_string();
    for needle in [
        format!("{file}:9:"),
        "rules[2].transform: jq".to_string(),
        "rules[2].to[0]".to_string(),
    ] {
        assert!(
            log.iter().any(|l| l.contains(&needle)),
            "no log line with {needle:?}:\n{}",
            log.join("\n")
        );
    }
    let (code, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["warnings"][0]["component"], "config", "{body}");
    let reason = body["warnings"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("rules[2].to[0]"), "{reason}");
    assert_eq!(
        metric(&admin, "mqbridge_config_reload_failures_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&admin, "mqbridge_config_last_reload_success").await,
        Some(0.0)
    );
    assert_eq!(
        rule_names(&admin).await,
        ["a", "b"],
        "the running rules stay"
    );
    client
        .publish_all([("in/y".to_string(), r#"{"seq": 2}"#.to_string())])
        .await;
    eventually(Duration::from_secs(10), "seq 2 in both sinks", async || {
        (json_lines(&first).len() == 2 && json_lines(&second).len() == 2).then_some(())
    })
    .await;

    // Fixed, without a signal: the file's change is seen by polling.
    write(RULE_A);
    eventually(
        Duration::from_secs(20),
        "the fixed file reloaded",
        async || (bridge.log_count("config reloaded") >= 2).then_some(()),
    )
    .await;
    assert_eq!(rule_names(&admin).await, ["a"]);
    let (code, body) = get(&format!("{admin}/readyz")).await;
    assert_eq!((code, &body["warnings"]), (200, &serde_json::json!([])));
    assert_eq!(
        metric(&admin, "mqbridge_config_last_reload_success").await,
        Some(1.0)
    );
    // The sinks did not change: both kept running, both listed.
    let (_, sinks) = get(&format!("{admin}/api/v1/sinks")).await;
    let names: Vec<&str> = sinks["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    drop(bridge);
}

const RULE_NEW: &str =
    "  - { name: n, from: \"new/+\", transform: '{seq: .payload.seq}', to: [second] }\n";

/// Whether some log line of `bridge` contains every one of `needles`.
fn logged(bridge: &ChildBridge, needles: &[&str]) -> bool {
    let log = bridge.log.lock().unwrap();
    log.iter().any(|l| needles.iter().all(|n| l.contains(n)))
}

/// With an external broker a reload also changes what mqbridge subscribes to: a new
/// rule's topic filter is subscribed to on the running connection (only once the router
/// has the new rule, so the first message on it is not routed by the old rules), and a
/// filter no rule reads any more is unsubscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_subscribes_to_a_new_rules_filter_and_drops_an_unused_one() {
    let file = RulesFile::new(RULE_A).await;
    let (broker, dir, path) = (&file.broker, &file.dir, &file.path);
    let write = |rules: &str| file.write(rules);
    let bridge = ChildBridge::start_subscribed(path).await;
    let client = TestClient::connect(broker.port, "reload-subs-pub").await;
    let (first, second) = (
        dir.path().join("first.jsonl"),
        dir.path().join("second.jsonl"),
    );

    write(&format!("{RULE_A}{RULE_NEW}"));
    bridge.signal("HUP");
    eventually(Duration::from_secs(20), "new/+ subscribed", async || {
        logged(&bridge, &["new/+", "subscribed"]).then_some(())
    })
    .await;
    client
        .publish_all([("new/x".to_string(), r#"{"seq": 1}"#.to_string())])
        .await;
    eventually(
        Duration::from_secs(10),
        "seq 1 by the new rule",
        async || (json_lines(&second).len() == 1).then_some(()),
    )
    .await;

    write(RULE_A);
    bridge.signal("HUP");
    eventually(Duration::from_secs(20), "new/+ unsubscribed", async || {
        logged(&bridge, &["new/+", "unsubscribed"]).then_some(())
    })
    .await;
    client
        .publish_all([("in/z".to_string(), r#"{"seq": 2}"#.to_string())])
        .await;
    eventually(Duration::from_secs(10), "in/z by rule a", async || {
        (json_lines(&first).len() == 1).then_some(())
    })
    .await;
    assert_eq!(json_lines(&second).len(), 1);
    drop(bridge);
}

/// A restart with a new rule: the broker kept the session (and its old subscriptions),
/// and the new rule's filter is subscribed to all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_kept_session_subscribes_to_a_new_rules_filter() {
    let file = RulesFile::new(RULE_A).await;
    let (broker, dir, path) = (&file.broker, &file.dir, &file.path);
    let write = |rules: &str| file.write(rules);
    let bridge = ChildBridge::start_subscribed(path).await;
    let (status, _) = bridge.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");

    write(&format!("{RULE_A}{RULE_NEW}"));
    let bridge = ChildBridge::start(path);
    eventually(Duration::from_secs(20), "new/+ subscribed", async || {
        logged(&bridge, &["new/+", "subscribed"]).then_some(())
    })
    .await;
    assert!(
        logged(&bridge, &["connected to broker", "session_present=true"]),
        "the broker kept the session"
    );
    let client = TestClient::connect(broker.port, "reload-restart-pub").await;
    client
        .publish_all([("new/x".to_string(), r#"{"seq": 1}"#.to_string())])
        .await;
    let second = dir.path().join("second.jsonl");
    eventually(
        Duration::from_secs(10),
        "seq 1 by the new rule",
        async || (json_lines(&second).len() == 1).then_some(()),
    )
    .await;
    drop(bridge);
}
