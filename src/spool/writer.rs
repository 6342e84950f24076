//! The spool's writer and syncer, a pipeline of two threads.
//!
//! - The **writer** appends what the source has buffered as one group with one `write`.
//!   The group is then *written*: it may go to the pipeline at once. The writer hands it
//!   over itself when the reader has caught up and the pipeline has room for the whole
//!   group; otherwise it wakes the reader, which reads it back.
//! - The **syncer** makes written groups durable with one `fdatasync` for all that were
//!   written while the previous one ran, and only then acknowledges their messages
//!   upstream, in order.
//!
//! So a slow `fdatasync` (tens to hundreds of milliseconds on a busy disk) delays the
//! upstream acknowledgements, as it must, but neither the next writes nor delivery to the
//! sinks. A record may thus settle before it is durable; the saved cursor never passes
//! the durable records (see `reclaim`), so a power loss that takes unsynced records with
//! it leaves the cursor at or before them, and their messages, never acknowledged, come
//! again from the broker.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{RECHECK, Shared, create_segment, reader, record};
use crate::config::Fsync;
use crate::delivery::Ack;
use crate::message::Message;

/// Most bytes gathered into one group (a larger single message is a group of its own).
const GROUP_BYTES: usize = 4 << 20;

/// A written group on its way to the syncer: the segment file it went to, the record
/// number after it, and its messages' upstream acknowledgements.
pub struct Written {
    file: Arc<File>,
    end: u64,
    acks: Vec<Ack>,
}

/// The writer: runs until `input` closes, or `stop` comes while the spool is full. With
/// `fsync: always` it waits for each message's `fdatasync` before writing the next.
/// After `stop` it hands nothing to `output` (nor does the reader).
pub fn run(
    shared: &Arc<Shared>,
    file: File,
    mut input: mpsc::Receiver<Message>,
    fsync: Fsync,
    synced: std_mpsc::Sender<Written>,
    output: mpsc::Sender<Message>,
    stop: &CancellationToken,
) -> io::Result<()> {
    let mut file = Arc::new(file);
    let mut buf = Vec::with_capacity(GROUP_BYTES + (64 << 10));
    let mut next = shared.state().written;
    let mut output = Some(output);
    while let Some(first) = input.blocking_recv() {
        if stop.is_cancelled() {
            output = None; // so that the pipeline's queue closes once the reader has gone
        }
        buf.clear();
        // Sized for the most the group can take (what is queued): one allocation each.
        let queued = match fsync {
            Fsync::Batch => input.len() + 1,
            Fsync::Always => 1,
        };
        let mut acks = Vec::with_capacity(queued);
        // The group's messages, with their upstream acks taken out, for the pipeline.
        let mut msgs = Vec::with_capacity(queued);
        let mut seq = next;
        let mut add = |mut m: Message, buf: &mut Vec<u8>| {
            record::encode(seq, &m, buf);
            acks.push(m.ack.take());
            msgs.push(m);
            seq += 1;
        };
        add(first, &mut buf);
        if fsync == Fsync::Batch {
            // A group no bigger than the room left (see wait_for_room).
            let room = {
                let st = shared.state();
                shared.max_bytes.saturating_sub(st.used) as usize
            };
            while buf.len() < GROUP_BYTES.min(room)
                && let Ok(m) = input.try_recv()
            {
                add(m, &mut buf);
            }
        }
        let len = buf.len() as u64;
        if !wait_for_room(shared, &mut file, next, stop)? {
            // Stopping while full: these stay unacknowledged, so they are sent again.
            return Ok(());
        }
        (&*file).write_all(&buf)?;
        let (seal, room) = {
            let mut st = shared.state();
            st.written = seq;
            st.used += len;
            let active = st.segments.back_mut().expect("an active segment");
            active.1 += len;
            let end = *active;
            // Handed over here only when the reader has handed over all before it.
            let room = output
                .as_ref()
                .filter(|_| !st.reading && st.handed == next)
                .and_then(|out| out.try_reserve_many(msgs.len()).ok());
            if room.is_some() {
                st.handed = seq;
                st.handed_at = end;
            }
            (end.1 >= shared.segment_bytes, room)
        };
        match room {
            Some(room) => {
                for ((place, mut m), s) in room.zip(msgs).zip(next..) {
                    reader::dispatch(shared, s, &mut m);
                    place.send(m);
                }
            }
            None => shared.appended.notify_one(),
        }
        let group = Written {
            file: Arc::clone(&file),
            end: seq,
            acks,
        };
        if synced.send(group).is_err() {
            return Err(io::Error::other("the spool's syncer has stopped"));
        }
        next = seq;
        if fsync == Fsync::Always {
            wait_until_committed(shared, next)?;
        }
        if seal {
            file = seal_and_start(shared, next)?;
        }
    }
    Ok(())
}

