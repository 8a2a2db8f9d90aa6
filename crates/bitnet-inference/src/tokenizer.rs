//! Text to token ids and back: Hugging Face `tokenizer.json` (the `tokenizers` crate) or the
//! vocabulary in GGUF metadata (BPE `gpt2` with its pre-tokenizer variants, SentencePiece
//! `llama`).
//!
//! API the rest of the crate uses (keep these names and signatures):
//! - `Tokenizer::from_file(path)`; `Tokenizer::from_gguf(&GgufMetadata, path)`
//! - `encode(text, add_special) -> Result<Vec<u32>>`: `add_special` adds BOS (and whatever the
//!   model's post-processor adds) only when the model asks for it. Special tokens written in
//!   the text (`<|eot_id|>`, `<|im_start|>`, ...) are always recognised; use
//!   [`Tokenizer::encode_with`] with `parse_special = false` to treat them as plain text.
//! - `decode(ids) -> Result<String>`; `token_bytes(id) -> Vec<u8>` (raw bytes of one token,
//!   for streaming); `vocab_size()`; `bos_id()`; `eos_ids()`; `describe()` for inspect;
//!   `token_id(text)` for a special token's id.
//!
//! `decode(ids)` is exactly the (lossy UTF-8) concatenation of `token_bytes` of the ids, special
//! tokens included as their text, so streaming by bytes and decoding at once always agree.
//!
//! GGUF vocabularies follow llama.cpp (`llama-vocab.cpp`): the `gpt2` model is rebuilt as a
//! `tokenizers` byte-level BPE with llama.cpp's pre-tokenizer regexes for `tokenizer.ggml.pre`;
//! the `llama` model runs llama.cpp's SentencePiece algorithm (merge the best-scoring adjacent
//! pair that is a token, byte fallback through `<0xNN>`, `▁` for spaces, a space prefix).

use crate::formats::gguf::{GgufMetadata, MetadataReader, MetadataView};
use crate::{Error, Result};
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::OnceLock;
use tokenizers as hf;

/// Token texts that end generation in the model families we run, added to `eos_ids` when the
/// vocabulary has them.
const END_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "</s>",
    "<|endoftext|>",
];

/// Token texts used as BOS when no configuration names one.
const BOS_TOKENS: &[&str] = &["<|begin_of_text|>", "<s>", "<|startoftext|>"];

// GGUF token types (llama.cpp `llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_UNKNOWN: i32 = 2;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_BYTE: i32 = 6;

enum Model {
    /// A `tokenizers` tokenizer (from `tokenizer.json`, or rebuilt from a GGUF `gpt2` vocab).
    /// The second one, made on first use, treats special tokens in the text as plain text.
    Hf {
        tk: Box<hf::Tokenizer>,
        literal: OnceLock<Box<hf::Tokenizer>>,
    },
    Spm(Box<Spm>),
}

