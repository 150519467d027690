//! The model stage: ONNX Runtime sessions over the model contract.

pub mod runtime;
