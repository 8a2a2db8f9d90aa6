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
//! exactly; RMSNorm, the dense products (the f16 lm_head) and attention add in the CPU
//! portable path's order; NVRTC compiles without FMA contraction, so the element-wise steps
//! round as the CPU's Rust code does, and the logits equal the portable path's bit for bit.
//!
//! Decode is launch-bound before it is bandwidth-bound, so a forward call is few launches:
//! per layer one `norm_quant` (RMSNorm and int8 quantization of a row, in one block) before
//! each group of linears, one ternary product for q/k/v (their rows packed into one matrix
//! at load) and one for gate/up, the residual add folded into the o/down products' epilogue,
//! the gated activation folded into the down projection's `norm_quant`. Calls of up to
//! [`GRAPH_MAX_TOKENS`] tokens are recorded once as a CUDA graph per (tokens, logits rows)
//! and replayed: one launch a step.
//!
//! Not done yet: tensor cores for the float lm_head; a prefill attention tiled over query
//! rows (each row's chunk blocks read their K/V rows themselves).
//!
//! Ternary products: a dp4a GEMV (`ternary_gemv`) for decode-sized calls, the int8 tensor
//! cores (`ternary_gemm`, `mma.sync`, compute capability 8.0 and newer) from
//! [`MMA_MIN_TOKENS`] tokens; both sum the same integers exactly.

mod device;
#[cfg(test)]
mod emu;
#[cfg(test)]
mod tests;
mod weights;

pub use device::driver_present;

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

use super::{Backend, BackendState, Batch, KvType};
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
    lm_head: Option<LinearGroup>,
    weight_bytes: usize,
    kernel_name: String,
    /// Whether decode-sized forward calls are recorded into graphs and replayed
    /// (`BITNET_CUDA_GRAPHS=0` turns it off, to measure what it saves).
    use_graphs: bool,
    /// Whether products of many tokens run on the int8 tensor cores (`ternary_gemm`; the
    /// same bits as the GEMV): where the device has them, unless `BITNET_CUDA_MMA=0`.
    use_mma: bool,
    /// Bytes of attention parts a state plans ([`ATTN_PARTS_BYTES`]; tests make it small to
    /// cut the batch into several attention launches).
    attn_parts_budget: usize,
    /// Element type of the KV caches of states made from now on.
    kv_type: KvType,
    /// How Q4_0/Q4_1/Q8_0 linears meet their activations (`set_quant_acts`).
    quant_acts: crate::kernels::qblock::QuantActs,
    /// The quantized copy of the float lm_head (`--lm-head int8/q6k/q4`) that logits use
    /// instead.
    quant_head: Option<QuantHeadDev>,
    /// Held for a forward call's copies and launches: one call at a time on the stream (a
    /// graph capture records whatever the stream is given).
    stream: std::sync::Mutex<()>,
}

/// A quantized lm_head on the device, its rows zero-padded to `padded` columns (the width
/// of its 12-bit activations).
struct QuantHeadDev {
    kind: QuantHeadKind,
    padded: usize,
}

enum QuantHeadKind {
    /// int8 rows chunk-major (`weights::chunk_major`, 8 columns a chunk), per-row scales.
    Int8 { values: DevBuf, scales: DevBuf },
    /// 4-bit codes of 32-column groups, 16 bytes per (group, row) chunk-major, and their f16
    /// scales (`q4_logits` in kernels.cu).
    Q4 { codes: DevBuf, scales: DevBuf },
    /// ggml Q6_K blocks, block-major (`q6k_logits`).
    Q6k { blocks: DevBuf },
}

impl QuantHeadDev {
    fn bytes(&self) -> usize {
        match &self.kind {
            QuantHeadKind::Int8 { values, scales } => values.bytes() + scales.bytes(),
            QuantHeadKind::Q4 { codes, scales } => codes.bytes() + scales.bytes(),
            QuantHeadKind::Q6k { blocks } => blocks.bytes(),
        }
    }

    /// The CPU backend's quantized copy of `m` (the same integers and scales), in the
    /// layouts the kernels read.
    fn new(
        gpu: &Arc<dyn Gpu>,
        quant: crate::backend::LmHeadQuant,
        m: &crate::kernels::DenseMatrix,
    ) -> Result<Option<Self>> {
        use crate::backend::LmHeadQuant;
        let buf = |bytes: &[u8], what: &str| DevBuf::from_slice(gpu, bytes, what);
        Ok(Some(match quant {
            LmHeadQuant::None => return Ok(None),
            LmHeadQuant::Int8 => {
                let q = crate::kernels::int8::Int8Matrix::from_dense(m);
                let bytes: &[u8] = bytemuck::cast_slice(q.values());
                let values = weights::chunk_major(bytes, 1, q.rows(), q.padded_cols());
                QuantHeadDev {
                    kind: QuantHeadKind::Int8 {
                        values: buf(&values, "the int8 lm_head")?,
                        scales: buf(bytemuck::cast_slice(q.scales()), "the int8 lm_head scales")?,
                    },
                    padded: q.padded_cols(),
                }
            }
            LmHeadQuant::Q4 => {
                let q = crate::kernels::q4::Q4Matrix::from_dense(m);
                let (rows, groups) = (q.rows(), q.padded_cols() / crate::kernels::q4::Q4_GROUP);
                let mut codes = vec![0u8; groups * rows * 16];
                let mut scales = vec![0u16; groups * rows];
                for r in 0..rows {
                    for g in 0..groups {
                        let (c, d) = q.group_codes(r, g);
                        codes[(g * rows + r) * 16..][..16].copy_from_slice(&c);
                        scales[g * rows + r] = d.to_bits();
                    }
                }
                QuantHeadDev {
                    kind: QuantHeadKind::Q4 {
                        codes: buf(&codes, "the q4 lm_head")?,
                        scales: buf(bytemuck::cast_slice(&scales), "the q4 lm_head scales")?,
                    },
                    padded: q.padded_cols(),
                }
            }
            LmHeadQuant::Q6K => {
                use crate::kernels::q6k::{Q6K_BLOCK, Q6K_BLOCK_BYTES};
                let q = crate::kernels::q6k::Q6kMatrix::from_dense_releasing(m)?;
                let (rows, nb) = (q.rows(), q.padded_cols() / Q6K_BLOCK);
                let mut blocks = vec![0u8; nb * rows * Q6K_BLOCK_BYTES];
                for r in 0..rows {
                    for (b, blk) in q.row(r).chunks_exact(Q6K_BLOCK_BYTES).enumerate() {
                        blocks[(b * rows + r) * Q6K_BLOCK_BYTES..][..Q6K_BLOCK_BYTES]
                            .copy_from_slice(blk);
                    }
                }
                QuantHeadDev {
                    kind: QuantHeadKind::Q6k {
                        blocks: buf(&blocks, "the q6k lm_head")?,
                    },
                    padded: q.padded_cols(),
                }
            }
        }))
    }
}

struct NormDev {
    weight: DevBuf,
    eps: f32,
}

/// A dense matrix in the kernels' chunk-major layout (`weights::chunk_major`).
struct DenseDev {
    values: DevBuf,
    ty: i32,
    rows: usize,
    cols: usize,
    /// With `--quant-acts q8`, the file's Q4_0/Q4_1/Q8_0 blocks (block-major: block b of
    /// row r at `(b · rows + r) · block bytes`) and their type (`Q8_*` in kernels.cu).
    q8: Option<(DevBuf, i32)>,
}

impl DenseDev {
    fn elem_bytes(&self) -> usize {
        if self.ty == weights::DENSE_F32 {
            4
        } else {
            2
        }
    }
}

