//! `mindstream-train`: from event history to the model the processor runs.

pub mod dataset;
pub mod export;
pub mod gpt2;
