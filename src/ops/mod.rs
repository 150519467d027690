//! Operational subcommands of `mindstream`: topic creation, replay of event files into
//! Kafka, a summary of what the signal topic holds, and delete-user requests.

pub mod delete;
pub mod replay;
pub mod summary;
pub mod topics;
