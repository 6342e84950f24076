//! The admin server of a running bridge (issue 11): health and readiness without a token,
//! metrics and the API only with it, metric counts that match what was published, the
//! token kept out of the logs, readiness that names a failing sink, the embedded broker's
//! series and clients, and `run` refusing an address beyond loopback without a token.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

const TOKEN: &str = "e2e-admin-s3cret-7f3a";

/// GET `url` (with the bearer token when given): status and body; None when nothing
/// answers.
async fn get(url: &str, token: Option<&str>) -> Option<(u16, String)> {
    mqbridge::install_crypto();
    let mut req = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// The value of the series `name{labels}` in a Prometheus text exposition.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn config(dir: &Path, broker_port: u16, admin_port: u16) -> String {
    format!(
        r#"
broker:
  url: mqtt://127.0.0.1:{broker_port}
  client_id: admin-e2e
spool: {{ path: {spool}, max_bytes: 16MiB }}
sinks:
  db: {{ type: sqlite, path: {db}, table: readings }}
  alerts: {{ type: file, path: {alerts} }}
  dlq: {{ type: file, path: {dlq} }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    transform: '{{device: .vars.device, seq: .payload.seq, temp: .payload.temp}}'
    to: [db]
  - name: hot
    from: ["sensors/+/telemetry"]
    filter: '.payload.temp >= 30'
    to: [alerts]
dead_letter: {{ sink: dlq }}
admin:
  listen: 127.0.0.1:{admin_port}
  token: {TOKEN}
"#,
        spool = dir.join("spool").display(),
        db = dir.join("t.db").display(),
        alerts = dir.join("alerts.jsonl").display(),
        dlq = dir.join("dead.jsonl").display(),
    )
}

/// A bridge running [`config`] (readings into SQLite, a spool, admin with [`TOKEN`]),
/// subscribed to its own Mosquitto.
struct Running {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    path: std::path::PathBuf,
    bridge: ChildBridge,
    /// `http://127.0.0.1:<admin port>`.
    base: String,
}

impl Running {
    async fn start() -> Running {
        let broker = Mosquitto::start().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        sqlite_create(
            &db,
            "CREATE TABLE readings (device TEXT, seq INTEGER, temp REAL)",
        )
        .await;
        let admin_port = free_port();
        let path = dir.path().join("bridge.yaml");
        std::fs::write(&path, config(dir.path(), broker.port, admin_port)).unwrap();
        let bridge = ChildBridge::start_subscribed(&path).await;
        Running {
            broker,
            dir,
            db,
            path,
            bridge,
            base: format!("http://127.0.0.1:{admin_port}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_bridge_reports_health_readiness_and_metrics_that_match_what_was_published() {
    // `_dir` holds the temp dir (database, spool) until the end.
    let Running {
        broker,
        dir: _dir,
        db,
        path,
        bridge,
        base,
    } = Running::start().await;

    // Health and readiness: no token needed.
    let (code, _) = get(&format!("{base}/healthz"), None).await.unwrap();
    assert_eq!(code, 200);
    let ready = admin_ready(&base).await;
    assert_eq!(ready, r#"{"not_ready":[],"ready":true,"warnings":[]}"#);
    let health = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_mqbridge"))
            .args(["health", url])
            .output()
            .unwrap()
    };
    assert!(health(&format!("{base}/healthz")).status.success());
    let nobody = format!("http://127.0.0.1:{}/healthz", free_port());
    let out = health(&nobody);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&nobody),
        "{out:?}"
    );

    // Everything else needs the token.
    for route in [
        "/metrics",
        "/api/v1/rules",
        "/api/v1/sinks",
        "/api/v1/spool",
    ] {
        let url = format!("{base}{route}");
        assert_eq!(get(&url, None).await.unwrap().0, 401, "{route}");
        assert_eq!(get(&url, Some("not-it")).await.unwrap().0, 401, "{route}");
        assert_eq!(get(&url, Some(TOKEN)).await.unwrap().0, 200, "{route}");
    }
    let (_, rules) = get(&format!("{base}/api/v1/rules"), Some(TOKEN))
        .await
        .unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let names: Vec<&str> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["readings", "hot"]);
    assert_eq!(rules["rules"][1]["from"][0], "sensors/+/telemetry");
    assert_eq!(rules["rules"][1]["to"][0], "alerts");
    let (_, sinks) = get(&format!("{base}/api/v1/sinks"), Some(TOKEN))
        .await
        .unwrap();
    let sinks: serde_json::Value = serde_json::from_str(&sinks).unwrap();
    for sink in sinks["sinks"].as_array().unwrap() {
        assert_eq!(sink["healthy"], true, "{sink}");
        assert!(sink["queue_depth"].is_u64(), "{sink}");
    }
    let kinds: Vec<(&str, &str)> = sinks["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [("dlq", "file"), ("alerts", "file"), ("db", "sqlite")]
    );

    // Every configured rule and sink has its series from the start.
    let (_, metrics) = get(&format!("{base}/metrics"), Some(TOKEN)).await.unwrap();
    for rule in ["readings", "hot"] {
        let s = format!("mqbridge_rule_messages_matched_total{{rule=\"{rule}\"}}");
        assert_eq!(series(&metrics, &s), Some(0.0), "{s} in {metrics}");
    }
    for sink in ["db", "alerts", "dlq"] {
        let s = format!("mqbridge_sink_records_written_total{{sink=\"{sink}\"}}");
        assert_eq!(series(&metrics, &s), Some(0.0), "{s} in {metrics}");
    }

    // N messages, a quarter of them hot.
    const N: i64 = 40;
    let publisher = TestClient::connect(broker.port, "admin-e2e-pub").await;
    publisher
        .publish_all((0..N).map(|i| {
            (
                format!("sensors/d{}/telemetry", i % 4),
                format!(r#"{{"seq": {i}, "temp": {}}}"#, i % 40),
            )
        }))
        .await;
    let expected = [
        ("mqbridge_source_messages_received_total{qos=\"1\"}", N),
        ("mqbridge_rule_messages_matched_total{rule=\"readings\"}", N),
        (
            "mqbridge_rule_messages_filtered_total{rule=\"readings\"}",
            0,
        ),
        ("mqbridge_rule_records_total{rule=\"readings\"}", N),
        ("mqbridge_rule_messages_matched_total{rule=\"hot\"}", N),
        ("mqbridge_rule_messages_filtered_total{rule=\"hot\"}", 30),
        ("mqbridge_rule_records_total{rule=\"hot\"}", 10),
        ("mqbridge_sink_records_written_total{sink=\"db\"}", N),
        ("mqbridge_sink_records_written_total{sink=\"alerts\"}", 10),
        ("mqbridge_sink_records_written_total{sink=\"dlq\"}", 0),
        ("mqbridge_sink_records_dead_lettered_total{sink=\"db\"}", 0),
        ("mqbridge_sink_healthy{sink=\"db\"}", 1),
        ("mqbridge_source_connected", 1),
        ("mqbridge_spool_records", 0),
    ];
    let metrics = metrics_matching(&base, &expected).await;
    assert_eq!(sqlite_count(&db, "readings").await, N);
    // The spool took every message, and all of them settled.
    let (code, body) = get(&format!("{base}/api/v1/spool"), Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let spool: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(spool["max_bytes"], 16 << 20, "{spool}");
    assert!(spool["committed"].as_i64().unwrap() >= N, "{spool}");
    assert_eq!(spool["records"], 0, "{spool}");
    assert_eq!(spool["full"], false, "{spool}");
    assert_eq!(
        series(
            &metrics,
            "mqbridge_rule_evaluation_seconds_count{rule=\"readings\"}"
        ),
        Some(N as f64)
    );
    assert!(
        series(&metrics, "mqbridge_sink_batch_size_count{sink=\"db\"}").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE mqbridge_sink_write_seconds histogram"));
    assert!(metrics.contains("mqbridge_build_info{version=\""));
    // Spool commits, the process's own gauges, and the age of the oldest unsettled
    // message (nothing is left unsettled: at most a second's staleness).
    let has = |name: &str, ok: &dyn Fn(f64) -> bool| {
        assert!(
            series(&metrics, name).is_some_and(ok),
            "{name} in {metrics}"
        )
    };
    has("mqbridge_spool_fsync_seconds_count", &|n| n >= 1.0);
    has("mqbridge_process_resident_memory_bytes", &|b| b > 1e6);
    has("mqbridge_process_open_fds", &|n| n >= 3.0);
    has("mqbridge_source_oldest_unsettled_seconds", &|s| s < 60.0);
    // Labels are configured names only: no topic, no client id.
    assert!(!metrics.contains("sensors/"), "{metrics}");
    assert!(!metrics.contains("admin-e2e"), "{metrics}");
    print!("{metrics}");

    // `check` does not print the token either.
    let check = Command::new(env!("CARGO_BIN_EXE_mqbridge"))
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        out.contains(&format!("admin: {base}/ (token set in the file)")),
        "{out}"
    );
    assert!(!out.contains(TOKEN), "{out}");

    let log = std::sync::Arc::clone(&bridge.log);
    let (status, _) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success());
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("admin server listening"), "{log}");
    assert!(!log.contains(TOKEN), "the token is in the log:\n{log}");
}

/// A sink that cannot write makes `/readyz` answer 503 naming it, with its error, and
/// `/api/v1/sinks` shows it unhealthy; the embedded broker's source is ready once it
/// listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_sink_that_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, admin_port, closed) = (free_port(), free_port(), free_port());
    let path = dir.path().join("bridge.yaml");
    std::fs::write(
        &path,
        format!(
            r##"
embedded: {{ listen: 127.0.0.1:{mqtt_port}, allow_anonymous: true }}
spool: {{ path: {spool}, max_bytes: 16MiB }}
sinks:
  hook:
    type: webhook
    url: http://127.0.0.1:{closed}/ingest
    timeout: 500ms
    retry: {{ initial_delay: 50ms, max_delay: 200ms }}
rules:
  - {{ name: all, from: ["#"], to: [hook] }}
admin: {{ listen: 127.0.0.1:{admin_port} }}
"##,
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start(&path);
    let base = format!("http://127.0.0.1:{admin_port}");
    admin_ready(&base).await;
    // No token configured, on loopback: the API is open.
    assert_eq!(
        get(&format!("{base}/api/v1/sinks"), None).await.unwrap().0,
        200
    );

    let publisher = TestClient::connect(mqtt_port, "admin-e2e-ready").await;
    // Acknowledged once spooled, so this returns although the hook is down.
    publisher
        .publish_all([("t/1".to_string(), "{}".to_string())])
        .await;
    let (_, body) = eventually(Duration::from_secs(20), "/readyz 503", async || {
        get(&format!("{base}/readyz"), None)
            .await
            .filter(|(code, _)| *code == 503)
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let problems = body["not_ready"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{body}");
    assert_eq!(problems[0]["component"], "sink hook", "{body}");
    let reason = problems[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("last write failed: "), "{reason}");
    let (_, sinks) = get(&format!("{base}/api/v1/sinks"), None).await.unwrap();
    let sinks: serde_json::Value = serde_json::from_str(&sinks).unwrap();
    assert_eq!(sinks["sinks"][0]["healthy"], false, "{sinks}");
    assert_eq!(sinks["sinks"][0]["problem"], reason, "{sinks}");
    let (_, metrics) = get(&format!("{base}/metrics"), None).await.unwrap();
    assert_eq!(
        series(&metrics, "mqbridge_sink_healthy{sink=\"hook\"}"),
        Some(0.0)
    );
    assert!(
        series(
            &metrics,
            "mqbridge_sink_records_retried_total{sink=\"hook\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    drop(bridge);
}

/// With `embedded:`, the broker's series count what its clients did (messages in, copies
/// out to a subscriber, an ACL refusal, a retained message), and `/api/v1/clients` lists
/// the subscriber with its subscription; both behind the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_brokers_metrics_and_clients_match_what_its_clients_did() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, admin_port) = (free_port(), free_port());
    let path = dir.path().join("bridge.yaml");
    std::fs::write(
        &path,
        format!(
            r##"
embedded:
  listen: 127.0.0.1:{mqtt_port}
  allow_anonymous: true
  acl: [{{ username: "*", action: deny, publish: ["secret/#"] }}]
  sys_interval: 0s   # only what the clients did: no $SYS messages sent or retained
sinks:
  out: {{ type: file, path: {out} }}
rules:
  - {{ name: all, from: ["plant/#"], to: [out] }}
admin: {{ listen: 127.0.0.1:{admin_port}, token: {TOKEN} }}
"##,
            out = dir.path().join("out.jsonl").display(),
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start(&path);
    let base = format!("http://127.0.0.1:{admin_port}");
    admin_ready(&base).await;
    for route in ["/metrics", "/api/v1/clients"] {
        let url = format!("{base}{route}");
        assert_eq!(get(&url, None).await.unwrap().0, 401, "{route}");
    }

    let mut subscriber = TestClient::connect(mqtt_port, "admin-e2e-sub").await;
    subscriber
        .client
        .subscribe("plant/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    // The SUBACK is not surfaced: wait until the broker lists the subscription.
    let clients = eventually(
        Duration::from_secs(10),
        "the subscription listed",
        async || {
            let (code, body) = get(&format!("{base}/api/v1/clients"), Some(TOKEN)).await?;
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (v["clients"][0]["subscriptions"][0]["filter"] == "plant/#").then_some(v)
        },
    )
    .await;
    let sub = &clients["clients"][0];
    assert_eq!(clients["clients"].as_array().unwrap().len(), 1, "{clients}");
    assert_eq!(sub["client_id"], "admin-e2e-sub", "{sub}");
    assert_eq!(sub["connected"], true, "{sub}");
    assert_eq!(sub["protocol"], "3.1.1", "{sub}");
    assert_eq!(sub["subscriptions"][0]["qos"], 1, "{sub}");
    assert!(sub["username"].is_null(), "{sub}");
    assert!(
        sub["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{sub}"
    );
    let since: jiff::Timestamp = sub["connected_since"].as_str().unwrap().parse().unwrap();
    assert!(since <= jiff::Timestamp::now(), "{sub}");

    // N messages to the subscriber (and the rule), one refused by the ACL, one retained.
    const N: i64 = 25;
    let publisher = TestClient::connect(mqtt_port, "admin-e2e-pub").await;
    publisher
        .publish_all((0..N).map(|i| (format!("plant/line{}/temp", i % 3), format!("{i}"))))
        .await;
    publisher
        .publish_all([("secret/x".to_string(), "no".to_string())])
        .await;
    publisher
        .client
        .publish("plant/state", rumqttc::QoS::AtLeastOnce, true, "on")
        .await
        .unwrap();
    let expected = [
        ("mqbridge_broker_connections", 2),
        ("mqbridge_broker_sessions", 2),
        ("mqbridge_broker_subscriptions", 1),
        ("mqbridge_broker_retained_messages", 1),
        ("mqbridge_broker_messages_received_total", N + 2),
        ("mqbridge_broker_messages_sent_total", N + 1),
        ("mqbridge_broker_messages_dropped_total{reason=\"acl\"}", 1),
        (
            "mqbridge_broker_messages_dropped_total{reason=\"queue_full\"}",
            0,
        ),
        (
            "mqbridge_broker_messages_dropped_total{reason=\"expired\"}",
            0,
        ),
        ("mqbridge_broker_connections_refused_total", 0),
        ("mqbridge_rule_messages_matched_total{rule=\"all\"}", N + 1),
    ];
    let metrics = metrics_matching(&base, &expected).await;
    let mut got = 0;
    while got < N + 1 {
        tokio::time::timeout(Duration::from_secs(10), subscriber.received.recv())
            .await
            .expect("the subscriber receives every message")
            .unwrap();
        got += 1;
    }
    // Labels are fixed values only: no topic, no client id.
    assert!(!metrics.contains("plant/"), "{metrics}");
    assert!(!metrics.contains("admin-e2e"), "{metrics}");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("mqbridge_broker_"))
    {
        println!("{line}");
    }
    drop(bridge);
}

/// `/api/v1/dead-letters` (token) lists the latest dead letters, newest first, with their
/// reasons: here a payload that is not JSON, which both rules fail on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_dead_letters_are_listed_with_their_reasons() {
    let Running {
        broker,
        dir,
        bridge,
        base,
        ..
    } = Running::start().await;
    let url = format!("{base}/api/v1/dead-letters");
    let (code, _) = get(&url, None).await.unwrap();
    assert_eq!(code, 401);

    let publisher = TestClient::connect(broker.port, "admin-dl-pub").await;
    publisher
        .publish_all([("sensors/d9/telemetry".to_string(), "not json".to_string())])
        .await;
    let letters = eventually(Duration::from_secs(20), "two dead letters", async || {
        let (_, body) = get(&url, Some(TOKEN)).await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let letters = v["dead_letters"].as_array()?.clone();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let mut rules: Vec<&str> = letters
        .iter()
        .map(|l| l["rule"].as_str().unwrap())
        .collect();
    rules.sort();
    assert_eq!(rules, ["hot", "readings"]);
    for l in &letters {
        assert_eq!(l["topic"], "sensors/d9/telemetry", "{l}");
        assert_eq!(l["payload"], "not json", "{l}");
        assert!(l["error"].as_str().is_some_and(|e| !e.is_empty()), "{l}");
        assert!(l["error_kind"].is_string(), "{l}");
    }
    let (_, body) = get(&format!("{url}?limit=1"), Some(TOKEN)).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["dead_letters"][0], letters[0], "the newest first");
    // The dead-letter sink got the same letters.
    eventually(
        Duration::from_secs(10),
        "the letters in the file",
        async || (json_lines(&dir.path().join("dead.jsonl")).len() == 2).then_some(()),
    )
    .await;
    drop(bridge);
}

#[test]
fn run_refuses_an_admin_address_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.yaml");
    std::fs::write(
        &path,
        format!(
            "embedded: {{ listen: 127.0.0.1:{}, allow_anonymous: true }}\nadmin:\n  listen: 0.0.0.0:{}\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    for command in ["run", "check"] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqbridge"));
        match command {
            "run" => cmd.args(["run", "--config"]),
            _ => cmd.arg("check"),
        };
        let out = cmd.arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        let want = format!("{}:3:11: admin.listen: 0.0.0.0:", path.display());
        assert!(err.contains(&want), "{command}: {err}");
        assert!(
            err.contains("is reachable from other machines: set a token (admin.token, token_file or token_env), or listen on 127.0.0.1"),
            "{command}: {err}"
        );
    }
}

/// `/metrics` once every series in `expected` has its value (polled for up to 20 s);
/// otherwise fails listing what each one had.
async fn metrics_matching(base: &str, expected: &[(&str, i64)]) -> String {
    let last = within(Duration::from_secs(20), async || {
        let (_, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await?;
        expected
            .iter()
            .all(|&(s, want)| series(&text, s) == Some(want as f64))
            .then_some(text)
    })
    .await;
    if let Some(metrics) = last {
        return metrics;
    }
    let (_, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await.unwrap();
    let found: Vec<String> = expected
        .iter()
        .map(|&(s, want)| format!("{s}: want {want}, got {:?}", series(&text, s)))
        .collect();
    panic!("metrics never matched:\n{}", found.join("\n"));
}
