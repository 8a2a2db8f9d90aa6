//! File formats: readers and writers that know bytes and layouts, nothing about models.

pub mod ggml;
pub mod gguf;
pub mod mmap;
pub mod npy;
pub mod safetensors;