pub struct Tokenizer {
    model: Model,
    /// Raw bytes of every token id (empty for ids the vocabulary leaves unused).
    pieces: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// BOS/EOS added by `encode` itself (GGUF vocabularies); `tokenizer.json` models add them
    /// through their post-processor instead.
    add_bos: bool,
    add_eos: bool,
    /// `tokenizer.json` models: whether their post-processor puts BOS first when special
    /// tokens are added (found by encoding a sample, so whatever the processor's form).
    post_adds_bos: bool,
    description: String,
    /// The longest piece in bytes (computed on first use).
    max_piece: OnceLock<usize>,
    /// Control tokens (BOS, EOS, chat markers: added tokens marked special, GGUF control and
    /// unknown types), sorted; their text is a name, not output.
    special: Vec<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`; reads `tokenizer_config.json` and `generation_config.json` from
    /// the same folder when they exist.
    pub fn from_file(path: &Path) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        Self::from_file_with_config(path, config.as_deref())
    }

    /// Loads `tokenizer.json` with an explicit `tokenizer_config.json` (or none);
    /// `generation_config.json` next to the tokenizer is still read when present.
    pub fn from_file_with_config(path: &Path, config: Option<&Path>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let tk: hf::Tokenizer = text
            .parse()
            .map_err(|e| Error::format(path, format!("not a tokenizer.json: {e}")))?;
        let mode = piece_mode(&json);
        let added = tk.get_added_tokens_decoder();
        let vocab = tk.get_vocab(true);
        let n = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
        // One piece per id up to the largest: ids may leave a few gaps, but the table must
        // stay in proportion to the tokens the file really holds (a single id of 4e9
        // would otherwise cost ~100 GB).
        let limit = vocab.len().saturating_mul(2).saturating_add(1024);
        if n > limit {
            return Err(Error::format(
                path,
                format!(
                    "token ids go up to {} but the file has only {} tokens: ids that sparse are not supported (at most {limit})",
                    n - 1,
                    vocab.len()
                ),
            ));
        }
        let mut pieces = vec![Vec::new(); n];
        for (id, piece) in pieces.iter_mut().enumerate() {
            let id = id as u32;
            if let Some(a) = added.get(&id) {
                *piece = a.content.as_bytes().to_vec();
            } else if let Some(t) = tk.id_to_token(id) {
                *piece = mode.bytes(&t);
            }
        }

        let mut bos_text: Option<String> = None;
        let mut eos_texts: Vec<String> = Vec::new();
        if let Some(cfg) = config {
            let c = read_json(cfg)?;
            bos_text = special_text(c.get("bos_token"));
            eos_texts.extend(special_text(c.get("eos_token")));
        }
        let mut bos = bos_text.as_deref().and_then(|t| tk.token_to_id(t));
        let mut eos: Vec<u32> = eos_texts.iter().filter_map(|t| tk.token_to_id(t)).collect();
        let gen = path
            .parent()
            .unwrap_or(Path::new("."))
            .join("generation_config.json");
        if gen.is_file() {
            let g = read_json(&gen)?;
            if let Some(b) = g.get("bos_token_id").and_then(|v| v.as_u64()) {
                bos = Some(checked_id(&gen, "bos_token_id", b, n)?);
            }
            match g.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => {
                    for v in a {
                        let x = v.as_u64().ok_or_else(|| {
                            Error::config(&gen, "eos_token_id", "expected integers")
                        })?;
                        eos.push(checked_id(&gen, "eos_token_id", x, n)?);
                    }
                }
                Some(v) => {
                    if let Some(x) = v.as_u64() {
                        eos.push(checked_id(&gen, "eos_token_id", x, n)?);
                    }
                }
                None => {}
            }
        }
        if bos.is_none() {
            bos = BOS_TOKENS.iter().find_map(|t| tk.token_to_id(t));
        }
        for t in END_TOKENS {
            eos.extend(tk.token_to_id(t));
        }
        dedup(&mut eos);
        let post_adds_bos = bos.is_some_and(|b| {
            let first = |special| {
                tk.encode_fast("a", special)
                    .ok()
                    .and_then(|e| e.get_ids().first().copied())
            };
            first(true) == Some(b) && first(false) != Some(b)
        });
        let mut special: Vec<u32> = added
            .iter()
            .filter(|(_, a)| a.special)
            .map(|(&id, _)| id)
            .chain(bos)
            .chain(eos.iter().copied())
            .collect();
        special.sort_unstable();
        special.dedup();
        let model_type = json["model"]["type"].as_str().unwrap_or("?").to_string();
        let description = format!(
            "tokenizer.json ({}) {model_type}, {} tokens",
            path.display(),
            pieces.len()
        );
        Ok(Tokenizer {
            model: Model::Hf {
                tk: Box::new(tk),
                literal: OnceLock::new(),
            },
            pieces,
            bos,
            eos,
            add_bos: false,
            add_eos: false,
            post_adds_bos,
            description,
            max_piece: OnceLock::new(),
            special,
        })
    }

    /// Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`). `path` names the file
    /// in errors.
    pub fn from_gguf(meta: &GgufMetadata, path: &Path) -> Result<Self> {
        let m = MetadataView {
            metadata: meta,
            path,
        };
        let kind = m.get_str("tokenizer.ggml.model")?.to_string();
        let tokens = owned(m.get_str_array("tokenizer.ggml.tokens")?);
        let n = tokens.len();
        if n == 0 {
            return Err(Error::config(
                path,
                "tokenizer.ggml.tokens",
                "empty vocabulary",
            ));
        }
        let types = match m.opt_i32_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() != n => {
                return Err(Error::config(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {n} tokens", t.len()),
                ))
            }
            Some(t) => t,
            None => vec![TT_NORMAL; n],
        };
        let id_key = |key: &str| -> Result<Option<u32>> {
            match m.opt_u64(key)? {
                None => Ok(None),
                Some(v) => checked_id(path, key, v, n).map(Some),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let mut eos: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            eos.extend(id_key(key)?);
        }
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;

        let (model, pieces, default_add_bos, what) = match kind.as_str() {
            "gpt2" => {
                let merges = owned(m.get_str_array("tokenizer.ggml.merges")?);
                let pre = m.opt_str("tokenizer.ggml.pre")?.unwrap_or_default();
                let (regexes, ignore_merges, add_bos) = pre_tokenizer(pre).ok_or_else(|| {
                    Error::config(
                        path,
                        "tokenizer.ggml.pre",
                        format!("unknown pre-tokenizer `{pre}`"),
                    )
                })?;
                let tk =
                    build_byte_level_bpe(path, &tokens, &types, &merges, regexes, ignore_merges)?;
                let table = byte_level_inverse();
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, &ty)| {
                        if ty == TT_NORMAL {
                            byte_level_bytes(t, table).unwrap_or_else(|| t.as_bytes().to_vec())
                        } else {
                            t.as_bytes().to_vec()
                        }
                    })
                    .collect();
                let model = Model::Hf {
                    tk: Box::new(tk),
                    literal: OnceLock::new(),
                };
                (model, pieces, add_bos, format!("gpt2 BPE (pre `{pre}`)"))
            }
            "llama" => {
                let scores = m.get_f32_array("tokenizer.ggml.scores")?;
                if scores.len() != n {
                    return Err(Error::config(
                        path,
                        "tokenizer.ggml.scores",
                        format!("{} entries for {n} tokens", scores.len()),
                    ));
                }
                let add_space_prefix = m
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let spm = Spm::new(tokens.clone(), scores, types.clone(), unk, add_space_prefix)
                    .map_err(|msg| Error::config(path, "tokenizer.ggml.tokens", msg))?;
                let pieces = tokens
                    .iter()
                    .zip(&types)
                    .map(|(t, &ty)| match (ty, parse_byte_token(t)) {
                        (TT_BYTE, Some(b)) => vec![b],
                        (TT_CONTROL | TT_UNKNOWN, _) => t.as_bytes().to_vec(),
                        _ => t.replace('\u{2581}', " ").into_bytes(),
                    })
                    .collect();
                (
                    Model::Spm(Box::new(spm)),
                    pieces,
                    true,
                    "SentencePiece (llama)".to_string(),
                )
            }
            other => {
                return Err(Error::config(
                    path,
                    "tokenizer.ggml.model",
                    format!("unsupported tokenizer model `{other}` (expected `gpt2` or `llama`)"),
                ))
            }
        };
        let add_bos = m
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let add_eos = m.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(Error::config(
                path,
                "tokenizer.ggml.bos_token_id",
                "missing, but add_bos_token is true",
            ));
        }
        if add_eos && eos.is_empty() {
            return Err(Error::config(
                path,
                "tokenizer.ggml.eos_token_id",
                "missing, but add_eos_token is true",
            ));
        }
        let mut special: Vec<u32> = (0..n as u32)
            .filter(|&i| matches!(types[i as usize], TT_CONTROL | TT_UNKNOWN))
            .chain(bos)
            .chain(eos.iter().copied())
            .collect();
        special.sort_unstable();
        special.dedup();
        let mut tok = Tokenizer {
            model,
            pieces,
            bos,
            eos,
            add_bos,
            add_eos,
            post_adds_bos: false,
            description: format!("GGUF {what}, {n} tokens"),
            max_piece: OnceLock::new(),
            special,
        };
        let extra: Vec<u32> = END_TOKENS.iter().filter_map(|t| tok.token_id(t)).collect();
        tok.special.extend_from_slice(&extra);
        tok.special.sort_unstable();
        tok.special.dedup();
        tok.eos.extend(extra);
        dedup(&mut tok.eos);
        Ok(tok)
    }

    /// Encodes `text`; special tokens written in it are recognised.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special, true)
    }

    /// Encodes `text`. `add_special`: add BOS/EOS as the model asks. `parse_special`: recognise
    /// control tokens written in the text (user-defined added tokens are always recognised, as
    /// in llama.cpp and `tokenizers`).
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Hf { tk, literal } => {
                let tk: &hf::Tokenizer = if parse_special {
                    tk
                } else {
                    literal.get_or_init(|| {
                        let mut t = tk.clone();
                        t.set_encode_special_tokens(true);
                        t
                    })
                };
                let enc = tk
                    .encode_fast(text, add_special)
                    .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
                out.extend_from_slice(enc.get_ids());
            }
            Model::Spm(spm) => spm.encode(text, parse_special, &mut out)?,
        }
        if add_special && self.add_eos {
            out.extend(self.eos.first());
        }
        Ok(out)
    }

    /// The most bytes of text that could still encode to `max_tokens` tokens or fewer: no
    /// token covers more than the longest piece of the vocabulary, and normalizers rarely
    /// shrink text, so twice `max_tokens` × the longest piece (plus a little) is an upper
    /// bound on what fits. Longer texts can be refused without tokenizing them, which costs
    /// ~100 bytes of memory per byte of text.
    pub fn max_text_bytes(&self, max_tokens: usize) -> usize {
        let longest = *self
            .max_piece
            .get_or_init(|| self.pieces.iter().map(Vec::len).max().unwrap_or(1).max(1));
        max_tokens
            .saturating_mul(longest)
            .saturating_mul(2)
            .saturating_add(64)
    }

    /// [`Self::encode`] for a text that must fit in `max_tokens` tokens (a prompt and the
    /// context it must fit): one too long by its length in bytes is refused before it is
    /// tokenized (see [`Self::max_text_bytes`]), and one of more tokens after.
    pub fn encode_within(
        &self,
        text: &str,
        add_special: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>> {
        let max_bytes = self.max_text_bytes(max_tokens);
        if text.len() > max_bytes {
            return Err(Error::Invalid(format!(
                "the text of {} bytes cannot fit in {max_tokens} tokens (at most {max_bytes} \
                 bytes can, with this vocabulary); refused before tokenizing",
                text.len()
            )));
        }
        let ids = self.encode(text, add_special)?;
        if ids.len() > max_tokens {
            return Err(Error::Invalid(format!(
                "the text is {} tokens, more than the {max_tokens} allowed",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// The concatenated bytes of the tokens as UTF-8 (invalid sequences become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let p = self.pieces.get(id as usize).ok_or_else(|| {
                Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.pieces.len()
                ))
            })?;
            bytes.extend_from_slice(p);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The raw bytes token `id` stands for (empty for an id outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.pieces.get(id as usize).cloned().unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether `id` is a control token (BOS, EOS, a chat marker): its text names it, it is
    /// not text the model writes.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    /// Every id that ends generation (EOS, EOT, EOM and the known end tokens in the vocab).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The id of the token whose text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        match &self.model {
            Model::Hf { tk, .. } => tk.token_to_id(text),
            Model::Spm(spm) => spm.map.get(text).copied(),
        }
    }

    /// Whether `encode(_, true)` puts BOS first: GGUF vocabularies with `add_bos_token` (or
    /// their pre-tokenizer's default), `tokenizer.json` models whose post-processor adds it.
    pub fn adds_bos(&self) -> bool {
        self.add_bos || self.post_adds_bos
    }

    pub fn describe(&self) -> String {
        let name = |id: u32| String::from_utf8_lossy(&self.token_bytes(id)).into_owned();
        let bos = self
            .bos
            .map_or("none".to_string(), |b| format!("{b} {:?}", name(b)));
        let eos: Vec<String> = self
            .eos
            .iter()
            .map(|&e| format!("{e} {:?}", name(e)))
            .collect();
        format!(
            "{}; bos {bos}; end tokens [{}]; adds bos: {}",
            self.description,
            eos.join(", "),
            self.adds_bos()
        )
    }
}

