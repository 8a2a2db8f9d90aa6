//! `bitnet convert IN OUT --to gguf-i2s|gguf-tq2_0|gguf-tq1_0`: rewrite a model (any format
//! the loaders read: HF packed, bf16 masters, 1bitLLM, GGUF; or a hub id) as a GGUF file.
//! The tokenizer goes with it: the `tokenizer.ggml.*` keys of a GGUF input, or, for a
//! `tokenizer.json` input, a byte-level BPE expressed as GGUF `gpt2` tokens, types and merges.

use bitnet_inference::formats::ggml::GgmlType;
use bitnet_inference::formats::gguf::{GgufFile, GgufValue};
use bitnet_inference::model::save_gguf::{write_gguf, GgufExport};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The model to convert: GGUF file, model directory or Hugging Face hub id.
    input: PathBuf,
    /// The file to write.
    output: PathBuf,
    /// Output format: gguf-i2s (bitnet.cpp), gguf-tq2_0, gguf-tq1_0 (llama.cpp).
    #[arg(long)]
    to: String,
    /// Type of the token embedding (and an untied lm_head's dense fallback): f16, q8_0, f32.
    #[arg(long, default_value = "f16")]
    embedding_type: String,
    /// GGUF architecture string (default: bitnet-25 for I2_S, bitnet for TQ types).
    #[arg(long)]
    arch: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ternary_type = match a.to.as_str() {
        "gguf-i2s" => GgmlType::I2_S,
        "gguf-tq2_0" => GgmlType::TQ2_0,
        "gguf-tq1_0" => GgmlType::TQ1_0,
        "hf-packed" => anyhow::bail!(
            "--to hf-packed is not implemented yet; available: gguf-i2s, gguf-tq2_0, gguf-tq1_0"
        ),
        t => anyhow::bail!("--to {t}: expected gguf-i2s, gguf-tq2_0 or gguf-tq1_0"),
    };
    let embedding_type = match a.embedding_type.to_ascii_lowercase().as_str() {
        "f16" => GgmlType::F16,
        "f32" => GgmlType::F32,
        "q8_0" => GgmlType::Q8_0,
        t => anyhow::bail!("--embedding-type {t}: expected f16, q8_0 or f32"),
    };
    let input = super::resolve_model(&a.input)?;
    let m = bitnet_inference::model::load(&input)?;
    let tokenizer = tokenizer_metadata(&input, &m.generation)?;
    let arch = a.arch.clone().unwrap_or_else(|| {
        if ternary_type == GgmlType::I2_S {
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
    let res = write_gguf(
        &m.config,
        &m.weights,
        &tokenizer,
        &GgufExport {
            architecture: arch,
            ternary_type,
            embedding_type,
            name,
        },
        &tmp,
    );
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, &a.output)?;
    eprintln!(
        "wrote {} ({}, {} parameters)",
        a.output.display(),
        ternary_type.name(),
        m.weights.parameter_count()
    );
    Ok(())
}

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
            "{}: {what}; only byte-level BPE tokenizers (GPT-2, Llama-3 style) can be written \
             as GGUF metadata",
            tj.display()
        )
    };
    if model["type"] != "BPE" {
        return Err(bad(&format!("model type {}", model["type"])));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad("byte_fallback BPE (SentencePiece style)"));
    }
    let pre = pre_name(&t["pre_tokenizer"]).ok_or_else(|| {
        bad(&format!(
            "pre-tokenizer {} has no GGUF `tokenizer.ggml.pre` name known here",
            t["pre_tokenizer"]
        ))
    })?;
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: u64, tok: &str, ty: i32| -> anyhow::Result<()> {
        let i = usize::try_from(id)?;
        if i > 10_000_000 {
            anyhow::bail!("{}: token id {id} out of range", tj.display());
        }
        if tokens.len() <= i {
            tokens.resize(i + 1, None);
            types.resize(i + 1, 1);
        }
        tokens[i] = Some(tok.to_string());
        types[i] = ty;
        Ok(())
    };
    for (tok, id) in vocab {
        put(
            id.as_u64()
                .ok_or_else(|| bad("a vocab id is not a number"))?,
            tok,
            1,
        )?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let id = a["id"]
            .as_u64()
            .ok_or_else(|| bad("an added token has no id"))?;
        let content = a["content"]
            .as_str()
            .ok_or_else(|| bad("an added token has no content"))?;
        let ty = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        put(id, content, ty)?;
    }
    let n = tokens.len();
    let tokens: Vec<GgufValue> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.map(|t| s(&t)).unwrap_or_else(|| s(&format!("[PAD{i}]"))))
        .collect();
    let merges: Vec<GgufValue> = model["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(x) => Ok(s(x)),
            serde_json::Value::Array(p) if p.len() == 2 => Ok(s(&format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            _ => Err(bad("a merge is neither \"a b\" nor [a, b]")),
        })
        .collect::<anyhow::Result<_>>()?;
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s(pre)),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(tokens),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
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
    let cfg: serde_json::Value = std::fs::read_to_string(path.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(b) = cfg["add_bos_token"].as_bool() {
        meta.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(b)));
    }
    Ok(meta)
}

/// The GGUF pre-tokenizer name for a tokenizer.json `pre_tokenizer`.
fn pre_name(p: &serde_json::Value) -> Option<&'static str> {
    match p["type"].as_str()? {
        "ByteLevel" if p["use_regex"].as_bool() != Some(false) => Some("gpt2"),
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
