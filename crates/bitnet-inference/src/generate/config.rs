//! What a generation request asks for.

use super::sampler::SamplingParams;
use crate::model::GenerationDefaults;

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum SamplingStrategy {
    /// Draw from the filtered distribution ([`GenerationConfig`]'s sampling fields); greedy
    /// when the temperature is 0.
    #[default]
    Sample,
    /// Always the most likely token (the sampling fields other than bias and penalties are
    /// ignored).
    Greedy,
    /// Beam search over `beams` hypotheses; scores are summed log-probabilities divided by
    /// `generated_length ^ length_penalty`. `early_stopping`: stop as soon as `beams`
    /// hypotheses are finished; otherwise stop when no live beam can beat the worst finished
    /// one (as transformers' `early_stopping=False`).
    BeamSearch {
        beams: usize,
        length_penalty: f32,
        early_stopping: bool,
    },
}

/// What happens when a sequence reaches the end of its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextOverflow {
    /// Generation fails with an error that says so.
    #[default]
    Error,
    /// Sliding window: keep the first `keep` tokens (BOS, system prompt) and the most recent
    /// half of the rest, re-run them, and go on.
    Slide { keep: usize },
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The caller stopped it.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI API's name (`stop`, `length`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One generation request: limits, sampling, stop conditions and strategy.
///
/// Start from [`GenerationConfig::default`] (llama.cpp's defaults) or
/// [`GenerationConfig::from_model`] (the model's `generation_config.json` on top of them).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub typical_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
    /// Token ids that end generation, besides the model's own end tokens.
    pub stop_token_ids: Vec<u32>,
    /// Texts that end generation; they are never part of the output.
    pub stop_strings: Vec<String>,
    /// Do not stop at the model's end tokens (`stop_token_ids` still stop).
    pub ignore_eos: bool,
    pub context_overflow: ContextOverflow,
    pub strategy: SamplingStrategy,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        let s = SamplingParams::default();
        GenerationConfig {
            max_new_tokens: 128,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            typical_p: s.typical_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: s.repeat_last_n,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logit_bias: Vec::new(),
            seed: s.seed,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            context_overflow: ContextOverflow::Error,
            strategy: SamplingStrategy::Sample,
        }
    }
}

impl GenerationConfig {
    /// The defaults with the model's `generation_config.json` values on top.
    pub fn from_model(defaults: &GenerationDefaults) -> Self {
        let mut c = GenerationConfig::default();
        c.apply_model_defaults(defaults);
        c
    }

    /// Overwrites the fields the model's files set.
    pub fn apply_model_defaults(&mut self, d: &GenerationDefaults) {
        if let Some(t) = d.temperature {
            self.temperature = t;
        }
        if let Some(k) = d.top_k {
            self.top_k = k;
        }
        if let Some(p) = d.top_p {
            self.top_p = p;
        }
        if let Some(r) = d.repetition_penalty {
            self.repetition_penalty = r;
        }
    }

    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig {
            max_new_tokens,
            temperature: 0.0,
            strategy: SamplingStrategy::Greedy,
            ..Default::default()
        }
    }

    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    pub fn with_stop_string(mut self, s: impl Into<String>) -> Self {
        self.stop_strings.push(s.into());
        self
    }
    pub fn with_strategy(mut self, s: SamplingStrategy) -> Self {
        self.strategy = s;
        self
    }

    /// The sampler's settings for this request.
    pub fn sampling_params(&self) -> SamplingParams {
        SamplingParams {
            temperature: match self.strategy {
                SamplingStrategy::Sample => self.temperature,
                _ => 0.0,
            },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        }
    }

    /// Checks that every sampling value is a number in its range, so a bad value is refused
    /// with its name instead of quietly producing nonsense. The message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: f32, ok: bool, range: &str| {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(format!("{name} = {v}: expected {range}"))
            }
        };
        let t = self.temperature;
        check("temperature", t, t >= 0.0, "a number ≥ 0 (0 is greedy)")?;
        let p = self.top_p;
        check(
            "top_p",
            p,
            p > 0.0 && p <= 1.0,
            "a number in (0, 1] (1 disables)",
        )?;
        let p = self.min_p;
        check(
            "min_p",
            p,
            (0.0..=1.0).contains(&p),
            "a number in [0, 1] (0 disables)",
        )?;
        let p = self.typical_p;
        check(
            "typical_p",
            p,
            p > 0.0 && p <= 1.0,
            "a number in (0, 1] (1 disables)",
        )?;
        let r = self.repetition_penalty;
        check(
            "repetition_penalty",
            r,
            r > 0.0,
            "a number > 0 (1 disables)",
        )?;
        check(
            "presence_penalty",
            self.presence_penalty,
            true,
            "a finite number",
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            true,
            "a finite number",
        )?;
        // An empty stop string would match before any text: refused, not ignored.
        if let Some(i) = self.stop_strings.iter().position(String::is_empty) {
            return Err(format!(
                "stop[{i}] is empty: expected a stop string of at least one character"
            ));
        }
        for &(id, bias) in &self.logit_bias {
            // -inf bans a token; anything else must be a number.
            if bias.is_nan() || bias == f32::INFINITY {
                return Err(format!(
                    "logit_bias for token {id} = {bias}: expected a number or -inf"
                ));
            }
        }
        if let SamplingStrategy::BeamSearch {
            beams,
            length_penalty,
            ..
        } = self.strategy
        {
            if beams == 0 {
                return Err("beams = 0: expected at least 1".into());
            }
            check("length_penalty", length_penalty, true, "a finite number")?;
        }
        Ok(())
    }

    /// The token ids the config names (`logit_bias`, `stop_token_ids`) must be below the
    /// model's vocabulary size: one past it would be silently ignored (a bias never applied,
    /// a stop never reached). Checked where the vocabulary is known: [`super::generate_with`]
    /// and the scheduler's `submit`.
    pub fn check_token_ids(&self, vocab: usize) -> Result<(), String> {
        let bad = |name: &str, id: u32| {
            format!(
                "{name} names token {id}: expected a token id below the vocabulary size {vocab}"
            )
        };
        if let Some(&(id, _)) = self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(bad("logit_bias", id));
        }
        if let Some(&id) = self.stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(bad("stop_token_ids", id));
        }
        Ok(())
    }

    /// The ids that end this generation: the model's end tokens (unless `ignore_eos`) and
    /// `stop_token_ids`.
    pub fn stop_ids(&self, model_end_tokens: &[u32]) -> Vec<u32> {
        let mut ids = self.stop_token_ids.clone();
        if !self.ignore_eos {
            ids.extend_from_slice(model_end_tokens);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
