//! `mindstream-train`: from event history to the model the processor runs.
//!
//! [`build`] runs the whole path; [`dataset`] makes point-in-time examples with the
//! processor's own window and render code; [`bpe`] trains the tokenizer; [`gpt2`] is the
//! model and its language-model trainer; [`features`], [`linear`] and [`fit`] learn and
//! evaluate the heads; [`export`] writes the ONNX graph; [`catalog`] defines the signals.

pub mod bpe;
pub mod build;
pub mod catalog;
pub mod dataset;
pub mod export;
pub mod features;
pub mod finetune;
pub mod fit;
pub mod gpt2;
pub mod linear;
