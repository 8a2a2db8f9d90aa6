//! The request bodies of the OpenAI API, read and checked: every field is checked for its
//! type and range before anything is done with it, and a bad one is a 400 that names it.

use crate::error::ApiError;
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::json::JsonFormat;
use bitnet_inference::generate::{GenerationConfig, SamplingStrategy};
use bitnet_inference::scheduler::Request as SchedRequest;
use bitnet_inference::Error;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Choices one request may ask for (`n` times the prompts of a completion).
pub const MAX_CHOICES: usize = 16;
/// Prompts in one completions request.
pub const MAX_PROMPTS: usize = 16;
/// Stop strings, and the longest one in bytes.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Alternatives per token in `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Fields of both endpoints.
pub const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "repeat_last_n",
    "ignore_eos",
    "response_format",
];
/// Fields of the chat endpoint alone.
pub const CHAT_ONLY: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
];
/// Fields of the completions endpoint alone.
pub const COMPLETION_ONLY: &[&str] = &["prompt", "logprobs", "echo", "suffix", "best_of"];
/// Fields of `/tokenize` and of `/detokenize`.
pub const TOKENIZE_FIELDS: &[&str] = &["content", "add_special", "with_pieces"];
pub const DETOKENIZE_FIELDS: &[&str] = &["tokens"];
/// OpenAI fields this server knows and does not do (yet): a clear refusal, not "unknown".
pub const NOT_SUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "store",
    "metadata",
    "service_tier",
];

/// Reads a JSON object from a request body.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
        .with_code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object, not {}", json_kind(&other)),
        )
        .with_code("invalid_json")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses keys outside `allowed`, naming them.
pub fn check_keys(obj: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    for k in obj.keys() {
        if allowed.iter().any(|list| list.contains(&k.as_str())) {
            continue;
        }
        if NOT_SUPPORTED.contains(&k.as_str()) {
            return Err(
                ApiError::invalid(k, format!("`{k}` is not supported by this server"))
                    .with_code("unsupported_parameter"),
            );
        }
        return Err(
            ApiError::invalid(k, format!("unknown field `{k}`")).with_code("unknown_parameter")
        );
    }
    Ok(())
}

/// The endpoint's own fields and the shared ones, each typed (serde's `flatten` would lose
/// the name of a field with a wrong type).
fn split<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<(T, CommonFields), ApiError> {
    let (common, own): (Map<String, Value>, Map<String, Value>) = obj
        .into_iter()
        .partition(|(k, _)| COMMON.contains(&k.as_str()));
    Ok((typed(own)?, typed(common)?))
}

/// Deserializes `obj` as `T`, naming the field of a type error.
pub fn typed<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        ApiError::invalid(path.clone(), format!("{path}: {inner}")).with_code("invalid_type")
    })
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The fields both endpoints share, as sent.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<serde_json::Number>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub typical_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub repeat_last_n: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, null, or a list of parts ({\"type\": \"text\", \"text\": ...})"
)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatFields {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionFields {
    pub prompt: Value,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// A prompt as text or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// What both endpoints ask of the scheduler, checked.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub model: Option<String>,
    /// Tokens to generate at most (None: until the context is full).
    pub max_tokens: Option<usize>,
    pub max_tokens_field: &'static str,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub seed: Option<u64>,
    /// Log-probabilities asked for: the number of alternatives.
    pub logprobs: Option<usize>,
    /// `response_format` `json_object` or `json_schema` (None: free text).
    pub response_format: Option<JsonFormat>,
    pub config: GenerationConfig,
}

/// A checked chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: Sampling,
}

/// A checked completions request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompts: Vec<Prompt>,
    pub sampling: Sampling,
}

fn range_f(
    name: &str,
    v: Option<f64>,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && ok(x) => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::invalid(
            name,
            format!("{name} = {}: expected {what}", short(x)),
        )),
    }
}

/// A number as an error message shows it: 1e300 in exponent form, not as 301 digits.
fn short(x: f64) -> String {
    if x.abs() >= 1e15 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

fn range_i(name: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if (lo..=hi).contains(&x) => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::invalid(
            name,
            format!("{name} = {x}: expected an integer from {lo} to {hi}"),
        )),
    }
}

