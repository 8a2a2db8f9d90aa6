//! The forward pass: one loop over layers, over a batch of tokens that may belong to
//! different sequences, each with its own positions and KV cache slot. Every buffer is
//! planned when the [`CpuState`] is created; a forward call allocates nothing.
//!
//! Exactness: activations between layers, the KV cache and all float math are f32, and the
//! ternary linears quantize activations per token to int8 exactly as transformers does.

use crate::backend::rope::RopeAngles;
use crate::backend::{Batch, BatchEntry, KvType, LmHeadQuant, ModelOptions};
use crate::kernels::attention::{AttentionTask, KvElem, RunningSoftmax};
use crate::kernels::pool::{self, SpinPool};
use crate::kernels::{self, KernelChoice, QuantizedActivations};
use crate::model::{Activation, Linear, LinearWeights, ModelConfig, ModelWeights, RmsNorm};
use crate::{Error, Result};
use std::cell::RefCell;

/// A model ready to run on this CPU: description, weights, and what it computes with,
/// chosen once when it is built: the kernels for this CPU and its own compute threads.
pub struct CpuBackend {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    kernels: KernelChoice,
    /// The compute threads: the calling thread plus `threads - 1` workers, installed for
    /// every forward call.
    pool: SpinPool,
    /// The quantized copy of a float lm_head (or tied embedding) that logits use instead,
    /// set by [`CpuBackend::set_lm_head_quant`].
    lm_head_quant: Option<QuantizedHead>,
    /// The element type of the KV caches [`CpuBackend::new_state`] makes.
    kv_type: KvType,
    /// How activations meet Q4_0/Q4_1/Q8_0 weights ([`CpuBackend::set_quant_acts`]).
    quant_acts: kernels::qblock::QuantActs,
}

/// A quantized lm_head for logits (see [`LmHeadQuant`]).
enum QuantizedHead {
    Int8(kernels::int8::Int8Matrix),
    Q6K(kernels::q6k::Q6kMatrix),
    Q4(kernels::q4::Q4Matrix),
}

/// Key/value cache: `[layer][slot][position][kv_dim]`, allocated once.
struct KvCache {
    n_slots: usize,
    context: usize,
    kv_dim: usize,
    data: KvData,
}

/// The cache's rows in the element type chosen by [`CpuBackend::set_kv_type`].
enum KvData {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    F16 {
        keys: Vec<Vec<half::f16>>,
        values: Vec<Vec<half::f16>>,
    },
}

impl KvCache {
    fn new(
        kv_type: KvType,
        n_layers: usize,
        n_slots: usize,
        context: usize,
        kv_dim: usize,
    ) -> Self {
        fn layers<T: Clone + Default>(n: usize, len: usize) -> Vec<Vec<T>> {
            (0..n).map(|_| vec![T::default(); len]).collect()
        }
        let len = n_slots * context * kv_dim;
        let data = match kv_type {
            KvType::F32 => KvData::F32 {
                keys: layers(n_layers, len),
                values: layers(n_layers, len),
            },
            KvType::F16 => KvData::F16 {
                keys: layers(n_layers, len),
                values: layers(n_layers, len),
            },
        };
        Self {
            n_slots,
            context,
            kv_dim,
            data,
        }
    }

    fn offset(&self, slot: usize, pos: usize) -> usize {
        (slot * self.context + pos) * self.kv_dim
    }

    /// Writes one position's key and value rows of `layer`.
    fn store(&mut self, layer: usize, slot: usize, pos: usize, key: &[f32], value: &[f32]) {
        fn put<T: KvElem>(dst: &mut [T], src: &[f32]) {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = T::from_f32(s);
            }
        }
        let span = self.offset(slot, pos)..self.offset(slot, pos) + self.kv_dim;
        match &mut self.data {
            KvData::F32 { keys, values } => {
                keys[layer][span.clone()].copy_from_slice(key);
                values[layer][span].copy_from_slice(value);
            }
            KvData::F16 { keys, values } => {
                put(&mut keys[layer][span.clone()], key);
                put(&mut values[layer][span], value);
            }
        }
    }

    fn bytes(&self) -> usize {
        match &self.data {
            KvData::F32 { keys, values } => {
                4 * keys.iter().chain(values).map(Vec::len).sum::<usize>()
            }
            KvData::F16 { keys, values } => {
                2 * keys.iter().chain(values).map(Vec::len).sum::<usize>()
            }
        }
    }
}

/// Everything a forward call writes: KV caches of all slots, scratch for up to
/// `max_batch` tokens, and the logits of the tokens that asked for them.
pub struct CpuState {
    max_batch: usize,
    /// The RoPE tables of the positions this state holds.
    rope: RopeAngles,
    /// `[max_batch, head_dim / 2]`: the cos and sin rows of this call's entries.
    rope_rows_cos: Vec<f32>,
    rope_rows_sin: Vec<f32>,
    kv: KvCache,
    /// Residual stream `[max_batch, hidden]`.
    hidden: Vec<f32>,
    /// Normed input of the current sub-block `[max_batch, max(hidden, ffn)]`.
    normed: Vec<f32>,
    /// A linear's own input norm output (`use_rms_norm` models) `[max_batch, max(hidden, ffn)]`.
    linear_in: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output `[max_batch, q_dim]`.
    attn: Vec<f32>,
    /// Decode attention's partial results, one per (entry, KV head, chunk of positions) when
    /// one sequence's positions are split over threads; grows to the largest split seen
    /// (a few MB at most: fewer than 4 × threads (entry, KV head) pairs are split).
    attn_partials: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Output of o_proj / down_proj `[max_batch, hidden]`.
    proj: Vec<f32>,
    acts: QuantizedActivations,
    /// The final hidden rows at 12 bits, for a quantized lm_head.
    acts12: kernels::q6k::Int12Activations,
    /// The same rows laid out for the 4-bit lm_head.
    acts_q4: kernels::q4::Q4Activations,
    /// `[n_logits, vocab]` for the entries with `logits: true` of the last call, in order.
    logits: Vec<f32>,
    /// Final-normed rows of the entries that want logits.
    logit_rows: Vec<f32>,
    n_logits: usize,
}

