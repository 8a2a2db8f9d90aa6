//! One module per subcommand; shared model loading here.

pub mod batch;
pub mod bench;
#[cfg(feature = "hub")]
pub mod cache;
pub mod chat;
pub mod convert;
pub mod dummy;
pub mod gen_flags;
pub mod inspect;
pub mod logits;
pub mod perplexity;
#[cfg(feature = "hub")]
pub mod pull;
pub mod run;
pub mod serve;
pub mod tokenize;

use bitnet_inference::engine::{LoadedEngineModel, ModelOptions};
use bitnet_inference::generate::GenerationStats;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Loads a model, computing as `options` say, on `-t`'s threads unless `options` names a
/// count.
pub fn load_with(path: &Path, options: &ModelOptions) -> anyhow::Result<LoadedEngineModel> {
    let path = resolve_model(path)?;
    let sp = loading_spinner(&path);
    let options = ModelOptions {
        threads: options.threads.or(Some(threads())),
        ..*options
    };
    let m = LoadedEngineModel::load_with(&path, &options);
    sp.finish_and_clear();
    let m = m?;
    // Sampling defaults the model's files set out of range (ignored at load).
    for w in &m.generation.warnings {
        eprintln!("warning: {w}");
    }
    Ok(m)
}

/// A spinner saying which model is loading and how big it is (hidden off a terminal).
pub fn loading_spinner(path: &Path) -> ProgressBar {
    let bytes: u64 = if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    };
    spinner(format!(
        "loading {} ({:.1} MiB)",
        path.display(),
        bytes as f64 / (1 << 20) as f64
    ))
}

/// Progress bars are drawn only when stderr is a terminal.
fn draw_progress() -> bool {
    std::io::stderr().is_terminal()
}

/// A spinner on stderr with `msg` and the time so far, ticking by itself; hidden unless
/// stderr is a terminal. End it with `finish_and_clear`.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    if !draw_progress() {
        return ProgressBar::hidden();
    }
    let sp = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    sp.set_message(msg.into());
    sp.enable_steady_tick(std::time::Duration::from_millis(120));
    sp
}

/// A bar of `len` steps on stderr (hidden unless stderr is a terminal).
pub fn progress_bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    if !draw_progress() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(msg.into());
    b.enable_steady_tick(std::time::Duration::from_millis(250));
    b
}

/// The prompt of `-p TEXT`, `-p -` (standard input) or `-f FILE`. One trailing newline of
/// a file or of standard input is dropped, as llama.cpp does.
pub fn read_prompt(prompt: Option<&str>, file: Option<&Path>) -> anyhow::Result<String> {
    let mut text = match (prompt, file) {
        (Some(_), Some(_)) => anyhow::bail!("give the prompt with -p or -f, not both"),
        (Some("-"), None) => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| anyhow::anyhow!("<stdin>: {e}"))?;
            s
        }
        (Some(p), None) => return Ok(p.to_string()),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
        }
        (None, None) => anyhow::bail!("no prompt: give -p TEXT, -p - (standard input) or -f FILE"),
    };
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// The most bytes of text `bitnet tokenize` and `bitnet perplexity` (without `--chunks`)
/// read: they tokenize the whole text at once, which takes ~90 bytes of memory a byte
/// (~1.5 GB for this much).
pub const MAX_WHOLE_TEXT_BYTES: u64 = 16 << 20;

/// The text of `file` (None: standard input), refused if it holds more than `limit` bytes:
/// a file by its size before it is read, standard input after `limit` bytes.
pub fn read_text_at_most(file: Option<&Path>, limit: u64, why: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let name = file.map_or("<stdin>".to_string(), |f| f.display().to_string());
    let too_big = |len: Option<u64>| match len {
        Some(n) => anyhow::anyhow!("{name}: {n} bytes, more than the {limit} this reads ({why})"),
        None => anyhow::anyhow!("{name}: more than the {limit} bytes this reads ({why})"),
    };
    let mut bytes = Vec::new();
    match file {
        Some(f) => {
            let file = std::fs::File::open(f).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let len = file
                .metadata()
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
                .len();
            if len > limit {
                return Err(too_big(Some(len)));
            }
            file.take(limit + 1).read_to_end(&mut bytes)
        }
        None => std::io::stdin().take(limit + 1).read_to_end(&mut bytes),
    }
    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(None));
    }
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{name}: not UTF-8 text: {e}"))
}

