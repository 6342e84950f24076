//! Replay against real sinks (SQLite files, a file sink): letters made by the driver's
//! own `dead_letter_record`, replayed, marked and skipped.

use std::path::Path;

use serde_json::json;
use sqlx::Connection as _;

use super::letter::tests::letter_line;
use super::*;
use crate::eval_pool::EVAL_TIMEOUT;

fn replayer(yaml: &str) -> Replayer {
    let plan = crate::config::parse(yaml, "test.yaml", |_| None).unwrap_or_else(|e| panic!("{e}"));
    let eval = EvalPool::start("replay-test", 1, EVAL_TIMEOUT).unwrap();
    Replayer::new(Arc::new(plan), eval)
}

fn config(db: &Path, decode: &str) -> String {
    format!(
        r#"
sinks:
  db: {{ type: sqlite, path: "{}", table: t }}
  other: {{ type: sqlite, path: "{}", table: t }}
rules:
  - name: r
    from: ["dev/{{device}}"]
    decode: {decode}
    transform: '{{device: .vars.device, v: (.payload | if type == "string" then length else .v end)}}'
    to: [db]
"#,
        db.display(),
        db.display()
    )
}

async fn sql(db: &Path, statements: &str) {
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
}

async fn rows(db: &Path) -> Vec<(String, i64)> {
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_as("SELECT device, v FROM t ORDER BY v")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

fn write_letters(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn sink_letters_are_written_once_the_cause_is_fixed_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    sql(
        &db,
        "CREATE TABLE t (device TEXT, v INTEGER CHECK (v < 10))",
    )
    .await;
    let dead = dir.path().join("dead.jsonl");
    let letters = [
        letter_line(
            "dev/a",
            b"{\"v\": 20}",
            Some("db"),
            json!({"device": "a", "v": 20}),
        ),
        letter_line(
            "dev/b",
            b"{\"v\": 30}",
            Some("db"),
            json!({"device": "b", "v": 30}),
        ),
    ];
    write_letters(&dead, &letters);
    let r = replayer(&config(&db, "json"));

    // The cause is still there: a permanent failure, reported and not marked.
    let s = replay_file(&r, &dead, &Filter::default()).await.unwrap();
    assert_eq!((s.replayed, s.failed.len(), s.skipped), (0, 2, 0), "{s:?}");
    assert!(s.failed[0].reason.contains("sink db: permanent"), "{s:?}");
    assert_eq!(s.failed[0].line, 1);
    assert!(!sidecar::path_for(&dead).exists());

    sql(&db, "DROP TABLE t; CREATE TABLE t (device TEXT, v INTEGER)").await;
    let s = replay_file(&r, &dead, &Filter::default()).await.unwrap();
    assert_eq!(
        s.to_string(),
        "replayed 2, failed 0, skipped 0 (already replayed), filtered out 0"
    );
    assert_eq!(rows(&db).await, [("a".into(), 20), ("b".into(), 30)]);

    let s = replay_file(&r, &dead, &Filter::default()).await.unwrap();
    assert_eq!(
        s.to_string(),
        "replayed 0, failed 0, skipped 2 (already replayed), filtered out 0"
    );
    assert_eq!(rows(&db).await.len(), 2);
    // The letters' file is only read.
    let text: String = letters.iter().map(|l| format!("{l}\n")).collect();
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), text);
}

#[tokio::test]
async fn a_rule_failure_goes_through_the_fixed_rule() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    sql(&db, "CREATE TABLE t (device TEXT, v INTEGER)").await;
    let dead = dir.path().join("dead.jsonl");
    // Not JSON: `decode: json` failed it.
    write_letters(
        &dead,
        &[letter_line(
            "dev/x",
            b"hello",
            None,
            serde_json::Value::Null,
        )],
    );

    let s = replay_file(&replayer(&config(&db, "json")), &dead, &Filter::default())
        .await
        .unwrap();
    assert_eq!(s.failed.len(), 1, "{s:?}");
    assert!(
        s.failed[0].reason.contains("rule r: decode failed"),
        "{s:?}"
    );

    let r = replayer(&config(&db, "text"));
    let s = replay_file(&r, &dead, &Filter::default()).await.unwrap();
    assert_eq!((s.replayed, s.failed.len()), (1, 0), "{s:?}");
    // The rule ran with the topic's captures and the payload as it was.
    assert_eq!(rows(&db).await, [("x".into(), 5)]);
}

