//! `bitnet convert IN OUT --to gguf-i2s|gguf-tq2_0|gguf-tq1_0|hf-packed`: rewrite a model (any
//! format the loaders read: HF packed, bf16 masters, 1bitLLM, GGUF; or a hub id) as a GGUF file
//! or a Hugging Face packed directory.
//! The tokenizer goes with it. GGUF output: the `tokenizer.ggml.*` keys of a GGUF input, or, for
//! a `tokenizer.json` input, a byte-level BPE as GGUF `gpt2` tokens, types and merges, or a
//! byte_fallback BPE (SentencePiece, Llama-2 style) as a GGUF `llama` vocabulary (`spm.rs`).
//! HF output: the input directory's tokenizer and generation files copied, or, for a GGUF
//! input, a `tokenizer.json` written from a `gpt2` (byte-level BPE) vocabulary with the `gpt2`
//! or `llama-bpe` pre-tokenizer, or from a `llama` (SentencePiece) vocabulary in Llama-2's form;
//! other GGUF tokenizers are an error.

mod spm;

use bitnet_inference::formats::ggml::GgmlType;
use bitnet_inference::formats::gguf::{GgufFile, GgufValue};
use bitnet_inference::kernels::{DenseMatrix, TernaryMatrix};
use bitnet_inference::model::save_gguf::{write_gguf_with_progress, GgufExport};
use bitnet_inference::model::save_hf::write_hf_dir;
use bitnet_inference::model::{LinearWeights, ModelWeights};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The model to convert: GGUF file, model directory or Hugging Face hub id.
    input: PathBuf,
    /// The file (GGUF) or directory (hf-packed) to write; it must not exist for hf-packed.
    output: PathBuf,
    /// Output format: gguf-i2s (bitnet.cpp), gguf-tq2_0, gguf-tq1_0, gguf-q2_0 (llama.cpp; an
    /// f16 scale per 64 weights), hf-packed
    /// (a transformers directory, like microsoft/bitnet-b1.58-2B-4T).
    #[arg(long)]
    to: String,
    /// Type of the token embedding (also the output layer when tied): f16, q8_0, q6_k, f32.
    /// q6_k needs a hidden size that is a multiple of 256 (otherwise an error); an untied
    /// dense lm_head is written as f16.
    #[arg(long, default_value = "f16")]
    embedding_type: String,
    /// GGUF architecture string (default: bitnet-25 for I2_S, bitnet for TQ types).
    #[arg(long)]
    arch: Option<String>,
    /// gguf-tq2_0/gguf-tq1_0 store one f16 scale per 256 weights, so a model whose ternary
    /// scales have no exact f16 form is refused. With this flag each such scale is rounded
    /// to the nearest f16 (ties to even, at most 2^-11 ≈ 4.9e-4 relative) and one line
    /// reports how many were and the largest relative change. Exact scales stay exact;
    /// scales beyond f16's range (above 65504, or below its smallest normal 6.1e-5) are
    /// still errors. gguf-i2s and hf-packed keep f32 scales and need no rounding.
    #[arg(long)]
    round_scales: bool,
    /// Convert a model that is not ternary (its linears are float or other quantized types,
    /// as in an ordinary Llama) to a ternary GGUF type anyway: each such weight matrix is
    /// rounded to -1, 0, +1 times its mean |w|. A model not trained for this gives nonsense
    /// afterwards, so without this flag it is refused.
    #[arg(long)]
    force_ternarize: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ternary_type = match a.to.as_str() {
        "gguf-i2s" => GgmlType::I2_S,
        "gguf-tq2_0" => GgmlType::TQ2_0,
        "gguf-tq1_0" => GgmlType::TQ1_0,
        "gguf-q2_0" => GgmlType::Q2_0,
        "hf-packed" => return run_hf(&a),
        t => anyhow::bail!(
            "--to {t}: expected gguf-i2s, gguf-tq2_0, gguf-tq1_0, gguf-q2_0 or hf-packed"
        ),
    };
    if a.round_scales && ternary_type == GgmlType::I2_S {
        anyhow::bail!(
            "--round-scales applies to gguf-tq2_0 and gguf-tq1_0 only (I2_S stores an f32 scale)"
        );
    }
    let embedding_type = match a.embedding_type.to_ascii_lowercase().as_str() {
        "f16" => GgmlType::F16,
        "f32" => GgmlType::F32,
        "q8_0" => GgmlType::Q8_0,
        "q6_k" => GgmlType::Q6_K,
        t => anyhow::bail!("--embedding-type {t}: expected f16, q8_0, q6_k or f32"),
    };
    let input = super::resolve_model(&a.input)?;
    let sp = super::loading_spinner(&input);
    let m = bitnet_inference::model::load(&input);
    sp.finish_and_clear();
    let mut m = m?;
    let dense = dense_linears(&m.weights);
    if !dense.is_empty() {
        let count: usize = dense.iter().map(|(_, n)| n).sum();
        let types = dense.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ");
        let total = m.weights.layers.len() * 7;
        if !a.force_ternarize {
            anyhow::bail!(
                "{}: {count} of its {total} layer linears are not ternary ({types}): this is not \
                 a BitNet b1.58 model, and rounding its weights to -1/0/+1 for {} would give \
                 nonsense. Pass --force-ternarize to convert it anyway",
                input.display(),
                ternary_type.name()
            );
        }
        eprintln!(
            "warning: --force-ternarize: {count} of {total} layer linears ({types}) are rounded \
             to -1/0/+1 times their mean |w|; a model not trained for ternary weights gives \
             nonsense after this"
        );
        let sp = super::spinner("ternarizing");
        let res = force_ternarize(&mut m.weights);
        sp.finish_and_clear();
        res?;
    } else if a.force_ternarize {
        eprintln!("note: --force-ternarize: the model is ternary already; nothing to do");
    }
    let tokenizer = tokenizer_metadata(&input, &m.generation)?;
    let arch = a.arch.clone().unwrap_or_else(|| {
        if m.config.qk_norm {
            "qwen3".into()
        } else if ternary_type == GgmlType::I2_S {
            "bitnet-25".into()
        } else {
            "bitnet".into()
        }
    });
    let name = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Written beside the output and renamed when whole: a failed conversion leaves no file
    // that passes for a converted model.
    let tmp = a.output.with_file_name(format!(
        ".{}.partial",
        a.output.file_name().unwrap_or_default().to_string_lossy()
    ));
    let bar = super::progress_bar(
        m.weights.layers.len() as u64 + 2,
        format!("writing {}", a.output.display()),
    );
    let res = write_gguf_with_progress(
        &m.config,
        &m.weights,
        &tokenizer,
        &GgufExport {
            architecture: arch,
            ternary_type,
            embedding_type,
            name,
            round_scales: a.round_scales,
        },
        &tmp,
        &mut |done, _| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    let written = match res {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, &a.output).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("{}: {e}", a.output.display())
    })?;
    if a.round_scales {
        eprintln!("{}", written.rounding_summary());
    }
    eprintln!(
        "wrote {} ({}, {} parameters)",
        a.output.display(),
        ternary_type.name(),
        m.weights.parameter_count()
    );
    Ok(())
}

