//! The spool's reader: hands written records to the pipeline in order, each with an
//! [`Ack`] that marks it settled in the spool's window. Records go in batches of up to
//! [`HAND_OFF`], each taking its room in the pipeline's queue at once: when the pipeline
//! is the slower side, the reader wakes once per batch, not once per record.
//!
//! The reader claims what was written and not yet handed over, and hands it over; while
//! it waits (caught up), the writer hands groups over itself (see [`super::writer`]).
//! Its next claim then starts after those, where the writer noted it on disk.

use std::io;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::segment::{self, Next, SegmentReader};
use super::{RECHECK, Shared};
use crate::delivery::{Ack, Settled};
use crate::message::Message;

/// Most records handed to the pipeline at once (as many as the router evaluates at once).
pub const HAND_OFF: usize = crate::pipeline::EVAL_BATCH;

/// Marks a spooled record settled.
struct Settle {
    shared: Arc<Shared>,
    seq: u64,
}

impl Settled for Settle {
    fn settled(&self) {
        self.shared.window.settle(self.seq);
    }
}

/// Record `seq` (`msg`) goes to the pipeline: the window counts it, and its ack settles
/// it there.
pub(super) fn dispatch(shared: &Arc<Shared>, seq: u64, msg: &mut Message) {
    shared.window.dispatched(seq, msg.received_at);
    msg.ack = Ack::new(Settle {
        shared: Arc::clone(shared),
        seq,
    });
}

/// Runs until `stop`, or until the pipeline goes away.
pub fn run(
    shared: &Arc<Shared>,
    start: u64,
    out: mpsc::Sender<Message>,
    stop: &CancellationToken,
    handle: &Handle,
) -> io::Result<()> {
    let mut next = start;
    // The segment being read: its first record number and a reader.
    let mut current: Option<(u64, SegmentReader)> = None;
    loop {
        let (from, written, handed_at) = {
            let mut st = shared.state();
            loop {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if st.written > st.handed {
                    let claim = (st.handed, st.written, st.handed_at);
                    st.handed = st.written;
                    st.reading = true;
                    break claim;
                }
                st.reading = false;
                st = shared
                    .appended
                    .wait_timeout(st, RECHECK)
                    .expect("spool state lock")
                    .0;
            }
        };
        if from != next {
            // The writer handed `next..from` over: continue on disk after them.
            let (seg, offset) = handed_at;
            let (first, mut reader) = open(shared, |f| f <= from, true)?;
            if first == seg {
                reader.seek(offset)?;
            }
            current = Some((first, reader));
            next = from;
        }
        // A batch never asks for more room than the queue has.
        let hand_off = HAND_OFF.min(out.max_capacity());
        let mut batch = Vec::with_capacity(hand_off);
        while next < written {
            let (first, seg) = match &mut current {
                Some(c) => c,
                None => current.insert(open(shared, |f| f <= next, true)?),
            };
            match seg.next()? {
                Next::Record(d) if d.seq < next => {} // before where this run starts
                Next::Record(d) => {
                    if d.seq > next {
                        tracing::error!(
                            missing = d.seq - next,
                            from = next,
                            "spool: records missing (unreadable segment); they are lost"
                        );
                    }
                    next = d.seq + 1;
                    let mut msg = d.message;
                    dispatch(shared, d.seq, &mut msg);
                    batch.push(msg);
                    if batch.len() == hand_off && !send(&out, &mut batch, stop, handle) {
                        return Ok(());
                    }
                }
                end => {
                    if let Next::Broken(why) = end {
                        tracing::error!(segment = %segment::path(&shared.dir, *first).display(), offset = seg.offset, %why, "spool: unreadable record; skipping the rest of this segment");
                    }
                    let after = *first;
                    current = Some(open(shared, |f| f > after, false)?);
                }
            }
        }
        if !batch.is_empty() && !send(&out, &mut batch, stop, handle) {
            return Ok(());
        }
    }
}

/// Opens the last segment whose first record passes `pick` (`last`), or the first one.
fn open(
    shared: &Shared,
    pick: impl Fn(u64) -> bool,
    last: bool,
) -> io::Result<(u64, SegmentReader)> {
    let first = {
        let st = shared.state();
        let mut found = st.segments.iter().map(|&(f, _)| f).filter(|&f| pick(f));
        if last { found.last() } else { found.next() }
    };
    let first = first.ok_or_else(|| io::Error::other("spool: a written record has no segment"))?;
    Ok((
        first,
        SegmentReader::open(&segment::path(&shared.dir, first))?,
    ))
}

/// Hands `batch` on (leaving it empty), waiting while the pipeline has no room for all
/// of it; false when stopping or when the pipeline has gone (the records stay unsettled
/// and are delivered again next run).
fn send(
    out: &mpsc::Sender<Message>,
    batch: &mut Vec<Message>,
    stop: &CancellationToken,
    handle: &Handle,
) -> bool {
    let n = batch.len();
    let room = match out.try_reserve_many(n) {
        Ok(room) => room,
        Err(mpsc::error::TrySendError::Closed(())) => return false,
        Err(mpsc::error::TrySendError::Full(())) => {
            let waited = handle.block_on(async {
                tokio::select! {
                    r = out.reserve_many(n) => r.ok(),
                    _ = stop.cancelled() => None,
                }
            });
            match waited {
                Some(room) => room,
                None => return false,
            }
        }
    };
    for (place, msg) in room.zip(batch.drain(..)) {
        place.send(msg);
    }
    true
}
