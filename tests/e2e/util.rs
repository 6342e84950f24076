//! Real services for the tests: a throwaway Mosquitto per test on a free loopback port
//! (and InfluxDB, [`Influx`], nats-server, [`NatsServer`], MariaDB, [`Mariadb`], and
//! Tansu, [`Tansu`], for their sinks), an MQTT test client, mqbridge itself (in-process
//! or as a child process), and polling with deadlines instead of sleeps.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

mod browser;
mod influx;
#[cfg(feature = "kafka")]
mod kafka;
mod mariadb;
#[cfg(feature = "nats")]
mod nats;
mod numbered;
mod on_demand;
pub use browser::Browser;
pub use influx::Influx;
#[cfg(feature = "kafka")]
pub use kafka::{Received, Tansu};
pub use mariadb::{Mariadb, my_count, my_exec, my_texts};
#[cfg(feature = "nats")]
pub use nats::NatsServer;
pub use numbered::*;
pub use on_demand::{OnDemand, tables_on_demand};

/// Waits until something accepts connections on loopback `port` (`what` names it when it
/// does not within 20 s).
pub async fn wait_listening(port: u16, what: &str) {
    eventually(Duration::from_secs(20), what, async || {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// Polls `check` until it returns Some or `timeout` passes.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    within(timeout, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `check` until it returns Some, or None once `timeout` passed (for a caller that
/// reports what it found before failing).
pub async fn within<T>(timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the admin server at `base` (`http://host:port`) answers `/readyz` with
/// 200; returns that answer's body.
pub async fn admin_ready(base: &str) -> String {
    mqbridge::install_crypto();
    eventually(Duration::from_secs(20), "/readyz 200", async || {
        let resp = reqwest::get(format!("{base}/readyz")).await.ok()?;
        if resp.status() != 200 {
            return None;
        }
        resp.text().await.ok()
    })
    .await
}

/// Publishes a probe message until `stored` says it arrived: the bridge has connected
/// and subscribed (its subscription is made asynchronously after start).
pub async fn probe_until(
    publisher: &TestClient,
    topic: &str,
    payload: &str,
    mut stored: impl AsyncFnMut() -> bool,
) {
    eventually(
        Duration::from_secs(20),
        "the bridge to subscribe",
        async || {
            publisher
                .publish_all([(topic.to_string(), payload.to_string())])
                .await;
            stored().await.then_some(())
        },
    )
    .await
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOSQUITTO") {
        return p.into();
    }
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "mosquitto not found: install it (apt-get install mosquitto) or run the tests through scripts/test.sh"
    );
}

/// Messages Mosquitto queues per session (QoS 1/2, beyond the in-flight window) in the
/// test brokers; Mosquitto's own default of 1000 drops a sink outage's backlog
/// (docs/guarantees.md §1).
const MAX_QUEUED: usize = 100_000;

/// A Mosquitto broker in a temp dir, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    conf: PathBuf,
    pub dir: tempfile::TempDir,
}

/// A plain listener on loopback, anonymous clients allowed.
fn loopback_listener(_: &Path, port: u16) -> String {
    format!("listener {port} 127.0.0.1\nallow_anonymous true\n")
}

impl Mosquitto {
    pub async fn start() -> Mosquitto {
        Self::start_queueing(MAX_QUEUED).await
    }

    /// Starts a broker that queues up to `max_queued` messages per session (for
    /// backlogs larger than the default 100,000).
    pub async fn start_queueing(max_queued: usize) -> Mosquitto {
        Self::start_configured(
            |_| format!("persistence false\nmax_queued_messages {max_queued}\n"),
            loopback_listener,
        )
        .await
    }

    /// Starts a broker configured with the listener sections `listeners(dir, port)`
    /// returns; `port` is the one the broker is waited on and tests connect to.
    pub async fn start_with(listeners: impl FnOnce(&Path, u16) -> String) -> Mosquitto {
        Self::start_configured(
            |_| format!("persistence false\nmax_queued_messages {MAX_QUEUED}\n"),
            listeners,
        )
        .await
    }

    /// A broker that writes its sessions (subscriptions, queued and unacknowledged
    /// messages) to `dir/mosquitto.db` when it stops gracefully and reads them back when it
    /// starts, so [`Mosquitto::restart_gracefully`] keeps them.
    pub async fn start_persistent() -> Mosquitto {
        Self::start_configured(
            |dir| {
                format!(
                    "persistence true\npersistence_location {}/\nmax_queued_messages {MAX_QUEUED}\n",
                    dir.display()
                )
            },
            loopback_listener,
        )
        .await
    }

    /// A broker with Mosquitto's own queue limits (`max_queued_messages` 1000, which
    /// drops messages to a subscriber that falls further behind).
    pub async fn start_default_limits() -> Mosquitto {
        Self::start_configured(|_| "persistence false\n".to_string(), loopback_listener).await
    }

    /// A broker that ignores flow control: no limit on the QoS 1/2 messages in flight to a
    /// client (`max_inflight_messages 0`), as Mosquitto 2.0 behaves towards a resumed
    /// session whatever its receive maximum; a backlog floods the connection.
    pub async fn start_flooding() -> Mosquitto {
        Self::start_configured(
            |_| {
                format!(
                    "persistence false\nmax_queued_messages {MAX_QUEUED}\nmax_inflight_messages 0\n"
                )
            },
            loopback_listener,
        )
        .await
    }

    /// `settings(dir)` gives the broker-wide lines (persistence, queue limits).
    async fn start_configured(
        settings: impl FnOnce(&Path) -> String,
        listeners: impl FnOnce(&Path, u16) -> String,
    ) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\n{}log_dest stderr\nlog_type error\n{}",
                settings(dir.path()),
                listeners(dir.path(), port)
            ),
        )
        .unwrap();
        let child = Self::spawn(&conf);
        let broker = Mosquitto {
            port,
            child,
            conf,
            dir,
        };
        broker.wait_listening().await;
        broker
    }

    fn spawn(conf: &Path) -> Child {
        Command::new(mosquitto_bin())
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto")
    }

    async fn wait_listening(&self) {
        wait_listening(self.port, "mosquitto to listen").await;
    }

    /// Kills the broker (losing every session: persistence is off) and starts it again
    /// on the same port.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.conf);
        self.wait_listening().await;
    }

    /// Stops the broker with SIGTERM (a persistent one saves its state then), waits until
    /// it exited, and starts it again on the same port with the same data directory.
    pub async fn restart_gracefully(&mut self) {
        self.stop_gracefully().await;
        self.start_again().await;
    }

    /// Stops the broker with SIGTERM (a persistent one saves its state then) and waits
    /// until it exited; [`Mosquitto::start_again`] brings it back.
    pub async fn stop_gracefully(&mut self) {
        signal(&self.child, "TERM");
        let child = &mut self.child;
        let status = eventually(Duration::from_secs(10), "mosquitto to stop", async || {
            child.try_wait().unwrap()
        })
        .await;
        assert!(status.success(), "mosquitto stopped with {status:?}");
    }

    /// Starts a stopped broker again on the same port with the same data directory.
    pub async fn start_again(&mut self) {
        self.child = Self::spawn(&self.conf);
        self.wait_listening().await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain MQTT client for publishing test traffic and watching republished messages.
pub struct TestClient {
    pub client: AsyncClient,
    pub received: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    acks: Arc<Mutex<usize>>,
}

impl TestClient {
    pub async fn connect(port: u16, id: &str) -> TestClient {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(100);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, received) = mpsc::unbounded_channel();
        let acks = Arc::new(Mutex::new(0));
        let acks2 = Arc::clone(&acks);
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let mut connected_tx = Some(connected_tx);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic, p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => *acks2.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .expect("test client connects")
            .unwrap();
        TestClient {
            client,
            received,
            acks,
        }
    }

    /// Publishes at QoS 1 and waits until the broker acknowledged every message.
    pub async fn publish_all(&self, messages: impl IntoIterator<Item = (String, String)>) {
        let before = *self.acks.lock().unwrap();
        let mut n = 0;
        for (topic, payload) in messages {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            n += 1;
        }
        eventually(
            Duration::from_secs(30),
            "PUBACKs from the broker",
            async || (*self.acks.lock().unwrap() >= before + n).then_some(()),
        )
        .await;
    }
}

