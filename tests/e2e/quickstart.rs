//! The README's quickstart as a user runs it: `mqbridge` with no arguments in a directory
//! holding `config/mqbridge.yaml`, mosquitto_pub against it, the row in `data/mqbridge.db`;
//! and the errors when the port or the spool directory is taken.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// A working directory holding the shipped quickstart config, as in a checkout.
fn checkout() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/mqbridge.yaml"),
        dir.path().join("config/mqbridge.yaml"),
    )
    .unwrap();
    dir
}

fn bridge_in(dir: &std::path::Path, port: u16) -> ChildBridge {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqbridge"));
    cmd.current_dir(dir)
        .env("MQBRIDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "MQBRIDGE_ADMIN_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env_remove("MQBRIDGE_CONFIG");
    ChildBridge::spawn(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_stores_what_mosquitto_pub_sends_and_refuses_a_taken_port() {
    let dir = checkout();
    let port = free_port();
    let bridge = bridge_in(dir.path(), port);
    bridge
        .wait_for_log("embedded broker listening", Duration::from_secs(20))
        .await;

    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            "sensors/d1/telemetry",
            "-q",
            "1",
            "-m",
            r#"{"temp": 21.5}"#,
        ])
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    assert!(status.success());
    // mosquitto_pub exits after the PUBACK, which is sent once the message is in the
    // spool; the row follows.
    let db = dir.path().join("data/mqbridge.db");
    eventually(Duration::from_secs(10), "the row", async || {
        (sqlite_count(&db, "mqbridge_messages").await >= 1).then_some(())
    })
    .await;

    // A second instance on the same port fails at once, naming the address; one in the
    // same directory (so the same spool) fails naming the spool.
    let other = checkout();
    for (dir, port, expected) in [
        (
            other.path(),
            port,
            format!("cannot listen on 127.0.0.1:{port}"),
        ),
        (
            dir.path(),
            free_port(),
            "in use by another mqbridge process".into(),
        ),
    ] {
        let mut second = bridge_in(dir, port);
        let status = second.exited(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(1));
        let log = second.log.lock().unwrap().join("\n");
        assert!(log.contains(&expected), "expected {expected:?} in {log}");
    }

    let (status, _) = bridge.terminate(Duration::from_secs(15)).await;
    assert!(status.success());
    // Stopped, the bridge writes nothing more: one row, the message.
    assert_eq!(sqlite_count(&db, "mqbridge_messages").await, 1);
    let matching = sqlite_query(
        &db,
        r#"SELECT COUNT(*) FROM mqbridge_messages WHERE topic = 'sensors/d1/telemetry' AND payload = '{"temp": 21.5}' AND qos = 1 AND received_at IS NOT NULL"#,
    )
    .await;
    assert_eq!(matching, [1]);
}
