//! The CUDA backend (feature `cuda`): the CPU backend's forward pass (`cpu/forward.rs`) on an
//! NVIDIA GPU, with the weights, the KV caches and every buffer in device memory; a forward
//! call copies back only the logits rows that were asked for.
//!
//! Nothing of CUDA is needed to build: the driver (`libcuda.so`) and NVRTC are loaded at run
//! time, and the kernels (`kernels.cu`) are compiled by NVRTC at load, the PTX cached on disk
//! (`device.rs`). Without a driver, [`CudaBackend::new`] is an error that says so.
//!
//! The arithmetic is the CPU's: ternary linears quantize each token's activations to int8
//! with the same formula and rounding (round half to even) and sum the integer products
//! exactly; RMSNorm adds in the CPU's order; NVRTC compiles without FMA contraction, so the
//! element-wise steps round as the CPU's Rust code does. Sums of floats in another order
//! (attention, the dense lm_head) and `exp` differ in their last bits.
//!
//! What this first version does not do yet: f16 KV caches, quantized lm_heads, llama.cpp's Q8
//! activations for Q4/Q8 linears (each is refused with an error naming it), fast kernels
//! (these compute an output per thread, no tensor cores, no CUDA graphs).

mod device;
#[cfg(test)]
mod emu;
#[cfg(test)]
mod tests;
mod weights;

pub use device::driver_present;

/// The options the CUDA backend cannot honour yet, named as the command line names them
/// (`None`: it supports them all).
pub fn unsupported(options: &super::ModelOptions) -> Option<&'static str> {
    use super::{KvType, LmHeadQuant};
    use crate::kernels::qblock::QuantActs;
    if options.kv_type != KvType::F32 {
        return Some("--kv-type f16");
    }
    if options.lm_head != LmHeadQuant::None {
        return Some("a quantized lm_head (--lm-head int8/q6k/q4)");
    }
    if options.quant_acts != QuantActs::Exact {
        return Some("--quant-acts q8");
    }
    None
}

/// CUDA GPUs this machine has (0 without a driver, or where it fails to start).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    use cudarc::driver::result;
    if result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

use super::{Backend, BackendState, Batch};
use crate::model::{Activation, LinearWeights, ModelConfig, ModelWeights, RmsNorm};
use crate::{Error, Result};
use device::{Arg, DevBuf, Gpu, Kernel};
use std::sync::Arc;

/// Threads a block of every kernel.
const BLOCK: u32 = 128;

/// The largest batch a forward call may take (the grids' y dimension holds one token each).
const MAX_BATCH: usize = 65_535;

/// A model on a CUDA GPU.
pub struct CudaBackend {
    gpu: Arc<dyn Gpu>,
    config: ModelConfig,
    weights: ModelWeights,
    embedding: DenseDev,
    layers: Vec<LayerDev>,
    output_norm: NormDev,
    /// `None`: the tied embedding is the lm_head.
    lm_head: Option<LinearDev>,
    rope_cos: DevBuf,
    rope_sin: DevBuf,
    weight_bytes: usize,
    kernel_name: String,
}

struct NormDev {
    weight: DevBuf,
    eps: f32,
}

struct DenseDev {
    values: DevBuf,
    ty: i32,
}

enum LinearKind {
    /// `pack_ternary`'s words and the per-row multipliers.
    Ternary {
        words: DevBuf,
        multipliers: DevBuf,
    },
    Dense(DenseDev),
}

struct LinearDev {
    kind: LinearKind,
    input_norm: Option<NormDev>,
    rows: usize,
    cols: usize,
    /// Columns rounded up to the ternary layout's blocks (= cols for dense linears).
    padded_cols: usize,
}

struct LayerDev {
    attn_norm: NormDev,
    q: LinearDev,
    k: LinearDev,
    v: LinearDev,
    attn_sub_norm: Option<NormDev>,
    o: LinearDev,
    ffn_norm: NormDev,
    gate: LinearDev,
    up: LinearDev,
    ffn_sub_norm: Option<NormDev>,
    down: LinearDev,
}

/// Bytes the device copy of the weights takes (planned before anything is allocated).
fn planned_weight_bytes(c: &ModelConfig, w: &ModelWeights) -> usize {
    let norm = |n: &RmsNorm| n.weight.len() * 4;
    let dense = |m: &crate::kernels::DenseMatrix| match m.data() {
        crate::kernels::DenseData::F16(_) | crate::kernels::DenseData::BF16(_) => {
            m.rows() * m.cols() * 2
        }
        _ => m.rows() * m.cols() * 4,
    };
    let linear = |l: &crate::model::Linear| {
        l.input_norm.as_ref().map_or(0, norm)
            + match &l.weights {
                LinearWeights::Ternary(t) => t.rows() * t.padded_cols() / 4 + t.rows() * 4,
                LinearWeights::Dense(d) => dense(d),
            }
    };
    let layers: usize = w
        .layers
        .iter()
        .map(|l| {
            l.linears().into_iter().map(linear).sum::<usize>() + l.norms().map(norm).sum::<usize>()
        })
        .sum();
    let rope = 2 * c.max_context * (c.head_dim / 2) * 4;
    dense(&w.token_embedding)
        + layers
        + norm(&w.output_norm)
        + w.lm_head.as_ref().map_or(0, linear)
        + rope
}

