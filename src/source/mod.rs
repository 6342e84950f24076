//! Sources produce [`Message`](crate::message::Message)s for the pipeline: [`mqtt`], a
//! client of an external broker, and the embedded broker ([`crate::broker`]), whose client
//! connections are sources too. Every connection of either hands its messages over through
//! an [`intake::Intake`], the one piece that owns settlement reporting, the ordered
//! acknowledgements, the QoS 0 policy and the hand-off to the spool or the pipeline.

pub mod intake;
pub mod mqtt;

use tokio_util::sync::CancellationToken;

use intake::Handoff;

/// What the app runs to get messages: [`mqtt::External`], or the embedded broker once
/// it is listening ([`crate::broker::Listening`]).
pub trait Source: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Hands messages over until `stop`; after it takes no new ones (they stay
    /// unacknowledged, so their senders send them again later) but goes on acknowledging
    /// those that settle, until `done`.
    fn run(
        self,
        handoff: Handoff,
        stop: CancellationToken,
        done: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
