//! The dashboard in a real browser (headless Chromium): sign in with the admin token,
//! watch the numbers move as devices publish into the embedded broker (through the
//! spool), see a record PostgreSQL refused appear as a dead letter, fix the cause and
//! replay it with the button, try a message, and tail a rule. A screenshot is saved in
//! the test's temp dir (and copied to `$MQBRIDGE_DASHBOARD_SCREENSHOT` when set).

use std::time::Duration;

use crate::util::*;

const TOKEN: &str = "dash-e2e-t0ken-51c9";

/// The text of the first element `selector` matches, as JavaScript ("" when none).
fn text(selector: &str) -> String {
    format!("((document.querySelector({selector:?}) || {{}}).textContent || '')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_bridge_and_replays_a_dead_letter() {
    mqbridge::install_crypto();
    let db = pg_fresh_database(&pg_admin_url()).await;
    pg_exec(
        &db,
        "CREATE TABLE readings (device text, v int CONSTRAINT small CHECK (v < 10))",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mqtt_port, admin_port) = (free_port(), free_port());
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
embedded:
  listen: 127.0.0.1:{mqtt_port}
  allow_anonymous: true
spool: {{ path: "{spool}", max_bytes: 16MiB }}
sinks:
  db: {{ type: postgres, url: "{db}", table: readings }}
  dlq: {{ type: file, path: "{dead}" }}
rules:
  - name: readings
    from: ["dev/{{device}}"]
    transform: '{{device: .vars.device, v: .payload.v}}'
    to: [db]
dead_letter: {{ sink: dlq }}
admin:
  listen: 127.0.0.1:{admin_port}
  token: {TOKEN}
"#,
            dead = dir.path().join("dead.jsonl").display(),
            spool = dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    let bridge = ChildBridge::start(&config);
    bridge
        .wait_for_log("admin server listening", Duration::from_secs(20))
        .await;
    let base = format!("http://127.0.0.1:{admin_port}");
    admin_ready(&base).await;

    let mut browser = Browser::start(dir.path()).await;
    browser.open(&format!("{base}/")).await;
    // Signing in: a wrong token is refused, the right one opens the overview.
    browser
        .wait_for(
            "!document.getElementById('login').hidden",
            "the sign-in form",
        )
        .await;
    let sign_in = |token: &str| {
        format!(
            "document.getElementById('login-token').value = {token:?}; \
             document.getElementById('login-button').click(); true"
        )
    };
    browser.eval(&sign_in("not-the-token")).await;
    browser
        .wait_for(
            &format!("{}.includes('refused')", text("#login-error")),
            "the refusal",
        )
        .await;
    browser.eval(&sign_in(TOKEN)).await;
    browser
        .wait_for("!document.getElementById('main').hidden", "the overview")
        .await;
    let matched = text("#rules tr[data-rule='readings'] td.matched");
    let written = text("#sinks tr[data-sink='db'] td.written");
    browser
        .wait_for(&format!("{matched} === '0'"), "the rule's row")
        .await;

    // Devices publish: 20 readings the table takes, one its constraint refuses.
    let device = TestClient::connect(mqtt_port, "dash-device").await;
    let mut messages: Vec<(String, String)> = (0..20)
        .map(|i| (format!("dev/d{i}"), format!(r#"{{"v": {}}}"#, i % 10)))
        .collect();
    messages.push(("dev/hot".into(), r#"{"v": 42}"#.into()));
    device.publish_all(messages).await;
    browser
        .wait_for(&format!("{matched} === '21'"), "21 messages matched")
        .await;
    browser
        .wait_for(&format!("{written} === '20'"), "20 records written")
        .await;
    let letter = "#dead-letters tr td.reason";
    let reason = browser
        .wait_for(&text(letter), "the dead letter in the list")
        .await;
    assert!(
        reason.as_str().unwrap().contains("small"),
        "the reason names the constraint: {reason}"
    );
    assert_eq!(
        browser.eval(&text("#dead-letters tr td.topic")).await,
        "dev/hot"
    );
    let legend = browser.eval(&text("#legend-rules")).await;
    assert_eq!(legend, "readings", "the rules chart has the rule's series");

    // Replayed before the cause is fixed: refused again, the button stays.
    browser
        .eval("document.querySelector('#dead-letters button.replay').click(); true")
        .await;
    browser
        .wait_for(
            &format!("{}.startsWith('Not replayed')", text("#replay-result")),
            "the refusal",
        )
        .await;
    pg_exec(&db, "ALTER TABLE readings DROP CONSTRAINT small").await;
    browser
        .wait_for(
            "(document.querySelector('#dead-letters button.replay') || {}).disabled === false",
            "the replay button",
        )
        .await;
    browser
        .eval("document.querySelector('#dead-letters button.replay').click(); true")
        .await;
    browser
        .wait_for(
            &format!(
                "{} === 'Replayed: 1 record(s) written.'",
                text("#replay-result")
            ),
            "the replay",
        )
        .await;
    browser
        .wait_for(
            &format!(
                "{}.startsWith('replayed ')",
                text("#dead-letters .replayed")
            ),
            "the letter marked replayed",
        )
        .await;
    assert_eq!(
        pg_texts(&db, "SELECT v::text FROM readings WHERE device = 'hot'").await,
        [Some("42".to_string())]
    );

    // Try a message: the record and what the sink would do; nothing is written.
    browser
        .eval(
            "document.getElementById('try-topic').value = 'dev/probe'; \
             document.getElementById('try-payload').value = '{\"v\": 3}'; \
             document.getElementById('try-button').click(); true",
        )
        .await;
    let tried = browser
        .wait_for(
            &format!("{}.includes('-> db:')", text("#try-output")),
            "the try",
        )
        .await;
    assert_eq!(tried, true);
    let out = browser.eval(&text("#try-output")).await;
    assert!(
        out.as_str()
            .unwrap()
            .contains(r#"record {"device":"probe","v":3}"#),
        "{out}"
    );

    // Tail the rule for its next two outcomes.
    browser
        .eval(
            "document.getElementById('tail-n').value = '2'; \
             document.getElementById('tail-button').click(); true",
        )
        .await;
    browser
        .wait_for(
            &format!(
                "{}.includes('watching rule readings')",
                text("#tail-output")
            ),
            "the tail to start",
        )
        .await;
    device
        .publish_all([
            ("dev/t1".to_string(), r#"{"v": 1}"#.to_string()),
            ("dev/t2".to_string(), r#"{"v": 2}"#.to_string()),
        ])
        .await;
    browser
        .wait_for(
            &format!("{}.includes('done.')", text("#tail-output")),
            "the tail",
        )
        .await;
    let tail = browser.eval(&text("#tail-output")).await;
    let tail = tail.as_str().unwrap();
    assert!(
        tail.contains(r#"1. dev/t1  {"device":"t1","v":1}"#)
            && tail.contains(r#"2. dev/t2  {"device":"t2","v":2}"#),
        "{tail}"
    );
    browser
        .wait_for(&format!("{written} === '22'"), "the counts to move on")
        .await;
    browser
        .wait_for(
            &format!(
                "{}.startsWith('Spool: 0 records waiting, ')",
                text("#spool")
            ),
            "the spool, all settled",
        )
        .await;

    let shot = dir.path().join("dashboard.png");
    browser.screenshot(&shot).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "a screenshot of the page ({} bytes)",
        png.len()
    );
    if let Some(keep) = std::env::var_os("MQBRIDGE_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    drop(browser);
    let (status, _) = bridge.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}