impl CudaBackend {
    /// Loads `weights` onto CUDA device `ordinal` (0 for the first GPU). Errors: no driver,
    /// no such device, NVRTC missing (when the kernels are not cached yet), or not enough
    /// GPU memory (the message names what did not fit).
    pub fn new(config: ModelConfig, weights: ModelWeights, ordinal: usize) -> Result<Self> {
        let gpu: Arc<dyn Gpu> = Arc::new(device::CudaGpu::open(ordinal)?);
        Self::on(gpu, config, weights)
    }

    /// The same on any [`Gpu`] (the tests' emulator).
    fn on(gpu: Arc<dyn Gpu>, config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        if config.hidden_size > i32::MAX as usize / 16 || config.vocab_size > i32::MAX as usize {
            return Err(Error::Invalid(
                "CUDA: the model's sizes exceed what the kernels index".into(),
            ));
        }
        let planned = planned_weight_bytes(&config, &weights);
        if let Some((free, total)) = gpu.memory_info() {
            if planned > free {
                return Err(Error::Invalid(format!(
                    "CUDA: the model's weights ({planned} bytes on the GPU) do not fit on {}: \
                     {free} of {total} bytes free",
                    gpu.name()
                )));
            }
        }
        let norm = |n: &RmsNorm, what: &str| -> Result<NormDev> {
            Ok(NormDev {
                weight: DevBuf::from_slice(&gpu, &n.weight, what)?,
                eps: n.eps,
            })
        };
        let dense = |m: &crate::kernels::DenseMatrix, what: &str| -> Result<DenseDev> {
            let (ty, bytes) = weights::dense_values(m);
            Ok(DenseDev {
                values: DevBuf::from_slice(&gpu, &bytes, what)?,
                ty,
            })
        };
        let linear = |l: &crate::model::Linear, what: &str| -> Result<LinearDev> {
            let input_norm = match &l.input_norm {
                Some(n) => Some(norm(n, &format!("{what} input norm"))?),
                None => None,
            };
            let (kind, padded_cols) = match &l.weights {
                LinearWeights::Ternary(t) => (
                    LinearKind::Ternary {
                        words: DevBuf::from_slice(&gpu, &weights::pack_ternary(t), what)?,
                        multipliers: DevBuf::from_slice(
                            &gpu,
                            t.multipliers(),
                            &format!("{what} multipliers"),
                        )?,
                    },
                    t.padded_cols(),
                ),
                LinearWeights::Dense(d) => (LinearKind::Dense(dense(d, what)?), d.cols()),
            };
            Ok(LinearDev {
                kind,
                input_norm,
                rows: l.out_features(),
                cols: l.in_features(),
                padded_cols,
            })
        };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (i, l) in weights.layers.iter().enumerate() {
            let sub = |n: &Option<RmsNorm>, what: &str| -> Result<Option<NormDev>> {
                n.as_ref()
                    .map(|n| norm(n, &format!("layer {i} {what}")))
                    .transpose()
            };
            let lin =
                |l: &crate::model::Linear, what: &str| linear(l, &format!("layer {i} {what}"));
            layers.push(LayerDev {
                attn_norm: norm(&l.attn_norm, &format!("layer {i} attn_norm"))?,
                q: lin(&l.q_proj, "q_proj")?,
                k: lin(&l.k_proj, "k_proj")?,
                v: lin(&l.v_proj, "v_proj")?,
                attn_sub_norm: sub(&l.attn_sub_norm, "attn_sub_norm")?,
                o: lin(&l.o_proj, "o_proj")?,
                ffn_norm: norm(&l.ffn_norm, &format!("layer {i} ffn_norm"))?,
                gate: lin(&l.gate_proj, "gate_proj")?,
                up: lin(&l.up_proj, "up_proj")?,
                ffn_sub_norm: sub(&l.ffn_sub_norm, "ffn_sub_norm")?,
                down: lin(&l.down_proj, "down_proj")?,
            });
        }
        let (cos, sin) =
            weights::rope_tables(config.head_dim, config.rope_theta, config.max_context);
        let backend = CudaBackend {
            embedding: dense(&weights.token_embedding, "the token embedding")?,
            output_norm: norm(&weights.output_norm, "output_norm")?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|h| linear(h, "lm_head"))
                .transpose()?,
            rope_cos: DevBuf::from_slice(&gpu, &cos, "RoPE cos table")?,
            rope_sin: DevBuf::from_slice(&gpu, &sin, "RoPE sin table")?,
            layers,
            weight_bytes: planned,
            kernel_name: format!("cuda ({})", gpu.name()),
            gpu,
            config,
            weights,
        };
        Ok(backend)
    }

    /// The GPU's name (`NVIDIA H100 80GB HBM3`).
    pub fn device_name(&self) -> &str {
        self.gpu.name()
    }

    /// Bytes of GPU memory the weights take (KV caches and buffers are the states').
    pub fn gpu_weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Queues `kernel` over `grid` blocks of [`BLOCK`] threads.
    ///
    /// # Safety
    /// As [`Gpu::launch`]: the arguments match the kernel's parameters and the grid touches
    /// only memory inside the buffers passed.
    unsafe fn launch(&self, kernel: Kernel, grid: (usize, usize), args: &[Arg]) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { launch(&self.gpu, kernel, (grid.0, grid.1, 1), args) }
    }

    /// `out[..n·d] = rmsnorm(x[..n·d])` with `norm` (rows of `d`).
    fn rms_norm(
        &self,
        s: &CudaState,
        out: &DevBuf,
        x: &DevBuf,
        norm: &NormDev,
        n: usize,
        d: usize,
    ) -> Result<()> {
        rms_norm(&self.gpu, out, x, norm, &s.norm_parts, n, d)
    }

    /// Quantizes `n` rows of `cols` floats of `x` into the state's int8 activations.
    fn quantize(
        &self,
        s: &CudaState,
        x: &DevBuf,
        n: usize,
        cols: usize,
        padded: usize,
    ) -> Result<()> {
        quantize(
            &self.gpu,
            &s.acts,
            &s.act_scales,
            &s.act_sums,
            &s.act_max,
            x,
            n,
            cols,
            padded,
        )
    }

    /// Applies several linears to the same input rows `x: [n, cols]`, quantizing the input
    /// once for the ternary linears without an input norm of their own (as the CPU does).
    fn linears(
        &self,
        s: &CudaState,
        x: &DevBuf,
        n: usize,
        outs: &[(&LinearDev, &DevBuf)],
    ) -> Result<()> {
        let mut shared_quantized = false;
        for &(l, out) in outs {
            let input = match &l.input_norm {
                Some(norm) => {
                    self.rms_norm(s, &s.linear_in, x, norm, n, l.cols)?;
                    &s.linear_in
                }
                None => x,
            };
            check_fits(&[(out, n * l.rows * 4), (input, n * l.cols * 4)])?;
            match &l.kind {
                LinearKind::Ternary { words, multipliers } => {
                    if l.input_norm.is_some() || !shared_quantized {
                        self.quantize(s, input, n, l.cols, l.padded_cols)?;
                        shared_quantized = l.input_norm.is_none();
                    }
                    let acts = CudaActs {
                        q: &s.acts,
                        scales: &s.act_scales,
                        sums: &s.act_sums,
                    };
                    ternary(
                        &self.gpu,
                        out,
                        &s.dots,
                        words,
                        multipliers,
                        &acts,
                        n,
                        l.rows,
                        l.padded_cols,
                    )?;
                }
                LinearKind::Dense(d) => self.dense(s, out, d, input, n, l.rows, l.cols)?,
            }
        }
        Ok(())
    }

    /// `out[n, rows] = x[n, cols] · Wᵀ` for a dense `W: [rows, cols]`, [`DENSE_GROUP`] rows
    /// of `x` at a time through the state's partial sums.
    #[allow(clippy::too_many_arguments)]
    fn dense(
        &self,
        s: &CudaState,
        out: &DevBuf,
        w: &DenseDev,
        x: &DevBuf,
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let elem = if w.ty == weights::DENSE_F32 { 4 } else { 2 };
        check_fits(&[
            (out, n * rows * 4),
            (x, n * cols * 4),
            (&w.values, rows * cols * elem),
            (&s.dense_parts, DENSE_GROUP.min(n) * rows * 9 * 4),
        ])?;
        for first in (0..n).step_by(DENSE_GROUP) {
            let g = DENSE_GROUP.min(n - first);
            let x_at = Arg::Ptr(x.ptr() + (first * cols * 4) as u64);
            let out_at = Arg::Ptr(out.ptr() + (first * rows * 4) as u64);
            // SAFETY: dense_partials reads rows·cols weights of the declared type and g rows
            // of x from row `first` (first + g ≤ n), and writes g·rows·9 partial sums;
            // dense_finish reads those and writes g·rows floats of out from row `first`;
            // sizes checked above.
            unsafe {
                self.launch(
                    Kernel::DensePartials,
                    (rows * 9, g),
                    &[
                        s.dense_parts.arg(),
                        w.values.arg(),
                        Arg::I32(w.ty),
                        x_at,
                        Arg::I32(rows as i32),
                        Arg::I32(cols as i32),
                    ],
                )?;
                self.launch(
                    Kernel::DenseFinish,
                    (rows, g),
                    &[out_at, s.dense_parts.arg(), Arg::I32(rows as i32)],
                )?;
            }
        }
        Ok(())
    }

    /// `acc[..total] += x[..total]`.
    fn add(&self, acc: &DevBuf, x: &DevBuf, total: usize) -> Result<()> {
        check_fits(&[(acc, total * 4), (x, total * 4)])?;
        // SAFETY: add_in_place touches `total` floats of each; checked above.
        unsafe {
            self.launch(
                Kernel::AddInPlace,
                (total, 1),
                &[acc.arg(), x.arg(), Arg::I32(total as i32)],
            )
        }
    }

    /// RoPE of `n` rows of `heads` heads in `x`, at the positions in the state's metadata.
    fn rope(&self, s: &CudaState, x: &DevBuf, n: usize, heads: usize) -> Result<()> {
        let d = self.config.head_dim;
        check_fits(&[(x, n * heads * d * 4)])?;
        // SAFETY: rope reads n positions (each < context ≤ max_context, checked in `forward`,
        // so inside the tables of max_context·d/2 floats) and rotates n·heads·d floats of x.
        unsafe {
            self.launch(
                Kernel::Rope,
                (heads * d / 2, n),
                &[
                    x.arg(),
                    self.rope_cos.arg(),
                    self.rope_sin.arg(),
                    s.meta_arg(Meta::Pos),
                    Arg::I32(heads as i32),
                    Arg::I32(d as i32),
                ],
            )
        }
    }

    /// Causal GQA attention of the batch's rows over their slots' caches of one layer into
    /// `s.attn`, [`ATTN_GROUP`] rows at a time (see `attn_*` in kernels.cu).
    fn attention(
        &self,
        s: &CudaState,
        batch: &Batch,
        keys: &DevBuf,
        values: &DevBuf,
    ) -> Result<()> {
        let c = &self.config;
        let (n, qd, heads, d) = (batch.len(), c.q_dim(), c.n_heads, c.head_dim);
        let chunks = s.context.div_ceil(ATTN_CHUNK);
        let cache = s.n_slots * s.context * c.kv_dim() * 4;
        check_fits(&[
            (&s.attn, n * qd * 4),
            (&s.q, n * qd * 4),
            (keys, cache),
            (values, cache),
            (&s.att_scores, ATTN_GROUP.min(n) * heads * s.context * 4),
            (&s.att_stats, ATTN_GROUP.min(n) * heads * chunks * 2 * 4),
        ])?;
        let scale = 1.0 / (d as f32).sqrt();
        for first in (0..n).step_by(ATTN_GROUP) {
            let g = ATTN_GROUP.min(n - first);
            let span = batch[first..first + g]
                .iter()
                .map(|e| e.pos + 1)
                .max()
                .unwrap_or(1);
            let at = |buf: &DevBuf, elems: usize| Arg::Ptr(buf.ptr() + (first * elems * 4) as u64);
            let meta = |section: Meta| match s.meta_arg(section) {
                Arg::Ptr(p) => Arg::Ptr(p + (first * 4) as u64),
                other => other,
            };
            // SAFETY: rows first..first+g of the batch (≤ n): attn_scores reads their q rows
            // and the cache rows 0..=pos of their slots (pos < context, slot < n_slots, checked
            // in `run`) and writes g·heads·context scores; attn_chunk_stats reads those and
            // writes g·heads·chunks·2 floats; attn_output reads both and the V cache rows, and
            // writes g·q_dim floats of attn; sizes checked above.
            unsafe {
                self.launch(
                    Kernel::AttnScores,
                    (heads * span, g),
                    &[
                        s.att_scores.arg(),
                        at(&s.q, qd),
                        keys.arg(),
                        meta(Meta::Slot),
                        meta(Meta::Pos),
                        Arg::I32(heads as i32),
                        Arg::I32(c.gqa_group() as i32),
                        Arg::I32(d as i32),
                        Arg::I32(c.kv_dim() as i32),
                        Arg::I32(s.context as i32),
                        Arg::I32(span as i32),
                        Arg::F32(scale),
                    ],
                )?;
                self.launch(
                    Kernel::AttnChunkStats,
                    (heads * chunks, g),
                    &[
                        s.att_stats.arg(),
                        s.att_scores.arg(),
                        meta(Meta::Pos),
                        Arg::I32(heads as i32),
                        Arg::I32(s.context as i32),
                        Arg::I32(chunks as i32),
                    ],
                )?;
                self.launch(
                    Kernel::AttnOutput,
                    (heads * d, g),
                    &[
                        at(&s.attn, qd),
                        s.att_scores.arg(),
                        s.att_stats.arg(),
                        values.arg(),
                        meta(Meta::Slot),
                        meta(Meta::Pos),
                        Arg::I32(heads as i32),
                        Arg::I32(c.gqa_group() as i32),
                        Arg::I32(d as i32),
                        Arg::I32(c.kv_dim() as i32),
                        Arg::I32(s.context as i32),
                        Arg::I32(chunks as i32),
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn run(&self, batch: &Batch, s: &mut CudaState) -> Result<()> {
        let c = &self.config;
        let n = batch.len();
        if n == 0 || n > s.max_batch {
            return Err(Error::Invalid(format!(
                "a forward call takes 1 to {} tokens, got {n}",
                s.max_batch
            )));
        }
        for e in batch {
            if e.token as usize >= c.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {} is outside the vocabulary (size {})",
                    e.token, c.vocab_size
                )));
            }
            if e.slot >= s.n_slots {
                return Err(Error::Invalid(format!(
                    "sequence slot {} does not exist ({} slots)",
                    e.slot, s.n_slots
                )));
            }
            if e.pos >= s.context {
                return Err(Error::Invalid(format!(
                    "position {} is past the context size {}",
                    e.pos, s.context
                )));
            }
        }
        let (hd, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.ffn_size);

        // The batch's metadata: tokens, positions, slots, then the rows that want logits.
        let mut meta = vec![0i32; 4 * s.max_batch];
        let mut m = 0;
        for (i, e) in batch.iter().enumerate() {
            meta[i] = e.token as i32;
            meta[s.max_batch + i] = e.pos as i32;
            meta[2 * s.max_batch + i] = e.slot as i32;
            if e.logits {
                meta[3 * s.max_batch + m] = i as i32;
                m += 1;
            }
        }
        s.meta.upload(0, &meta)?;

        check_fits(&[
            (&s.hidden, n * hd * 4),
            (
                &self.embedding.values,
                c.vocab_size
                    * hd
                    * if self.embedding.ty == weights::DENSE_F32 {
                        4
                    } else {
                        2
                    },
            ),
        ])?;
        // SAFETY: embed_rows reads n token ids (each < vocab, checked above) and their rows
        // of the [vocab, hidden] embedding, and writes n·hidden floats; sizes checked.
        unsafe {
            self.launch(
                Kernel::EmbedRows,
                (hd, n),
                &[
                    s.hidden.arg(),
                    self.embedding.values.arg(),
                    Arg::I32(self.embedding.ty),
                    s.meta_arg(Meta::Tokens),
                    Arg::I32(hd as i32),
                ],
            )?;
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            self.rms_norm(s, &s.normed, &s.hidden, &layer.attn_norm, n, hd)?;
            self.linears(
                s,
                &s.normed,
                n,
                &[(&layer.q, &s.q), (&layer.k, &s.k), (&layer.v, &s.v)],
            )?;
            self.rope(s, &s.q, n, c.n_heads)?;
            self.rope(s, &s.k, n, c.n_kv_heads)?;
            let (keys, values) = (&s.keys[l], &s.values[l]);
            let cache = s.n_slots * s.context * kvd * 4;
            check_fits(&[
                (keys, cache),
                (values, cache),
                (&s.k, n * kvd * 4),
                (&s.v, n * kvd * 4),
            ])?;
            // SAFETY: kv_store writes n rows of kv_dim floats at (slot, pos) of caches of
            // n_slots·context rows (slot and pos checked above) and reads n rows of k and v.
            unsafe {
                self.launch(
                    Kernel::KvStore,
                    (kvd, n),
                    &[
                        keys.arg(),
                        values.arg(),
                        s.k.arg(),
                        s.v.arg(),
                        s.meta_arg(Meta::Slot),
                        s.meta_arg(Meta::Pos),
                        Arg::I32(kvd as i32),
                        Arg::I32(s.context as i32),
                    ],
                )?;
            }
            self.attention(s, batch, keys, values)?;
            let attn_in = match &layer.attn_sub_norm {
                Some(norm) => {
                    self.rms_norm(s, &s.normed, &s.attn, norm, n, qd)?;
                    &s.normed
                }
                None => &s.attn,
            };
            self.linears(s, attn_in, n, &[(&layer.o, &s.proj)])?;
            self.add(&s.hidden, &s.proj, n * hd)?;

            // Feed-forward block.
            self.rms_norm(s, &s.normed, &s.hidden, &layer.ffn_norm, n, hd)?;
            self.linears(
                s,
                &s.normed,
                n,
                &[(&layer.gate, &s.gate), (&layer.up, &s.up)],
            )?;
            check_fits(&[(&s.gate, n * ffn * 4), (&s.up, n * ffn * 4)])?;
            let act = match c.activation {
                Activation::Relu2 => 0,
                Activation::Silu => 1,
            };
            // SAFETY: gate_act touches n·ffn floats of gate and up; checked above.
            unsafe {
                self.launch(
                    Kernel::GateAct,
                    (n * ffn, 1),
                    &[
                        s.gate.arg(),
                        s.up.arg(),
                        Arg::I32((n * ffn) as i32),
                        Arg::I32(act),
                    ],
                )?;
            }
            let down_in = match &layer.ffn_sub_norm {
                Some(norm) => {
                    self.rms_norm(s, &s.normed, &s.gate, norm, n, ffn)?;
                    &s.normed
                }
                None => &s.gate,
            };
            self.linears(s, down_in, n, &[(&layer.down, &s.proj)])?;
            self.add(&s.hidden, &s.proj, n * hd)?;
        }

        // Final norm and lm_head, only for the rows that want logits.
        s.n_logits = m;
        if m == 0 {
            return Ok(());
        }
        check_fits(&[(&s.logit_rows, m * hd * 4), (&s.hidden, n * hd * 4)])?;
        // SAFETY: gather_rows reads m row indices (each < n) and their rows of hidden, and
        // writes m·hidden floats; checked above.
        unsafe {
            self.launch(
                Kernel::GatherRows,
                (hd, m),
                &[
                    s.logit_rows.arg(),
                    s.hidden.arg(),
                    s.meta_arg(Meta::LogitRows),
                    Arg::I32(hd as i32),
                ],
            )?;
        }
        self.rms_norm(s, &s.normed, &s.logit_rows, &self.output_norm, m, hd)?;
        let vocab = c.vocab_size;
        match &self.lm_head {
            None => self.dense(s, &s.logits_dev, &self.embedding, &s.normed, m, vocab, hd)?,
            Some(head) => self.linears(s, &s.normed, m, &[(head, &s.logits_dev)])?,
        }
        s.logits_dev.download(0, &mut s.logits[..m * vocab])?;
        Ok(())
    }
}

