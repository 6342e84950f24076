//! Sources produce [`Message`](crate::message::Message)s for the pipeline: [`mqtt`], a
//! client of an external broker, and the embedded broker ([`crate::broker`]), whose client
//! connections are sources too. Every connection of either hands its messages over through
//! an [`intake::Intake`], the one piece that owns settlement reporting, the ordered
//! acknowledgements, the QoS 0 policy and the hand-off to the spool or the pipeline.

pub mod intake;
pub mod mqtt;