enum LinearKind {
    /// `pack_ternary`'s words and the per-row multipliers; for group-scaled weights, the
    /// group size in 64-column steps (1 or 2; 0 without groups) and `pack_group_scales`'
    /// scales.
    Ternary {
        words: DevBuf,
        multipliers: DevBuf,
        group_steps: usize,
        group_scales: Option<DevBuf>,
    },
    Dense(DenseDev),
}

struct LinearDev {
    kind: LinearKind,
    input_norm: Option<NormDev>,
    rows: usize,
    /// Columns rounded up to the ternary layout's blocks (= cols for dense linears).
    padded_cols: usize,
}

/// Linears that take the same input (q/k/v; gate/up; one alone).
enum LinearGroup {
    /// Ternary linears without input norms of their own, with their rows concatenated into
    /// one matrix: one quantization and one launch for all.
    Fused {
        linear: LinearDev,
        /// The rows of each member, in order (at most 3).
        segments: Vec<usize>,
    },
    /// Each on its own (dense linears, or ones with their own input norm).
    Separate(Vec<LinearDev>),
}

struct LayerDev {
    attn_norm: NormDev,
    qkv: LinearGroup,
    attn_sub_norm: Option<NormDev>,
    o: LinearGroup,
    ffn_norm: NormDev,
    gate_up: LinearGroup,
    ffn_sub_norm: Option<NormDev>,
    down: LinearGroup,
    /// Qwen3's per-head norms of queries and keys (both or neither).
    qk_norms: Option<(NormDev, NormDev)>,
}

/// What a projection reads: `x` (`cols` floats a row), or act(x)·up for the gated
/// feed-forward's output.
#[derive(Clone, Copy)]
struct Source<'a> {
    x: &'a DevBuf,
    gated: Option<(&'a DevBuf, i32)>,
    cols: usize,
}