/// Queues `kernel` over `threads.0` threads (in blocks of [`BLOCK`]) × `threads.1` × `threads.2`.
///
/// # Safety
/// As [`Gpu::launch`]: the arguments match the kernel's parameters and the grid touches
/// only memory inside the buffers passed.
unsafe fn launch(
    gpu: &Arc<dyn Gpu>,
    kernel: Kernel,
    threads: (usize, usize, usize),
    args: &[Arg],
) -> Result<()> {
    let blocks = threads.0.div_ceil(BLOCK as usize).max(1);
    // SAFETY: the caller's contract.
    unsafe {
        gpu.launch(
            kernel,
            [
                blocks as u32,
                threads.1.max(1) as u32,
                threads.2.max(1) as u32,
            ],
            [BLOCK, 1, 1],
            args,
        )
    }
}

/// `out[..n·d] = rmsnorm(x[..n·d])` with `norm`, through `parts` (16 floats a row).
fn rms_norm(
    gpu: &Arc<dyn Gpu>,
    out: &DevBuf,
    x: &DevBuf,
    norm: &NormDev,
    parts: &DevBuf,
    n: usize,
    d: usize,
) -> Result<()> {
    check_fits(&[
        (out, n * d * 4),
        (x, n * d * 4),
        (&norm.weight, d * 4),
        (parts, n * 16 * 4),
    ])?;
    // SAFETY: rms_partials reads n·d floats of x and writes 16n of parts; rms_apply reads
    // them, d weights, and writes n·d floats of out; sizes checked above.
    unsafe {
        launch(
            gpu,
            Kernel::RmsPartials,
            (n * 16, 1, 1),
            &[parts.arg(), x.arg(), Arg::I32(n as i32), Arg::I32(d as i32)],
        )?;
        launch(
            gpu,
            Kernel::RmsApply,
            (d, n, 1),
            &[
                out.arg(),
                x.arg(),
                norm.weight.arg(),
                parts.arg(),
                Arg::I32(d as i32),
                Arg::F32(norm.eps),
            ],
        )
    }
}

