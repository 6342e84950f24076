//! wrk, the HTTP load generator, as the webhook sink's ceiling: the same receiver, the
//! same body, the same number of connections, for a fixed time; its `Requests/sec`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// POSTs `body` (as JSON, with an `Idempotency-Key` like the sink's) to `url` over
/// `connections` keep-alive connections for `duration`; requests per second.
pub async fn post(
    url: &str,
    body: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Idempotency-Key\"] = \"5f0c6e1d2a3b4c5d\"\n"
        ),
    )?;
    let threads = connections.clamp(1, 2);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .arg("-s")
        .arg(&script)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await?;
    let out = match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("wrk is not installed: apt-get install wrk (Debian), or leave out the wrk runs")
        }
        r => r.context("running wrk")?,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk got errors from the receiver: {line}");
    }
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}