/// Checks the shared fields and builds the generation config on top of `base` (the model's
/// defaults). `context` bounds `max_tokens`, `vocab` the ids of `logit_bias`.
fn sampling(
    c: CommonFields,
    max_completion_tokens: Option<i64>,
    logprobs: Option<usize>,
    base: &GenerationConfig,
    context: usize,
    vocab: usize,
) -> Result<Sampling, ApiError> {
    let mut config = base.clone();
    config.strategy = SamplingStrategy::Sample;
    let (max_tokens, max_tokens_field) = match (max_completion_tokens, c.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let max_tokens = range_i(max_tokens_field, max_tokens, 1, context as i64)?;
    if let Some(t) = range_f(
        "temperature",
        c.temperature,
        |x| (0.0..=2.0).contains(&x),
        "a number from 0 to 2 (0 is greedy)",
    )? {
        config.temperature = t;
    }
    if let Some(p) = range_f(
        "top_p",
        c.top_p,
        |x| x > 0.0 && x <= 1.0,
        "a number in (0, 1]",
    )? {
        config.top_p = p;
    }
    let n = range_i("n", c.n, 1, MAX_CHOICES as i64)?.unwrap_or(1);
    if let Some(stop) = c.stop {
        let stops = match stop {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop has {} strings: expected at most {MAX_STOPS}",
                    stops.len()
                ),
            ));
        }
        for s in &stops {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "a stop string of {} bytes: expected 1 to {MAX_STOP_BYTES}",
                        s.len()
                    ),
                ));
            }
        }
        config.stop_strings = stops;
    }
    let seed = match c.seed {
        None => None,
        Some(num) => Some(match (num.as_i64(), num.as_u64()) {
            // Two's complement: every 64-bit seed, signed or not, names one generator.
            (Some(i), _) => i as u64,
            (None, Some(u)) => u,
            _ => {
                return Err(ApiError::invalid(
                    "seed",
                    format!("seed = {num}: expected a 64-bit integer"),
                ))
            }
        }),
    };
    if let Some(p) = range_f(
        "presence_penalty",
        c.presence_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "a number from -2 to 2",
    )? {
        config.presence_penalty = p;
    }
    if let Some(p) = range_f(
        "frequency_penalty",
        c.frequency_penalty,
        |x| (-2.0..=2.0).contains(&x),
        "a number from -2 to 2",
    )? {
        config.frequency_penalty = p;
    }
    if let Some(bias) = c.logit_bias {
        let mut out = Vec::with_capacity(bias.len().min(vocab));
        for (k, v) in bias {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!(
                            "logit_bias key {k:?}: expected a token id from 0 to {}",
                            vocab - 1
                        ),
                    )
                })?;
            if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "logit_bias for token {id} = {}: expected a number from -100 to 100",
                        short(v)
                    ),
                ));
            }
            // OpenAI's -100 bans the token.
            out.push((
                id,
                if v <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    v as f32
                },
            ));
        }
        config.logit_bias = out;
    }
    let include_usage = match (&c.stream_options, c.stream) {
        (Some(o), Some(true)) => o.include_usage.unwrap_or(false),
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with stream = true",
            ))
        }
        (None, _) => false,
    };
    if let Some(k) = range_i("top_k", c.top_k, 0, vocab as i64)? {
        config.top_k = k;
    }
    if let Some(p) = range_f(
        "min_p",
        c.min_p,
        |x| (0.0..=1.0).contains(&x),
        "a number from 0 to 1 (0 disables)",
    )? {
        config.min_p = p;
    }
    if let Some(p) = range_f(
        "typical_p",
        c.typical_p,
        |x| x > 0.0 && x <= 1.0,
        "a number in (0, 1] (1 disables)",
    )? {
        config.typical_p = p;
    }
    if let Some(r) = range_f(
        "repetition_penalty",
        c.repetition_penalty,
        |x| x > 0.0 && x <= 10.0,
        "a number in (0, 10] (1 disables)",
    )? {
        config.repetition_penalty = r;
    }
    if let Some(n) = range_i("repeat_last_n", c.repeat_last_n, 0, context as i64)? {
        config.repeat_last_n = n;
    }
    if let Some(b) = c.ignore_eos {
        config.ignore_eos = b;
    }
    let response_format = match c.response_format {
        None => None,
        Some(f) => response_format(f)?,
    };
    if let Some(u) = &c.user {
        if u.len() > 256 {
            return Err(ApiError::invalid(
                "user",
                format!("user has {} bytes: expected at most 256", u.len()),
            ));
        }
    }
    config.validate().map_err(|msg| {
        let name = msg.split([' ', '=']).next().unwrap_or("").to_string();
        ApiError::invalid(name, msg)
    })?;
    Ok(Sampling {
        model: c.model,
        max_tokens,
        max_tokens_field,
        n,
        stream: c.stream.unwrap_or(false),
        include_usage,
        seed,
        logprobs,
        response_format,
        config,
    })
}