impl CpuState {
    pub fn n_slots(&self) -> usize {
        self.kv.n_slots
    }
    pub fn context(&self) -> usize {
        self.kv.context
    }
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
    /// Logits of the `i`-th entry that asked for them in the last forward call.
    pub fn logits(&self, i: usize) -> &[f32] {
        assert!(i < self.n_logits, "logits row {i} of {}", self.n_logits);
        let vocab = self.logits.len() / self.max_batch;
        &self.logits[i * vocab..(i + 1) * vocab]
    }
    pub fn n_logits(&self) -> usize {
        self.n_logits
    }
    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
    /// Bytes held by activations, logits and other scratch.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.hidden.len()
            + self.normed.len()
            + self.linear_in.len()
            + self.q.len()
            + self.k.len()
            + self.v.len()
            + self.attn.len()
            + self.attn_partials.len()
            + self.gate.len()
            + self.up.len()
            + self.proj.len()
            + self.logits.len()
            + self.logit_rows.len()
            + self.rope.len()
            + self.rope_rows_cos.len()
            + self.rope_rows_sin.len())
    }
}

thread_local! {
    /// Attention scores of one chunk of a (tile of tokens, KV head) task; grows once, to
    /// [`ATTENTION_TILE`] × the query heads of a group × [`kernels::attention::CHUNK`].
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CpuBackend {
    /// Validates the weights against the description; computes with the machine's kernels
    /// (or `BITNET_KERNEL`'s) on as many threads as the machine has cores.
    pub fn new(config: ModelConfig, weights: ModelWeights) -> Result<Self> {
        Self::with_options(config, weights, &ModelOptions::default())
    }

    /// As `options` say: threads, lm_head, KV cache type, quantized activations. The kernels
    /// are this CPU's best, or those `BITNET_KERNEL` names.
    pub fn with_options(
        config: ModelConfig,
        weights: ModelWeights,
        options: &ModelOptions,
    ) -> Result<Self> {
        let mut model = Self::build(config, weights, KernelChoice::detect()?, options.threads)?;
        model.set_lm_head_quant(options.lm_head)?;
        model.set_kv_type(options.kv_type);
        model.set_quant_acts(options.quant_acts);
        Ok(model)
    }

    /// With a given ternary kernel (the float kernels follow it, see [`KernelChoice`]).
    pub fn with_kernel(
        config: ModelConfig,
        weights: ModelWeights,
        kernel: &'static dyn kernels::TernaryKernel,
    ) -> Result<Self> {
        Self::build(config, weights, KernelChoice::around(kernel), None)
    }

    fn build(
        config: ModelConfig,
        weights: ModelWeights,
        kernels: KernelChoice,
        threads: Option<usize>,
    ) -> Result<Self> {
        check_shapes(&config, &weights)?;
        let threads = match threads {
            Some(0) => return Err(Error::Invalid("threads must be at least 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(Self {
            config,
            weights,
            kernels,
            pool: SpinPool::with_kernels(threads, kernels),
            lm_head_quant: None,
            kv_type: KvType::F32,
            quant_acts: kernels::qblock::QuantActs::Exact,
        })
    }

    /// Compute threads (the caller of a forward call and the pool's workers).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Chooses how logits are computed (see [`LmHeadQuant`]). The quantized kinds quantize the
    /// float lm_head or tied embedding now; a ternary lm_head is left as it is.
    pub fn set_lm_head_quant(&mut self, quant: LmHeadQuant) -> Result<()> {
        let float_head = match &self.weights.lm_head {
            None => Some(&self.weights.token_embedding),
            Some(Linear {
                weights: LinearWeights::Dense(m),
                input_norm: None,
            }) => Some(m),
            Some(_) => None,
        };
        // The quantized copy replaces the float matrix for logits: a matrix viewed in the file
        // map is released as it is quantized, so its pages leave the resident set (the
        // embedding lookup faults back only the rows it reads).
        self.lm_head_quant = match (quant, float_head) {
            (LmHeadQuant::None, _) | (_, None) => None,
            (LmHeadQuant::Int8, Some(m)) => Some(QuantizedHead::Int8(
                kernels::int8::Int8Matrix::from_dense_releasing(m),
            )),
            (LmHeadQuant::Q6K, Some(m)) => Some(QuantizedHead::Q6K(
                kernels::q6k::Q6kMatrix::from_dense_releasing(m)?,
            )),
            (LmHeadQuant::Q4, Some(m)) => Some(QuantizedHead::Q4(
                kernels::q4::Q4Matrix::from_dense_releasing(m),
            )),
        };
        Ok(())
    }

    pub fn lm_head_quant(&self) -> LmHeadQuant {
        match self.lm_head_quant {
            None => LmHeadQuant::None,
            Some(QuantizedHead::Int8(_)) => LmHeadQuant::Int8,
            Some(QuantizedHead::Q6K(_)) => LmHeadQuant::Q6K,
            Some(QuantizedHead::Q4(_)) => LmHeadQuant::Q4,
        }
    }

    /// Bytes of the quantized lm_head copy, if one was made.
    pub fn lm_head_quant_bytes(&self) -> usize {
        match &self.lm_head_quant {
            None => 0,
            Some(QuantizedHead::Int8(m)) => m.memory_bytes(),
            Some(QuantizedHead::Q6K(m)) => m.memory_bytes(),
            Some(QuantizedHead::Q4(m)) => m.memory_bytes(),
        }
    }

    /// Chooses the element type of the KV caches of states made from now on.
    pub fn set_kv_type(&mut self, kv_type: KvType) {
        self.kv_type = kv_type;
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Chooses how Q4_0/Q4_1/Q8_0 linears (and such an lm_head or tied embedding, unless
    /// [`CpuBackend::set_lm_head_quant`] replaced it) are multiplied: exactly (the default), or
    /// with activations quantized to Q8 blocks as llama.cpp does ([`kernels::qblock`]).
    pub fn set_quant_acts(&mut self, mode: kernels::qblock::QuantActs) {
        self.quant_acts = mode;
    }

    pub fn quant_acts(&self) -> kernels::qblock::QuantActs {
        self.quant_acts
    }

    pub fn kernel_name(&self) -> &'static str {
        self.kernels.ternary.name()
    }

    /// Plans every buffer for `n_slots` sequences of up to `context` tokens each, processed
    /// `max_batch` tokens at a time.
    pub fn new_state(&self, n_slots: usize, context: usize, max_batch: usize) -> Result<CpuState> {
        let c = &self.config;
        if context == 0 || context > c.max_context {
            return Err(Error::Invalid(format!(
                "context size {context} must be between 1 and the model's {}",
                c.max_context
            )));
        }
        let (n_slots, max_batch) = (n_slots.max(1), max_batch.max(1));
        let wide = c.hidden_size.max(c.ffn_size).max(c.q_dim());
        let lm_head_width = c.hidden_size.next_multiple_of(kernels::q4::Q4_SUPER);
        let half = c.head_dim / 2;
        Ok(CpuState {
            rope: RopeAngles::new(c, context, n_slots),
            rope_rows_cos: vec![0.0; max_batch * half],
            rope_rows_sin: vec![0.0; max_batch * half],
            max_batch,
            kv: KvCache::new(self.kv_type, c.n_layers, n_slots, context, c.kv_dim()),
            hidden: vec![0.0; max_batch * c.hidden_size],
            normed: vec![0.0; max_batch * wide],
            linear_in: vec![0.0; max_batch * wide],
            q: vec![0.0; max_batch * c.q_dim()],
            k: vec![0.0; max_batch * c.kv_dim()],
            v: vec![0.0; max_batch * c.kv_dim()],
            attn: vec![0.0; max_batch * c.q_dim()],
            attn_partials: Vec::new(),
            gate: vec![0.0; max_batch * c.ffn_size],
            up: vec![0.0; max_batch * c.ffn_size],
            proj: vec![0.0; max_batch * c.hidden_size],
            acts: QuantizedActivations::with_capacity(max_batch, wide),
            // Padded for any quantized lm_head (whole 512-superblocks of q4 cover the
            // 256-blocks of Q6_K and the 128-blocks of int8).
            acts12: kernels::q6k::Int12Activations::with_capacity(max_batch, lm_head_width),
            acts_q4: kernels::q4::Q4Activations::with_capacity(max_batch, lm_head_width),
            logits: vec![0.0; max_batch * c.vocab_size],
            logit_rows: vec![0.0; max_batch * c.hidden_size],
            n_logits: 0,
        })
    }

    /// Runs `batch` through the model, writing K/V of every entry into its slot's cache and
    /// the logits of the entries that ask for them into `state` (see
    /// [`CpuState::logits`]). At most `state.max_batch()` entries a call.
    pub fn forward(&self, batch: &Batch, state: &mut CpuState) -> Result<()> {
        self.pool.install(|| self.forward_on_pool(batch, state))
    }

    fn forward_on_pool(&self, batch: &Batch, state: &mut CpuState) -> Result<()> {
        let c = &self.config;
        let n = batch.len();
        if n == 0 || n > state.max_batch {
            return Err(Error::Invalid(format!(
                "a forward call takes 1 to {} tokens, got {n}",
                state.max_batch
            )));
        }
        for e in batch {
            if e.token as usize >= c.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {} is outside the vocabulary (size {})",
                    e.token, c.vocab_size
                )));
            }
            if e.slot >= state.kv.n_slots {
                return Err(Error::Invalid(format!(
                    "sequence slot {} does not exist ({} slots)",
                    e.slot, state.kv.n_slots
                )));
            }
            if e.pos >= state.kv.context {
                return Err(Error::Invalid(format!(
                    "position {} is past the context size {}",
                    e.pos, state.kv.context
                )));
            }
        }
        let (hd, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.ffn_size);

        for (i, e) in batch.iter().enumerate() {
            self.weights
                .token_embedding
                .row_to_f32(e.token as usize, &mut state.hidden[i * hd..(i + 1) * hd]);
        }
        state
            .rope
            .rows(c, batch, &mut state.rope_rows_cos, &mut state.rope_rows_sin);

        for (l, layer) in self.weights.layers.iter().enumerate() {
            // Attention block.
            rms_norm_rows(
                &state.hidden[..n * hd],
                &layer.attn_norm,
                &mut state.normed[..n * hd],
            );
            self.linears(
                &state.normed[..n * hd],
                n,
                &mut state.acts,
                &mut state.linear_in,
                &mut [
                    (&layer.q_proj, &mut state.q[..n * qd]),
                    (&layer.k_proj, &mut state.k[..n * kvd]),
                    (&layer.v_proj, &mut state.v[..n * kvd]),
                ],
            );
            let (cos, sin, d) = (&state.rope_rows_cos, &state.rope_rows_sin, c.head_dim);
            let (q_norm, k_norm) = (layer.q_norm.as_ref(), layer.k_norm.as_ref());
            par_rows(&mut state.q[..n * qd], qd, &|i, rows| {
                for (j, row) in rows.chunks_exact_mut(qd).enumerate() {
                    if let Some(norm) = q_norm {
                        rms_norm_heads(row, norm);
                    }
                    rope(row, i + j, d, cos, sin);
                }
            });
            par_rows(&mut state.k[..n * kvd], kvd, &|i, rows| {
                for (j, row) in rows.chunks_exact_mut(kvd).enumerate() {
                    if let Some(norm) = k_norm {
                        rms_norm_heads(row, norm);
                    }
                    rope(row, i + j, d, cos, sin);
                }
            });
            for (i, e) in batch.iter().enumerate() {
                let span = i * kvd..(i + 1) * kvd;
                state
                    .kv
                    .store(l, e.slot, e.pos, &state.k[span.clone()], &state.v[span]);
            }
            self.attention(batch, l, state);
            let attn_in: &[f32] = match &layer.attn_sub_norm {
                Some(norm) => {
                    rms_norm_rows(&state.attn[..n * qd], norm, &mut state.normed[..n * qd]);
                    &state.normed[..n * qd]
                }
                None => &state.attn[..n * qd],
            };
            self.linears(
                attn_in,
                n,
                &mut state.acts,
                &mut state.linear_in,
                &mut [(&layer.o_proj, &mut state.proj[..n * hd])],
            );
            add_in_place(&mut state.hidden[..n * hd], &state.proj[..n * hd], hd);

            // Feed-forward block.
            rms_norm_rows(
                &state.hidden[..n * hd],
                &layer.ffn_norm,
                &mut state.normed[..n * hd],
            );
            self.linears(
                &state.normed[..n * hd],
                n,
                &mut state.acts,
                &mut state.linear_in,
                &mut [
                    (&layer.gate_proj, &mut state.gate[..n * ffn]),
                    (&layer.up_proj, &mut state.up[..n * ffn]),
                ],
            );
            let (act, up) = (c.activation, &state.up[..n * ffn]);
            par_rows(&mut state.gate[..n * ffn], ffn, &|i, gate| {
                for (g, &u) in gate.iter_mut().zip(&up[i * ffn..]) {
                    *g = activate(act, *g) * u;
                }
            });
            let down_in: &[f32] = match &layer.ffn_sub_norm {
                Some(norm) => {
                    rms_norm_rows(&state.gate[..n * ffn], norm, &mut state.normed[..n * ffn]);
                    &state.normed[..n * ffn]
                }
                None => &state.gate[..n * ffn],
            };
            self.linears(
                down_in,
                n,
                &mut state.acts,
                &mut state.linear_in,
                &mut [(&layer.down_proj, &mut state.proj[..n * hd])],
            );
            add_in_place(&mut state.hidden[..n * hd], &state.proj[..n * hd], hd);
        }

        // Final norm and lm_head, only for the entries that want logits.
        let mut m = 0;
        for (i, e) in batch.iter().enumerate() {
            if e.logits {
                state.logit_rows[m * hd..(m + 1) * hd]
                    .copy_from_slice(&state.hidden[i * hd..(i + 1) * hd]);
                m += 1;
            }
        }
        state.n_logits = m;
        if m > 0 {
            rms_norm_rows(
                &state.logit_rows[..m * hd],
                &self.weights.output_norm,
                &mut state.normed[..m * hd],
            );
            let out = &mut state.logits[..m * c.vocab_size];
            let x = &state.normed[..m * hd];
            match &self.lm_head_quant {
                Some(QuantizedHead::Int8(head)) => {
                    // 12-bit activations: as fast as int8 ones (two `vpdpbusd` on the byte
                    // planes) and nearly as accurate as f32 (docs/PERFORMANCE.md).
                    state.acts12.quantize(x, m, hd, head.padded_cols());
                    kernels::int8::int8_matmul_int12(head, &state.acts12, out);
                    return Ok(());
                }
                Some(QuantizedHead::Q6K(head)) => {
                    state.acts12.quantize(x, m, hd, head.padded_cols());
                    kernels::q6k::q6k_matmul(head, &state.acts12, out);
                    return Ok(());
                }
                Some(QuantizedHead::Q4(head)) => {
                    state.acts12.quantize(x, m, hd, head.padded_cols());
                    state.acts_q4.fill(&state.acts12);
                    kernels::q4::q4_matmul(head, &state.acts_q4, out);
                    return Ok(());
                }
                None => {}
            }
            match &self.weights.lm_head {
                None => kernels::dense_matmul_with(
                    &self.weights.token_embedding,
                    &state.normed[..m * hd],
                    m,
                    out,
                    self.quant_acts,
                ),
                Some(head) => self.linears(
                    &state.normed[..m * hd],
                    m,
                    &mut state.acts,
                    &mut state.linear_in,
                    &mut [(head, out)],
                ),
            }
        }
        Ok(())
    }

    /// Applies several linears to the same input rows `x: [n, in]`, quantizing the input
    /// once for all ternary linears that have no input norm of their own.
    fn linears(
        &self,
        x: &[f32],
        n: usize,
        acts: &mut QuantizedActivations,
        linear_in: &mut [f32],
        outputs: &mut [(&Linear, &mut [f32])],
    ) {
        let cols = x.len() / n;
        let mut shared_quantized = false;
        for (linear, out) in outputs.iter_mut() {
            let input: &[f32] = match &linear.input_norm {
                Some(norm) => {
                    rms_norm_rows(x, norm, &mut linear_in[..x.len()]);
                    &linear_in[..x.len()]
                }
                None => x,
            };
            match &linear.weights {
                LinearWeights::Ternary(w) => {
                    if linear.input_norm.is_some() || !shared_quantized {
                        acts.quantize(input, n, cols);
                        self.kernels.ternary.prepare(acts);
                        shared_quantized = linear.input_norm.is_none();
                    }
                    kernels::ternary_matmul(self.kernels.ternary, w, acts, out);
                }
                LinearWeights::Dense(w) => {
                    kernels::dense_matmul_with(w, input, n, out, self.quant_acts)
                }
            }
        }
    }

    /// Causal GQA attention over each entry's slot cache (see [`kernels::attention`]).
    ///
    /// Prefill (a batch mostly of runs of consecutive positions of a sequence): one parallel
    /// task per tile of up to [`ATTENTION_TILE`] entries, which attends each run of the tile
    /// for every KV head in turn, reading each cached K and V row once for all the run's
    /// tokens and the query heads of the group.
    ///
    /// Otherwise (decode): one task per (entry, KV head), which reads each row once for the
    /// group's query heads. When that gives too few tasks to keep every thread busy and
    /// balanced (under 4 a thread: decode of one sequence has 5 KV heads for 2B-4T), one
    /// task per (entry, KV head, chunk of positions) instead, whose partial results are then
    /// folded per query head.
    ///
    /// The arithmetic of each query head is the same in every case, bit for bit.
    fn attention(&self, batch: &Batch, layer: usize, state: &mut CpuState) {
        let (kv, q, attn) = (&state.kv, &state.q, &mut state.attn);
        let parts = &mut state.attn_partials;
        match &kv.data {
            KvData::F32 { keys, values } => {
                self.attention_over(batch, kv, &keys[layer], &values[layer], q, attn, parts)
            }
            KvData::F16 { keys, values } => {
                self.attention_over(batch, kv, &keys[layer], &values[layer], q, attn, parts)
            }
        }
    }

    /// [`Self::attention`] over one layer's cache rows of element type `T`.
    #[allow(clippy::too_many_arguments)]
    fn attention_over<T: KvElem>(
        &self,
        batch: &Batch,
        kv: &KvCache,
        keys: &[T],
        values: &[T],
        q: &[f32],
        attn: &mut [f32],
        partials: &mut Vec<f32>,
    ) {
        let c = &self.config;
        let (d, qd, kvd, group) = (c.head_dim, c.q_dim(), c.kv_dim(), c.gqa_group());
        let scale = 1.0 / (d as f32).sqrt();
        // The task of query heads `first_head..first_head + heads` (of one KV head) of the
        // entries `first..first + tokens` (a run of consecutive positions of one sequence).
        let task = |first: usize, tokens: usize, heads: usize, first_head: usize| {
            let (e, last) = (batch[first], batch[first + tokens - 1]);
            let kv_head = first_head / group;
            let q0 = first * qd + first_head * d;
            let base = kv.offset(e.slot, 0) + kv_head * d;
            let end = kv.offset(e.slot, last.pos) + kv_head * d + d;
            AttentionTask {
                q: &q[q0..q0 + (tokens - 1) * qd + heads * d],
                q_stride: qd,
                tokens,
                heads,
                keys: &keys[base..end],
                values: &values[base..end],
                stride: kvd,
                n_pos: e.pos + 1,
                head_dim: d,
                scale,
            }
        };
        // Writes the task's outputs to `out`: its rows of `attn`, from the first head of the
        // first entry to the last head of the last one.
        let attend =
            |first: usize, tokens: usize, heads: usize, first_head: usize, out: &mut [f32]| {
                let task = task(first, tokens, heads, first_head);
                SCORES.with_borrow_mut(|scores| kernels::attention::attend(&task, scores, out));
            };
        if let Some(tile) = attention_tile(batch, pool::threads()) {
            pool::for_each_chunk_mut(&mut attn[..batch.len() * qd], tile * qd, &|t, out| {
                let (first, end) = (t * tile, t * tile + out.len() / qd);
                let mut run = first;
                while run < end {
                    let mut run_end = run + 1;
                    while run_end < end && continues(&batch[run_end - 1], &batch[run_end]) {
                        run_end += 1;
                    }
                    let tokens = run_end - run;
                    for kv_head in 0..c.n_kv_heads {
                        let o0 = (run - first) * qd + kv_head * group * d;
                        let o = &mut out[o0..o0 + (tokens - 1) * qd + group * d];
                        attend(run, tokens, group, kv_head * group, o);
                    }
                    run = run_end;
                }
            });
            return;
        }
        let n_kv = c.n_kv_heads;
        let attn = &mut attn[..batch.len() * qd];
        let chunks = |i: usize| (batch[i].pos + 1).div_ceil(kernels::attention::CHUNK);
        let split: usize = (0..batch.len()).map(|i| n_kv * chunks(i)).sum();
        if batch.len() * n_kv >= 4 * pool::threads() || split == batch.len() * n_kv {
            pool::for_each_chunk_mut(attn, group * d, &|t, out| {
                attend(t / n_kv, 1, group, t % n_kv * group, out)
            });
            return;
        }
        // Task `t` of the split: the first of entry `i`'s is the sum of the earlier
        // entries' counts; within an entry, KV head after KV head, chunk after chunk.
        let first_of = |i: usize| (0..i).map(|i| n_kv * chunks(i)).sum::<usize>();
        let part_len = group * (d + 2);
        if partials.len() < split * part_len {
            partials.resize(split * part_len, 0.0);
        }
        let partials = &mut partials[..split * part_len];
        pool::for_each_chunk_mut(partials, part_len, &|t, part| {
            let mut i = 0;
            while t >= first_of(i + 1) {
                i += 1;
            }
            let k = t - first_of(i);
            let task = task(i, 1, group, k / chunks(i) * group);
            let chunk = k % chunks(i);
            SCORES.with_borrow_mut(|scores| {
                kernels::attention::attend_chunk(&task, chunk, scores, part)
            });
        });
        let partials = &*partials;
        pool::for_each_chunk_mut(attn, group * d, &|t, out| {
            let (i, kv_head) = (t / n_kv, t % n_kv);
            let first = first_of(i) + kv_head * chunks(i);
            for (h, out) in out.chunks_exact_mut(d).enumerate() {
                let mut state = RunningSoftmax::START;
                out.fill(0.0);
                for chunk in first..first + chunks(i) {
                    let part = &partials[chunk * part_len + h * (d + 2)..][..d + 2];
                    kernels::attention::fold(part, &mut state, out);
                }
                state.finish(out);
            }
        });
    }
}

