//! Generation requests: what a caller asks for ([`Prompt`], [`GenerateParams`]), and the [`ValidatedRequest`]
//! that only [`Model::prepare`](super::Model::prepare) makes, which is the only thing a session runs.

use super::chat::Message;
use super::sampler::SamplingParams;
use super::EngineError;

/// Longest stop string, in bytes, and most stop strings per request.
const MAX_STOP_LEN: usize = 256;
const MAX_STOPS: usize = 16;

/// What to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS).
    Text(String),
    /// Chat messages, rendered by the model's chat template.
    Chat(Vec<Message>),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// Generation options.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate (clipped to what fits in the context).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the answer.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (besides the model's own stop tokens).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: vec![],
            stop_ids: vec![],
        }
    }
}

impl GenerateParams {
    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        let bad = |name, message: String| Err(EngineError::InvalidParam { name, message });
        let s = &self.sampling;
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if !(s.temperature.is_finite() && s.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("{} is not a number >= 0", s.temperature),
            );
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", s.top_p));
        }
        if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("{} is not a number > 0", s.repetition_penalty),
            );
        }
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(|s| s.len() > MAX_STOP_LEN) {
            return bad(
                "stop",
                format!("at most {MAX_STOPS} strings of at most {MAX_STOP_LEN} bytes"),
            );
        }
        Ok(())
    }
}

/// A request checked against a model: tokenized, within the context, with valid parameters.
#[derive(Debug, Clone)]
pub struct ValidatedRequest {
    prompt_ids: Vec<u32>,
    params: GenerateParams,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
}

impl ValidatedRequest {
    pub(crate) fn new(
        prompt_ids: Vec<u32>,
        params: GenerateParams,
        context: usize,
        model_stops: &[u32],
    ) -> Result<Self, EngineError> {
        if prompt_ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_ids.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: prompt_ids.len(),
                context,
            });
        }
        let max_new_tokens = params.max_tokens.min(context - prompt_ids.len());
        let mut stop_ids = model_stops.to_vec();
        stop_ids.extend(&params.stop_ids);
        Ok(ValidatedRequest {
            prompt_ids,
            params,
            max_new_tokens,
            stop_ids,
        })
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    pub fn params(&self) -> &GenerateParams {
        &self.params
    }

    /// Tokens that may be generated: `max_tokens`, clipped to the context left after the prompt.
    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    /// Lowers the most tokens generated to `n` (at least 1); never raises it.
    pub fn shorten_to(&mut self, n: usize) {
        self.max_new_tokens = self.max_new_tokens.min(n.max(1));
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_longer_than_context_is_a_typed_error() {
        let e = ValidatedRequest::new(vec![1; 10], GenerateParams::default(), 10, &[]).unwrap_err();
        assert!(matches!(
            e,
            EngineError::PromptTooLong {
                tokens: 10,
                context: 10
            }
        ));
    }

    #[test]
    fn max_tokens_is_clipped_to_the_context() {
        let r = ValidatedRequest::new(vec![1; 6], GenerateParams::default(), 10, &[2]).unwrap();
        assert_eq!(r.max_new_tokens(), 4);
        assert_eq!(r.stop_ids(), &[2]);
    }

    #[test]
    fn bad_parameters_are_named() {
        let mut p = GenerateParams::default();
        p.sampling.top_p = 0.0;
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam { name: "top_p", .. })
        ));
        let mut p = GenerateParams::default();
        p.sampling.temperature = f32::NAN;
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam {
                name: "temperature",
                ..
            })
        ));
        let p = GenerateParams {
            max_tokens: 0,
            ..Default::default()
        };
        assert!(matches!(
            p.validate(),
            Err(EngineError::InvalidParam {
                name: "max_tokens",
                ..
            })
        ));
    }
}
