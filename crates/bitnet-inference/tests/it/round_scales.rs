//! `GgufExport::round_scales`: the trained tiny model (`models/bitnet-tiny`, per-tensor
//! scales with no exact f16 form) written as TQ2_0 and TQ1_0 with each scale rounded to the
//! nearest f16. The file must hold exactly the model with f16-rounded scales (bit-equal
//! logits), and that model must score the validation text like the original.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::formats::ggml::GgmlType;
use bitnet_inference::kernels::TernaryMatrix;
use bitnet_inference::model::save_gguf::{write_gguf, GgufExport};
use bitnet_inference::model::{self, dummy, Linear, LinearWeights, ModelWeights};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny")
}

/// `w` with every ternary scale `s` replaced by `f(s)` (trits unchanged).
fn with_scales(w: &ModelWeights, f: impl Fn(f32) -> f32 + Copy) -> ModelWeights {
    let map = |l: &Linear| -> Linear {
        let LinearWeights::Ternary(m) = &l.weights else {
            return l.clone();
        };
        let t = TernaryMatrix::from_rows(m.rows(), m.cols(), |r, trits| {
            for (c, t) in trits.iter_mut().enumerate() {
                *t = m.trit(r, c);
            }
            Ok(f(m.multipliers()[r]))
        })
        .unwrap();
        Linear {
            weights: LinearWeights::Ternary(t),
            input_norm: l.input_norm.clone(),
        }
    };
    let mut out = w.clone();
    for l in &mut out.layers {
        for p in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ] {
            *p = map(p);
        }
    }
    out.lm_head = out.lm_head.as_ref().map(map);
    out
}

/// The validation text: a 64-token sequence for logits, and tokens for perplexity.
struct Eval {
    seq: Vec<u32>,
    tokens: Vec<u32>,
    bos: Option<u32>,
}

