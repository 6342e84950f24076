//! Idle connections to the broker under test: connected (CONNECT with keepalive 0, so
//! that no broker closes them), then silent. They are held by child processes (this same
//! executable, `hold-idle` mode), a few thousand each, so that neither the tool nor any
//! child comes near the open-files limit (20,000 per process here, which cannot be raised).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;

use crate::flags::Flags;
use crate::mqtt::Client;

/// Connections being set up at once by one child.
const CONCURRENT_CONNECTS: usize = 64;
/// Time for a child to have all of its connections accepted.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// Child processes holding idle connections; killed on drop (the connections close).
pub struct IdleConnections {
    children: Vec<Child>,
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl IdleConnections {
    /// Opens `count` idle connections to `broker`, at most `per_process` per child, and
    /// returns once the broker accepted every one (each got its CONNACK).
    pub async fn open(
        broker: SocketAddr,
        count: usize,
        per_process: usize,
    ) -> anyhow::Result<IdleConnections> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut ready = Vec::new();
        for (i, from) in (0..count).step_by(per_process).enumerate() {
            let n = per_process.min(count - from);
            let mut child = Command::new(&exe)
                .args(["hold-idle", "--broker", &broker.to_string()])
                .args(["--count", &n.to_string(), "--prefix", &format!("idle{i}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting an idle-connection holder")?;
            let stdout = child.stdout.take().unwrap();
            ready.push(tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line)?;
                ensure!(
                    line.trim() == "ready",
                    "an idle-connection holder failed: {line:?}"
                );
                anyhow::Ok(())
            }));
            children.push(child);
        }
        // Dropped on an error below: the children are killed.
        let held = IdleConnections { children };
        let all = tokio::time::timeout(READY_TIMEOUT, futures::future::try_join_all(ready))
            .await
            .context("idle connections not all accepted in time")??;
        all.into_iter().collect::<anyhow::Result<()>>()?;
        Ok(held)
    }
}

/// The child's side (`hold-idle --broker ADDR --count N --prefix ID`): connects, prints
/// `ready` once every connection is accepted, and holds them until its stdin closes (the
/// parent exited or dropped it).
pub async fn hold(mut flags: Flags) -> anyhow::Result<()> {
    let (mut broker, mut count, mut prefix) = (None, 0usize, String::from("idle"));
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--broker" => broker = Some(flags.value::<SocketAddr>(&flag)),
            "--count" => count = flags.value(&flag),
            "--prefix" => prefix = flags.value(&flag),
            other => bail!("unknown flag {other}"),
        }
    }
    let broker = broker.context("--broker is required")?;
    let pid = std::process::id();
    let clients: Vec<Client> = futures::stream::iter(0..count)
        .map(|i| {
            let id = format!("{prefix}-{pid}-{i}");
            async move { Client::connect(broker, &id, 0).await }
        })
        .buffer_unordered(CONCURRENT_CONNECTS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut stdout = std::io::stdout();
    stdout.write_all(b"ready\n")?;
    stdout.flush()?;
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
    drop(clients);
    Ok(())
}
