//! The CUDA backend's kernels and forward pass, run on the CPU emulator (`emu.rs`) against the
//! CPU backend. Each test prints one `SKIP:` line and passes where no C++ compiler exists.

use super::device::{Arg, DevBuf, Gpu, Kernel};
use super::emu::EmuGpu;
use super::CudaBackend;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendState, BatchEntry, KvType};
use crate::kernels::{self, DenseData, DenseMatrix, QuantizedActivations, TernaryMatrix};
use crate::model::{Activation, LayerWeights, Linear, ModelConfig, ModelWeights, RmsNorm};
use crate::rng::Rng;
use std::sync::Arc;

/// The emulated GPU, its kernels compiled once per test process.
fn emulator() -> Option<Arc<dyn Gpu>> {
    static EMU: std::sync::OnceLock<std::result::Result<Arc<EmuGpu>, String>> =
        std::sync::OnceLock::new();
    let built = EMU.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bitnet-cuda-emu-{}", std::process::id()));
        let built = EmuGpu::build(&dir).expect("the kernels compile as C++");
        built.map(Arc::new)
    });
    match built {
        Ok(gpu) => Some(gpu.clone() as Arc<dyn Gpu>),
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            None
        }
    }
}

fn upload<T: bytemuck::Pod>(gpu: &Arc<dyn Gpu>, data: &[T]) -> DevBuf {
    DevBuf::from_slice(gpu, data, "test data").unwrap()
}

fn download<T: bytemuck::Pod + Default + Clone>(buf: &DevBuf, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    buf.download(0, &mut out).unwrap();
    out
}

fn random_floats(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.next_f32() - 0.5) * scale).collect()
}

/// The int8 activations, their scales and sums are the CPU's, bit for bit, on rows with
/// ties (x·s landing on .5), zeros, NaN and a column count that is not whole blocks; and the
/// ternary products from them, by the GEMV and by the tensor-core GEMM (tiles cut by the
/// row and token counts; three output segments, added to what they hold), are the CPU's
/// integers scaled by the same formula.
#[test]
fn quantization_and_ternary_products_equal_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let mut rng = Rng::new(11);
    let (n, cols, rows) = (70, 300, 70);
    let mut x = random_floats(&mut rng, n * cols, 8.0);
    // Row 1: max 127 so that x·s = x, with halves that round to even.
    x[cols..2 * cols]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 9) as f32 - 4.5);
    x[cols] = 127.0;
    // Row 2: all zero (the 1e-5 floor); row 3: a NaN among values.
    x[2 * cols..3 * cols].fill(0.0);
    x[3 * cols + 7] = f32::NAN;
    let padded = cols.div_ceil(128) * 128;

    let mut cpu = QuantizedActivations::with_capacity(n, cols);
    cpu.quantize(&x, n, cols);
    let w = TernaryMatrix::from_rows(rows, cols, |r, t| {
        for v in t.iter_mut() {
            *v = (rng.next_u64() % 3) as i8 - 1;
        }
        Ok(0.25 + r as f32 / 64.0)
    })
    .unwrap();
    let mut cpu_out = vec![0f32; n * rows];
    kernels::ternary_matmul(&kernels::scalar::ScalarKernel, &w, &cpu, &mut cpu_out);

    let xd = upload(&gpu, &x);
    let q = DevBuf::new(&gpu, n * padded, "q").unwrap();
    let scales = DevBuf::new(&gpu, n * 4, "scales").unwrap();
    let sums = DevBuf::new(&gpu, n * 4, "sums").unwrap();
    let words = upload(&gpu, &super::weights::pack_ternary(&[&w]));
    let mult = upload(&gpu, w.multipliers());
    let out = DevBuf::new(&gpu, n * rows * 4, "out").unwrap();
    let acts = super::CudaActs {
        q: &q,
        scales: &scales,
        sums: &sums,
        bits: 8,
    };
    let src = super::Source {
        x: &xd,
        gated: None,
        cols,
    };
    super::norm_quant(&gpu, Some(&acts), None, src, None, n, padded).unwrap();
    super::ternary_product(
        &gpu,
        Kernel::TernaryGemv,
        &[(&out, rows)],
        false,
        (&words, &mult),
        &acts,
        n,
        rows,
        padded,
    )
    .unwrap();
    // The GEMM into segments of 30, 25 and 15 rows holding 0.5, 0.25, 1 (`accumulate`).
    let seg_rows = [30, 25, 15];
    let bases = [0.5f32, 0.25, 1.0];
    let segs: Vec<DevBuf> = seg_rows
        .iter()
        .zip(bases)
        .map(|(&r, b)| upload(&gpu, &vec![b; n * r]))
        .collect();
    let seg_outs: Vec<(&DevBuf, usize)> = segs.iter().zip(seg_rows).collect();
    super::ternary_product(
        &gpu,
        Kernel::TernaryGemm,
        &seg_outs,
        true,
        (&words, &mult),
        &acts,
        n,
        rows,
        padded,
    )
    .unwrap();
    let q: Vec<i8> = download(&q, n * padded);
    let scales: Vec<f32> = download(&scales, n);
    let sums: Vec<i32> = download(&sums, n);
    for r in 0..n {
        assert_eq!(&q[r * padded..(r + 1) * padded], cpu.row(r), "int8 row {r}");
        assert_eq!(
            scales[r].to_bits(),
            cpu.scale(r).to_bits(),
            "scale of row {r}"
        );
        assert_eq!(sums[r], cpu.sum(r), "sum of row {r}");
    }
    // Ties went to even: −3.5 → −4, −2.5 → −2, 0.5 → 0, 1.5 → 2, 2.5 → 2, 3.5 → 4.
    assert_eq!(&q[padded + 1..padded + 9], &[-4, -2, -2, 0, 0, 2, 2, 4]);
    let out: Vec<f32> = download(&out, n * rows);
    for (i, (a, b)) in out.iter().zip(&cpu_out).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "output {i}: {a} vs {b}");
    }
    let mut first = 0;
    for ((seg, r), base) in segs.iter().zip(seg_rows).zip(bases) {
        let got: Vec<f32> = download(seg, n * r);
        for t in 0..n {
            for j in 0..r {
                let want = base + cpu_out[t * rows + first + j];
                let a = got[t * r + j];
                assert_eq!(
                    a.to_bits(),
                    want.to_bits(),
                    "GEMM token {t} row {}",
                    first + j
                );
            }
        }
        first += r;
    }
}

