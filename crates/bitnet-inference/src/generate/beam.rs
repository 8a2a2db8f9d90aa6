//! Beam search: `beams` hypotheses advanced together, one KV slot each, scored by summed
//! log-probabilities; a finished hypothesis scores `sum / max(1, generated_len) ^
//! length_penalty` (as transformers does). Logit bias and the penalties of the config apply
//! before the log-softmax; temperature and the filters do not.
//!
//! Slots: a child keeps its parent's slot when it is the parent's first child, and only its
//! new token runs; other children take a free slot, which already holds the keys and values of
//! the longest common prefix, and only the rest of their sequence runs.

use super::config::{FinishReason, GenerationConfig, SamplingStrategy};
use super::sampler::{log_softmax, Sampler};
use super::sequence::{Generation, GenerationStats};
use super::stop::StopStrings;
use super::stream::{TokenPieces, Utf8Stream};
use crate::backend::BatchEntry;
use crate::backend::{Backend, BackendState};
use crate::{Error, Result};
use std::time::Instant;

struct Beam {
    tokens: Vec<u32>,
    score: f64,
    slot: usize,
    /// Index of its parent in the previous step's beams.
    parent: usize,
}

struct Hypothesis {
    tokens: Vec<u32>,
    /// Normalised score.
    score: f64,
    /// Ended by an end token or a stop string (not by the length limit).
    stopped: bool,
}

fn text_of(pieces: &TokenPieces, tokens: &[u32]) -> String {
    let mut s = Utf8Stream::default();
    let mut out = String::new();
    for &t in tokens {
        s.push_into(pieces.get(t), &mut out);
    }
    s.finish_into(&mut out);
    out
}

/// Text before the first stop string, and whether one occurred.
fn cut_at_stop(stops: &[String], text: &str) -> (String, bool) {
    let mut m = StopStrings::new(stops);
    let mut out = String::new();
    let stopped = m.push(text, &mut out);
    if !stopped {
        m.finish(&mut out);
    }
    (out, stopped)
}

