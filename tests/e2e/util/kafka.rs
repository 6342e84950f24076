//! A throwaway Kafka-API broker: Tansu 0.6 (memory storage) on a free loopback port,
//! killed on drop, and a reader of what its topics hold. scripts/test.sh builds Tansu once
//! (`cargo install tansu`) into a cache outside the work tree and names it with `TANSU`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};

use super::free_port;

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU") {
        return p.into();
    }
    let cached = std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cache/mqbridge/tansu-0.6.0/bin/tansu"));
    match cached {
        Ok(p) if p.exists() => p,
        _ => panic!(
            "tansu not found: run the tests through scripts/test.sh (it builds Tansu once), or name a tansu binary with TANSU"
        ),
    }
}

pub struct Tansu {
    pub port: u16,
    child: Child,
}

impl Tansu {
    /// Starts a broker with memory storage, and waits until it listens.
    pub async fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let tansu = Tansu { port, child };
        super::wait_listening(port, "tansu to listen").await;
        tansu
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `topic` with `partitions` partitions (`tansu topic create`).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        super::run_ok(
            Command::new(tansu_bin())
                .args(["topic", "create", topic, "--partitions"])
                .arg(partitions.to_string())
                .args(["--broker", &format!("tcp://{}", self.bootstrap())])
                .stdout(Stdio::null()),
        );
    }

    /// Freezes (`STOP`) or resumes (`CONT`) the broker: its sockets stay open, and
    /// nothing answers.
    pub fn signal(&self, name: &str) {
        super::signal(&self.child, name);
    }

    /// A reader of `topic`'s partitions 0..partitions from their beginning.
    pub fn reader(&self, topic: &str, partitions: i32) -> KafkaReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "mqbridge-tests")
            .set("enable.auto.commit", "false")
            .create()
            .expect("a consumer");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        KafkaReader {
            consumer,
            received: Vec::new(),
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub key: String,
    pub value: serde_json::Value,
    pub headers: Vec<(String, String)>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct KafkaReader {
    consumer: BaseConsumer,
    /// Everything read so far, in the order each partition holds it.
    pub received: Vec<Received>,
}

impl KafkaReader {
    /// Takes what has arrived (without waiting for more).
    fn drain(&mut self) {
        while let Some(m) = self.consumer.poll(Duration::ZERO) {
            let m = m.unwrap_or_else(|e| panic!("consumer: {e}"));
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.received.push(Received {
                partition: m.partition(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                value: serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("a JSON record"),
                headers,
            });
        }
    }

    /// Reads until `done` holds of what was read, or `timeout` passes.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.drain();
            if done(&self.received) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
