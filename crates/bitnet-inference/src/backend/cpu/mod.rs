//! The CPU backend: the forward pass of [`forward`] over the kernels of [`crate::kernels`],
//! one file per instruction set, chosen when the backend is built, on its own threads.

mod forward;

pub use forward::{CpuBackend, CpuState};

use super::{Backend, BackendState, Batch, KvType};
use crate::model::{ModelConfig, ModelWeights};
use crate::{Error, Result};

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>> {
        Ok(Box::new(CpuBackend::new_state(
            self, slots, context, max_batch,
        )?))
    }

    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()> {
        let state = state
            .as_any_mut()
            .downcast_mut::<CpuState>()
            .ok_or_else(|| Error::Invalid("a state planned by another backend".into()))?;
        CpuBackend::forward(self, batch, state)
    }

    fn kernel_name(&self) -> &str {
        CpuBackend::kernel_name(self)
    }

    fn kv_bytes_per_position(&self) -> usize {
        let value_bytes = match self.kv_type() {
            KvType::F32 => 4,
            KvType::F16 => 2,
        };
        2 * self.config.n_layers * self.config.kv_dim() * value_bytes
    }

    fn weights(&self) -> &ModelWeights {
        &self.weights
    }
}

impl BackendState for CpuState {
    fn logits(&self, i: usize) -> &[f32] {
        CpuState::logits(self, i)
    }
    fn n_slots(&self) -> usize {
        CpuState::n_slots(self)
    }
    fn context(&self) -> usize {
        CpuState::context(self)
    }
    fn max_batch(&self) -> usize {
        CpuState::max_batch(self)
    }
    fn kv_bytes(&self) -> usize {
        CpuState::kv_bytes(self)
    }
    fn scratch_bytes(&self) -> usize {
        CpuState::scratch_bytes(self)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
