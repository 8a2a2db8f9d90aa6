//! The library API: load a model once, generate text from it.
//!
//! - [`InferenceEngine`]: loads a model ([`InferenceEngine::load_model`]) from a local path
//!   (a GGUF file or a Hugging Face model directory) and generates.
//! - [`TextGenerator`]: a model plus its own KV cache; [`TextGenerator::generate`],
//!   [`TextGenerator::generate_stream`] (an iterator), [`TextGenerator::generate_async`] (a
//!   `futures_core::Stream`), [`TextGenerator::generate_batch`] (several prompts in one batch).
//! - [`GenerationConfig`] and [`SamplingStrategy`]: what to generate and how.
//! - [`ModelRepo`]: a Hugging Face repository name, downloaded into the shared Hugging Face
//!   cache when the `hub` feature is on (an error without it).
//! - [`MemoryStats`] and [`PerformanceProfile`].
//! - [`ModelCache`]: the engine's loaded models, least recently used evicted first when their
//!   weights exceed [`EngineConfig::model_memory_budget`], so one process can serve several
//!   models without reloading them.
//!
//! ```
//! use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
//! # fn main() -> bitnet_inference::Result<()> {
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitnet-packed");
//! let mut engine = InferenceEngine::new();
//! engine.load_model(path)?;
//! let out = engine.generate("hello", &GenerationConfig::greedy(8))?;
//! assert!(out.tokens.len() <= 8);
//! let profile = engine.performance_profile().expect("a generation ran");
//! assert!(profile.time_to_first_token <= profile.total_time);
//! # Ok(()) }
//! ```

pub use crate::generate::{
    ContextOverflow, FinishReason, Generation, GenerationConfig, GenerationStats, SamplingStrategy,
    StreamChunk,
};

use crate::backend::{self, Backend, BackendState};
use crate::chat::{ChatMessage, ChatTemplate};
use crate::generate::{self, AsyncTokenStream, TokenPieces, TokenStream};
use crate::model::{self, GenerationDefaults};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Hugging Face model repository: `owner/name` at `revision` (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRepo {
    pub owner: String,
    pub name: String,
    pub revision: String,
}

impl ModelRepo {
    /// `owner/name` at revision `main`.
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        ModelRepo {
            owner: owner.into(),
            name: name.into(),
            revision: "main".into(),
        }
    }

    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// `owner/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl fmt::Display for ModelRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.owner, self.name, self.revision)
    }
}

impl std::str::FromStr for ModelRepo {
    type Err = Error;

    /// Parses `owner/name` or `owner/name@revision`.
    ///
    /// ```
    /// use bitnet_inference::engine::ModelRepo;
    /// let r: ModelRepo = "microsoft/bitnet-b1.58-2B-4T@v1".parse().unwrap();
    /// assert_eq!((r.owner.as_str(), r.name.as_str(), r.revision.as_str()),
    ///            ("microsoft", "bitnet-b1.58-2B-4T", "v1"));
    /// assert!("no-slash".parse::<ModelRepo>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        let (id, rev) = s.split_once('@').unwrap_or((s, "main"));
        match id.split_once('/') {
            Some((o, n))
                if !o.is_empty() && !n.is_empty() && !n.contains('/') && !rev.is_empty() =>
            {
                Ok(ModelRepo::new(o, n).with_revision(rev))
            }
            _ => Err(Error::Invalid(format!(
                "`{s}` is not a model repository (expected owner/name or owner/name@revision)"
            ))),
        }
    }
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file or a Hugging Face model directory.
    Path(PathBuf),
    /// A repository on the Hugging Face hub (needs the `hub` feature).
    Repo(ModelRepo),
}

impl From<&Path> for ModelSource {
    fn from(p: &Path) -> Self {
        ModelSource::Path(p.to_path_buf())
    }
}
impl From<PathBuf> for ModelSource {
    fn from(p: PathBuf) -> Self {
        ModelSource::Path(p)
    }
}
impl From<&str> for ModelSource {
    /// A local path.
    fn from(p: &str) -> Self {
        ModelSource::Path(PathBuf::from(p))
    }
}
impl From<ModelRepo> for ModelSource {
    fn from(r: ModelRepo) -> Self {
        ModelSource::Repo(r)
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Context size of a generator's KV cache (None: the model's, at most 4096).
    pub context_size: Option<usize>,
    /// Tokens per forward call (prefill chunk size; also the batch size of
    /// [`TextGenerator::generate_batch`]).
    pub batch_size: usize,
    /// Bytes of weights (`ModelWeights::memory_bytes`) the engine's [`ModelCache`] keeps loaded
    /// for reuse. 0 (the default) keeps only the model in use; `usize::MAX` never evicts.
    /// The budget is soft: models in use are never evicted, so a model larger than the budget
    /// still loads (and is dropped once another replaces it).
    pub model_memory_budget: usize,
    /// How loaded models compute (lm_head, KV cache type, quantized activations).
    pub model: ModelOptions,
}

