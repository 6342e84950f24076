//! A throwaway nats-server with JetStream (Debian's `nats-server`) on a free loopback port,
//! its store in a temp dir, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port};

fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return p.into();
    }
    for p in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "nats-server not found: install it (apt-get install nats-server) or run the tests through scripts/test.sh"
    );
}

pub struct NatsServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `nats-server -js` with `args` added (e.g. `--user`/`--pass`), and waits
    /// until JetStream answers.
    pub async fn start(args: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let server = NatsServer {
            port,
            child,
            _dir: dir,
        };
        super::wait_listening(port, "nats-server to listen").await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A JetStream context on a connection of the test's own, made with `options`.
    pub async fn jetstream(
        &self,
        options: async_nats::ConnectOptions,
    ) -> async_nats::jetstream::Context {
        let client = options
            .connect(self.url())
            .await
            .expect("connect to nats-server");
        async_nats::jetstream::new(client)
    }

    /// Creates the stream `name` capturing `subjects` (retrying until JetStream is up).
    pub async fn create_stream(
        js: &async_nats::jetstream::Context,
        name: &str,
        subjects: &[&str],
    ) -> async_nats::jetstream::stream::Stream {
        let config = async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        eventually(
            Duration::from_secs(10),
            "JetStream to create a stream",
            async || js.create_stream(config.clone()).await.ok(),
        )
        .await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