impl Eval {
    fn logits(&self, m: &CpuBackend) -> Vec<f32> {
        bitnet_inference::eval::sequence_logits(m, &self.seq).unwrap()
    }
    /// llama.cpp-style perplexity over 8 chunks of 512 tokens (2040 scored).
    fn ppl(&self, m: &CpuBackend) -> f64 {
        bitnet_inference::eval::perplexity(m, &self.tokens, 512, Some(8), self.bos, 128, |_, _| {})
            .unwrap()
            .value()
    }
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Closeness to the original that the f16-rounded model must keep. Any change of the scales,
/// even ×1.001, moves logits by about 0.65% of their range on this sequence (the int8
/// activation quantization turns tiny changes into a few flipped steps), so these bounds
/// catch gross errors (a dropped scale moves logits by 22% of the range and perplexity by
/// 70%); that the scales are the nearest f16s is checked exactly, by bit-equal logits.
/// Measured for f16 rounding: 0.63% of the range, perplexity +0.021%.
const MAX_LOGIT_DELTA_OF_RANGE: f32 = 0.02;
const MAX_PPL_CHANGE: f64 = 0.001;

#[test]
fn tiny_model_with_rounded_scales_writes_loads_and_scores_like_the_original() {
    let src = model::load(&tiny()).unwrap();
    let text = std::fs::read_to_string(tiny().join("validation.txt")).unwrap();
    let end = text
        .char_indices()
        .nth(40_000)
        .map_or(text.len(), |(i, _)| i);
    let tokens = src.tokenizer.encode(&text[..end], true).unwrap();
    assert!(tokens.len() >= 8 * 512, "{} tokens", tokens.len());
    let ev = Eval {
        seq: tokens[..64].to_vec(),
        bos: src.tokenizer.bos_id().filter(|b| tokens.first() == Some(b)),
        tokens,
    };
    let original = CpuBackend::new(src.config.clone(), src.weights.clone()).unwrap();
    let want = ev.logits(&original);
    let want_ppl = ev.ppl(&original);
    let range =
        want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
    let round_f16 = |s: f32| f16::from_f32(s).to_f32();
    let rounded = |f: &dyn Fn(f32) -> f32| {
        CpuBackend::new(src.config.clone(), with_scales(&src.weights, f)).unwrap()
    };
    let reference_logits = ev.logits(&rounded(&round_f16));
    // A coarser rounding (bf16 truncation, as storing the top half of the f32 would give)
    // or a dropped scale gives other logits, so the bit-equal check below tells them apart.
    let bf16_trunc = |s: f32| bf16::from_bits((s.to_bits() >> 16) as u16).to_f32();
    assert_ne!(ev.logits(&rounded(&bf16_trunc)), reference_logits);
    let dropped = max_delta(&ev.logits(&rounded(&|_| 1.0)), &want);
    assert!(
        dropped > MAX_LOGIT_DELTA_OF_RANGE * range,
        "dropped scales: max |Δlogit| {dropped} of range {range}"
    );

    let dir = std::env::temp_dir().join(format!("bitnet-round-scales-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let export = |ty: GgmlType, round_scales: bool| GgufExport {
        // F32 so that the embedding is exact and only the scales differ.
        round_scales,
        ..GgufExport::new("bitnet", ty, GgmlType::F32, "bitnet-tiny")
    };
    let vocab = dummy::byte_vocab_metadata(src.config.vocab_size);
    for ty in [GgmlType::TQ2_0, GgmlType::TQ1_0] {
        // Refused without the flag, naming the first tensor, its scale and the flag.
        let path = dir.join(format!("{}.gguf", ty.name()));
        let e = write_gguf(&src.config, &src.weights, &vocab, &export(ty, false), &path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight: row 0's scale 0.05839416 has no exact f16 form")
                && e.contains(ty.name())
                && e.contains("pass --round-scales"),
            "{e}"
        );

        let written =
            write_gguf(&src.config, &src.weights, &vocab, &export(ty, true), &path).unwrap();
        // 10 layers × 7 linears, one per-tensor scale each, none of them exact.
        assert_eq!(written.rounded_scales, 70, "{written:?}");
        assert_eq!(written.rounded_tensors, 70, "{written:?}");
        let max_change = src
            .weights
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|l| match &l.weights {
                LinearWeights::Ternary(m) => {
                    let s = m.multipliers()[0];
                    ((round_f16(s) as f64 - s as f64) / s as f64).abs()
                }
                LinearWeights::Dense(_) => 0.0,
            })
            .fold(0f64, f64::max);
        assert_eq!(written.max_relative_change, max_change);
        assert!(
            max_change > 0.0 && max_change <= 2f64.powi(-11),
            "{max_change}"
        );

        let loaded = model::load(&path).unwrap();
        for (l, r) in loaded.weights.layers.iter().zip(&src.weights.layers) {
            for (a, b) in l.linears().iter().zip(r.linears()) {
                let (LinearWeights::Ternary(a), LinearWeights::Ternary(b)) =
                    (&a.weights, &b.weights)
                else {
                    panic!("{}: a linear is not ternary", ty.name());
                };
                for (x, y) in a.multipliers().iter().zip(b.multipliers()) {
                    assert_eq!(*x, round_f16(*y), "{}", ty.name());
                }
            }
        }
        let m = CpuBackend::new(loaded.config, loaded.weights).unwrap();
        // Exactly the model with f16-rounded scales.
        let got = ev.logits(&m);
        assert_eq!(got, reference_logits, "{}", ty.name());
        let delta = max_delta(&got, &want);
        let ppl = ev.ppl(&m);
        let ppl_change = (ppl - want_ppl) / want_ppl;
        eprintln!(
            "{}: max |Δlogit| {delta:.4} of range {range:.2} ({:.3}%), PPL {ppl:.5} vs \
             {want_ppl:.5} ({:+.4}%); {}",
            ty.name(),
            100.0 * delta / range,
            100.0 * ppl_change,
            written.rounding_summary()
        );
        assert!(
            delta < MAX_LOGIT_DELTA_OF_RANGE * range,
            "{}: max |Δlogit| {delta} of range {range}",
            ty.name()
        );
        assert!(
            ppl_change.abs() < MAX_PPL_CHANGE,
            "{}: PPL {ppl} vs {want_ppl}",
            ty.name()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
