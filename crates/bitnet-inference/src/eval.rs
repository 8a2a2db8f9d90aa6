//! Model evaluation: perplexity the way llama.cpp's `llama-perplexity` computes it.

use crate::backend::Backend;
use crate::backend::BatchEntry;
use crate::{Error, Result};

/// The logits of every position of `ids` run as one sequence from position 0:
/// `[ids.len(), vocab]`, row-major. This is `bitnet logits`.
pub fn sequence_logits(model: &dyn Backend, ids: &[u32]) -> Result<Vec<f32>> {
    let n = ids.len();
    let mut state = model.new_state(1, n.max(1), n.max(1))?;
    let batch: Vec<BatchEntry> = ids
        .iter()
        .enumerate()
        .map(|(pos, &token)| BatchEntry {
            token,
            pos,
            slot: 0,
            logits: true,
        })
        .collect();
    model.forward(&batch, state.as_mut())?;
    let mut all = Vec::with_capacity(n * model.config().vocab_size);
    for i in 0..n {
        all.extend_from_slice(state.logits(i));
    }
    Ok(all)
}

/// Result of a perplexity run.
#[derive(Debug, Clone)]
pub struct Perplexity {
    pub chunks: usize,
    /// Tokens scored (the second half of each chunk, less one).
    pub scored: usize,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
}

impl Perplexity {
    pub fn value(&self) -> f64 {
        self.mean_nll.exp()
    }
}

/// Splits `tokens` into chunks of `context` tokens (at most `max_chunks`), replaces the
/// first token of each chunk with `bos` when given (as llama.cpp does for models that add
/// BOS), runs each chunk from position 0, and scores the predictions of tokens
/// `context/2 + 1 .. context`. `on_chunk(i, running_ppl)` reports progress.
pub fn perplexity(
    model: &dyn Backend,
    tokens: &[u32],
    context: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
    batch_size: usize,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity> {
    if context < 4 {
        return Err(Error::Invalid(format!(
            "context {context} is too small (at least 4)"
        )));
    }
    let available = tokens.len() / context;
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    if chunks == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens; perplexity needs at least one chunk of {context}",
            tokens.len()
        )));
    }
    let first = context / 2;
    let batch_size = batch_size.clamp(1, context);
    let mut state = model.new_state(1, context, batch_size)?;
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    let mut batch = Vec::with_capacity(batch_size);
    let mut row = vec![0.0f32; model.config().vocab_size];
    for c in 0..chunks {
        let chunk = &tokens[c * context..(c + 1) * context];
        for start in (0..context).step_by(batch_size) {
            let end = (start + batch_size).min(context);
            batch.clear();
            batch.extend((start..end).map(|pos| BatchEntry {
                token: match (pos, bos) {
                    (0, Some(b)) => b,
                    _ => chunk[pos],
                },
                pos,
                slot: 0,
                logits: pos >= first && pos + 1 < context,
            }));
            model.forward(&batch, state.as_mut())?;
            let mut k = 0;
            for pos in start..end {
                if pos >= first && pos + 1 < context {
                    row.copy_from_slice(state.logits(k));
                    k += 1;
                    nll += negative_log_likelihood(&row, chunk[pos + 1]);
                    scored += 1;
                }
            }
        }
        on_chunk(c, (nll / scored as f64).exp());
    }
    Ok(Perplexity {
        chunks,
        scored,
        mean_nll: nll / scored as f64,
    })
}

/// `-log softmax(logits)[target]`, computed in f64.
fn negative_log_likelihood(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let v = super::negative_log_likelihood(&[0.5; 8], 3);
        assert!((v - 8f64.ln()).abs() < 1e-12);
    }
}