/// The longest `json_schema.name` (OpenAI's limit).
const MAX_SCHEMA_NAME: usize = 64;

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or `{"type":
/// "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`. The schema
/// itself is checked when it is compiled (`JsonGrammars::compile`).
fn response_format(v: Value) -> Result<Option<JsonFormat>, ApiError> {
    const FIELD: &str = "response_format";
    let Value::Object(mut o) = v else {
        return Err(ApiError::invalid(
            FIELD,
            "response_format: expected an object with a \"type\"",
        ));
    };
    let kind = match o.remove("type") {
        Some(Value::String(t)) => t,
        _ => {
            return Err(ApiError::invalid(
                "response_format.type",
                "response_format.type: expected \"text\", \"json_object\" or \"json_schema\"",
            ))
        }
    };
    let spec = match kind.as_str() {
        "json_schema" => o.remove("json_schema"),
        _ => None,
    };
    if let Some(k) = o.keys().next() {
        return Err(ApiError::invalid(
            format!("{FIELD}.{k}"),
            format!("unknown field `{FIELD}.{k}` for type {kind:?}"),
        )
        .with_code("unknown_parameter"));
    }
    match kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(JsonFormat::Object)),
        "json_schema" => {
            let Some(Value::Object(mut spec)) = spec else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "response_format.json_schema: expected an object with \"name\" and \"schema\"",
                ));
            };
            let name = match spec.remove("name") {
                Some(Value::String(n))
                    if !n.is_empty()
                        && n.len() <= MAX_SCHEMA_NAME
                        && n
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    n
                }
                _ => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        format!(
                            "response_format.json_schema.name: expected 1 to {MAX_SCHEMA_NAME} \
                             letters, digits, '_' or '-'"
                        ),
                    ))
                }
            };
            match spec.remove("strict") {
                None | Some(Value::Null | Value::Bool(_)) => {}
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.strict",
                        "response_format.json_schema.strict: expected a boolean",
                    ))
                }
            }
            match spec.remove("description") {
                None | Some(Value::Null | Value::String(_)) => {}
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.description",
                        "response_format.json_schema.description: expected a string",
                    ))
                }
            }
            // OpenAI's schema is optional: without one, any JSON value.
            let schema = match spec.remove("schema") {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(s @ Value::Object(_)) => s,
                Some(_) => {
                    return Err(ApiError::invalid(
                        SCHEMA_FIELD,
                        format!("{SCHEMA_FIELD}: expected a JSON schema object"),
                    ))
                }
            };
            if let Some(k) = spec.keys().next() {
                return Err(ApiError::invalid(
                    format!("response_format.json_schema.{k}"),
                    format!("unknown field `response_format.json_schema.{k}`"),
                )
                .with_code("unknown_parameter"));
            }
            Ok(Some(JsonFormat::Schema { name, schema }))
        }
        other => Err(ApiError::invalid(
            "response_format.type",
            format!(
                "response_format.type = {other:?}: expected \"text\", \"json_object\" or \"json_schema\""
            ),
        )),
    }
}

/// The field a refused schema is reported under.
pub const SCHEMA_FIELD: &str = "response_format.json_schema.schema";