/// `--to hf-packed`: a transformers directory (config.json, model.safetensors, tokenizer).
fn run_hf(a: &Args) -> anyhow::Result<()> {
    if a.arch.is_some() {
        anyhow::bail!("--arch applies to GGUF output only");
    }
    if a.round_scales {
        anyhow::bail!(
            "--round-scales applies to gguf-tq2_0 and gguf-tq1_0 only (hf-packed keeps the \
             scales as they are)"
        );
    }
    if a.force_ternarize {
        anyhow::bail!(
            "--force-ternarize applies to GGUF outputs only (hf-packed writes a float model as \
             a float LlamaForCausalLM)"
        );
    }
    if !a.embedding_type.eq_ignore_ascii_case("f16") {
        eprintln!("note: --embedding-type is ignored for hf-packed (the embedding keeps its type)");
    }
    let input = super::resolve_model(&a.input)?;
    let sp = super::loading_spinner(&input);
    let m = bitnet_inference::model::load(&input);
    sp.finish_and_clear();
    let m = m?;
    let files = if input.is_dir() {
        let mut files = Vec::new();
        for name in HF_TOKENIZER_FILES {
            let p = input.join(name);
            if p.is_file() {
                let bytes =
                    std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                files.push((name.to_string(), bytes));
            }
        }
        files
    } else {
        gguf_tokenizer_files(&input, &m.generation)?
    };
    if !files.iter().any(|(n, _)| n == "tokenizer.json") {
        anyhow::bail!(
            "{}: HF output needs a tokenizer.json and the input has none",
            input.display()
        );
    }
    let sp = super::spinner(format!("writing {}", a.output.display()));
    let res = write_hf_dir(&m.config, &m.weights, &m.generation, &files, &a.output);
    sp.finish_and_clear();
    res?;
    eprintln!(
        "wrote {} (HF packed, {}, {} parameters)",
        a.output.display(),
        if m.config.has_sub_norms {
            "BitNetForCausalLM"
        } else {
            "LlamaForCausalLM"
        },
        m.weights.parameter_count()
    );
    Ok(())
}