/// f16 and bf16 values (subnormals, infinities, negative zero) widen to the CPU's f32.
#[test]
fn embedding_rows_widen_f16_and_bf16_exactly() {
    let Some(gpu) = emulator() else { return };
    let bits: Vec<u16> = (0..=u16::MAX)
        .step_by(7)
        .chain([0x8000, 0x0001, 0x03ff, 0x7c00])
        .collect();
    let d = bits.len();
    let tokens = upload(&gpu, &[0i32]);
    for (ty, widen) in [
        (
            super::weights::DENSE_F16,
            (|b| half::f16::from_bits(b).to_f32()) as fn(u16) -> f32,
        ),
        (super::weights::DENSE_BF16, |b| {
            half::bf16::from_bits(b).to_f32()
        }),
    ] {
        let emb = upload(&gpu, &bits);
        let out = DevBuf::new(&gpu, d * 4, "out").unwrap();
        // SAFETY: one token (row 0) of d values; out holds d floats.
        unsafe {
            gpu.launch(
                Kernel::EmbedRows,
                [(d as u32).div_ceil(128), 1, 1],
                [128, 1, 1],
                &[
                    out.arg(),
                    emb.arg(),
                    Arg::I32(ty),
                    tokens.arg(),
                    Arg::I32(1),
                    Arg::I32(d as i32),
                ],
            )
            .unwrap();
        }
        let got: Vec<f32> = download(&out, d);
        for (&b, g) in bits.iter().zip(got) {
            let want = widen(b);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "type {ty}: {b:#06x} gave {g}, want {want}"
            );
        }
    }
}

