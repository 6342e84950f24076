//! The durable spool: an append-only log on local disk between the source and the
//! router, so that a message can be acknowledged upstream as soon as it is safely stored
//! here, however slow or absent the sinks are.
//!
//! ```text
//!  source ──Message──▶ writer ──group (one write)──▶ segment files ──▶ reader ──▶ pipeline
//!    ▲                   │  │                            │          written records,
//!    │                   │  └── the group itself, when the reader has caught up ──▶ pipeline
//!    │                   ▼                               │          in order (Ack → window)
//!    └── ack (PUBACK) ◀─ syncer ── one fdatasync ────────┘
//!                        for every group written meanwhile
//!  janitor: every 100 ms saves the cursor (first unsettled record, at most the first
//!           record not yet durable) and deletes segments whose records have all settled
//! ```
//!
//! - **Writer** (a thread): takes what the source has buffered (a group) and appends it to
//!   the active segment with one `write`. With `fsync: always` a group is one message and
//!   the writer waits for its sync. When the spool's files would pass `max_bytes` it stops
//!   taking messages, so acknowledgements stop and the backlog stays with the broker or
//!   the publishers. When the reader has handed over everything before the group and the
//!   pipeline has room for all of it, the writer hands the group's messages over itself,
//!   as they are: the reader would only read back and decode what was just written.
//! - **Syncer** (a thread): one `fdatasync` for all the groups written while the last one
//!   ran (group commit), then settles each message's upstream
//!   [`Ack`](crate::delivery::Ack), in order. A slow sync delays acknowledgements, not
//!   writes or delivery (see [`writer`]).
//! - **Reader** (a thread): hands written records to the pipeline in order, each with an
//!   [`Ack`](crate::delivery::Ack) that marks it settled in the settlement window; the
//!   pipeline's bounded queues bound what is in memory. It takes over whenever the
//!   pipeline is behind (or at startup, with a backlog) and hands back once it has caught
//!   up, continuing on disk after what the writer handed meanwhile.
//! - **Cursor**: the first unsettled record, saved in `cursor` (write + rename), but never
//!   past the durable records. After a crash the reader resumes there; records settled
//!   after the last save are delivered again (at least once, like a broker's redelivery).
//! - **Recovery**: a crash can leave the last segment with a torn record after the last
//!   fsync. Such records were never acknowledged (the broker still has them), so opening
//!   the spool cuts them off.
//!
//! Readiness: the spool is not ready while it is full (the writer waits for room). The
//! janitor sets the `mqbridge_spool_*` gauges each round.

mod reader;
mod record;
mod segment;
mod window;
mod writer;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Fsync, SpoolPlan};
use crate::health::Status;
use crate::message::Message;
use segment::{Next, SegmentReader};
use window::Window;

/// How often settled space is given back and the cursor saved.
const RECLAIM_EVERY: Duration = Duration::from_millis(100);

/// How long a waiting writer or reader sleeps before looking at the stop signal again.
const RECHECK: Duration = Duration::from_millis(100);

/// What went wrong with the spool: each message names the file or the part that failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the directory's lock.
    #[error("spool {} is in use by another mqbridge process (one process per spool directory)", .0.display())]
    InUse(PathBuf),
    /// A file of the spool could not be created, read or written.
    #[error("spool: cannot {action} {}: {error}", path.display())]
    Io {
        /// What was being done, e.g. `create`, `lock`, `save the cursor in`.
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// The writer or the reader failed (a disk error): mqbridge can neither acknowledge
    /// nor deliver.
    #[error("spool {part} failed: {error}")]
    Failed {
        part: &'static str,
        error: io::Error,
    },
    /// The writer or the reader ended without saying how (it panicked).
    #[error("spool {part} ended abnormally")]
    Ended { part: &'static str },
    #[error("cannot start the {name} thread: {error}")]
    Thread {
        name: &'static str,
        error: io::Error,
    },
}

/// Makes an I/O error on `path` a [`SpoolError::Io`].
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |error| SpoolError::Io {
        action,
        path,
        error,
    }
}