fn dedup(v: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(*x));
}

fn checked_id(path: &Path, key: &str, v: u64, n: usize) -> Result<u32> {
    if (v as u128) < n as u128 {
        Ok(v as u32)
    } else {
        Err(Error::config(
            path,
            key,
            format!("token id {v} is outside the vocabulary of {n} tokens"),
        ))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// `"bos_token": "<s>"` or `"bos_token": {"content": "<s>", ...}`.
fn special_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// How a `tokenizer.json` vocabulary entry maps to bytes.
#[derive(Clone, Copy)]
enum PieceMode {
    /// GPT-2 byte-level alphabet.
    ByteLevel,
    /// SentencePiece-style: `▁` is a space, `<0xNN>` is a byte.
    Metaspace,
    Raw,
}

impl PieceMode {
    fn bytes(self, t: &str) -> Vec<u8> {
        match self {
            PieceMode::ByteLevel => {
                byte_level_bytes(t, byte_level_inverse()).unwrap_or_else(|| t.as_bytes().to_vec())
            }
            PieceMode::Metaspace => match parse_byte_token(t) {
                Some(b) => vec![b],
                None => t.replace('\u{2581}', " ").into_bytes(),
            },
            PieceMode::Raw => t.as_bytes().to_vec(),
        }
    }
}

fn piece_mode(json: &serde_json::Value) -> PieceMode {
    let dec = json["decoder"].to_string();
    if dec.contains("\"ByteLevel\"") {
        PieceMode::ByteLevel
    } else if dec.contains("\"ByteFallback\"")
        || dec.contains("\"Metaspace\"")
        || json["model"]["byte_fallback"].as_bool() == Some(true)
    {
        PieceMode::Metaspace
    } else {
        PieceMode::Raw
    }
}

/// `<0xNN>` → the byte.
fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The GPT-2 byte-to-character table, inverted: printable Latin-1 bytes stand for themselves,
/// the other 68 bytes are shifted to U+0100.. in byte order.
fn byte_level_inverse() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut m = HashMap::with_capacity(256);
        let mut shifted = 0u32;
        for b in 0u32..256 {
            let printable = (0x21..=0x7e).contains(&b)
                || (0xa1..=0xac).contains(&b)
                || (0xae..=0xff).contains(&b);
            let c = if printable {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            if let Some(ch) = char::from_u32(c) {
                m.insert(ch, b as u8);
            }
        }
        m
    })
}