/// Columns of one piece of `absmax_partials` (`QUANT_PIECE` in kernels.cu).
const QUANT_PIECE: usize = 64;

/// Quantizes `n` rows of `cols` floats of `x` into `q` (rows of `padded` bytes), `scales`
/// and `sums`, through `pmax` (`⌈cols / 64⌉` floats a row).
#[allow(clippy::too_many_arguments)]
fn quantize(
    gpu: &Arc<dyn Gpu>,
    q: &DevBuf,
    scales: &DevBuf,
    sums: &DevBuf,
    pmax: &DevBuf,
    x: &DevBuf,
    n: usize,
    cols: usize,
    padded: usize,
) -> Result<()> {
    let pieces = cols.div_ceil(QUANT_PIECE).max(1);
    check_fits(&[
        (x, n * cols * 4),
        (q, n * padded),
        (scales, n * 4),
        (sums, n * 4),
        (pmax, n * pieces * 4),
    ])?;
    // SAFETY: absmax_partials reads n·cols floats, writes n·pieces maxima and n sums;
    // quantize_apply reads them and writes n·padded bytes, n scales and adds into n sums;
    // sizes checked above.
    unsafe {
        launch(
            gpu,
            Kernel::AbsmaxPartials,
            (n * pieces, 1, 1),
            &[
                pmax.arg(),
                sums.arg(),
                x.arg(),
                Arg::I32(n as i32),
                Arg::I32(cols as i32),
                Arg::I32(pieces as i32),
            ],
        )?;
        launch(
            gpu,
            Kernel::QuantizeApply,
            (padded, n, 1),
            &[
                q.arg(),
                scales.arg(),
                sums.arg(),
                x.arg(),
                pmax.arg(),
                Arg::I32(cols as i32),
                Arg::I32(padded as i32),
                Arg::I32(pieces as i32),
            ],
        )
    }
}