/// Values stored into an f16 KV cache round as the CPU's f16 caches round them
/// (`half::f16::from_f32`): ties to even, subnormals, overflow to infinity, signed zeros.
#[test]
fn f16_kv_stores_round_as_the_cpu() {
    let Some(gpu) = emulator() else { return };
    let mut rng = Rng::new(5);
    let tiny = f32::from_bits(0x3300_0000); // 2^-25
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        -70000.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        tiny,
        f32::from_bits(0x3300_0001),
        tiny * 3.0,         // 1.5 units of 2^-24: a tie, to even (2)
        tiny * 5.0,         // 2.5 units: to even (2)
        6.097e-5,           // just below f16's smallest normal
        6.1035156e-5,       // f16's smallest normal
        1.0 + 1.0 / 2048.0, // a tie between 1 and 1 + 2^-10: to even (1)
        1.0 + 3.0 / 2048.0, // a tie: to even (1 + 2^-9)
        f32::MIN_POSITIVE,
    ];
    // Random values over the whole exponent range, both signs.
    v.extend((0..2000).map(|_| f32::from_bits(rng.next_u64() as u32 & 0xff7f_ffff)));
    let d = v.len().next_multiple_of(2);
    v.resize(d, 0.5);
    let meta = upload(&gpu, &[0i32]);
    let zeros = upload(&gpu, &vec![0f32; d]);
    let vals = upload(&gpu, &v);
    let (kc, vc) = (
        DevBuf::new(&gpu, d * 2, "kc").unwrap(),
        DevBuf::new(&gpu, d * 2, "vc").unwrap(),
    );
    let tables = upload(&gpu, &vec![1f32; d / 2]);
    // SAFETY: one row (slot 0, position 0) of one KV head of d values, no query heads;
    // caches of one row of d f16 values, tables of one position.
    unsafe {
        gpu.launch(
            Kernel::RopeStore,
            [(d as u32 / 2 + d as u32).div_ceil(128), 1, 1],
            [128, 1, 1],
            &[
                zeros.arg(),
                zeros.arg(),
                vals.arg(),
                kc.arg(),
                vc.arg(),
                tables.arg(),
                tables.arg(),
                meta.arg(),
                meta.arg(),
                Arg::I32(0),
                Arg::I32(1),
                Arg::I32(d as i32),
                Arg::I32(1),
                Arg::I32(1),
            ],
        )
        .unwrap();
    }
    let got: Vec<u16> = download(&vc, d);
    for (&x, g) in v.iter().zip(got) {
        let want = half::f16::from_f32(x).to_bits();
        assert_eq!(
            g,
            want,
            "{x:e} ({:#010x}) stored as {g:#06x}, want {want:#06x}",
            x.to_bits()
        );
    }
}

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
        max_context: 64,
        rope_theta: 10000.0,
        rope_scaling: crate::model::RopeScaling::None,
        rms_norm_eps: 1e-5,
        activation: Activation::Relu2,
        has_sub_norms: true,
        tied_embeddings: true,
        qk_norm: false,
    }
}

/// A random model of `config()`'s shape; `variant` adds what the 2B-4T shape lacks: SiLU, an
/// untied f16 lm_head, a bf16 embedding, a dense f32 linear, a linear with its own input
/// norm, no sub-norms.
fn random_weights(c: &ModelConfig, variant: bool) -> ModelWeights {
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
    let mut rng2 = Rng::new(9);
    let mut norm = |n: usize| RmsNorm {
        weight: (0..n).map(|_| 0.5 + rng2.next_f32()).collect(),
        eps: 1e-5,
    };
    let (hd, ffn) = (c.hidden_size, c.ffn_size);
    let layers = (0..c.n_layers)
        .map(|l| {
            let mut q = ternary(c.q_dim(), hd);
            let mut o = ternary(hd, c.q_dim());
            if variant && l == 1 {
                q.input_norm = Some(norm(hd));
                let mut rng = Rng::new(3);
                let vals = random_floats(&mut rng, hd * c.q_dim(), 0.2);
                o = Linear::dense(
                    DenseMatrix::new(hd, c.q_dim(), DenseData::F32(vals.into())).unwrap(),
                );
            }
            LayerWeights {
                attn_norm: norm(hd),
                q_proj: q,
                k_proj: ternary(c.kv_dim(), hd),
                v_proj: ternary(c.kv_dim(), hd),
                q_norm: None,
                k_norm: None,
                attn_sub_norm: (!variant).then(|| norm(c.q_dim())),
                o_proj: o,
                ffn_norm: norm(hd),
                gate_proj: ternary(ffn, hd),
                up_proj: ternary(ffn, hd),
                ffn_sub_norm: (!variant).then(|| norm(ffn)),
                down_proj: ternary(hd, ffn),
            }
        })
        .collect();
    let mut rng = Rng::new(8);
    let emb = random_floats(&mut rng, c.vocab_size * hd, 1.0);
    let token_embedding = if variant {
        let b: Vec<half::bf16> = emb.iter().map(|&v| half::bf16::from_f32(v)).collect();
        DenseMatrix::new(c.vocab_size, hd, DenseData::BF16(b.into())).unwrap()
    } else {
        let h: Vec<half::f16> = emb.iter().map(|&v| half::f16::from_f32(v)).collect();
        DenseMatrix::new(c.vocab_size, hd, DenseData::F16(h.into())).unwrap()
    };
    let lm_head = variant.then(|| {
        let h: Vec<half::f16> = random_floats(&mut rng, c.vocab_size * hd, 1.0)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        Linear::dense(DenseMatrix::new(c.vocab_size, hd, DenseData::F16(h.into())).unwrap())
    });
    ModelWeights {
        token_embedding,
        layers,
        output_norm: norm(hd),
        lm_head,
    }
}