/// An opened (and recovered) spool, not yet running.
pub struct Spool {
    shared: Arc<Shared>,
    active: File,
    /// The first record the reader hands over.
    start: u64,
    fsync: Fsync,
}

/// State shared by the writer, the reader and the janitor.
struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    /// Nominal segment size: a segment is sealed once it reaches this.
    segment_bytes: u64,
    state: Mutex<State>,
    /// Signalled when records are written: what the reader waits for.
    appended: Condvar,
    /// Signalled when records are committed, when space is freed and when the syncer
    /// stops: what the writer waits for (with `fsync: always`, or while full).
    changed: Condvar,
    window: Window,
    /// Held (`flock`) while the spool is open: one process per directory.
    lock: File,
    /// Not ready while full.
    health: Status,
}

struct State {
    /// Every record numbered below this is written: the reader may hand it over.
    written: u64,
    /// Every record numbered below this is handed to the pipeline, or claimed by the
    /// reader to hand over.
    handed: u64,
    /// The reader is handing over records it claimed: until it waits again (caught up),
    /// the writer must not hand any itself, or the pipeline would get them out of order.
    reading: bool,
    /// Where record `handed` starts on disk, (segment, byte offset), once the writer has
    /// handed the records before it: where the reader continues. (When the writer sealed
    /// that segment since, the record is the next segment's first.)
    handed_at: (u64, u64),
    /// Every record numbered below this is written and fsynced: durable, acknowledged.
    committed: u64,
    /// The syncer has ended: nothing more becomes durable.
    syncer_stopped: bool,
    /// The segments, oldest first, as (first record, bytes); the last one is being written.
    segments: VecDeque<(u64, u64)>,
    /// Bytes in all segments.
    used: u64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("spool state lock")
    }

    /// Gives up the directory's lock (also released when the last reference goes).
    fn unlock(&self) {
        if let Err(e) = self.lock.unlock() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "spool: cannot release the lock");
        }
    }
}

impl Spool {
    /// Opens the spool directory (creating it), takes its lock, cuts off a torn tail and
    /// finds where to resume.
    pub fn open(plan: &SpoolPlan) -> Result<Spool, SpoolError> {
        let dir = plan.path.clone();
        std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::InUse(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("lock", &lock_path)(e)),
        }
        let cursor = read_cursor(&dir);
        let mut segments: VecDeque<(u64, u64)> =
            segment::list(&dir).map_err(io_error("list", &dir))?.into();

        // Only the newest segment can end in a torn write; find its last whole record.
        let mut committed = cursor;
        if let Some(&(first, bytes)) = segments.back() {
            let path = segment::path(&dir, first);
            let (next, valid) = recover(&dir, first, bytes).map_err(io_error("read", &path))?;
            if valid < bytes {
                tracing::warn!(
                    segment = %path.display(),
                    cut = bytes - valid,
                    "spool: cut off a torn write (never acknowledged, so the broker still has it)"
                );
                let cut = || {
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(valid)?;
                    f.sync_all()
                };
                cut().map_err(io_error("cut off the torn write in", &path))?;
                segments.back_mut().expect("a segment").1 = valid;
            }
            committed = committed.max(next);
        }
        // Resume at the cursor, or at the oldest record when the cursor is older.
        let start = segments
            .front()
            .map_or(committed, |&(first, _)| cursor.max(first))
            .min(committed);

