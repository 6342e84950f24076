//! `file` sink: appends each record as one JSON line; fsync once per batch. Meant for
//! dead letters and debugging.

use std::io;
use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Delivery, Origin, Outcome, Sink, SinkError};
use crate::config::sinks::file::Settings;

/// What writing a record would do, for `mqbridge try`.
pub fn would(cfg: &Settings, _: &Origin, _: &crate::record::Record) -> String {
    format!("append one JSON line to {}", cfg.path.display())
}

/// Why the file sink could not open its file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create {}: {error}", dir.display())]
    Folder { dir: PathBuf, error: io::Error },
    #[error("cannot open {}: {error}", path.display())]
    File { path: PathBuf, error: io::Error },
}

pub struct FileSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl FileSink {
    pub async fn open(cfg: &Settings) -> Result<Self, OpenError> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|error| OpenError::Folder {
                    dir: dir.to_path_buf(),
                    error,
                })?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .await
            .map_err(|error| OpenError::File {
                path: cfg.path.clone(),
                error,
            })?;
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
