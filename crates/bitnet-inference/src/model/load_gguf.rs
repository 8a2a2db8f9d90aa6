//! GGUF → model: architecture metadata to [`ModelConfig`], tensors to [`ModelWeights`].
use super::LoadedModel;
use crate::{Error, Result};
use std::path::Path;

pub fn load(path: &Path) -> Result<LoadedModel> {
    Err(Error::format(path, "GGUF loading not yet implemented"))
}