/// The layer linears that are not ternary: each type and how many have it.
fn dense_linears(w: &ModelWeights) -> Vec<(&'static str, usize)> {
    let mut kinds: Vec<(&'static str, usize)> = Vec::new();
    for l in &w.layers {
        for lin in [
            &l.q_proj,
            &l.k_proj,
            &l.v_proj,
            &l.o_proj,
            &l.gate_proj,
            &l.up_proj,
            &l.down_proj,
        ] {
            if let LinearWeights::Dense(d) = &lin.weights {
                let t = d.data().type_name();
                match kinds.iter_mut().find(|(k, _)| *k == t) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((t, 1)),
                }
            }
        }
    }
    kinds
}

/// `--force-ternarize`: every non-ternary layer linear becomes ternary with one scale a
/// tensor, BitNet b1.58's absmean rule (`round(w / mean|w|)` clipped to ±1), the scale
/// rounded to an f16 value so that every ternary type stores it exactly.
fn force_ternarize(w: &mut ModelWeights) -> anyhow::Result<()> {
    for l in &mut w.layers {
        for lin in [
            &mut l.q_proj,
            &mut l.k_proj,
            &mut l.v_proj,
            &mut l.o_proj,
            &mut l.gate_proj,
            &mut l.up_proj,
            &mut l.down_proj,
        ] {
            if let LinearWeights::Dense(d) = &lin.weights {
                lin.weights = LinearWeights::Ternary(absmean_ternary(d)?);
            }
        }
    }
    Ok(())
}

fn absmean_ternary(d: &DenseMatrix) -> anyhow::Result<TernaryMatrix> {
    let (rows, cols) = (d.rows(), d.cols());
    let mut row = vec![0f32; cols];
    let mut sum = 0f64;
    for r in 0..rows {
        d.row_to_f32(r, &mut row);
        sum += row.iter().map(|x| x.abs() as f64).sum::<f64>();
    }
    let mean = ((sum / (rows * cols).max(1) as f64) as f32).max(1e-4);
    // To the nearest value with f16's 10 mantissa bits (f16's normal range, given the floor).
    let gamma = f32::from_bits((mean.to_bits() + 0x1000) & !0x1fff);
    Ok(TernaryMatrix::from_rows_parallel_with(
        rows,
        cols,
        || vec![0f32; cols],
        |row, r, trits| {
            d.row_to_f32(r, row);
            for (t, &x) in trits.iter_mut().zip(row.iter()) {
                *t = (x / gamma).round_ties_even().clamp(-1.0, 1.0) as i8;
            }
            Ok(gamma)
        },
    )?)
}

