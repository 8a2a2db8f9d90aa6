//! Text generation: sampling, stop conditions, beam search, streaming, and the loops every
//! front end uses.
//!
//! - [`sampler`]: the samplers and their order; [`Rng`], the seeded generator.
//! - [`stop`]: stop strings matched across token boundaries.
//! - [`stream`]: incremental UTF-8 detokenization; [`TokenPieces`], the byte table.
//! - [`sequence`]: one sequence's state machine and [`BatchRunner`], which advances many
//!   sequences with one forward call per step.
//! - [`beam`]: beam search.
//! - [`constraint`]: constrained decoding (a per-sequence token mask); [`json`] holds output
//!   to a JSON schema (cargo feature `constrained`).
//! - [`TokenStream`] (an `Iterator`) and [`AsyncTokenStream`] (a `futures_core::Stream`).
//!
//! Stop conditions, checked after every token: an end token (the model's EOS/EOT ids unless
//! `ignore_eos`, and `stop_token_ids`), a stop string (never part of the output), and
//! `max_new_tokens`. A sequence that fills its context fails with an error that says so,
//! unless [`ContextOverflow::Slide`] asks for a sliding window.

pub mod asynch;
pub mod beam;
pub mod config;
pub mod constraint;
#[cfg(feature = "constrained")]
pub mod json;
pub mod sampler;
pub mod sequence;
pub mod stop;
pub mod stream;

pub use asynch::AsyncTokenStream;
pub use beam::beam_search;
pub use config::{ContextOverflow, FinishReason, GenerationConfig, SamplingStrategy};
pub use constraint::{ConstraintSource, SharedConstraint, TokenConstraint, TokenMask};
pub use sampler::{argmax, Candidate, Rng, Sampler, SamplingParams};
pub use sequence::{BatchRunner, Generation, GenerationStats, Sequence, TokenLogprobs};
pub use stop::StopStrings;
pub use stream::{TokenPieces, Utf8Stream};

use crate::backend::{Backend, BackendState};
use crate::tokenizer::Tokenizer;
use crate::Result;

/// A piece of streamed output: the token just chosen (None for text released at the end)
/// and the text that became final with it (empty while a character or a possible stop string
/// is incomplete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    pub token: Option<u32>,
    pub text: String,
}

/// Generates from `prompt` (ids, BOS included if wanted) in slot 0 of `state`, calling
/// `on_text` with each piece of final text. `state` needs one slot (or `beams` slots for
/// beam search). Stop ids: the tokenizer's end tokens and the config's.
pub fn generate(
    model: &dyn Backend,
    tokenizer: &Tokenizer,
    state: &mut dyn BackendState,
    prompt: &[u32],
    config: &GenerationConfig,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let pieces = TokenPieces::new(tokenizer, model.config().vocab_size);
    let stop_ids = config.stop_ids(tokenizer.eos_ids());
    generate_with(model, &pieces, state, prompt, config, stop_ids, on_text)
}

/// [`generate`] with a prebuilt piece table and explicit stop ids.
pub fn generate_with(
    model: &dyn Backend,
    pieces: &TokenPieces,
    state: &mut dyn BackendState,
    prompt: &[u32],
    config: &GenerationConfig,
    stop_ids: Vec<u32>,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    config
        .check_token_ids(model.config().vocab_size)
        .map_err(crate::Error::Invalid)?;
    if let SamplingStrategy::BeamSearch { .. } = config.strategy {
        let g = beam_search(model, pieces, state, prompt, config, &stop_ids)?;
        if !g.text.is_empty() {
            on_text(&g.text)?;
        }
        return Ok(g);
    }
    let mut stream = TokenStream::new(model, pieces, state, prompt, 0, config, stop_ids)?;
    let mut text = String::new();
    while let Some(chunk) = stream.next_text()? {
        on_text(chunk)?;
        text.push_str(chunk);
    }
    let mut g = stream.into_generation()?;
    g.text = text;
    Ok(g)
}