/// Reads and checks a `/v1/chat/completions` body.
pub fn chat_request(
    body: &[u8],
    base: &GenerationConfig,
    context: usize,
    vocab: usize,
) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    check_keys(&obj, &[COMMON, CHAT_ONLY])?;
    if !obj.contains_key("messages") {
        return Err(ApiError::invalid("messages", "messages is required"));
    }
    let (f, common): (ChatFields, _) = split(obj)?;
    let logprobs = match (f.logprobs, f.top_logprobs) {
        (Some(true), top) => {
            Some(range_i("top_logprobs", top, 0, MAX_TOP_LOGPROBS as i64)?.unwrap_or(0))
        }
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs = true",
            ))
        }
        _ => None,
    };
    if f.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages is empty: expected at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(f.messages.len());
    for (i, m) in f.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("messages[{i}].role = {other:?}: expected \"system\", \"developer\", \"user\" or \"assistant\""),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("messages[{i}].content[{j}]"),
                                format!("messages[{i}].content[{j}] of type {kind:?}: only text parts (with \"text\") are supported"),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let sampling = sampling(
        common,
        f.max_completion_tokens,
        logprobs,
        base,
        context,
        vocab,
    )?;
    Ok(ChatRequest { messages, sampling })
}

/// Reads and checks a `/v1/completions` body.
pub fn completion_request(
    body: &[u8],
    base: &GenerationConfig,
    context: usize,
    vocab: usize,
) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    check_keys(&obj, &[COMMON, COMPLETION_ONLY])?;
    if !obj.contains_key("prompt") {
        return Err(ApiError::invalid("prompt", "prompt is required"));
    }
    let (f, common): (CompletionFields, _) = split(obj)?;
    if f.echo == Some(true) {
        return Err(
            ApiError::invalid("echo", "echo = true is not supported by this server")
                .with_code("unsupported_parameter"),
        );
    }
    if f.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(
            ApiError::invalid("suffix", "suffix is not supported by this server")
                .with_code("unsupported_parameter"),
        );
    }
    let logprobs = range_i("logprobs", f.logprobs, 0, MAX_TOP_LOGPROBS as i64)?;
    let prompts = prompts(f.prompt)?;
    let sampling = sampling(common, None, logprobs, base, context, vocab)?;
    if let Some(b) = f.best_of {
        if b != sampling.n as i64 {
            return Err(ApiError::invalid(
                "best_of",
                format!(
                    "best_of = {b}: only best_of equal to n ({}) is supported",
                    sampling.n
                ),
            )
            .with_code("unsupported_parameter"));
        }
    }
    if prompts.len() * sampling.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n = {} asks for {} choices: expected at most {MAX_CHOICES}",
                prompts.len(),
                sampling.n,
                prompts.len() * sampling.n
            ),
        ));
    }
    Ok(CompletionRequest { prompts, sampling })
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn prompts(v: Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = |what: String| ApiError::invalid("prompt", what).with_code("invalid_type");
    let ids = |items: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "prompt{at}[{i}] = {t}: expected a token id (an integer ≥ 0)"
                        ))
                    })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(vec![Prompt::Text(s)]),
        Value::Array(items) if items.is_empty() => Err(bad("prompt is an empty list".into())),
        Value::Array(items) => {
            if items.iter().all(Value::is_number) {
                return Ok(vec![Prompt::Ids(ids(&items, "")?)]);
            }
            if items.len() > MAX_PROMPTS {
                return Err(bad(format!(
                    "prompt has {} prompts: expected at most {MAX_PROMPTS}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(Prompt::Text(s)),
                    Value::Array(inner) => Ok(Prompt::Ids(ids(&inner, &format!("[{i}]"))?)),
                    other => Err(bad(format!(
                        "prompt[{i}] is {}: expected a string or a list of token ids",
                        json_kind(&other)
                    ))),
                })
                .collect()
        }
        other => Err(bad(format!(
            "prompt is {}: expected a string, a list of strings, or token ids",
            json_kind(&other)
        ))),
    }
}