#[tokio::test]
async fn letters_for_what_is_gone_fail_and_stay() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    let dead = dir.path().join("dead.jsonl");
    let mut gone_rule = letter_line("dev/y", b"{}", None, serde_json::Value::Null);
    gone_rule = gone_rule.replace("\"rule\":\"r\"", "\"rule\":\"old\"");
    write_letters(
        &dead,
        &[
            letter_line("dev/a", b"{}", Some("gone"), json!({})),
            gone_rule,
            "{\"not\": \"a letter\"}".into(),
        ],
    );
    let s = replay_file(&replayer(&config(&db, "json")), &dead, &Filter::default())
        .await
        .unwrap();
    let reasons: Vec<&str> = s.failed.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(s.failed.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("sink \"gone\" is not in the config"));
    assert!(reasons[1].contains("rule \"old\" is not in the config"));
    assert!(reasons[2].starts_with("not a dead letter"));
    assert_eq!(s.failed[2].line, 3);
}

#[tokio::test]
async fn filters_pick_by_sink_rule_and_time() {
    let a = Letter::parse(&letter_line("dev/a", b"{}", Some("db"), json!({}))).unwrap();
    let b = Letter::parse(&letter_line("dev/b", b"x", None, serde_json::Value::Null)).unwrap();
    let all = Filter::default();
    assert!(all.admits(&a) && all.admits(&b));

    let db = Filter {
        sink: Some("db".into()),
        ..Filter::default()
    };
    assert!(db.admits(&a) && !db.admits(&b));

    let other_rule = Filter {
        rule: Some("q".into()),
        ..Filter::default()
    };
    assert!(!other_rule.admits(&a));
    let rule = Filter {
        rule: Some("r".into()),
        ..Filter::default()
    };
    assert!(rule.admits(&a) && rule.admits(&b));

    let since = |t: jiff::Timestamp| Filter {
        since: Some(t),
        ..Filter::default()
    };
    assert!(since(a.last_attempt_at).admits(&a));
    let later = a.last_attempt_at + jiff::SignedDuration::from_millis(1);
    assert!(!since(later).admits(&a));
}

#[tokio::test]
async fn filtered_letters_are_counted_and_not_marked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    sql(&db, "CREATE TABLE t (device TEXT, v INTEGER)").await;
    let dead = dir.path().join("dead.jsonl");
    write_letters(
        &dead,
        &[
            letter_line("dev/a", b"{}", Some("db"), json!({"device": "a", "v": 1})),
            letter_line(
                "dev/b",
                b"{}",
                Some("other"),
                json!({"device": "b", "v": 2}),
            ),
        ],
    );
    // And a letter being appended as we read: left alone.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&dead)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"topic\":").unwrap();
    let r = replayer(&config(&db, "json"));
    let only_other = Filter {
        sink: Some("other".into()),
        ..Filter::default()
    };
    let s = replay_file(&r, &dead, &only_other).await.unwrap();
    assert_eq!(
        (s.replayed, s.filtered_out, s.failed.len()),
        (1, 1, 0),
        "{s:?}"
    );
    assert!(s.incomplete_tail);
    assert_eq!(rows(&db).await, [("b".into(), 2)]);

    let s = replay_file(&r, &dead, &Filter::default()).await.unwrap();
    assert_eq!((s.replayed, s.skipped), (1, 1), "{s:?}");
    assert_eq!(rows(&db).await.len(), 2);
}
