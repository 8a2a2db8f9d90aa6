//! The fuzz targets of issue 18 (docs/RELIABILITY.md): one function per reader of untrusted
//! input, each taking the input as bytes or text and returning its outcome as text (an
//! error's message, or a summary starting with `ok`). Two drivers share them: the randomized,
//! structure-aware `bitnet-fuzz` binary (stable toolchain, `scripts/fuzz`) and the
//! coverage-guided afl.rs binary (`--features afl`, `scripts/fuzz-afl`), so both test the
//! same code in the same way.
//!
//! A target never catches a panic itself: a panic, an abort or a hang is the finding.

use bitnet_inference::chat::{ChatMessage, ChatTemplate};
use bitnet_inference::engine::{
    EngineConfig, GenerationConfig, LoadedEngineModel, ModelOptions, TextGenerator,
};
use bitnet_inference::generate::json::{JsonFormat, JsonGrammars};
use bitnet_inference::generate::TokenMask;
use bitnet_inference::model;
use bitnet_inference::scheduler::{DynamicBatchProcessor, Event, SchedulerConfig};
use bitnet_inference::tokenizer::Tokenizer;
use bitnet_server::api;
use std::path::Path;
use std::sync::Arc;

/// The repository's test fixtures (seed corpora).
pub const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../bitnet-inference/tests/fixtures"
);
/// The tiny trained model the server target serves.
pub const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny");

/// A GGUF file: loaded, and when it loads, exercised (see [`exercise`]).
pub fn gguf(data: &[u8], dir: &Path) -> String {
    let path = dir.join("model.gguf");
    if let Err(e) = std::fs::write(&path, data) {
        return format!("write failed: {e}");
    }
    match model::load(&path) {
        Err(e) => e.to_string(),
        Ok(m) => exercise(&m, &path),
    }
}

/// A Hugging Face directory of `files` (name, bytes): loaded, and exercised when it loads.
pub fn hf(files: &[(String, Vec<u8>)], dir: &Path) -> String {
    let d = dir.join("hf");
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    for (name, data) in files {
        let _ = std::fs::write(d.join(name), data);
    }
    match model::load(&d) {
        Err(e) => e.to_string(),
        Ok(m) => exercise(&m, &d),
    }
}

/// The files a Hugging Face directory may hold that the `hf` target writes (any other name
/// in an input is skipped: a name is never a path).
pub const HF_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];

/// A model directory as one file (the `hf` target's inputs, saved findings and corpus):
/// for each file, `=== NAME LEN` on a line, then its LEN bytes and a newline.
pub fn files_bytes(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(format!("=== {name} {}\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.push(b'\n');
    }
    out
}

/// Reads [`files_bytes`]' format from any bytes (afl mutates it too): a header that does not
/// parse ends the list; a length past the end takes the bytes left; names not in `allowed`
/// (such as [`HF_FILES`]) are skipped, and so are repeated ones.
pub fn parse_files(bytes: &[u8], allowed: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut rest = bytes;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let head = String::from_utf8_lossy(&rest[..nl]).into_owned();
        let Some(head) = head.strip_prefix("=== ") else {
            break;
        };
        let Some((name, len)) = head.rsplit_once(' ') else {
            break;
        };
        let Ok(len) = len.parse::<usize>() else {
            break;
        };
        let body = &rest[nl + 1..];
        let len = len.min(body.len());
        if allowed.contains(&name) && !files.iter().any(|(n, _)| n == name) {
            files.push((name.to_string(), body[..len].to_vec()));
        }
        rest = &body[(len + 1).min(body.len())..];
    }
    files
}

/// What a loaded model offers an attacker next: its tokenizer on text, its template, and a
/// few tokens generated (one compute thread, a 32-token context).
fn exercise(m: &model::LoadedModel, path: &Path) -> String {
    let mut out = format!("ok {}", m.format);
    let options = ModelOptions {
        threads: Some(1),
        ..Default::default()
    };
    match LoadedEngineModel::load_with(path, &options) {
        Err(e) => out = e.to_string(),
        Ok(engine) => {
            let config = EngineConfig {
                context_size: Some(32),
                model: options,
                ..Default::default()
            };
            let generated = TextGenerator::new(Arc::new(engine), config)
                .and_then(|mut g| g.generate("Hello world", &GenerationConfig::greedy(3)));
            if let Err(e) = generated {
                out = e.to_string();
            }
        }
    }
    if let Ok(ids) = m.tokenizer.encode("Hello <|eot_id|> world é🦀", true) {
        let _ = m.tokenizer.decode(&ids);
    }
    if let Some(src) = &m.chat_template {
        if let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") {
            if let Err(e) = t.render(&[ChatMessage::new("user", "hi")], true) {
                out = e.to_string();
            }
        }
    }
    out
}

