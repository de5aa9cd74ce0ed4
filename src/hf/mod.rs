//! Reading Hugging Face BitNet checkpoints: `config.json` ([`config`]) and `*.safetensors` ([`weights`]).

pub mod config;
pub mod weights;

pub use config::{Activation, Architecture, Family, LinearClass};
pub use weights::{TernaryMatrix, Weights};

use std::path::Path;

/// Errors reading a checkpoint. Each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json: {0}")]
    Config(String),
    #[error("unsupported checkpoint: {0}")]
    Unsupported(String),
    #[error("safetensors {file}: {message}")]
    Safetensors { file: String, message: String },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name}: {message}")]
    BadTensor { name: String, message: String },
}

impl HfError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        HfError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn bad(name: &str, message: impl Into<String>) -> Self {
        HfError::BadTensor {
            name: name.to_string(),
            message: message.into(),
        }
    }
}
