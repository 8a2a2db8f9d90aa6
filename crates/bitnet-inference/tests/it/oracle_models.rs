//! Issue 20's fixtures (tools/make_model_fixtures.py): RoPE scaling types and Qwen3, against
//! transformers' logits, one forward call and as transformers generates (a prefix, then one
//! token a call with the KV cache, which is where `dynamic` and `longrope` differ).

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::backend::BatchEntry;
use bitnet_inference::formats::npy;
use bitnet_inference::model::{self, RopeScaling};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-models")
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn ids(rel: &str) -> Vec<u32> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join(rel)).unwrap()).unwrap();
    serde_json::from_value(v["ids"].clone()).unwrap()
}

fn oracle(rel: &str) -> Vec<f32> {
    npy::read_f32(&std::fs::read(dir().join(rel)).unwrap())
        .unwrap()
        .1
}

fn backend(path: &Path, edit: impl FnOnce(&mut model::ModelConfig)) -> CpuBackend {
    let loaded = model::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut config = loaded.config;
    edit(&mut config);
    CpuBackend::new(config, loaded.weights).unwrap()
}

/// Logits of every position: `first` ids in one call, then one id a call.
fn logits(m: &CpuBackend, ids: &[u32], first: usize) -> Vec<f32> {
    let n = ids.len();
    let mut state = m.new_state(1, n, n).unwrap();
    let vocab = m.config.vocab_size;
    let mut out = Vec::with_capacity(n * vocab);
    let mut start = 0;
    while start < n {
        let end = if start == 0 { first } else { start + 1 };
        let batch: Vec<BatchEntry> = (start..end)
            .map(|pos| BatchEntry {
                token: ids[pos],
                pos,
                slot: 0,
                logits: true,
            })
            .collect();
        m.forward(&batch, &mut state).unwrap();
        for i in 0..batch.len() {
            out.extend_from_slice(state.logits(i));
        }
        start = end;
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn issue20_fixtures_match_transformers_in_one_call_and_incrementally() {
    let m = manifest();
    let prefix = m["prefix_of_incremental"].as_u64().unwrap() as usize;
    let fixtures = m["fixtures"].as_array().unwrap();
    assert!(fixtures.len() >= 10, "every variant in the manifest");
    let mut report = Vec::new();
    for f in fixtures {
        let name = f["name"].as_str().unwrap();
        let ids = ids(f["ids"].as_str().unwrap());
        let model = backend(&dir().join(f["path"].as_str().unwrap()), |_| {});
        let one_call = logits(&model, &ids, ids.len());
        let d1 = max_diff(&one_call, &oracle(f["logits"].as_str().unwrap()));
        let incremental = logits(&model, &ids, prefix);
        let d2 = max_diff(
            &incremental,
            &oracle(f["logits_incremental"].as_str().unwrap()),
        );
        report.push(format!(
            "{name}: max|Δ| one call {d1:.2e}, incremental {d2:.2e}"
        ));
        assert!(d1 <= 1e-4 && d2 <= 1e-4, "{}", report.last().unwrap());
    }
    eprintln!("{}", report.join("\n"));
}

/// Each RoPE fixture run with plain RoPE instead is far from its oracle: the fixtures tell a
/// scaling from its absence (and the sequence crosses every original context).
#[test]
fn rope_fixtures_need_their_scaling() {
    for f in manifest()["fixtures"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        if !name.starts_with("rope-") {
            continue;
        }
        let path = dir().join(f["path"].as_str().unwrap());
        let model = backend(&path, |c| {
            assert_ne!(c.rope_scaling, RopeScaling::None, "{name}");
            c.rope_scaling = RopeScaling::None;
        });
        let ids = ids(f["ids"].as_str().unwrap());
        let d = max_diff(
            &logits(&model, &ids, ids.len()),
            &oracle(f["logits"].as_str().unwrap()),
        );
        assert!(d > 0.05, "{name}: plain RoPE is only {d} from the oracle");
    }
}

/// The GGUF twins read llama.cpp's keys into the same scaling as the HF configs (llama3 as
/// llama.cpp's per-dimension factors).
#[test]
fn gguf_rope_keys_read_as_the_hf_config_says() {
    let load = |p: &str| model::load(&dir().join(p)).unwrap().config;
    let hf = load("rope-yarn");
    let gguf = load("rope-yarn-gguf/model-i2s.gguf");
    assert_eq!(hf.rope_scaling, gguf.rope_scaling);
    assert_eq!(hf.max_context, gguf.max_context);
    assert_eq!(
        load("rope-linear").rope_scaling,
        load("rope-linear-gguf/model-i2s.gguf").rope_scaling
    );
    assert!(matches!(
        load("rope-llama3-gguf/model-i2s.gguf").rope_scaling,
        RopeScaling::FreqFactors(_)
    ));
    // dynamic: max_position_embeddings is the original context; the engine reaches ×factor.
    let dynamic = load("rope-dynamic");
    assert_eq!(dynamic.max_context, 64);
    let qwen = load("qwen3-bitnet-gguf/model-i2s.gguf");
    assert!(qwen.qk_norm && qwen.architecture == "qwen3");
}

/// Q2_0 files load as ternary with their group scales (not as dense floats). (The AVX2
/// group dots equal the scalar ones: `kernels::group` tests.)
#[test]
fn q2_0_loads_group_scaled() {
    use bitnet_inference::model::LinearWeights;
    for (name, group) in [("qwen3-q2_0-g64", 64), ("qwen3-q2_0-g128", 128)] {
        let path = dir().join(name).join("model-q2_0.gguf");
        let loaded = model::load(&path).unwrap();
        let tensor = loaded
            .tensors
            .iter()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        assert_eq!(tensor.dtype, if group == 64 { "Q2_0" } else { "Q2_0_g128" });
        for layer in &loaded.weights.layers {
            for lin in layer.linears() {
                match &lin.weights {
                    LinearWeights::Ternary(m) => assert_eq!(m.group(), group, "{name}"),
                    LinearWeights::Dense(_) => panic!("{name}: a linear loaded dense"),
                }
            }
        }
    }
}

/// Converting the fixtures: RoPE scalings and Qwen3 through our GGUF writer (llama.cpp's
/// keys, `rope_freqs`, arch `qwen3`), Q2_0 back to Q2_0, and RoPE scalings through the
/// Hugging Face writer, each loads back to the oracle's logits; what GGUF cannot express is
/// refused by name.
#[test]
fn conversions_keep_rope_scaling_qwen3_and_group_scales() {
    use bitnet_inference::formats::ggml::GgmlType;
    use bitnet_inference::model::save_gguf::{write_gguf, GgufExport};
    use bitnet_inference::model::save_hf::write_hf_dir;
    let out = std::env::temp_dir().join(format!("bitnet-issue20-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let check = |path: &Path, fixture: &str, tol: f32| {
        let ids = ids(&format!("{fixture}/ids.json"));
        let m = backend(path, |_| {});
        let d = max_diff(
            &logits(&m, &ids, ids.len()),
            &oracle(&format!("{fixture}/logits.npy")),
        );
        assert!(
            d <= tol,
            "{}: max |Δ| {d} from {fixture}'s oracle",
            path.display()
        );
    };
    let gguf = |fixture: &str, arch: &str, ty: GgmlType| {
        let src = dir().join(fixture);
        let loaded = model::load(&src).unwrap();
        let path = out.join(format!("{}-{}.gguf", fixture.replace('/', "_"), ty.name()));
        let tokenizer =
            bitnet_inference::model::dummy::byte_vocab_metadata(loaded.config.vocab_size);
        write_gguf(
            &loaded.config,
            &loaded.weights,
            &tokenizer,
            &GgufExport::new(arch, ty, GgmlType::F16, fixture),
            &path,
        )
        .map(|_| path)
    };
    for fixture in ["rope-linear", "rope-yarn", "rope-llama3"] {
        let path = gguf(fixture, "bitnet", GgmlType::I2_S).unwrap();
        check(&path, fixture, 1e-4);
    }
    for fixture in ["rope-dynamic", "rope-longrope"] {
        let e = gguf(fixture, "bitnet", GgmlType::I2_S)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no GGUF (llama.cpp) form"), "{fixture}: {e}");
    }
    let path = gguf("qwen3-bitnet", "qwen3", GgmlType::I2_S).unwrap();
    check(&path, "qwen3-bitnet", 1e-4);
    assert!(gguf("qwen3-bitnet", "bitnet", GgmlType::I2_S).is_err());
    for fixture in ["qwen3-q2_0-g64", "qwen3-q2_0-g128"] {
        let path = gguf(
            &format!("{fixture}/model-q2_0.gguf"),
            "qwen3",
            GgmlType::Q2_0,
        )
        .unwrap();
        check(&path, fixture, 1e-4);
        // Group scales have no per-tensor form.
        let e = gguf(
            &format!("{fixture}/model-q2_0.gguf"),
            "qwen3",
            GgmlType::I2_S,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("group-wise scales"), "{e}");
    }
    for fixture in [
        "rope-linear",
        "rope-dynamic",
        "rope-llama3",
        "rope-yarn",
        "rope-longrope",
    ] {
        let loaded = model::load(&dir().join(fixture)).unwrap();
        let to = out.join(format!("{fixture}-hf"));
        write_hf_dir(
            &loaded.config,
            &loaded.weights,
            &loaded.generation,
            &[],
            &to,
        )
        .unwrap();
        std::fs::copy(
            dir().join(fixture).join("tokenizer.json"),
            to.join("tokenizer.json"),
        )
        .unwrap();
        let back = model::load(&to).unwrap().config;
        assert_eq!(back.rope_scaling, loaded.config.rope_scaling, "{fixture}");
        assert_eq!(back.max_context, loaded.config.max_context, "{fixture}");
        check(&to, fixture, 1e-4);
    }
    std::fs::remove_dir_all(&out).ok();
}

/// Ternary-Bonsai files keep the token embedding (and lm_head) in Q2_0 too: such a tensor
/// loads as the exact floats `t · scale_g` (PrismML's 128-weight groups told from llama.cpp's
/// 64 by the tensor's size).
#[test]
fn q2_0_embedding_loads_as_its_exact_values() {
    use bitnet_inference::formats::ggml::{self, GgmlType};
    use bitnet_inference::formats::gguf::{GgufFile, GgufWriter};
    use half::f16;
    let src = GgufFile::open(dir().join("qwen3-q2_0-g128/model-q2_0.gguf")).unwrap();
    let emb = src.tensor("token_embd.weight").unwrap();
    let (cols, rows) = (emb.dims[0] as usize, emb.dims[1] as usize);
    for ty in [GgmlType::Q2_0, GgmlType::Q2_0_G128] {
        let group = ty.block_size();
        let trits: Vec<i8> = (0..rows * cols).map(|i| (i * 7 % 3) as i8 - 1).collect();
        let scales: Vec<f16> = (0..rows * cols / group)
            .map(|g| f16::from_f32((16 + g % 32) as f32 / 2048.0))
            .collect();
        let bytes = ggml::pack_q2_0(ty, &trits, &scales).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in src
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "general.alignment")
        {
            w.add_metadata(k.clone(), v.clone());
        }
        for t in &src.tensors {
            if t.name == "token_embd.weight" {
                w.add_tensor_raw(&t.name, &t.dims, ty.id(), bytes.clone());
            } else {
                w.add_tensor_raw(
                    &t.name,
                    &t.dims,
                    t.type_id,
                    src.tensor_data(t).unwrap().to_vec(),
                );
            }
        }
        let path = std::env::temp_dir().join(format!(
            "bitnet-q2_0-embd-{}-{}.gguf",
            group,
            std::process::id()
        ));
        w.write(&path).unwrap();
        let m = model::load(&path).unwrap();
        let t = m
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .unwrap();
        assert_eq!(t.dtype, ty.name());
        let mut row = vec![0f32; cols];
        for r in [0, 1, rows - 1] {
            m.weights.token_embedding.row_to_f32(r, &mut row);
            for (c, &v) in row.iter().enumerate() {
                let i = r * cols + c;
                assert_eq!(
                    v,
                    trits[i] as f32 * scales[i / group].to_f32(),
                    "{} ({r}, {c})",
                    ty.name()
                );
            }
        }
        std::fs::remove_file(&path).ok();
    }
}
