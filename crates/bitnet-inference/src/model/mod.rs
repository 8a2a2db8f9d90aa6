//! The model: one description ([`ModelConfig`]) and one weight set ([`ModelWeights`]) filled
//! by one loader per file format. Backends ([`crate::backend`]) compute with them.

pub mod config;
pub mod dummy;
pub mod load_gguf;
pub mod load_hf;
pub mod rope;
pub mod save_gguf;
pub mod save_hf;
pub mod weights;

pub use config::{Activation, GenerationDefaults, ModelConfig};
pub use rope::RopeScaling;
pub use weights::{LayerWeights, Linear, LinearWeights, ModelWeights, RmsNorm};

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// One tensor as the file stores it, for `bitnet inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub name: String,
    /// The file's type name: `I2_S`, `TQ2_0`, `U8`, `BF16`, ...
    pub dtype: String,
    /// Shape in the file's own order (GGUF: ne0 first; safetensors: row-major).
    pub shape: Vec<u64>,
    pub bytes: u64,
}

/// Everything a model's files give: description, weights, tokenizer, chat template.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// The model's own Jinja chat template, if its files carry one.
    pub chat_template: Option<String>,
    pub generation: GenerationDefaults,
    /// Where it came from: the GGUF file or the model directory.
    pub path: PathBuf,
    /// `GGUF v3`, `safetensors (HF packed, bitlinear/offline)`, ...
    pub format: String,
    pub tensors: Vec<TensorSummary>,
    /// Key facts from the file's metadata worth showing (`general.name`, quantization, ...).
    pub metadata: Vec<(String, String)>,
}

/// Loads a GGUF file or a Hugging Face model directory.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        load_hf::load(path)
    } else {
        let mut magic = [0u8; 4];
        use std::io::Read;
        let n = std::fs::File::open(path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|e| Error::io(path, e))?;
        if n == 4 && &magic == b"GGUF" {
            load_gguf::load(path)
        } else {
            Err(Error::format(
                path,
                format!(
                    "not a GGUF file (magic {:?}, expected \"GGUF\") nor a model directory",
                    String::from_utf8_lossy(&magic[..n])
                ),
            ))
        }
    }
}

/// Checks, before a model runs, that every token id its files name and every id its
/// tokenizer can produce has a row in the embedding (and so a logit): a clear error at load
/// instead of a failed request later (the forward pass refuses such ids too). Loading for
/// `inspect` or `convert` does not require it.
pub fn check_token_ids(m: &LoadedModel) -> Result<()> {
    let vocab = m.config.vocab_size;
    let n = m.tokenizer.vocab_size();
    if n > vocab {
        return Err(Error::Invalid(format!(
            "{}: the tokenizer has {n} tokens but the model's vocabulary (embedding rows) has {vocab}: ids {vocab}..{n} would have no embedding",
            m.path.display()
        )));
    }
    let g = &m.generation;
    let ids = g
        .eos_token_ids
        .iter()
        .map(|&id| ("eos_token_id", id))
        .chain(g.bos_token_id.map(|id| ("bos_token_id", id)))
        .chain(m.tokenizer.bos_id().map(|id| ("tokenizer BOS", id)))
        .chain(
            m.tokenizer
                .eos_ids()
                .iter()
                .map(|&id| ("tokenizer EOS", id)),
        );
    for (what, id) in ids {
        if id as usize >= vocab {
            return Err(Error::Invalid(format!(
                "{}: {what} {id} is not below the vocabulary size {vocab}",
                m.path.display()
            )));
        }
    }
    Ok(())
}

/// Only the tokenizer of a model (GGUF metadata or the directory's `tokenizer.json`),
/// without loading weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        load_hf::load_tokenizer(path)
    } else {
        let file = crate::formats::gguf::GgufFile::open(path)?;
        Tokenizer::from_gguf(&file.metadata, path)
    }
}
