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
use std::path::{Path, PathBuf};

/// Loads a model as every front end uses it: weights, tokenizer, chat template, end tokens.
pub fn load(path: &Path) -> anyhow::Result<LoadedEngineModel> {
    Ok(LoadedEngineModel::load(path)?)
}

/// The model to use when none is named: the bitnet-tiny model shipped in the repository
/// (`models/bitnet-tiny`), found beside the source tree this binary was built from or above
/// the executable.
pub fn model_or_default(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .map(|dir| dir.join("models/bitnet-tiny"))
            .find(|p| p.is_dir())
    });
    [Some(built_from), beside_exe]
        .into_iter()
        .flatten()
        .find(|p| p.join("config.json").is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no model given (-m MODEL or BITNET_MODEL) and the shipped models/bitnet-tiny \
                 was not found"
            )
        })
}

/// Context size for a run: the user's, else the model's capped at 4096 (the KV cache is
/// planned for all of it at start).
pub fn context_size(requested: Option<usize>, model: &Model) -> usize {
    requested.unwrap_or_else(|| model.config.max_context.min(4096))
}
