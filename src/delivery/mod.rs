//! Delivery bookkeeping shared by sources and sinks: settlement shares ([`Ack`]) and the
//! in-order acknowledgement sequencer.

mod ack;
mod sequencer;

pub use ack::{Ack, Settled};
pub use sequencer::AckSequencer;