/// Positions a softmax chunk takes (`ATTN_CHUNK` in kernels.cu, the CPU's `CHUNK`).
const ATTN_CHUNK: usize = 256;

/// Token rows attention takes at once (bounds its scores: heads × context floats a row).
const ATTN_GROUP: usize = 8;

/// Token rows a dense product takes at once (bounds its partial sums: 9 floats an output).
const DENSE_GROUP: usize = 8;

/// Words of K one `ternary_partial` thread sums (256 columns).
const TERNARY_PIECE: usize = 16;

/// `out[n, rows]` = the ternary product of `words`/`multipliers` (rows × padded_cols) with
/// the quantized activations in `acts` (`q`, `scales`, `sums` of `n` rows), through the
/// integer sums `dots` (n·rows).
#[allow(clippy::too_many_arguments)]
fn ternary(
    gpu: &Arc<dyn Gpu>,
    out: &DevBuf,
    dots: &DevBuf,
    words: &DevBuf,
    multipliers: &DevBuf,
    acts: &CudaActs,
    n: usize,
    rows: usize,
    padded_cols: usize,
) -> Result<()> {
    let kwords = padded_cols / 16;
    check_fits(&[
        (out, n * rows * 4),
        (dots, n * rows * 4),
        (words, kwords * rows * 4),
        (multipliers, rows * 4),
        (acts.q, n * padded_cols),
        (acts.scales, n * 4),
        (acts.sums, n * 4),
    ])?;
    // SAFETY: zero_ints writes n·rows ints of dots; ternary_partial reads kwords·rows words
    // and n rows of kwords·16 int8 activations and adds into n·rows ints; ternary_finish
    // reads those, n scales and sums, rows multipliers, and writes n·rows floats; sizes
    // checked above.
    unsafe {
        launch(
            gpu,
            Kernel::ZeroInts,
            (n * rows, 1, 1),
            &[dots.arg(), Arg::I32((n * rows) as i32)],
        )?;
        launch(
            gpu,
            Kernel::TernaryPartial,
            (rows, n, kwords.div_ceil(TERNARY_PIECE)),
            &[
                dots.arg(),
                words.arg(),
                acts.q.arg(),
                Arg::I32(rows as i32),
                Arg::I32(kwords as i32),
                Arg::I32(TERNARY_PIECE as i32),
            ],
        )?;
        launch(
            gpu,
            Kernel::TernaryFinish,
            (rows, n, 1),
            &[
                out.arg(),
                dots.arg(),
                multipliers.arg(),
                acts.scales.arg(),
                acts.sums.arg(),
                Arg::I32(rows as i32),
            ],
        )
    }
}