/// The tokenizers the `tokenizer` target runs: bitnet-tiny's `tokenizer.json` and the GGUF
/// BPE vocabulary of the I2_S fixture.
pub fn tokenizers() -> Vec<Tokenizer> {
    let mut v = vec![
        Tokenizer::from_file(&Path::new(TINY).join("tokenizer.json"))
            .expect("bitnet-tiny tokenizer"),
    ];
    if let Ok(f) = bitnet_inference::formats::gguf::GgufFile::open(
        Path::new(FIXTURES).join("bitnet-packed-gguf/model-i2s.gguf"),
    ) {
        v.extend(Tokenizer::from_gguf(&f.metadata, &f.path));
    }
    v
}

/// A text encoded and decoded by each tokenizer.
pub fn tokenize(tokenizers: &[Tokenizer], text: &str) -> String {
    let mut out = String::new();
    for tk in tokenizers {
        match tk.encode(text, true) {
            Err(e) => out.push_str(&e.to_string()),
            Ok(ids) => {
                let _ = tk.decode(&ids);
                out.push_str("ok ");
            }
        }
    }
    out
}

/// A chat template compiled and rendered (with its work and output budgets) for `messages`.
pub fn template(source: &str, messages: &[ChatMessage]) -> String {
    match ChatTemplate::new(source, "<s>", "</s>") {
        Err(e) => e.to_string(),
        Ok(t) => match t.render(messages, true) {
            Err(e) => e.to_string(),
            Ok(s) => format!("ok {}", s.len().min(1)),
        },
    }
}

/// The model the `schema` and `jsonl` targets use: bitnet-tiny, on one thread.
pub fn tiny_model() -> LoadedEngineModel {
    let options = ModelOptions {
        threads: Some(1),
        ..Default::default()
    };
    LoadedEngineModel::load_with(Path::new(TINY), &options).expect("bitnet-tiny")
}

/// The seed corpus of the `schema` target: JSON schemas, one a file.
pub const SCHEMA_SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/schema");

/// Tokens the `schema` target walks through a compiled grammar.
const SCHEMA_STEPS: usize = 16;

/// A JSON schema (a request's `response_format.json_schema.schema`) compiled by
/// `JsonGrammars::compile` against `model`'s vocabulary, as the server does; when it
/// compiles, a matcher is started and walked for up to 16 tokens, each step taking the
/// allowed token chosen by the input's bytes, so masks are computed deep in the grammar.
pub fn schema(grammars: &JsonGrammars, vocab: usize, data: &[u8]) -> String {
    let schema = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(v) => v,
        Err(e) => return format!("not JSON: {e}"),
    };
    let format = JsonFormat::Schema {
        name: "fuzz".into(),
        schema,
    };
    let constraint = match grammars.compile(&format) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut matcher = match constraint.start() {
        Ok(m) => m,
        Err(e) => return e,
    };
    let mut mask = TokenMask::default();
    // A choice among the allowed tokens that depends on the input (FNV-1a of its bytes).
    let mut h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    for step in 0..SCHEMA_STEPS {
        mask.clear(vocab);
        let may_end = match matcher.next_allowed(&mut mask) {
            Ok(e) => e,
            Err(e) => return e,
        };
        let allowed = mask.count();
        if allowed == 0 {
            return format!("ok ended after {step} tokens (may end: {may_end})");
        }
        h = h.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let nth = (h % allowed as u64) as usize;
        let Some(token) = (0..vocab as u32).filter(|&t| mask.is_allowed(t)).nth(nth) else {
            return "ok".into();
        };
        if let Err(e) = matcher.accept(token) {
            return e;
        }
        if matcher.is_complete() {
            return "ok complete".into();
        }
    }
    "ok".into()
}

/// The `schema` target's compiler: bitnet-tiny's vocabulary, as the server builds it.
pub fn json_grammars(model: &LoadedEngineModel) -> JsonGrammars {
    JsonGrammars::for_model(model).expect("bitnet-tiny supports response_format")
}