pub use crate::backend::ModelOptions;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            context_size: None,
            batch_size: 64,
            model_memory_budget: 0,
            model: ModelOptions::default(),
        }
    }
}

/// Memory held by a generator, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// The weights in host memory.
    pub weights_bytes: usize,
    /// The KV cache, in the memory of the device that computes (see `device`).
    pub kv_cache_bytes: usize,
    /// Activations, logits and the token byte table.
    pub scratch_bytes: usize,
    /// Resident set size of the whole process (Linux `/proc/self/status`; None elsewhere).
    pub process_rss_bytes: Option<u64>,
    /// The GPU's memory where the model computes on one (its weights there, free and total
    /// bytes); the KV cache and the activation scratch are then on the GPU.
    pub device: Option<crate::backend::DeviceMemory>,
}

/// Timings of the model load and of the last generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PerformanceProfile {
    pub load_time: Duration,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}

/// Process resident set size, from `/proc/self/status` (`VmRSS`).
pub fn process_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The context a generator or scheduler plans for: the one asked for, which must fit the
/// model, or the model's maximum up to 4096 tokens.
pub(crate) fn planned_context(requested: Option<usize>, max: usize) -> Result<usize> {
    match requested {
        None => Ok(max.min(4096)),
        Some(0) => Err(Error::Invalid(
            "context size 0: expected at least 1 token".into(),
        )),
        Some(c) if c > max => Err(Error::Invalid(format!(
            "context size {c} is larger than the model's maximum of {max} tokens"
        ))),
        Some(c) => Ok(c),
    }
}

/// A loaded model and what generation needs from its files; shared by generators.
pub struct LoadedEngineModel {
    /// The model on its compute backend.
    pub model: Box<dyn Backend>,
    /// How it was asked to compute.
    pub options: ModelOptions,
    pub tokenizer: Tokenizer,
    pub pieces: TokenPieces,
    pub chat_template: Option<String>,
    pub generation: GenerationDefaults,
    /// The model's end tokens: `generation_config.json`'s and the tokenizer's.
    pub end_tokens: Vec<u32>,
    pub path: PathBuf,
    pub load_time: Duration,
}