/// Issue 5's traffic: `n` numbered QoS 1 messages (`{"seq": i}`, i in 0..n) from
/// `publishers` clients at once. Publisher p sends its share, [p·n/publishers,
/// (p+1)·n/publishers), in order to `topic(p, i)`, 250 at a time, each lot acknowledged
/// by the broker before the next; `over` spreads the lots evenly over that long (zero: as
/// fast as the broker takes them). Returns once every message was acknowledged.
pub async fn publish_numbered(
    port: u16,
    name: &str,
    publishers: i64,
    n: i64,
    over: Duration,
    topic: impl Fn(i64, i64) -> String,
) {
    const LOT: i64 = 250;
    let start = tokio::time::Instant::now();
    let topic = &topic;
    // Joined, not spawned: the test client's futures are not Send.
    futures::future::join_all((0..publishers).map(|p| async move {
        let client = TestClient::connect(port, &format!("{name}-{p}")).await;
        let (first, end) = (p * n / publishers, (p + 1) * n / publishers);
        let mut from = first;
        while from < end {
            let due = over.mul_f64((from - first) as f64 / (end - first) as f64);
            tokio::time::sleep_until(start + due).await;
            let to = (from + LOT).min(end);
            client
                .publish_all((from..to).map(|i| (topic(p, i), format!(r#"{{"seq": {i}}}"#))))
                .await;
            from = to;
        }
    }))
    .await;
}

/// `seqs` (one topic's, as received) hold exactly `want`, in order, each first copy
/// after the one before; a later copy of a seq already received is a duplicate
/// (redelivery, at least once). Returns the number of duplicates.
pub fn assert_in_order(topic: &str, seqs: &[i64], want: &[i64]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<i64> = seqs.iter().copied().filter(|s| seen.insert(*s)).collect();
    if firsts != want {
        let at = firsts.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{topic}: first copies out of order or missing: {} received, {} wanted, first difference at {at:?}",
            firsts.len(),
            want.len()
        );
    }
    seqs.len() - firsts.len()
}

/// Whether the long forms of issue 5's fault scenarios run (`MQBRIDGE_LONG_TESTS=1`);
/// otherwise each runs a shortened form that fits the normal test run.
pub fn long_tests() -> bool {
    std::env::var("MQBRIDGE_LONG_TESTS").is_ok_and(|v| v == "1")
}

/// `short` in the normal test run, `long` with `MQBRIDGE_LONG_TESTS=1`.
pub fn short_or_long<T>(short: T, long: T) -> T {
    if long_tests() { long } else { short }
}

/// What a sink holds of the numbered messages 0..sent, as issue 5 reports it:
/// `sent N / stored S / lost L / duplicates D` (stored counts distinct messages;
/// duplicates, the copies beyond the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: i64,
    pub stored: i64,
    pub lost: i64,
    pub duplicates: i64,
}

impl Tally {
    /// From the count of distinct messages stored and of copies in all.
    pub fn new(sent: i64, stored: i64, copies: i64) -> Tally {
        Tally {
            sent,
            stored,
            lost: sent - stored,
            duplicates: copies - stored,
        }
    }

    /// From every seq the sink holds, repeats included; each must be one that was sent.
    pub fn of_seqs(sent: i64, held: impl IntoIterator<Item = i64>) -> Tally {
        let mut distinct = std::collections::HashSet::new();
        let mut copies = 0;
        for seq in held {
            assert!((0..sent).contains(&seq), "seq {seq} was never sent");
            distinct.insert(seq);
            copies += 1;
        }
        Tally::new(sent, distinct.len() as i64, copies)
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} / stored {} / lost {} / duplicates {}",
            self.sent, self.stored, self.lost, self.duplicates
        )
    }
}

