//! The spool against a broker that drops: Mosquitto with its default queue limit
//! (`max_queued_messages` 1000) discards what a stalled subscriber cannot take. Without a
//! spool a long sink outage therefore loses messages (at the broker, before mqbridge ever
//! sees them); with the spool mqbridge keeps acknowledging into local disk and loses
//! nothing. Also: SIGKILL with a backlog in the spool loses nothing.

use std::time::Duration;

use crate::util::*;

/// Each scenario's world: Mosquitto (with its default queue limit, except for the SIGTERM
/// scenario), a PostgreSQL of its own (to stop and start) holding the [`NUMBERED_TABLES`], and a bridge config between
/// them, with or without a spool.
struct Setup {
    broker: Mosquitto,
    pg: Postgres,
    db: String,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Builds the world and starts a bridge, returned once it has subscribed. `broker` is
    /// Mosquitto with its default limits (it drops beyond 1,000 queued messages a
    /// session) or one that queues deeply.
    async fn start(spool: bool, broker: Mosquitto) -> (Setup, ChildBridge) {
        let pg = Postgres::start();
        let db = pg_fresh_database(&pg.url()).await;
        pg_exec(&db, NUMBERED_TABLES).await;
        let dir = tempfile::tempdir().unwrap();
        let spool = if spool {
            format!(
                "spool: {{ path: {}, max_bytes: 256MiB }}",
                dir.path().join("spool").display()
            )
        } else {
            String::new()
        };
        let source = format!(
            "broker: {{ url: \"mqtt://127.0.0.1:{}\", client_id: spooled, protocol: 5 }}\n{spool}",
            broker.port
        );
        let path = numbered_bridge(dir.path(), &source, &db, "outage");
        let bridge = ChildBridge::start_subscribed(&path).await;
        let setup = Setup {
            broker,
            pg,
            db,
            path,
            _dir: dir,
        };
        (setup, bridge)
    }
}

/// Publishers of the numbered messages, each on a topic of its own (`outage/p{k}`).
const PUBLISHERS: i64 = 4;

/// Publishes `n` numbered QoS 1 messages from [`PUBLISHERS`] publishers at about `rate`
/// per second.
async fn publish_paced(port: u16, n: i64, rate: i64) {
    let over = Duration::from_secs_f64(n as f64 / rate as f64);
    publish_numbered(port, "outage-pub", PUBLISHERS, n, over, |p, _| {
        format!("outage/p{p}")
    })
    .await;
}

/// Issue 5: a sink outage against a default-configured Mosquitto loses nothing with the
/// spool. The short form holds the database down for 8 s under 1,000 msg/s; with
/// `MQBRIDGE_LONG_TESTS=1` for 10 minutes under 200 msg/s (120,000 messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sink_outage_against_a_default_mosquitto_loses_nothing() {
    let (outage, rate) = if long_tests() {
        (Duration::from_secs(600), 200)
    } else {
        (Duration::from_secs(8), 1000)
    };
    let n = outage.as_secs() as i64 * rate;
    let (s, bridge) = Setup::start(true, Mosquitto::start_default_limits().await).await;
    s.pg.stop("fast");
    publish_paced(s.broker.port, n, rate).await;
    s.pg.start_again();
    assert_numbered_stored_once(&s.db, n, Duration::from_secs(300)).await;
    drop(bridge);
}

/// The same outage without the spool: the broker drops what it cannot queue. This is why
/// the spool exists (and proves the scenario above really overflows the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_spool_a_default_mosquitto_drops_the_backlog() {
    const N: i64 = 4000;
    let (s, bridge) = Setup::start(false, Mosquitto::start_default_limits().await).await;
    s.pg.stop("fast");
    publish_paced(s.broker.port, N, 2000).await;
    s.pg.start_again();
    // What the broker kept (its queue plus the window in flight to mqbridge) arrives.
    // It delivers in order and mqbridge stores each topic in order, so once a sentinel
    // published now is stored on every topic, so is all of that. The broker may drop a
    // sentinel too: they are published until stored.
    let publisher = TestClient::connect(s.broker.port, "outage-sentinels").await;
    eventually(
        Duration::from_secs(60),
        "a sentinel stored on every topic",
        async || {
            let sentinels = (0..PUBLISHERS)
                .map(|p| (format!("outage/p{p}"), format!(r#"{{"seq": {}}}"#, -1 - p)));
            publisher.publish_all(sentinels).await;
            let sql = "SELECT count(*)::text FROM keyed WHERE seq < 0";
            (pg_count(&s.db, sql).await? == PUBLISHERS).then_some(())
        },
    )
    .await;
    let stored = pg_count(&s.db, "SELECT count(*)::text FROM keyed WHERE seq >= 0")
        .await
        .unwrap();
    println!(
        "without spool: sent {N} / stored {stored} / lost {}",
        N - stored
    );
    assert!(
        stored < N - 1000,
        "the broker was expected to drop most of the backlog (stored {stored} of {N})"
    );
    drop(bridge);
}

/// SIGKILL while the spool holds a backlog the sink has not taken: the acknowledged
/// messages are on disk, and the next run delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_backlog_in_the_spool_loses_nothing() {
    const N: i64 = 5000;
    // A deeply queueing broker: the subject is the spool's backlog across a kill. (With
    // Mosquitto's default limit, a machine too busy for mqbridge to keep up with 5,000
    // messages a second let the broker's queue pass 1,000, and the broker dropped some.)
    let (s, bridge) = Setup::start(true, Mosquitto::start().await).await;
    s.pg.stop("fast");
    // mqbridge acknowledges into its spool as fast as it can take messages; the kill
    // finds the backlog in the spool (the restart's log says so).
    publish_paced(s.broker.port, N, 5000).await;
    bridge.kill9();
    s.pg.start_again();
    let bridge = ChildBridge::start(&s.path);
    bridge
        .wait_for_log("spool: resuming a backlog", Duration::from_secs(20))
        .await;
    assert_numbered_stored_once(&s.db, N, Duration::from_secs(120)).await;
    drop(bridge);
}

/// Issue 5's SIGTERM scenario with the spool (the shipped configs have one): a graceful
/// stop while 4 publishers are sending exits within `shutdown_timeout`, and the next run
/// stores everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_exits_in_time_and_loses_nothing() {
    const N: i64 = 10_000;
    // Publishing goes on while mqbridge stops and starts again; the broker holds what
    // arrives meanwhile. With Mosquitto's default limit (1,000 queued a session, half a
    // second at this rate) a slow restart on a busy machine would lose messages at the
    // broker, which says nothing about mqbridge: this broker queues deeply.
    let (s, bridge) = Setup::start(true, Mosquitto::start().await).await;
    let stopper = async {
        // A random moment in the middle of the 5 s of publishing.
        tokio::time::sleep(Duration::from_millis(1500 + rand::random::<u64>() % 2000)).await;
        let (status, took) = bridge.terminate(Duration::from_secs(20)).await;
        println!("SIGTERM during load: exit {status:?} after {took:?}");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            took < Duration::from_secs(10),
            "took {took:?} (shutdown_timeout 10s)"
        );
        ChildBridge::start(&s.path)
    };
    let (_, bridge) = tokio::join!(publish_paced(s.broker.port, N, 2000), stopper);
    assert_numbered_stored_once(&s.db, N, Duration::from_secs(120)).await;
    drop(bridge);
}
