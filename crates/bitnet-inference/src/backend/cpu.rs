//! The CPU backend: [`Model`]'s forward pass ([`crate::model::forward`]) over the kernels of
//! [`crate::kernels`], one file per instruction set, chosen at run time.

use super::{Backend, BackendState};
use crate::model::{Batch, ForwardState, Model, ModelConfig, ModelWeights};
use crate::{Error, Result};

impl Backend for Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>> {
        Ok(Box::new(Model::new_state(self, slots, context, max_batch)?))
    }

    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()> {
        let state = state
            .as_any_mut()
            .downcast_mut::<ForwardState>()
            .ok_or_else(|| Error::Invalid("a state planned by another backend".into()))?;
        Model::forward(self, batch, state)
    }

    fn kernel_name(&self) -> &str {
        Model::kernel_name(self)
    }

    fn kv_bytes_per_position(&self) -> usize {
        let value_bytes = match self.kv_type() {
            crate::model::forward::KvType::F32 => 4,
            crate::model::forward::KvType::F16 => 2,
        };
        2 * self.config.n_layers * self.config.kv_dim() * value_bytes
    }

    fn weights(&self) -> &ModelWeights {
        &self.weights
    }
}

impl BackendState for ForwardState {
    fn logits(&self, i: usize) -> &[f32] {
        ForwardState::logits(self, i)
    }
    fn n_slots(&self) -> usize {
        ForwardState::n_slots(self)
    }
    fn context(&self) -> usize {
        ForwardState::context(self)
    }
    fn max_batch(&self) -> usize {
        ForwardState::max_batch(self)
    }
    fn kv_bytes(&self) -> usize {
        ForwardState::kv_bytes(self)
    }
    fn scratch_bytes(&self) -> usize {
        ForwardState::scratch_bytes(self)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