fn entries(tokens: &[u32], slot: usize, start: usize, logits: bool) -> Vec<BatchEntry> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &token)| BatchEntry {
            token,
            pos: start + i,
            slot,
            logits,
        })
        .collect()
}

/// Runs the same batches through both backends and checks every logits row: the same bits
/// (`tol` 0) or within `tol` of the largest |logit|; returns the largest difference seen.
fn compare(
    cpu: &dyn Backend,
    gpu: &dyn Backend,
    slots: usize,
    batches: &[Vec<BatchEntry>],
    tol: f32,
) -> f32 {
    let ctx = cpu.config().max_context;
    let max_batch = batches.iter().map(Vec::len).max().unwrap();
    let mut cs = cpu.new_state(slots, ctx, max_batch).unwrap();
    let mut gs = gpu.new_state(slots, ctx, max_batch).unwrap();
    let mut worst = 0f32;
    for (b, batch) in batches.iter().enumerate() {
        cpu.forward(batch, &mut cs).unwrap();
        gpu.forward(batch, &mut gs).unwrap();
        let rows = batch.iter().filter(|e| e.logits).count();
        for i in 0..rows {
            let (c, g) = (cs.logits(i), gs.logits(i));
            assert_eq!(c.len(), g.len());
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, (a, b2)) in c.iter().zip(g).enumerate() {
                let d = (a - b2).abs();
                if tol == 0.0 {
                    assert_eq!(
                        a.to_bits(),
                        b2.to_bits(),
                        "batch {b} row {i} logit {j}: cpu {a} gpu {b2}"
                    );
                }
                assert!(
                    d <= tol * scale.max(1.0),
                    "batch {b} row {i} logit {j}: cpu {a} gpu {b2}"
                );
                worst = worst.max(d);
            }
        }
    }
    worst
}

