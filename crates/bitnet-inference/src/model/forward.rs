//! The forward pass.
pub struct Batch;
pub struct ForwardState;
pub struct Model;