/// Bytes the device copy of the weights takes (planned before anything is allocated).
fn planned_weight_bytes(w: &ModelWeights) -> usize {
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
    dense(&w.token_embedding) + layers + norm(&w.output_norm) + w.lm_head.as_ref().map_or(0, linear)
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
        let planned = planned_weight_bytes(&weights);
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
            let elem = if ty == weights::DENSE_F32 { 4 } else { 2 };
            let values = weights::chunk_major(&bytes, elem, m.rows(), m.cols());
            Ok(DenseDev {
                values: DevBuf::from_slice(&gpu, &values, what)?,
                ty,
                rows: m.rows(),
                cols: m.cols(),
                q8: None,
            })
        };
        let ternary = |ms: &[&crate::kernels::TernaryMatrix], what: &str| -> Result<LinearKind> {
            let mults: Vec<f32> = ms.iter().flat_map(|t| t.multipliers()).copied().collect();
            let group = ms.first().map_or(0, |t| t.group());
            let group_scales = match group {
                0 => None,
                _ => Some(DevBuf::from_slice(
                    &gpu,
                    &weights::pack_group_scales(ms),
                    &format!("{what} group scales"),
                )?),
            };
            Ok(LinearKind::Ternary {
                words: DevBuf::from_slice(&gpu, &weights::pack_ternary(ms), what)?,
                multipliers: DevBuf::from_slice(&gpu, &mults, &format!("{what} multipliers"))?,
                group_steps: group / 64,
                group_scales,
            })
        };
        let linear = |l: &crate::model::Linear, what: &str| -> Result<LinearDev> {
            let input_norm = match &l.input_norm {
                Some(n) => Some(norm(n, &format!("{what} input norm"))?),
                None => None,
            };
            let (kind, padded_cols) = match &l.weights {
                LinearWeights::Ternary(t) => (ternary(&[t], what)?, t.padded_cols()),
                LinearWeights::Dense(d) => (LinearKind::Dense(dense(d, what)?), d.cols()),
            };
            Ok(LinearDev {
                kind,
                input_norm,
                rows: l.out_features(),
                padded_cols,
            })
        };
        let group = |ls: &[&crate::model::Linear], what: &str| -> Result<LinearGroup> {
            let mats: Option<Vec<&crate::kernels::TernaryMatrix>> = ls
                .iter()
                .map(|l| match (&l.weights, &l.input_norm) {
                    (LinearWeights::Ternary(t), None) => Some(t),
                    _ => None,
                })
                .collect();
            match mats {
                Some(ms)
                    if ms.iter().all(|t| {
                        t.cols() == ms[0].cols()
                            && t.padded_cols() == ms[0].padded_cols()
                            && t.group() == ms[0].group()
                    }) =>
                {
                    let segments: Vec<usize> = ms.iter().map(|t| t.rows()).collect();
                    Ok(LinearGroup::Fused {
                        linear: LinearDev {
                            kind: ternary(&ms, what)?,
                            input_norm: None,
                            rows: segments.iter().sum(),
                            padded_cols: ms[0].padded_cols(),
                        },
                        segments,
                    })
                }
                _ => Ok(LinearGroup::Separate(
                    ls.iter()
                        .map(|l| linear(l, what))
                        .collect::<Result<Vec<_>>>()?,
                )),
            }
        };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (i, l) in weights.layers.iter().enumerate() {
            let sub = |n: &Option<RmsNorm>, what: &str| -> Result<Option<NormDev>> {
                n.as_ref()
                    .map(|n| norm(n, &format!("layer {i} {what}")))
                    .transpose()
            };
            let grp =
                |ls: &[&crate::model::Linear], what: &str| group(ls, &format!("layer {i} {what}"));
            layers.push(LayerDev {
                attn_norm: norm(&l.attn_norm, &format!("layer {i} attn_norm"))?,
                qkv: grp(&[&l.q_proj, &l.k_proj, &l.v_proj], "q/k/v_proj")?,
                attn_sub_norm: sub(&l.attn_sub_norm, "attn_sub_norm")?,
                o: grp(&[&l.o_proj], "o_proj")?,
                ffn_norm: norm(&l.ffn_norm, &format!("layer {i} ffn_norm"))?,
                gate_up: grp(&[&l.gate_proj, &l.up_proj], "gate/up_proj")?,
                ffn_sub_norm: sub(&l.ffn_sub_norm, "ffn_sub_norm")?,
                down: grp(&[&l.down_proj], "down_proj")?,
                qk_norms: match (&l.q_norm, &l.k_norm) {
                    (Some(q), Some(k)) => Some((
                        norm(q, &format!("layer {i} q_norm"))?,
                        norm(k, &format!("layer {i} k_norm"))?,
                    )),
                    (None, None) => None,
                    _ => {
                        return Err(Error::Invalid(format!(
                            "layer {i}: a query head norm without a key head norm, or the \
                             reverse"
                        )))
                    }
                },
            });
        }
        let backend = CudaBackend {
            embedding: dense(&weights.token_embedding, "the token embedding")?,
            output_norm: norm(&weights.output_norm, "output_norm")?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|h| group(&[h], "lm_head"))
                .transpose()?,
            layers,
            weight_bytes: planned,
            kernel_name: format!("cuda ({})", gpu.name()),
            use_graphs: std::env::var("BITNET_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            attn_parts_budget: ATTN_PARTS_BYTES,
            kv_type: KvType::F32,
            quant_acts: crate::kernels::qblock::QuantActs::Exact,
            quant_head: None,
            use_mma: gpu.int8_mma() && std::env::var("BITNET_CUDA_MMA").map_or(true, |v| v != "0"),
            stream: std::sync::Mutex::new(()),
            gpu,
            config,
            weights,
        };
        Ok(backend)
    }

    /// Chooses how logits are computed, as the CPU backend's `set_lm_head_quant`: exactly
    /// from the float lm_head (or tied embedding), or against an int8, Q6_K or 4-bit copy
    /// made now (the CPU's quantization: the same integers and scales) with 12-bit
    /// activations, added in the CPU's order: the CPU's bits. A ternary lm_head is left as
    /// it is. Applies to states made from now on.
    pub fn set_lm_head_quant(&mut self, quant: crate::backend::LmHeadQuant) -> Result<()> {
        let float_head = match &self.weights.lm_head {
            None => Some(&self.weights.token_embedding),
            Some(crate::model::Linear {
                weights: LinearWeights::Dense(m),
                input_norm: None,
            }) => Some(m),
            Some(_) => None,
        };
        if let Some(old) = self.quant_head.take() {
            self.weight_bytes -= old.bytes();
        }
        if let Some(m) = float_head {
            self.quant_head = QuantHeadDev::new(&self.gpu, quant, m)?;
        }
        self.weight_bytes += self.quant_head.as_ref().map_or(0, QuantHeadDev::bytes);
        Ok(())
    }

    /// Chooses how Q4_0/Q4_1/Q8_0 linears (and such a tied embedding or lm_head, unless a
    /// quantized lm_head replaces it) are multiplied, as the CPU backend's `set_quant_acts`:
    /// exactly (f32 activations, the weights dequantized at load), or `Q8` as llama.cpp
    /// (activations quantized to Q8 blocks per token, integer block dots; the file's blocks
    /// uploaded now beside the f32 copy): the CPU's bits either way. Applies to states made
    /// from now on.
    pub fn set_quant_acts(&mut self, acts: crate::kernels::qblock::QuantActs) -> Result<()> {
        use crate::kernels::qblock::QuantActs;
        let q8 = acts == QuantActs::Q8;
        let gpu = self.gpu.clone();
        let (mut added, mut removed) = (0usize, 0usize);
        let mut attach = |dev: &mut DenseDev, m: &crate::kernels::DenseMatrix| -> Result<()> {
            if let Some((old, _)) = dev.q8.take() {
                removed += old.bytes();
            }
            if q8 {
                if let Some(blocks) = q8_blocks(&gpu, m)? {
                    added += blocks.0.bytes();
                    dev.q8 = Some(blocks);
                }
            }
            Ok(())
        };
        for (dev, host) in self.layers.iter_mut().zip(&self.weights.layers) {
            let groups: [(&mut LinearGroup, Vec<&crate::model::Linear>); 4] = [
                (&mut dev.qkv, vec![&host.q_proj, &host.k_proj, &host.v_proj]),
                (&mut dev.o, vec![&host.o_proj]),
                (&mut dev.gate_up, vec![&host.gate_proj, &host.up_proj]),
                (&mut dev.down, vec![&host.down_proj]),
            ];
            for (group, linears) in groups {
                if let LinearGroup::Separate(devs) = group {
                    for (d, l) in devs.iter_mut().zip(linears) {
                        if let (LinearKind::Dense(d), Some(m)) = (&mut d.kind, dense_of(l)) {
                            attach(d, m)?;
                        }
                    }
                }
            }
        }
        if let (Some(LinearGroup::Separate(devs)), Some(l)) =
            (&mut self.lm_head, &self.weights.lm_head)
        {
            if let (Some(d), Some(m)) = (devs.first_mut(), dense_of(l)) {
                if let LinearKind::Dense(d) = &mut d.kind {
                    attach(d, m)?;
                }
            }
        }
        if self.weights.lm_head.is_none() {
            attach(&mut self.embedding, &self.weights.token_embedding)?;
        }
        self.weight_bytes = self.weight_bytes + added - removed;
        self.quant_acts = acts;
        Ok(())
    }

    /// Chooses the element type of the KV caches of states made from now on: f32, or f16
    /// (half the memory; rounded to nearest even and widened exactly where read, as the
    /// CPU backend's f16 caches).
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        self.kv_type = kv_type;
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

    /// Applies the linears of `group` to `n` rows of `src` (after `norm`, where given) into
    /// `outs` (one per member; with `accumulate`, added to them: the residual stream).
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        s: &CudaState,
        src: Source,
        norm: Option<&NormDev>,
        n: usize,
        group: &LinearGroup,
        outs: &[&DevBuf],
        accumulate: bool,
    ) -> Result<()> {
        match group {
            LinearGroup::Fused { linear, segments } => {
                let outs: Vec<(&DevBuf, usize)> =
                    outs.iter().copied().zip(segments.iter().copied()).collect();
                norm_quant(
                    &self.gpu,
                    Some(&s.quant()),
                    None,
                    src,
                    norm,
                    n,
                    linear.padded_cols,
                )?;
                self.ternary(s, linear, n, &outs, accumulate)
            }
            LinearGroup::Separate(linears) => {
                // The normed (or gated) input as floats, where a member needs them.
                let needs_floats = linears
                    .iter()
                    .any(|l| l.input_norm.is_some() || matches!(l.kind, LinearKind::Dense(_)));
                let floats = if needs_floats && (norm.is_some() || src.gated.is_some()) {
                    norm_quant(&self.gpu, None, Some(&s.normed), src, norm, n, 0)?;
                    Source {
                        x: &s.normed,
                        gated: None,
                        cols: src.cols,
                    }
                } else {
                    src
                };
                // Whether the state's int8 activations hold `src` after `norm`.
                let mut quantized = false;
                for (l, &out) in linears.iter().zip(outs) {
                    match (&l.kind, &l.input_norm) {
                        (LinearKind::Ternary { .. }, None) => {
                            if !quantized {
                                let (x, own) = if needs_floats {
                                    (floats, None)
                                } else {
                                    (src, norm)
                                };
                                norm_quant(
                                    &self.gpu,
                                    Some(&s.quant()),
                                    None,
                                    x,
                                    own,
                                    n,
                                    l.padded_cols,
                                )?;
                                quantized = true;
                            }
                            self.ternary(s, l, n, &[(out, l.rows)], accumulate)?;
                        }
                        (LinearKind::Ternary { .. }, Some(own)) => {
                            norm_quant(
                                &self.gpu,
                                Some(&s.quant()),
                                None,
                                floats,
                                Some(own),
                                n,
                                l.padded_cols,
                            )?;
                            quantized = false;
                            self.ternary(s, l, n, &[(out, l.rows)], accumulate)?;
                        }
                        (LinearKind::Dense(d), None) => {
                            self.dense(s, out, d, floats.x, n, accumulate)?;
                        }
                        (LinearKind::Dense(d), Some(own)) => {
                            norm_quant(
                                &self.gpu,
                                None,
                                Some(&s.linear_in),
                                floats,
                                Some(own),
                                n,
                                0,
                            )?;
                            self.dense(s, out, d, &s.linear_in, n, accumulate)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// `outs` (segments of the rows of `l`) (+)= the ternary product of `l` with the state's
    /// quantized activations of `n` rows.
    fn ternary(
        &self,
        s: &CudaState,
        l: &LinearDev,
        n: usize,
        outs: &[(&DevBuf, usize)],
        accumulate: bool,
    ) -> Result<()> {
        let LinearKind::Ternary {
            words,
            multipliers,
            group_steps,
            group_scales,
        } = &l.kind
        else {
            return Err(Error::Invalid(
                "CUDA: internal error: not a ternary linear".into(),
            ));
        };
        if let Some(scales) = group_scales {
            return ternary_grouped(
                &self.gpu,
                outs,
                accumulate,
                (words, scales, *group_steps),
                &s.quant(),
                n,
                l.rows,
                l.padded_cols,
            );
        }
        ternary_product(
            &self.gpu,
            ternary_kernel(n, self.use_mma),
            outs,
            accumulate,
            (words, multipliers),
            &s.quant(),
            n,
            l.rows,
            l.padded_cols,
        )
    }

    /// `out[n, rows] (+)= x[n, cols] · Wᵀ` for a dense `W: [rows, cols]`.
    fn dense(
        &self,
        s: &CudaState,
        out: &DevBuf,
        w: &DenseDev,
        x: &DevBuf,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (rows, cols) = (w.rows, w.cols);
        if let Some((blocks, ty)) = &w.q8 {
            let Some((qs, d, c)) = &s.q8_acts else {
                return Err(Error::Invalid(
                    "CUDA: this state was made before --quant-acts q8 was chosen".into(),
                ));
            };
            let shape = (rows, cols);
            return q8_linear(
                &self.gpu,
                out,
                (blocks, *ty),
                (qs, d, c),
                x,
                shape,
                n,
                accumulate,
            );
        }
        check_fits(&[
            (out, n * rows * 4),
            (x, n * cols * 4),
            (&w.values, rows * cols * w.elem_bytes()),
        ])?;
        let args = [
            out.arg(),
            w.values.arg(),
            Arg::I32(w.ty),
            x.arg(),
            Arg::I32(rows as i32),
            Arg::I32(cols as i32),
            Arg::I32(n as i32),
            Arg::I32(accumulate as i32),
        ];
        if n >= DM_MIN_TOKENS {
            // SAFETY: dense_gemm reads the rows·cols weights of the declared type
            // (chunk-major) and n rows of x, and writes (or adds to) n·rows floats of out;
            // sizes checked above.
            return unsafe {
                launch_blocks(
                    &self.gpu,
                    Kernel::DenseGemm,
                    [
                        rows.div_ceil(DM_ROWS) as u32,
                        n.div_ceil(DM_TOKENS) as u32,
                        1,
                    ],
                    256,
                    &args,
                )
            };
        }
        // SAFETY: dense_gemv reads the rows·cols weights of the declared type (chunk-major)
        // and n rows of x, and writes (or adds to) n·rows floats of out; sizes checked above.
        unsafe { self.launch(Kernel::DenseGemv, (rows, n.div_ceil(DG_TOKENS)), &args) }
    }

    /// Qwen3's per-head RMSNorm of the `n` rows of queries and keys, in place.
    fn head_norms(
        &self,
        s: &CudaState,
        n: usize,
        q_norm: &NormDev,
        k_norm: &NormDev,
    ) -> Result<()> {
        let c = &self.config;
        let d = c.head_dim;
        if q_norm.eps != k_norm.eps {
            return Err(Error::Invalid(
                "CUDA: query and key head norms with different epsilons".into(),
            ));
        }
        check_fits(&[
            (&s.q, n * c.q_dim() * 4),
            (&s.k, n * c.kv_dim() * 4),
            (&q_norm.weight, d * 4),
            (&k_norm.weight, d * 4),
        ])?;
        // SAFETY: head_norms reads and writes n rows of n_heads (q) and n_kv_heads (k) heads
        // of d floats, and d weights of each norm; sizes checked above.
        unsafe {
            launch_blocks(
                &self.gpu,
                Kernel::HeadNorms,
                [(c.n_heads + c.n_kv_heads) as u32, n as u32, 1],
                32,
                &[
                    s.q.arg(),
                    s.k.arg(),
                    q_norm.weight.arg(),
                    k_norm.weight.arg(),
                    Arg::F32(q_norm.eps),
                    Arg::I32(c.n_heads as i32),
                    Arg::I32(c.n_kv_heads as i32),
                    Arg::I32(d as i32),
                ],
            )
        }
    }

    /// RoPE of the `n` rows of queries (in place) and keys, and the rotated keys and the
    /// values stored into the layer's caches at the rows' slots and positions.
    fn rope_store(&self, s: &CudaState, n: usize, keys: &DevBuf, values: &DevBuf) -> Result<()> {
        let c = &self.config;
        let (d, kvd) = (c.head_dim, c.kv_dim());
        let cache = s.n_slots * s.context * kvd * s.kv_elem;
        check_fits(&[
            (&s.q, n * c.q_dim() * 4),
            (&s.k, n * kvd * 4),
            (&s.v, n * kvd * 4),
            (keys, cache),
            (values, cache),
        ])?;
        // SAFETY: rope_store reads n positions and slots (pos < context and slot < n_slots,
        // checked in `run`: inside the caches of n_slots·context rows) and n rows of d
        // angles from the metadata, rotates n rows of q in place, reads n rows of k and v,
        // and writes one cache row of each per token; sizes checked above.
        unsafe {
            self.launch(
                Kernel::RopeStore,
                ((c.n_heads + c.n_kv_heads) * d / 2 + kvd, n),
                &[
                    s.q.arg(),
                    s.k.arg(),
                    s.v.arg(),
                    keys.arg(),
                    values.arg(),
                    s.meta_arg(Meta::Cos),
                    s.meta_arg(Meta::Sin),
                    s.meta_arg(Meta::Slot),
                    s.meta_arg(Meta::Pos),
                    Arg::I32(c.n_heads as i32),
                    Arg::I32(c.n_kv_heads as i32),
                    Arg::I32(d as i32),
                    Arg::I32(s.context as i32),
                    Arg::I32((s.kv_elem == 2) as i32),
                ],
            )
        }
    }

    /// Causal GQA attention of the batch's rows over their slots' caches of one layer into
    /// `s.attn`, `s.attn_rows` rows at a time: every 256-position chunk on its own block
    /// (`attention_chunks`), then each row's chunks folded in order (`attention_merge`).
    fn attention(&self, s: &CudaState, n: usize, keys: &DevBuf, values: &DevBuf) -> Result<()> {
        let c = &self.config;
        let (qd, heads, d) = (c.q_dim(), c.n_heads, c.head_dim);
        let group = c.gqa_group();
        let chunks = s.context.div_ceil(ATTN_CHUNK);
        let cache = s.n_slots * s.context * c.kv_dim() * s.kv_elem;
        let rows = s.attn_rows.min(n);
        check_fits(&[
            (&s.attn, n * qd * 4),
            (&s.q, n * qd * 4),
            (keys, cache),
            (values, cache),
            (&s.att_parts, attn_part_bytes(c, s.context) * rows),
        ])?;
        let scale = 1.0 / (d as f32).sqrt();
        let blocks_x = c.n_kv_heads * group.div_ceil(ATTN_HEADS);
        for first in (0..n).step_by(rows) {
            let g = rows.min(n - first);
            let at = |buf: &DevBuf, elems: usize| Arg::Ptr(buf.ptr() + (first * elems * 4) as u64);
            let meta = |section: Meta| match s.meta_arg(section) {
                Arg::Ptr(p) => Arg::Ptr(p + (first * 4) as u64),
                other => other,
            };
            // SAFETY: rows first..first+g of the batch (≤ n): the chunk kernel reads their q
            // rows, positions and slots, and the cache rows 0..=pos of their slots (pos <
            // context, slot < n_slots, checked in `run`), and writes the parts of chunks
            // ≤ pos/256 of g·heads (row, head) pairs; the merge reads those parts and writes
            // g·q_dim floats of attn; sizes checked above.
            unsafe {
                launch_blocks(
                    &self.gpu,
                    Kernel::AttentionChunks,
                    [blocks_x as u32, g as u32, chunks as u32],
                    ATT_THREADS,
                    &[
                        s.att_parts.arg(),
                        at(&s.q, qd),
                        keys.arg(),
                        values.arg(),
                        meta(Meta::Slot),
                        meta(Meta::Pos),
                        Arg::I32(heads as i32),
                        Arg::I32(group as i32),
                        Arg::I32(d as i32),
                        Arg::I32(c.kv_dim() as i32),
                        Arg::I32(s.context as i32),
                        Arg::F32(scale),
                        Arg::I32((s.kv_elem == 2) as i32),
                    ],
                )?;
                launch_blocks(
                    &self.gpu,
                    Kernel::AttentionMerge,
                    [heads as u32, g as u32, 1],
                    ATT_THREADS,
                    &[
                        at(&s.attn, qd),
                        s.att_parts.arg(),
                        meta(Meta::Pos),
                        Arg::I32(heads as i32),
                        Arg::I32(d as i32),
                        Arg::I32(s.context as i32),
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
        // The batch's metadata: tokens, positions, slots, then the rows that want logits.
        let mb = s.max_batch;
        s.meta_host.fill(0);
        let mut m = 0;
        for (i, e) in batch.iter().enumerate() {
            s.meta_host[i] = e.token as i32;
            s.meta_host[mb + i] = e.pos as i32;
            s.meta_host[2 * mb + i] = e.slot as i32;
            if e.logits {
                s.meta_host[3 * mb + m] = i as i32;
                m += 1;
            }
        }
        let _stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        // Then each row's RoPE angles: d/2 cosines and d/2 sines.
        let (half, angles) = (c.head_dim / 2, 4 * mb);
        s.rope.rows(
            c,
            batch,
            &mut s.rope_cos[..n * half],
            &mut s.rope_sin[..n * half],
        );
        for (i, (cos, sin)) in s
            .rope_cos
            .chunks_exact(half)
            .zip(s.rope_sin.chunks_exact(half))
            .take(n)
            .enumerate()
        {
            let row = &mut s.meta_host[angles + 2 * i * half..][..2 * half];
            for (m, &v) in row.iter_mut().zip(cos.iter().chain(sin)) {
                *m = v.to_bits() as i32;
            }
        }
        s.meta.upload(0, &s.meta_host[..angles + 2 * n * half])?;
        let key = (n, m);
        match s.graphs.get(key) {
            // SAFETY: the graph was recorded from this state's buffers, which live as long as
            // the state; the metadata it reads was just uploaded.
            Some(graph) => unsafe { self.gpu.launch_graph(graph)? },
            None if self.use_graphs && n <= GRAPH_MAX_TOKENS && self.gpu.begin_capture()? => {
                let recorded = self.record(s, n, m);
                let graph = self.gpu.end_capture();
                let graph = match (recorded, graph) {
                    (Ok(()), Ok(graph)) => graph,
                    (recorded, Ok(graph)) => {
                        // SAFETY: just recorded, never launched.
                        unsafe { self.gpu.destroy_graph(graph) };
                        return recorded;
                    }
                    (recorded, Err(e)) => return recorded.and(Err(e)),
                };
                s.graphs.insert(key, graph);
                // SAFETY: as above.
                unsafe { self.gpu.launch_graph(graph)? };
            }
            None => self.record(s, n, m)?,
        }
        s.n_logits = m;
        if m > 0 {
            s.logits_dev
                .download(0, &mut s.logits[..m * c.vocab_size])?;
        }
        Ok(())
    }

    /// Queues the forward pass of `n` tokens (their metadata uploaded) with logits for `m`
    /// of them. What it queues depends on `n` and `m` alone (positions and slots are read
    /// from the metadata), so a recorded graph serves every call of that size.
    fn record(&self, s: &CudaState, n: usize, m: usize) -> Result<()> {
        let c = &self.config;
        let (hd, qd, ffn) = (c.hidden_size, c.q_dim(), c.ffn_size);
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
                    Arg::I32(c.vocab_size as i32),
                    Arg::I32(hd as i32),
                ],
            )?;
        }

        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let hidden = Source {
                x: &s.hidden,
                gated: None,
                cols: hd,
            };
            self.project(
                s,
                hidden,
                Some(&layer.attn_norm),
                n,
                &layer.qkv,
                &[&s.q, &s.k, &s.v],
                false,
            )?;
            if let Some((q_norm, k_norm)) = &layer.qk_norms {
                self.head_norms(s, n, q_norm, k_norm)?;
            }
            let (keys, values) = (&s.keys[l], &s.values[l]);
            self.rope_store(s, n, keys, values)?;
            self.attention(s, n, keys, values)?;
            let attn = Source {
                x: &s.attn,
                gated: None,
                cols: qd,
            };
            let sub = layer.attn_sub_norm.as_ref();
            self.project(s, attn, sub, n, &layer.o, &[&s.hidden], true)?;

            // Feed-forward block.
            self.project(
                s,
                hidden,
                Some(&layer.ffn_norm),
                n,
                &layer.gate_up,
                &[&s.gate, &s.up],
                false,
            )?;
            check_fits(&[(&s.gate, n * ffn * 4), (&s.up, n * ffn * 4)])?;
            let act = match c.activation {
                Activation::Relu2 => 0,
                Activation::Silu => 1,
            };
            let gated = Source {
                x: &s.gate,
                gated: Some((&s.up, act)),
                cols: ffn,
            };
            let sub = layer.ffn_sub_norm.as_ref();
            self.project(s, gated, sub, n, &layer.down, &[&s.hidden], true)?;
        }

        // Final norm and lm_head, only for the rows that want logits.
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
        let rows = Source {
            x: &s.logit_rows,
            gated: None,
            cols: hd,
        };
        if let Some(head) = &self.quant_head {
            let Some((values, scales)) = &s.head_acts else {
                return Err(Error::Invalid(
                    "CUDA: this state was made before a quantized lm_head was chosen".into(),
                ));
            };
            let acts = CudaActs {
                q: values,
                scales,
                sums: &s.act_sums,
                bits: 12,
            };
            norm_quant(
                &self.gpu,
                Some(&acts),
                None,
                rows,
                Some(&self.output_norm),
                m,
                head.padded,
            )?;
            return quant_logits(&self.gpu, &s.logits_dev, head, &acts, m, c.vocab_size);
        }
        match &self.lm_head {
            None => {
                norm_quant(
                    &self.gpu,
                    None,
                    Some(&s.normed),
                    rows,
                    Some(&self.output_norm),
                    m,
                    0,
                )?;
                self.dense(s, &s.logits_dev, &self.embedding, &s.normed, m, false)?;
            }
            Some(head) => {
                let norm = Some(&self.output_norm);
                self.project(s, rows, norm, m, head, &[&s.logits_dev], false)?;
            }
        }
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

/// Threads of a `norm_quant` block (`NQ_THREADS` in kernels.cu).
const NQ_THREADS: u32 = 256;

/// One row per block of `norm_quant`: `n` rows of `src` (or act(x)·up), RMSNormed with
/// `norm` where given, written as floats to `floats` where given, and quantized into `acts`
/// (rows of `padded` bytes) where given.
fn norm_quant(
    gpu: &Arc<dyn Gpu>,
    acts: Option<&CudaActs>,
    floats: Option<&DevBuf>,
    src: Source,
    norm: Option<&NormDev>,
    n: usize,
    padded: usize,
) -> Result<()> {
    let cols = src.cols;
    let mut fits = vec![(src.x, n * cols * 4)];
    if let Some((up, _)) = src.gated {
        fits.push((up, n * cols * 4));
    }
    if let Some(norm) = norm {
        fits.push((&norm.weight, cols * 4));
    }
    if let Some(out) = floats {
        fits.push((out, n * cols * 4));
    }
    if let Some(a) = acts {
        if padded < cols {
            return Err(Error::Invalid(format!(
                "CUDA: internal error: {cols} columns quantized into rows of {padded}"
            )));
        }
        let elem = if a.bits == 12 { 2 } else { 1 };
        fits.extend([(a.q, n * padded * elem), (a.scales, n * 4), (a.sums, n * 4)]);
    }
    check_fits(&fits)?;
    let null = Arg::Ptr(0);
    let (up, act) = src.gated.map_or((null, 0), |(up, act)| (up.arg(), act));
    // SAFETY: norm_quant reads n rows of cols floats of x (and of up), cols norm weights,
    // and writes n rows of cols floats (floats), of padded int8 values (q), n scales and
    // n sums; every buffer it is given was checked above, and the absent ones are null,
    // which the kernel does not touch.
    unsafe {
        launch_blocks(
            gpu,
            Kernel::NormQuant,
            [n as u32, 1, 1],
            NQ_THREADS,
            &[
                acts.map_or(null, |a| a.q.arg()),
                acts.map_or(null, |a| a.scales.arg()),
                acts.map_or(null, |a| a.sums.arg()),
                floats.map_or(null, |f| f.arg()),
                src.x.arg(),
                up,
                Arg::I32(act),
                norm.map_or(null, |w| w.weight.arg()),
                Arg::F32(norm.map_or(0.0, |w| w.eps)),
                Arg::I32(cols as i32),
                Arg::I32(padded as i32),
                Arg::I32(acts.map_or(8, |a| a.bits)),
            ],
        )
    }
}

/// Tokens an `int8_logits` thread takes (`LG_TOKENS` in kernels.cu).
const LG_TOKENS: usize = 4;

/// `out[n, rows]`: the logits of a quantized lm_head against 12-bit activations
/// (`int8_logits`, `q4_logits`, `q6k_logits` in kernels.cu).
fn quant_logits(
    gpu: &Arc<dyn Gpu>,
    out: &DevBuf,
    head: &QuantHeadDev,
    acts: &CudaActs,
    n: usize,
    rows: usize,
) -> Result<()> {
    let p = head.padded;
    let mut fits = vec![
        (out, n * rows * 4),
        (acts.q, n * p * 2),
        (acts.scales, n * 4),
    ];
    let (kernel, weights): (Kernel, Vec<Arg>) = match &head.kind {
        QuantHeadKind::Int8 { values, scales } => {
            fits.extend([(values, rows * p), (scales, rows * 4)]);
            (Kernel::Int8Logits, vec![values.arg(), scales.arg()])
        }
        QuantHeadKind::Q4 { codes, scales } => {
            fits.extend([(codes, rows * p / 2), (scales, rows * p / 32 * 2)]);
            (Kernel::Q4Logits, vec![codes.arg(), scales.arg()])
        }
        QuantHeadKind::Q6k { blocks } => {
            let block_bytes = crate::kernels::q6k::Q6K_BLOCK_BYTES;
            fits.push((blocks, rows * p / 256 * block_bytes));
            (Kernel::Q6kLogits, vec![blocks.arg()])
        }
    };
    check_fits(&fits)?;
    let mut args = vec![out.arg()];
    args.extend(weights);
    args.extend([
        acts.q.arg(),
        acts.scales.arg(),
        Arg::I32(rows as i32),
        Arg::I32(p as i32),
        Arg::I32(n as i32),
    ]);
    // SAFETY: the kernel reads rows·padded weights of its kind (with their scales), n rows
    // of padded i16 activations and n scales, and writes n·rows floats; sizes checked above.
    unsafe { launch(gpu, kernel, (rows, n.div_ceil(LG_TOKENS), 1), &args) }
}

/// Positions a softmax chunk takes (`ATTN_CHUNK` in kernels.cu, the CPU's `CHUNK`).
const ATTN_CHUNK: usize = 256;

/// The largest forward call recorded into a graph (larger ones are launched as they come:
/// their launches are few for their work).
const GRAPH_MAX_TOKENS: usize = 64;

/// Recorded forward passes of a state, by (tokens, logits rows); at most
/// [`GraphCache::CAPACITY`], dropped all at once when full.
struct GraphCache {
    gpu: Arc<dyn Gpu>,
    graphs: std::collections::HashMap<(usize, usize), device::Graph>,
}

impl GraphCache {
    const CAPACITY: usize = 64;

    fn get(&self, key: (usize, usize)) -> Option<device::Graph> {
        self.graphs.get(&key).copied()
    }

    fn insert(&mut self, key: (usize, usize), graph: device::Graph) {
        if self.graphs.len() >= Self::CAPACITY {
            self.clear();
        }
        self.graphs.insert(key, graph);
    }

    fn clear(&mut self) {
        for (_, g) in self.graphs.drain() {
            // SAFETY: recorded by this device; the driver frees a graph still running when
            // it completes.
            unsafe { self.gpu.destroy_graph(g) };
        }
    }
}

impl Drop for GraphCache {
    fn drop(&mut self) {
        self.clear();
    }
}

fn kv_elem_bytes(t: KvType) -> usize {
    match t {
        KvType::F32 => 4,
        KvType::F16 => 2,
    }
}

/// Bytes of attention's per-chunk parts that bound how many rows one launch takes.
const ATTN_PARTS_BYTES: usize = 32 << 20;

/// Threads of an attention block (`ATT_THREADS` in kernels.cu).
const ATT_THREADS: u32 = 128;

/// Query heads of one GQA group an `attention_chunks` block takes (`ATTN_HEADS`).
const ATTN_HEADS: usize = 8;

/// Bytes of `attention_chunks`' parts for one row: per head and chunk, max, sum and a
/// head_dim vector.
fn attn_part_bytes(c: &ModelConfig, context: usize) -> usize {
    c.n_heads * context.div_ceil(ATTN_CHUNK) * (2 + c.head_dim) * 4
}

/// `dense_gemm`'s tile (`DM_*` in kernels.cu), and the tokens from which it replaces
/// `dense_gemv` (which reads the weights once per DG_TOKENS tokens).
const DM_ROWS: usize = 64;
const DM_TOKENS: usize = 32;
const DM_MIN_TOKENS: usize = 16;

/// Tokens a `dense_gemv` thread takes (`DG_TOKENS` in kernels.cu).
const DG_TOKENS: usize = 4;

/// Rows, warps and tokens of a `ternary_gemv` block (`TG_*` in kernels.cu).
const TG_ROWS: usize = 32;
const TG_WARPS: u32 = 8;
const TG_TOKENS: usize = 8;
/// `ternary_gemm`'s tile (TM_* in kernels.cu): rows and tokens a block takes, its warps.
const TM_ROWS: usize = 64;
const TM_TOKENS: usize = 64;
const TM_WARPS: u32 = 4;

/// `outs` (consecutive segments of the `rows` rows, at most 3, each `[n, its rows]`) (+)=
/// the ternary product of `weights` (`pack_ternary`'s words, the per-row multipliers;
/// rows × padded_cols) with the quantized activations of `n` rows in `acts`.
#[allow(clippy::too_many_arguments)]
/// Tokens from which a ternary product goes to the tensor cores (`ternary_gemm`) where the
/// device has them: below, the dp4a GEMV, which reads the weights once per TG_TOKENS tokens
/// and needs no padding to 64 tokens.
const MMA_MIN_TOKENS: usize = 16;

/// The kernel for a ternary product of `n` tokens (see [`MMA_MIN_TOKENS`]).
fn ternary_kernel(n: usize, mma: bool) -> Kernel {
    if mma && n >= MMA_MIN_TOKENS {
        Kernel::TernaryGemm
    } else {
        Kernel::TernaryGemv
    }
}

/// `outs` (+)= the ternary product by `kernel` ([`Kernel::TernaryGemv`] or
/// [`Kernel::TernaryGemm`]: the same bits).
#[allow(clippy::too_many_arguments)]
fn ternary_product(
    gpu: &Arc<dyn Gpu>,
    kernel: Kernel,
    outs: &[(&DevBuf, usize)],
    accumulate: bool,
    weights: (&DevBuf, &DevBuf),
    acts: &CudaActs,
    n: usize,
    rows: usize,
    padded_cols: usize,
) -> Result<()> {
    let (words, multipliers) = weights;
    let segments = segment_args(outs, rows, padded_cols, accumulate)?;
    let mut fits: Vec<(&DevBuf, usize)> = outs.iter().map(|&(o, r)| (o, n * r * 4)).collect();
    fits.extend([
        (words, padded_cols / 4 * rows),
        (multipliers, rows * 4),
        (acts.q, n * padded_cols),
        (acts.scales, n * 4),
        (acts.sums, n * 4),
    ]);
    check_fits(&fits)?;
    let (grid, threads) = match kernel {
        Kernel::TernaryGemv => (
            [
                rows.div_ceil(TG_ROWS) as u32,
                n.div_ceil(TG_TOKENS) as u32,
                1,
            ],
            32 * TG_WARPS,
        ),
        Kernel::TernaryGemm => (
            [
                rows.div_ceil(TM_ROWS) as u32,
                n.div_ceil(TM_TOKENS) as u32,
                1,
            ],
            32 * TM_WARPS,
        ),
        _ => {
            return Err(Error::Invalid(format!(
                "CUDA: internal error: {} is not a ternary product",
                kernel.name()
            )))
        }
    };
    // SAFETY: both kernels read rows·padded_cols/4 bytes of words, rows multipliers, n rows
    // of padded int8 activations with their scales and sums, and write (or add to) n rows
    // of each segment's outputs; sizes checked above, segments add up to `rows`.
    unsafe {
        launch_blocks(
            gpu,
            kernel,
            grid,
            threads,
            &[
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                segments[4],
                segments[5],
                words.arg(),
                multipliers.arg(),
                acts.q.arg(),
                acts.scales.arg(),
                acts.sums.arg(),
                Arg::I32(rows as i32),
                Arg::I32((padded_cols / 64) as i32),
                Arg::I32(padded_cols as i32),
                Arg::I32(n as i32),
            ],
        )
    }
}

/// The first six arguments of the ternary product kernels: up to three output segments
/// (`out0..out2`, `rows0`, `rows1`) whose rows add up to `rows`, and `accumulate`.
fn segment_args(
    outs: &[(&DevBuf, usize)],
    rows: usize,
    padded_cols: usize,
    accumulate: bool,
) -> Result<[Arg; 6]> {
    if outs.is_empty()
        || outs.len() > 3
        || outs.iter().map(|o| o.1).sum::<usize>() != rows
        || !padded_cols.is_multiple_of(64)
    {
        return Err(Error::Invalid(format!(
            "CUDA: internal error: {} output segments for {rows} rows of {padded_cols} columns",
            outs.len()
        )));
    }
    let seg = |i: usize| outs.get(i).copied().unwrap_or(outs[0]);
    Ok([
        seg(0).0.arg(),
        seg(1).0.arg(),
        seg(2).0.arg(),
        Arg::I32(seg(0).1 as i32),
        Arg::I32(if outs.len() > 1 { seg(1).1 as i32 } else { 0 }),
        Arg::I32(accumulate as i32),
    ])
}

/// `outs` (+)= the product of group-scaled ternary weights (`ternary_gemv_grouped`; the
/// tensor-core GEMM does not take group scales).
#[allow(clippy::too_many_arguments)]
fn ternary_grouped(
    gpu: &Arc<dyn Gpu>,
    outs: &[(&DevBuf, usize)],
    accumulate: bool,
    weights: (&DevBuf, &DevBuf, usize),
    acts: &CudaActs,
    n: usize,
    rows: usize,
    padded_cols: usize,
) -> Result<()> {
    let (words, scales, steps) = weights;
    let k4s = padded_cols / 64;
    let segments = segment_args(outs, rows, padded_cols, accumulate)?;
    if !(steps == 1 || steps == 2) || !k4s.is_multiple_of(steps) {
        return Err(Error::Invalid(format!(
            "CUDA: internal error: groups of {steps} steps in rows of {padded_cols} columns"
        )));
    }
    let mut fits: Vec<(&DevBuf, usize)> = outs.iter().map(|&(o, r)| (o, n * r * 4)).collect();
    fits.extend([
        (words, padded_cols / 4 * rows),
        (scales, k4s / steps * rows * 4),
        (acts.q, n * padded_cols),
        (acts.scales, n * 4),
    ]);
    check_fits(&fits)?;
    // SAFETY: the kernel reads rows·padded_cols/4 bytes of words, a scale per (group, row),
    // n rows of padded int8 activations and their scales, and writes (or adds to) n rows of
    // each segment's outputs; sizes checked above, segments add up to `rows`.
    unsafe {
        launch_blocks(
            gpu,
            Kernel::TernaryGemvGrouped,
            [
                rows.div_ceil(TG_ROWS) as u32,
                n.div_ceil(TG_TOKENS) as u32,
                1,
            ],
            32 * TG_WARPS,
            &[
                segments[0],
                segments[1],
                segments[2],
                segments[3],
                segments[4],
                segments[5],
                words.arg(),
                scales.arg(),
                acts.q.arg(),
                acts.scales.arg(),
                Arg::I32(rows as i32),
                Arg::I32(k4s as i32),
                Arg::I32(padded_cols as i32),
                Arg::I32(n as i32),
                Arg::I32(steps as i32),
            ],
        )
    }
}

/// `out[n, rows] (+)=` llama.cpp's q8 product of Q4_0/Q4_1/Q8_0 blocks with `x`: the rows
/// of `x` quantized to Q8 blocks (`q8_quant`), then `q8_linear`.
#[allow(clippy::too_many_arguments)]
fn q8_linear(
    gpu: &Arc<dyn Gpu>,
    out: &DevBuf,
    weights: (&DevBuf, i32),
    acts: (&DevBuf, &DevBuf, &DevBuf),
    x: &DevBuf,
    shape: (usize, usize),
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let ((blocks, ty), (qs, d, c), (rows, cols)) = (weights, acts, shape);
    let bb = [18, 20, 34][ty as usize];
    let nb = cols / 32;
    check_fits(&[
        (out, n * rows * 4),
        (x, n * cols * 4),
        (blocks, rows * nb * bb),
        (qs, n * cols),
        (d, n * nb * 4),
        (c, n * nb * 4),
    ])?;
    if !cols.is_multiple_of(32) {
        return Err(Error::Invalid(format!(
            "CUDA: internal error: Q8 blocks of a {cols}-column matrix"
        )));
    }
    // SAFETY: q8_quant reads n rows of cols floats and writes n·cols int8 values and n·nb
    // scales and terms; q8_linear reads rows·nb blocks, those activations, and writes (or
    // adds to) n·rows floats; sizes checked above.
    unsafe {
        launch(
            gpu,
            Kernel::Q8Quant,
            (n * nb, 1, 1),
            &[
                qs.arg(),
                d.arg(),
                c.arg(),
                x.arg(),
                Arg::I32(n as i32),
                Arg::I32(cols as i32),
                Arg::I32(ty),
            ],
        )?;
        launch(
            gpu,
            Kernel::Q8Linear,
            (rows, n.div_ceil(LG_TOKENS), 1),
            &[
                out.arg(),
                blocks.arg(),
                Arg::I32(ty),
                qs.arg(),
                d.arg(),
                c.arg(),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::I32(n as i32),
                Arg::I32(accumulate as i32),
            ],
        )
    }
}

/// The dense matrix of a linear (`None` for a ternary one).
fn dense_of(l: &crate::model::Linear) -> Option<&crate::kernels::DenseMatrix> {
    match &l.weights {
        LinearWeights::Dense(m) => Some(m),
        LinearWeights::Ternary(_) => None,
    }
}

/// A Q4_0/Q4_1/Q8_0 matrix's blocks block-major on the device, with their type code
/// (`Q8_*` in kernels.cu); `None` for other matrices.
fn q8_blocks(gpu: &Arc<dyn Gpu>, m: &crate::kernels::DenseMatrix) -> Result<Option<(DevBuf, i32)>> {
    use crate::kernels::qblock::BlockType;
    let crate::kernels::DenseData::Q32(ty, data) = m.data() else {
        return Ok(None);
    };
    let code = match ty {
        BlockType::Q4_0 => 0,
        BlockType::Q4_1 => 1,
        BlockType::Q8_0 => 2,
    };
    let (rows, bb) = (m.rows(), ty.block_bytes());
    let nb = m.cols() / crate::kernels::qblock::QK;
    let mut blocks = vec![0u8; rows * nb * bb];
    for r in 0..rows {
        for b in 0..nb {
            blocks[(b * rows + r) * bb..][..bb].copy_from_slice(&data[(r * nb + b) * bb..][..bb]);
        }
    }
    let buf = DevBuf::from_slice(gpu, &blocks, "Q4/Q8 blocks for --quant-acts q8")?;
    Ok(Some((buf, code)))
}

/// Quantized activation rows: int8 values, scales, sums.
struct CudaActs<'a> {
    q: &'a DevBuf,
    scales: &'a DevBuf,
    sums: &'a DevBuf,
    /// 8 (int8, the ternary linears') or 12 (i16, the quantized lm_head's).
    bits: i32,
}

/// Queues `kernel` on `grid` blocks of `block` threads.
///
/// # Safety
/// As [`Gpu::launch`]: the arguments match the kernel's parameters and the grid touches
/// only memory inside the buffers passed.
unsafe fn launch_blocks(
    gpu: &Arc<dyn Gpu>,
    kernel: Kernel,
    grid: [u32; 3],
    block: u32,
    args: &[Arg],
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { gpu.launch(kernel, grid, [block, 1, 1], args) }
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
    /// Row t's RoPE cosines at `t·head_dim` floats from here, its sines half a row later.
    Cos,
    Sin,
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
    /// int8 activations `[max_batch, padded width]`, their scales and sums.
    acts: DevBuf,
    act_scales: DevBuf,
    act_sums: DevBuf,
    /// Attention's per-chunk parts (see `attn_part` in kernels.cu) for `attn_rows` rows.
    att_parts: DevBuf,
    /// Rows one attention launch takes (as many as [`ATTN_PARTS_BYTES`] of parts hold).
    attn_rows: usize,
    /// Bytes of a KV cache element: 4 (f32) or 2 (f16).
    kv_elem: usize,
    /// With an int8 lm_head: its 12-bit activations `[max_batch, padded]` and their scales.
    head_acts: Option<(DevBuf, DevBuf)>,
    /// With `--quant-acts q8`: Q8 activations `[max_batch, width]` and their per-block `d`
    /// and constant terms.
    q8_acts: Option<(DevBuf, DevBuf, DevBuf)>,
    /// i32 `[4][max_batch]`: tokens, positions, slots, rows that want logits.
    meta: DevBuf,
    logit_rows: DevBuf,
    logits_dev: DevBuf,
    /// The metadata as uploaded (planned at `new_state`: nothing allocated per call).
    meta_host: Vec<i32>,
    /// The RoPE tables of the positions this state holds, and this call's rows of angles.
    rope: crate::backend::rope::RopeAngles,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    graphs: GraphCache,
    /// Host copy of the last call's logits, `[n_logits, vocab]` (page-locked: a batch's
    /// logits come back at the bus's speed).
    logits: device::HostFloats,
    vocab: usize,
    n_logits: usize,
    kv_bytes: usize,
    scratch_bytes: usize,
}

impl CudaState {
    /// The int8 activations, their scales and sums.
    fn quant(&self) -> CudaActs<'_> {
        CudaActs {
            q: &self.acts,
            scales: &self.act_scales,
            sums: &self.act_sums,
            bits: 8,
        }
    }

    fn meta_arg(&self, section: Meta) -> Arg {
        let at = match section {
            Meta::Tokens => 0,
            Meta::Pos => self.max_batch,
            Meta::Slot => 2 * self.max_batch,
            Meta::LogitRows => 3 * self.max_batch,
            Meta::Cos => 4 * self.max_batch,
            Meta::Sin => 4 * self.max_batch + self.rope_cos.len() / self.max_batch,
        };
        Arg::Ptr(self.meta.ptr() + (at * 4) as u64)
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
        let kv_elem = kv_elem_bytes(self.kv_type);
        let cache = slots
            .checked_mul(context)
            .and_then(|v| v.checked_mul(kvd * kv_elem))
            .ok_or_else(|| Error::Invalid("CUDA: the KV cache size overflows".into()))?;
        let wide = c.hidden_size.max(c.ffn_size).max(c.q_dim());
        let padded = wide.div_ceil(crate::kernels::BLOCK_WEIGHTS) * crate::kernels::BLOCK_WEIGHTS;
        let f = |elems: usize| max_batch * elems * 4;
        let attn_rows =
            (self.attn_parts_budget / attn_part_bytes(c, context).max(1)).clamp(1, max_batch);
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
            ("int8 activations", max_batch * padded),
            ("activation scales", f(1)),
            ("activation sums", f(1)),
            (
                "attention chunk parts",
                attn_rows * attn_part_bytes(c, context),
            ),
            ("batch metadata", f(4 + c.head_dim)),
            ("logit rows", f(c.hidden_size)),
            ("logits", f(c.vocab_size)),
        ];
        // The 12-bit activations and their scales of an int8 lm_head.
        let head_acts = self
            .quant_head
            .as_ref()
            .map(|h| (max_batch * h.padded * 2, max_batch * 4));
        let q8_acts = (self.quant_acts == crate::kernels::qblock::QuantActs::Q8)
            .then(|| (max_batch * wide, max_batch * wide / 32 * 4));
        let scratch: usize = sizes.iter().map(|s| s.1).sum::<usize>()
            + head_acts.map_or(0, |(a, b)| a + b)
            + q8_acts.map_or(0, |(q, d)| q + 2 * d);
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
        let head_acts = match head_acts {
            Some((values, scales)) => Some((
                DevBuf::new(&self.gpu, values, "the lm_head activations buffer")?,
                DevBuf::new(&self.gpu, scales, "the lm_head activation scales buffer")?,
            )),
            None => None,
        };
        let q8_acts = match q8_acts {
            Some((values, blocks)) => Some((
                DevBuf::new(&self.gpu, values, "the Q8 activations buffer")?,
                DevBuf::new(&self.gpu, blocks, "the Q8 activation scales buffer")?,
                DevBuf::new(&self.gpu, blocks, "the Q8 activation terms buffer")?,
            )),
            None => None,
        };
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
            acts: next(),
            act_scales: next(),
            act_sums: next(),
            att_parts: next(),
            attn_rows,
            kv_elem,
            head_acts,
            q8_acts,
            meta: next(),
            logit_rows: next(),
            logits_dev: next(),
            logits: device::HostFloats::new(&self.gpu, max_batch * c.vocab_size),
            meta_host: vec![0; (4 + c.head_dim) * max_batch],
            rope: crate::backend::rope::RopeAngles::new(c, context, slots),
            rope_cos: vec![0.0; max_batch * (c.head_dim / 2)],
            rope_sin: vec![0.0; max_batch * (c.head_dim / 2)],
            graphs: GraphCache {
                gpu: self.gpu.clone(),
                graphs: Default::default(),
            },
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
        2 * self.config.n_layers * self.config.kv_dim() * kv_elem_bytes(self.kv_type)
    }

    fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    fn device_memory(&self) -> Option<super::DeviceMemory> {
        let info = self.gpu.memory_info();
        Some(super::DeviceMemory {
            device: self.gpu.name().to_string(),
            weights_bytes: self.weight_bytes,
            free_bytes: info.map(|i| i.0),
            total_bytes: info.map(|i| i.1),
        })
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
