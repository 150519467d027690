//! mindstream: shopping-psychology signals from e-commerce events.

pub mod config;
pub mod event;
pub mod model;
pub mod privacy;
pub mod proto;
pub mod render;
pub mod tokenize;
pub mod train;
pub mod window;
