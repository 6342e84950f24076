//! `mqbridge replay`: records dead-lettered by a running bridge (PostgreSQL refusing
//! them, a webhook answering 400) sent again by the command once the cause is fixed, and
//! not again by a second replay.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::embedded;
use crate::hook_server::HookServer;
use crate::util::*;

/// Runs `mqbridge replay --config CONFIG DEAD`; (exit code, stdout).
fn replay(config: &Path, dead: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqbridge"))
        .args(["replay", "--config"])
        .arg(config)
        .arg(dead)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// Publishes to the bridge's embedded broker and waits until `lines` letters are in `dead`.
async fn publish_and_wait(port: u16, messages: &[(&str, &str)], dead: &Path, lines: usize) {
    let client = TestClient::connect(port, "replay-pub").await;
    client
        .publish_all(messages.iter().map(|(t, p)| (t.to_string(), p.to_string())))
        .await;
    eventually(Duration::from_secs(20), "the dead letters", async || {
        (dead.exists() && json_lines(dead).len() == lines).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_writes_refused_rows_once_the_constraint_is_gone() {
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE readings (device text, v int CONSTRAINT small CHECK (v < 10))",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let port = free_port();
    let rest = format!(
        r#"
sinks:
  db: {{ type: postgres, url: "{db}", table: readings }}
  dlq: {{ type: file, path: "{}" }}
rules:
  - name: readings
    from: ["dev/{{device}}"]
    transform: '{{device: .vars.device, v: .payload.v}}'
    to: [db]
dead_letter: {{ sink: dlq }}
"#,
        dead.display()
    );
    let yaml = embedded::config(port, "", &rest);
    let config = dir.path().join("bridge.yaml");
    std::fs::write(&config, &yaml).unwrap();

    let bridge = embedded::start(port, &yaml).await;
    let messages = [
        ("dev/a", r#"{"v": 1}"#),
        ("dev/b", r#"{"v": 20}"#),
        ("dev/c", r#"{"v": 30}"#),
    ];
    publish_and_wait(port, &messages, &dead, 2).await;
    let count = "SELECT count(*)::text FROM readings";
    assert_eq!(pg_count(&db, count).await, Some(1));
    bridge.stop().await.unwrap();

    // Still refused: reported, exit 1, nothing marked.
    let (code, out) = replay(&config, &dead);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("replayed 0, failed 2"), "{out}");
    assert!(out.contains("sink db: permanent"), "{out}");

    pg_exec(&db, "ALTER TABLE readings DROP CONSTRAINT small").await;
    let (code, out) = replay(&config, &dead);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("replayed 2, failed 0, skipped 0 (already replayed), filtered out 0"),
        "{out}"
    );
    let rows = pg_texts(&db, "SELECT device || '=' || v FROM readings ORDER BY v").await;
    let rows: Vec<String> = rows.into_iter().flatten().collect();
    assert_eq!(rows, ["a=1", "b=20", "c=30"]);

    let (code, out) = replay(&config, &dead);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("replayed 0, failed 0, skipped 2 (already replayed), filtered out 0"),
        "{out}"
    );
    assert_eq!(pg_count(&db, count).await, Some(3));
    assert_eq!(
        json_lines(&dead).len(),
        2,
        "the dead letters are left as they were"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_webhook_request_keeps_the_original_idempotency_key() {
    let hook = HookServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let port = free_port();
    // The receiver refuses `{"bad": true}` with 400; the fixed config sends a body
    // without it.
    let rest = |body: &str| {
        format!(
            r#"
sinks:
  hook: {{ type: webhook, url: "{}/in", timeout: 2s{body} }}
  dlq: {{ type: file, path: "{}" }}
rules:
  - name: alarms
    from: ["alarm/#"]
    to: [hook]
    transform: '.payload'
dead_letter: {{ sink: dlq }}
"#,
            hook.url(),
            dead.display()
        )
    };
    let yaml = embedded::config(port, "", &rest(""));
    let bridge = embedded::start(port, &yaml).await;
    publish_and_wait(port, &[("alarm/1", r#"{"bad": true, "n": 7}"#)], &dead, 1).await;
    bridge.stop().await.unwrap();
    let refused = hook.seen();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].status, Some(400));
    let original_key = refused[0].key.clone().expect("an Idempotency-Key");
    assert_eq!(
        original_key,
        mqbridge::message::message_id("alarm/1", br#"{"bad": true, "n": 7}"#)
    );

    let fixed = dir.path().join("fixed.yaml");
    let body = r#", body: '{"n": {{ record.n }}}'"#;
    std::fs::write(&fixed, embedded::config(port, "", &rest(body))).unwrap();
    let (code, out) = replay(&fixed, &dead);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 1, failed 0"), "{out}");
    let seen = hook.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].status, Some(200));
    assert_eq!(seen[1].json(), serde_json::json!({"n": 7}));
    assert_eq!(seen[1].key.as_deref(), Some(original_key.as_str()));

    let (code, out) = replay(&fixed, &dead);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 0, failed 0, skipped 1"), "{out}");
    assert_eq!(hook.seen().len(), 2, "a second replay sends nothing");
}
