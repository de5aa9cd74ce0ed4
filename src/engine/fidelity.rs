//! How closely one loaded model follows another on the same text: the measure behind a lossy option (the int8 KV
//! cache, a quantized output layer) on a trained checkpoint, where random-weight fixtures say little.
//!
//! Both models read the same token ids one at a time through their KV caches (teacher forcing), so every
//! position's prediction attends over every earlier position as stored by each model: the error a cache format
//! adds grows with the context, and this sees it at every length up to the text's.

use std::sync::Arc;

use super::sampler::argmax;
use super::{EngineError, Model};

/// Agreement of a candidate's next-token distributions with a reference's over one text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fidelity {
    /// Positions compared (the text's tokens but the last).
    pub positions: usize,
    /// Mean KL divergence `KL(reference || candidate)` in nats per position.
    pub mean_kl: f64,
    /// The largest KL divergence at one position.
    pub max_kl: f64,
    /// Share of positions where both models' most likely next tokens are the same.
    pub top1_agreement: f64,
    /// Mean negative log-likelihood of the text's next tokens, in nats: the reference's.
    pub reference_nll: f64,
    /// The same for the candidate.
    pub candidate_nll: f64,
}

/// Compares `candidate` with `reference` over `ids` (at least two tokens, within both models' context).
pub fn compare(
    reference: &Arc<Model>,
    candidate: &Arc<Model>,
    ids: &[u32],
) -> Result<Fidelity, EngineError> {
    if ids.len() < 2 {
        return Err(EngineError::InvalidParam {
            name: "text",
            message: "a comparison needs two tokens or more".into(),
        });
    }
    let context = reference
        .meta
        .context_length
        .min(candidate.meta.context_length);
    if ids.len() > context {
        return Err(EngineError::PromptTooLong {
            tokens: ids.len(),
            context,
        });
    }
    let (mut a, mut b) = (reference.session()?, candidate.session()?);
    let (mut kl_sum, mut max_kl, mut agree, mut nll_a, mut nll_b) = (0.0, 0f64, 0, 0.0, 0.0);
    let positions = ids.len() - 1;
    for (i, &id) in ids[..positions].iter().enumerate() {
        let (la, lb) = (a.forward(&[id])?, b.forward(&[id])?);
        agree += usize::from(argmax(&la) == argmax(&lb));
        let (p, q) = (log_softmax(&la), log_softmax(&lb));
        let kl: f64 = p
            .iter()
            .zip(&q)
            .map(|(&lp, &lq)| lp.exp() * (lp - lq))
            .sum();
        kl_sum += kl;
        max_kl = max_kl.max(kl);
        let next = ids[i + 1] as usize;
        nll_a -= p[next];
        nll_b -= q[next];
    }
    let n = positions as f64;
    Ok(Fidelity {
        positions,
        mean_kl: kl_sum / n,
        max_kl,
        top1_agreement: agree as f64 / n,
        reference_nll: nll_a / n,
        candidate_nll: nll_b / n,
    })
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    let log_z = m + sum.ln();
    logits.iter().map(|&v| v as f64 - log_z).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalizes_and_keeps_the_order() {
        let p = log_softmax(&[1.0, 3.0, 2.0]);
        let total: f64 = p.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((p[1] - p[0] - 2.0).abs() < 1e-12);
    }
}