/// A text longer than any prompt of `context` tokens can be is refused by its length, before
/// it is tokenized (which costs ~100 bytes of memory a byte); shorter ones are counted in
/// tokens after.
fn fits_before_tokenizing(
    model: &LoadedEngineModel,
    field: &'static str,
    bytes: usize,
    context: usize,
) -> Result<(), ApiError> {
    let max = model.tokenizer.max_text_bytes(context);
    if bytes <= max {
        return Ok(());
    }
    Err(ApiError::invalid(
        field,
        format!(
            "the {field} of {bytes} bytes cannot fit this server's context size of {context} \
             tokens (at most {max} bytes can, with this vocabulary); refused before tokenizing"
        ),
    )
    .with_code("context_length_exceeded"))
}

/// A `/tokenize` body (llama.cpp's `POST /tokenize`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub content: String,
    pub add_special: Option<bool>,
    pub with_pieces: Option<bool>,
}

/// A `/detokenize` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

/// Reads a `/tokenize` body.
pub fn tokenize_request(body: &[u8]) -> Result<TokenizeRequest, ApiError> {
    typed(parse_object(body)?)
}

/// Reads a `/detokenize` body.
pub fn detokenize_request(body: &[u8]) -> Result<DetokenizeRequest, ApiError> {
    typed(parse_object(body)?)
}

