//! The brokers under test, each started as a process of its own on a free loopback port
//! with a generated config, and killed when dropped: mqbridge's embedded broker (no
//! rules, so a message costs only the broker's own work) and Mosquitto, its ceiling.
//! Both get the same limits: deep queues, so that a fast publisher's backlog is queued
//! rather than dropped, and TCP_NODELAY.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Messages queued per subscriber before a broker drops (both brokers).
const MAX_QUEUED: u64 = 10_000_000;
/// QoS 1/2 messages in flight per client, each way (both brokers).
const MAX_INFLIGHT: u32 = 1000;
/// More than the idle connections a run opens (18,000), below the open-files limit.
const MAX_CONNECTIONS: u32 = 19_500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    Mosquitto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Embedded => "embedded",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "embedded" => Ok(Kind::Embedded),
            "mosquitto" => Ok(Kind::Mosquitto),
            other => Err(format!("unknown broker {other} (embedded, mosquitto)")),
        }
    }
}

/// Where the brokers' executables are.
#[derive(Clone)]
pub struct Programs {
    pub mqbridge: PathBuf,
    pub mosquitto: PathBuf,
}

impl Default for Programs {
    fn default() -> Programs {
        let mosquitto = Path::new("/usr/sbin/mosquitto");
        Programs {
            // Built by cargo for this bench, in the bench's profile (release under
            // `cargo bench`, debug under `cargo test`).
            mqbridge: env!("CARGO_BIN_EXE_mqbridge").into(),
            mosquitto: if mosquitto.exists() {
                mosquitto.into()
            } else {
                "mosquitto".into()
            },
        }
    }
}

/// A running broker; killed on drop.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    /// Holds the config and the log until the broker is gone.
    dir: tempfile::TempDir,
    name: &'static str,
}

impl Broker {
    pub async fn start(kind: Kind, programs: &Programs) -> anyhow::Result<Broker> {
        match kind {
            Kind::Embedded => Broker::bridge(programs, |_| String::new()).await,
            Kind::Mosquitto => {
                Broker::spawn(kind.name(), |dir, port| {
                    let config = dir.join("mosquitto.conf");
                    std::fs::write(
                        &config,
                        format!(
                            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                             max_connections {MAX_CONNECTIONS}\nmax_inflight_messages {MAX_INFLIGHT}\n\
                             max_queued_messages {MAX_QUEUED}\nset_tcp_nodelay true\n\
                             log_dest stderr\nlog_type error\nlog_type warning\n"
                        ),
                    )?;
                    let mut cmd = Command::new(&programs.mosquitto);
                    cmd.arg("-c").arg(config);
                    Ok(cmd)
                })
                .await
            }
        }
    }

    /// mqbridge as the broker (the embedded broker's block on a free port), with `more`
    /// config after it: sinks, rules, a spool (given the run's directory, for files).
    pub async fn bridge(
        programs: &Programs,
        more: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Broker> {
        let queues = format!("  max_queued_messages: {MAX_QUEUED}\n");
        Broker::bridge_with(programs, &queues, more).await
    }

    /// Like [`Broker::bridge`], with `settings` (indented lines of the `embedded:` block)
    /// instead of its deep queues.
    pub async fn bridge_with(
        programs: &Programs,
        settings: &str,
        more: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Broker> {
        Broker::mqbridge(
            programs,
            |port| {
                format!(
                    "embedded:\n  listen: 127.0.0.1:{port}\n  allow_anonymous: true\n  \
                 max_connections: {MAX_CONNECTIONS}\n  max_inflight: {MAX_INFLIGHT}\n{settings}"
                )
            },
            more,
        )
        .await
    }

    /// mqbridge as a client of the broker at `broker` (its `broker:` block, a fixed client
    /// id), with `more` config after it; the port it is started on is its admin API's
    /// (what `spawn` waits for: the process is up, not yet subscribed).
    pub async fn client_of(
        programs: &Programs,
        broker: SocketAddr,
        more: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Broker> {
        Broker::mqbridge(
            programs,
            |port| {
                format!(
                    "broker:\n  url: mqtt://{broker}\n  client_id: load-bridge-{port}\n\
                 admin:\n  listen: 127.0.0.1:{port}\n"
                )
            },
            more,
        )
        .await
    }

    /// mqbridge with the config `head` writes for the port it listens on, then `more`.
    async fn mqbridge(
        programs: &Programs,
        head: impl FnOnce(u16) -> String,
        more: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Broker> {
        Broker::spawn("mqbridge", |dir, port| {
            let config = dir.join("mqbridge.yaml");
            let text = format!("{}shutdown_timeout: 1s\n{}", head(port), more(dir));
            std::fs::write(&config, text)?;
            let mut cmd = Command::new(&programs.mqbridge);
            cmd.arg("run").arg("--config").arg(config);
            Ok(cmd)
        })
        .await
    }

    /// Starts the command `make` builds (given a directory of the broker's own and its
    /// port), logging to that directory, and waits until the port takes connections.
    async fn spawn(
        name: &'static str,
        make: impl FnOnce(&Path, u16) -> anyhow::Result<Command>,
    ) -> anyhow::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut cmd = make(dir.path(), port)?;
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut broker = Broker {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            name,
        };
        broker.wait_listening().await?;
        Ok(broker)
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}): {}", self.name, self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} in 30 s: {}",
                    self.name,
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resident memory of process `pid`, KiB (`VmRSS` in /proc).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}
