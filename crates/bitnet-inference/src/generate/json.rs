//! Output held to a JSON schema (OpenAI's `response_format`), by llguidance (cargo feature
//! `constrained`).
//!
//! [`JsonGrammars`] is built once per model: llguidance's token trie from the vocabulary's
//! bytes (byte-level BPE and SentencePiece byte-fallback vocabularies alike: every token is the
//! bytes it decodes to; control tokens are marked as special so that no grammar can spell them
//! as text). [`JsonGrammars::compile`] turns a schema into a [`SharedConstraint`], within
//! limits set on llguidance so that a hostile schema is refused, not slow or large; each
//! sequence then runs its own llguidance `Matcher`.
//!
//! The JSON is written compactly with a space after `:` and `,` (`{"a": 1, "b": [2, 3]}`):
//! no free whitespace, so a model cannot spend its tokens on blank space.

use super::constraint::{ConstraintSource, SharedConstraint, TokenConstraint, TokenMask};
use super::stream::TokenPieces;
use llguidance::api::{GrammarWithLexer, ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// The largest schema, in bytes of compact JSON.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// The deepest nesting of objects and arrays in a schema.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// The sum of a schema's `multipleOf` coefficients (the value's digits as an integer: 35 for
/// 3.5 or 35, 3500 for 3.5e3). llguidance builds a lexer automaton with about one state per
/// unit of it, before its fuel limits apply: a single `"multipleOf": 16777217` took more than
/// 2.5 GB and a minute (found by the `schema` fuzz target); 100,000 in all take ~0.3 s.
pub const MAX_SCHEMA_MULTIPLE_OF: u64 = 100_000;

/// Tokens longer than this (in bytes) are never allowed (llguidance's trie holds tokens of
/// up to 1024 bytes).
const MAX_TOKEN_BYTES: usize = 1000;
/// The most trie nodes llguidance can address (2^22), with a margin.
const MAX_TRIE_BYTES: usize = 4_000_000;

/// The limits given to llguidance, for every grammar (see docs/RELIABILITY.md).
pub fn limits() -> ParserLimits {
    ParserLimits {
        // Grammar symbols: a 64 KiB schema compiles to far fewer.
        max_grammar_size: 100_000,
        // Building the lexer: ~50k a millisecond, so ~20 ms at most.
        initial_lexer_fuel: 1_000_000,
        // One token's mask: ~14k a millisecond, so ~15 ms at most.
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        // ~1-2 kB each: at most ~40 MB for one grammar's lexer.
        max_lexer_states: 20_000,
        max_items_in_row: 2000,
        precompute_large_lexemes: true,
        // Errors name the problem, not the parser's whole state.
        verbose_errors: false,
    }
}

/// What `response_format` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonFormat {
    /// Any JSON object (`json_object`).
    Object,
    /// A value matching this JSON schema (`json_schema`); `name` is for messages only.
    Schema { name: String, schema: Value },
}

/// A model's vocabulary as llguidance sees it, and the compiler of schemas against it.
pub struct JsonGrammars {
    factory: ParserFactory,
    /// The id that stands for "the output may end" in llguidance's masks: one past the
    /// vocabulary, never sampled.
    end: u32,
}

impl JsonGrammars {
    /// Builds the token trie from `pieces` (every id's bytes; `pieces.len()` is the number
    /// of logits a step gives); `is_special(id)` marks control tokens (BOS, EOS, chat
    /// markers), which no grammar may write as text.
    pub fn new(pieces: &TokenPieces, is_special: impl Fn(u32) -> bool) -> Result<Self, String> {
        let vocab = pieces.len();
        if vocab == 0 || vocab >= (1 << 21) {
            return Err(format!(
                "a vocabulary of {vocab} tokens: constrained decoding supports 1 to {}",
                (1 << 21) - 1
            ));
        }
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(vocab + 1);
        let mut total = 0usize;
        for id in 0..vocab as u32 {
            let bytes = pieces.get(id);
            let word = if bytes.is_empty() || bytes.len() > MAX_TOKEN_BYTES {
                Vec::new()
            } else if is_special(id) {
                let mut w = Vec::with_capacity(bytes.len() + 1);
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(bytes);
                w
            } else {
                bytes.to_vec()
            };
            total += word.len();
            words.push(word);
        }
        if total > MAX_TRIE_BYTES {
            return Err(format!(
                "the vocabulary's tokens hold {total} bytes: constrained decoding supports at \
                 most {MAX_TRIE_BYTES}"
            ));
        }
        let end = vocab as u32;
        words.push(b"\xFF<|bitnet-end|>".to_vec());
        let info = TokRxInfo::new(words.len() as u32, end);
        let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words))
            .map_err(|_| "llguidance could not build its token trie".to_string())?;
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let env: llguidance::toktrie::TokEnv = env;
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| format!("llguidance: {e}"))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(JsonGrammars { factory, end })
    }

    /// [`JsonGrammars::new`] for a loaded model: its control tokens and end tokens are
    /// special.
    pub fn for_model(model: &crate::engine::LoadedEngineModel) -> Result<Self, String> {
        Self::new(&model.pieces, |id| {
            model.tokenizer.is_special(id) || model.end_tokens.contains(&id)
        })
    }

    /// Checks and compiles `format`. The error says why a schema is refused (too large, too
    /// deep, not an object, or llguidance's reason: an unsupported keyword, an
    /// unsatisfiable schema, a limit reached).
    pub fn compile(&self, format: &JsonFormat) -> Result<SharedConstraint, String> {
        let (mut schema, what) = match format {
            JsonFormat::Object => (json!({"type": "object"}), "json_object".to_string()),
            JsonFormat::Schema { name, schema } => {
                check_schema(schema)?;
                (schema.clone(), format!("json_schema {name:?}"))
            }
        };
        // Our layout, whatever the schema says for llguidance.
        if let Some(obj) = schema.as_object_mut() {
            obj.insert(
                "x-guidance".into(),
                json!({
                    "whitespace_flexible": false,
                    "item_separator": ", ",
                    "key_separator": ": ",
                }),
            );
        }
        let grammar = TopLevelGrammar::from_grammar(GrammarWithLexer::from_json_schema(schema));
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        // The first mask builds most of the lexer: done here, so that a grammar too costly
        // to start is refused now rather than failing its request later.
        let mut probe = Matcher::new(Ok(parser.clone()));
        probe.compute_mask().map_err(|e| e.to_string())?;
        Ok(SharedConstraint::new(JsonSource {
            parser: Mutex::new(parser),
            end: self.end,
            what,
        }))
    }
}

