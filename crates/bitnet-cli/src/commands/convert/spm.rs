//! SentencePiece (`llama`) vocabularies both ways: GGUF `tokenizer.ggml.*` (tokens, scores,
//! token types) ⇄ the `tokenizer.json` Hugging Face writes for Llama-2 (`LlamaTokenizerFast`: a
//! BPE with byte fallback, `▁` for spaces, a `▁` prefix).
//!
//! The two encoders are different algorithms that agree when scores and merges give the same
//! order. llama.cpp's SentencePiece BPE repeatedly joins the adjacent pair whose joined text is
//! the best-scoring token; Hugging Face's BPE joins the adjacent pair whose merge comes first in
//! `merges`. So:
//! - GGUF → tokenizer.json: a merge `a b` for every token `a+b` whose two halves are tokens,
//!   ordered by the joined token's score, best first; ties keep the joined token's id order, and
//!   the merges of one token are ordered by the halves' ids. That is the order of transformers'
//!   `SentencePieceExtractor` that wrote Llama-2's published tokenizer.json (newer transformers
//!   also put longer left halves first among equal scores).
//! - tokenizer.json → GGUF: a token made by a merge scores minus the rank of its first merge;
//!   every other token (characters, bytes, specials) scores below all merges, in id order.
//!   (llama.cpp's own `LlamaHfVocab` gives every token -1000, which loses the merge order.)

use super::{generation_config_json, special_text, template_processing, JsonVocab};
use anyhow::{anyhow, bail, Result};
use bitnet_inference::formats::gguf::{GgufMetadata, GgufValue, MetadataReader, MetadataView};
use bitnet_inference::model::GenerationDefaults;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// SentencePiece's space.
const SPACE: &str = "\u{2581}";

// GGUF token types (llama.cpp `llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_UNKNOWN: i32 = 2;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_UNUSED: i32 = 5;
const TT_BYTE: i32 = 6;

/// The merges a SentencePiece vocabulary implies, as `(left id, right id)`: one for every way
/// to cut a token into two tokens, best-scoring joined token first (see the module comment).
/// A text spelled by several ids belongs to the last of them, as in llama.cpp.
pub(super) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(u32, u32)> {
    let ids: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // (score of the joined token, left, right)
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if ids.get(t.as_str()) != Some(&(i as u32)) {
            continue;
        }
        let start = merges.len();
        for (cut, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&t[..cut]), ids.get(&t[cut..])) {
                merges.push((scores[i], l, r));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r)| (l, r));
    }
    // Stable: equal scores keep the id order built above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, l, r)| (l, r)).collect()
}

/// Scores under which llama.cpp's SentencePiece joins pairs in the order of `merges`: minus
/// the rank of a token's first merge; tokens no merge makes score below every merge.
pub(super) fn scores_from_merges(
    tokens: &[String],
    merges: &[(String, String)],
) -> std::result::Result<Vec<f32>, String> {
    // f32 holds every integer up to 2^24 exactly; beyond that two ranks could share a score.
    if merges.len() + tokens.len() > 1 << 24 {
        return Err(format!(
            "{} merges and {} tokens are too many for exact f32 scores",
            merges.len(),
            tokens.len()
        ));
    }
    let mut first: HashMap<String, usize> = HashMap::with_capacity(merges.len());
    for (rank, (a, b)) in merges.iter().enumerate() {
        first.entry(format!("{a}{b}")).or_insert(rank);
    }
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(id, t)| match first.get(t) {
            Some(&rank) => 0.0 - rank as f32,
            None => -((merges.len() + id) as f32),
        })
        .collect())
}

