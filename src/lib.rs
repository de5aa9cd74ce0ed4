//! bitnetd: an edge daemon that runs BitNet b1.58 models through tract.
//!
//! Module map:
//! - [`hf`]: reading Hugging Face BitNet checkpoints (config, safetensors, ternary weights).
//! - [`onnx`]: writing the ONNX graph (builder, BitNet decoder).
//! - [`export`]: `bitnetd export`, checkpoint directory to model directory.
//! - [`meta`]: `bitnetd.json`, the metadata beside the ONNX file.
//! - [`engine`]: loading a model, sessions with their KV cache, sampling, chat templates, the engine thread.
//! - [`default_model`]: where the shipped default model lives.

pub mod default_model;
pub mod engine;
pub mod export;
pub mod hf;
pub mod meta;
pub mod onnx;
