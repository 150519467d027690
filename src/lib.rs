//! mindstream: shopping-psychology signals from e-commerce events.

pub mod model;
pub mod train;
