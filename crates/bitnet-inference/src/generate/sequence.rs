//! One sequence being generated, and the runner that advances many of them together: one
//! forward call per step, each sequence in its own KV slot, prompts prefilled in chunks next
//! to other sequences' decode tokens.

use super::config::{ContextOverflow, FinishReason, GenerationConfig};
use super::constraint::{TokenConstraint, TokenMask};
use super::sampler::{log_softmax, Sampler};
use super::stop::StopStrings;
use super::stream::{TokenPieces, Utf8Stream};
use crate::backend::BatchEntry;
use crate::backend::{Backend, BackendState};
use crate::{Error, Result};
use std::time::{Duration, Instant};

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens of the prompt, those reused from the KV cache included.
    pub prompt_tokens: usize,
    /// Prompt tokens that were already in the KV cache (not prefilled again).
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    /// From the start to the first token's logits (the prefill).
    pub prefill_time: Duration,
    /// From the first token to the end.
    pub decode_time: Duration,
    /// From the start to the first token chosen.
    pub time_to_first_token: Duration,
    /// How often the sliding window moved.
    pub context_shifts: usize,
    pub finish_reason: Option<FinishReason>,
}

impl GenerationStats {
    /// Prompt tokens actually prefilled per second.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Decode rate over the tokens produced after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    /// The generated ids (the end token, when one stopped it, is not included).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

/// The model's log-probability of a chosen token (softmax of the raw logits, before
/// penalties and temperature, as OpenAI reports them) and of the most likely alternatives.
/// Under a [`TokenConstraint`] the softmax is over the tokens it allowed (the distribution
/// the token was drawn from, renormalised), so the alternatives are tokens that could have
/// been chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One sequence: its tokens, its KV slot, its sampler and stop conditions. Drive it with a
/// [`BatchRunner`] (or see [`super::generate`]). Buffers are reused: a step allocates nothing.
pub struct Sequence {
    slot: usize,
    /// Prompt and generated tokens; the slot's KV cache holds `tokens[..n_cached]`.
    tokens: Vec<u32>,
    n_cached: usize,
    n_prompt: usize,
    n_generated: usize,
    /// Every generated id (kept whole even when the window slides).
    out: Vec<u32>,
    max_new: usize,
    context: usize,
    overflow: ContextOverflow,
    sampler: Sampler,
    logits: Vec<f32>,
    utf8: Utf8Stream,
    stops: StopStrings,
    stop_ids: Vec<u32>,
    piece: String,
    /// Text released and not yet taken.
    delta: String,
    finish: Option<FinishReason>,
    error: Option<String>,
    /// Log-probabilities asked for (the number of alternatives), and those of the last token.
    top_logprobs: Option<usize>,
    logprob_scratch: Vec<f32>,
    last_logprobs: Option<TokenLogprobs>,
    /// The rule over the output, if any, and the mask it fills each step.
    constraint: Option<Box<dyn TokenConstraint>>,
    mask: TokenMask,
    /// Whether the constraint let the output end at this step.
    may_end: bool,
    /// Why the constraint failed (it ends the sequence, like `error`).
    constraint_error: Option<String>,
    started: Instant,
    first_token: Option<Instant>,
    stats: GenerationStats,
}

impl Sequence {
    /// A sequence in KV slot `slot` of a state with `context` positions. The slot's cache
    /// must already hold `prompt[..cached]` (0 for a fresh slot); the rest is prefilled.
    pub fn new(
        slot: usize,
        prompt: &[u32],
        cached: usize,
        config: &GenerationConfig,
        stop_ids: Vec<u32>,
        context: usize,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt has no tokens".into()));
        }
        config.validate().map_err(Error::Invalid)?;
        if prompt.len() > context {
            return Err(Error::Invalid(format!(
                "the prompt of {} tokens does not fit the context size {context}",
                prompt.len()
            )));
        }
        // At least the last prompt token is run, for its logits.
        let cached = cached.min(prompt.len() - 1);
        let mut tokens =
            Vec::with_capacity((prompt.len() + config.max_new_tokens).min(context + 1));
        tokens.extend_from_slice(prompt);
        let mut s = Sequence {
            slot,
            tokens,
            n_cached: cached,
            n_prompt: prompt.len(),
            n_generated: 0,
            out: Vec::with_capacity(config.max_new_tokens.min(4096)),
            max_new: config.max_new_tokens,
            context,
            overflow: config.context_overflow,
            sampler: Sampler::new(config.sampling_params()),
            logits: Vec::new(),
            utf8: Utf8Stream::default(),
            stops: StopStrings::new(&config.stop_strings),
            stop_ids,
            piece: String::new(),
            delta: String::new(),
            finish: None,
            error: None,
            top_logprobs: None,
            logprob_scratch: Vec::new(),
            last_logprobs: None,
            constraint: None,
            mask: TokenMask::default(),
            may_end: false,
            constraint_error: None,
            started: Instant::now(),
            first_token: None,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                cached_tokens: cached,
                ..Default::default()
            },
        };
        if s.max_new == 0 {
            s.finish = Some(FinishReason::Length);
        }
        Ok(s)
    }

    /// Records the log-probability of each chosen token and of the `top` most likely ones
    /// ([`Sequence::take_logprobs`]).
    pub fn set_logprobs(&mut self, top: usize) {
        self.top_logprobs = Some(top);
    }

    /// Holds the output to `constraint` (see [`super::constraint`]): each step samples only
    /// among the tokens it allows, end tokens only where it lets the output end, and the
    /// sequence stops when it says the output is complete.
    pub fn set_constraint(&mut self, constraint: Box<dyn TokenConstraint>) {
        self.constraint = Some(constraint);
    }

    /// Why the sequence's constraint failed, if it did (the sequence ended there; the text
    /// so far is in [`Sequence::delta`]).
    pub fn constraint_error(&self) -> Option<&str> {
        self.constraint_error.as_deref()
    }

    /// The log-probabilities of the last chosen token, once.
    pub fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.last_logprobs.take()
    }

    pub fn slot(&self) -> usize {
        self.slot
    }
    /// Tokens of the prompt.
    pub fn prompt_len(&self) -> usize {
        self.n_prompt
    }
    pub fn is_finished(&self) -> bool {
        self.finish.is_some() || self.error.is_some() || self.constraint_error.is_some()
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }
    /// The error that ended the sequence (a full context), if any. The text generated until
    /// then is still in [`Sequence::delta`].
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
    /// Prompt and generated tokens (after any sliding-window shift).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// The generated tokens.
    pub fn generated(&self) -> &[u32] {
        &self.out
    }
    /// The tokens whose keys and values are in the slot's cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.tokens[..self.n_cached]
    }
    /// The text released since the last [`Sequence::take_delta`].
    pub fn delta(&self) -> &str {
        &self.delta
    }
    /// Moves the released text into `out` (appending).
    pub fn take_delta(&mut self, out: &mut String) {
        out.push_str(&self.delta);
        self.delta.clear();
    }
    pub fn stats(&self) -> GenerationStats {
        let mut s = self.stats.clone();
        s.generated_tokens = self.n_generated;
        s.finish_reason = self.finish;
        if s.prefill_time.is_zero() {
            s.prefill_time = self.started.elapsed();
        }
        if let Some(t) = self.first_token {
            if self.finish.is_none() {
                s.decode_time = t.elapsed();
            }
        }
        s
    }

    /// Ends the sequence now, releasing held text.
    pub fn cancel(&mut self) {
        if !self.is_finished() {
            self.end(FinishReason::Cancelled);
        }
    }

    fn end(&mut self, reason: FinishReason) {
        self.piece.clear();
        self.utf8.finish_into(&mut self.piece);
        let stopped = self.stops.push(&self.piece, &mut self.delta);
        if !stopped {
            self.stops.finish(&mut self.delta);
        }
        self.finish = Some(if stopped { FinishReason::Stop } else { reason });
        if let Some(t) = self.first_token {
            self.stats.decode_time = t.elapsed();
        }
    }

    /// Makes room when the next token would not fit: slides the window or fails.
    fn fit_context(&mut self) {
        if self.tokens.len() <= self.context {
            return;
        }
        match self.overflow {
            ContextOverflow::Slide { keep } => {
                let keep = keep.min(self.context / 2);
                let tail = (self.context - keep) / 2;
                let len = self.tokens.len();
                self.tokens.drain(keep..len - tail);
                self.n_cached = self.n_cached.min(keep);
                self.stats.context_shifts += 1;
            }
            ContextOverflow::Error => {
                self.error = Some(format!(
                    "the context of {} tokens is full after {} generated tokens \
                     (use a larger context size, or a sliding window)",
                    self.context, self.n_generated
                ));
                // Release what was held back (an unfinished character, a possible stop
                // string), so a caller that wants the text so far has all of it.
                self.piece.clear();
                self.utf8.finish_into(&mut self.piece);
                if !self.stops.push(&self.piece, &mut self.delta) {
                    self.stops.finish(&mut self.delta);
                }
                if let Some(t) = self.first_token {
                    self.stats.decode_time = t.elapsed();
                }
            }
        }
    }

    /// Adds up to `budget` of this sequence's tokens that are not in its cache yet to `batch`;
    /// returns whether the last one asks for logits (then the next [`Sequence::accept`] takes
    /// that row).
    pub fn feed(&mut self, batch: &mut Vec<BatchEntry>, budget: usize) -> bool {
        if self.is_finished() {
            return false;
        }
        self.fit_context();
        if self.is_finished() {
            return false;
        }
        let pending = self.tokens.len() - self.n_cached;
        let n = pending.min(budget);
        for i in 0..n {
            let pos = self.n_cached + i;
            batch.push(BatchEntry {
                token: self.tokens[pos],
                pos,
                slot: self.slot,
                logits: i + 1 == pending,
            });
        }
        self.n_cached += n;
        n > 0 && n == pending
    }

    /// Number of tokens waiting to be run (prompt chunks or the last sampled token).
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.n_cached
    }

    /// Takes the logits of the last fed token: samples, checks the stop conditions, and
    /// releases text.
    pub fn accept(&mut self, row: &[f32], pieces: &TokenPieces) {
        if self.is_finished() {
            return;
        }
        let now = Instant::now();
        if self.first_token.is_none() {
            self.stats.prefill_time = now - self.started;
        }
        self.logits.clear();
        self.logits.extend_from_slice(row);
        if let Some(c) = self.constraint.as_mut() {
            self.mask.clear(row.len());
            let may_end = match c.next_allowed(&mut self.mask) {
                Ok(may_end) => may_end,
                Err(e) => return self.fail_constraint(e),
            };
            self.mask.apply(&mut self.logits);
            let mut any = self.mask.count() > 0;
            if may_end {
                for &id in &self.stop_ids {
                    let i = id as usize;
                    if let (Some(l), Some(&raw)) = (self.logits.get_mut(i), row.get(i)) {
                        *l = raw;
                        any = true;
                    }
                }
            }
            if !any {
                return self.fail_constraint("the constraint allows no token here".into());
            }
            self.may_end = may_end;
        }
        if self.top_logprobs.is_some() {
            // Before sampling, which applies bias and penalties in place.
            log_softmax(&self.logits, &mut self.logprob_scratch);
        }
        let next = self.sampler.sample(&mut self.logits, &self.tokens);
        if let Some(n) = self.top_logprobs {
            let lp = &self.logprob_scratch;
            let n = n.min(lp.len());
            let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
            for (id, &l) in lp.iter().enumerate() {
                // Tokens a constraint ruled out are no alternatives.
                if l == f32::NEG_INFINITY {
                    continue;
                }
                if top.len() < n || top.last().is_some_and(|&(_, worst)| l > worst) {
                    let at = top.partition_point(|&(_, x)| x >= l);
                    top.insert(at, (id as u32, l));
                    top.truncate(n);
                }
            }
            self.last_logprobs = Some(TokenLogprobs {
                token: next,
                logprob: lp.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY),
                top,
            });
        }
        if self.first_token.is_none() {
            self.first_token = Some(now);
            self.stats.time_to_first_token = self.started.elapsed();
        }
        let is_end = self.stop_ids.contains(&next);
        if self.constraint.is_some() && !(self.mask.is_allowed(next) || (is_end && self.may_end)) {
            // Only a logit bias that bans every allowed token leads here.
            return self.fail_constraint(format!(
                "token {next} was chosen, which the constraint does not allow (a logit_bias \
                 of -100 on every token it allows?)"
            ));
        }
        if is_end {
            self.end(FinishReason::Stop);
            return;
        }
        if let Some(c) = self.constraint.as_mut() {
            if let Err(e) = c.accept(next) {
                return self.fail_constraint(e);
            }
        }
        self.tokens.push(next);
        self.out.push(next);
        self.n_generated += 1;
        self.piece.clear();
        self.utf8.push_into(pieces.get(next), &mut self.piece);
        if self.stops.push(&self.piece, &mut self.delta) {
            self.finish = Some(FinishReason::Stop);
            self.stats.decode_time = self.first_token.map_or(Duration::ZERO, |t| t.elapsed());
        } else if self.constraint.as_ref().is_some_and(|c| c.is_complete()) {
            self.end(FinishReason::Stop);
        } else if self.n_generated >= self.max_new {
            self.end(FinishReason::Length);
        }
    }

    /// Ends the sequence because its constraint failed, releasing held text.
    fn fail_constraint(&mut self, e: String) {
        self.end(FinishReason::Stop);
        self.finish = None;
        self.constraint_error = Some(format!("constrained decoding failed: {e}"));
    }

    /// The finished result, or the error that ended it. Takes the released text.
    pub fn into_generation(mut self) -> Result<Generation> {
        if let Some(e) = self.error.take().or(self.constraint_error.take()) {
            return Err(Error::Invalid(e));
        }
        let stats = self.stats();
        Ok(Generation {
            tokens: std::mem::take(&mut self.out),
            text: std::mem::take(&mut self.delta),
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            stats,
        })
    }
}

