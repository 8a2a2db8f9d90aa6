//! Q6_K encoding (`ggml::quantize_q6_k`, `--embedding-type q6_k`): the `gguf` PyPI package
//! decodes our blocks to exactly what our decoder gives, within Q6_K's error of the input,
//! and a model written with a Q6_K embedding loads back with that embedding.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::formats::ggml::{self, GgmlType};
use bitnet_inference::formats::gguf::GgufFile;
use bitnet_inference::model::save_gguf::{write_gguf, GgufExport};
use bitnet_inference::model::{self, dummy, ModelConfig};
use std::path::PathBuf;
use std::process::Command;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-q6k-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic rows of varied shape: Gaussian at several magnitudes, sub-blocks of very
/// different sizes, a zero block, a one-hot block, a constant block, heavy outliers.
fn test_rows() -> Vec<f32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut gauss = move || {
        let (u, v) = (uniform(), uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let mut x = Vec::new();
    for scale in [1.0f32, 0.03, 1e-3, 250.0] {
        x.extend((0..512).map(|_| gauss() * scale));
    }
    x.extend((0..256).map(|i| gauss() * 10f32.powi((i / 16) % 4 - 2)));
    x.extend([0.0; 256]);
    let mut hot = [0f32; 256];
    hot[77] = -0.8;
    x.extend(hot);
    x.extend([0.0123; 256]);
    x.extend((0..256).map(|i| if i % 37 == 0 { 40.0 } else { gauss() * 0.05 }));
    x
}

fn rel_rms(x: &[f32], y: &[f32]) -> f64 {
    let (mut e, mut s) = (0f64, 0f64);
    for (a, b) in x.iter().zip(y) {
        e += ((a - b) as f64).powi(2);
        s += (*a as f64).powi(2);
    }
    (e / s).sqrt()
}

/// Whether python3 with `gguf` and numpy is here. Missing, it is a failure unless
/// BITNET_SKIP_PY_GGUF=1 (as BITNET_SKIP_PY_HUB does for huggingface_hub).
fn python_gguf() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import gguf.quants, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("BITNET_SKIP_PY_GGUF").is_ok_and(|v| v == "1") {
        eprintln!("python3 `gguf` package not installed; skipped (BITNET_SKIP_PY_GGUF=1)");
        return false;
    }
    assert!(
        ok,
        "Python's gguf package is needed (`pip install gguf`), or set BITNET_SKIP_PY_GGUF=1 \
         to skip"
    );
    true
}

#[test]
fn gguf_py_decodes_our_q6_k_blocks() {
    if !python_gguf() {
        return;
    }
    let x = test_rows();
    let bytes = ggml::quantize_q6_k(&x).unwrap();
    let mut ours = vec![0f32; x.len()];
    ggml::dequantize_row(GgmlType::Q6_K, &bytes, &mut ours).unwrap();

    let dir = tempdir("py");
    let (qin, fout) = (dir.join("blocks.bin"), dir.join("decoded.f32"));
    std::fs::write(&qin, &bytes).unwrap();
    let o = Command::new("python3")
        .args([
            "-c",
            "import sys, numpy as np\n\
             from gguf.quants import dequantize\n\
             from gguf.constants import GGMLQuantizationType as Q\n\
             raw = np.fromfile(sys.argv[1], dtype=np.uint8).reshape(1, -1)\n\
             dequantize(raw, Q.Q6_K).astype('<f4').tofile(sys.argv[2])",
        ])
        .arg(&qin)
        .arg(&fout)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: Vec<f32> = std::fs::read(&fout)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(theirs.len(), x.len());
    for (i, (a, b)) in theirs.iter().zip(&ours).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "element {i}: gguf {a} vs ours {b}"
        );
    }
    // And what they decode is the input, to Q6_K's precision, block by block.
    for (b, (xb, yb)) in x
        .chunks_exact(256)
        .zip(theirs.chunks_exact(256))
        .enumerate()
    {
        if xb.iter().all(|&v| v == 0.0) {
            assert!(yb.iter().all(|&v| v == 0.0), "block {b}");
            continue;
        }
        let err = rel_rms(xb, yb);
        // Block 8 mixes magnitudes 0.01..10: its smallest sub-blocks sit near d's resolution.
        let bound = if b == 8 { 0.05 } else { 0.02 };
        assert!(err < bound, "block {b}: relative RMS error {err}");
    }
}

fn config(hidden: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: hidden,
        n_layers: 2,
        n_heads: hidden / 64,
        n_kv_heads: hidden / 128,
        head_dim: 64,
        ffn_size: 2 * hidden,
        vocab_size: 300,
        max_context: 64,
        ..dummy::bitnet_2b_4t()
    }
}

fn export(ty: GgmlType, emb: GgmlType) -> GgufExport {
    GgufExport {
        architecture: if ty == GgmlType::I2_S {
            "bitnet-25"
        } else {
            "bitnet"
        }
        .into(),
        ternary_type: ty,
        embedding_type: emb,
        name: "q6_k test".into(),
        round_scales: false,
    }
}