fn byte_level_bytes(t: &str, table: &HashMap<char, u8>) -> Option<Vec<u8>> {
    t.chars().map(|c| table.get(&c).copied()).collect()
}

// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BLOOM: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// Regexes (applied in turn, each splitting the pieces of the last), whether merges are skipped
/// for words in the vocabulary, and whether BOS is added by default.
fn pre_tokenizer(pre: &str) -> Option<(&'static [&'static str], bool, bool)> {
    Some(match pre {
        "" | "default" => (
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (&[RE_LLAMA3], true, true),
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => (&[RE_LLAMA3], false, false),
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en"
        | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" => (&[RE_GPT2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (&[r"\p{N}", RE_GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => (&[RE_QWEN2], false, false),
        "falcon" => (
            &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "tekken" => (&[RE_TEKKEN], true, true),
        "gpt-4o" | "llama4" => (&[RE_GPT4O], false, false),
        "poro-chat" | "bloom" | "gpt3-finnish" => (&[RE_BLOOM], false, false),
        _ => return None,
    })
}

fn build_byte_level_bpe(
    path: &Path,
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    regexes: &[&str],
    ignore_merges: bool,
) -> Result<hf::Tokenizer> {
    use hf::models::bpe::BPE;
    use hf::pre_tokenizers::byte_level::ByteLevel;
    use hf::pre_tokenizers::sequence::Sequence;
    use hf::pre_tokenizers::split::{Split, SplitPattern};
    use hf::pre_tokenizers::PreTokenizerWrapper;
    use hf::{AddedToken, SplitDelimiterBehavior};

    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::config(
                path,
                "tokenizer.ggml.merges",
                format!("entry {i} `{m}` is not two tokens separated by a space"),
            )
        })?;
        pairs.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<hf::models::bpe::Vocab>(), pairs)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::config(path, "tokenizer.ggml.merges", e.to_string()))?;
    let mut tk = hf::Tokenizer::new(bpe);
    let mut pre: Vec<PreTokenizerWrapper> = Vec::new();
    for r in regexes {
        let split = Split::new(
            SplitPattern::Regex((*r).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex `{r}`: {e}")))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    tk.with_pre_tokenizer(Some(Sequence::new(pre)));
    tk.with_decoder(Some(hf::decoders::byte_level::ByteLevel::default()));
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (t, &ty) in tokens.iter().zip(types) {
        match ty {
            TT_CONTROL | TT_UNKNOWN => special.push(AddedToken::from(t.clone(), true)),
            TT_USER_DEFINED => user.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    tk.add_special_tokens(special)
        .map_err(|e| Error::Tokenizer(format!("{}: special tokens: {e}", path.display())))?;
    tk.add_tokens(user)
        .map_err(|e| Error::Tokenizer(format!("{}: added tokens: {e}", path.display())))?;
    Ok(tk)
}

/// llama.cpp's SentencePiece tokenizer over a GGUF `llama` vocabulary.
struct Spm {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    map: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    /// Control, unknown and user-defined tokens, longest text first.
    specials: Vec<u32>,
    add_space_prefix: bool,
}

enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}

#[derive(PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    // Highest score first; among equal scores the leftmost pair.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: Vec<i32>,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> std::result::Result<Self, String> {
        if u32::try_from(tokens.len()).is_err() {
            return Err(format!("{} tokens do not fit u32 ids", tokens.len()));
        }
        let mut map = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            map.insert(t.clone(), i as u32);
        }
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = map
                .get(&format!("<0x{b:02X}>"))
                .or_else(|| {
                    let c = char::from_u32(b as u32)?;
                    map.get(c.encode_utf8(&mut [0; 4]) as &str)
                })
                .copied();
        }
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(types[i as usize], TT_CONTROL | TT_UNKNOWN | TT_USER_DEFINED)
                    && !tokens[i as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        Ok(Spm {
            tokens,
            scores,
            types,
            map,
            byte_ids,
            unk,
            specials,
            add_space_prefix,
        })
    }

    fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) -> Result<()> {
        let mut frags = if text.is_empty() {
            Vec::new()
        } else {
            vec![Frag::Text(text)]
        };
        for &id in &self.specials {
            if !parse_special && self.types[id as usize] != TT_USER_DEFINED {
                continue;
            }
            let pat = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Text(s) => {
                        let mut rest = s;
                        while let Some(pos) = rest.find(pat) {
                            if pos > 0 {
                                next.push(Frag::Text(&rest[..pos]));
                            }
                            next.push(Frag::Token(id));
                            rest = &rest[pos + pat.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Frag::Text(rest));
                        }
                    }
                    t => next.push(t),
                }
            }
            frags = next;
        }
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Text(s) => {
                    let mut t = String::with_capacity(s.len() + 3);
                    if self.add_space_prefix && prev_special {
                        t.push(' ');
                    }
                    t.push_str(s);
                    let t = t.replace(' ', "\u{2581}");
                    self.tokenize(&t, out)?;
                    prev_special = false;
                }
            }
        }
        Ok(())
    }

    fn tokenize(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Sym {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        let text_ref: &str = text;
        for i in 1..syms.len() {
            self.try_add(
                &syms,
                Some(i - 1),
                Some(i),
                &mut queue,
                &mut rev_merge,
                text_ref,
            );
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            let prev = syms[l].prev;
            let next = syms[l].next;
            self.try_add(&syms, prev, Some(l), &mut queue, &mut rev_merge, text_ref);
            self.try_add(&syms, Some(l), next, &mut queue, &mut rev_merge, text_ref);
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            self.resegment(text_ref, &syms, k, &rev_merge, out)?;
            i = syms[k].next;
        }
        Ok(())
    }

    /// Queues the pair (left, right) when their joined text is a token, and remembers which
    /// symbols formed that text (llama.cpp keys this by text; the last pair wins).
    fn try_add<'t>(
        &self,
        syms: &[Sym],
        left: Option<usize>,
        right: Option<usize>,
        queue: &mut BinaryHeap<Bigram>,
        rev: &mut HashMap<&'t str, (usize, usize)>,
        text: &'t str,
    ) {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let s = &text[syms[l].start..syms[l].start + syms[l].len + syms[r].len];
        if let Some(&id) = self.map.get(s) {
            queue.push(Bigram {
                score: self.scores[id as usize],
                left: l,
                right: r,
                size: s.len(),
            });
            rev.insert(s, (l, r));
        }
    }

    fn resegment(
        &self,
        text: &str,
        syms: &[Sym],
        k: usize,
        rev: &HashMap<&str, (usize, usize)>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        // An explicit stack keeps deep merge trees from overflowing the call stack.
        let mut stack = vec![(syms[k].start, syms[k].len)];
        while let Some((start, len)) = stack.pop() {
            let s = &text[start..start + len];
            if let Some(&id) = self.map.get(s) {
                out.push(id);
            } else if let Some(&(l, r)) = rev.get(s) {
                // Both halves as they were when the pair was queued: left then right.
                let l_len = syms[r].start - syms[l].start;
                stack.push((syms[r].start, len - l_len));
                stack.push((syms[l].start, l_len));
            } else {
                for &b in s.as_bytes() {
                    let id = self.byte_ids[b as usize].or(self.unk).ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "byte 0x{b:02X} has no <0x{b:02X}> token and there is no unknown token"
                        ))
                    })?;
                    out.push(id);
                }
            }
        }
        Ok(())
    }
}