/// Advances several sequences together: every [`BatchRunner::step`] is one forward call
/// holding the next token of every decoding sequence and prompt chunks of the others, up to
/// the state's `max_batch` tokens. Each sequence owns one KV slot.
pub struct BatchRunner<'a> {
    model: &'a dyn Backend,
    pieces: &'a TokenPieces,
    state: &'a mut dyn BackendState,
    seqs: Vec<Option<Sequence>>,
    batch: Vec<BatchEntry>,
    rows: Vec<usize>,
}

impl<'a> BatchRunner<'a> {
    pub fn new(
        model: &'a dyn Backend,
        pieces: &'a TokenPieces,
        state: &'a mut dyn BackendState,
    ) -> Self {
        let n = state.n_slots();
        let cap = state.max_batch();
        BatchRunner {
            model,
            pieces,
            state,
            seqs: (0..n).map(|_| None).collect(),
            batch: Vec::with_capacity(cap),
            rows: Vec::with_capacity(cap),
        }
    }

    pub fn context(&self) -> usize {
        self.state.context()
    }

    pub fn active(&self) -> usize {
        self.seqs.iter().filter(|s| s.is_some()).count()
    }

    /// Puts `seq` in its slot (which must be free).
    pub fn insert(&mut self, seq: Sequence) -> Result<()> {
        let slot = seq.slot();
        match self.seqs.get(slot) {
            Some(None) => {
                self.seqs[slot] = Some(seq);
                Ok(())
            }
            Some(Some(_)) => Err(Error::Invalid(format!("slot {slot} is busy"))),
            None => Err(Error::Invalid(format!(
                "slot {slot} does not exist ({} slots)",
                self.seqs.len()
            ))),
        }
    }