        // Writing continues in a fresh segment named after the next record number.
        if segments
            .back()
            .is_some_and(|&(first, _)| first == committed)
        {
            segments.pop_back(); // an empty segment, made again below
        }
        let active = create_segment(&dir, committed)
            .map_err(io_error("create", &segment::path(&dir, committed)))?;
        segments.push_back((committed, 0));
        let used = segments.iter().map(|&(_, b)| b).sum();
        if committed > start {
            tracing::info!(path = %dir.display(), backlog = committed - start, bytes = used, "spool: resuming a backlog");
        }
        let shared = Arc::new(Shared {
            segment_bytes: (plan.max_bytes / 16).clamp(64 << 10, 64 << 20),
            max_bytes: plan.max_bytes,
            state: Mutex::new(State {
                written: committed,
                handed: start,
                reading: false,
                handed_at: (committed, 0),
                committed,
                syncer_stopped: false,
                segments,
                used,
            }),
            appended: Condvar::new(),
            changed: Condvar::new(),
            window: Window::new(start),
            dir,
            lock,
            health: Status::ready(),
        });
        metrics::gauge!("mqbridge_spool_max_bytes").set(plan.max_bytes as f64);
        Ok(Spool {
            shared,
            active,
            start,
            fsync: plan.fsync,
        })
    }

    /// Ready unless the spool is full.
    pub fn health(&self) -> Status {
        self.shared.health.clone()
    }

    /// A handle that reads the spool's figures while it runs (for `/api/v1/spool`).
    pub fn probe(&self) -> Probe {
        Probe(Arc::clone(&self.shared))
    }

    /// Starts the writer (taking messages from `input`), the syncer, the reader (the
    /// writer and the reader hand them to `output`) and the janitor. After `stop` neither
    /// hands over anything more and the writer stops waiting for room; the writer ends
    /// when `input` closes, and the syncer once it has synced and acknowledged what the
    /// writer wrote.
    pub fn start(
        self,
        input: mpsc::Receiver<Message>,
        output: mpsc::Sender<Message>,
        stop: CancellationToken,
    ) -> Result<Running, SpoolError> {
        let Spool {
            shared,
            active,
            start,
            fsync,
        } = self;
        let (written, to_sync) = std::sync::mpsc::channel();
        let writer = thread("spool-writer", {
            let (shared, stop, output) = (Arc::clone(&shared), stop.clone(), output.clone());
            move || writer::run(&shared, active, input, fsync, written, output, &stop)
        })?;
        let syncer = thread("spool-syncer", {
            let shared = Arc::clone(&shared);
            move || {
                let result = writer::sync(&shared, to_sync);
                shared.state().syncer_stopped = true;
                shared.changed.notify_all();
                result
            }
        })?;
        let reader = thread("spool-reader", {
            let (shared, stop) = (Arc::clone(&shared), stop.clone());
            let handle = tokio::runtime::Handle::current();
            move || reader::run(&shared, start, output, &stop, &handle)
        })?;
        let janitor_stop = CancellationToken::new();
        let janitor = tokio::spawn({
            let (shared, quit) = (Arc::clone(&shared), janitor_stop.clone());
            async move {
                let mut saved = start;
                let mut tick = tokio::time::interval(RECLAIM_EVERY);
                loop {
                    // Only between rounds: a round in progress (its blocking half holds
                    // the spool's files) always finishes before the janitor ends.
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = quit.cancelled() => return,
                    }
                    let s = Arc::clone(&shared);
                    match tokio::task::spawn_blocking(move || reclaim(&s, saved)).await {
                        Ok(Ok(base)) => saved = base,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "spool: cannot save the cursor or delete settled segments")
                        }
                        Err(e) => tracing::warn!(error = %e, "spool: janitor failed"),
                    }
                }
            }
        });
        Ok(Running {
            shared,
            writer: Some(writer),
            syncer: Some(syncer),
            reader: Some(reader),
            janitor,
            janitor_stop,
        })
    }
}

/// Reads a spool's figures; see [`Spool::probe`].
pub struct Probe(Arc<Shared>);