/// Entries per prefill attention task (at most): 16 tokens × 4 query heads of 128 read each
/// K/V row once for 64 queries, while the task's scores and partial results of a chunk of
/// positions (64 × 256 floats and 64 × 130: under 100 KB) stay in L2.
const ATTENTION_TILE: usize = 16;

/// Whether `b` is the token after `a` in the same sequence.
fn continues(a: &BatchEntry, b: &BatchEntry) -> bool {
    b.slot == a.slot && b.pos == a.pos + 1
}

/// The tile size of a prefill batch: the largest power of two up to [`ATTENTION_TILE`] that
/// still gives each thread about four tasks (the tasks late in a prompt attend to more
/// positions, so the pool balances them). `None` for batches that are not mostly runs of
/// consecutive positions (decode), or too small to give every thread a tile.
fn attention_tile(batch: &Batch, threads: usize) -> Option<usize> {
    let continued = batch.windows(2).filter(|w| continues(&w[0], &w[1])).count();
    if 2 * continued < batch.len() {
        return None;
    }
    let mut tile = ATTENTION_TILE;
    while tile > 2 && batch.len().div_ceil(tile) < 4 * threads {
        tile /= 2;
    }
    (batch.len().div_ceil(tile) >= threads).then_some(tile)
}

/// Qwen3's per-head RMSNorm: each `head_dim` slice of `x` normed with `norm` (f32, the
/// order of [`rms_norm_rows`]).
fn rms_norm_heads(x: &mut [f32], norm: &RmsNorm) {
    let d = norm.weight.len();
    for head in x.chunks_exact_mut(d) {
        let mean = sum_of_squares(head) / d as f32;
        let inv = 1.0 / (mean + norm.eps).sqrt();
        for (v, &w) in head.iter_mut().zip(&norm.weight) {
            *v = w * (*v * inv);
        }
    }
}

