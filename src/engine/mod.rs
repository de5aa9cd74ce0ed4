//! The inference engine: an immutable [`Model`] shared as `Arc<Model>`, [`Session`]s holding their own KV cache,
//! sampling, chat templates, and the [`Engine`] thread that runs validated requests off the async runtime.

pub mod chat;
mod error;
pub mod linear_op;
mod model;
pub mod request;
pub mod sampler;
mod session;
pub mod text;
mod worker;

pub use chat::Message;
pub use error::EngineError;
pub use model::{LoadOptions, Model};
pub use request::{GenerateParams, Prompt, ValidatedRequest};
pub use sampler::SamplingParams;
pub use session::{FinishReason, Generation, Observer, Session, TokenEvent, PREFILL_CHUNK};
pub use worker::{
    Backend, CancelToken, Engine, EngineHealth, EngineOptions, JobEvent, JobHandle, JobOptions,
};