/// Whether a `<0xNN>` byte token.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// How a Llama-2 style tokenizer.json turns spaces into `▁`: `Some(add_space_prefix)`, or an
/// error naming what llama.cpp's SentencePiece cannot do.
fn space_prefix(tj: &Path, t: &Value) -> Result<bool> {
    let bad = |what: String| {
        anyhow!(
            "{}: {what}; a GGUF SentencePiece (`llama`) vocabulary can only replace spaces by \
             \"▁\" (normalizer Replace or pre-tokenizer Metaspace without split) and prepend \
             one \"▁\" (normalizer Prepend or Metaspace's prepend_scheme)",
            tj.display()
        )
    };
    let mut prefix = false;
    let mut replaces = false;
    let norm = &t["normalizer"];
    let norms: Vec<&Value> = match norm["type"].as_str() {
        None if norm.is_null() => Vec::new(),
        Some("Sequence") => norm["normalizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![norm],
    };
    for n in norms {
        match n["type"].as_str() {
            Some("Prepend") if n["prepend"] == SPACE => prefix = true,
            Some("Replace") if n["pattern"]["String"] == " " && n["content"] == SPACE => {
                replaces = true
            }
            _ => return Err(bad(format!("normalizer {n}"))),
        }
    }
    let pre = &t["pre_tokenizer"];
    match pre["type"].as_str() {
        None if pre.is_null() => {}
        Some("Metaspace") if pre["replacement"] == SPACE => {
            // Before tokenizers 0.19 Metaspace had no `split` and always split at spaces.
            if pre["split"].as_bool() != Some(false) {
                return Err(bad(format!(
                    "pre-tokenizer {pre} splits the text at spaces (llama.cpp does not)"
                )));
            }
            replaces = true;
            let prepends = match pre["prepend_scheme"].as_str() {
                Some("never") => false,
                Some(_) => true,
                None => pre["add_prefix_space"].as_bool().unwrap_or(true),
            };
            if prepends {
                // Metaspace prepends "▁" only where the text does not start with one ("first":
                // and not after special tokens); llama.cpp always does.
                eprintln!(
                    "note: {}: the Metaspace pre-tokenizer adds no \"▁\" to a text that starts \
                     with a space; llama.cpp's SentencePiece (add_space_prefix) always does, so \
                     such texts tokenize differently",
                    tj.display()
                );
            }
            prefix |= prepends;
        }
        _ => return Err(bad(format!("pre-tokenizer {pre}"))),
    }
    if !replaces {
        return Err(bad("spaces are not turned into \"▁\"".into()));
    }
    Ok(prefix)
}

/// The special tokens a tokenizer.json post-processor puts first and last in a single sequence.
fn template_ends(p: &Value) -> (Option<String>, Option<String>) {
    match p["type"].as_str() {
        Some("TemplateProcessing") => {
            let single = p["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let special = |v: Option<&Value>| {
                v.and_then(|v| v["SpecialToken"]["id"].as_str().map(String::from))
            };
            (special(single.first()), special(single.last()))
        }
        Some("Sequence") => p["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(template_ends)
            .find(|e| e.0.is_some() || e.1.is_some())
            .unwrap_or((None, None)),
        _ => (None, None),
    }
}

/// `tokenizer.ggml.*` metadata (model `llama`) for a byte_fallback BPE tokenizer.json `t` read
/// from `tj`, with its `tokenizer_config.json` `cfg` (or `Null`).
pub(super) fn gguf_metadata(
    tj: &Path,
    t: &Value,
    vocab: JsonVocab,
    merges: &[(String, String)],
    cfg: &Value,
    generation: &GenerationDefaults,
) -> Result<Vec<(String, GgufValue)>> {
    let add_space_prefix = space_prefix(tj, t)?;
    let n = vocab.tokens.len();
    let mut types = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let unk_text = t["model"]["unk_token"].as_str();
    for (i, (tok, special)) in vocab.tokens.into_iter().zip(vocab.special).enumerate() {
        let Some(tok) = tok else {
            tokens.push(format!("[PAD{i}]"));
            types.push(TT_UNUSED);
            continue;
        };
        types.push(match special {
            _ if Some(tok.as_str()) == unk_text => TT_UNKNOWN,
            Some(true) => TT_CONTROL,
            Some(false) => TT_USER_DEFINED,
            None if is_byte_token(&tok) => TT_BYTE,
            None => TT_NORMAL,
        });
        tokens.push(tok);
    }
    if !types.contains(&TT_BYTE) {
        bail!(
            "{}: byte_fallback is set but the vocabulary has no <0xNN> byte tokens",
            tj.display()
        );
    }
    let scores =
        scores_from_merges(&tokens, merges).map_err(|e| anyhow!("{}: {e}", tj.display()))?;

    // SentencePiece joins every adjacent pair that spells a token; Hugging Face only the pairs
    // in `merges`. Where the file leaves such pairs out the two can disagree: say so.
    let given: HashSet<(&str, &str)> = merges
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let missing = merges_from_scores(&tokens, &scores)
        .into_iter()
        .filter(|&(l, r)| {
            !given.contains(&(tokens[l as usize].as_str(), tokens[r as usize].as_str()))
        })
        .count();
    if missing > 0 {
        eprintln!(
            "note: {}: {missing} pairs of tokens spell a token but have no merge; llama.cpp's \
             SentencePiece joins them too, Hugging Face does not, so some texts can tokenize \
             differently",
            tj.display()
        );
    }

    let id_of = |text: Option<String>| {
        text.and_then(|s| tokens.iter().rposition(|t| *t == s))
            .map(|i| i as u32)
    };
    let unk = id_of(unk_text.map(String::from));
    let bos = generation
        .bos_token_id
        .filter(|&b| (b as usize) < n)
        .or_else(|| id_of(special_text(&cfg["bos_token"])));
    let eos = generation
        .eos_token_ids
        .first()
        .copied()
        .filter(|&e| (e as usize) < n)
        .or_else(|| id_of(special_text(&cfg["eos_token"])));
    let (first, last) = template_ends(&t["post_processor"]);
    let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let add_bos = cfg["add_bos_token"]
        .as_bool()
        .unwrap_or(first.is_some() && first == text_of(bos));
    let add_eos = cfg["add_eos_token"]
        .as_bool()
        .unwrap_or(last.is_some() && last == text_of(eos));

    let s = |v: &str| GgufValue::String(v.into());
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), s("llama")),
        (
            "tokenizer.ggml.tokens".to_string(),
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            GgufValue::Array(scores.into_iter().map(GgufValue::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
        ),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", unk),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), GgufValue::U32(id)));
        }
    }
    if let Some(&e) = generation
        .eos_token_ids
        .get(1)
        .filter(|&&e| (e as usize) < n)
    {
        meta.push(("tokenizer.ggml.eot_token_id".into(), GgufValue::U32(e)));
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(add_bos),
    ));
    meta.push((
        "tokenizer.ggml.add_eos_token".into(),
        GgufValue::Bool(add_eos),
    ));
    meta.push((
        "tokenizer.ggml.add_space_prefix".into(),
        GgufValue::Bool(add_space_prefix),
    ));
    Ok(meta)
}