/// Generates from each prompt, all together in one batch (prompt `i` in slot `i`), each
/// with its own config. `state` needs `prompts.len()` slots. Results come back in order;
/// a prompt that fails (too long, context full) gives its own error.
pub fn generate_batch(
    model: &dyn Backend,
    pieces: &TokenPieces,
    state: &mut dyn BackendState,
    requests: &[(&[u32], &GenerationConfig)],
    model_end_tokens: &[u32],
) -> Result<Vec<Result<Generation>>> {
    if requests.len() > state.n_slots() {
        return Err(crate::Error::Invalid(format!(
            "{} prompts need {} KV slots, the state has {}",
            requests.len(),
            requests.len(),
            state.n_slots()
        )));
    }
    let context = state.context();
    let mut results: Vec<Option<Result<Generation>>> = (0..requests.len()).map(|_| None).collect();
    let mut runner = BatchRunner::new(model, pieces, state);
    for (i, (prompt, config)) in requests.iter().enumerate() {
        if let SamplingStrategy::BeamSearch { .. } = config.strategy {
            results[i] = Some(Err(crate::Error::Invalid(
                "beam search runs one prompt at a time".into(),
            )));
            continue;
        }
        match Sequence::new(
            i,
            prompt,
            0,
            config,
            config.stop_ids(model_end_tokens),
            context,
        ) {
            Ok(s) => runner.insert(s)?,
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    while runner.step()? {}
    for (i, r) in results.iter_mut().enumerate() {
        if let Some(s) = runner.remove(i) {
            *r = Some(s.into_generation());
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every slot has a result"))
        .collect())
}

/// Generation as an iterator of [`StreamChunk`]s. Borrow the model and a state; see
/// [`crate::engine::TextGenerator::generate_stream`] for the owned, simpler entry point.
pub struct TokenStream<'a> {
    runner: BatchRunner<'a>,
    slot: usize,
    done: bool,
    seen: usize,
    chunk: String,
}

impl<'a> TokenStream<'a> {
    /// Starts generating from `prompt` in `slot` of `state`, whose cache already holds
    /// `prompt[..cached]` (see [`Sequence::new`]).
    pub fn new(
        model: &'a dyn Backend,
        pieces: &'a TokenPieces,
        state: &'a mut dyn BackendState,
        prompt: &[u32],
        cached: usize,
        config: &GenerationConfig,
        stop_ids: Vec<u32>,
    ) -> Result<Self> {
        let seq = Sequence::new(0, prompt, cached, config, stop_ids, state.context())?;
        let mut runner = BatchRunner::new(model, pieces, state);
        runner.insert(seq)?;
        Ok(TokenStream {
            runner,
            slot: 0,
            done: false,
            seen: 0,
            chunk: String::new(),
        })
    }

    pub fn sequence(&self) -> &Sequence {
        self.runner.get(self.slot).expect("the stream's sequence")
    }

    /// Holds the output to `constraint` (call it before the first token; see
    /// [`constraint`]).
    pub fn set_constraint(&mut self, constraint: Box<dyn TokenConstraint>) {
        if let Some(s) = self.runner.get_mut(self.slot) {
            s.set_constraint(constraint);
        }
    }

    /// Stops now; held text comes out with the next call.
    pub fn cancel(&mut self) {
        if let Some(s) = self.runner.get_mut(self.slot) {
            s.cancel();
        }
    }

    /// Advances to the next token; returns whether one was chosen (false: finished).
    fn advance(&mut self) -> Result<Option<Option<u32>>> {
        loop {
            let s = self.runner.get(self.slot).expect("the stream's sequence");
            if s.is_finished() {
                if let Some(e) = s.error().or(s.constraint_error()) {
                    self.done = true;
                    return Err(crate::Error::Invalid(e.to_string()));
                }
                if s.delta().is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                self.done = true;
                return Ok(Some(None));
            }
            if !self.runner.step()? {
                self.done = true;
                return Ok(None);
            }
            let s = self.runner.get(self.slot).expect("the stream's sequence");
            let n = s.generated().len();
            if n != self.seen {
                self.seen = n;
                return Ok(Some(s.generated().last().copied()));
            }
        }
    }

    /// The next piece of final text without allocating (empty pieces are skipped); None at
    /// the end.
    pub fn next_text(&mut self) -> Result<Option<&str>> {
        loop {
            if self.advance()?.is_none() {
                return Ok(None);
            }
            self.chunk.clear();
            let s = self
                .runner
                .get_mut(self.slot)
                .expect("the stream's sequence");
            s.take_delta(&mut self.chunk);
            if !self.chunk.is_empty() {
                return Ok(Some(&self.chunk));
            }
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.sequence().finish_reason()
    }

    pub fn stats(&self) -> GenerationStats {
        self.sequence().stats()
    }

    /// The result so far (text not yet taken from the stream, generated tokens, stats).
    pub fn into_generation(mut self) -> Result<Generation> {
        let s = self
            .runner
            .remove(self.slot)
            .expect("the stream's sequence");
        s.into_generation()
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<StreamChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Err(e) => Some(Err(e)),
            Ok(None) => None,
            Ok(Some(token)) => {
                let s = self
                    .runner
                    .get_mut(self.slot)
                    .expect("the stream's sequence");
                let mut text = String::new();
                s.take_delta(&mut text);
                Some(Ok(StreamChunk { token, text }))
            }
        }
    }
}