/// A line of a `bitnet batch` JSONL input, read as `bitnet batch` reads it (and as an
/// earlier output's line when resuming); see `bitnet_cli::commands::batch::fuzz::line`.
pub fn jsonl(model: &LoadedEngineModel, line: &[u8]) -> String {
    bitnet_cli::commands::batch::fuzz::line(model, &String::from_utf8_lossy(line))
}

/// The conversation a template source is rendered for when the input is only the source
/// (afl's `template` inputs, and `--replay template` of such a file).
pub fn fixed_conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "Hi there <|eot_id|> é🦀"),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Tell me a story."),
    ]
}

/// The server's endpoints whose bodies the `request` target reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Tokenize,
    Detokenize,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Tokenize,
        Endpoint::Detokenize,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Tokenize => "/tokenize",
            Endpoint::Detokenize => "/detokenize",
        }
    }

    /// The fields of this endpoint's bodies alone.
    pub fn own_fields(self) -> &'static [&'static str] {
        use bitnet_server::api;
        match self {
            Endpoint::Chat => api::CHAT_ONLY,
            Endpoint::Completions => api::COMPLETION_ONLY,
            Endpoint::Tokenize => api::TOKENIZE_FIELDS,
            Endpoint::Detokenize => api::DETOKENIZE_FIELDS,
        }
    }
}

/// The seed corpus of the `request` target: valid requests of both endpoints using every
/// field, in the format of [`request_bytes`].
pub const REQUEST_SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/request");

/// More chat templates for the `template` target's seeds (besides the built-in 2B-4T one and
/// bitnet-tiny's).
pub const TEMPLATE_SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/template");

