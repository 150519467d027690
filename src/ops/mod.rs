//! Operational subcommands of `mindstream`: topic creation, replay of event files into
//! Kafka, and a summary of what the signal topic holds.

pub mod replay;
pub mod summary;
pub mod topics;
