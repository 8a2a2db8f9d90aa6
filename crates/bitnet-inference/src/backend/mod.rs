//! The compute-backend seam: the four things generation, evaluation and the scheduler need
//! from a model, whatever computes it.
//!
//! A backend owns its weights and the KV caches it plans ([`Backend::new_state`]); a forward
//! call runs one batch of `(token, position, slot, wants logits)` entries and leaves the
//! logits of the entries that asked for them readable on the host ([`BackendState::logits`]),
//! so a device with its own memory copies out only the rows that are sampled. Everything
//! above this module (`generate`, `eval`, `scheduler`, `engine`) sees only these traits.
//!
//! Backends: [`cpu`] (the forward pass of [`crate::model::forward`]). A new one is a new
//! module here and one line in [`build`].

pub mod cpu;

use crate::model::{Batch, ModelConfig, ModelWeights};
use crate::Result;

/// A model ready to compute on some device.
pub trait Backend: Send + Sync {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Plans every buffer for `slots` sequences of up to `context` tokens each, run
    /// `max_batch` tokens at a time.
    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>>;
    /// Runs `batch`, writing each entry's keys and values into its slot of `state` and the
    /// logits of the entries that ask for them into `state`. `state` must come from this
    /// backend's `new_state`.
    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()>;
    /// The kernel or device that computes, for display (`avx512vnni`, `neon`, ...).
    fn kernel_name(&self) -> &str;
    /// Bytes of KV cache one position of one sequence takes (for memory budgets).
    fn kv_bytes_per_position(&self) -> usize;
    /// The weights as loaded (sizes and parameter counts for display).
    fn weights(&self) -> &ModelWeights;
}

/// The buffers of one backend: KV caches for its slots, activations, logits.
pub trait BackendState: Send {
    /// Logits of the `i`-th entry that asked for them in the last forward call.
    fn logits(&self, i: usize) -> &[f32];
    fn n_slots(&self) -> usize;
    fn context(&self) -> usize;
    fn max_batch(&self) -> usize;
    fn kv_bytes(&self) -> usize;
    /// Bytes of activations, logits and other scratch.
    fn scratch_bytes(&self) -> usize;
    /// For the backend that made it, to reach its own state type.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// The backend for a loaded model: the one place where backends are chosen.
pub fn build(model: crate::model::Model) -> Box<dyn Backend> {
    Box::new(model)
}

/// A boxed backend is a backend (so `&Box<dyn Backend>` passes where `&dyn Backend` goes).
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>> {
        (**self).new_state(slots, context, max_batch)
    }
    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()> {
        (**self).forward(batch, state)
    }
    fn kernel_name(&self) -> &str {
        (**self).kernel_name()
    }
    fn kv_bytes_per_position(&self) -> usize {
        (**self).kv_bytes_per_position()
    }
    fn weights(&self) -> &ModelWeights {
        (**self).weights()
    }
}

/// A boxed state is a state; `as_any_mut` reaches the state inside, so its backend finds it.
impl<S: BackendState + ?Sized> BackendState for Box<S> {
    fn logits(&self, i: usize) -> &[f32] {
        (**self).logits(i)
    }
    fn n_slots(&self) -> usize {
        (**self).n_slots()
    }
    fn context(&self) -> usize {
        (**self).context()
    }
    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
    fn kv_bytes(&self) -> usize {
        (**self).kv_bytes()
    }
    fn scratch_bytes(&self) -> usize {
        (**self).scratch_bytes()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        (**self).as_any_mut()
    }
}
