//! bitnet-inference: exact, fast inference for BitNet b1.58 ternary language models.
//!
//! Layers, with dependencies pointing down only:
//! - [`formats`]: readers (and writers) of GGUF, safetensors and the ggml block types.
//! - [`kernels`]: packed ternary weights, int8 activations, integer dot products per ISA.
//! - [`model`]: the model description, one loader per format, and the forward pass.
//! - [`backend`]: the compute-backend seam ([`backend::Backend`]); the CPU backend.
//! - [`tokenizer`], [`chat`]: text to ids and back; chat templates.
//! - [`generate`]: sampling, stop conditions, beam search, streaming, batched generation.
//! - [`engine`]: the library API ([`engine::InferenceEngine`], [`engine::TextGenerator`]).
//! - [`scheduler`]: continuous batching of many requests ([`scheduler::StreamingEngine`]).
//!
//! Quick start (the same lines as README.md's; a test keeps the two equal):
//!
//! ```
//! # std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).unwrap();
//! use bitnet_inference::engine::InferenceEngine;
//!
//! let mut engine = InferenceEngine::new();
//! engine.load_model("models/bitnet-tiny")?; // a GGUF file, a Hugging Face directory or hub id
//! let config = engine.default_generation_config().with_max_new_tokens(32);
//! println!("{}", engine.generate("Once upon a time", &config)?.text);
//! for chunk in engine.generator()?.generate_stream("The little fish", &config)? {
//!     print!("{}", chunk?.text); // text as it is decoded, whole UTF-8 characters only
//! }
//! # Ok::<(), bitnet_inference::Error>(())
//! ```

pub mod backend;
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
pub mod rng;
pub mod scheduler;
pub mod tokenizer;

pub use error::{Error, Result};
