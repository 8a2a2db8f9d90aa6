//! The generation flags `bitnet run`, `chat` and `batch` share.

use bitnet_inference::generate::{ContextOverflow, GenerationConfig, SamplingStrategy};
use bitnet_inference::model::config::MAX_CONTEXT;
use bitnet_inference::model::GenerationDefaults;

/// Sampling, stop and strategy flags. Unset flags take the model's `generation_config.json`
/// values, then llama.cpp's defaults.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GenFlags {
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", value_parser = super::in_range(0, 1 << 30))]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: model's, else 0.8].
    #[arg(long)]
    pub temp: Option<f32>,
    /// Keep the K most likely tokens; 0 disables [default: model's, else 40].
    #[arg(long, value_parser = super::in_range(0, MAX_CONTEXT))]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass; 1 disables [default: model's, else 0.95].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the best one's probability; 0 disables [default: 0.05].
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Locally typical sampling mass; 1 disables [default: 1].
    #[arg(long)]
    pub typical_p: Option<f32>,
    /// Repetition penalty over the last --repeat-last-n tokens; 1 disables [default: model's, else 1].
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Window of the penalties, in tokens [default: 64].
    #[arg(long, value_parser = super::in_range(0, MAX_CONTEXT))]
    pub repeat_last_n: Option<usize>,
    /// Subtracted from the logit of every token seen in the window [default: 0].
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence in the window [default: 0].
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Random seed: same seed, model and build give the same text [default: 24301].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (not printed); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Beam search with N beams (1: off).
    #[arg(long, value_name = "N", value_parser = super::in_range(1, 64))]
    pub beams: Option<usize>,
    /// Beam search: scores divided by length^P.
    #[arg(long, default_value_t = 1.0)]
    pub length_penalty: f32,
    /// Beam search: stop as soon as N hypotheses are finished.
    #[arg(long)]
    pub early_stopping: bool,
    /// Keep going past the model's end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// When the context is full, drop the older half of the conversation (keeping the first
    /// --keep tokens) and go on, instead of failing [default: on for chat, off otherwise].
    #[arg(long, overrides_with = "no_context_shift")]
    pub context_shift: bool,
    /// Fail when the context is full instead of sliding it.
    #[arg(long, overrides_with = "context_shift")]
    pub no_context_shift: bool,
    /// Tokens kept at the start when the context shifts (at most half the context is kept).
    #[arg(long, default_value_t = 1, value_parser = super::in_range(0, MAX_CONTEXT))]
    pub keep: usize,
}

impl GenFlags {
    /// The request: defaults, then the model's, then the flags.
    pub fn config(
        &self,
        model: &GenerationDefaults,
        default_max_tokens: usize,
    ) -> GenerationConfig {
        let mut c = GenerationConfig::from_model(model);
        c.max_new_tokens = self.max_tokens.unwrap_or(default_max_tokens);
        macro_rules! set {
            ($($flag:ident => $field:ident),*) => {
                $(if let Some(v) = self.$flag { c.$field = v; })*
            };
        }
        set!(temp => temperature, top_k => top_k, top_p => top_p, min_p => min_p,
             typical_p => typical_p, repeat_penalty => repetition_penalty,
             repeat_last_n => repeat_last_n, presence_penalty => presence_penalty,
             frequency_penalty => frequency_penalty, seed => seed);
        c.stop_strings = self.stop.clone();
        c.ignore_eos = self.ignore_eos;
        if self.context_shift(false) {
            c.context_overflow = ContextOverflow::Slide { keep: self.keep };
        }
        if let Some(b) = self.beams.filter(|&b| b > 1) {
            c.strategy = SamplingStrategy::BeamSearch {
                beams: b,
                length_penalty: self.length_penalty,
                early_stopping: self.early_stopping,
            };
        }
        c
    }

    /// Whether the context slides when full: the flags, else `default`.
    pub fn context_shift(&self, default: bool) -> bool {
        match (self.context_shift, self.no_context_shift) {
            (true, _) => true,
            (_, true) => false,
            _ => default,
        }
    }

    /// KV slots a single generation needs.
    pub fn slots(&self) -> usize {
        self.beams.unwrap_or(1).max(1)
    }
}