/// Prefill of two sequences in one batch (one asking for every logits row, one for none),
/// then decode steps of both with a third joining late: the emulated CUDA backend gives the
/// CPU backend's logits (its portable path, `ScalarKernel`) bit for bit for the 2B-4T layer
/// shape (ReLU², sub-norms, tied f16 embedding); the variant layers (SiLU, whose `exp` is
/// the platform's and so only on the emulator the CPU's) within 1e-3. Past 256 positions the
/// attention folds a second chunk; the variant has 10 query heads on one KV head (two chunk
/// blocks of 8 and 2 heads) and attention launches of 7 rows. Then both with f16 KV caches
/// (`--kv-type f16`) and with the quantized lm_heads (`--lm-head int8/q4/q6k`, of the tied
/// embedding and of the untied f16 head): the same bits again.
#[test]
fn forward_equals_the_cpu_backend_on_random_models() {
    let Some(gpu) = emulator() else { return };
    use crate::backend::LmHeadQuant;
    for (variant, kv, head) in [
        (false, KvType::F32, LmHeadQuant::None),
        (true, KvType::F32, LmHeadQuant::None),
        (false, KvType::F16, LmHeadQuant::None),
        (true, KvType::F16, LmHeadQuant::Int8),
        (false, KvType::F32, LmHeadQuant::Int8),
        (false, KvType::F32, LmHeadQuant::Q4),
        (true, KvType::F32, LmHeadQuant::Q4),
        (false, KvType::F32, LmHeadQuant::Q6K),
        (true, KvType::F16, LmHeadQuant::Q6K),
    ] {
        let c = ModelConfig {
            activation: if variant {
                Activation::Silu
            } else {
                Activation::Relu2
            },
            has_sub_norms: !variant,
            tied_embeddings: !variant,
            qk_norm: false,
            max_context: 300,
            // Past one Q4 superblock (512 columns) and two Q6_K blocks for the quantized
            // heads.
            hidden_size: if head == LmHeadQuant::None { 64 } else { 576 },
            n_heads: if variant { 10 } else { 4 },
            n_kv_heads: if variant { 1 } else { 2 },
            ..config()
        };
        let w = random_weights(&c, variant);
        let mut cpu =
            CpuBackend::with_kernel(c.clone(), w.clone(), &kernels::scalar::ScalarKernel).unwrap();
        cpu.set_kv_type(kv);
        cpu.set_lm_head_quant(head).unwrap();
        let mut cuda = CudaBackend::on(gpu.clone(), c.clone(), w).unwrap();
        cuda.set_kv_type(kv);
        cuda.set_lm_head_quant(head).unwrap();
        if variant {
            cuda.attn_parts_budget = 7 * super::attn_part_bytes(&c, c.max_context);
        }
        let a: Vec<u32> = (0..250).map(|i| (i * 7 + 3) % 50).collect();
        let b: Vec<u32> = (0..9).map(|i| (i * 11 + 1) % 50).collect();
        let mut batches = vec![];
        let mut first = entries(&a, 0, 0, true);
        first.extend(entries(&b, 2, 0, false));
        batches.push(first);
        for step in 0..12 {
            let mut batch = entries(&[(step * 5 + 2) % 50], 0, a.len() + step as usize, true);
            batch.extend(entries(
                &[(step * 3 + 4) % 50],
                2,
                b.len() + step as usize,
                step % 2 == 0,
            ));
            if step >= 4 {
                batch.extend(entries(&[(step * 13) % 50], 1, step as usize - 4, true));
            }
            batches.push(batch);
        }
        let worst = compare(&cpu, &cuda, 3, &batches, if variant { 1e-3 } else { 0.0 });
        eprintln!(
            "variant {variant}, KV {kv:?}, lm_head {head:?}: largest logit difference {worst:e}"
        );
    }
}

/// Wrong entries are refused with the CPU backend's messages, and a state of another
/// backend is refused.
#[test]
fn bad_entries_and_foreign_states_are_errors() {
    let Some(gpu) = emulator() else { return };
    let c = config();
    let cuda = CudaBackend::on(gpu, c.clone(), random_weights(&c, false)).unwrap();
    let mut s = cuda.new_state(1, 8, 4).unwrap();
    for (e, msg) in [
        (entries(&[50], 0, 0, true), "outside the vocabulary"),
        (entries(&[1], 0, 8, true), "past the context"),
        (entries(&[1], 1, 0, true), "slot 1 does not exist"),
        (entries(&[1; 5], 0, 0, true), "1 to 4 tokens"),
    ] {
        let err = cuda.forward(&e, &mut s).unwrap_err().to_string();
        assert!(err.contains(msg), "{err}");
    }
    assert!(cuda.new_state(1, 65, 4).is_err());
    let cpu = CpuBackend::with_kernel(
        c.clone(),
        random_weights(&c, false),
        &kernels::scalar::ScalarKernel,
    )
    .unwrap();
    let mut cpu_state = Backend::new_state(&cpu, 1, 8, 4).unwrap();
    let err = cuda
        .forward(&entries(&[1], 0, 0, true), &mut cpu_state)
        .unwrap_err();
    assert!(err.to_string().contains("another backend"), "{err}");
    assert_eq!(s.kv_bytes(), 2 * c.n_layers * 8 * c.kv_dim() * 4);
}

