//! The RoPE angles of a forward call's entries, one implementation for every backend: cos
//! and sin rows `[entries, head_dim / 2]` as transformers computes them in f32, from tables
//! of the state's context (positions it holds, not the model's maximum) or, for scalings
//! that depend on the sequence length ([`crate::model::RopeScaling::depends_on_length`]),
//! from the frequencies of the length each sequence reaches in the call.

use super::Batch;
use crate::model::{rope, ModelConfig};

/// A state's RoPE tables and the scratch to compute rows from them.
pub(crate) struct RopeAngles {
    half: usize,
    /// `[context, half]` (empty for length-dependent scalings).
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `[half]` inverse frequencies, and per slot the sequence length a call reaches
    /// (length-dependent scalings).
    inv: Vec<f32>,
    slot_len: Vec<usize>,
}

impl RopeAngles {
    pub(crate) fn new(c: &ModelConfig, context: usize, slots: usize) -> Self {
        let half = c.head_dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let mut inv = vec![0.0; half];
        if !c.rope_scaling.depends_on_length() {
            let a = rope::inv_freq(c.rope_theta, c.head_dim, &c.rope_scaling, context, &mut inv);
            cos = vec![0.0; context * half];
            sin = vec![0.0; context * half];
            for (pos, (cos, sin)) in cos
                .chunks_exact_mut(half)
                .zip(sin.chunks_exact_mut(half))
                .enumerate()
            {
                rope::angles(pos, &inv, a, cos, sin);
            }
        }
        RopeAngles {
            half,
            cos,
            sin,
            inv,
            slot_len: vec![0; slots],
        }
    }

    /// Floats held.
    pub(crate) fn len(&self) -> usize {
        self.cos.len() + self.sin.len() + self.inv.len()
    }

    /// The cos and sin rows of every entry of `batch` into `cos` and `sin` (`half` floats
    /// an entry); positions are below the context and slots below the count (checked by
    /// the callers).
    pub(crate) fn rows(
        &mut self,
        c: &ModelConfig,
        batch: &Batch,
        cos: &mut [f32],
        sin: &mut [f32],
    ) {
        let half = self.half;
        let rows = cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half));
        if !c.rope_scaling.depends_on_length() {
            for (e, (cos, sin)) in batch.iter().zip(rows) {
                cos.copy_from_slice(&self.cos[e.pos * half..][..half]);
                sin.copy_from_slice(&self.sin[e.pos * half..][..half]);
            }
            return;
        }
        for e in batch {
            self.slot_len[e.slot] = 0;
        }
        for e in batch {
            self.slot_len[e.slot] = self.slot_len[e.slot].max(e.pos + 1);
        }
        let (mut last_len, mut a) = (0, 1.0);
        for (e, (cos, sin)) in batch.iter().zip(rows) {
            let len = self.slot_len[e.slot];
            if len != last_len {
                a = rope::inv_freq(
                    c.rope_theta,
                    c.head_dim,
                    &c.rope_scaling,
                    len,
                    &mut self.inv,
                );
                last_len = len;
            }
            rope::angles(e.pos, &self.inv, a, cos, sin);
        }
    }
}
