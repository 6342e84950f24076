//! Session expiry and delayed wills ([`crate::broker::timers`]) through real connections:
//! when a will goes out, what a reconnect cancels, when a session ends, what a shutdown
//! does with them, and that disconnects cost no task.
//!
//! Most run on tokio's paused clock: time moves only when every task waits, straight to
//! the next deadline, so "published after 5 s" is measured exactly, without waiting.

use std::time::Duration;

use tokio::time::Instant;

use super::{Client, Got, Hello, TestBroker, broker, until};
use crate::broker::codec::Version;

/// A will on "will/c" with a delay, in a session that outlives its connection.
fn with_will(client_id: &str, will_delay: u32, session_expiry: u32) -> Hello<'_> {
    Hello {
        will: Some("will/c"),
        will_delay: Some(will_delay),
        session_expiry: Some(session_expiry),
        persistent: true,
        ..Hello::new(client_id)
    }
}

/// The connection was taken over: told so (MQTT 5: DISCONNECT 0x8E), then closed.
async fn taken_over(mut c: Client) {
    if c.version == Version::V5 {
        assert_eq!(c.recv().await, Got::Disconnect { reason: 0x8E });
    }
    c.closed().await;
}

/// Sessions the broker holds, connected or not.
fn sessions(b: &TestBroker) -> usize {
    b.handle().stats().sessions
}

/// Connects `hello`, and says whether the CONNACK found a session.
async fn session_present(b: &TestBroker, hello: Hello<'_>) -> (Client, bool) {
    let mut c = b.open(Version::V5);
    c.send(&hello.bytes(Version::V5)).await;
    match c.recv().await {
        Got::ConnAck {
            session_present,
            code: 0,
        } => (c, session_present),
        other => panic!("a CONNACK accepting the client, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_delayed_will_goes_out_after_its_delay_and_a_reconnect_before_cancels_it() {
    let mut b = broker("").await;
    let hello = with_will("c", 5, 100);

    b.connect(Version::V5, hello).await.lose().await;
    let lost = Instant::now();
    b.no_message();
    assert_eq!(
        b.shared.timers.len(),
        1,
        "one entry for the offline session"
    );
    let will = b.message().await;
    assert_eq!(&*will.topic, "will/c");
    let waited = lost.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5100),
        "published {waited:?} after the connection was lost"
    );
    // [MQTT-3.1.2-10]: published, it is gone from the session; the session's expiry
    // still waits.
    assert!(b.shared.lock().sessions["c"].will.is_none());
    assert_eq!(b.shared.timers.len(), 1);

    // [MQTT-3.1.3-9]: a new connection to the session before the delay has passed.
    b.connect(Version::V5, hello).await.lose().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (c, present) = session_present(&b, hello).await;
    assert!(present, "resumed");
    assert!(
        b.shared.timers.is_empty(),
        "nothing pending while connected"
    );
    // Long past the first deadline: nothing was published.
    tokio::time::sleep(Duration::from_secs(60)).await;
    b.no_message();
    drop(c);
}

/// [MQTT-3.1.2-4] with §3.1.3.2.2: a clean start ends the session, and a will pending in
/// it goes out at once; so does a session expiry of 0 at the disconnect.
#[tokio::test(start_paused = true)]
async fn a_will_goes_out_at_once_when_its_session_ends() {
    let mut b = broker("").await;
    let hello = with_will("c", 30, 100);
    b.connect(Version::V5, hello).await.lose().await;
    b.no_message();
    let started = Instant::now();
    let clean = Hello {
        persistent: false,
        session_expiry: None,
        ..hello
    };
    let (c, present) = session_present(&b, clean).await;
    assert!(!present);
    assert_eq!(&*b.message().await.topic, "will/c");
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    c.lose().await;
    assert_eq!(
        &*b.message().await.topic,
        "will/c",
        "expiry 0: at the disconnect"
    );
    assert_eq!(sessions(&b), 0);
    assert!(b.shared.timers.is_empty());
}

/// §3.1.3.2.2: the will is published when its delay has passed or the session ends,
/// whichever comes first; the session ends after its expiry, and a later reconnect finds
/// none.
#[tokio::test(start_paused = true)]
async fn a_will_delay_longer_than_the_session_expiry_goes_out_when_the_session_ends() {
    let mut b = broker("").await;
    let hello = with_will("c", 50, 5);
    b.connect(Version::V5, hello).await.lose().await;
    let lost = Instant::now();
    assert_eq!(&*b.message().await.topic, "will/c");
    let waited = lost.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5100),
        "published {waited:?} after the connection was lost"
    );
    assert_eq!(sessions(&b), 0, "the session ended with it");
    assert!(b.shared.timers.is_empty());
    let (_c, present) = session_present(&b, hello).await;
    assert!(!present, "session_present 0 after the expiry");
}

/// [MQTT-3.1.2-23]: a session outlives its connection for its expiry; a reconnect before
/// it has passed finds the session, and the expiry counts again from the next disconnect.
#[tokio::test(start_paused = true)]
async fn an_offline_session_expires_unless_the_client_comes_back_before() {
    let b = broker("").await;
    let hello = Hello {
        session_expiry: Some(5),
        persistent: true,
        ..Hello::new("c")
    };
    b.connect(Version::V5, hello).await.lose().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (c, present) = session_present(&b, hello).await;
    assert!(present, "back before the expiry");
    c.lose().await;
    let lost = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        sessions(&b),
        1,
        "5 s from the last disconnect, not the first"
    );
    until("the session expired", || sessions(&b) == 0).await;
    let waited = lost.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5100),
        "expired {waited:?} after the disconnect"
    );
    let (_c, present) = session_present(&b, hello).await;
    assert!(!present);
}