/// bitnet-tiny (the shipped trained model): the logits of a prompt and of 64 greedy steps
/// are the CPU backend's (portable path) bit for bit, so the tokens are the same.
#[test]
fn bitnet_tiny_matches_the_cpu_backend() {
    let Some(gpu) = emulator() else { return };
    let mut dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
    if !dir.exists() {
        // A test executable carried to a GPU machine (scripts/test-cuda) runs in the repo.
        dir = "models/bitnet-tiny".into();
    }
    let m = crate::model::load(&dir).unwrap();
    let cpu = CpuBackend::with_kernel(
        m.config.clone(),
        m.weights.clone(),
        &kernels::scalar::ScalarKernel,
    )
    .unwrap();
    let cuda = CudaBackend::on(gpu, m.config.clone(), m.weights).unwrap();
    let prompt = m
        .tokenizer
        .encode("Once upon a time, there was a little fox who", true)
        .unwrap();
    let ctx = 128;
    let mut cs = Backend::new_state(&cpu, 1, ctx, prompt.len()).unwrap();
    let mut gs = cuda.new_state(1, ctx, prompt.len()).unwrap();
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32
    };
    let mut worst = 0f32;
    let mut check = |c: &[f32], g: &[f32]| {
        for (a, b) in c.iter().zip(g) {
            assert_eq!(a.to_bits(), b.to_bits(), "cpu {a} gpu {b}");
            worst = worst.max((a - b).abs());
        }
    };
    let batch = entries(&prompt, 0, 0, true);
    Backend::forward(&cpu, &batch, &mut cs).unwrap();
    cuda.forward(&batch, &mut gs).unwrap();
    for i in 0..prompt.len() {
        check(cs.logits(i), gs.logits(i));
    }
    let (mut cpu_tok, mut gpu_tok) = (
        argmax(cs.logits(prompt.len() - 1)),
        argmax(gs.logits(prompt.len() - 1)),
    );
    let (mut cpu_text, mut gpu_text) = (vec![cpu_tok], vec![gpu_tok]);
    for step in 0..63 {
        let pos = prompt.len() + step;
        Backend::forward(&cpu, &entries(&[cpu_tok], 0, pos, true), &mut cs).unwrap();
        cuda.forward(&entries(&[gpu_tok], 0, pos, true), &mut gs)
            .unwrap();
        if cpu_tok == gpu_tok {
            check(cs.logits(0), gs.logits(0));
        }
        cpu_tok = argmax(cs.logits(0));
        gpu_tok = argmax(gs.logits(0));
        cpu_text.push(cpu_tok);
        gpu_text.push(gpu_tok);
    }
    eprintln!("bitnet-tiny: largest logit difference {worst:e}");
    assert_eq!(gpu_text, cpu_text, "greedy tokens");
}

