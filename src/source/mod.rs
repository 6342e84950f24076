//! Sources produce [`Message`](crate::message::Message)s for the pipeline. For now one
//! kind: [`mqtt`], a client of an external broker.

pub mod mqtt;