#[test]
fn q6_k_embedding_writes_and_loads_back() {
    let c = config(256);
    let weights = dummy::random_weights(&c, 11).unwrap();
    let vocab = dummy::byte_vocab_metadata(c.vocab_size);
    let dir = tempdir("write");
    let ids = [1u32, 77, 255, 299, 3, 42];
    let mut logits = Vec::new();
    for emb in [GgmlType::F16, GgmlType::Q6_K, GgmlType::Q8_0] {
        let path = dir.join(format!("{}.gguf", emb.name()));
        write_gguf(&c, &weights, &vocab, &export(GgmlType::TQ2_0, emb), &path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensor("token_embd.weight").unwrap().ggml_type, emb);
        let loaded = model::load(&path).unwrap();
        if emb == GgmlType::Q6_K {
            // The loaded embedding is our decoding of our encoding of the original rows.
            let e = &weights.token_embedding;
            let (mut row, mut back) = (vec![0f32; 256], vec![0f32; 256]);
            for r in [0, 150, 299] {
                e.row_to_f32(r, &mut row);
                let mut want = vec![0f32; 256];
                ggml::dequantize_row(
                    GgmlType::Q6_K,
                    &ggml::quantize_q6_k(&row).unwrap(),
                    &mut want,
                )
                .unwrap();
                loaded.weights.token_embedding.row_to_f32(r, &mut back);
                assert_eq!(back, want, "row {r}");
                assert!(rel_rms(&row, &back) < 0.02, "row {r}");
            }
            // Kept in its blocks, read in place from the file.
            let data = loaded.weights.token_embedding.data();
            assert_eq!(data.type_name(), "q6_k");
            assert!(data.is_mapped());
            q6_k_products_match_the_dequantized_embedding(&loaded, &ids);
        }
        let m = CpuBackend::new(loaded.config, loaded.weights).unwrap();
        logits.push(bitnet_inference::eval::sequence_logits(&m, &ids).unwrap());
    }
    // The Q6_K model's logits are near the f16 model's. This random model amplifies small
    // changes (its int8 activation rounding flips): Q8_0 moves them 2.9%, Q6_K 4.4%.
    let err = rel_rms(&logits[0], &logits[1]);
    let err8 = rel_rms(&logits[0], &logits[2]);
    assert!(
        err > 0.0 && err < 0.1 && err8 < 0.1,
        "logits relative RMS Δ: q6_k {err}, q8_0 {err8}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The model with its Q6_K embedding gives exactly the logits of the same model with the
/// embedding dequantized to f32 (the product runs on the exactly dequantized rows), and its
/// Q6_K lm_head (12-bit activations) shares the file's blocks and stays close.
fn q6_k_products_match_the_dequantized_embedding(loaded: &model::LoadedModel, ids: &[u32]) {
    use bitnet_inference::backend::LmHeadQuant;
    use bitnet_inference::kernels::{DenseData, DenseMatrix};
    let e = &loaded.weights.token_embedding;
    let mut f32_rows = vec![0f32; e.rows() * e.cols()];
    for (r, row) in f32_rows.chunks_exact_mut(e.cols()).enumerate() {
        e.row_to_f32(r, row);
    }
    let mut dequantized = loaded.weights.clone();
    dequantized.token_embedding =
        DenseMatrix::new(e.rows(), e.cols(), DenseData::F32(f32_rows.into())).unwrap();
    let f32_model = CpuBackend::new(loaded.config.clone(), dequantized).unwrap();
    let want = bitnet_inference::eval::sequence_logits(&f32_model, ids).unwrap();
    let mut q6 = CpuBackend::new(loaded.config.clone(), loaded.weights.clone()).unwrap();
    let got = bitnet_inference::eval::sequence_logits(&q6, ids).unwrap();
    assert_eq!(want, got, "Q6_K lm_head vs the same weights in f32");
    q6.set_lm_head_quant(LmHeadQuant::Q6K).unwrap();
    assert_eq!(q6.lm_head_quant_bytes(), e.rows() * e.cols() / 256 * 210);
    let quantized = bitnet_inference::eval::sequence_logits(&q6, ids).unwrap();
    assert!(
        rel_rms(&want, &quantized) < 0.01,
        "{}",
        rel_rms(&want, &quantized)
    );
}

#[test]
fn q6_k_embedding_needs_rows_of_256() {
    // Hidden 128: fine for I2_S linears, not for Q6_K's 256-weight blocks.
    let c = config(128);
    let weights = dummy::random_weights(&c, 3).unwrap();
    let dir = tempdir("bad");
    let path = dir.join("x.gguf");
    let err = write_gguf(
        &c,
        &weights,
        &dummy::byte_vocab_metadata(c.vocab_size),
        &export(GgmlType::I2_S, GgmlType::Q6_K),
        &path,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("token_embd.weight") && err.contains("128 columns") && err.contains("256"),
        "{err}"
    );
    // Q8_0 stores the same embedding.
    write_gguf(
        &c,
        &weights,
        &dummy::byte_vocab_metadata(c.vocab_size),
        &export(GgmlType::I2_S, GgmlType::Q8_0),
        &path,
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