/// What a GGUF-to-SentencePiece conversion reads from the metadata (through the library's
/// one typed reader), with errors that say what the value is needed for.
struct Meta<'a> {
    view: MetadataView<'a>,
}

impl Meta<'_> {
    fn err(&self, key: &str, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: {key}: {what} (needed to write a SentencePiece tokenizer.json)",
            self.view.path.display()
        )
    }

    fn read<T>(&self, r: bitnet_inference::Result<T>) -> Result<T> {
        r.map_err(|e| anyhow!("{e} (needed to write a SentencePiece tokenizer.json)"))
    }

    fn id(&self, key: &str, n: usize) -> Result<Option<usize>> {
        match self.read(self.view.opt_u64(key))? {
            None => Ok(None),
            Some(i) if i < n as u64 => Ok(Some(i as usize)),
            Some(i) => Err(self.err(key, format!("{i} is not a token id below {n}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.read(self.view.opt_bool(key))?.unwrap_or(default))
    }
}

/// `tokenizer.json` and `tokenizer_config.json` (Llama-2's form) for a GGUF `llama`
/// vocabulary read from `path`.
pub(super) fn tokenizer_files(
    path: &Path,
    meta: &GgufMetadata,
    generation: &GenerationDefaults,
) -> Result<Vec<(String, Vec<u8>)>> {
    let m = Meta {
        view: MetadataView {
            metadata: meta,
            path,
        },
    };
    let tokens: Vec<String> = m
        .read(m.view.get_str_array("tokenizer.ggml.tokens"))?
        .into_iter()
        .map(str::to_string)
        .collect();
    let n = tokens.len();
    let scores = m.read(m.view.get_f32_array("tokenizer.ggml.scores"))?;
    if scores.len() != n {
        return Err(m.err(
            "tokenizer.ggml.scores",
            format!("{} scores for {n} tokens", scores.len()),
        ));
    }
    let types: Vec<i64> = match m.read(m.view.opt_i32_array("tokenizer.ggml.token_type"))? {
        None => vec![TT_NORMAL.into(); n],
        Some(t) => t.into_iter().map(i64::from).collect(),
    };
    if types.len() != n {
        return Err(m.err(
            "tokenizer.ggml.token_type",
            format!("{} types for {n} tokens", types.len()),
        ));
    }
    let unk = m
        .id("tokenizer.ggml.unknown_token_id", n)?
        .or_else(|| types.iter().position(|&t| t == TT_UNKNOWN as i64))
        .ok_or_else(|| {
            m.err(
                "tokenizer.ggml.unknown_token_id",
                "missing, and no token has type 2 (unknown); a byte-fallback BPE needs one",
            )
        })?;
    let bos = m.id("tokenizer.ggml.bos_token_id", n)?;
    let eos = m.id("tokenizer.ggml.eos_token_id", n)?;
    let add_bos = m.bool_or("tokenizer.ggml.add_bos_token", true)?;
    let add_eos = m.bool_or("tokenizer.ggml.add_eos_token", false)?;
    let add_space_prefix = m.bool_or("tokenizer.ggml.add_space_prefix", true)?;
    if !types.contains(&i64::from(TT_BYTE)) {
        return Err(m.err(
            "tokenizer.ggml.token_type",
            "no byte (<0xNN>, type 6) tokens; Hugging Face's byte fallback needs them",
        ));
    }

    let mut vocab = serde_json::Map::with_capacity(n);
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(tok.clone(), json!(id));
        let ty = ty as i32;
        if matches!(ty, TT_UNKNOWN | TT_CONTROL | TT_USER_DEFINED) {
            // Matched in the raw text, as llama.cpp does; user-defined ones are not special.
            added.push(json!({"id": id, "content": tok, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false,
                "special": ty != TT_USER_DEFINED}));
        }
    }
    let merges: Vec<Value> = merges_from_scores(&tokens, &scores)
        .into_iter()
        .map(|(l, r)| json!([tokens[l as usize], tokens[r as usize]]))
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let named = |id: Option<usize>| id.map(|i| (tokens[i].as_str(), i));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": null,
        "post_processor": template_processing(
            named(bos.filter(|_| add_bos)),
            named(eos.filter(|_| add_eos)),
        ),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": tokens[unk],
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let mut cfg = json!({
        "add_bos_token": add_bos, "add_eos_token": add_eos, "unk_token": tokens[unk],
        // Llama-2's settings: a space prefix after special tokens too (as llama.cpp), and
        // decoded text left as it is.
        "legacy": true, "clean_up_tokenization_spaces": false,
        "tokenizer_class": "LlamaTokenizerFast",
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores_then_ids() {
        // "abc" can be cut two ways; both merges sit at its score, left half's id first.
        let tokens = toks(&["a", "b", "c", "bc", "ab", "abc", "ca"]);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -1.5, -3.0];
        let m = merges_from_scores(&tokens, &scores);
        assert_eq!(m, vec![(1, 2), (0, 3), (4, 2), (0, 1), (2, 0)]);
        // And back: the scores keep that order.
        let pairs: Vec<(String, String)> = m
            .iter()
            .map(|&(l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
            .collect();
        let s = scores_from_merges(&tokens, &pairs).unwrap();
        assert_eq!(s, vec![-5.0, -6.0, -7.0, 0.0, -3.0, -1.0, -4.0]);
        assert_eq!(merges_from_scores(&tokens, &s), m);
    }

    #[test]
    fn byte_tokens_are_recognised() {
        assert!(is_byte_token("<0x0A>"));
        assert!(is_byte_token("<0xff>"));
        assert!(!is_byte_token("<0xG0>"));
        assert!(!is_byte_token("<0x0A"));
    }
}
