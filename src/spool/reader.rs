//! The spool's reader: hands written records to the pipeline in order, each with an
//! [`Ack`] that marks it settled in the spool's window. Records go in batches of up to
//! [`HAND_OFF`], each taking its room in the pipeline's queue at once: when the pipeline
//! is the slower side, the reader wakes once per batch, not once per record.

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
        let written = {
            let mut st = shared.state();
            loop {
                if stop.is_cancelled() {
                    return Ok(());
                }
                if st.written > next {
                    break st.written;
                }
                st = shared
                    .appended
                    .wait_timeout(st, RECHECK)
                    .expect("spool state lock")
                    .0;
            }
        };
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
                    shared.window.dispatched(d.seq, d.message.received_at);
                    next = d.seq + 1;
                    let mut msg = d.message;
                    msg.ack = Ack::new(Settle {
                        shared: Arc::clone(shared),
                        seq: d.seq,
                    });
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
