//! One module per subcommand; shared model loading here.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod dummy;
pub mod gen_flags;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod run;
pub mod tokenize;

use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::model::Model;
use std::path::Path;

/// Loads a model as every front end uses it: weights, tokenizer, chat template, end tokens.
pub fn load(path: &Path) -> anyhow::Result<LoadedEngineModel> {
    Ok(LoadedEngineModel::load(path)?)
}

/// Context size for a run: the user's, else the model's capped at 4096 (the KV cache is
/// planned for all of it at start).
pub fn context_size(requested: Option<usize>, model: &Model) -> usize {
    requested.unwrap_or_else(|| model.config.max_context.min(4096))
}