    pub fn get(&self, slot: usize) -> Option<&Sequence> {
        self.seqs.get(slot).and_then(|s| s.as_ref())
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Sequence> {
        self.seqs.get_mut(slot).and_then(|s| s.as_mut())
    }

    /// Takes the sequence out of its slot.
    pub fn remove(&mut self, slot: usize) -> Option<Sequence> {
        self.seqs.get_mut(slot).and_then(|s| s.take())
    }

    /// One forward call. Decoding sequences go first, then prompt chunks fill the rest of the
    /// batch. Returns false when there was nothing to run.
    pub fn step(&mut self) -> Result<bool> {
        step_sequences(
            self.model,
            self.pieces,
            self.state,
            &mut self.seqs,
            &mut self.batch,
            &mut self.rows,
        )
    }
}

/// One forward call over `seqs` (indexed by KV slot): the next token of every decoding
/// sequence first, then prompt chunks in slot order up to the state's `max_batch` tokens;
/// each sequence whose last fed token produced logits samples from them. `batch` and `rows`
/// are scratch. Returns false when there was nothing to run.
pub(crate) fn step_sequences(
    model: &dyn Backend,
    pieces: &TokenPieces,
    state: &mut dyn BackendState,
    seqs: &mut [Option<Sequence>],
    batch: &mut Vec<BatchEntry>,
    rows: &mut Vec<usize>,
) -> Result<bool> {
    batch.clear();
    rows.clear();
    let cap = state.max_batch();
    for decoding in [true, false] {
        for (slot, s) in seqs.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.is_finished() || (s.pending() == 1) != decoding {
                continue;
            }
            let room = cap - batch.len();
            if room == 0 {
                break;
            }
            if s.feed(batch, room) {
                rows.push(slot);
            }
        }
    }
    if batch.is_empty() {
        return Ok(false);
    }
    model.forward(batch, state)?;
    for (i, &slot) in rows.iter().enumerate() {
        if let Some(s) = seqs[slot].as_mut() {
            s.accept(state.logits(i), pieces);
        }
    }
    Ok(true)
}