impl LoadedEngineModel {
    /// Loads a local model to compute the exact function.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &ModelOptions::default())
    }

    /// Loads a local model to compute as `options` say.
    /// With `options.threads` set, loading (repacking, quantizing a copy of the lm_head) runs
    /// on that many threads too, in a pool that ends with the load.
    pub fn load_with(path: &Path, options: &ModelOptions) -> Result<Self> {
        let start = Instant::now();
        let load = || -> Result<_> {
            let m = model::load(path)?;
            model::check_token_ids(&m)?;
            let model::LoadedModel {
                config,
                weights,
                tokenizer,
                chat_template,
                generation,
                path,
                ..
            } = m;
            let model = backend::build(config, weights, options)?;
            Ok((model, tokenizer, chat_template, generation, path))
        };
        let (model, tokenizer, chat_template, generation, path) = match options.threads {
            None => load()?,
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .thread_name(|i| format!("bitnet-load-{i}"))
                .build()
                .map_err(|e| Error::Invalid(format!("cannot start {n} loading threads: {e}")))?
                .install(load)?,
        };
        let pieces = TokenPieces::new(&tokenizer, model.config().vocab_size);
        let mut end_tokens = generation.eos_token_ids.clone();
        end_tokens.extend_from_slice(tokenizer.eos_ids());
        end_tokens.sort_unstable();
        end_tokens.dedup();
        Ok(LoadedEngineModel {
            model,
            options: *options,
            tokenizer,
            pieces,
            chat_template,
            generation,
            end_tokens,
            path,
            load_time: start.elapsed(),
        })
    }

    /// The model's chat template, or the BitNet b1.58 2B-4T format when its files have none.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(self.pieces.get(i)).into_owned())
                .unwrap_or_default()
        };
        match &self.chat_template {
            Some(src) => ChatTemplate::new(
                src,
                &text(self.tokenizer.bos_id()),
                &text(self.tokenizer.eos_ids().first().copied()),
            ),
            None => Ok(ChatTemplate::bitnet_default()),
        }
    }

    /// The prompt ids of `text` (BOS added as the model asks).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// [`Self::encode_prompt`] for a prompt that must fit `context` tokens: a longer one is
    /// refused by its length in bytes before tokenizing (which costs ~100 bytes of memory a
    /// byte), then by its tokens.
    pub fn encode_prompt_within(&self, text: &str, context: usize) -> Result<Vec<u32>> {
        self.tokenizer
            .encode_within(text, true, context)
            .map_err(|e| {
                Error::Invalid(format!(
                    "the prompt does not fit the context of {context} tokens: {e}"
                ))
            })
    }

    /// [`Self::encode_chat`] for a conversation that must fit `context` tokens: refused by
    /// its length in bytes before rendering and before tokenizing, then by its tokens.
    pub fn encode_chat_within(&self, messages: &[ChatMessage], context: usize) -> Result<Vec<u32>> {
        let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        let max = self.tokenizer.max_text_bytes(context);
        if bytes > max {
            return Err(Error::Invalid(format!(
                "the messages' {bytes} bytes cannot fit in the context of {context} tokens (at \
                 most {max} bytes can, with this vocabulary); refused before tokenizing"
            )));
        }
        let ids = self.encode_chat_unchecked(messages, Some(context))?;
        if ids.len() > context {
            return Err(Error::Invalid(format!(
                "the conversation of {} tokens does not fit the context of {context} tokens",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// The prompt ids of a conversation rendered with the chat template (with the
    /// assistant's opening). The template writes BOS itself when the model wants one.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_chat_unchecked(messages, None)
    }

    fn encode_chat_unchecked(
        &self,
        messages: &[ChatMessage],
        context: Option<usize>,
    ) -> Result<Vec<u32>> {
        let text = self.chat_template()?.render(messages, true)?;
        let mut ids = match context {
            Some(c) => self.tokenizer.encode_within(&text, false, c)?,
            None => self.tokenizer.encode(&text, false)?,
        };
        if let (true, Some(bos)) = (self.tokenizer.adds_bos(), self.tokenizer.bos_id()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }
}

/// Loaded models keyed by their resolved (canonical) path, evicted least recently used first
/// when their weights' bytes exceed a budget.
///
/// The budget is soft. A model is evicted only when no one else holds it (no generator or
/// caller keeps its `Arc`), so models in use stay whatever their size, and a model larger
/// than the whole budget still loads. Eviction runs once a model is loaded and its size known,
/// so while a model loads the old ones are still in memory.
///
/// ```
/// use bitnet_inference::engine::ModelCache;
/// # fn main() -> bitnet_inference::Result<()> {
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// let mut cache = ModelCache::new(usize::MAX);
/// let a = cache.get_or_load(format!("{dir}/bitnet-packed").as_ref())?;
/// let again = cache.get_or_load(format!("{dir}/bitnet-packed").as_ref())?;
/// assert!(std::sync::Arc::ptr_eq(&a, &again)); // no reload
/// assert_eq!(cache.len(), 1);
/// # Ok(()) }
/// ```
pub struct ModelCache {
    budget: usize,
    options: ModelOptions,
    /// Least recently used first.
    entries: Vec<CacheEntry>,
}

struct CacheEntry {
    key: PathBuf,
    model: Arc<LoadedEngineModel>,
    bytes: usize,
}

impl ModelCache {
    /// An empty cache keeping at most `budget_bytes` of weights that no one holds.
    pub fn new(budget_bytes: usize) -> Self {
        Self::with_options(budget_bytes, ModelOptions::default())
    }

    /// An empty cache whose models load with `options`.
    pub fn with_options(budget_bytes: usize, options: ModelOptions) -> Self {
        ModelCache {
            budget: budget_bytes,
            options,
            entries: Vec::new(),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Changes the budget and evicts what no longer fits.
    pub fn set_budget(&mut self, budget_bytes: usize) {
        self.budget = budget_bytes;
        self.trim(0);
    }

    /// The key a path is cached under: its canonical form (symlinks and `..` resolved).
    fn key(path: &Path) -> Result<PathBuf> {
        std::fs::canonicalize(path).map_err(|e| Error::io(path, e))
    }

    /// The model at `path`, from the cache (made most recently used) or loaded and cached.
    pub fn get_or_load(&mut self, path: &Path) -> Result<Arc<LoadedEngineModel>> {
        let key = Self::key(path)?;
        if let Some(m) = self.touch(&key) {
            return Ok(m);
        }
        let model = Arc::new(LoadedEngineModel::load_with(path, &self.options)?);
        let bytes = model.model.weights().memory_bytes();
        self.trim(bytes);
        self.entries.push(CacheEntry {
            key,
            model: model.clone(),
            bytes,
        });
        Ok(model)
    }

    /// The cached model at `path` (made most recently used), without loading.
    pub fn get(&mut self, path: &Path) -> Option<Arc<LoadedEngineModel>> {
        let key = Self::key(path).ok()?;
        self.touch(&key)
    }

    fn touch(&mut self, key: &Path) -> Option<Arc<LoadedEngineModel>> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        let e = self.entries.remove(i);
        let m = e.model.clone();
        self.entries.push(e);
        Some(m)
    }

    /// Whether the model at `path` is loaded.
    pub fn contains(&self, path: &Path) -> bool {
        Self::key(path).is_ok_and(|k| self.entries.iter().any(|e| e.key == k))
    }

    /// Cached paths, least recently used first.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.entries.iter().map(|e| e.key.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of weights of every cached model.
    pub fn resident_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Drops the model at `path` from the cache (those holding it keep it alive); whether
    /// it was cached.
    pub fn remove(&mut self, path: &Path) -> bool {
        let Ok(key) = Self::key(path) else {
            return false;
        };
        let before = self.entries.len();
        self.entries.retain(|e| e.key != key);
        self.entries.len() != before
    }

    /// Drops every cached model.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Evicts least recently used models no one else holds until `incoming` more bytes fit.
    pub fn trim(&mut self, incoming: usize) {
        let mut i = 0;
        while i < self.entries.len() && self.resident_bytes().saturating_add(incoming) > self.budget
        {
            if Arc::strong_count(&self.entries[i].model) == 1 {
                self.entries.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

/// Loads models and generates; the simplest entry point.
pub struct InferenceEngine {
    config: EngineConfig,
    generator: Option<TextGenerator>,
    models: ModelCache,
}

impl Default for InferenceEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl InferenceEngine {
    pub fn new() -> Self {
        Self::with_config(EngineConfig::default())
    }

    pub fn with_config(config: EngineConfig) -> Self {
        InferenceEngine {
            models: ModelCache::with_options(config.model_memory_budget, config.model),
            config,
            generator: None,
        }
    }

    /// The loaded models kept for reuse (see [`EngineConfig::model_memory_budget`]).
    pub fn model_cache(&self) -> &ModelCache {
        &self.models
    }

    /// The model in use, if one is loaded.
    pub fn model(&self) -> Option<Arc<LoadedEngineModel>> {
        self.generator.as_ref().map(|g| g.shared.clone())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Loads a model from a local path, or (with the `hub` feature) a [`ModelRepo`] from the
    /// Hugging Face hub through the shared cache (see [`crate::hub`]; `HF_ENDPOINT`,
    /// `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE` apply). Without the feature a
    /// `ModelRepo` gives an error. A model still in the engine's [`ModelCache`] is reused, not
    /// reloaded.
    pub fn load_model(&mut self, source: impl Into<ModelSource>) -> Result<()> {
        let path = match source.into() {
            ModelSource::Path(p) => p,
            #[cfg(feature = "hub")]
            ModelSource::Repo(r) => {
                let id = crate::hub::HubModelId {
                    owner: r.owner,
                    name: r.name,
                    revision: r.revision,
                    file: None,
                };
                crate::hub::resolve(&crate::hub::HubConfig::from_env(), &id)?.path
            }
            #[cfg(not(feature = "hub"))]
            ModelSource::Repo(r) => {
                return Err(Error::Invalid(format!(
                    "cannot load {r}: this build has no Hugging Face hub support (cargo feature \
                     `hub`); download the repository's files and load their local directory"
                )))
            }
        };
        let loaded = self.models.get_or_load(&path)?;
        self.generator = Some(TextGenerator::new(loaded, self.config.clone())?);
        // The previous model is no longer held by the generator: evict it if over budget.
        self.models.trim(0);
        Ok(())
    }

    fn loaded(&mut self) -> Result<&mut TextGenerator> {
        self.generator
            .as_mut()
            .ok_or_else(|| Error::Invalid("no model is loaded (call load_model first)".into()))
    }

    /// Generates a completion of `prompt`.
    pub fn generate(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Generation> {
        self.loaded()?.generate(prompt, config)
    }

    /// The generator of the loaded model.
    pub fn generator(&mut self) -> Result<&mut TextGenerator> {
        self.loaded()
    }

    /// A new generator (its own KV cache) over the loaded model's shared weights.
    pub fn new_generator(&self) -> Result<TextGenerator> {
        let g = self
            .generator
            .as_ref()
            .ok_or_else(|| Error::Invalid("no model is loaded (call load_model first)".into()))?;
        TextGenerator::new(g.shared.clone(), self.config.clone())
    }

    /// The model's sampling defaults (`generation_config.json`) over the engine's.
    pub fn default_generation_config(&self) -> GenerationConfig {
        self.generator
            .as_ref()
            .map(|g| GenerationConfig::from_model(&g.shared.generation))
            .unwrap_or_default()
    }

    pub fn memory_stats(&self) -> Option<MemoryStats> {
        self.generator.as_ref().map(|g| g.memory_stats())
    }

    pub fn performance_profile(&self) -> Option<PerformanceProfile> {
        self.generator
            .as_ref()
            .and_then(|g| g.performance_profile())
    }
}

/// A model and one KV cache: generates one prompt at a time (or a batch of prompts).
///
/// ```
/// use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
/// # fn main() -> bitnet_inference::Result<()> {
/// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitnet-packed");
/// let mut engine = InferenceEngine::new();
/// engine.load_model(path)?;
/// let generator = engine.generator()?;
/// let config = GenerationConfig::greedy(6);
/// let whole = generator.generate("hello", &config)?;
/// // Streaming gives the same text, piece by piece.
/// let mut streamed = String::new();
/// for chunk in generator.generate_stream("hello", &config)? {
///     streamed.push_str(&chunk?.text);
/// }
/// assert_eq!(streamed, whole.text);
/// let mem = generator.memory_stats();
/// assert!(mem.weights_bytes > 0 && mem.kv_cache_bytes > 0);
/// # Ok(()) }
/// ```
pub struct TextGenerator {
    shared: Arc<LoadedEngineModel>,
    config: EngineConfig,
    state: Option<Box<dyn BackendState>>,
    last: Option<PerformanceProfile>,
}

impl TextGenerator {
    pub fn new(shared: Arc<LoadedEngineModel>, config: EngineConfig) -> Result<Self> {
        planned_context(config.context_size, shared.model.config().max_context)?;
        Ok(TextGenerator {
            shared,
            config,
            state: None,
            last: None,
        })
    }

    pub fn model(&self) -> &LoadedEngineModel {
        &self.shared
    }

    pub fn shared_model(&self) -> Arc<LoadedEngineModel> {
        self.shared.clone()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// The KV cache's context size.
    pub fn context_size(&self) -> usize {
        let max = self.shared.model.config().max_context;
        planned_context(self.config.context_size, max).unwrap_or(max)
    }

    /// A state with at least `slots` slots (reused when it has them).
    fn state(&mut self, slots: usize) -> Result<&mut dyn BackendState> {
        let fits = self.state.as_ref().is_some_and(|s| s.n_slots() >= slots);
        if !fits {
            self.state = None; // free the old cache first
            let ctx = self.context_size();
            let batch = self.config.batch_size.max(slots);
            self.state = Some(self.shared.model.new_state(slots, ctx, batch)?);
        }
        Ok(self.state.as_mut().expect("state just made"))
    }

    fn record(&mut self, stats: &GenerationStats, total: Duration) {
        self.last = Some(PerformanceProfile {
            load_time: self.shared.load_time,
            time_to_first_token: stats.time_to_first_token,
            total_time: total,
            prompt_tokens: stats.prompt_tokens,
            generated_tokens: stats.generated_tokens,
            prefill_tokens_per_second: stats.prefill_tokens_per_second(),
            decode_tokens_per_second: stats.decode_tokens_per_second(),
        });
    }

    /// Completes `prompt` (BOS added as the model asks).
    pub fn generate(&mut self, prompt: &str, config: &GenerationConfig) -> Result<Generation> {
        let ids = self.shared.encode_prompt(prompt)?;
        self.generate_ids(&ids, config)
    }

    /// Completes a conversation rendered with the model's chat template.
    pub fn generate_chat(
        &mut self,
        messages: &[ChatMessage],
        config: &GenerationConfig,
    ) -> Result<Generation> {
        let ids = self.shared.encode_chat(messages)?;
        self.generate_ids(&ids, config)
    }

    /// Completes a prompt given as token ids.
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<Generation> {
        let start = Instant::now();
        let slots = match config.strategy {
            SamplingStrategy::BeamSearch { beams, .. } => beams.max(1),
            _ => 1,
        };
        let shared = self.shared.clone();
        let stop_ids = config.stop_ids(&shared.end_tokens);
        let state = self.state(slots)?;
        let g = generate::generate_with(
            &shared.model,
            &shared.pieces,
            state,
            prompt,
            config,
            stop_ids,
            |_| Ok(()),
        )?;
        self.record(&g.stats, start.elapsed());
        Ok(g)
    }

    /// Completes `prompt` as an iterator of [`StreamChunk`]s: each chosen token with the text
    /// that became final with it. Text never ends inside a UTF-8 character or holds a stop
    /// string.
    pub fn generate_stream(
        &mut self,
        prompt: &str,
        config: &GenerationConfig,
    ) -> Result<TextStream<'_>> {
        let ids = self.shared.encode_prompt(prompt)?;
        self.generate_stream_ids(&ids, config)
    }

    /// [`TextGenerator::generate_stream`] from token ids.
    pub fn generate_stream_ids(
        &mut self,
        prompt: &[u32],
        config: &GenerationConfig,
    ) -> Result<TextStream<'_>> {
        if let SamplingStrategy::BeamSearch { .. } = config.strategy {
            return Err(Error::Invalid(
                "beam search cannot stream (the best beam is known at the end); use generate"
                    .into(),
            ));
        }
        let stop_ids = config.stop_ids(&self.shared.end_tokens);
        self.state(1)?;
        let TextGenerator {
            shared,
            state,
            last,
            ..
        } = self;
        let state = state.as_mut().expect("state made above");
        let inner = TokenStream::new(
            &shared.model,
            &shared.pieces,
            state,
            prompt,
            0,
            config,
            stop_ids,
        )?;
        Ok(TextStream {
            inner,
            load_time: shared.load_time,
            started: Instant::now(),
            last,
        })
    }

    /// Completes `prompt` on a background thread as an async `Stream` of [`StreamChunk`]s
    /// (with its own KV cache sized for the request). Requests made this way do not share
    /// forward calls; many concurrent requests belong on one
    /// [`crate::scheduler::StreamingEngine`], which batches them continuously.
    ///
    /// ```
    /// use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
    /// use bitnet_inference::generate::asynch::{block_on, next};
    /// # fn main() -> bitnet_inference::Result<()> {
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitnet-packed");
    /// let mut engine = InferenceEngine::new();
    /// engine.load_model(path)?;
    /// let mut stream = engine.generator()?.generate_async("hello", &GenerationConfig::greedy(5))?;
    /// let text = block_on(async {
    ///     let mut text = String::new();
    ///     while let Some(chunk) = next(&mut stream).await {
    ///         text.push_str(&chunk?.text);
    ///     }
    ///     Ok::<_, bitnet_inference::Error>(text)
    /// })?;
    /// assert_eq!(text, engine.generate("hello", &GenerationConfig::greedy(5))?.text);
    /// # Ok(()) }
    /// ```
    pub fn generate_async(
        &self,
        prompt: &str,
        config: &GenerationConfig,
    ) -> Result<AsyncTokenStream> {
        let ids = self.shared.encode_prompt(prompt)?;
        if let SamplingStrategy::BeamSearch { .. } = config.strategy {
            return Err(Error::Invalid(
                "beam search cannot stream; use generate".into(),
            ));
        }
        let ctx = (ids.len() + config.max_new_tokens)
            .min(self.context_size())
            .max(1);
        if ids.len() > ctx {
            return Err(Error::Invalid(format!(
                "the prompt of {} tokens does not fit the context size {ctx}",
                ids.len()
            )));
        }
        let mut state = self
            .shared
            .model
            .new_state(1, ctx, self.config.batch_size)?;
        let shared = self.shared.clone();
        let config = config.clone();
        Ok(AsyncTokenStream::spawn(move |tx| {
            let stop_ids = config.stop_ids(&shared.end_tokens);
            let stream = TokenStream::new(
                &shared.model,
                &shared.pieces,
                &mut state,
                &ids,
                0,
                &config,
                stop_ids,
            );
            match stream {
                Err(e) => {
                    tx.send(Err(e));
                }
                Ok(stream) => {
                    for item in stream {
                        if !tx.send(item) {
                            break;
                        }
                    }
                }
            }
        }))
    }

    /// Completes several prompts together: one forward call per step carries every
    /// sequence's next token (and prompt chunks), each sequence in its own KV slot. Greedy
    /// results equal those of generating each prompt alone.
    ///
    /// ```
    /// use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
    /// # fn main() -> bitnet_inference::Result<()> {
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitnet-packed");
    /// let mut engine = InferenceEngine::new();
    /// engine.load_model(path)?;
    /// let config = GenerationConfig::greedy(6);
    /// let together = engine.generator()?.generate_batch(&["hello", "the cat", "1 2 3"], &config)?;
    /// for (prompt, out) in ["hello", "the cat", "1 2 3"].iter().zip(together) {
    ///     assert_eq!(out?.tokens, engine.generate(prompt, &config)?.tokens);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn generate_batch(
        &mut self,
        prompts: &[&str],
        config: &GenerationConfig,
    ) -> Result<Vec<Result<Generation>>> {
        let ids = prompts
            .iter()
            .map(|p| self.shared.encode_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let requests: Vec<(&[u32], &GenerationConfig)> =
            ids.iter().map(|i| (&i[..], config)).collect();
        self.generate_batch_ids(&requests)
    }

    /// [`TextGenerator::generate_batch`] from token ids, each prompt with its own config.
    pub fn generate_batch_ids(
        &mut self,
        requests: &[(&[u32], &GenerationConfig)],
    ) -> Result<Vec<Result<Generation>>> {
        let shared = self.shared.clone();
        let state = self.state(requests.len().max(1))?;
        generate::generate_batch(
            &shared.model,
            &shared.pieces,
            state,
            requests,
            &shared.end_tokens,
        )
    }

    /// Memory held now: weights, this generator's KV cache and scratch, the process RSS.
    pub fn memory_stats(&self) -> MemoryStats {
        MemoryStats {
            weights_bytes: self.shared.model.weights().memory_bytes(),
            kv_cache_bytes: self.state.as_ref().map_or(0, |s| s.kv_bytes()),
            scratch_bytes: self.state.as_ref().map_or(0, |s| s.scratch_bytes())
                + self.shared.pieces.memory_bytes(),
            process_rss_bytes: process_rss_bytes(),
            device: self.shared.model.device_memory(),
        }
    }

    /// Load time and the timings of the last generation.
    pub fn performance_profile(&self) -> Option<PerformanceProfile> {
        self.last.clone()
    }
}

/// The iterator of [`TextGenerator::generate_stream`].
pub struct TextStream<'a> {
    inner: TokenStream<'a>,
    load_time: Duration,
    started: Instant,
    last: &'a mut Option<PerformanceProfile>,
}

impl TextStream<'_> {
    /// Stops the generation; held text comes out with the next item.
    pub fn cancel(&mut self) {
        self.inner.cancel();
    }

    pub fn stats(&self) -> GenerationStats {
        self.inner.stats()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.inner.finish_reason()
    }
}

impl Iterator for TextStream<'_> {
    type Item = Result<StreamChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.inner.next();
        if item.is_none() {
            let s = self.inner.stats();
            *self.last = Some(PerformanceProfile {
                load_time: self.load_time,
                time_to_first_token: s.time_to_first_token,
                total_time: self.started.elapsed(),
                prompt_tokens: s.prompt_tokens,
                generated_tokens: s.generated_tokens,
                prefill_tokens_per_second: s.prefill_tokens_per_second(),
                decode_tokens_per_second: s.decode_tokens_per_second(),
            });
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn engine(budget: usize) -> InferenceEngine {
        InferenceEngine::with_config(EngineConfig {
            model_memory_budget: budget,
            model: ModelOptions {
                threads: Some(1),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn weight_bytes(name: &str) -> usize {
        LoadedEngineModel::load(&fixture(name))
            .unwrap()
            .model
            .weights()
            .memory_bytes()
    }

    #[test]
    fn a_model_used_again_is_not_reloaded() {
        let (a, b) = (fixture("bitnet-packed"), fixture("llama-bitnet"));
        let mut e = engine(usize::MAX);
        e.load_model(a.as_path()).unwrap();
        let first = e.model().unwrap();
        e.load_model(b.as_path()).unwrap();
        // A relative spelling of the same directory is the same model.
        let spelled = a.join("../bitnet-packed");
        e.load_model(spelled).unwrap();
        assert!(Arc::ptr_eq(&first, &e.model().unwrap()), "A was reloaded");
        assert_eq!(e.model_cache().len(), 2);
        let keys = e.model_cache().paths();
        assert_eq!(keys.last().unwrap(), &std::fs::canonicalize(&a).unwrap());
        assert_eq!(
            e.model_cache().resident_bytes(),
            weight_bytes("bitnet-packed") + weight_bytes("llama-bitnet")
        );
        assert!(e.generate("hi", &GenerationConfig::greedy(2)).is_ok());
    }

    #[test]
    fn the_least_recently_used_model_is_evicted_first() {
        let names = ["bitnet-packed", "llama-bitnet", "bitnet-online-bf16"];
        let [a, b, c] = names.map(fixture);
        let mut sizes = names.map(weight_bytes);
        // Room for any two of the three, not for all three.
        sizes.sort_unstable();
        let mut cache = ModelCache::new(sizes[1] + sizes[2]);
        assert!(sizes.iter().sum::<usize>() > cache.budget());
        let ptr_a = Arc::as_ptr(&cache.get_or_load(&a).unwrap());
        cache.get_or_load(&b).unwrap();
        assert_eq!(Arc::as_ptr(&cache.get(&a).unwrap()), ptr_a); // A is now the most recent
        cache.get_or_load(&c).unwrap();
        assert!(!cache.contains(&b), "B was the least recently used");
        assert!(cache.contains(&a) && cache.contains(&c));
        assert_eq!(Arc::as_ptr(&cache.get(&a).unwrap()), ptr_a);
        assert_eq!(
            cache.resident_bytes(),
            weight_bytes("bitnet-packed") + weight_bytes("bitnet-online-bf16")
        );

        // A budget that fits one model: each load evicts the other, unless someone holds it.
        let one = ModelCache::new(sizes[2]);
        let mut one = one;
        let held = one.get_or_load(&a).unwrap();
        one.get_or_load(&b).unwrap();
        assert_eq!(one.len(), 2, "A is held by a caller and must stay");
        drop(held);
        one.get_or_load(&c).unwrap();
        assert_eq!(one.paths(), vec![std::fs::canonicalize(&c).unwrap()]);

        // The engine keeps only what fits beside the model in use.
        let mut e = engine(sizes[2]);
        e.load_model(a.as_path()).unwrap();
        e.load_model(b.as_path()).unwrap();
        assert_eq!(
            e.model_cache().paths(),
            vec![std::fs::canonicalize(&b).unwrap()]
        );
    }

    #[test]
    fn a_model_over_the_budget_still_loads_and_is_dropped_when_replaced() {
        let (a, b) = (fixture("bitnet-packed"), fixture("llama-bitnet"));
        // The default budget (0) keeps only the model in use.
        let mut e = InferenceEngine::new();
        e.load_model(a.as_path()).unwrap();
        assert_eq!(e.model_cache().len(), 1);
        assert!(e.generate("hi", &GenerationConfig::greedy(2)).is_ok());
        let old = Arc::downgrade(&e.model().unwrap());
        e.load_model(b.as_path()).unwrap();
        assert_eq!(e.model_cache().len(), 1);
        assert!(
            old.upgrade().is_none(),
            "the replaced model is still in memory"
        );
        // A failed load keeps the model in use.
        assert!(e.load_model(fixture("no-such-model")).is_err());
        assert!(e.model_cache().contains(&b));
        assert!(e.generate("hi", &GenerationConfig::greedy(2)).is_ok());
    }
}
