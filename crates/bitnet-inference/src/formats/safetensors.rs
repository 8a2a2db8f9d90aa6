//! Safetensors: single files and sharded directories (`model.safetensors.index.json`).
