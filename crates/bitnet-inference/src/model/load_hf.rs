//! Hugging Face model directory → model.
use super::LoadedModel;
use crate::{Error, Result};
use std::path::Path;

pub fn load(path: &Path) -> Result<LoadedModel> {
    Err(Error::format(path, "HF loading not yet implemented"))
}