/// NeoX-style rotary embedding of every head of `d` in `x` (rotate_half: pairs i, i + d/2),
/// with the cos/sin of row `row` of the state's rows.
fn rope(x: &mut [f32], row: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    let (cos, sin) = (&cos[row * half..][..half], &sin[row * half..][..half]);
    for head in x.chunks_exact_mut(d) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

fn activate(act: Activation, g: f32) -> f32 {
    match act {
        Activation::Relu2 => {
            let r = g.max(0.0);
            r * r
        }
        Activation::Silu => g / (1.0 + (-g).exp()),
    }
}

/// `acc += x` for rows of `row_len`.
fn add_in_place(acc: &mut [f32], x: &[f32], row_len: usize) {
    par_rows(acc, row_len, &|i, acc| {
        for (a, &b) in acc.iter_mut().zip(&x[i * row_len..]) {
            *a += b;
        }
    });
}

/// `f(first_row, rows)` over pieces of `data` (rows of `row_len`) on the pool: the element-wise
/// steps between the linears, which on one thread would cap prefill's scaling (serial, they
/// were ~4% of a 1-thread prefill: ~40% of the time at 16 threads). A piece is at least
/// [`MIN_PIECE`] elements, so a decoded token's single row runs inline.
fn par_rows(data: &mut [f32], row_len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = data.len() / row_len;
    let per_piece = rows
        .div_ceil(2 * pool::threads())
        .max(MIN_PIECE.div_ceil(row_len))
        .max(1);
    if per_piece >= rows {
        f(0, data);
        return;
    }
    pool::for_each_chunk_mut(data, per_piece * row_len, &|p, piece| {
        f(p * per_piece, piece)
    });
}

/// Elements below which a pool job costs more than it saves.
const MIN_PIECE: usize = 16 * 1024;

/// `out = x / sqrt(mean(x²) + eps) · weight` row by row, in f32 (as transformers does).
fn rms_norm_rows(x: &[f32], norm: &RmsNorm, out: &mut [f32]) {
    let d = norm.weight.len();
    par_rows(out, d, &|first, out| {
        for (row, o) in x[first * d..].chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = sum_of_squares(row) / d as f32;
            let inv = 1.0 / (mean + norm.eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(&norm.weight) {
                *o = w * (v * inv);
            }
        }
    });
}

/// `Σ v²` in 16 interleaved partial sums (element `i` goes to sum `i % 16`), added in order at
/// the end: a fixed order, so the same on every machine, that the compiler vectorizes (one
/// running sum is a chain of dependent adds, 4 cycles an element).
fn sum_of_squares(row: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut pieces = row.chunks_exact(16);
    for piece in &mut pieces {
        for (a, &v) in acc.iter_mut().zip(piece) {
            *a += v * v;
        }
    }
    for (a, &v) in acc.iter_mut().zip(pieces.remainder()) {
        *a += v * v;
    }
    acc.iter().sum()
}

/// Every weight's shape must match the description; loaders check too, with file names,
/// this is the last guard before the forward pass indexes by them.
fn check_shapes(c: &ModelConfig, w: &ModelWeights) -> Result<()> {
    let expect = |what: String, got: (usize, usize), want: (usize, usize)| {
        if got == want {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{what}: shape [{}, {}], expected [{}, {}]",
                got.0, got.1, want.0, want.1
            )))
        }
    };
    let norm = |what: String, n: &RmsNorm, want: usize| {
        if n.weight.len() == want {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{what}: {} weights, expected {want}",
                n.weight.len()
            )))
        }
    };
    let lin = |what: String, l: &Linear, want: (usize, usize)| {
        if let Some(n) = &l.input_norm {
            norm(format!("{what} input norm"), n, want.1)?;
        }
        expect(what, (l.out_features(), l.in_features()), want)
    };
    // The loaders validate it; a config built in code is checked here too (the RoPE tables
    // index its per-dimension factors).
    c.rope_scaling.validate(c.head_dim, &|key, msg| {
        Error::Invalid(format!("rope scaling `{key}`: {msg}"))
    })?;
    let (hd, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.ffn_size);
    let e = &w.token_embedding;
    expect(
        "token embedding".into(),
        (e.rows(), e.cols()),
        (c.vocab_size, hd),
    )?;
    if w.layers.len() != c.n_layers {
        return Err(Error::Invalid(format!(
            "{} layers of weights, expected {}",
            w.layers.len(),
            c.n_layers
        )));
    }
    for (i, l) in w.layers.iter().enumerate() {
        norm(format!("layer {i} attn_norm"), &l.attn_norm, hd)?;
        lin(format!("layer {i} q_proj"), &l.q_proj, (qd, hd))?;
        lin(format!("layer {i} k_proj"), &l.k_proj, (kvd, hd))?;
        lin(format!("layer {i} v_proj"), &l.v_proj, (kvd, hd))?;
        for (what, n) in [("q_norm", &l.q_norm), ("k_norm", &l.k_norm)] {
            match n {
                Some(n) => norm(format!("layer {i} {what}"), n, c.head_dim)?,
                None if c.qk_norm => {
                    return Err(Error::Invalid(format!(
                        "layer {i} {what}: missing (the model norms query and key heads)"
                    )))
                }
                None => {}
            }
        }
        if let Some(n) = &l.attn_sub_norm {
            norm(format!("layer {i} attn_sub_norm"), n, qd)?;
        }
        lin(format!("layer {i} o_proj"), &l.o_proj, (hd, qd))?;
        norm(format!("layer {i} ffn_norm"), &l.ffn_norm, hd)?;
        lin(format!("layer {i} gate_proj"), &l.gate_proj, (ffn, hd))?;
        lin(format!("layer {i} up_proj"), &l.up_proj, (ffn, hd))?;
        if let Some(n) = &l.ffn_sub_norm {
            norm(format!("layer {i} ffn_sub_norm"), n, ffn)?;
        }
        lin(format!("layer {i} down_proj"), &l.down_proj, (hd, ffn))?;
    }
    norm("output_norm".into(), &w.output_norm, hd)?;
    if let Some(h) = &w.lm_head {
        lin("lm_head".into(), h, (c.vocab_size, hd))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{DenseData, DenseMatrix, TernaryMatrix};
    use crate::model::{LayerWeights, Linear};
    use crate::rng::Rng;

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: "test".into(),
            hidden_size: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_size: 96,
            vocab_size: 50,
            max_context: 32,
            rope_theta: 10000.0,
            rope_scaling: crate::model::RopeScaling::None,
            rms_norm_eps: 1e-5,
            activation: Activation::Relu2,
            has_sub_norms: true,
            tied_embeddings: true,
            qk_norm: false,
        }
    }

    fn random_model() -> CpuBackend {
        random_model_with(config())
    }

    fn random_model_with(c: ModelConfig) -> CpuBackend {
        let mut rng = Rng::new(7);
        let mut ternary = |rows: usize, cols: usize| {
            Linear::ternary(
                TernaryMatrix::from_rows(rows, cols, |_, t| {
                    for v in t.iter_mut() {
                        *v = (rng.next_u64() % 3) as i8 - 1;
                    }
                    Ok(0.05)
                })
                .unwrap(),
            )
        };
        let norm = |n: usize| RmsNorm {
            weight: vec![1.0; n],
            eps: 1e-5,
        };
        let layers = (0..c.n_layers)
            .map(|_| LayerWeights {
                attn_norm: norm(64),
                q_proj: ternary(64, 64),
                k_proj: ternary(32, 64),
                v_proj: ternary(32, 64),
                q_norm: None,
                k_norm: None,
                attn_sub_norm: Some(norm(64)),
                o_proj: ternary(64, 64),
                ffn_norm: norm(64),
                gate_proj: ternary(96, 64),
                up_proj: ternary(96, 64),
                ffn_sub_norm: Some(norm(96)),
                down_proj: ternary(64, 96),
            })
            .collect();
        let mut rng = Rng::new(8);
        let emb: Vec<f32> = (0..50 * 64).map(|_| rng.next_f32() - 0.5).collect();
        let weights = ModelWeights {
            token_embedding: DenseMatrix::new(50, 64, DenseData::F32(emb.into())).unwrap(),
            layers,
            output_norm: norm(64),
            lm_head: None,
        };
        CpuBackend::with_kernel(c, weights, &kernels::scalar::ScalarKernel).unwrap()
    }

    fn entries(tokens: &[u32], slot: usize, start: usize) -> Vec<BatchEntry> {
        tokens
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchEntry {
                token,
                pos: start + i,
                slot,
                logits: true,
            })
            .collect()
    }

    #[test]
    fn prefill_in_one_batch_equals_token_by_token() {
        let model = random_model();
        let tokens = [3u32, 17, 42, 0, 49, 8];
        let mut whole = model.new_state(1, 32, 8).unwrap();
        model.forward(&entries(&tokens, 0, 0), &mut whole).unwrap();
        let mut single = model.new_state(1, 32, 1).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            model.forward(&entries(&[t], 0, i), &mut single).unwrap();
            assert_eq!(single.logits(0), whole.logits(i), "position {i}");
        }
    }

    /// Past one chunk of positions, decode splits a sequence's attention into chunks spread
    /// over threads (one sequence, or two of different lengths in one batch) and folds them;
    /// prefill walks the chunks in turn. The logits are the same bits.
    #[test]
    fn long_contexts_decode_like_prefill_bit_for_bit() {
        let model = random_model_with(ModelConfig {
            max_context: 700,
            ..config()
        });
        let n = 2 * kernels::attention::CHUNK + 60;
        let tokens: Vec<u32> = (0..n as u32).map(|i| i * 7 % 50).collect();
        let mut whole = model.new_state(1, n, n).unwrap();
        model.forward(&entries(&tokens, 0, 0), &mut whole).unwrap();
        let mut step = model.new_state(2, n, 2).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            let mut batch = entries(&[t], 0, i);
            if i < n / 2 {
                batch.extend(entries(&[t], 1, i));
            }
            model.forward(&batch, &mut step).unwrap();
            for k in 0..batch.len() {
                assert_eq!(step.logits(k), whole.logits(i), "position {i}, entry {k}");
            }
        }
    }

    #[test]
    fn sequences_in_one_batch_do_not_see_each_other() {
        let model = random_model();
        let (a, b) = ([1u32, 2, 3, 4], [9u32, 8, 7]);
        let mut alone = model.new_state(1, 32, 8).unwrap();
        model.forward(&entries(&b, 0, 0), &mut alone).unwrap();
        let expected: Vec<Vec<f32>> = (0..3).map(|i| alone.logits(i).to_vec()).collect();

        let mut both = model.new_state(2, 32, 8).unwrap();
        let mut batch = entries(&a, 0, 0);
        batch.extend(entries(&b, 1, 0));
        model.forward(&batch, &mut both).unwrap();
        for (i, e) in expected.iter().enumerate() {
            assert_eq!(both.logits(4 + i), &e[..]);
        }
    }

    #[test]
    fn quantized_lm_heads_are_close_and_can_be_turned_off() {
        let mut model = random_model();
        let tokens = [3u32, 17, 42, 0];
        let run = |model: &CpuBackend| {
            let mut s = model.new_state(1, 32, 8).unwrap();
            model.forward(&entries(&tokens, 0, 0), &mut s).unwrap();
            (0..tokens.len())
                .map(|i| s.logits(i).to_vec())
                .collect::<Vec<_>>()
        };
        let exact = run(&model);
        let vocab = model.config.vocab_size;
        // int8 weights and activations: about 1% of the largest logit at most. Q6_K has
        // coarser steps on these uniform random weights (6-bit codes; its per-16 scales only
        // pay off on rows with outliers, as real embeddings have).
        for (quant, bytes, tolerance) in [
            (LmHeadQuant::Int8, vocab * 128 + vocab * 8, 0.02),
            (LmHeadQuant::Q6K, vocab * 210, 0.04),
            (LmHeadQuant::Q4, vocab * (256 + 32), 0.1),
        ] {
            model.set_lm_head_quant(quant).unwrap();
            assert_eq!(model.lm_head_quant(), quant);
            assert_eq!(model.lm_head_quant_bytes(), bytes);
            let quantized = run(&model);
            let mut differs = false;
            for (e, q) in exact.iter().zip(&quantized) {
                let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in e.iter().zip(q) {
                    assert!((a - b).abs() <= tolerance * scale, "{quant:?}: {a} vs {b}");
                    differs |= a != b;
                }
            }
            assert!(differs, "the {quant:?} lm_head was not used");
        }
        model.set_lm_head_quant(LmHeadQuant::None).unwrap();
        assert_eq!(run(&model), exact);
        assert_eq!("q6k".parse(), Ok(LmHeadQuant::Q6K));
        assert_eq!("q4".parse(), Ok(LmHeadQuant::Q4));
        assert!("q5"
            .parse::<LmHeadQuant>()
            .unwrap_err()
            .contains("expected f16, int8, q6k or q4"));
    }

    #[test]
    fn an_f16_kv_cache_halves_its_bytes_and_stays_close() {
        let mut model = random_model();
        let tokens = [3u32, 17, 42, 0, 9, 9, 1];
        let run = |model: &CpuBackend| {
            let mut s = model.new_state(2, 32, 8).unwrap();
            model.forward(&entries(&tokens, 0, 0), &mut s).unwrap();
            let logits: Vec<Vec<f32>> = (0..tokens.len()).map(|i| s.logits(i).to_vec()).collect();
            (logits, s.kv_bytes())
        };
        let (exact, bytes) = run(&model);
        model.set_kv_type(KvType::F16);
        assert_eq!(model.kv_type(), KvType::F16);
        let (half, half_bytes) = run(&model);
        assert_eq!(half_bytes * 2, bytes);
        let mut differs = false;
        for (e, h) in exact.iter().zip(&half) {
            let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in e.iter().zip(h) {
                assert!(
                    (a - b).abs() <= 0.05 * scale,
                    "{a} vs {b} (largest logit {scale})"
                );
                differs |= a != b;
            }
        }
        assert!(differs, "the f16 cache was not used");
        assert_eq!("f16".parse(), Ok(KvType::F16));
        assert!("q8"
            .parse::<KvType>()
            .unwrap_err()
            .contains("expected f32 or f16"));
    }

    #[test]
    fn bad_entries_are_errors() {
        let model = random_model();
        let mut s = model.new_state(1, 8, 4).unwrap();
        let bad = |token, pos, slot| BatchEntry {
            token,
            pos,
            slot,
            logits: true,
        };
        for (e, msg) in [
            (bad(50, 0, 0), "outside the vocabulary"),
            (bad(1, 8, 0), "past the context"),
            (bad(1, 0, 1), "slot 1 does not exist"),
        ] {
            let err = model.forward(&[e], &mut s).unwrap_err().to_string();
            assert!(err.contains(msg), "{err}");
        }
        assert!(model.new_state(1, 33, 4).is_err());
    }
}