/// `/tokenize`'s ids, bounded as a prompt is: a text that cannot fit the context is refused
/// by its length in bytes before it is tokenized (which costs ~90 bytes of memory a byte),
/// then by its tokens. Blocking: tokenizing takes CPU time in proportion to the text.
pub fn tokenize_content(
    model: &LoadedEngineModel,
    content: &str,
    add_special: bool,
    context: usize,
) -> Result<Vec<u32>, ApiError> {
    fits_before_tokenizing(model, "content", content.len(), context)?;
    let ids = model
        .tokenizer
        .encode(content, add_special)
        .map_err(|e| ApiError::invalid("content", e.to_string()))?;
    if ids.len() > context {
        return Err(ApiError::invalid(
            "content",
            format!(
                "the content is {} tokens: more than this server's context size of {context} \
                 tokens",
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

/// `/detokenize`'s text: at most a context's worth of ids (the text of N ids can be N × the
/// longest token's bytes), each below the vocabulary size.
pub fn detokenize_tokens(
    model: &LoadedEngineModel,
    tokens: &[u32],
    context: usize,
) -> Result<String, ApiError> {
    if tokens.len() > context {
        return Err(ApiError::invalid(
            "tokens",
            format!(
                "tokens has {} ids: expected at most this server's context size of {context}",
                tokens.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let vocab = model.model.config().vocab_size;
    if let Some((i, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(ApiError::invalid(
            "tokens",
            format!("tokens[{i}] = {id}: expected a token id below the vocabulary size {vocab}"),
        ));
    }
    model
        .tokenizer
        .decode(tokens)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))
}

/// The prompt ids of a chat request: its messages are refused by their length before they
/// are rendered, and the rendered text (which a template with much per-message text can make
/// far longer than the messages) by its length before it is tokenized, then by its tokens.
/// Blocking: rendering and tokenizing take CPU time in proportion to the conversation.
pub fn chat_prompt(
    model: &LoadedEngineModel,
    messages: &[ChatMessage],
    context: usize,
) -> Result<Vec<u32>, ApiError> {
    let bytes = messages.iter().map(|m| m.content.len()).sum();
    fits_before_tokenizing(model, "messages", bytes, context)?;
    model
        .encode_chat_within(messages, context)
        .map_err(|e| match e {
            Error::Invalid(msg) => {
                ApiError::invalid("messages", format!("the rendered conversation: {msg}"))
                    .with_code("context_length_exceeded")
            }
            e => ApiError::invalid("messages", format!("the chat template failed: {e}")),
        })
}

/// The prompt ids of a completions request: every text prompt is refused by its length
/// before any is tokenized. Blocking, as [`chat_prompt`].
pub fn completion_prompts(
    model: &LoadedEngineModel,
    prompts: Vec<Prompt>,
    context: usize,
) -> Result<Vec<Vec<u32>>, ApiError> {
    for p in &prompts {
        if let Prompt::Text(t) = p {
            fits_before_tokenizing(model, "prompt", t.len(), context)?;
        }
    }
    prompts
        .into_iter()
        .map(|p| match p {
            Prompt::Text(t) => model
                .encode_prompt(&t)
                .map_err(|e| ApiError::invalid("prompt", e.to_string())),
            Prompt::Ids(ids) => Ok(ids),
        })
        .collect()
}

/// One scheduler request per prompt and choice, each prompt checked against the context
/// first (with `max_tokens`, when given); `field` names the prompt's field in errors. The
/// scheduler checks the rest (token ids against the vocabulary) when they are submitted.
pub fn scheduler_requests(
    prompts: &[Vec<u32>],
    s: &Sampling,
    context: usize,
    field: &str,
    seed: u64,
) -> Result<Vec<SchedRequest>, ApiError> {
    for p in prompts {
        if p.is_empty() {
            return Err(ApiError::invalid(field, "the prompt is empty"));
        }
        if p.len() >= context {
            return Err(ApiError::invalid(
                field,
                format!(
                    "the prompt has {} tokens; this server's context size is {context} tokens \
                     (the prompt and at least one generated token must fit)",
                    p.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(m) = s.max_tokens.filter(|&m| p.len() + m > context) {
            return Err(ApiError::invalid(
                s.max_tokens_field,
                format!(
                    "the prompt has {} tokens and {} = {m}: together {} tokens, more than this \
                     server's context size of {context} tokens",
                    p.len(),
                    s.max_tokens_field,
                    p.len() + m
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    let mut requests = Vec::with_capacity(prompts.len() * s.n);
    for p in prompts {
        for _ in 0..s.n {
            let index = requests.len();
            let mut config = s.config.clone();
            config.max_new_tokens = s.max_tokens.unwrap_or(context - p.len());
            // Each choice its own generator; choice 0 is what the same seed gives alone.
            config.seed = seed.wrapping_add(index as u64);
            let mut r = SchedRequest::new(p.clone(), config);
            if let Some(k) = s.logprobs {
                r = r.with_logprobs(k);
            }
            requests.push(r);
        }
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        chat_request(body.as_bytes(), &GenerationConfig::default(), 256, 1000)
    }
    fn completion(body: &str) -> Result<CompletionRequest, ApiError> {
        completion_request(body.as_bytes(), &GenerationConfig::default(), 256, 1000)
    }

    #[test]
    fn fields_map_onto_the_config() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5,
            "top_p":0.9,"n":2,"stop":["a","b"],"seed":-1,"presence_penalty":0.5,
            "frequency_penalty":-0.5,"logit_bias":{"7":-100,"8":3},"logprobs":true,
            "top_logprobs":3,"max_completion_tokens":9,"top_k":5,"min_p":0.1,"typical_p":0.8,
            "repetition_penalty":1.1,"user":"u","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let s = &r.sampling;
        assert_eq!(
            (s.n, s.max_tokens, s.seed, s.logprobs),
            (2, Some(9), Some(u64::MAX), Some(3))
        );
        assert!(s.stream && s.include_usage);
        let c = &s.config;
        assert_eq!(
            (c.temperature, c.top_p, c.top_k, c.min_p, c.typical_p),
            (0.5, 0.9, 5, 0.1, 0.8)
        );
        assert_eq!(
            (
                c.presence_penalty,
                c.frequency_penalty,
                c.repetition_penalty
            ),
            (0.5, -0.5, 1.1)
        );
        assert_eq!(c.stop_strings, ["a", "b"]);
        assert_eq!(c.logit_bias, [(7, f32::NEG_INFINITY), (8, 3.0)]);
        assert_eq!(r.messages, [ChatMessage::new("user", "hi")]);
        assert_eq!(s.response_format, None);
        let format = |f: &str| {
            chat(&format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{f}}}"#
            ))
            .unwrap()
            .sampling
            .response_format
        };
        assert_eq!(format(r#"{"type":"text"}"#), None);
        assert_eq!(
            format(r#"{"type":"json_object"}"#),
            Some(JsonFormat::Object)
        );
        assert_eq!(
            format(
                r#"{"type":"json_schema","json_schema":{"name":"p-1","strict":true,
                "description":"d","schema":{"type":"integer"}}}"#
            ),
            Some(JsonFormat::Schema {
                name: "p-1".into(),
                schema: serde_json::json!({"type": "integer"})
            })
        );
        // No schema: any JSON value.
        assert_eq!(
            format(r#"{"type":"json_schema","json_schema":{"name":"any"}}"#),
            Some(JsonFormat::Schema {
                name: "any".into(),
                schema: serde_json::json!({})
            })
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
            (r#"{"messages":[]}"#, "messages"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":1000000000}"#,
                "n",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":100000000000}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1000":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"frobnicate":1}"#,
                "frobnicate",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[]}"#,
                "tools",
            ),
            (
                r#"{"messages":[{"role":"robot","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}"#,
                "response_format.type",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":"json"}"#,
                "response_format",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object","schema":{}}}"#,
                "response_format.schema",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema"}}"#,
                "response_format.json_schema",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}"#,
                "response_format.json_schema.name",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"a b","schema":{}}}}"#,
                "response_format.json_schema.name",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schema":[1]}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","strict":"yes"}}}"#,
                "response_format.json_schema.strict",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schemas":{}}}}"#,
                "response_format.json_schema.schemas",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
                "stop",
            ),
            (r#"{"model":"m"}"#, "messages"),
        ];
        for (body, field) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"temperature":1e300}"#)
            .unwrap_err();
        assert_eq!(
            e.message,
            "temperature = 1e300: expected a number from 0 to 2 (0 is greedy)"
        );
        // The untagged types say what they take, not serde's "did not match any variant".
        let e = chat(r#"{"messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert!(
            e.message.contains("a string, null, or a list of parts"),
            "{}",
            e.message
        );
        let e = chat(r#"{"messages":[{"role":"user","content":"x"}],"stop":{}}"#).unwrap_err();
        assert!(
            e.message.contains("a string or a list of strings"),
            "{}",
            e.message
        );
        assert_eq!(
            chat("{\"messages\": [").unwrap_err().code,
            Some("invalid_json")
        );
        assert_eq!(chat("[1]").unwrap_err().code, Some("invalid_json"));
    }

    fn tiny() -> LoadedEngineModel {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny");
        LoadedEngineModel::load(std::path::Path::new(dir)).expect("models/bitnet-tiny")
    }

    #[test]
    fn a_conversation_whose_rendering_cannot_fit_is_refused_before_tokenizing() {
        let model = tiny();
        // 61,000 empty messages: a 1 MiB body whose messages have no bytes at all, which
        // the template renders to ~1 MB of text. Tokenizing that took ~100 MB and 0.75 s of
        // CPU before it was refused for its 244,004 tokens (found by reading, issue 18).
        let messages = vec![ChatMessage::new("user", ""); 61_000];
        let e = chat_prompt(&model, &messages, 64).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"), "{}", e.message);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.contains("rendered conversation") && e.message.contains("before tokenizing"),
            "{}",
            e.message
        );
        // Messages whose own bytes cannot fit are refused before rendering.
        let long = vec![ChatMessage::new("user", "a ".repeat(5_000))];
        let e = chat_prompt(&model, &long, 64).unwrap_err();
        assert!(
            e.message.contains("the messages of 10000 bytes"),
            "{}",
            e.message
        );
        // What fits is rendered and tokenized as the engine does it.
        let hi = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            chat_prompt(&model, &hi, 64).unwrap(),
            model.encode_chat(&hi).unwrap()
        );
    }

    /// `/tokenize` and `/detokenize` were bounded only by `--max-body` (1 MiB of text took
    /// ~150 MB to tokenize; 1 MiB of ids decodes to up to ids × the longest token).
    #[test]
    fn tokenize_and_detokenize_are_bounded_by_the_context() {
        let model = tiny();
        let max = model.tokenizer.max_text_bytes(64);
        let e = tokenize_content(&model, &"a".repeat(max + 1), true, 64).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("content"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(
            e.message
                .contains(&format!("the content of {} bytes", max + 1))
                && e.message.contains("before tokenizing"),
            "{}",
            e.message
        );
        // Within the bytes, but more tokens than the context.
        let e = tokenize_content(&model, &"a b ".repeat(40), true, 64).unwrap_err();
        assert!(
            e.message
                .contains("more than this server's context size of 64 tokens"),
            "{}",
            e.message
        );
        let ids = tokenize_content(&model, "Hello world", true, 64).unwrap();
        assert_eq!(ids, model.tokenizer.encode("Hello world", true).unwrap());

        let e = detokenize_tokens(&model, &[5; 65], 64).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tokens"));
        assert!(
            e.message.contains("tokens has 65 ids: expected at most"),
            "{}",
            e.message
        );
        let e = detokenize_tokens(&model, &[5, 4096], 64).unwrap_err();
        assert!(e.message.contains("tokens[1] = 4096"), "{}", e.message);
        assert_eq!(
            detokenize_tokens(&model, &ids, 64).unwrap(),
            model.tokenizer.decode(&ids).unwrap()
        );
        // The bodies: unknown fields and wrong types are named.
        let e = tokenize_request(br#"{"content": "x", "contnet": 1}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("contnet"), "{}", e.message);
        let e = detokenize_request(br#"{"tokens": [1, -1]}"#).err().unwrap();
        assert!(e.message.contains("tokens"), "{}", e.message);
    }

    #[test]
    fn scheduler_requests_check_each_prompt_against_the_context() {
        let mut r = completion(r#"{"prompt":"x","n":3,"max_tokens":4,"logprobs":2}"#).unwrap();
        r.sampling.seed = Some(u64::MAX);
        let ids = vec![vec![5, 6, 7]];
        let reqs = scheduler_requests(&ids, &r.sampling, 16, "prompt", u64::MAX).unwrap();
        assert_eq!(reqs.len(), 3);
        let seeds: Vec<u64> = reqs.iter().map(|q| q.config.seed).collect();
        assert_eq!(
            seeds,
            [u64::MAX, 0, 1],
            "one generator per choice, wrapping"
        );
        assert!(reqs
            .iter()
            .all(|q| q.prompt == ids[0] && q.config.max_new_tokens == 4 && q.logprobs == Some(2)));
        let err = |prompts: &[Vec<u32>], context| {
            scheduler_requests(prompts, &r.sampling, context, "prompt", 1).unwrap_err()
        };
        assert_eq!(err(&[vec![]], 16).message, "the prompt is empty");
        let e = err(&[vec![1; 16]], 16);
        assert!(
            e.message.contains("the prompt has 16 tokens"),
            "{}",
            e.message
        );
        let e = err(&[vec![1], vec![1; 13]], 16);
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{}", e.message);
        assert!(e.message.contains("together 17 tokens"), "{}", e.message);
        // Without max_tokens, a choice may use the rest of the context.
        r.sampling.max_tokens = None;
        let reqs = scheduler_requests(&[vec![1; 10]], &r.sampling, 16, "prompt", 1).unwrap();
        assert_eq!(reqs[0].config.max_new_tokens, 6);
    }

    #[test]
    fn prompts_as_text_or_ids() {
        let p = |b: &str| completion(b).map(|r| r.prompts);
        assert_eq!(
            p(r#"{"prompt":"hi"}"#).unwrap(),
            [Prompt::Text("hi".into())]
        );
        assert_eq!(p(r#"{"prompt":[1,2]}"#).unwrap(), [Prompt::Ids(vec![1, 2])]);
        assert_eq!(
            p(r#"{"prompt":["a",[3]]}"#).unwrap(),
            [Prompt::Text("a".into()), Prompt::Ids(vec![3])]
        );
        for bad in [
            r#"{"prompt":[-1]}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":5}"#,
            r#"{"prompt":[1.5]}"#,
            r#"{"prompt":[{}]}"#,
        ] {
            assert_eq!(
                p(bad).unwrap_err().param.as_deref(),
                Some("prompt"),
                "{bad}"
            );
        }
        let e = completion(r#"{"prompt":["a","b","c"],"n":8}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        assert_eq!(
            completion(r#"{"prompt":"a","echo":true}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("echo")
        );
        assert_eq!(
            completion(r#"{"prompt":"a","logprobs":21}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("logprobs")
        );
    }
}
