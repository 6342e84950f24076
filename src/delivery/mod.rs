//! Delivery bookkeeping shared by sources and sinks: settlement shares ([`Ack`]), the
//! in-order acknowledgement sequencer, and the watchdog for messages that stay unsettled.

mod ack;
mod sequencer;
mod watch;

#[cfg(test)]
pub(crate) use ack::Count;
pub use ack::{Ack, Settled};
pub use sequencer::AckSequencer;
pub use watch::Watch;