/// What [`Probe::stats`] reads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub path: PathBuf,
    /// Bytes in the segment files, and the bound at which acknowledgements stop.
    pub bytes: u64,
    pub max_bytes: u64,
    /// Records written and not yet settled by every sink: the backlog.
    pub records: u64,
    /// Number of the first unsettled record (the cursor), and of the first not yet
    /// durable. (Records are delivered as soon as they are written, so the cursor may
    /// pass `committed` while an fsync runs; the cursor saved on disk never does.)
    pub cursor: u64,
    pub committed: u64,
    pub segments: usize,
    /// Full: acknowledgements wait for room.
    pub full: bool,
    /// Seconds since the oldest unsettled record's message was received (null: none).
    pub oldest_record_age_seconds: Option<f64>,
}

/// Seconds since the window's oldest unsettled message was received.
fn oldest_age(window: &Window) -> Option<f64> {
    let oldest = window.oldest()?;
    let age = jiff::Timestamp::now().duration_since(oldest);
    Some(age.as_secs_f64().max(0.0))
}

impl Probe {
    pub fn stats(&self) -> Stats {
        let shared = &self.0;
        let cursor = shared.window.base();
        let st = shared.state();
        Stats {
            path: shared.dir.clone(),
            bytes: st.used,
            max_bytes: shared.max_bytes,
            records: st.written.saturating_sub(cursor),
            cursor,
            committed: st.committed,
            segments: st.segments.len(),
            full: shared.health.problem().is_some(),
            oldest_record_age_seconds: oldest_age(&shared.window),
        }
    }
}

/// A running spool; see [`Spool::start`].
pub struct Running {
    shared: Arc<Shared>,
    writer: Option<oneshot::Receiver<io::Result<()>>>,
    syncer: Option<oneshot::Receiver<io::Result<()>>>,
    reader: Option<oneshot::Receiver<io::Result<()>>>,
    janitor: tokio::task::JoinHandle<()>,
    /// Ends the janitor between two rounds, so that `close` can wait for it.
    janitor_stop: CancellationToken,
}

impl Running {
    /// Resolves only if the writer, the syncer or the reader fails (a disk error):
    /// mqbridge must then stop, since it can neither acknowledge nor deliver.
    pub async fn failed(&mut self) -> SpoolError {
        /// The thread's result once it ends; pending while it runs or once taken.
        async fn end(
            slot: &mut Option<oneshot::Receiver<io::Result<()>>>,
        ) -> Option<io::Result<()>> {
            let r = match slot {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            };
            *slot = None;
            r
        }
        loop {
            let (part, result) = tokio::select! {
                r = end(&mut self.writer) => ("writer", r),
                r = end(&mut self.syncer) => ("syncer", r),
                r = end(&mut self.reader) => ("reader", r),
            };
            match result {
                Some(Ok(())) => {} // ended normally (the source or the pipeline stopped)
                Some(Err(error)) => return SpoolError::Failed { part, error },
                None => return SpoolError::Ended { part },
            }
        }
    }

    /// Waits for the writer and the syncer to commit (and acknowledge) what the source
    /// handed over; call once the source has stopped taking messages.
    pub async fn writer_done(&mut self) -> Result<(), SpoolError> {
        let writer = finished("writer", self.writer.take()).await;
        // The syncer ends once the writer has: it syncs and acknowledges what was written
        // even when the writer failed.
        finished("syncer", self.syncer.take()).await?;
        writer
    }

    /// Waits for the reader to stop, then saves the cursor: call after the sinks have
    /// flushed, so every settlement is in it. When this returns, nothing of this spool
    /// touches its directory any more and its lock is released, so the directory can be
    /// opened again at once (by this process or another).
    pub async fn close(mut self) -> Result<(), SpoolError> {
        let reader = finished("reader", self.reader.take()).await;
        // Wait for the janitor rather than abort it: an aborted janitor could leave a
        // round running on a blocking thread that writes an older cursor after ours.
        self.janitor_stop.cancel();
        if let Err(e) = (&mut self.janitor).await {
            tracing::warn!(error = %e, "spool: janitor failed");
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || reclaim(&shared, u64::MAX))
            .await
            .unwrap_or_else(|panicked| Err(io::Error::other(panicked)))
            .map_err(io_error("save the cursor in", &self.shared.dir))?;
        // Acks of records still held downstream keep `Shared` (and its lock file) alive;
        // the lock must not outlive the spool.
        self.shared.unlock();
        reader
    }
}

