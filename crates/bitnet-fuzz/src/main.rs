//! Randomized fuzzing of everything that reads untrusted input (issue 18, docs/RELIABILITY.md):
//! GGUF files, Hugging Face directories (config.json, generation_config.json,
//! tokenizer_config.json, tokenizer.json, safetensors), tokenizers on arbitrary text, chat
//! templates, the server's request bodies, JSON schemas (`response_format`) and `bitnet
//! batch`'s JSONL lines. Runs on the stable toolchain, in-process, single-threaded:
//!
//! ```text
//! cargo run --profile ci -p bitnet-fuzz -- [--seconds N] [--seed N]
//!     [--target gguf|hf|tokenizer|template|request|schema|jsonl|all] [--out DIR]
//! cargo run --profile ci -p bitnet-fuzz -- --replay TARGET FILE
//! cargo run --profile ci -p bitnet-fuzz -- --write-seeds TARGET DIR
//! ```
//!
//! The targets themselves are in the library (`bitnet_fuzz::*`), shared with the afl.rs
//! driver (`src/bin/afl.rs`). Inputs are mutated from a seed corpus of the repository's own
//! fixtures, structure-aware (a GGUF metadata value or a JSON value replaced by an edge case,
//! a tensor's shape or type changed, a template assembled from Jinja fragments, a request
//! field given a hostile value) and byte-level (flips, interesting integers, truncation,
//! splices). There is no coverage instrumentation; instead an input
//! whose outcome (the error message with numbers and paths stripped) is new joins the
//! corpus, so mutations keep exploring from inputs that reached new checks. The corpus is
//! kept in `OUT/corpus/TARGET/` (and the outcomes seen in `OUT/corpus/TARGET.seen`) and read
//! back when a run starts, so that runs with the same `--out` accumulate.
//!
//! A finding is a panic, an input that takes more than `--hang-seconds` (default 10) of CPU
//! time, one that does not return (a watchdog: 12 × that of CPU time, or 30 minutes of wall
//! time), or an allocation past `--max-alloc-mib` (default 2048; the process then aborts,
//! and the input is in `OUT/current`). Findings are written to `OUT/findings/` and the exit
//! status is 1.

use bitnet_fuzz::{Endpoint, Server, FIXTURES, TINY};
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::formats::gguf::{GgufFile, GgufValue, GgufWriter};
use bitnet_inference::generate::json::JsonGrammars;
use bitnet_inference::rng::Rng;
use bitnet_inference::tokenizer::Tokenizer;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes and refuses (so the process aborts) past a cap: an input that
/// makes the engine allocate in proportion to a number it merely claims is a finding.
struct CappedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