/// Files of a model directory that go with an HF conversion.
const HF_TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "README.md",
];

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` for a GGUF input
/// whose tokenizer is a byte-level BPE (`tokenizer.ggml.model = gpt2`) or SentencePiece
/// (`llama`).
fn gguf_tokenizer_files(
    path: &Path,
    generation: &bitnet_inference::model::GenerationDefaults,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use serde_json::{json, Value};
    let f = GgufFile::open(path)?;
    let get = |k: &str| f.metadata.get(k);
    let str_of = |v: Option<&GgufValue>| match v {
        Some(GgufValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let no = |why: String| {
        anyhow::anyhow!(
            "{}: HF output needs a tokenizer.json; {why}. Convert from the model's Hugging Face \
             directory instead",
            path.display()
        )
    };
    let model = str_of(get("tokenizer.ggml.model")).unwrap_or_default();
    match model.as_str() {
        "gpt2" => {}
        "llama" => return spm::tokenizer_files(path, &f.metadata, generation),
        _ => {
            return Err(no(format!(
                "only byte-level BPE (`gpt2`) and SentencePiece (`llama`) GGUF tokenizers can be \
                 written as one, this one is `{model}`"
            )))
        }
    }
    let pre = str_of(get("tokenizer.ggml.pre")).unwrap_or_default();
    let pre_tokenizer = match pre.as_str() {
        "gpt2" | "gpt-2" => json!({"type": "ByteLevel", "add_prefix_space": false,
                                   "trim_offsets": true, "use_regex": true}),
        "llama-bpe" | "llama3" | "llama-v3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}]}),
        other => {
            return Err(no(format!(
                "the pre-tokenizer `{other}` has no tokenizer.json form known here (gpt-2 and \
                 llama-bpe do)"
            )))
        }
    };
    let strings = |key: &str| -> anyhow::Result<Vec<String>> {
        match get(key) {
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.clone()),
                    _ => Err(no(format!("{key} holds a non-string"))),
                })
                .collect(),
            _ => Err(no(format!("{key} is missing"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match get("tokenizer.ggml.token_type") {
        Some(GgufValue::Array(items)) => items
            .iter()
            .map(|v| match v {
                GgufValue::I32(t) => *t as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        match types.get(id).copied().unwrap_or(1) {
            ty @ (3 | 4) => added.push(json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": ty == 4, "special": ty == 3})),
            _ => {
                vocab.insert(tok.clone(), json!(id));
            }
        }
    }
    let id_of = |key: &str| match get(key) {
        Some(GgufValue::U32(v)) => Some(*v as usize),
        _ => None,
    };
    let bos = id_of("tokenizer.ggml.bos_token_id").filter(|&b| b < tokens.len());
    let eos = id_of("tokenizer.ggml.eos_token_id").filter(|&e| e < tokens.len());
    let add_bos = match get("tokenizer.ggml.add_bos_token") {
        Some(GgufValue::Bool(b)) => *b,
        _ => matches!(pre.as_str(), "llama-bpe" | "llama3" | "llama-v3"),
    };
    let post = template_processing(
        bos.filter(|_| add_bos).map(|b| (tokens[b].as_str(), b)),
        None,
    );
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": !matches!(pre.as_str(), "gpt2" | "gpt-2"),
                  "vocab": vocab, "merges": merges},
    });
    let mut cfg = json!({"add_bos_token": add_bos, "add_eos_token": false,
                         "tokenizer_class": "PreTrainedTokenizerFast"});
    if let Some(b) = bos {
        cfg["bos_token"] = json!(tokens[b]);
    }
    if let Some(e) = eos {
        cfg["eos_token"] = json!(tokens[e]);
    }
    let bytes = |v: &Value| serde_json::to_vec_pretty(v).map_err(anyhow::Error::from);
    Ok(vec![
        ("tokenizer.json".into(), bytes(&tokenizer)?),
        ("tokenizer_config.json".into(), bytes(&cfg)?),
        (
            "generation_config.json".into(),
            bytes(&generation_config_json(generation))?,
        ),
    ])
}

/// `generation_config.json`'s token ids.
fn generation_config_json(
    generation: &bitnet_inference::model::GenerationDefaults,
) -> serde_json::Value {
    let mut gen = serde_json::json!({});
    if let Some(b) = generation.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    match generation.eos_token_ids.as_slice() {
        [] => {}
        [one] => gen["eos_token_id"] = (*one).into(),
        many => gen["eos_token_id"] = many.into(),
    }
    gen
}

/// A tokenizer.json post-processor that puts `bos` before and `eos` after each sequence, as
/// transformers' Llama tokenizers write it (`(text, id)`); `Null` when it adds nothing.
fn template_processing(
    bos: Option<(&str, usize)>,
    eos: Option<(&str, usize)>,
) -> serde_json::Value {
    use serde_json::{json, Value};
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let seq = |name: &str, type_id: u32| {
        let mut v = Vec::new();
        v.extend(bos.map(|(t, _)| json!({"SpecialToken": {"id": t, "type_id": type_id}})));
        v.push(json!({"Sequence": {"id": name, "type_id": type_id}}));
        v.extend(eos.map(|(t, _)| json!({"SpecialToken": {"id": t, "type_id": type_id}})));
        v
    };
    let mut special = serde_json::Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        special.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let single = seq("A", 0);
    let mut pair = single.clone();
    pair.extend(seq("B", 1));
    json!({"type": "TemplateProcessing", "single": single, "pair": pair,
           "special_tokens": special})
}

/// A `tokenizer_config.json` special token's text: a string or `{"content": ...}`.
fn special_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(String::from)
}

/// The tokens of a tokenizer.json by id: the model's vocabulary and the added tokens.
struct JsonVocab {
    /// `None` for ids nothing names.
    tokens: Vec<Option<String>>,
    /// For added tokens, whether special; `None` for the model's own tokens.
    special: Vec<Option<bool>>,
}

/// The Llama-3 pre-tokenizer split (tokenizer.json spelling).
const LLAMA3_REGEX: &str =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| \
     ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.into())
}

/// The `tokenizer.ggml.*` metadata of the model at `path`.
fn tokenizer_metadata(
    path: &Path,
    generation: &bitnet_inference::model::GenerationDefaults,
) -> anyhow::Result<Vec<(String, GgufValue)>> {
    if path.is_file() {
        let f = GgufFile::open(path)?;
        return Ok(f
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    let tj = path.join("tokenizer.json");
    let text = std::fs::read_to_string(&tj).map_err(|e| {
        anyhow::anyhow!("{}: {e} (a GGUF output needs the tokenizer)", tj.display())
    })?;
    let t: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", tj.display()))?;
    let model = &t["model"];
    let bad = |what: &str| {
        anyhow::anyhow!(
            "{}: {what}; only BPE tokenizers can be written as GGUF metadata: byte-level BPE \
             (GPT-2, Llama-3 style) or byte_fallback BPE (SentencePiece, Llama-2 style)",
            tj.display()
        )
    };
    if model["type"] != "BPE" {
        return Err(bad(&format!("model type {}", model["type"])));
    }
    let vocab = json_vocab(&tj, &t)?;
    let merges = json_merges(&tj, &t)?;
    let cfg: serde_json::Value = std::fs::read_to_string(path.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if model["byte_fallback"].as_bool() == Some(true) {
        return spm::gguf_metadata(&tj, &t, vocab, &merges, &cfg, generation);
    }
    let pre = pre_name(&t["pre_tokenizer"]).ok_or_else(|| {
        bad(&format!(
            "pre-tokenizer {} has no GGUF `tokenizer.ggml.pre` name known here",
            t["pre_tokenizer"]
        ))
    })?;
    let n = vocab.tokens.len();
    let types: Vec<GgufValue> = vocab
        .special
        .iter()
        .map(|sp| {
            GgufValue::I32(match sp {
                Some(true) => 3,
                Some(false) => 4,
                None => 1,
            })
        })
        .collect();
    let tokens: Vec<GgufValue> = vocab
        .tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.map(|t| s(&t)).unwrap_or_else(|| s(&format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<GgufValue> = merges.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect();
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(tokens),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(merges),
        ),
    ];
    if let Some(b) = generation.bos_token_id.filter(|&b| (b as usize) < n) {
        meta.push(("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(b)));
    }
    if let Some(&e) = generation.eos_token_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(&e) = generation.eos_token_ids.get(1) {
        meta.push(("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(e)));
    }
    if let Some(b) = cfg["add_bos_token"].as_bool() {
        meta.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
    }
    Ok(meta)
}

/// The model vocabulary and added tokens of tokenizer.json `t` (read from `tj`), by id.
fn json_vocab(tj: &Path, t: &serde_json::Value) -> anyhow::Result<JsonVocab> {
    let bad = |what: &str| anyhow::anyhow!("{}: {what}", tj.display());
    let vocab = t["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab object"))?;
    let mut v = JsonVocab {
        tokens: Vec::new(),
        special: Vec::new(),
    };
    let mut put = |id: u64, tok: &str, special: Option<bool>| -> anyhow::Result<()> {
        let i = usize::try_from(id)?;
        if i > 10_000_000 {
            anyhow::bail!("{}: token id {id} out of range", tj.display());
        }
        if v.tokens.len() <= i {
            v.tokens.resize(i + 1, None);
            v.special.resize(i + 1, None);
        }
        v.tokens[i] = Some(tok.to_string());
        v.special[i] = special;
        Ok(())
    };
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(&format!("model.vocab[{tok:?}] is not a token id")))?;
        put(id, tok, None)?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"]
            .as_u64()
            .ok_or_else(|| bad(&format!("added token {a} has no id")))?;
        let content = a["content"]
            .as_str()
            .ok_or_else(|| bad(&format!("added token {a} has no content")))?;
        put(id, content, Some(a["special"].as_bool() == Some(true)))?;
    }
    Ok(v)
}

/// `model.merges` of tokenizer.json `t` as pairs; each is `"a b"` or `["a", "b"]`.
fn json_merges(tj: &Path, t: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    let bad = |what: String| anyhow::anyhow!("{}: {what}", tj.display());
    t["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges list".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(x) => x
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge {x:?} is not \"a b\""))),
            serde_json::Value::Array(p) => match (p.first(), p.get(1), p.len()) {
                (Some(serde_json::Value::String(a)), Some(serde_json::Value::String(b)), 2) => {
                    Ok((a.clone(), b.clone()))
                }
                _ => Err(bad(format!("merge {m} is not [a, b]"))),
            },
            _ => Err(bad(format!("merge {m} is neither \"a b\" nor [a, b]"))),
        })
        .collect()
}

/// The GGUF pre-tokenizer name for a tokenizer.json `pre_tokenizer`.
fn pre_name(p: &serde_json::Value) -> Option<&'static str> {
    match p["type"].as_str()? {
        // llama.cpp's name for the GPT-2 split ("gpt2" is only the model type; llama.cpp
        // refuses it as a pre-tokenizer).
        "ByteLevel" if p["use_regex"].as_bool() != Some(false) => Some("gpt-2"),
        "Sequence" => {
            let items = p["pretokenizers"].as_array()?;
            let regex = items
                .iter()
                .find(|i| i["type"] == "Split")
                .and_then(|i| i["pattern"]["Regex"].as_str())?;
            let byte_level_last = items.last().is_some_and(|i| i["type"] == "ByteLevel");
            (byte_level_last
                && regex.starts_with("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"))
            .then_some("llama-bpe")
        }
        _ => None,
    }
}
