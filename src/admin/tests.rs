//! The admin routes over a real listener on port 0, asked with a real HTTP client.

use std::sync::Arc;

use super::*;
use crate::health::Status;

struct Server {
    base: String,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(token: Option<&str>) -> Server {
    let state = Arc::new(State {
        readiness: Readiness::default(),
        token: token.map(|t| Arc::new(Token::new(t))),
        metrics: exporter::install(),
        rules: std::sync::Mutex::new(vec![RuleView {
            name: "readings".into(),
            from: vec!["sensors/{device}/telemetry".into()],
            decode: "json".into(),
            filter: false,
            transform: true,
            to: vec!["db".into()],
        }]),
        sinks: Mutex::default(),
        broker: OnceLock::new(),
        dead_letters: OnceLock::new(),
        spool: OnceLock::new(),
    });
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, Arc::clone(&state), stop.clone()));
    Server { base, state, stop }
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