// SAFETY: every call is forwarded to `System` with the caller's layout unchanged; the
// counter is only bookkeeping, and a refusal returns null, which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if LIVE.load(Ordering::Relaxed).saturating_add(layout.size()) > CAP.load(Ordering::Relaxed)
        {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = new_size.saturating_sub(layout.size());
        if LIVE.load(Ordering::Relaxed).saturating_add(grow) > CAP.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`/`dealloc`: the caller's contract passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

/// The watchdog's view of the input running: when it started (ms since `WATCH_EPOCH`, plus
/// one; 0 while none runs) and the process's CPU time then.
static WATCH_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static RUNNING_SINCE_MS: AtomicU64 = AtomicU64::new(0);
static CPU_AT_START_NS: AtomicU64 = AtomicU64::new(0);

struct Args {
    seconds: f64,
    seed: u64,
    targets: Vec<String>,
    out: PathBuf,
    hang: Duration,
}

fn parse_args() -> Args {
    let mut a = Args {
        seconds: 60.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        targets: vec!["all".into()],
        out: std::env::temp_dir().join("bitnet-fuzz"),
        hang: Duration::from_secs(10),
    };
    let mut cap_mib = 2048usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--seconds" => a.seconds = val().parse().unwrap_or_else(|_| usage("--seconds")),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage("--seed")),
            "--target" => a.targets = val().split(',').map(str::to_string).collect(),
            "--out" => a.out = PathBuf::from(val()),
            "--hang-seconds" => {
                a.hang = Duration::from_secs(val().parse().unwrap_or_else(|_| usage("--hang")))
            }
            "--max-alloc-mib" => cap_mib = val().parse().unwrap_or_else(|_| usage("--max-alloc")),
            other => usage(&format!("unknown flag {other}")),
        }
    }
    if a.targets == ["all"] {
        a.targets = TARGETS.iter().map(|s| s.to_string()).collect();
    }
    for t in &a.targets {
        if !TARGETS.contains(&t.as_str()) {
            usage(&format!("unknown target {t}"));
        }
    }
    CAP.store(cap_mib << 20, Ordering::Relaxed);
    a
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "fuzz: {msg}\nusage: fuzz [--seconds N] [--seed N] [--target {}|all] [--out DIR] \
         [--hang-seconds N] [--max-alloc-mib N]",
        TARGETS.join("|")
    );
    std::process::exit(2)
}

const TARGETS: [&str; 7] = [
    "gguf",
    "hf",
    "tokenizer",
    "template",
    "request",
    "schema",
    "jsonl",
];

/// Inputs kept in memory per target (seeds, read back and new); at most half of them read
/// back, so that a run's new inputs find room; and bytes of them read back.
const MAX_CORPUS: usize = 2000;
const MAX_READ_BACK: usize = MAX_CORPUS / 2;
const MAX_READ_BACK_BYTES: usize = 256 << 20;

/// One input: the files of a model (name → bytes), or a template and its messages, or a
/// text, or a request body and its endpoint, or a JSON schema's bytes, or a JSONL line.
#[derive(Clone)]
enum Input {
    Files(Vec<(String, Vec<u8>)>),
    Template(String, Vec<(String, String)>),
    Text(String),
    Request(Endpoint, Vec<u8>),
    Schema(Vec<u8>),
    Line(String),
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Files(files) => bitnet_fuzz::files_bytes(files),
            Input::Template(t, msgs) => {
                let msgs: Vec<_> = msgs
                    .iter()
                    .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                    .collect();
                serde_json::to_vec_pretty(&serde_json::json!({"template": t, "messages": msgs}))
                    .unwrap_or_default()
            }
            Input::Text(t) | Input::Line(t) => t.as_bytes().to_vec(),
            Input::Request(endpoint, body) => bitnet_fuzz::request_bytes(*endpoint, body),
            Input::Schema(b) => b.clone(),
        }
    }

    /// The input as afl's driver takes it (`src/bin/afl.rs`): a template is its source
    /// alone; the rest as [`Input::bytes`].
    fn afl_bytes(&self) -> Vec<u8> {
        match self {
            Input::Files(files) if files.len() == 1 && files[0].0 == "model.gguf" => {
                files[0].1.clone()
            }
            Input::Template(t, _) => t.as_bytes().to_vec(),
            _ => self.bytes(),
        }
    }

    /// Reads `bytes` as `target`'s input: the format [`Input::bytes`] writes, or afl's (a
    /// raw GGUF file, a template's source alone).
    fn from_bytes(target: &str, bytes: &[u8]) -> Input {
        match target {
            "gguf" if bytes.starts_with(b"GGUF") => {
                Input::Files(vec![("model.gguf".into(), bytes.to_vec())])
            }
            "gguf" => Input::Files(bitnet_fuzz::parse_files(bytes, &["model.gguf"])),
            "hf" => Input::Files(bitnet_fuzz::parse_files(bytes, &bitnet_fuzz::HF_FILES)),
            "template" => match serde_json::from_slice::<serde_json::Value>(bytes) {
                // The JSON this driver writes: the template and its messages.
                Ok(v) if v["template"].is_string() => {
                    let msgs = v["messages"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|m| {
                                    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                                    (s("role"), s("content"))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Input::Template(v["template"].as_str().unwrap_or_default().to_string(), msgs)
                }
                // A template's source alone (afl's inputs), for the fixed conversation.
                _ => Input::Template(
                    String::from_utf8_lossy(bytes).into_owned(),
                    bitnet_fuzz::fixed_conversation()
                        .into_iter()
                        .map(|m| (m.role, m.content))
                        .collect(),
                ),
            },
            "request" => {
                let (endpoint, body) = bitnet_fuzz::parse_request_bytes(bytes);
                Input::Request(endpoint, body.to_vec())
            }
            "schema" => Input::Schema(bytes.to_vec()),
            "jsonl" => Input::Line(String::from_utf8_lossy(bytes).into_owned()),
            _ => Input::Text(String::from_utf8_lossy(bytes).into_owned()),
        }
    }
}

struct Target {
    name: &'static str,
    corpus: Vec<Input>,
    /// Outcome signatures seen (error text without numbers or paths).
    seen: HashSet<String>,
    execs: u64,
    errors: u64,
    oks: u64,
    seeds: usize,
    tokenizers: Vec<Tokenizer>,
    /// The `request` target's model and scheduler.
    server: Option<Server>,
    /// The model of the `schema` and `jsonl` targets, and the `schema` target's compiler.
    model: Option<LoadedEngineModel>,
    grammars: Option<JsonGrammars>,
    /// Inputs read back from an earlier run's corpus.
    read_back: usize,
    /// Inputs of new outcomes this run (all kept on disk; in memory up to the cap).
    new: usize,
}

/// Strips what varies between inputs of the same kind (digits, paths) from an outcome.
fn signature(outcome: &str) -> String {
    let mut s = String::with_capacity(outcome.len().min(200));
    for w in outcome.split_whitespace().take(24) {
        if w.contains('/') {
            s.push_str("<path> ");
            continue;
        }
        for c in w.chars().filter(|c| !c.is_ascii_digit()).take(40) {
            s.push(c);
        }
        s.push(' ');
    }
    s
}

/// `outcome` with the text between double quotes removed.
fn without_quoted(outcome: &str) -> String {
    let mut out = String::with_capacity(outcome.len().min(200));
    let mut quoted = false;
    for c in outcome.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).unwrap_or_else(|e| panic!("seed {}: {e}", path.as_ref().display()))
}

fn seeds(name: &str) -> Vec<Input> {
    let hf_dir = |d: &str| -> Input {
        let dir = Path::new(FIXTURES).join(d);
        let mut files = Vec::new();
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ] {
            let p = dir.join(f);
            if p.is_file() {
                files.push((f.to_string(), read(&p)));
            }
        }
        Input::Files(files)
    };
    match name {
        "gguf" => [
            "bitnet-packed-gguf/model-i2s.gguf",
            "bitnet-packed-gguf/model-tq10.gguf",
            "bitnet-packed-gguf/model-tq20.gguf",
            "bitnet-online-bf16-gguf/model-f32.gguf",
            // Issue 20: RoPE scaling keys and rope_freqs, qwen3, Q2_0 at both group sizes.
            "../fixtures-models/rope-yarn-gguf/model-i2s.gguf",
            "../fixtures-models/rope-llama3-gguf/model-i2s.gguf",
            "../fixtures-models/qwen3-bitnet-gguf/model-i2s.gguf",
            "../fixtures-models/qwen3-q2_0-g64/model-q2_0.gguf",
            "../fixtures-models/qwen3-q2_0-g128/model-q2_0.gguf",
        ]
        .iter()
        .map(|f| {
            Input::Files(vec![(
                "model.gguf".into(),
                read(Path::new(FIXTURES).join(f)),
            )])
        })
        .collect(),
        "hf" => [
            "bitnet-packed",
            "bitnet-autobitlinear",
            "bitnet-online-bf16",
            "llama-bitnet",
            "onebitllm",
            "../fixtures-models/rope-dynamic",
            "../fixtures-models/rope-longrope",
            "../fixtures-models/rope-llama3",
            "../fixtures-models/qwen3-bitnet",
        ]
        .iter()
        .map(|d| hf_dir(d))
        .collect(),
        "tokenizer" => [
            "Hello, world! The quick brown fox.",
            "<|begin_of_text|>User: hi<|eot_id|>Assistant:",
            "  leading   spaces\t\ttabs\n\nnewlines ",
            "émojis 🦀🚀 中文 日本語 العربية ﷺ",
            "<|eot_id|><|eot_id|><|end_of_text|><unk><s></s>",
        ]
        .iter()
        .map(|t| Input::Text(t.to_string()))
        .collect(),
        "template" => {
            let cfg: serde_json::Value =
                serde_json::from_slice(&read(Path::new(TINY).join("tokenizer_config.json")))
                    .unwrap_or_default();
            let mut v = vec![bitnet_inference::chat::BITNET_2B4T_TEMPLATE.to_string()];
            v.extend(cfg["chat_template"].as_str().map(str::to_string));
            let mut files: Vec<PathBuf> = std::fs::read_dir(bitnet_fuzz::TEMPLATE_SEEDS)
                .expect("the template seeds")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            v.extend(
                files
                    .iter()
                    .map(|f| String::from_utf8_lossy(&read(f)).into_owned()),
            );
            let msgs = vec![
                ("system".to_string(), "You are helpful.".to_string()),
                ("user".to_string(), "Hi there".to_string()),
            ];
            v.into_iter()
                .map(|t| Input::Template(t, msgs.clone()))
                .collect()
        }
        "request" => request_seeds(),
        "schema" => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(bitnet_fuzz::SCHEMA_SEEDS)
                .expect("the schema seeds")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            files.iter().map(|f| Input::Schema(read(f))).collect()
        }
        "jsonl" => bitnet_cli::commands::batch::fuzz::SEEDS
            .iter()
            .map(|l| Input::Line(l.to_string()))
            .collect(),
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------
// Mutations.

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[(rng.next_u64() % v.len() as u64) as usize]
}

fn below(rng: &mut Rng, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (rng.next_u64() % n as u64) as usize
    }
}

const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    3,
    7,
    8,
    31,
    32,
    64,
    255,
    256,
    4096,
    65535,
    65536,
    1 << 24,
    (1 << 24) + 1,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 62,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    let v = *pick(rng, &INTERESTING);
    match below(rng, 4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        _ => v,
    }
}

/// Byte-level mutations of one buffer.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, focus: usize) {
    // Most interesting bytes of a model are in the header: aim there half of the time.
    let span = |rng: &mut Rng, len: usize| {
        if len == 0 {
            0
        } else if below(rng, 2) == 0 {
            below(rng, len.min(focus.max(1)))
        } else {
            below(rng, len)
        }
    };
    for _ in 0..1 + below(rng, 4) {
        let len = data.len();
        match below(rng, 8) {
            0 | 1 => {
                if len > 0 {
                    let i = span(rng, len);
                    data[i] ^= 1 << below(rng, 8);
                }
            }
            2 => {
                if len > 0 {
                    let i = span(rng, len);
                    data[i] = rng.next_u64() as u8;
                }
            }
            3 | 4 => {
                let width = *pick(rng, &[1usize, 2, 4, 8]);
                if len >= width {
                    let i = span(rng, len - width + 1);
                    let v = interesting(rng).to_le_bytes();
                    data[i..i + width].copy_from_slice(&v[..width]);
                }
            }
            5 => {
                let cut = span(rng, len + 1);
                data.truncate(cut);
            }
            6 => {
                // Duplicate or delete a chunk.
                if len > 1 {
                    let a = span(rng, len);
                    let n = 1 + below(rng, (len - a).min(64));
                    if below(rng, 2) == 0 {
                        let chunk = data[a..a + n].to_vec();
                        let at = span(rng, len);
                        data.splice(at..at, chunk);
                    } else {
                        data.drain(a..a + n);
                    }
                }
            }
            _ => {
                // Interesting text (JSON numbers and words) inserted.
                let t = *pick(
                    rng,
                    &[
                        "-1",
                        "0",
                        "1e309",
                        "NaN",
                        "null",
                        "[]",
                        "{}",
                        "\"\"",
                        "4294967296",
                        "18446744073709551616",
                        "\\u0000",
                        "\u{1F980}",
                        "{{",
                        "{%",
                    ],
                );
                let at = span(rng, len + 1);
                data.splice(at..at, t.bytes());
            }
        }
    }
}

fn json_edge(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match below(rng, 10) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0.5),
        3 => json!(1e300),
        4 => json!("x"),
        5 => json!([]),
        6 => json!({}),
        7 => json!(true),
        8 => json!([1, 2, 3]),
        _ => json!(interesting(rng)),
    }
}

/// Replaces one value (anywhere in the tree) by an edge case, or removes an object key.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value, depth: usize) {
    use serde_json::Value;
    let descend = depth < 6 && below(rng, 3) != 0;
    match v {
        Value::Object(o) if !o.is_empty() => {
            let key = o
                .keys()
                .nth(below(rng, o.len()))
                .cloned()
                .unwrap_or_default();
            if descend {
                if let Some(child) = o.get_mut(&key) {
                    return mutate_json(rng, child, depth + 1);
                }
            }
            if below(rng, 4) == 0 {
                o.remove(&key);
            } else {
                o.insert(key, json_edge(rng));
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = below(rng, a.len());
            if descend {
                return mutate_json(rng, &mut a[i], depth + 1);
            }
            match below(rng, 3) {
                0 => {
                    a.remove(i);
                }
                1 => {
                    let x = a[i].clone();
                    a.insert(i, x);
                }
                _ => a[i] = json_edge(rng),
            }
        }
        _ => *v = json_edge(rng),
    }
}

fn gguf_edge(rng: &mut Rng, old: &GgufValue) -> GgufValue {
    let n = interesting(rng);
    match below(rng, 9) {
        0 => GgufValue::U32(n as u32),
        1 => GgufValue::U64(n),
        2 => GgufValue::I32(n as i32),
        3 => GgufValue::F32(*pick(
            rng,
            &[f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30, 1e-30],
        )),
        4 => GgufValue::String(pick(rng, &["", "llama", "gpt2", "bitnet", "x"]).to_string()),
        5 => GgufValue::Bool(below(rng, 2) == 0),
        6 => match old {
            GgufValue::Array(items) if !items.is_empty() => {
                let mut items = items.clone();
                match below(rng, 3) {
                    0 => {
                        let keep = below(rng, items.len());
                        items.truncate(keep);
                    }
                    1 => {
                        let i = below(rng, items.len());
                        items[i] = gguf_edge(rng, &items[i]);
                    }
                    _ => items.extend(items[..items.len().min(8)].to_vec()),
                }
                GgufValue::Array(items)
            }
            _ => GgufValue::Array(vec![GgufValue::U32(n as u32); below(rng, 4)]),
        },
        7 => match old {
            GgufValue::U32(v) => GgufValue::U32(v.wrapping_add(1)),
            GgufValue::U64(v) => GgufValue::U64(v.wrapping_mul(2)),
            _ => GgufValue::U32(0),
        },
        _ => GgufValue::U64(n),
    }
}

/// Structure-aware GGUF mutation: metadata values, tensor shapes, types and presence.
fn mutate_gguf(rng: &mut Rng, data: &[u8], scratch: &Path) -> Option<Vec<u8>> {
    std::fs::write(scratch, data).ok()?;
    let f = GgufFile::open(scratch).ok()?;
    let mut meta: Vec<(String, GgufValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = f
        .tensors
        .iter()
        .map(|t| {
            let bytes = f.tensor_data(t).map(<[u8]>::to_vec).unwrap_or_default();
            (t.name.clone(), t.dims.clone(), t.type_id, bytes)
        })
        .collect();
    for _ in 0..1 + below(rng, 3) {
        match below(rng, 10) {
            0..=5 if !meta.is_empty() => {
                let i = below(rng, meta.len());
                if below(rng, 8) == 0 {
                    meta.remove(i);
                } else {
                    let v = gguf_edge(rng, &meta[i].1);
                    meta[i].1 = v;
                }
            }
            6 if !tensors.is_empty() => {
                let i = below(rng, tensors.len());
                let t = &mut tensors[i];
                if !t.1.is_empty() {
                    let d = below(rng, t.1.len());
                    t.1[d] = if below(rng, 2) == 0 {
                        interesting(rng)
                    } else {
                        t.1[d] * 2
                    };
                }
            }
            7 if !tensors.is_empty() => {
                let i = below(rng, tensors.len());
                tensors[i].2 = *pick(rng, &[0, 1, 2, 8, 30, 34, 35, 36, 37, 99]);
            }
            8 if !tensors.is_empty() => {
                let i = below(rng, tensors.len());
                tensors.remove(i);
            }
            _ if !tensors.is_empty() => {
                // A tensor renamed (layer numbers past the claimed count).
                let i = below(rng, tensors.len());
                let n = format!("blk.{}.attn_q.weight", interesting(rng));
                tensors[i].0 = n;
            }
            _ => {}
        }
    }
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add_metadata(k, v);
    }
    for (name, dims, ty, bytes) in tensors {
        w.add_tensor_raw(name, &dims, ty, bytes);
    }
    Some(w.to_bytes())
}

const FRAGMENTS: [&str; 30] = [
    "{% for m in messages %}",
    "{% endfor %}",
    "{% for i in range(1000) %}",
    "{% for i in range(100000) %}",
    "{% if loop.first %}",
    "{% if m.role == 'user' %}",
    "{% else %}",
    "{% endif %}",
    "{{ m.content }}",
    "{{ m['content'] | trim }}",
    "{{ m.role | capitalize }}",
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{{ messages | tojson }}",
    "{{ 'x' * 1000 }}",
    "{{ 'x' * 99999999 }}",
    "{% set s = s ~ s %}",
    "{% set s = 'ab' %}",
    "{{ s }}",
    "{{ raise_exception('no') }}",
    "{{ strftime_now('%Y-%m-%d %A %B') }}",
    "{{ m.content.split(' ') | join('|') }}",
    "{{ m.content.upper() }}",
    "{{ range(10) | list }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}",
    "{{ f(0) }}",
    "{{ messages[-1].content[::-1] }}",
    "{{ (messages | length) * 1000000 }}",
    "{% if add_generation_prompt %}Assistant: {% endif %}",
    "text <|eot_id|>\n",
];

fn random_template(rng: &mut Rng) -> String {
    let mut t = String::new();
    for _ in 0..1 + below(rng, 12) {
        t.push_str(pick::<&str>(rng, &FRAGMENTS));
    }
    t
}

fn random_text(rng: &mut Rng) -> String {
    let pieces = [
        "a",
        " ",
        "  ",
        "\n",
        "\t",
        "é",
        "🦀",
        "中",
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<s>",
        "</s>",
        "<0x0A>",
        "▁",
        "hello",
        "Ġ",
        "\u{0}",
        "\u{FFFD}",
        "'s",
        "123",
        "...",
        "\r\n",
    ];
    let mut s = String::new();
    for _ in 0..below(rng, 64) {
        s.push_str(pick::<&str>(rng, &pieces));
    }
    s
}

fn mutate(rng: &mut Rng, input: &Input, scratch: &Path) -> Input {
    match input {
        Input::Files(files) => {
            let mut files = files.clone();
            let i = below(rng, files.len());
            let (name, data) = &mut files[i];
            let structured = below(rng, 2) == 0;
            if name.ends_with(".gguf") {
                match structured
                    .then(|| mutate_gguf(rng, data, scratch))
                    .flatten()
                {
                    Some(d) => *data = d,
                    None => mutate_bytes(rng, data, 4096),
                }
            } else if name.ends_with(".json") && structured {
                match serde_json::from_slice::<serde_json::Value>(data) {
                    Ok(mut v) => {
                        for _ in 0..1 + below(rng, 3) {
                            mutate_json(rng, &mut v, 0);
                        }
                        *data = serde_json::to_vec(&v).unwrap_or_default();
                    }
                    Err(_) => mutate_bytes(rng, data, 4096),
                }
            } else {
                // safetensors: the header is the first 8 + N bytes.
                let focus = if name.ends_with(".safetensors") && data.len() >= 8 {
                    8 + u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])) as usize
                } else {
                    data.len()
                };
                mutate_bytes(rng, data, focus);
            }
            Input::Files(files)
        }
        Input::Template(t, msgs) => {
            let mut t = t.clone();
            let mut msgs = msgs.clone();
            match below(rng, 4) {
                0 => t = random_template(rng),
                1 => {
                    let at = (0..=t.len())
                        .filter(|&i| t.is_char_boundary(i))
                        .nth(below(rng, t.len() + 1))
                        .unwrap_or(0);
                    t.insert_str(at, pick::<&str>(rng, &FRAGMENTS));
                }
                2 => {
                    let mut b = t.into_bytes();
                    mutate_bytes(rng, &mut b, usize::MAX);
                    t = String::from_utf8_lossy(&b).into_owned();
                }
                _ => {
                    let role = pick(rng, &["user", "assistant", "system", "tool", ""]).to_string();
                    msgs.push((role, random_text(rng)));
                }
            }
            Input::Template(t, msgs)
        }
        Input::Request(endpoint, body) => mutate_request(rng, *endpoint, body),
        Input::Schema(b) => Input::Schema(mutate_schema(rng, b)),
        Input::Line(l) => Input::Line(if below(rng, 4) == 0 {
            let mut b = l.clone().into_bytes();
            mutate_bytes(rng, &mut b, usize::MAX);
            String::from_utf8_lossy(&b).into_owned()
        } else {
            bitnet_cli::commands::batch::fuzz::mutate(rng, l)
        }),
        Input::Text(s) => {
            let mut b = s.clone().into_bytes();
            if below(rng, 2) == 0 {
                b.extend(random_text(rng).bytes());
            } else {
                mutate_bytes(rng, &mut b, usize::MAX);
            }
            Input::Text(String::from_utf8_lossy(&b).into_owned())
        }
    }
}

// ---------------------------------------------------------------------------------------
// JSON schemas.

/// Schema keywords, for keys inserted into a schema object.
const SCHEMA_KEYS: &[&str] = &[
    "type",
    "properties",
    "items",
    "prefixItems",
    "additionalProperties",
    "patternProperties",
    "required",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "uniqueItems",
    "contains",
    "if",
    "then",
    "else",
    "x-guidance",
];

/// A value that means something to a schema compiler: a small schema, a keyword's typical
/// argument, a hostile pattern or size.
fn schema_value(rng: &mut Rng, depth: usize) -> serde_json::Value {
    use serde_json::json;
    match below(rng, if depth > 3 { 12 } else { 16 }) {
        0 => {
            json!({"type": pick(rng, &["string", "integer", "number", "boolean", "null", "object", "array", "fancy"])})
        }
        1 => json!(["string", "null"]),
        2 => json!(pick(
            rng,
            &[
                "^[a-z]+$",
                "(a|b)*a(a|b){20}",
                "^(a+)+$",
                "[",
                "\\",
                ".*",
                "^\\d{3,}$",
                "(?=a)",
                "\\p{L}+",
                "[^\\x00-\\x7f]{2}"
            ]
        )),
        3 => json!(pick(
            rng,
            &[
                "date-time",
                "email",
                "uuid",
                "uri",
                "ipv4",
                "date",
                "time",
                "hostname",
                "unknown"
            ]
        )),
        4 => json!(interesting(rng)),
        5 => json!(-(interesting(rng) as i64)),
        6 => json!(pick(rng, &[0.5, -1.5, 1e300, 1e-300, 0.1])),
        7 => json!(pick(
            rng,
            &[
                "#",
                "#/$defs/a",
                "#/definitions/x",
                "#/properties/a",
                "http://example.com/s.json",
                "#/$defs/a/properties/b",
                "a"
            ]
        )),
        8 => json!(["a", "b"]),
        9 => json!([1, "a", null, true, {"a": 1}]),
        10 => json!({"a": {"type": "integer"}, "b": {"$ref": "#"}}),
        11 => json!(true),
        _ => {
            let k = pick(rng, &["anyOf", "oneOf", "allOf"]).to_string();
            let n = 1 + below(rng, 3);
            let v: Vec<_> = (0..n).map(|_| schema_value(rng, depth + 1)).collect();
            json!({ k: v })
        }
    }
}

/// The JSON pointers of every object in `v` (at most 10,000 of them).
fn object_pointers(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
    if out.len() >= 10_000 {
        return;
    }
    match v {
        serde_json::Value::Object(o) => {
            for (k, c) in o {
                let k = k.replace('~', "~0").replace('/', "~1");
                object_pointers(c, format!("{at}/{k}"), out);
            }
            out.push(at);
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                object_pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Structure-aware (a keyword added, a value replaced by a schema-like or edge value, the
/// whole wrapped in a combinator) or byte-level mutations of a schema.
fn mutate_schema(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let structured = below(rng, 4) != 0;
    let parsed = serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let Some(mut v) = parsed.filter(|_| structured) else {
        let mut b = bytes.to_vec();
        mutate_bytes(rng, &mut b, usize::MAX);
        return b;
    };
    for _ in 0..1 + below(rng, 3) {
        match below(rng, 5) {
            0 => mutate_json(rng, &mut v, 0),
            1 | 2 => {
                // A keyword set on a random object of the tree.
                let mut objects = Vec::new();
                object_pointers(&v, String::new(), &mut objects);
                if !objects.is_empty() {
                    let at = objects.swap_remove(below(rng, objects.len()));
                    let key = pick(rng, SCHEMA_KEYS).to_string();
                    let value = schema_value(rng, 0);
                    if let Some(o) = v.pointer_mut(&at).and_then(|o| o.as_object_mut()) {
                        o.insert(key, value);
                    }
                }
            }
            3 => {
                let k = pick(rng, &["anyOf", "allOf", "oneOf", "items"]).to_string();
                v = if k == "items" {
                    serde_json::json!({ k: v })
                } else {
                    serde_json::json!({ k: [v.clone(), schema_value(rng, 0)] })
                };
            }
            _ => {
                // A subtree copied elsewhere (recursion, size).
                let copy = v.clone();
                if let Some(o) = v.as_object_mut() {
                    let key = pick(
                        rng,
                        &["properties", "$defs", "items", "additionalProperties"],
                    );
                    o.insert(key.to_string(), serde_json::json!({"a": copy}));
                }
            }
        }
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Requests.

/// The server's largest body by default (`--max-body`): a larger one is a 413 before it is
/// read, so the fuzzer keeps its bodies within it.
const MAX_BODY: usize = 1 << 20;

fn request_seeds() -> Vec<Input> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(bitnet_fuzz::REQUEST_SEEDS)
        .expect("the request seeds")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let bytes = read(f);
            let (endpoint, body) = bitnet_fuzz::parse_request_bytes(&bytes);
            Input::Request(endpoint, body.to_vec())
        })
        .collect()
}

/// Field names no endpoint has (beside the server's own lists, `bitnet_server::api`).
const ODD_FIELDS: &[&str] = &["", "__proto__", "Max_Tokens", "messages\u{0}"];

/// Any field name: either endpoint's, one the server refuses by name, or an unknown one.
fn any_field(rng: &mut Rng) -> &'static str {
    use bitnet_server::api;
    let lists: [&[&'static str]; 5] = [
        api::COMMON,
        api::CHAT_ONLY,
        api::COMPLETION_ONLY,
        api::NOT_SUPPORTED,
        ODD_FIELDS,
    ];
    let list: &[&'static str] = pick::<&[&'static str]>(rng, &lists);
    pick::<&'static str>(rng, list)
}

/// Numbers at the edges of every range the server checks (and of the types it reads them
/// into), as JSON text so that values serde_json would not build (1e999, -0) are kept.
const REQUEST_NUMBERS: [&str; 34] = [
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "16",
    "17",
    "20",
    "21",
    "63",
    "64",
    "65",
    "100",
    "-100",
    "100.0000001",
    "-100.0000001",
    "4095",
    "4096",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "1e999",
    "-1e999",
    "1e-320",
    "0.5",
    "1.0000000000000002",
];

/// A hostile value for a request field: wrong types, edge numbers, NaN-ish strings, deep
/// nesting, long strings, and the shapes the server's fields take (stop lists, logit_bias
/// maps, messages, prompts of text or token ids) filled with edge cases. Returned as JSON
/// text.
fn request_value(rng: &mut Rng) -> String {
    let num = |rng: &mut Rng| pick::<&str>(rng, &REQUEST_NUMBERS).to_string();
    let text = |rng: &mut Rng| serde_json::to_string(&random_text(rng)).unwrap_or_default();
    let list = |rng: &mut Rng, n: usize, f: &dyn Fn(&mut Rng) -> String| {
        let items: Vec<String> = (0..n).map(|_| f(rng)).collect();
        format!("[{}]", items.join(","))
    };
    match below(rng, 16) {
        0 | 1 => num(rng),
        2 => pick::<&str>(
            rng,
            &[
                "null",
                "true",
                "false",
                "\"\"",
                "\"NaN\"",
                "\"Infinity\"",
                "\"-0\"",
                "\"1e999\"",
                "\"0x10\"",
                "\"5\"",
                "{}",
                "[]",
                "[null]",
                "{\"type\":\"json_object\"}",
                "{\"type\":\"text\",\"extra\":1}",
                "{\"include_usage\":\"yes\"}",
            ],
        )
        .to_string(),
        3 => text(rng),
        4 => {
            // A long string: a repeated piece, up to 300 KB.
            let piece = pick::<&str>(rng, &["a", "é", "🦀", " ", "<|eot_id|>", "\\n", "\\u0000"]);
            format!("\"{}\"", piece.repeat(1 + below(rng, 30_000)))
        }
        5 => {
            // Deep nesting, past serde_json's recursion limit of 128 half of the time.
            let depth = 1 + below(rng, 260);
            format!("{}{}{}", "[".repeat(depth), num(rng), "]".repeat(depth))
        }
        6 => {
            let n = *pick(rng, &[0usize, 1, 15, 16, 17, 100]);
            list(rng, n, &|rng: &mut Rng| match below(rng, 5) {
                0 => "\"\"".into(),
                1 => format!(
                    "\"{}\"",
                    "s".repeat(*pick(rng, &[1usize, 255, 256, 257, 5000]))
                ),
                2 => num(rng),
                _ => text(rng),
            })
        }
        7 => {
            // logit_bias: keys at and past the vocabulary, non-numeric keys, edge values.
            let n = *pick(rng, &[0usize, 1, 2, 50, 5000]);
            let entries: Vec<String> = (0..n)
                .map(|_| {
                    let key = pick::<&str>(
                        rng,
                        &[
                            "0",
                            "1",
                            "4095",
                            "4096",
                            "-1",
                            "01",
                            "+1",
                            " 1",
                            "1.0",
                            "1e3",
                            "4294967296",
                            "x",
                            "",
                            "١",
                        ],
                    );
                    format!("\"{key}\":{}", num(rng))
                })
                .collect();
            format!("{{{}}}", entries.join(","))
        }
        8 | 9 => {
            // messages: roles, content as text, parts, null or other types, names.
            let n = *pick(rng, &[0usize, 1, 2, 3, 50, 3000]);
            list(rng, n, &|rng: &mut Rng| {
                let role = pick::<&str>(
                    rng,
                    &[
                        "user",
                        "assistant",
                        "system",
                        "developer",
                        "tool",
                        "",
                        "USER",
                    ],
                );
                let content = match below(rng, 6) {
                    0 => "null".to_string(),
                    1 => format!(
                        "[{{\"type\":\"text\",\"text\":{}}},{{\"type\":\"{}\"}}]",
                        text(rng),
                        pick::<&str>(rng, &["text", "image_url", ""])
                    ),
                    2 => request_value_flat(rng),
                    _ => text(rng),
                };
                match below(rng, 8) {
                    0 => format!("{{\"role\":\"{role}\"}}"),
                    1 => format!("{{\"role\":\"{role}\",\"content\":{content},\"name\":\"n\"}}"),
                    2 => format!("{{\"content\":{content}}}"),
                    3 => format!("{{\"role\":\"{role}\",\"content\":{content},\"tool_calls\":[]}}"),
                    _ => format!("{{\"role\":\"{role}\",\"content\":{content}}}"),
                }
            })
        }
        10 | 11 => {
            // prompt: token ids around the vocabulary and the context, or lists of prompts.
            let id = |rng: &mut Rng| {
                pick::<&str>(
                    rng,
                    &[
                        "0",
                        "1",
                        "2",
                        "4095",
                        "4096",
                        "-1",
                        "1.0",
                        "1e3",
                        "4294967295",
                        "4294967296",
                        "\"7\"",
                        "null",
                    ],
                )
                .to_string()
            };
            match below(rng, 4) {
                0 => {
                    let n = *pick(rng, &[1usize, 2, 62, 63, 64, 65, 1000]);
                    list(rng, n, &|rng: &mut Rng| {
                        if below(rng, 4) == 0 {
                            id(rng)
                        } else {
                            (below(rng, 4096)).to_string()
                        }
                    })
                }
                1 => {
                    let n = *pick(rng, &[1usize, 2, 16, 17, 100]);
                    list(rng, n, &|rng: &mut Rng| {
                        if below(rng, 2) == 0 {
                            text(rng)
                        } else {
                            let k = 1 + below(rng, 70);
                            list(rng, k, &|rng: &mut Rng| id(rng))
                        }
                    })
                }
                _ => text(rng),
            }
        }
        12 => format!("\"{}\"", "x".repeat(*pick(rng, &[256usize, 257, 5000]))),
        _ => request_value_flat(rng),
    }
}

/// A value of the field's type near or in its range (so that requests get through the
/// checks with unusual combinations: every token banned, top_k 1 with min_p 1, ...).
fn plausible_value(rng: &mut Rng, field: &str) -> String {
    let f = |rng: &mut Rng, lo: f64, hi: f64| {
        let x = lo + (hi - lo) * (below(rng, 1001) as f64 / 1000.0);
        format!("{x}")
    };
    let i = |rng: &mut Rng, lo: usize, hi: usize| (lo + below(rng, hi - lo + 1)).to_string();
    match field {
        "max_tokens" | "max_completion_tokens" | "repeat_last_n" => i(rng, 0, 70),
        "n" | "best_of" => i(rng, 0, 17),
        "top_logprobs" => i(rng, 0, 21),
        "logprobs" => match below(rng, 3) {
            0 => "true".into(),
            1 => "false".into(),
            _ => i(rng, 0, 21),
        },
        "temperature" => f(rng, -0.1, 2.1),
        "top_p" | "min_p" | "typical_p" => f(rng, -0.01, 1.01),
        "presence_penalty" | "frequency_penalty" => f(rng, -2.1, 2.1),
        "repetition_penalty" => f(rng, -0.1, 10.5),
        "top_k" => i(rng, 0, 4097),
        "seed" => i(rng, 0, 1 << 20),
        "stop" => {
            let n = below(rng, 4);
            let items: Vec<String> = (0..n)
                .map(|_| serde_json::to_string(&random_text(rng)).unwrap_or_default())
                .collect();
            format!("[{}]", items.join(","))
        }
        "logit_bias" => {
            let n = *pick(rng, &[1usize, 2, 100, 4096]);
            let all = n == 4096;
            let entries: Vec<String> = (0..n)
                .map(|k| {
                    let id = if all { k } else { below(rng, 4096) };
                    let v = if all {
                        "-100".to_string()
                    } else {
                        f(rng, -100.0, 100.0)
                    };
                    format!("\"{id}\":{v}")
                })
                .collect();
            format!("{{{}}}", entries.join(","))
        }
        "stream" | "echo" | "ignore_eos" => pick::<&str>(rng, &["true", "false"]).to_string(),
        "stream_options" => "{\"include_usage\":true}".into(),
        "response_format" => match below(rng, 4) {
            0 => "{\"type\":\"text\"}".into(),
            1 => "{\"type\":\"json_object\"}".into(),
            _ => {
                let schema = pick::<&str>(
                    rng,
                    &[
                        r#"{"type":"object","properties":{"a":{"type":"integer","minimum":0,"maximum":9}},"required":["a"]}"#,
                        r#"{"type":"array","items":{"enum":["x","y"]},"maxItems":3}"#,
                        r#"{"type":"string","pattern":"^[a-c]{1,4}$"}"#,
                        r#"{"anyOf":[{"type":"number","multipleOf":0.5},{"type":"null"}]}"#,
                    ],
                );
                format!("{{\"type\":\"json_schema\",\"json_schema\":{{\"name\":\"s\",\"schema\":{schema}}}}}")
            }
        },
        "content" => serde_json::to_string(&random_text(rng)).unwrap_or_default(),
        "add_special" | "with_pieces" => pick::<&str>(rng, &["true", "false"]).to_string(),
        "tokens" => {
            let n = *pick(rng, &[0usize, 1, 5, 64, 65, 600]);
            let ids: Vec<String> = (0..n).map(|_| below(rng, 4097).to_string()).collect();
            format!("[{}]", ids.join(","))
        }
        "messages" => {
            let n = 1 + below(rng, 4);
            let items: Vec<String> = (0..n)
                .map(|_| {
                    let role = pick::<&str>(rng, &["user", "assistant", "system", "developer"]);
                    let content = serde_json::to_string(&random_text(rng)).unwrap_or_default();
                    format!("{{\"role\":\"{role}\",\"content\":{content}}}")
                })
                .collect();
            format!("[{}]", items.join(","))
        }
        "prompt" => {
            if below(rng, 2) == 0 {
                serde_json::to_string(&random_text(rng)).unwrap_or_default()
            } else {
                let n = 1 + below(rng, 66);
                let ids: Vec<String> = (0..n).map(|_| below(rng, 4097).to_string()).collect();
                format!("[{}]", ids.join(","))
            }
        }
        _ => request_value(rng),
    }
}

/// A scalar edge value (no lists or objects).
fn request_value_flat(rng: &mut Rng) -> String {
    if below(rng, 2) == 0 {
        pick::<&str>(&mut *rng, &REQUEST_NUMBERS).to_string()
    } else {
        pick::<&str>(rng, &["null", "true", "\"\"", "\"x\"", "-1", "0.5"]).to_string()
    }
}

/// Mutates a request: a field set to a hostile value, removed, duplicated or added, the
/// JSON mutated anywhere (as the model files' JSON is), the endpoint switched, or the body's
/// bytes mutated (invalid UTF-8, truncation, splices).
fn mutate_request(rng: &mut Rng, endpoint: Endpoint, body: &[u8]) -> Input {
    let mut endpoint = endpoint;
    let mut body = body.to_vec();
    match below(rng, 10) {
        0..=4 => {
            // Field edits, on the text so that values serde_json would not write survive.
            let mut obj = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            let mut raw: Vec<(String, String)> = Vec::new();
            let edits = if below(rng, 3) == 0 {
                2 + below(rng, 2)
            } else {
                1
            };
            for _ in 0..edits {
                // Mostly the endpoint's own fields, so that a request gets past the check
                // of its keys and reaches the deeper checks, the template and the scheduler.
                let own = endpoint.own_fields();
                let generates = matches!(endpoint, Endpoint::Chat | Endpoint::Completions);
                let field = if below(rng, 5) == 0 {
                    any_field(rng).to_string()
                } else if below(rng, 3) == 0 || !generates {
                    pick::<&str>(rng, own).to_string()
                } else {
                    pick::<&str>(rng, bitnet_server::api::COMMON).to_string()
                };
                match below(rng, 6) {
                    0 => {
                        obj.remove(&field);
                    }
                    _ => {
                        obj.remove(&field);
                        let value = if below(rng, 2) == 0 {
                            plausible_value(rng, &field)
                        } else {
                            request_value(rng)
                        };
                        raw.push((field, value));
                    }
                }
            }
            let mut text = serde_json::to_string(&obj).unwrap_or_else(|_| "{}".into());
            text.pop(); // the closing brace
            for (k, v) in raw {
                if text.len() > 1 {
                    text.push(',');
                }
                text.push_str(&serde_json::to_string(&k).unwrap_or_default());
                text.push(':');
                text.push_str(&v);
            }
            text.push('}');
            body = text.into_bytes();
        }
        5 | 6 => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(mut v) => {
                for _ in 0..1 + below(rng, 3) {
                    mutate_json(rng, &mut v, 0);
                }
                body = serde_json::to_vec(&v).unwrap_or_default();
            }
            Err(_) => mutate_bytes(rng, &mut body, usize::MAX),
        },
        7 if below(rng, 4) == 0 => {
            // The other endpoint, with the body's prompt field renamed (a chat body on
            // completions would only be "unknown field").
            endpoint = match endpoint {
                Endpoint::Chat => Endpoint::Completions,
                Endpoint::Completions => Endpoint::Chat,
                Endpoint::Tokenize => Endpoint::Detokenize,
                Endpoint::Detokenize => Endpoint::Tokenize,
            };
            if let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice(&body) {
                let (from, to) = match endpoint {
                    Endpoint::Chat => ("prompt", "messages"),
                    Endpoint::Completions => ("messages", "prompt"),
                    Endpoint::Tokenize => ("tokens", "content"),
                    Endpoint::Detokenize => ("content", "tokens"),
                };
                if let Some(v) = o.remove(from) {
                    o.insert(to.into(), v);
                }
                body = serde_json::to_vec(&o).unwrap_or_default();
            }
        }
        _ => mutate_bytes(rng, &mut body, usize::MAX),
    }
    body.truncate(MAX_BODY);
    Input::Request(endpoint, body)
}

// ---------------------------------------------------------------------------------------
// Execution.

/// Runs one input; returns its outcome's text (an error's message, or a summary).
fn execute(target: &mut Target, input: &Input, dir: &Path) -> String {
    match (target.name, input) {
        ("gguf", Input::Files(files)) => bitnet_fuzz::gguf(&files[0].1, dir),
        ("hf", Input::Files(files)) => bitnet_fuzz::hf(files, dir),
        ("tokenizer", Input::Text(text)) => bitnet_fuzz::tokenize(&target.tokenizers, text),
        ("template", Input::Template(t, msgs)) => {
            let msgs: Vec<ChatMessage> = msgs
                .iter()
                .map(|(r, c)| ChatMessage::new(r.as_str(), c.as_str()))
                .collect();
            bitnet_fuzz::template(t, &msgs)
        }
        ("request", Input::Request(endpoint, body)) => match &mut target.server {
            Some(server) => server.request(*endpoint, body),
            None => "no server".into(),
        },
        ("schema", Input::Schema(bytes)) => match (&target.grammars, &target.model) {
            (Some(g), Some(m)) => bitnet_fuzz::schema(g, m.pieces.len(), bytes),
            _ => "no compiler".into(),
        },
        ("jsonl", Input::Line(line)) => match &target.model {
            Some(m) => bitnet_fuzz::jsonl(m, line.as_bytes()),
            None => "no model".into(),
        },
        _ => "mismatched input".into(),
    }
}

fn make_target(t: &str) -> Target {
    let name = TARGETS.iter().find(|n| **n == t).copied().unwrap_or("gguf");
    let corpus = seeds(name);
    let tokenizers = if name == "tokenizer" {
        bitnet_fuzz::tokenizers()
    } else {
        Vec::new()
    };
    let model = matches!(name, "schema" | "jsonl").then(bitnet_fuzz::tiny_model);
    let grammars = (name == "schema")
        .then(|| model.as_ref().map(bitnet_fuzz::json_grammars))
        .flatten();
    Target {
        name,
        seeds: corpus.len(),
        corpus,
        seen: HashSet::new(),
        execs: 0,
        errors: 0,
        oks: 0,
        tokenizers,
        server: (name == "request").then(Server::new),
        model,
        grammars,
        read_back: 0,
        new: 0,
    }
}

/// Adds to `t` what earlier runs kept in `corpus_dir` (`TARGET/`, and the outcomes seen in
/// `TARGET.seen`): a random choice of up to [`MAX_READ_BACK`] of its inputs and
/// [`MAX_READ_BACK_BYTES`].
fn read_back(t: &mut Target, corpus_dir: &Path, rng: &mut Rng) {
    if let Ok(text) = std::fs::read_to_string(corpus_dir.join(format!("{}.seen", t.name))) {
        t.seen.extend(text.lines().map(str::to_string));
    }
    let Ok(dir) = std::fs::read_dir(corpus_dir.join(t.name)) else {
        return;
    };
    let mut files: Vec<(PathBuf, u64)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
        .collect();
    files.sort();
    // A random order (Fisher-Yates), so that chunks start from different parts of a corpus
    // larger than the cap.
    for i in (1..files.len()).rev() {
        files.swap(i, below(rng, i + 1));
    }
    let mut bytes = 0usize;
    for (path, len) in files {
        if t.read_back >= MAX_READ_BACK {
            break;
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if bytes.saturating_add(len) > MAX_READ_BACK_BYTES {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        bytes += len;
        t.corpus.push(Input::from_bytes(t.name, &data));
        t.read_back += 1;
    }
}

/// `--write-seeds TARGET DIR`: the target's seeds, one a file, as afl's driver takes them.
fn write_seeds(target: &str, dir: &Path) {
    if !TARGETS.contains(&target) {
        usage(&format!("unknown target {target}"));
    }
    std::fs::create_dir_all(dir).expect("create the seed directory");
    for (i, input) in seeds(target).iter().enumerate() {
        let path = dir.join(format!("{target}-{i}"));
        std::fs::write(&path, input.afl_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// The CPU time this process has used (Linux), for the `slow` and `hang` checks: all its
/// threads, since a model's compute runs on rayon's thread while the fuzzing thread waits.
fn cpu_time() -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_PROCESS_CPUTIME_ID is supported
        // by every Linux this builds for, and on failure (non-zero) `ts` is not read.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `--replay FILE`: runs one saved input (a finding or a corpus entry) and prints its
/// outcome and CPU time.
fn replay(target: &str, file: &Path) {
    if !TARGETS.contains(&target) {
        usage(&format!("unknown target {target}"));
    }
    let input = Input::from_bytes(target, &read(file));
    let mut t = make_target(target);
    let work = std::env::temp_dir().join(format!("bitnet-fuzz-replay-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("a work directory");
    let (t0, cpu0) = (Instant::now(), cpu_time());
    let outcome = execute(&mut t, &input, &work);
    let cpu = cpu_time().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    println!(
        "{target}: {} (wall {:.3} s, CPU {:.3} s)",
        outcome.chars().take(500).collect::<String>(),
        t0.elapsed().as_secs_f64(),
        cpu.unwrap_or_default().as_secs_f64()
    );
}

fn main() {
    {
        let args: Vec<String> = std::env::args().collect();
        if let (Some("--replay"), Some(target), Some(file)) =
            (args.get(1).map(String::as_str), args.get(2), args.get(3))
        {
            return replay(target, Path::new(file));
        }
        if let (Some("--write-seeds"), Some(target), Some(dir)) =
            (args.get(1).map(String::as_str), args.get(2), args.get(3))
        {
            return write_seeds(target, Path::new(dir));
        }
    }
    let args = parse_args();
    let findings = args.out.join("findings");
    std::fs::create_dir_all(&findings).expect("create the output directory");
    let work = args.out.join("work");
    std::fs::create_dir_all(&work).expect("create the work directory");
    let mut rng = Rng::new(args.seed);
    println!(
        "fuzz: seed {}, {} s, targets {}, out {}",
        args.seed,
        args.seconds,
        args.targets.join(","),
        args.out.display()
    );
    let mut targets: Vec<Target> = args.targets.iter().map(|t| make_target(t)).collect();
    let corpus_dir = args.out.join("corpus");
    for t in &mut targets {
        read_back(t, &corpus_dir, &mut rng);
    }
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(args.seconds);
    let mut n_findings = 0usize;
    let scratch = work.join("scratch.gguf");
    let mut round = 0usize;
    // BITNET_FUZZ_VERBOSE=1 prints every outcome (to see what the mutations reach).
    let verbose = std::env::var("BITNET_FUZZ_VERBOSE").is_ok_and(|v| v == "1");
    std::panic::set_hook(Box::new(|_| {}));
    // A watchdog for inputs that never finish (a `slow` check after the fact cannot see
    // them): one that has used 12 × --hang-seconds (120 s) of CPU time, or has
    // been running for 30 minutes of wall time (blocked, or starved beyond reason), is a
    // finding; its input is copied into `findings/` before the process exits.
    {
        let hang = args.hang;
        let (current, saved) = (
            args.out.join("current"),
            findings.join(format!("hang-{}", args.seed)),
        );
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let (wall0, cpu0) = (
                RUNNING_SINCE_MS.load(Ordering::Relaxed),
                CPU_AT_START_NS.load(Ordering::Relaxed),
            );
            if wall0 == 0 {
                continue;
            }
            let wall = WATCH_EPOCH
                .get()
                .map_or(0, |e| e.elapsed().as_millis() as u64);
            let cpu = cpu_time().map_or(0, |c| c.as_nanos() as u64);
            let cpu_limit = 12 * hang;
            let over_cpu = cpu.saturating_sub(cpu0) > cpu_limit.as_nanos() as u64;
            let over_wall = wall.saturating_sub(wall0) > 30 * 60 * 1000;
            if over_cpu || over_wall {
                let _ = std::fs::copy(&current, &saved);
                println!(
                    "FINDING hang: an input ran over {}; it is in {}",
                    if over_cpu {
                        format!("{} s of CPU time", cpu_limit.as_secs())
                    } else {
                        "30 minutes of wall time".to_string()
                    },
                    saved.display()
                );
                std::process::exit(1);
            }
        });
        WATCH_EPOCH.get_or_init(Instant::now);
    }
    while start.elapsed() < deadline {
        let t = &mut targets[round % args.targets.len()];
        round += 1;
        // Requests, JSONL lines and schemas: half the time a valid seed is mutated, since
        // most kept inputs are refused at their first field and would hide the deeper checks.
        let parents = if matches!(t.name, "request" | "jsonl" | "schema") && below(&mut rng, 2) == 0
        {
            &t.corpus[..t.seeds]
        } else {
            &t.corpus[..]
        };
        let parent = pick(&mut rng, parents).clone();
        let input = mutate(&mut rng, &parent, &scratch);
        let bytes = input.bytes();
        // Kept on disk before running: an abort (allocation past the cap) leaves it there.
        let _ = std::fs::write(args.out.join("current"), &bytes);
        let t0 = Instant::now();
        let cpu0 = cpu_time();
        let epoch = WATCH_EPOCH.get().copied().unwrap_or(t0);
        CPU_AT_START_NS.store(cpu0.map_or(0, |c| c.as_nanos() as u64), Ordering::Relaxed);
        RUNNING_SINCE_MS.store(1 + epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(t, &input, &work)));
        RUNNING_SINCE_MS.store(0, Ordering::Relaxed);
        // CPU time, not wall time: at nice 19 on a busy machine a 0.2 s input can take 15 s.
        // (The process's: the watchdog's own share is negligible.)
        let took = cpu_time()
            .zip(cpu0)
            .map_or_else(|| t0.elapsed(), |(b, a)| b.saturating_sub(a));
        t.execs += 1;
        let problem = match &result {
            Err(p) => Some(format!(
                "panic: {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
            Ok(_) if took > args.hang => {
                Some(format!("slow: {:.1} s of CPU time", took.as_secs_f64()))
            }
            Ok(_) => None,
        };
        if let Some(p) = problem {
            n_findings += 1;
            let f = findings.join(format!("{}-{}-{}", t.name, args.seed, t.execs));
            let _ = std::fs::write(&f, &bytes);
            println!("FINDING [{}] {p}: input in {}", t.name, f.display());
            continue;
        }
        let outcome = result.unwrap_or_default();
        if verbose {
            println!(
                "[{}] {}",
                t.name,
                outcome.chars().take(300).collect::<String>()
            );
        }
        if outcome.starts_with("ok") {
            t.oks += 1;
        } else {
            t.errors += 1;
        }
        let sig = match t.name {
            // A request's error quotes the value sent: the kind of error is what counts.
            "request" => signature(&without_quoted(&outcome)),
            // Lines' and schemas' errors quote the values sent and then some (a JSON
            // parser's position, a subschema): their first words say what kind of error.
            "jsonl" | "schema" => signature(
                &without_quoted(&outcome)
                    .split_whitespace()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => signature(&outcome),
        };
        if t.seen.insert(sig.clone()) {
            t.new += 1;
            // Kept on disk (and its outcome noted) whatever the cap: the next run reads a
            // random choice of them back.
            let dir = corpus_dir.join(t.name);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{}-{}", args.seed, t.execs)), &bytes);
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(corpus_dir.join(format!("{}.seen", t.name)))
            {
                use std::io::Write;
                let _ = writeln!(f, "{sig}");
            }
            if t.corpus.len() < MAX_CORPUS {
                t.corpus.push(input);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for t in &targets {
        println!(
            "{:<9} {:>8} execs ({:>6.0}/s), {:>6} loaded or ran, {:>7} refused with an error, \
             {} new outcomes; corpus in memory {} ({} seeds + {} read back + {} new)",
            t.name,
            t.execs,
            t.execs as f64 / secs,
            t.oks,
            t.errors,
            t.new,
            t.corpus.len(),
            t.seeds,
            t.read_back,
            t.corpus.len() - t.seeds - t.read_back
        );
    }
    println!("fuzz: {n_findings} findings in {secs:.0} s");
    if n_findings > 0 {
        std::process::exit(1);
    }
}
