//! One module per subcommand; shared model loading here.

pub mod batch;
pub mod bench;
#[cfg(feature = "hub")]
pub mod cache;
pub mod chat;
pub mod convert;
pub mod dummy;
pub mod gen_flags;
pub mod inspect;
pub mod logits;
pub mod perplexity;
#[cfg(feature = "hub")]
pub mod pull;
pub mod run;
pub mod tokenize;

use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::model::Model;
use std::path::{Path, PathBuf};

/// Loads a model as every front end uses it: weights, tokenizer, chat template, end tokens.
/// `path` may be a Hugging Face hub id (see [`resolve_model`]).
pub fn load(path: &Path) -> anyhow::Result<LoadedEngineModel> {
    Ok(LoadedEngineModel::load(&resolve_model(path)?)?)
}

/// `--offline`: resolve hub ids from the cache alone (as HF_HUB_OFFLINE=1).
static OFFLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How the model computes, shared by the commands that run one for text or speed.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ModelFlags {
    /// How logits are computed from a float lm_head / tied embedding: `f16` exactly as
    /// the file stores it, or against a copy quantized at load, with the final hidden state
    /// at 12 bits: `int8`, `q6k` or `q4`; faster decode, see docs/PERFORMANCE.md.
    #[arg(long = "lm-head", default_value = "f16", value_parser = parse_lm_head)]
    pub lm_head: bitnet_inference::model::forward::LmHeadQuant,
    /// KV cache element type: `f32` (exact) or `f16` (half the memory, and half the bytes
    /// decode reads per cached position).
    #[arg(long = "kv-type", default_value = "f32", value_parser = parse_kv_type)]
    pub kv_type: bitnet_inference::model::forward::KvType,
}

impl ModelFlags {
    pub fn apply(&self, model: &mut bitnet_inference::model::forward::Model) -> anyhow::Result<()> {
        model.set_lm_head_quant(self.lm_head)?;
        model.set_kv_type(self.kv_type);
        Ok(())
    }
}

fn parse_kv_type(s: &str) -> Result<bitnet_inference::model::forward::KvType, String> {
    s.parse()
}

fn parse_lm_head(s: &str) -> Result<bitnet_inference::model::forward::LmHeadQuant, String> {
    s.parse()
}

pub fn set_offline(offline: bool) {
    OFFLINE.store(offline, std::sync::atomic::Ordering::Relaxed);
}

/// A model argument as a local path: an existing file or directory stays itself; otherwise a
/// Hugging Face hub id (`owner/name[@revision][:FILE.gguf]`) is resolved through the shared
/// cache, downloading what is missing.
pub fn resolve_model(model: &Path) -> anyhow::Result<PathBuf> {
    #[cfg(feature = "hub")]
    if !model.exists() {
        if let Some(id) = model
            .to_str()
            .and_then(|s| bitnet_inference::hub::HubModelId::parse(s).ok())
        {
            return Ok(bitnet_inference::hub::resolve(&hub_config(), &id)?.path);
        }
    }
    Ok(model.to_path_buf())
}

/// The hub settings from the environment and `--offline`, with progress bars on stderr.
#[cfg(feature = "hub")]
pub fn hub_config() -> bitnet_inference::hub::HubConfig {
    use bitnet_inference::hub::{HubConfig, Progress};
    use indicatif::{ProgressBar, ProgressStyle};
    let bar: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);
    let progress = move |p: &Progress| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::Start { file, done, total } => {
                let b = match total {
                    Some(t) => ProgressBar::new(*t).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    ),
                    None => ProgressBar::new_spinner(),
                };
                b.set_message(file.clone());
                b.set_position(*done);
                *bar = Some(b);
            }
            Progress::Advance { done, .. } => {
                if let Some(b) = bar.as_ref() {
                    b.set_position(*done);
                }
            }
            Progress::Finish { .. } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    };
    HubConfig::from_env()
        .with_offline(OFFLINE.load(std::sync::atomic::Ordering::Relaxed))
        .with_progress(std::sync::Arc::new(progress))
}

/// The model to use when none is named: the bitnet-tiny model shipped in the repository
/// (`models/bitnet-tiny`), found beside the source tree this binary was built from or above
/// the executable.
pub fn model_or_default(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return resolve_model(m);
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