/// The kernels compile with the real NVRTC, with the backend's own options, for compute
/// capabilities 7.5, 8.0 and 9.0; where `BITNET_PTXAS` names NVIDIA's assembler, the PTX
/// also assembles for those GPUs (what the driver does at load; the int8 `mma` needs 8.0):
/// what the emulator cannot show. `scripts/test` installs both from PyPI
/// (nvidia-cuda-nvrtc, nvidia-cuda-nvcc); without NVRTC the test fails unless
/// `BITNET_SKIP_NVRTC=1`.
#[test]
fn kernels_compile_with_nvrtc_and_assemble() {
    use super::device::{compile, nvrtc_options, nvrtc_present};
    if std::env::var("BITNET_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("SKIP: the kernels' NVRTC compile (BITNET_SKIP_NVRTC=1)");
        return;
    }
    assert!(
        nvrtc_present(),
        "NVRTC (libnvrtc.so.13) not found: add its folder to LD_LIBRARY_PATH (scripts/test \
         installs PyPI's nvidia-cuda-nvrtc), or set BITNET_SKIP_NVRTC=1"
    );
    let ptxas = std::env::var_os("BITNET_PTXAS");
    let dir = std::env::temp_dir().join(format!("bitnet-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for cc in [(7, 5), (8, 0), (9, 0)] {
        let ptx = compile(&nvrtc_options(cc)).unwrap();
        for k in Kernel::ALL {
            assert!(
                ptx.contains(&format!(".entry {}(", k.name())),
                "compute {cc:?}: no entry {}",
                k.name()
            );
        }
        let Some(ptxas) = &ptxas else { continue };
        let file = dir.join(format!("kernels_{}{}.ptx", cc.0, cc.1));
        std::fs::write(&file, &ptx).unwrap();
        let out = std::process::Command::new(ptxas)
            .arg(format!("-arch=sm_{}{}", cc.0, cc.1))
            .arg("-v")
            .arg(&file)
            .arg("-o")
            .arg(file.with_extension("cubin"))
            .output()
            .expect("BITNET_PTXAS runs");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas sm_{}{}:\n{log}", cc.0, cc.1);
        // Registers and shared memory of each kernel, for the record.
        let mut kernel = "";
        for line in log.lines() {
            if let Some(name) = line.split("Function properties for ").nth(1) {
                kernel = name.trim();
            } else if let Some(used) = line.split("Used ").nth(1) {
                eprintln!("sm_{}{} {kernel}: {used}", cc.0, cc.1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GPU memory reported (`device_memory`, `bitnet inspect --device`, the server's
/// metrics) is what the backend allocates: the planned weight bytes are the bytes of the
/// weights' allocations, and a state's KV and scratch bytes those of its own.
#[test]
fn reported_device_memory_is_what_is_allocated() {
    let dir = std::env::temp_dir().join(format!("bitnet-cuda-emu-mem-{}", std::process::id()));
    let gpu = match EmuGpu::build(&dir).expect("the kernels compile as C++") {
        Ok(g) => Arc::new(g),
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    for variant in [false, true] {
        let c = ModelConfig {
            max_context: 40,
            ..config()
        };
        let before = gpu.allocated_bytes();
        let cuda = CudaBackend::on(gpu.clone(), c.clone(), random_weights(&c, variant)).unwrap();
        let d = cuda
            .device_memory()
            .expect("a GPU backend reports its memory");
        assert_eq!(d.device, "CPU emulator");
        assert_eq!((d.free_bytes, d.total_bytes), (None, None));
        assert!(d.weights_bytes > 0);
        let weights = gpu.allocated_bytes() - before;
        assert_eq!(
            weights, d.weights_bytes,
            "variant {variant}: {weights} bytes allocated, {} reported",
            d.weights_bytes
        );
        let state = cuda.new_state(3, 40, 16).unwrap();
        let held = gpu.allocated_bytes() - before - weights;
        assert_eq!(
            held,
            state.kv_bytes() + state.scratch_bytes(),
            "variant {variant}: state {held} bytes allocated, {} + {} reported",
            state.kv_bytes(),
            state.scratch_bytes()
        );
        assert_eq!(state.kv_bytes(), 2 * c.n_layers * 3 * 40 * c.kv_dim() * 4);
        eprintln!(
            "variant {variant}: weights {} reported / {weights} allocated; state {} / {held}",
            d.weights_bytes,
            state.kv_bytes() + state.scratch_bytes()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The issue-20 fixtures (every RoPE scaling, Qwen3 float and ternary, HF and GGUF, group
/// scales of 64 and 128: Q2_0) on the
/// emulated GPU give the CPU backend's logits (its portable path) bit for bit, in one call
/// and one token at a time (`dynamic` scaling depends on the length each call reaches; the
/// fixtures run past their original context).
#[test]
fn issue20_models_equal_the_cpu_backend() {
    let Some(gpu) = emulator() else { return };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-models");
    for (model_path, ids_dir) in [
        ("rope-linear", "rope-linear"),
        ("rope-dynamic", "rope-dynamic"),
        ("rope-llama3", "rope-llama3"),
        ("rope-yarn", "rope-yarn"),
        ("rope-longrope", "rope-longrope"),
        ("rope-yarn-gguf/model-i2s.gguf", "rope-yarn"),
        ("rope-llama3-gguf/model-i2s.gguf", "rope-llama3"),
        ("qwen3-float", "qwen3-float"),
        ("qwen3-bitnet", "qwen3-bitnet"),
        ("qwen3-bitnet-gguf/model-i2s.gguf", "qwen3-bitnet"),
        ("qwen3-q2_0-g64/model-q2_0.gguf", "qwen3-q2_0-g64"),
        ("qwen3-q2_0-g128/model-q2_0.gguf", "qwen3-q2_0-g128"),
    ] {
        let m = crate::model::load(&dir.join(model_path)).unwrap();
        let ids: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(ids_dir).join("ids.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = ids["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let cpu = CpuBackend::with_kernel(
            m.config.clone(),
            m.weights.clone(),
            &kernels::scalar::ScalarKernel,
        )
        .unwrap();
        let cuda = CudaBackend::on(gpu.clone(), m.config.clone(), m.weights.clone()).unwrap();
        let whole = vec![entries(&ids, 0, 0, true)];
        let steps: Vec<Vec<BatchEntry>> = (0..ids.len())
            .map(|i| entries(&ids[i..i + 1], 0, i, true))
            .collect();
        for batches in [&whole, &steps] {
            let worst = compare(&cpu, &cuda, 1, batches, 0.0);
            assert_eq!(worst, 0.0, "{model_path}");
        }
    }
}

/// Group-scaled weights (an f16 scale per 64 or 128 weights) on rows of more than 8 groups
/// (each warp of `ternary_gemv_grouped` then holds two of the CPU's 16 partial sums at 64)
/// and rows that end in half a 1024-weight chunk (640 and 1152 columns): the emulated GPU
/// gives the CPU backend's logits bit for bit, in one call and one token at a time.
#[test]
fn group_scaled_models_equal_the_cpu_backend() {
    let Some(gpu) = emulator() else { return };
    for group in [64, 128] {
        let c = ModelConfig {
            hidden_size: 640,
            head_dim: 160,
            ffn_size: 1152,
            ..config()
        };
        let mut w = random_weights(&c, false);
        // Scales with every f16 mantissa bit over 14 octaves, so that the f32 sums round (the
        // dummy's k/2048 add up exactly in any order and would not tell two orders apart).
        let mut rng = Rng::new(group as u64);
        for layer in &mut w.layers {
            for lin in [
                &mut layer.q_proj,
                &mut layer.k_proj,
                &mut layer.v_proj,
                &mut layer.o_proj,
                &mut layer.gate_proj,
                &mut layer.up_proj,
                &mut layer.down_proj,
            ] {
                let crate::model::weights::LinearWeights::Ternary(m) = &lin.weights else {
                    continue;
                };
                let scales: Vec<f32> = (0..m.rows() * m.cols() / group)
                    .map(|_| {
                        let e = (rng.next_u64() % 14) as i32;
                        let s = (1.0 + rng.next_f32()) * 2f32.powi(-e) * 0.05;
                        half::f16::from_f32(s).to_f32()
                    })
                    .collect();
                let m = m.clone().with_group_scales(group, &scales).unwrap();
                lin.weights = crate::model::weights::LinearWeights::Ternary(m);
            }
        }
        let cpu =
            CpuBackend::with_kernel(c.clone(), w.clone(), &kernels::scalar::ScalarKernel).unwrap();
        let cuda = CudaBackend::on(gpu.clone(), c.clone(), w).unwrap();
        let ids: Vec<u32> = (0..5u32).map(|i| i * 7 % 50).collect();
        let whole = vec![entries(&ids, 0, 0, true)];
        let steps: Vec<Vec<BatchEntry>> = (0..ids.len())
            .map(|i| entries(&ids[i..i + 1], 0, i, true))
            .collect();
        for batches in [&whole, &steps] {
            let worst = compare(&cpu, &cuda, 1, batches, 0.0);
            assert_eq!(worst, 0.0, "groups of {group}");
        }
    }
}

/// `--quant-acts q8` (llama.cpp's Q8 activations for Q4_0/Q4_1/Q8_0 linears): the real
/// SmolLM2-135M (Q4_1 linears, a Q8_0 tied embedding) on the emulated GPU gives the CPU
/// backend's logits bit for bit, prefill and decode, and the exact mode again after it.
#[test]
fn q8_activations_on_smollm2_equal_the_cpu_backend() {
    use crate::kernels::qblock::QuantActs;
    let Some(gpu) = emulator() else { return };
    let Some(path) = std::env::var_os("BITNET_SMOLLM2_GGUF") else {
        if std::env::var("BITNET_SKIP_SMOLLM2").is_ok_and(|v| v == "1") {
            eprintln!("SKIP: SmolLM2-135M (BITNET_SKIP_SMOLLM2=1)");
            return;
        }
        panic!("BITNET_SMOLLM2_GGUF names the SmolLM2-135M GGUF (scripts/test sets it)");
    };
    let mut m = crate::model::load(std::path::Path::new(&path)).unwrap();
    // Two layers are enough for the products and keep the emulator quick.
    m.weights.layers.truncate(2);
    m.config.n_layers = 2;
    let ids: Vec<u32> = (0..20).map(|i| (i * 97 + 5) % 49152).collect();
    for acts in [QuantActs::Q8, QuantActs::Exact] {
        let mut cpu = CpuBackend::with_kernel(
            m.config.clone(),
            m.weights.clone(),
            &kernels::scalar::ScalarKernel,
        )
        .unwrap();
        cpu.set_quant_acts(acts);
        let mut cuda = CudaBackend::on(gpu.clone(), m.config.clone(), m.weights.clone()).unwrap();
        cuda.set_quant_acts(acts).unwrap();
        let mut batches = vec![entries(&ids[..17], 0, 0, true)];
        batches.extend((17..20).map(|i| entries(&ids[i..i + 1], 0, i, true)));
        assert_eq!(compare(&cpu, &cuda, 1, &batches, 0.0), 0.0, "{acts:?}");
    }
}