/// Holds SQLite's write lock on `db` (`BEGIN EXCLUSIVE`) until the connection is dropped,
/// which rolls back: a database another process has locked.
pub async fn sqlite_lock(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Row count of a table, 0 when the file or table does not exist yet.
pub async fn sqlite_count(db: &Path, table: &str) -> i64 {
    sqlite_query(db, &format!("SELECT COUNT(*) FROM {table}"))
        .await
        .first()
        .copied()
        .unwrap_or(0)
}

/// Runs a query returning one integer column.
pub async fn sqlite_query(db: &Path, sql: &str) -> Vec<i64> {
    use sqlx::Connection;
    if !db.exists() {
        return Vec::new();
    }
    let url = format!("sqlite://{}?mode=ro", db.display());
    let Ok(mut conn) = sqlx::SqliteConnection::connect(&url).await else {
        return Vec::new();
    };
    let rows: Result<Vec<(i64,)>, _> = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut conn)
        .await;
    rows.map(|r| r.into_iter().map(|(v,)| v).collect())
        .unwrap_or_default()
}

/// Creates a database file with one table.
pub async fn sqlite_create(db: &Path, ddl: &str) {
    use sqlx::Connection;
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(ddl.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// Lines of a JSON-lines file (empty when missing).
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Only complete lines: the sink may be in the middle of appending the next one.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// mqbridge running in this process, stopped gracefully on drop of the handle.
pub struct InProcess {
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub fn start(config_yaml: &str) -> InProcess {
        mqbridge::install_crypto();
        let plan = mqbridge::config::parse(config_yaml, "test.yaml", |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(mqbridge::app::run(plan, shutdown.clone()));
        InProcess {
            shutdown,
            task: Some(task),
        }
    }

    /// Graceful stop; returns run's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The lines a child process writes to `output`, collected as they come by a thread,
/// which ends at the end of the output (joining it after the process exited waits for
/// its last lines).
pub fn collect_lines(
    output: impl std::io::Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let lines2 = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            lines2.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

/// mqbridge as a child process (for kill -9 and signals), with its log lines collected.
pub struct ChildBridge {
    child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Collects `log`; joined once the process exited, so that the log is complete.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl ChildBridge {
    pub fn start(config_path: &Path) -> ChildBridge {
        Self::start_with_env(config_path, &[])
    }

    /// Starts mqbridge and waits until it has subscribed at the broker (its log says so).
    pub async fn start_subscribed(config_path: &Path) -> ChildBridge {
        let bridge = Self::start(config_path);
        bridge
            .wait_for_log("subscribed", Duration::from_secs(20))
            .await;
        bridge
    }

    /// Like [`ChildBridge::start`], with extra environment variables (e.g. secrets).
    pub fn start_with_env(config_path: &Path, env: &[(&str, &str)]) -> ChildBridge {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqbridge"));
        cmd.args(["run", "--config"])
            .arg(config_path)
            .envs(env.iter().copied());
        Self::spawn(cmd)
    }

    /// Runs `cmd` (the mqbridge binary with arguments, environment and working directory
    /// already set).
    pub fn spawn(mut cmd: Command) -> ChildBridge {
        let mut child = cmd
            .env("RUST_LOG", "info,mqbridge=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mqbridge");
        let (log, log_reader) = collect_lines(child.stderr.take().unwrap());
        ChildBridge {
            child,
            log,
            log_reader: Some(log_reader),
        }
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        eventually(
            timeout,
            &format!("log line containing {needle:?}"),
            async || {
                self.log
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains(needle))
                    .then_some(())
            },
        )
        .await
    }

    /// Resident memory of the process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Waits for the process to exit on its own; its log is complete then.
    pub async fn exited(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = eventually(timeout, "mqbridge to exit", async || {
            self.child.try_wait().unwrap()
        })
        .await;
        self.log_complete();
        status
    }

    /// After the process exited: waits until its last log lines are in `log`.
    fn log_complete(&mut self) {
        if let Some(reader) = self.log_reader.take() {
            reader.join().unwrap();
        }
    }

    /// Sends `signal` (a name such as `HUP`) to the process.
    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for exit (the log is complete then); returns the exit status
    /// and how long it took.
    pub async fn terminate(mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        signal(&self.child, "TERM");
        let status = eventually(timeout, "mqbridge to exit after SIGTERM", async || {
            self.child.try_wait().unwrap()
        })
        .await;
        let took = started.elapsed();
        self.log_complete();
        (status, took)
    }
}

impl Drop for ChildBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test PostgreSQL started by scripts/test.sh.
pub fn pg_admin_url() -> String {
    std::env::var("MQBRIDGE_TEST_DATABASE_URL")
        .expect("MQBRIDGE_TEST_DATABASE_URL is not set: run the tests through scripts/test.sh, which starts PostgreSQL")
}

/// A new, empty database on the test server; returns its URL.
pub async fn pg_fresh_database(admin_url: &str) -> String {
    use sqlx::Connection;
    let name = format!("mqb_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to test postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut url = url::Url::parse(admin_url).unwrap();
    url.set_path(&name);
    url.to_string()
}

/// Runs statements on a database.
pub async fn pg_exec(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// Runs a query whose rows are one text column (cast in SQL with ::text).
pub async fn pg_texts(url: &str, sql: &str) -> Vec<Option<String>> {
    use sqlx::Connection;
    let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
        return Vec::new();
    };
    let rows: Result<Vec<(Option<String>,)>, _> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut conn)
            .await;
    rows.map(|r| r.into_iter().map(|(v,)| v).collect())
        .unwrap_or_default()
}

/// One integer from a query, None when the server is unreachable.
pub async fn pg_count(url: &str, sql: &str) -> Option<i64> {
    pg_texts(url, sql)
        .await
        .first()
        .cloned()
        .flatten()
        .and_then(|s| s.parse().ok())
}

/// A PostgreSQL server of a test's own (for restarting it), via scripts/postgres.sh.
pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

fn postgres_sh(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
    let status = Command::new(script)
        .args(args)
        .status()
        .expect("scripts/postgres.sh");
    assert!(status.success(), "scripts/postgres.sh {args:?} failed");
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = dir.path().join("data");
        postgres_sh(&["start", data.to_str().unwrap(), &port.to_string()]);
        Postgres {
            port,
            data,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server: `fast` (clean shutdown) or `immediate` (like a crash).
    pub fn stop(&self, mode: &str) {
        postgres_sh(&["stop", self.data.to_str().unwrap(), mode]);
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        postgres_sh(&["start", self.data.to_str().unwrap(), &self.port.to_string()]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
        let _ = Command::new(script)
            .args(["stop", self.data.to_str().unwrap(), "immediate"])
            .status();
    }
}

/// Runs a command that must succeed (output discarded).
pub fn run_ok(cmd: &mut Command) {
    let status = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed");
}

/// `openssl req` arguments for a new P-256 key without a passphrase.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA and a server certificate for localhost / 127.0.0.1, made with openssl.
pub fn make_certs(dir: &std::path::Path) {
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(EC_KEY)
            .args([
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=mqbridge test CA",
            ]),
    );
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req"])
            .args(EC_KEY)
            .args([
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ]),
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run_ok(Command::new("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]));
}

/// Client certificates, in `dir` where [`make_certs`] made its CA: `device.pem`/`.key`
/// (CN `device-7`, DNS name `d7.fleet.test`, signed by that CA), and `stranger.pem`/`.key`
/// (also CN `device-7`, signed by `other-ca.pem`, a CA the broker does not know).
pub fn make_client_certs(dir: &std::path::Path) {
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(EC_KEY)
            .args(["-keyout", "other-ca.key", "-out", "other-ca.pem"])
            .args(["-days", "2", "-subj", "/CN=another CA"]),
    );
    std::fs::write(
        dir.join("client.ext"),
        "subjectAltName=DNS:d7.fleet.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, ca) in [("device", "ca"), ("stranger", "other-ca")] {
        run_ok(
            Command::new("openssl")
                .current_dir(dir)
                .arg("req")
                .args(EC_KEY)
                .args(["-keyout", &format!("{name}.key")])
                .args(["-out", &format!("{name}.csr")])
                .args(["-subj", "/O=Fleet/CN=device-7"]),
        );
        run_ok(Command::new("openssl").current_dir(dir).args([
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ]));
    }
}

/// Sends `name` (a signal name such as `TERM`, `HUP`, `STOP`) to a child process.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name}");
}