/// Quantized activation rows: int8 values, scales, sums.
struct CudaActs<'a> {
    q: &'a DevBuf,
    scales: &'a DevBuf,
    sums: &'a DevBuf,
}

/// Every `(buffer, bytes)` pair: the buffer holds at least that many bytes (the guard that
/// keeps each launch inside its buffers).
fn check_fits(pairs: &[(&DevBuf, usize)]) -> Result<()> {
    for &(buf, bytes) in pairs {
        if buf.bytes() < bytes {
            return Err(Error::Invalid(format!(
                "CUDA: internal error: a kernel would touch {bytes} bytes of a {}-byte buffer",
                buf.bytes()
            )));
        }
    }
    Ok(())
}

/// The sections of a state's metadata buffer.
#[derive(Clone, Copy)]
enum Meta {
    Tokens,
    Pos,
    Slot,
    LogitRows,
}

/// The KV caches of every slot and every buffer a forward call uses, in device memory.
pub struct CudaState {
    max_batch: usize,
    n_slots: usize,
    context: usize,
    /// One `[slot][position][kv_dim]` f32 cache per layer.
    keys: Vec<DevBuf>,
    values: Vec<DevBuf>,
    hidden: DevBuf,
    normed: DevBuf,
    linear_in: DevBuf,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    attn: DevBuf,
    gate: DevBuf,
    up: DevBuf,
    proj: DevBuf,
    /// int8 activations `[max_batch, padded width]`, their scales and sums.
    acts: DevBuf,
    act_scales: DevBuf,
    act_sums: DevBuf,
    /// Per row: the maxima of pieces of 64 columns (quantization), the 16 partial sums of
    /// squares (RMSNorm); per (row, output): integer dot products (ternary linears).
    act_max: DevBuf,
    norm_parts: DevBuf,
    dots: DevBuf,
    /// Attention's scores and per-chunk (max, Σ exp) for [`ATTN_GROUP`] rows.
    att_scores: DevBuf,
    att_stats: DevBuf,
    /// The partial sums of dense products (`dense_partials`), for [`DENSE_GROUP`] rows.
    dense_parts: DevBuf,
    /// i32 `[4][max_batch]`: tokens, positions, slots, rows that want logits.
    meta: DevBuf,
    logit_rows: DevBuf,
    logits_dev: DevBuf,
    /// Host copy of the last call's logits, `[n_logits, vocab]`.
    logits: Vec<f32>,
    vocab: usize,
    n_logits: usize,
    kv_bytes: usize,
    scratch_bytes: usize,
}

