//! mindstream: shopping-psychology signals from e-commerce events.

pub mod cli;
pub mod config;
pub mod event;
pub mod http;
pub mod import;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod offsets;
pub mod ops;
pub mod pipeline;
pub mod privacy;
pub mod proto;
pub mod render;
pub mod signals;
pub mod sink;
pub mod source;
pub mod state;
pub mod time;
pub mod tokenize;
pub mod train;
pub mod window;
