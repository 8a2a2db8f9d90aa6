//! The integration tests of this crate, in one test binary (one link instead of one per
//! file).

mod backend;
mod chat_smollm2;
mod common;
#[cfg(feature = "constrained")]
mod constrained;
#[cfg(feature = "cuda")]
mod cuda;
mod generation_engine;
mod gguf_load;
mod gguf_types;
mod gguf_write;
mod hf_loader;
#[cfg(feature = "hub")]
mod hub;
#[cfg(feature = "hub")]
mod hub_server;
mod oracle_logits;
mod q6_k;
mod readme;
mod round_scales;
mod scheduler;
mod tokenizer_fixtures;
mod untrusted;
