//! `bitnetd.json`, the small metadata file beside `model.onnx` in an exported model directory: what the engine
//! needs to know that the ONNX graph does not say (special token ids, context length, chat template).

use crate::onnx::bitnet::{EmbeddingFormat, HeadFormat};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::hf::{Activation, Family, LinearClass};

/// File name of the metadata inside a model directory.
pub const META_FILE: &str = "bitnetd.json";
/// File name of the ONNX graph inside a model directory.
pub const ONNX_FILE: &str = "model.onnx";
/// File name of the ONNX external data inside a model directory.
pub const DATA_FILE: &str = "model.onnx.data";
/// File name of the tokenizer inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The metadata format this build reads and writes.
/// 2: the fused `ai.bitnetd` ops (version 1 used standard ops around `BitLinear`).
pub const FORMAT_VERSION: u32 = 2;

/// The shape of the exported network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchitectureMeta {
    pub family: Family,
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub activation: Activation,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub tied_embeddings: bool,
    /// The `quantization_config.linear_class` convention the scales were read with.
    pub linear_class: LinearClass,
    /// How ternary weights are stored in the ONNX file: `2bit` (packed as in `kernels::pack`).
    pub ternary_storage: String,
    /// How the output layer is stored.
    #[serde(default)]
    pub head_format: HeadFormat,
    /// How the embedding lookup table is stored.
    #[serde(default)]
    pub embedding_format: EmbeddingFormat,
}

/// Contents of `bitnetd.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format_version: u32,
    /// A short name for logs and replies (the source directory's name by default).
    pub name: String,
    pub architecture: ArchitectureMeta,
    /// The longest sequence (prompt + completion) the model accepts.
    pub context_length: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Generation stops at any of these (end of text, end of turn).
    pub stop_token_ids: Vec<u32>,
    /// Jinja chat template (Hugging Face convention), if the checkpoint has one.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Parameters in the exported network (ternary + float).
    pub parameters: u64,
    /// The bitnetd version that exported it.
    pub exported_by: String,
    /// Sampling defaults from the checkpoint's `generation_config.json`.
    #[serde(default)]
    pub generation_defaults: GenerationDefaults,
}

/// Sampling defaults a checkpoint ships (transformers' `generation_config.json`); a request's own values win.
/// `None` leaves bitnetd's built-in default (greedy, no penalty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// Reads transformers' semantics: `do_sample: true` samples with `temperature` (1.0), `top_k` (50) and
    /// `top_p` (1.0); otherwise decoding is greedy. `repetition_penalty` applies either way.
    pub fn from_generation_config(cfg: &serde_json::Value) -> Self {
        let f = |k: &str| {
            cfg.get(k)
                .and_then(serde_json::Value::as_f64)
                .map(|v| v as f32)
        };
        let sample = cfg
            .get("do_sample")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        GenerationDefaults {
            temperature: sample.then(|| f("temperature").unwrap_or(1.0)),
            top_k: sample.then(|| {
                cfg.get("top_k")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(50) as usize
            }),
            top_p: sample.then(|| f("top_p").unwrap_or(1.0)),
            repetition_penalty: f("repetition_penalty"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_follows_transformers_defaults() {
        let d = GenerationDefaults::from_generation_config(
            &serde_json::json!({"do_sample": true, "temperature": 0.6}),
        );
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.repetition_penalty),
            (Some(0.6), Some(50), Some(1.0), None)
        );
        let d = GenerationDefaults::from_generation_config(
            &serde_json::json!({"repetition_penalty": 1.2}),
        );
        assert_eq!(
            d,
            GenerationDefaults {
                repetition_penalty: Some(1.2),
                ..Default::default()
            }
        );
    }
}

/// Errors reading a model directory's metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ModelMeta {
    /// Reads and checks `dir/bitnetd.json`.
    pub fn read(dir: &Path) -> Result<Self, MetaError> {
        let path = dir.join(META_FILE);
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| MetaError::Io {
            path: p.clone(),
            source,
        })?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| MetaError::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(MetaError::Invalid {
                path: p,
                message: format!(
                    "format_version {} (this bitnetd reads {FORMAT_VERSION}): re-export the model",
                    meta.format_version
                ),
            });
        }
        Ok(meta)
    }

    /// Writes `dir/bitnetd.json`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("metadata serializes");
        std::fs::write(dir.join(META_FILE), text + "\n")
    }
}