fn owned(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufValue;

    fn s(x: &str) -> GgufValue {
        GgufValue::String(x.to_string())
    }

    /// A hand-made SentencePiece vocabulary: the best-scoring pair wins, byte fallback covers
    /// what has no piece, and a space prefix is added.
    fn tiny_spm() -> Tokenizer {
        let mut toks: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, TT_UNKNOWN),
            ("<s>".into(), 0.0, TT_CONTROL),
            ("</s>".into(), 0.0, TT_CONTROL),
        ];
        for b in 0..256 {
            toks.push((format!("<0x{b:02X}>"), 0.0, TT_BYTE));
        }
        for (t, sc) in [
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("ab", -5.0),
            ("bc", -0.5),
            ("▁a", -6.0),
            ("▁abc", -7.0),
            ("▁bc", -8.0),
        ] {
            toks.push((t.into(), sc, TT_NORMAL));
        }
        let mut meta = GgufMetadata::new();
        meta.insert("tokenizer.ggml.model".into(), s("llama"));
        meta.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(toks.iter().map(|t| s(&t.0)).collect()),
        );
        meta.insert(
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(toks.iter().map(|t| GgufValue::F32(t.1)).collect()),
        );
        meta.insert(
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(toks.iter().map(|t| GgufValue::I32(t.2)).collect()),
        );
        meta.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
        meta.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2));
        meta.insert("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0));
        Tokenizer::from_gguf(&meta, Path::new("tiny.gguf")).unwrap()
    }

    #[test]
    fn spm_prefers_best_scoring_pair() {
        let t = tiny_spm();
        let id = |x: &str| t.token_id(x).unwrap();
        // "▁ab": "ab" (-5) beats "▁a" (-6), and "▁ab" is no token: ▁ + ab (a leftmost-first
        // merge would give ▁a + b).
        assert_eq!(t.encode("ab", false).unwrap(), vec![id("▁"), id("ab")]);
        // "▁abc": "bc" (-0.5) first, then "▁a", then "▁a"+"bc" = "▁abc".
        assert_eq!(t.encode("abc", false).unwrap(), vec![id("▁abc")]);
        assert_eq!(t.encode("abc", true).unwrap(), vec![1, id("▁abc")]);
        // Byte fallback for "é" (C3 A9) and a lone "d".
        assert_eq!(
            t.encode("é", false).unwrap(),
            vec![id("▁"), id("<0xC3>"), id("<0xA9>")]
        );
        let ids = t.encode("ab dé", false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), " ab dé");
        // Control tokens in text are parsed only when asked.
        assert_eq!(t.encode_with("<s>", false, true).unwrap(), vec![1]);
        assert_ne!(t.encode_with("<s>", false, false).unwrap(), vec![1]);
        assert_eq!(t.eos_ids(), &[2]);
    }

    #[test]
    fn gguf_errors_name_the_key() {
        let mut meta = GgufMetadata::new();
        meta.insert("tokenizer.ggml.model".into(), s("gpt2"));
        meta.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vec![s("a")]),
        );
        let e = Tokenizer::from_gguf(&meta, Path::new("m.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tokenizer.ggml.merges") && e.contains("m.gguf"),
            "{e}"
        );
        meta.insert("tokenizer.ggml.model".into(), s("wordpiece-xyz"));
        let e = Tokenizer::from_gguf(&meta, Path::new("m.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tokenizer.ggml.model"), "{e}");
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let t = byte_level_inverse();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'!'], b'!');
    }
}