/// Beam search from `prompt`; `state` needs at least `beams` slots.
pub fn beam_search(
    model: &dyn Backend,
    pieces: &TokenPieces,
    state: &mut dyn BackendState,
    prompt: &[u32],
    config: &GenerationConfig,
    stop_ids: &[u32],
) -> Result<Generation> {
    config.validate().map_err(crate::Error::Invalid)?;
    let SamplingStrategy::BeamSearch {
        beams: n,
        length_penalty,
        early_stopping,
    } = config.strategy
    else {
        return Err(Error::Invalid(
            "beam_search needs SamplingStrategy::BeamSearch".into(),
        ));
    };
    if n == 0 {
        return Err(Error::Invalid("beam search needs at least 1 beam".into()));
    }
    if state.n_slots() < n {
        return Err(Error::Invalid(format!(
            "beam search with {n} beams needs {n} KV slots, the state has {}",
            state.n_slots()
        )));
    }
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    let context = state.context();
    if prompt.len() + config.max_new_tokens > context {
        return Err(Error::Invalid(format!(
            "the prompt of {} tokens plus {} new tokens does not fit the context size {context}",
            prompt.len(),
            config.max_new_tokens
        )));
    }
    let start = Instant::now();
    let vocab = model.config().vocab_size;
    let mut sampler = Sampler::new(config.sampling_params());
    let norm = |score: f64, len: usize| score / (len.max(1) as f64).powf(length_penalty as f64);

    // What each slot's cache holds.
    let mut slot_tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut live = vec![Beam {
        tokens: Vec::new(),
        score: 0.0,
        slot: 0,
        parent: 0,
    }];
    let mut finished: Vec<Hypothesis> = Vec::new();
    let mut logits: Vec<Vec<f32>> = vec![vec![0.0; vocab]; n];
    let mut logprobs = Vec::with_capacity(vocab);
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(vocab);
    let mut batch: Vec<BatchEntry> = Vec::with_capacity(state.max_batch());
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut history = Vec::with_capacity(prompt.len() + config.max_new_tokens);
    let mut first = true;
    let mut len = 0;

    loop {
        // Bring every live beam's slot up to date and get its logits.
        let mut feeds: Vec<(usize, Vec<u32>, usize)> = Vec::new(); // (beam, full, common)
        for (b, beam) in live.iter().enumerate() {
            let mut full = prompt.to_vec();
            full.extend_from_slice(&beam.tokens);
            let held = &slot_tokens[beam.slot];
            let common = held
                .iter()
                .zip(&full)
                .take_while(|(a, b)| a == b)
                .count()
                .min(full.len() - 1);
            feeds.push((b, full, common));
        }
        let mut entries: Vec<(BatchEntry, Option<usize>)> = Vec::new();
        for (b, full, common) in &feeds {
            let slot = live[*b].slot;
            for pos in *common..full.len() {
                entries.push((
                    BatchEntry {
                        token: full[pos],
                        pos,
                        slot,
                        logits: pos + 1 == full.len(),
                    },
                    (pos + 1 == full.len()).then_some(*b),
                ));
            }
            slot_tokens[slot].clone_from(full);
        }
        for chunk in entries.chunks(state.max_batch()) {
            batch.clear();
            batch.extend(chunk.iter().map(|(e, _)| *e));
            model.forward(&batch, state)?;
            for (row, b) in chunk.iter().filter_map(|(_, b)| *b).enumerate() {
                logits[b].copy_from_slice(state.logits(row));
            }
        }
        if first {
            stats.prefill_time = start.elapsed();
            stats.time_to_first_token = stats.prefill_time;
            first = false;
        }

        // Candidates: the 2n best continuations of every beam.
        let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(2 * n * live.len());
        for (b, beam) in live.iter().enumerate() {
            history.clear();
            history.extend_from_slice(prompt);
            history.extend_from_slice(&beam.tokens);
            sampler.apply_bias_and_penalties(&mut logits[b], &history);
            log_softmax(&logits[b], &mut logprobs);
            top.clear();
            top.extend(logprobs.iter().enumerate().map(|(i, &l)| (l, i as u32)));
            let k = (2 * n).min(top.len());
            let by = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if k < top.len() {
                top.select_nth_unstable_by(k - 1, by);
            }
            top.truncate(k);
            cands.extend(top.iter().map(|&(l, t)| (beam.score + l as f64, b, t)));
        }
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        len += 1;

        let mut next: Vec<Beam> = Vec::with_capacity(n);
        for (rank, &(score, b, t)) in cands.iter().enumerate() {
            if next.len() == n {
                break;
            }
            let parent = &live[b];
            if stop_ids.contains(&t) {
                if rank < n {
                    finished.push(Hypothesis {
                        tokens: parent.tokens.clone(),
                        score: norm(score, parent.tokens.len()),
                        stopped: true,
                    });
                }
                continue;
            }
            let mut tokens = parent.tokens.clone();
            tokens.push(t);
            if !config.stop_strings.is_empty()
                && cut_at_stop(&config.stop_strings, &text_of(pieces, &tokens)).1
            {
                finished.push(Hypothesis {
                    score: norm(score, tokens.len()),
                    tokens,
                    stopped: true,
                });
                continue;
            }
            next.push(Beam {
                tokens,
                score,
                slot: usize::MAX,
                parent: b,
            });
        }
        finished.sort_by(|a, b| b.score.total_cmp(&a.score));
        finished.truncate(n);

        // Done?
        let best_live = next
            .iter()
            .map(|b| b.score)
            .fold(f64::NEG_INFINITY, f64::max);
        let done = next.is_empty()
            || len >= config.max_new_tokens
            || (finished.len() >= n
                && (early_stopping || finished[n - 1].score >= norm(best_live, len)));
        if done {
            if finished.len() < n || len >= config.max_new_tokens {
                for b in next {
                    let score = norm(b.score, b.tokens.len());
                    finished.push(Hypothesis {
                        tokens: b.tokens,
                        score,
                        stopped: false,
                    });
                }
            }
            break;
        }

        // Slots: a parent's first child keeps its slot; the others take the free ones.
        let mut taken = vec![false; n];
        for beam in next.iter_mut() {
            let ps = live[beam.parent].slot;
            if !taken[ps] {
                taken[ps] = true;
                beam.slot = ps;
            }
        }
        for beam in next.iter_mut().filter(|b| b.slot == usize::MAX) {
            let free = taken.iter().position(|t| !t).expect("n slots for n beams");
            taken[free] = true;
            beam.slot = free;
        }
        live = next;
    }

    finished.sort_by(|a, b| b.score.total_cmp(&a.score));
    let best = finished
        .into_iter()
        .next()
        .ok_or_else(|| Error::Invalid("beam search produced no hypothesis".into()))?;
    let (text, cut) = cut_at_stop(&config.stop_strings, &text_of(pieces, &best.tokens));
    stats.generated_tokens = best.tokens.len();
    stats.decode_time = start.elapsed() - stats.prefill_time;
    let reason = if best.stopped || cut {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };
    stats.finish_reason = Some(reason);
    Ok(Generation {
        text,
        tokens: best.tokens,
        finish_reason: reason,
        stats,
    })
}
