//! The admin routes over a real listener on port 0, asked with a real HTTP client.

use std::sync::Arc;

use super::*;
use crate::health::Status;

struct Server {
    base: String,
    state: Arc<State>,
    stop: CancellationToken,
    /// Where the `db` sink (a file) writes.
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A config with one rule, `readings`, into a `file` sink `db` in `dir`.
fn config(dir: &std::path::Path) -> Plan {
    let yaml = format!(
        r#"
embedded: {{ listen: "127.0.0.1:0", allow_anonymous: true }}
sinks:
  db: {{ type: file, path: "{}/db.jsonl" }}
rules:
  - name: readings
    from: ["sensors/{{device}}/telemetry"]
    filter: '.payload.temp != null'
    transform: '{{device: .vars.device, temp: .payload.temp}}'
    to: [db]
"#,
        dir.display()
    );
    crate::config::parse(&yaml, "test.yaml", |_| None).unwrap()
}

async fn server(token: Option<&str>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(State::new(
        token.map(|t| Arc::new(Token::new(t))),
        exporter::install(),
        Arc::new(config(dir.path())),
    ));
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, Arc::clone(&state), stop.clone()));
    Server {
        base,
        state,
        stop,
        dir,
    }
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    crate::install_crypto();
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn health_and_readiness_need_no_token_and_name_what_is_not_ready() {
    let s = server(Some("t0ken")).await;
    assert_eq!(get(&format!("{}/healthz", s.base), None).await.0, 200);
    let (code, body) = get(&format!("{}/readyz", s.base), None).await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"not_ready":[],"ready":true,"warnings":[]}"#)
    );

    let sink = Status::ready();
    s.state
        .readiness
        .add("source", Status::not_ready("connecting"));
    s.state.readiness.add("sink db", sink.clone());
    sink.set_not_ready("last write failed: connection refused");
    let (code, body) = get(&format!("{}/readyz", s.base), None).await;
    assert_eq!(code, 503);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"ready": false, "not_ready": [
            {"component": "source", "reason": "connecting"},
            {"component": "sink db", "reason": "last write failed: connection refused"},
        ], "warnings": []})
    );
}

