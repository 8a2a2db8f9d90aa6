//! Sampling and the generation loop that every front end uses.

use crate::model::{BatchEntry, ForwardState, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::time::{Duration, Instant};

/// A small, fast, seedable generator (SplitMix64): the same seed gives the same text on
/// every platform and build.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables; applied to the last `repeat_last_n` tokens (prompt included).
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5EED,
        }
    }
}

/// Chooses tokens; owns its candidate buffer so sampling allocates nothing per token.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Order: repetition penalty, then greedy if temperature is 0; else top-k, temperature,
    /// softmax, top-p, min-p, and a draw.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            for &t in &history[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let max = c[0].1;
        let mut sum = 0.0f32;
        for (_, l) in c.iter_mut() {
            *l = ((*l - max) / p.temperature).exp();
            sum += *l;
        }
        for (_, l) in c.iter_mut() {
            *l /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, (_, pr)) in c.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|(_, pr)| *pr >= threshold).count();
            c.truncate(keep.max(1));
        }
        let total: f32 = c.iter().map(|(_, pr)| pr).sum();
        let mut r = self.rng.next_f32() * total;
        for &(id, pr) in c.iter() {
            if r < pr {
                return id;
            }
            r -= pr;
        }
        c[c.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Turns token bytes into text as they come, holding back an incomplete UTF-8 character
/// until its last byte arrives.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // An invalid sequence (not just an unfinished one): emit it replaced.
                Some(_) => self.pending.len(),
                None => e.valid_up_to(),
            },
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// Whatever is left at the end, invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stopped_by_eos: bool,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode rate over the tokens produced after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Runs `prompt` (a full sequence of ids, BOS included if wanted) through `model` in
/// batches of `state.max_batch()`, then generates up to `max_new_tokens`, calling
/// `on_text` with each complete piece of text. Uses slot 0 of `state` from position 0.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    state: &mut ForwardState,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    if prompt.len() + max_new_tokens > state.context() {
        return Err(Error::Invalid(format!(
            "prompt of {} tokens plus {} new tokens exceeds the context size {}",
            prompt.len(),
            max_new_tokens,
            state.context()
        )));
    }
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut history: Vec<u32> = Vec::with_capacity(prompt.len() + max_new_tokens);
    history.extend_from_slice(prompt);
    let mut batch: Vec<BatchEntry> = Vec::with_capacity(state.max_batch());
    let start = Instant::now();
    for (c, chunk) in prompt.chunks(state.max_batch()).enumerate() {
        batch.clear();
        let base = c * state.max_batch();
        batch.extend(chunk.iter().enumerate().map(|(i, &token)| BatchEntry {
            token,
            pos: base + i,
            slot: 0,
            logits: base + i + 1 == prompt.len(),
        }));
        model.forward(&batch, state)?;
    }
    stats.prefill_time = start.elapsed();

    let vocab = model.config.vocab_size;
    let mut logits = vec![0.0f32; vocab];
    let mut text = Utf8Stream::default();
    let mut generated = Vec::with_capacity(max_new_tokens);
    let decode_start = Instant::now();
    for step in 0..max_new_tokens {
        logits.copy_from_slice(state.logits(0));
        let next = sampler.sample(&mut logits, &history);
        if stop_ids.contains(&next) {
            stats.stopped_by_eos = true;
            break;
        }
        generated.push(next);
        history.push(next);
        let piece = text.push(&tokenizer.token_bytes(next));
        if !piece.is_empty() {
            on_text(&piece)?;
        }
        if step + 1 == max_new_tokens {
            break;
        }
        let entry = BatchEntry {
            token: next,
            pos: history.len() - 1,
            slot: 0,
            logits: true,
        };
        model.forward(std::slice::from_ref(&entry), state)?;
    }
    let rest = text.finish();
    if !rest.is_empty() {
        on_text(&rest)?;
    }
    stats.decode_time = decode_start.elapsed();
    stats.generated_tokens = generated.len();
    Ok((generated, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let other = SamplingParams {
            seed: 1,
            ..params.clone()
        };
        assert_ne!(draw(&params), draw(&other));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.1, 0.2, 0.9, 0.3], &[]), 2);
        }
    }

    #[test]
    fn draws_follow_the_distribution() {
        // Softmax of ln(1), ln(3) at T=1 is 1/4, 3/4.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        });
        let n = 20000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [0.0, 3f32.ln()], &[]) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.015, "{frac}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let mut logits = [4.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn utf8_stream_holds_split_characters() {
        let mut s = Utf8Stream::default();
        let emoji = "🦀".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&emoji[..2]), "");
        assert_eq!(s.push(&emoji[2..]), "🦀");
        assert_eq!(s.push(&"日".as_bytes()[..1]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
