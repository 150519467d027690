//! Integration tests: the real binaries against a real Kafka-protocol broker (Tansu), the
//! shipped model, and real public data.

mod actions;
mod bad_input;
mod cli;
mod console;
mod delivery;
mod deploy;
mod explanations;
mod kafka_path;
mod observability;
mod precision;
mod privacy;
mod support;
mod tls;
