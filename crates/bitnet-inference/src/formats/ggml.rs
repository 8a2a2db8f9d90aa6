//! ggml tensor types: sizes, float decoding, and ternary decoding.