/// The syncer: until the writer has gone and everything it wrote is durable, syncs what
/// was written, marks it committed and acknowledges it upstream.
pub fn sync(shared: &Shared, written: std_mpsc::Receiver<Written>) -> io::Result<()> {
    let mut groups: Vec<Written> = Vec::new();
    while let Ok(first) = written.recv() {
        groups.push(first);
        groups.extend(written.try_iter());
        let started = std::time::Instant::now();
        // Groups are in file order: sync each file once, after its last group.
        for (i, g) in groups.iter().enumerate() {
            if groups
                .get(i + 1)
                .is_none_or(|n| !Arc::ptr_eq(&n.file, &g.file))
            {
                g.file.sync_data()?;
            }
        }
        metrics::histogram!("mqbridge_spool_fsync_seconds").record(started.elapsed());
        let end = groups.last().expect("a group").end;
        shared.state().committed = end;
        shared.changed.notify_all();
        for ack in groups.drain(..).flat_map(|g| g.acks) {
            ack.settle();
        }
    }
    Ok(())
}

/// Waits until every record before `end` is durable; an error if the syncer has stopped
/// first (it failed: nothing more becomes durable).
fn wait_until_committed(shared: &Shared, end: u64) -> io::Result<()> {
    let mut st = shared.state();
    while st.committed < end {
        if st.syncer_stopped {
            return Err(io::Error::other("the spool's syncer has stopped"));
        }
        st = shared
            .changed
            .wait_timeout(st, RECHECK)
            .expect("spool state lock")
            .0;
    }
    Ok(())
}

/// Waits until the spool is below `max_bytes`. (A group is gathered no bigger than the
/// room left, so the spool passes the limit by at most one message, and a message larger
/// than the limit still gets through an empty spool.) Seals the active segment while
/// waiting, so that once its records settle the janitor can delete it. Returns false
/// when `stop` comes first.
fn wait_for_room(
    shared: &Shared,
    file: &mut Arc<File>,
    next: u64,
    stop: &CancellationToken,
) -> io::Result<bool> {
    let mut full_since = None;
    let mut st = shared.state();
    loop {
        if st.used < shared.max_bytes {
            if let Some(t) = full_since {
                shared.health.set_ready();
                tracing::info!(waited = ?std::time::Instant::now().duration_since(t), "spool has room again; acknowledging");
            }
            return Ok(true);
        }
        if stop.is_cancelled() {
            return Ok(false);
        }
        if st.segments.back().is_some_and(|&(_, bytes)| bytes > 0) {
            drop(st);
            *file = seal_and_start(shared, next)?;
            st = shared.state();
            continue;
        }
        if full_since.is_none() {
            full_since = Some(std::time::Instant::now());
            shared.health.set_not_ready(format!(
                "full ({} bytes, max_bytes {}): acknowledgements paused until the sinks catch up",
                st.used, shared.max_bytes
            ));
            tracing::warn!(
                max_bytes = shared.max_bytes,
                "spool full: acknowledgements paused until the sinks catch up (the broker holds new messages)"
            );
        }
        st = shared
            .changed
            .wait_timeout(st, RECHECK)
            .expect("spool state lock")
            .0;
    }
}

/// Starts a new active segment at record `next`. The current one's written groups are
/// with the syncer, which syncs that file before committing them.
fn seal_and_start(shared: &Shared, next: u64) -> io::Result<Arc<File>> {
    let f = create_segment(&shared.dir, next)?;
    shared.state().segments.push_back((next, 0));
    Ok(Arc::new(f))
}