/// A failed config reload is a warning: the previous config still delivers, so the
/// bridge stays ready (an orchestrator must not take a working instance out of service
/// for a typo in a file it has not applied).
#[tokio::test]
async fn a_failed_reload_is_a_warning_not_unready() {
    let s = server(None).await;
    let config = Status::ready();
    s.state.readiness.add_warning("config", config.clone());
    config.set_not_ready("reload failed: rules.yaml:3:7: rules[0].filter: jq: ...");
    let (code, body) = get(&format!("{}/readyz", s.base), None).await;
    assert_eq!(code, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"ready": true, "not_ready": [], "warnings": [
            {"component": "config", "reason": "reload failed: rules.yaml:3:7: rules[0].filter: jq: ..."},
        ]})
    );
    config.set_ready();
    let (_, body) = get(&format!("{}/readyz", s.base), None).await;
    assert!(body.contains(r#""warnings":[]"#), "{body}");
}

#[tokio::test]
async fn metrics_and_the_api_need_the_token() {
    let s = server(Some("t0ken")).await;
    for path in [
        "/metrics",
        "/api/v1/rules",
        "/api/v1/sinks",
        "/api/v1/dead-letters",
    ] {
        let url = format!("{}{path}", s.base);
        assert_eq!(get(&url, None).await.0, 401, "{path}");
        assert_eq!(get(&url, Some("wrong")).await.0, 401, "{path}");
        assert_eq!(get(&url, Some("t0ken")).await.0, 200, "{path}");
    }
    let (_, rules) = get(&format!("{}/api/v1/rules", s.base), Some("t0ken")).await;
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    assert_eq!(rules["rules"][0]["name"], "readings");
    assert_eq!(rules["rules"][0]["from"][0], "sensors/{device}/telemetry");
    assert_eq!(rules["rules"][0]["to"][0], "db");
    let (_, metrics) = get(&format!("{}/metrics", s.base), Some("t0ken")).await;
    assert!(
        metrics.contains("mqbridge_build_info{version=\""),
        "{metrics}"
    );
    assert_eq!(get(&format!("{}/nowhere", s.base), None).await.0, 404);
    // Without an embedded broker: 404 that says so (and still behind the token).
    let clients = format!("{}/api/v1/clients", s.base);
    assert_eq!(get(&clients, None).await.0, 401);
    let (code, body) = get(&clients, Some("t0ken")).await;
    assert_eq!(code, 404);
    assert!(body.contains("no embedded broker"), "{body}");
    // Without a spool likewise.
    let spool = format!("{}/api/v1/spool", s.base);
    assert_eq!(get(&spool, None).await.0, 401);
    let (code, body) = get(&spool, Some("t0ken")).await;
    assert_eq!(code, 404);
    assert!(body.contains("no spool"), "{body}");
}

#[tokio::test]
async fn without_a_token_everything_is_open() {
    let s = server(None).await;
    assert_eq!(get(&format!("{}/api/v1/rules", s.base), None).await.0, 200);
    assert_eq!(get(&format!("{}/metrics", s.base), None).await.0, 200);
}

async fn post(url: &str, token: Option<&str>, body: Option<serde_json::Value>) -> (u16, String) {
    crate::install_crypto();
    let mut req = reqwest::Client::new().post(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn try_runs_the_running_rules_and_writes_nothing() {
    let s = server(Some("t0ken")).await;
    let url = format!("{}/api/v1/try", s.base);
    let msg = serde_json::json!({"topic": "sensors/d7/telemetry", "payload": r#"{"temp": 21.5}"#});
    assert_eq!(post(&url, None, Some(msg.clone())).await.0, 401);
    let (code, body) = post(&url, Some("t0ken"), Some(msg)).await;
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let o = &body["outcomes"][0];
    assert_eq!(o["rule"], "readings");
    assert_eq!(o["vars"], serde_json::json!({"device": "d7"}));
    assert_eq!(o["result"], "records");
    assert_eq!(
        o["records"][0]["record"],
        serde_json::json!({"device": "d7", "temp": 21.5})
    );
    assert_eq!(o["records"][0]["sinks"][0]["sink"], "db");
    assert!(
        o["records"][0]["sinks"][0]["would"]
            .as_str()
            .unwrap()
            .starts_with("append one JSON line to"),
        "{o}"
    );
    assert!(!s.dir.path().join("db.jsonl").exists(), "nothing written");

    let (_, body) = post(
        &url,
        Some("t0ken"),
        Some(serde_json::json!({"topic": "sensors/d7/telemetry", "payload": "{"})),
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["outcomes"][0]["result"], "failed");
    assert_eq!(body["outcomes"][0]["stage"], "decode");
    // A binary payload comes as base64: here the bytes of the JSON above.
    let (code, body) = post(
        &url,
        Some("t0ken"),
        Some(serde_json::json!({"topic": "sensors/d7/telemetry", "payload_base64": "eyJ0ZW1wIjogMjEuNX0="})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["outcomes"][0]["records"][0]["record"],
        serde_json::json!({"device": "d7", "temp": 21.5})
    );
    for (bad, why) in [
        (
            serde_json::json!({"topic": "sensors/d7/telemetry", "payload": "{}", "payload_base64": "e30="}),
            "one or the other",
        ),
        (
            serde_json::json!({"topic": "sensors/d7/telemetry", "payload_base64": "not base64!"}),
            "payload_base64: not valid base64",
        ),
    ] {
        let (code, body) = post(&url, Some("t0ken"), Some(bad)).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains(why), "{body}");
    }
    let (_, body) = post(
        &url,
        Some("t0ken"),
        Some(serde_json::json!({"topic": "elsewhere"})),
    )
    .await;
    assert_eq!(body, r#"{"outcomes":[],"topic":"elsewhere"}"#);
    let (code, _) = post(
        &url,
        Some("t0ken"),
        Some(serde_json::json!({"topic": "sensors/+/telemetry"})),
    )
    .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn tail_streams_a_rules_next_outcomes_then_ends() {
    let s = server(None).await;
    assert_eq!(
        get(&format!("{}/api/v1/rules/nope/tail", s.base), None)
            .await
            .0,
        404
    );
    crate::install_crypto();
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/v1/rules/readings/tail?n=2", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    while !text.contains('\n') {
        text.push_str(std::str::from_utf8(&resp.chunk().await.unwrap().unwrap()).unwrap());
    }
    assert_eq!(
        text,
        "{\"kind\":\"watching\",\"n\":2,\"rule\":\"readings\"}\n"
    );
    // Watched from here on: what the router offers arrives, other rules' outcomes do not.
    let taps = &s.state.taps;
    taps.offer("other", || unreachable!("nobody watches this rule"));
    taps.offer("readings", || crate::tap::Event::Filtered {
        topic: "sensors/a/telemetry".into(),
    });
    taps.offer("readings", || crate::tap::Event::Record {
        topic: "sensors/b/telemetry".into(),
        record: serde_json::json!({"temp": 1}).into(),
    });
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    // The watch ended with the n-th outcome.
    taps.offer("readings", || unreachable!("nobody watches any more"));
    assert!(!taps.watched());
    assert_eq!(lines[1]["kind"], "filtered");
    assert_eq!(
        lines[2],
        serde_json::json!({"kind": "record", "topic": "sensors/b/telemetry", "record": {"temp": 1}})
    );
}

/// A dead letter from the list replayed through its sink once; a second replay sends
/// nothing.
#[tokio::test]
async fn a_dead_letter_is_replayed_once() {
    let s = server(Some("t0ken")).await;
    s.state.replays.start(
        crate::eval_pool::EvalPool::start("t-replay", 1, crate::eval_pool::EVAL_TIMEOUT).unwrap(),
    );
    let dead = crate::sink::driver::DeadLetter::none();
    let _ = s.state.dead_letters.set(dead.recent());
    let d = crate::sink::Delivery::detached("sensors/d1/telemetry", serde_json::json!({"temp": 3}));
    let failure = crate::sink::driver::Failure {
        sink: Some("db"),
        kind: crate::sink::ErrorKind::Transient,
        error: "disk full",
        attempts: 5,
        first_attempt: jiff::Timestamp::now(),
    };
    dead.send(d.origin, &d.record, failure, d.ack).await;
    let (_, list) = get(&format!("{}/api/v1/dead-letters", s.base), Some("t0ken")).await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let letter = &list["dead_letters"][0];
    assert_eq!(letter["error"], "disk full");
    assert_eq!(letter["replayed_at"], serde_json::Value::Null);
    let url = format!(
        "{}/api/v1/dead-letters/{}/replay",
        s.base,
        letter["id"].as_str().unwrap()
    );
    assert_eq!(post(&url, None, None).await.0, 401);
    // Two clicks at once: one replays, the other finds it replayed.
    let (a, b) = tokio::join!(
        post(&url, Some("t0ken"), None),
        post(&url, Some("t0ken"), None)
    );
    let mut answers = [a, b];
    answers.sort();
    assert_eq!(
        answers[0],
        (200, r#"{"records":1,"replayed":true}"#.to_string())
    );
    assert_eq!(answers[1].0, 409, "{}", answers[1].1);
    let written = std::fs::read_to_string(s.dir.path().join("db.jsonl")).unwrap();
    assert_eq!(written, "{\"temp\":3}\n");
    let (code, body) = post(&url, Some("t0ken"), None).await;
    assert_eq!(code, 409, "{body}");
    let written = std::fs::read_to_string(s.dir.path().join("db.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 1, "sent once");
    let (_, list) = get(&format!("{}/api/v1/dead-letters", s.base), Some("t0ken")).await;
    assert!(!list.contains(r#""replayed_at":null"#), "{list}");
    let unknown = format!("{}/api/v1/dead-letters/abc/replay", s.base);
    assert_eq!(post(&unknown, Some("t0ken"), None).await.0, 404);
}

#[tokio::test]
async fn the_dashboard_loads_without_a_token_under_a_strict_policy() {
    let s = server(Some("t0ken")).await;
    crate::install_crypto();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client.get(format!("{}/", s.base)).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard/");
    for (path, kind, needle) in [
        ("/dashboard/", "text/html", "login-token"),
        (
            "/dashboard/app.js",
            "text/javascript",
            "/api/v1/dead-letters/",
        ),
        ("/dashboard/style.css", "text/css", ".tiles"),
    ] {
        let resp = client
            .get(format!("{}{path}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let policy = h["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));
        assert!(resp.text().await.unwrap().contains(needle), "{path}");
    }
}