/// A request as one file: `POST PATH` on the first line, then the body (the format of the
/// seed corpus, of saved findings and of afl's inputs).
pub fn request_bytes(endpoint: Endpoint, body: &[u8]) -> Vec<u8> {
    let mut out = format!("POST {}\n", endpoint.path()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads [`request_bytes`]' format; the first line picks the endpoint by a word of its path
/// (`chat`, `completions`, `detokenize`, `tokenize`, in that order), so afl's mutations of it
/// still do; a first line with none of them is part of a chat request's body.
pub fn parse_request_bytes(bytes: &[u8]) -> (Endpoint, &[u8]) {
    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
        return (Endpoint::Chat, bytes);
    };
    let line = &bytes[..nl];
    let has = |w: &[u8]| line.windows(w.len()).any(|x| x == w);
    let body = &bytes[nl + 1..];
    if has(b"chat") {
        (Endpoint::Chat, body)
    } else if has(b"completions") {
        (Endpoint::Completions, body)
    } else if has(b"detokenize") {
        (Endpoint::Detokenize, body)
    } else if has(b"tokenize") {
        (Endpoint::Tokenize, body)
    } else {
        (Endpoint::Chat, bytes)
    }
}

/// The server's view of its model, as `bitnet serve` builds it, for the `request` target:
/// bitnet-tiny (with its chat template and generation_config.json defaults) on one thread,
/// a small context so that the length checks are reached, and a scheduler run in this
/// thread.
///
/// Every request runs on a new scheduler (the model is shared): one input's outcome and
/// path never depend on the inputs before it (the prefix cache, slot order), which afl's
/// persistent mode needs to be stable.
pub struct Server {
    model: Arc<LoadedEngineModel>,
    sched: SchedulerConfig,
    grammars: JsonGrammars,
    defaults: GenerationConfig,
    context: usize,
    vocab: usize,
}

/// Tokens each accepted request may generate in the `request` target (sampling with its
/// values runs; a long generation would only slow the fuzzer).
const GENERATED: usize = 2;

impl Server {
    pub fn new() -> Server {
        let options = ModelOptions {
            threads: Some(1),
            ..Default::default()
        };
        let model =
            Arc::new(LoadedEngineModel::load_with(Path::new(TINY), &options).expect("bitnet-tiny"));
        let sched = SchedulerConfig {
            max_running: 2,
            max_queue: 64,
            context_size: Some(64),
            step_tokens: 64,
            kv_cache_bytes: None,
            prefix_cache: true,
        };
        let processor = DynamicBatchProcessor::new(model.clone(), &sched).expect("a scheduler");
        Server {
            defaults: GenerationConfig::from_model(&model.generation),
            context: processor.context_size(),
            vocab: model.model.config().vocab_size,
            grammars: json_grammars(&model),
            sched,
            model,
        }
    }

    /// A request body on `endpoint`, as the server's handler takes it. `/tokenize` and
    /// `/detokenize`: read, then tokenized or decoded. The completion endpoints: read and checked
    /// (`api::*_request`), its messages rendered or prompt tokenized (`api::*_prompt*`),
    /// split into scheduler requests (`api::scheduler_requests`), its `response_format`
    /// compiled, and the first of those requests submitted with it to a new scheduler and
    /// run for [`GENERATED`] tokens.
    pub fn request(&mut self, endpoint: Endpoint, body: &[u8]) -> String {
        let (prompts, sampling, field) = match endpoint {
            // The tokenizer routes: read, then tokenized or decoded as the handlers do.
            Endpoint::Tokenize => {
                return match api::tokenize_request(body).and_then(|r| {
                    let special = r.add_special.unwrap_or(true);
                    api::tokenize_content(&self.model, &r.content, special, self.context)
                }) {
                    Ok(ids) => format!("ok {}", ids.len().min(1)),
                    Err(e) => e.message,
                };
            }
            Endpoint::Detokenize => {
                return match api::detokenize_request(body)
                    .and_then(|r| api::detokenize_tokens(&self.model, &r.tokens, self.context))
                {
                    Ok(_) => "ok".into(),
                    Err(e) => e.message,
                };
            }
            Endpoint::Chat => {
                let r = match api::chat_request(body, &self.defaults, self.context, self.vocab) {
                    Ok(r) => r,
                    Err(e) => return e.message,
                };
                match api::chat_prompt(&self.model, &r.messages, self.context) {
                    Ok(ids) => (vec![ids], r.sampling, "messages"),
                    Err(e) => return e.message,
                }
            }
            Endpoint::Completions => {
                let r =
                    match api::completion_request(body, &self.defaults, self.context, self.vocab) {
                        Ok(r) => r,
                        Err(e) => return e.message,
                    };
                match api::completion_prompts(&self.model, r.prompts, self.context) {
                    Ok(ids) => (ids, r.sampling, "prompt"),
                    Err(e) => return e.message,
                }
            }
        };
        let seed = sampling.seed.unwrap_or(0);
        let requests = match api::scheduler_requests(&prompts, &sampling, self.context, field, seed)
        {
            Ok(r) => r,
            Err(e) => return e.message,
        };
        let Some(mut first) = requests.into_iter().next() else {
            return "no requests".into();
        };
        first.config.max_new_tokens = first.config.max_new_tokens.min(GENERATED);
        if let Some(format) = &sampling.response_format {
            match self.grammars.compile(format) {
                Ok(c) => first = first.with_constraint(c),
                Err(e) => return e,
            }
        }
        let mut processor = match DynamicBatchProcessor::new(self.model.clone(), &self.sched) {
            Ok(p) => p,
            Err(e) => return e.to_string(),
        };
        let stream = match processor.submit(first) {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        processor.run_until_idle();
        let mut out = String::from("ok");
        while let Some(event) = stream.try_recv() {
            if let Event::Error(e) = event {
                out = e.to_string();
            }
        }
        out
    }
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// afl mutates the `hf` target's files format freely: any bytes parse, a name is never a
    /// path, and a well-formed directory comes back as it was written.
    #[test]
    fn files_format_round_trips_and_takes_only_known_names() {
        let files = vec![
            ("config.json".to_string(), b"{\"a\": 1}\n".to_vec()),
            ("model.safetensors".to_string(), vec![0, 10, 255]),
        ];
        assert_eq!(parse_files(&files_bytes(&files), &HF_FILES), files);
        let hostile = b"=== ../../etc/passwd 3\nabc\n=== config.json 99999999999\n{}";
        assert_eq!(
            parse_files(hostile, &HF_FILES),
            [("config.json".to_string(), b"{}".to_vec())]
        );
        for junk in [
            &b""[..],
            b"\n",
            b"===",
            b"=== x\n",
            b"=== config.json -1\nx",
            b"\xff\n\n",
        ] {
            assert!(parse_files(junk, &HF_FILES).is_empty(), "{junk:?}");
        }
    }

    #[test]
    fn request_files_name_their_endpoint() {
        for e in Endpoint::ALL {
            assert_eq!(
                parse_request_bytes(&request_bytes(e, b"{}")),
                (e, &b"{}"[..])
            );
        }
        // No endpoint named: the whole input is a chat body.
        assert_eq!(
            parse_request_bytes(b"{}\n{}"),
            (Endpoint::Chat, &b"{}\n{}"[..])
        );
    }
}