impl CudaState {
    fn meta_arg(&self, section: Meta) -> Arg {
        let i = match section {
            Meta::Tokens => 0,
            Meta::Pos => 1,
            Meta::Slot => 2,
            Meta::LogitRows => 3,
        };
        Arg::Ptr(self.meta.ptr() + (i * self.max_batch * 4) as u64)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>> {
        let c = &self.config;
        if context == 0 || context > c.max_context {
            return Err(Error::Invalid(format!(
                "context size {context} must be between 1 and the model's {}",
                c.max_context
            )));
        }
        let (slots, max_batch) = (slots.max(1), max_batch.max(1));
        if max_batch > MAX_BATCH {
            return Err(Error::Invalid(format!(
                "CUDA: a batch of {max_batch} tokens is over the backend's {MAX_BATCH}"
            )));
        }
        let kvd = c.kv_dim();
        let cache = slots
            .checked_mul(context)
            .and_then(|v| v.checked_mul(kvd * 4))
            .ok_or_else(|| Error::Invalid("CUDA: the KV cache size overflows".into()))?;
        let wide = c.hidden_size.max(c.ffn_size).max(c.q_dim());
        let padded = wide.div_ceil(crate::kernels::BLOCK_WEIGHTS) * crate::kernels::BLOCK_WEIGHTS;
        let f = |elems: usize| max_batch * elems * 4;
        // The widest ternary product: a layer's, or a ternary lm_head's.
        let dot_rows = match &self.lm_head {
            Some(LinearDev {
                kind: LinearKind::Ternary { .. },
                rows,
                ..
            }) => wide.max(*rows),
            _ => wide,
        };
        let sizes = [
            ("hidden", f(c.hidden_size)),
            ("normed", f(wide)),
            ("linear_in", f(wide)),
            ("q", f(c.q_dim())),
            ("k", f(kvd)),
            ("v", f(kvd)),
            ("attn", f(c.q_dim())),
            ("gate", f(c.ffn_size)),
            ("up", f(c.ffn_size)),
            ("proj", f(c.hidden_size)),
            ("int8 activations", max_batch * padded),
            ("activation scales", f(1)),
            ("activation sums", f(1)),
            ("activation maxima", f(padded.div_ceil(QUANT_PIECE))),
            ("RMSNorm partial sums", f(16)),
            ("integer dot products", f(dot_rows)),
            (
                "attention scores",
                ATTN_GROUP.min(max_batch) * c.n_heads * context * 4,
            ),
            (
                "attention chunk statistics",
                ATTN_GROUP.min(max_batch) * c.n_heads * context.div_ceil(ATTN_CHUNK) * 2 * 4,
            ),
            (
                "dense partial sums",
                DENSE_GROUP.min(max_batch) * wide.max(c.vocab_size) * 9 * 4,
            ),
            ("batch metadata", f(4)),
            ("logit rows", f(c.hidden_size)),
            ("logits", f(c.vocab_size)),
        ];
        let scratch: usize = sizes.iter().map(|s| s.1).sum();
        let kv_total = 2 * c.n_layers * cache;
        if let Some((free, total)) = self.gpu.memory_info() {
            if kv_total + scratch > free {
                return Err(Error::Invalid(format!(
                    "CUDA: the KV cache for {slots} sequence(s) of {context} positions \
                     ({kv_total} bytes) and the buffers for batches of {max_batch} tokens \
                     ({scratch} bytes) do not fit on {}: {free} of {total} bytes free",
                    self.gpu.name()
                )));
            }
        }
        let mut keys = Vec::with_capacity(c.n_layers);
        let mut values = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            keys.push(DevBuf::new(
                &self.gpu,
                cache,
                &format!("the KV cache (keys of layer {l})"),
            )?);
            values.push(DevBuf::new(
                &self.gpu,
                cache,
                &format!("the KV cache (values of layer {l})"),
            )?);
        }
        let mut bufs = Vec::with_capacity(sizes.len());
        for (what, bytes) in sizes {
            bufs.push(DevBuf::new(
                &self.gpu,
                bytes,
                &format!("the {what} buffer"),
            )?);
        }
        let mut it = bufs.into_iter();
        let mut next = || it.next().expect("one buffer per size");
        Ok(Box::new(CudaState {
            max_batch,
            n_slots: slots,
            context,
            keys,
            values,
            hidden: next(),
            normed: next(),
            linear_in: next(),
            q: next(),
            k: next(),
            v: next(),
            attn: next(),
            gate: next(),
            up: next(),
            proj: next(),
            acts: next(),
            act_scales: next(),
            act_sums: next(),
            act_max: next(),
            norm_parts: next(),
            dots: next(),
            att_scores: next(),
            att_stats: next(),
            dense_parts: next(),
            meta: next(),
            logit_rows: next(),
            logits_dev: next(),
            logits: vec![0.0; max_batch * c.vocab_size],
            vocab: c.vocab_size,
            n_logits: 0,
            kv_bytes: kv_total,
            scratch_bytes: scratch,
        }))
    }

    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()> {
        let state = state
            .as_any_mut()
            .downcast_mut::<CudaState>()
            .ok_or_else(|| Error::Invalid("a state planned by another backend".into()))?;
        self.run(batch, state)
    }

    fn kernel_name(&self) -> &str {
        &self.kernel_name
    }

    fn kv_bytes_per_position(&self) -> usize {
        2 * self.config.n_layers * self.config.kv_dim() * 4
    }

    fn weights(&self) -> &ModelWeights {
        &self.weights
    }
}

impl BackendState for CudaState {
    fn logits(&self, i: usize) -> &[f32] {
        assert!(i < self.n_logits, "logits row {i} of {}", self.n_logits);
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }
    fn n_slots(&self) -> usize {
        self.n_slots
    }
    fn context(&self) -> usize {
        self.context
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    fn kv_bytes(&self) -> usize {
        self.kv_bytes
    }
    fn scratch_bytes(&self) -> usize {
        self.scratch_bytes
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