/// `-c/--ctx-size`: a positive number of tokens.
pub fn parse_ctx_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("the context size must be at least 1 token".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A count that must be at least 1.
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The statistics line of a generation: prefill and decode counts and rates, why it ended.
/// A rate is printed only where there was something to time (no prefill rate when nothing
/// was run, as with `-n 0`; no decode rate for fewer than two tokens).
pub fn stats_line(s: &GenerationStats, finish: &str) -> String {
    let prefilled = s.prompt_tokens - s.cached_tokens;
    let ran = !s.time_to_first_token.is_zero() || s.generated_tokens > 0;
    let prefill = if !ran {
        format!("prefill: {prefilled} tokens (not run)")
    } else {
        format!(
            "prefill: {prefilled} tokens, {:.1} tok/s",
            s.prefill_tokens_per_second()
        )
    };
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let decode = if s.generated_tokens < 2 {
        format!(
            "decode: {} token{}",
            s.generated_tokens,
            plural(s.generated_tokens)
        )
    } else {
        format!(
            "decode: {} tokens, {:.1} tok/s",
            s.generated_tokens,
            s.decode_tokens_per_second()
        )
    };
    format!("{prefill} | {decode} | finish: {finish}")
}

/// `-t`: compute threads in total (0: not given, one per core).
static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the compute threads of every model the commands load (`-t`).
pub fn set_threads(threads: Option<usize>) {
    THREADS.store(threads.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The compute threads models run on: `-t`'s count, or one per core.
pub fn threads() -> usize {
    match THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// `--offline`: resolve hub ids from the cache alone (as HF_HUB_OFFLINE=1).
static OFFLINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--json` / `--json-schema FILE` (run, batch): the output held to JSON by constrained
/// decoding (the library's `generate::json`, as the server's `response_format`).
#[derive(clap::Args, Debug, Clone)]
pub struct JsonFlags {
    /// Hold the output to a JSON object (constrained decoding).
    #[arg(long, conflicts_with = "json_schema")]
    json: bool,
    /// Hold the output to the JSON schema in FILE (constrained decoding; a schema of at most
    /// 64 KiB and 32 levels).
    #[arg(long = "json-schema", value_name = "FILE")]
    json_schema: Option<PathBuf>,
}

impl JsonFlags {
    /// The compiled constraint, or None without the flags.
    pub fn constraint(
        &self,
        m: &LoadedEngineModel,
    ) -> anyhow::Result<Option<bitnet_inference::generate::SharedConstraint>> {
        use bitnet_inference::generate::json::{JsonFormat, JsonGrammars, MAX_SCHEMA_BYTES};
        let (format, what) = match (&self.json_schema, self.json) {
            (None, false) => return Ok(None),
            (None, true) => (JsonFormat::Object, "--json".to_string()),
            (Some(path), _) => {
                let what = format!("--json-schema {}", path.display());
                // Whitespace aside, the schema must fit the limit: a file far larger is
                // refused before it is read.
                let len = std::fs::metadata(path)
                    .map_err(|e| anyhow::anyhow!("{what}: {e}"))?
                    .len();
                if len > 16 * MAX_SCHEMA_BYTES as u64 {
                    anyhow::bail!(
                        "{what}: {len} bytes, far more than a schema may have ({MAX_SCHEMA_BYTES} \
                         bytes of compact JSON)"
                    );
                }
                let text =
                    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
                let schema: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{what}: not valid JSON: {e}"))?;
                let name = path
                    .file_stem()
                    .map_or("schema".into(), |n| n.to_string_lossy().into_owned());
                (JsonFormat::Schema { name, schema }, what)
            }
        };
        let grammars = JsonGrammars::for_model(m).map_err(|e| {
            anyhow::anyhow!("{what}: constrained decoding cannot use this model's vocabulary: {e}")
        })?;
        let c = grammars
            .compile(&format)
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Some(c))
    }
}

/// How the model computes, shared by the commands that run one for text or speed.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct ModelFlags {
    /// Where the model computes: `cpu`, `cuda` (the first NVIDIA GPU), `cuda:N`, or `auto`
    /// (CUDA where this build, the machine and the other flags allow it, else the CPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: bitnet_inference::backend::Device,
    /// How logits are computed from a float lm_head / tied embedding: `f16` exactly as
    /// the file stores it, or against a copy quantized at load, with the final hidden state
    /// at 12 bits: `int8`, `q6k` or `q4`; faster decode, see docs/PERFORMANCE.md.
    #[arg(long = "lm-head", default_value = "f16", value_parser = parse_lm_head)]
    pub lm_head: bitnet_inference::backend::LmHeadQuant,
    /// KV cache element type: `f32` (exact) or `f16` (half the memory, and half the bytes
    /// decode reads per cached position).
    #[arg(long = "kv-type", default_value = "f32", value_parser = parse_kv_type)]
    pub kv_type: bitnet_inference::backend::KvType,
    /// How Q4_0/Q4_1/Q8_0 linears are multiplied: `exact` (f32 activations, the file's exact
    /// weights) or `q8` (activations quantized to Q8 blocks, integer dots, as llama.cpp).
    #[arg(long = "quant-acts", default_value = "exact", value_parser = parse_quant_acts)]
    pub quant_acts: bitnet_inference::kernels::qblock::QuantActs,
}

impl ModelFlags {
    /// The library's options these flags stand for.
    pub fn options(&self) -> ModelOptions {
        ModelOptions {
            device: self.device,
            lm_head: self.lm_head,
            kv_type: self.kv_type,
            quant_acts: self.quant_acts,
            ..Default::default()
        }
    }
}

fn parse_device(s: &str) -> Result<bitnet_inference::backend::Device, String> {
    s.parse()
}

fn parse_kv_type(s: &str) -> Result<bitnet_inference::backend::KvType, String> {
    s.parse()
}

fn parse_quant_acts(s: &str) -> Result<bitnet_inference::kernels::qblock::QuantActs, String> {
    s.parse()
}

fn parse_lm_head(s: &str) -> Result<bitnet_inference::backend::LmHeadQuant, String> {
    s.parse()
}

pub fn set_offline(offline: bool) {
    OFFLINE.store(offline, std::sync::atomic::Ordering::Relaxed);
}

/// A model argument as a local path: an existing file or directory stays itself; otherwise a
/// Hugging Face hub id (`owner/name[@revision][:FILE.gguf]`) is resolved through the shared
/// cache, downloading what is missing.
pub fn resolve_model(model: &Path) -> anyhow::Result<PathBuf> {
    #[cfg(feature = "hub")]
    if !model.exists() {
        if let Some(id) = model
            .to_str()
            .and_then(|s| bitnet_inference::hub::HubModelId::parse(s).ok())
        {
            return Ok(bitnet_inference::hub::resolve(&hub_config(), &id)?.path);
        }
    }
    Ok(model.to_path_buf())
}

/// The hub settings from the environment and `--offline`, with progress bars on stderr.
#[cfg(feature = "hub")]
pub fn hub_config() -> bitnet_inference::hub::HubConfig {
    use bitnet_inference::hub::{HubConfig, Progress};
    use indicatif::{ProgressBar, ProgressStyle};
    let bar: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);
    let progress = move |p: &Progress| {
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::Start { file, done, total } => {
                let b = match total {
                    Some(t) => ProgressBar::new(*t).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    ),
                    None => ProgressBar::new_spinner(),
                };
                b.set_message(file.clone());
                b.set_position(*done);
                *bar = Some(b);
            }
            Progress::Advance { done, .. } => {
                if let Some(b) = bar.as_ref() {
                    b.set_position(*done);
                }
            }
            Progress::Finish { .. } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
            }
        }
    };
    HubConfig::from_env()
        .with_offline(OFFLINE.load(std::sync::atomic::Ordering::Relaxed))
        .with_progress(std::sync::Arc::new(progress))
}

/// The model to use when none is named: the bitnet-tiny model shipped in the repository
/// (`models/bitnet-tiny`), found beside the source tree this binary was built from or above
/// the executable.
pub fn model_or_default(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return resolve_model(m);
    }
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .map(|dir| dir.join("models/bitnet-tiny"))
            .find(|p| p.is_dir())
    });
    [Some(built_from), beside_exe]
        .into_iter()
        .flatten()
        .find(|p| p.join("config.json").is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no model given (-m MODEL or BITNET_MODEL) and the shipped models/bitnet-tiny \
                 was not found"
            )
        })
}

/// Context size for a run: the user's, else the model's capped at `cap` (the KV cache is
/// planned for all of it at start). A size beyond the model's is an error naming both.
pub fn context_size(
    requested: Option<usize>,
    model: &dyn bitnet_inference::backend::Backend,
    cap: usize,
) -> anyhow::Result<usize> {
    let max = model.config().max_context;
    match requested {
        Some(0) => anyhow::bail!("the context size must be at least 1 token"),
        Some(c) if c > max => {
            anyhow::bail!(
                "context size {c} (-c) is larger than the model's maximum of {max} tokens"
            )
        }
        Some(c) => Ok(c),
        None => Ok(max.min(cap)),
    }
}

/// A flag's parser for a count in `lo..=hi`; the error says the accepted range.
pub fn in_range(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s: &str| {
        let v: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number (expected {lo} to {hi})"))?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{v} is out of range (expected {lo} to {hi})"))
        }
    }
}

/// The most threads `-t` takes: four per core here (more only thrashes).
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `-t`'s parser: 1 to [`max_threads`].
pub fn parse_threads(s: &str) -> Result<usize, String> {
    in_range(1, max_threads())(s).map_err(|e| format!("{e}; 4 threads a core at most"))
}