/// Size and depth of a schema, checked before llguidance sees it.
fn check_schema(schema: &Value) -> Result<(), String> {
    if !schema.is_object() {
        return Err("expected a JSON schema object".into());
    }
    let bytes = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the schema has {bytes} bytes: at most {MAX_SCHEMA_BYTES} are allowed"
        ));
    }
    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let d = depth(schema);
    if d > MAX_SCHEMA_DEPTH {
        return Err(format!(
            "the schema nests {d} levels of objects and arrays: at most {MAX_SCHEMA_DEPTH} are allowed"
        ));
    }
    let mut total = 0;
    check_multiple_of(schema, &mut String::new(), &mut total)
}

/// Every `multipleOf` in `v` (at JSON pointer `at`) is a number > 0, and their coefficients
/// add up to at most [`MAX_SCHEMA_MULTIPLE_OF`].
fn check_multiple_of(v: &Value, at: &mut String, total: &mut u64) -> Result<(), String> {
    let len = at.len();
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                if k == "multipleOf" {
                    if let Value::Number(n) = child {
                        let positive = n.as_f64().is_some_and(|x| x > 0.0 && x.is_finite());
                        if !positive {
                            return Err(format!("`{at}` = {n}: expected a number above 0"));
                        }
                        *total = total.saturating_add(decimal_coefficient(&n.to_string()));
                        if *total > MAX_SCHEMA_MULTIPLE_OF {
                            return Err(format!(
                                "`{at}` = {n}: the schema's multipleOf values have coefficients \
                                 adding up to {total}, at most {MAX_SCHEMA_MULTIPLE_OF} are allowed"
                            ));
                        }
                    }
                }
                check_multiple_of(child, at, total)?;
                at.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push_str(&format!("/{i}"));
                check_multiple_of(child, at, total)?;
                at.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// The integer coefficient of a positive decimal number written as JSON (`0.25` → 25,
/// `2.5e3` → 2500, `1e-7` → 1), as llguidance reads it; `u64::MAX` when it is larger.
fn decimal_coefficient(text: &str) -> u64 {
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().unwrap_or(i64::MAX)),
        None => (text, 0),
    };
    let frac = mantissa.find('.').map_or(0, |i| mantissa.len() - i - 1) as i64;
    let mut digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    // Trailing zeros after the point say nothing; those of an integer stay (1000 is 1000).
    let mut scale = exp.saturating_sub(frac);
    while scale < 0 && digits.ends_with('0') {
        digits.pop();
        scale += 1;
    }
    let digits = digits.trim_start_matches('0');
    let mut coef: u64 = match digits.parse() {
        Ok(c) => c,
        Err(_) if digits.is_empty() => 0,
        Err(_) => return u64::MAX,
    };
    for _ in 0..scale.clamp(0, 20) {
        coef = coef.saturating_mul(10);
    }
    coef
}

struct JsonSource {
    /// The compiled grammar, fresh (no token taken); each sequence clones it.
    parser: Mutex<TokenParser>,
    end: u32,
    what: String,
}

impl ConstraintSource for JsonSource {
    fn start(&self) -> Result<Box<dyn TokenConstraint>, String> {
        let parser = self
            .parser
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Box::new(JsonConstraint {
            matcher,
            end: self.end,
        }))
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

struct JsonConstraint {
    matcher: Matcher,
    end: u32,
}

impl TokenConstraint for JsonConstraint {
    fn next_allowed(&mut self, mask: &mut TokenMask) -> Result<bool, String> {
        let vob = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let src = vob.as_slice();
        let dst = mask.words_mut();
        let n = dst.len().min(src.len());
        dst[..n].copy_from_slice(&src[..n]);
        // The word holding the end marker may carry its bit: it is past the mask's length,
        // which `apply` and `is_allowed` ignore.
        Ok(vob.is_allowed(self.end))
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::decimal_coefficient;

    #[test]
    fn decimal_coefficients_as_llguidance_reads_them() {
        for (text, coef) in [
            ("35", 35),
            ("3.5", 35),
            ("0.25", 25),
            ("2.5e3", 2500),
            ("1e-7", 1),
            ("1000", 1000),
            ("1.0000001", 10_000_001),
            ("0.0100003", 100_003),
            ("16777217", 16_777_217),
            ("1e300", u64::MAX),
            ("123456789012345678901234567890", u64::MAX),
        ] {
            assert_eq!(decimal_coefficient(text), coef, "{text}");
        }
    }
}
