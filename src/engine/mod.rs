//! The inference engine: an immutable [`Model`] shared as `Arc<Model>`, [`Session`]s holding their own KV cache,
//! sampling, chat templates, and the [`Engine`] thread that runs validated requests off the async runtime.
//!
//! Loading: [`prepare`] adapts the exported graph (KV cache as op state, weights by reference), tract parses it
//! into bitnetd's own [`ops`] (fused linears, attention over [`kv`] pages, the embedding lookup) reading
//! [`weights`] in place, and every forward pass runs their parallel parts on the model's `crate::team`. Loading
//! also fixes the allocator's mmap threshold (`alloc`), so that a long prompt's activations go back to the system.

mod alloc;
pub mod chat;
mod error;
pub mod fidelity;
pub mod kv;
mod model;
pub mod ops;
pub mod prepare;
pub mod request;
pub mod sampler;
mod session;
pub mod text;
pub mod tuner;
pub mod weights;
mod worker;

pub use chat::Message;
pub use error::EngineError;
pub use kv::KvFormat;
pub use model::{LoadOptions, Model, PlanSummary, ScreenCounts};
pub use ops::screen::OutputLayer;
pub use request::{GenerateParams, Prompt, ValidatedRequest};
pub use sampler::SamplingParams;
pub use session::{FinishReason, Generation, Observer, Session, TokenEvent, PREFILL_CHUNK};
pub use weights::WeightResidency;
pub use worker::{
    Backend, CancelToken, Engine, EngineHealth, EngineOptions, JobEvent, JobHandle, JobOptions,
};
