//! `mindstream-train`: from event history to the model the processor runs.
//!
//! [`build`] runs the whole path; [`dataset`] makes point-in-time examples with the
//! processor's own window and render code; [`bpe`] trains the tokenizer, or [`pretrained`]
//! loads a Hugging Face GPT-2 to start from; [`gpt2`] is the model and its language-model
//! trainer, [`checkpoint`] its resumable checkpoints; [`features`], [`linear`] and [`fit`]
//! learn the heads; [`frozen`] fits heads on any ONNX GPT-2 without training it; [`export`]
//! writes the ONNX graph and [`precision`] its float16 variant; [`catalog`] defines the
//! signals. [`calibrate`] fits the Platt scaling of the heads, [`evaluate`] measures the model
//! and its baselines with [`metrics`], and [`report`] writes the evaluation report.

pub mod bpe;
pub mod build;
pub mod calibrate;
pub mod catalog;
pub mod checkpoint;
pub mod dataset;
pub mod evaluate;
pub mod export;
pub mod features;
pub mod finetune;
pub mod fit;
pub mod frozen;
pub mod gpt2;
pub mod linear;
pub mod metrics;
pub mod precision;
pub mod prefix;
pub mod pretrained;
pub mod report;
#[cfg(test)]
pub(crate) mod testing;
