//! One module per subcommand; shared model loading here.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod gen_flags;
pub mod dummy;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod run;
pub mod tokenize;

use bitnet_inference::model::{self, LoadedModel, Model};
use bitnet_inference::tokenizer::Tokenizer;
use std::path::Path;

/// A model ready to run, with the parts of its files the front ends need.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub generation: model::GenerationDefaults,
}

pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        generation,
        ..
    } = model::load(path)?;
    Ok(Loaded {
        model: Model::new(config, weights)?,
        tokenizer,
        chat_template,
        generation,
    })
}

/// Context size for a run: the user's, else the model's capped at 4096 (the KV cache is
/// planned for all of it at start).
pub fn context_size(requested: Option<usize>, model: &Model) -> usize {
    requested.unwrap_or_else(|| model.config.max_context.min(4096))
}
