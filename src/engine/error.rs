/// Errors of the engine. Request errors (the caller's fault) are told apart from engine faults by
/// [`EngineError::is_request_error`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("loading model from {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid {name}: {message}")]
    InvalidParam { name: &'static str, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the engine queue is full ({capacity} requests waiting)")]
    Busy { capacity: usize },
    #[error("the deadline passed after {} ms in the queue", waited.as_millis())]
    DeadlineExceeded { waited: std::time::Duration },
    #[error("the request expired after {} ms in the queue", waited.as_millis())]
    Expired { waited: std::time::Duration },
    #[error("the engine has shut down")]
    ShutDown,
    #[error("inference failed: {0}")]
    Inference(String),
}

impl EngineError {
    /// True when the request itself is at fault (bad input), false for overload and engine faults.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            EngineError::EmptyPrompt
                | EngineError::PromptTooLong { .. }
                | EngineError::InvalidParam { .. }
                | EngineError::ChatTemplate(_)
        )
    }

    pub(crate) fn inference(e: impl std::fmt::Display) -> Self {
        EngineError::Inference(format!("{e:#}"))
    }
}
