//! bitnet-inference: exact, fast inference for BitNet b1.58 ternary language models.
//!
//! Layers, with dependencies pointing down only:
//! - [`formats`]: readers (and writers) of GGUF, safetensors and the ggml block types.
//! - [`kernels`]: packed ternary weights, int8 activations, integer dot products per ISA.
//! - [`model`]: the model description, one loader per format, and the forward pass.
//! - [`tokenizer`], [`chat`]: text to ids and back; chat templates.
//! - [`generate`]: sampling, stop conditions, beam search, streaming, batched generation.
//! - [`engine`]: the library API ([`engine::InferenceEngine`], [`engine::TextGenerator`]).

pub mod chat;
pub mod engine;
pub mod error;
pub mod eval;
pub mod formats;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kernels;
pub mod model;
pub mod tokenizer;

pub use error::{Error, Result};
