//! The spool's writer: appends what the source has buffered as one group, makes it
//! durable with one `fdatasync`, and only then acknowledges each message upstream.

use std::fs::File;
use std::io::{self, Write};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{RECHECK, Shared, create_segment, record};
use crate::config::Fsync;
use crate::delivery::Ack;
use crate::message::Message;

/// Most bytes gathered into one group (a larger single message is a group of its own).
const GROUP_BYTES: usize = 4 << 20;

/// Runs until `input` closes, or `stop` comes while the spool is full.
pub fn run(
    shared: &Shared,
    mut file: File,
    mut input: mpsc::Receiver<Message>,
    fsync: Fsync,
    stop: &CancellationToken,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(GROUP_BYTES + (64 << 10));
    let mut acks: Vec<Ack> = Vec::new();
    let mut next = shared.state().committed;
    while let Some(first) = input.blocking_recv() {
        buf.clear();
        let mut seq = next;
        let mut add = |m: Message, buf: &mut Vec<u8>| {
            record::encode(seq, &m, buf);
            acks.push(m.ack);
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
        let started = std::time::Instant::now();
        file.write_all(&buf)?;
        file.sync_data()?;
        metrics::histogram!("mqbridge_spool_fsync_seconds").record(started.elapsed());
        let seal = {
            let mut st = shared.state();
            st.committed = seq;
            st.used += len;
            let active = st.segments.back_mut().expect("an active segment");
            active.1 += len;
            active.1 >= shared.segment_bytes
        };
        shared.changed.notify_all();
        next = seq;
        for ack in acks.drain(..) {
            ack.settle();
        }
        if seal {
            file = seal_and_start(shared, next)?;
        }
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
    file: &mut File,
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

/// Starts a new active segment at record `next` (the current one is already fsynced).
fn seal_and_start(shared: &Shared, next: u64) -> io::Result<File> {
    let f = create_segment(&shared.dir, next)?;
    shared.state().segments.push_back((next, 0));
    Ok(f)
}
