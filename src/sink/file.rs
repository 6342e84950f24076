//! `file` sink: appends each record as one JSON line; fsync once per batch. Meant for
//! dead letters and debugging.

use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::file::Settings;

/// What writing a record would do, for `mqbridge try`.
pub fn would(cfg: &Settings, _: &Origin, _: &serde_json::Value) -> String {
    format!("append one JSON line to {}", cfg.path.display())
}

pub struct FileSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl FileSink {
    pub async fn open(cfg: &Settings) -> anyhow::Result<Self> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", cfg.path.display()))?;
        Ok(FileSink {
            path: cfg.path.clone(),
            file: Mutex::new(file),
        })
    }

    async fn append(&self, batch: &[Delivery]) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(batch.len() * 256);
        for d in batch {
            serde_json::to_writer(&mut buf, &d.record)
                .map_err(|e| SinkError::permanent(format!("cannot serialize record: {e}")))?;
            buf.push(b'\n');
        }
        let io = |e: std::io::Error| SinkError::transient(format!("{}: {e}", self.path.display()));
        let mut file = self.file.lock().await;
        file.write_all(&buf).await.map_err(io)?;
        file.sync_data().await.map_err(io)
    }
}

impl Sink for FileSink {
    /// One write and one fsync for the batch: it succeeds or fails as a whole.
    fn write<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move { super::all(batch.len(), self.append(batch).await) })
    }
}