/// §3.1.4 with [MQTT-3.1.3-9]: taking a session over from a live connection publishes
/// that connection's will only when the new one ends the session (clean start).
#[tokio::test]
async fn a_takeover_publishes_the_old_will_only_when_it_ends_the_session() {
    let mut b = broker("").await;
    for version in [Version::V311, Version::V5] {
        let hello = Hello {
            will: Some("will/c"),
            persistent: true,
            session_expiry: (version == Version::V5).then_some(100),
            ..Hello::new("c")
        };
        let old = b.connect(version, hello).await;
        let mut new = b.connect(version, hello).await;
        taken_over(old).await;
        new.ping().await;
        b.no_message();
        let clean = Hello {
            persistent: false,
            ..hello
        };
        let mut newest = b.connect(version, clean).await;
        taken_over(new).await;
        assert_eq!(&*b.message().await.topic, "will/c", "{version:?}");
        // A normal DISCONNECT: no will.
        newest.send(&[0xE0, 0]).await;
        newest.closed().await;
    }
}

/// Shutdown without persistence: every session ends with the process, so a will waiting
/// for its delay goes out at `stop` (to the rules too), and the timer task ends.
#[tokio::test(start_paused = true)]
async fn stopping_without_persistence_publishes_the_pending_wills_and_ends_the_timers() {
    let mut b = broker("").await;
    b.connect(Version::V5, with_will("c", 3600, 7200))
        .await
        .lose()
        .await;
    b.no_message();
    b.stop.cancel();
    assert_eq!(&*b.message().await.topic, "will/c");
    tokio::time::timeout(Duration::from_secs(1), &mut b.timers)
        .await
        .expect("the timer task ends at stop")
        .unwrap();
}

/// Shutdown: a connected client did not go away, mqbridge did: its will is not published.
#[tokio::test]
async fn the_wills_of_connected_clients_are_not_published_at_shutdown() {
    let mut b = broker("").await;
    let mut c = b.connect(Version::V5, with_will("c", 0, 100)).await;
    b.stop.cancel();
    b.done.cancel();
    assert_eq!(c.recv().await, Got::Disconnect { reason: 0x8B });
    c.closed().await;
    b.no_message();
}

/// Shutdown with persistence: a will waiting for its delay is saved with its session and
/// published after the restart, its delay counted from the restart (as the expiry is).
#[tokio::test(start_paused = true)]
async fn a_pending_will_survives_a_restart_with_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let settings = format!(
        "  persistence: {{ path: {} }}",
        dir.path().join("broker.db").display()
    );
    let mut b = broker(&settings).await;
    b.connect(Version::V5, with_will("c", 5, 100))
        .await
        .lose()
        .await;
    b.stop.cancel();
    (&mut b.timers).await.unwrap();
    b.no_message();
    // The last flush, as `serve` makes it once every connection has ended.
    let mut store = b.shared.store.lock().unwrap().take().expect("a store");
    let changes = store.take_changes(&mut b.shared.lock());
    store.write(changes).await;
    drop((store, b));

    let mut b = broker(&settings).await;
    let restarted = Instant::now();
    assert_eq!(sessions(&b), 1);
    assert_eq!(&*b.message().await.topic, "will/c");
    let waited = restarted.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_millis(5100),
        "published {waited:?} after the restart"
    );
    // And a client back in time after a restart cancels it.
    let mut store = b.shared.store.lock().unwrap().take().expect("a store");
    b.connect(Version::V5, with_will("d", 5, 100))
        .await
        .lose()
        .await;
    let changes = store.take_changes(&mut b.shared.lock());
    store.write(changes).await;
    b.stop.cancel();
    drop((store, b));
    let mut b = broker(&settings).await;
    assert!(b.shared.lock().sessions["d"].will.is_some(), "restored");
    let (_d, present) = session_present(&b, with_will("d", 5, 100)).await;
    assert!(present);
    tokio::time::sleep(Duration::from_secs(10)).await;
    b.no_message();
}

/// Disconnects cost one timer entry each and no task: the tasks alive after a thousand
/// clients connected with a will delay and a session expiry and dropped are those alive
/// before (the timer task among them). With 10,000 clients, and the task per deadline
/// this replaced, it was 20,000 tasks more.
#[tokio::test(flavor = "current_thread")]
async fn disconnects_cost_a_timer_entry_each_and_no_task() {
    const CLIENTS: usize = 1000;
    let b = broker("").await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for i in 0..CLIENTS {
        let id = format!("dev-{i}");
        b.connect(Version::V5, with_will(&id, 3600, 7200))
            .await
            .lose()
            .await;
    }
    assert_eq!(metrics.num_alive_tasks(), before);
    assert_eq!(b.shared.timers.len(), CLIENTS);
    assert_eq!(sessions(&b), CLIENTS);
    // A reconnect takes its entry away.
    let (_c, present) = session_present(&b, with_will("dev-0", 3600, 7200)).await;
    assert!(present);
    assert_eq!(b.shared.timers.len(), CLIENTS - 1);
}