async fn finished(
    part: &'static str,
    done: Option<oneshot::Receiver<io::Result<()>>>,
) -> Result<(), SpoolError> {
    match done {
        Some(rx) => match rx.await {
            Ok(r) => r.map_err(|error| SpoolError::Failed { part, error }),
            Err(_) => Err(SpoolError::Ended { part }),
        },
        None => Ok(()),
    }
}

fn thread(
    name: &'static str,
    f: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> Result<oneshot::Receiver<io::Result<()>>, SpoolError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|error| SpoolError::Thread { name, error })?;
    Ok(rx)
}

/// Saves the cursor when it moved past `saved` and deletes the segments whose records
/// have all settled; returns the cursor.
///
/// Deleting is checked every round, even when the cursor has not moved: a segment is done
/// only once the next one exists, and the writer may seal and start the next one just
/// after the cursor passed the end (a full spool then waits for exactly this deletion).
fn reclaim(shared: &Shared, saved: u64) -> io::Result<u64> {
    // Never past the durable records: a power loss may take the others with it.
    let (base, written) = {
        let settled = shared.window.base();
        let st = shared.state();
        (settled.min(st.committed), st.written)
    };
    if base != saved {
        write_cursor(&shared.dir, base)?;
    }
    let doomed: Vec<u64> = {
        let mut st = shared.state();
        metrics::gauge!("mqbridge_spool_bytes").set(st.used as f64);
        metrics::gauge!("mqbridge_spool_records").set(written.saturating_sub(base) as f64);
        metrics::gauge!("mqbridge_spool_oldest_record_seconds")
            .set(oldest_age(&shared.window).unwrap_or(0.0));
        let mut doomed = Vec::new();
        // A segment is done when the next one starts at or before the cursor.
        while st.segments.len() > 1 && st.segments[1].0 <= base {
            let (first, bytes) = st.segments.pop_front().expect("a segment");
            st.used -= bytes;
            doomed.push(first);
        }
        doomed
    };
    if !doomed.is_empty() {
        shared.changed.notify_all();
        for first in doomed {
            std::fs::remove_file(segment::path(&shared.dir, first))?;
        }
    }
    Ok(base)
}

fn read_cursor(dir: &Path) -> u64 {
    match std::fs::read_to_string(dir.join("cursor")) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(dir = %dir.display(), "spool: unreadable cursor; starting from the oldest record");
            0
        }),
        Err(_) => 0,
    }
}

fn write_cursor(dir: &Path, base: u64) -> io::Result<()> {
    // Not fsynced: a cursor lost with the OS only means records are delivered again.
    let tmp = dir.join("cursor.tmp");
    std::fs::write(&tmp, format!("{base}\n"))?;
    std::fs::rename(tmp, dir.join("cursor"))
}

/// Creates segment `first` (or empties it) and makes its directory entry durable.
fn create_segment(dir: &Path, first: u64) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(segment::path(dir, first))?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// Scans segment `first`: the number after its last intact record, and where that
/// record ends.
fn recover(dir: &Path, first: u64, bytes: u64) -> io::Result<(u64, u64)> {
    let mut r = SegmentReader::open(&segment::path(dir, first))?;
    let mut next = first;
    loop {
        let valid = r.offset.min(bytes);
        match r.next()? {
            Next::Record(d) if d.seq == next => next += 1,
            Next::Record(_) | Next::Broken(_) | Next::End => return Ok((next, valid)),
        }
    }
}

#[cfg(test)]
mod tests;
