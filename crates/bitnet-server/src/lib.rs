//! `bitnet serve`: an OpenAI-compatible HTTP server on the library's continuous-batching
//! scheduler.
//!
//! A front end (docs/ARCHITECTURE.md): it owns one [`StreamingEngine`] and maps each HTTP
//! request onto scheduler [`Request`](bitnet_inference::scheduler::Request)s (one per
//! choice) and their events onto OpenAI's JSON and server-sent events. HTTP is hyper (one
//! HTTP/1.1 connection task each) under an axum router with tower-http's CORS; metrics are
//! encoded by `prometheus-client`.
//!
//! The listener opens first and the model loads behind it (`/health` answers 503 until it is
//! ready). SIGTERM or Ctrl-C stops accepting, answers 503, lets in-flight requests finish
//! within the shutdown timeout, cancels what is left, and returns.

pub mod api;
pub mod error;
mod handlers;
pub mod metrics;

use anyhow::Context as _;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::json::JsonGrammars;
use bitnet_inference::generate::GenerationConfig;
use bitnet_inference::scheduler::{kv_bytes_per_sequence, SchedulerConfig, StreamingEngine};
use error::ApiError;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics::{Metrics, StatsSource};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the server runs (the flags of `bitnet serve`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The model's name in the API (`model` of requests, `/v1/models`).
    pub model_id: String,
    /// Requests decoded together (KV slots for running requests); None: as many as
    /// `kv_cache_bytes` holds with the whole context each, at most [`MAX_AUTO_PARALLEL`].
    pub parallel: Option<usize>,
    /// Requests waiting for a slot; one more is a 429.
    pub max_queue: usize,
    /// Tokens every request may use, prompt and completion together (None: the model's, at
    /// most 4096).
    pub ctx_size: Option<usize>,
    /// Bytes of KV cache for running requests and cached prefixes (None: `parallel` slots).
    /// Every slot holds a whole context: the budget divides into requests, not the context.
    pub kv_cache_bytes: Option<usize>,
    /// Tokens per forward step (decode tokens first, then prompt chunks).
    pub step_tokens: usize,
    /// Accepted API keys (`Authorization: Bearer KEY`); empty: no key needed.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// How long in-flight requests may run on after SIGTERM/Ctrl-C.
    pub shutdown_timeout: Duration,
    /// Request bodies larger than this are a 413.
    pub max_body_bytes: usize,
    /// A request's headers and its body must each arrive within this (else 408 / closed).
    pub request_timeout: Duration,
    /// A comment line on an event stream after this long without an event.
    pub keep_alive: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            model_id: "bitnet".into(),
            parallel: Some(8),
            max_queue: 64,
            ctx_size: None,
            kv_cache_bytes: None,
            step_tokens: 256,
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            shutdown_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

/// The loaded model and its scheduler.
pub(crate) struct Loaded {
    pub engine: StreamingEngine,
    pub model: Arc<LoadedEngineModel>,
    /// The model's sampling defaults, which request fields override.
    pub defaults: GenerationConfig,
    pub context: usize,
    pub vocab: usize,
    /// Unix seconds of the load.
    pub created: u64,
    pub fingerprint: String,
    /// The vocabulary as llguidance sees it, for `response_format` (or why this model's
    /// vocabulary cannot be used for it).
    pub json: Result<Arc<JsonGrammars>, String>,
}

/// Requests rendered or tokenized at once (the cores, at most 4): tokenizing is CPU-bound, so
/// more at once would only multiply the memory it takes.
pub(crate) fn tokenizing_at_once() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

/// Requests run at once at most when the KV budget decides (`parallel: None`).
pub const MAX_AUTO_PARALLEL: usize = 256;

/// How many requests run at once: `parallel`, or as many whole-context sequences as the KV
/// budget holds (at most [`MAX_AUTO_PARALLEL`]).
fn running_for(config: &ServerConfig, model: &LoadedEngineModel) -> anyhow::Result<usize> {
    let (context, per_seq) = kv_bytes_per_sequence(model, config.ctx_size)?;
    match (config.parallel, config.kv_cache_bytes) {
        (Some(n), _) => Ok(n),
        (None, None) => anyhow::bail!("--parallel auto needs a KV budget (--kv-cache)"),
        (None, Some(budget)) => {
            let fit = budget / per_seq.max(1);
            if fit == 0 {
                anyhow::bail!(
                    "a KV budget of {budget} bytes holds no sequence of {context} tokens \
                     ({per_seq} bytes each): give --kv-cache at least {per_seq} or a smaller --ctx-size"
                );
            }
            Ok(fit.min(MAX_AUTO_PARALLEL))
        }
    }
}

/// Schema compilations at once (`AppState::compiles`).
const MAX_COMPILES: usize = 2;

/// What every handler shares.
pub(crate) struct AppState {
    pub config: ServerConfig,
    /// Permits for rendering and tokenizing ([`tokenizing_at_once`]).
    pub tokenizing: Arc<tokio::sync::Semaphore>,
    pub loaded: OnceLock<Loaded>,
    pub draining: AtomicBool,
    pub metrics: Metrics,
    /// Schema compilations running at once at most (each is CPU work off the async threads).
    pub compiles: tokio::sync::Semaphore,
}

impl AppState {
    /// The loaded model, or a 503 while loading or draining.
    pub fn ready(&self) -> Result<&Loaded, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::unavailable(
                "the server is shutting down",
                "shutting_down",
            ));
        }
        self.loaded
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is loading", "model_loading"))
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the server until SIGTERM/Ctrl-C: binds, prints `listening on http://ADDR` on stdout,
/// loads the model with `load` on a blocking thread (`/health` says 503 meanwhile), serves,
/// then drains. Builds its own tokio runtime.
pub fn run(
    config: ServerConfig,
    load: impl FnOnce() -> anyhow::Result<LoadedEngineModel> + Send + 'static,
) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("bitnet-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(serve(config, load));
    // Tasks still running (requests past the shutdown timeout) are dropped, which cancels
    // their requests; a model still loading is not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(
    config: ServerConfig,
    load: impl FnOnce() -> anyhow::Result<LoadedEngineModel> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    let stats: StatsSource = Arc::new(OnceLock::new());
    let state = Arc::new(AppState {
        config: config.clone(),
        loaded: OnceLock::new(),
        draining: AtomicBool::new(false),
        metrics: Metrics::new(stats.clone()),
        tokenizing: Arc::new(tokio::sync::Semaphore::new(tokenizing_at_once())),
        compiles: tokio::sync::Semaphore::new(MAX_COMPILES),
    });
    let router = handlers::router(state.clone())?;
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
    }

    // The model loads behind the open port.
    let loader = {
        let state = state.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let model = Arc::new(load()?);
            let running = running_for(&config, &model)?;
            let sched = SchedulerConfig {
                max_running: running,
                max_queue: config.max_queue,
                context_size: config.ctx_size,
                step_tokens: config.step_tokens,
                kv_cache_bytes: config.kv_cache_bytes,
                prefix_cache: true,
            };
            let engine = StreamingEngine::start(model.clone(), &sched)?;
            let context = engine.context_size();
            let kv = engine.stats();
            let vocab = model.model.config().vocab_size;
            let fingerprint = format!(
                "bitnet-{}-{}",
                env!("CARGO_PKG_VERSION"),
                model.model.kernel_name()
            );
            let started = std::time::Instant::now();
            let json = JsonGrammars::for_model(&model).map(Arc::new);
            match &json {
                Ok(_) => eprintln!(
                    "response_format ready ({:.0} ms to index the vocabulary)",
                    started.elapsed().as_secs_f64() * 1e3
                ),
                Err(e) => eprintln!("response_format unavailable for this model: {e}"),
            }
            let loaded = Loaded {
                json,
                defaults: GenerationConfig::from_model(&model.generation),
                engine,
                model,
                context,
                vocab,
                created: unix_now(),
                fingerprint,
            };
            eprintln!(
                "model {} ready: context {context} tokens for every request, {running} running \
                 at once, queue {}; KV cache {} bytes: {} slots of {} bytes ({} for cached \
                 prefixes)",
                config.model_id,
                config.max_queue,
                kv.kv_cache_bytes,
                kv.kv_slots,
                kv.kv_cache_bytes / kv.kv_slots.max(1),
                kv.kv_slots.saturating_sub(running)
            );
            if let Some(d) = loaded.model.model.device_memory() {
                eprintln!(
                    "on {}: {} bytes of GPU memory held (weights {}, KV cache {}, buffers {}){}",
                    d.device,
                    d.weights_bytes + kv.kv_cache_bytes + kv.scratch_bytes,
                    d.weights_bytes,
                    kv.kv_cache_bytes,
                    kv.scratch_bytes,
                    d.free_bytes
                        .zip(d.total_bytes)
                        .map_or(String::new(), |(f, t)| format!("; {f} of {t} bytes free"))
                );
            }
            let _ = state.loaded.set(loaded);
            // Weak: the metrics are part of the state they read.
            let reader = Arc::downgrade(&state);
            let _ = stats.set(Box::new(move || {
                reader
                    .upgrade()
                    .and_then(|s| s.loaded.get().map(|l| l.engine.stats()))
                    .unwrap_or_default()
            }));
            Ok(())
        })
    };
    let mut loader = Some(loader);

    let mut graceful = Some(hyper_util::server::graceful::GracefulShutdown::new());
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Set once draining: in-flight requests finish (or the timeout passes).
    let mut drained: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, go on.
                        eprintln!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(config.request_timeout)
                    .serve_connection(TokioIo::new(tcp), service);
                match &graceful {
                    Some(g) => {
                        let conn = g.watch(conn);
                        tokio::spawn(async move {
                            let _ = conn.await;
                            drop(permit);
                        });
                    }
                    // While draining, a new connection is answered 503 (a load balancer
                    // sees the server leave) and closed; it is not waited for.
                    None => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                            drop(permit);
                        });
                    }
                }
            }
            done = async { loader.as_mut().expect("polled only while loading").await }, if loader.is_some() => {
                loader = None;
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.context("cannot load the model")),
                    Err(e) => anyhow::bail!("the model loader failed: {e}"),
                }
            }
            _ = &mut shutdown, if drained.is_none() => {
                state.draining.store(true, Ordering::Release);
                eprintln!(
                    "shutting down: new requests get 503; waiting up to {} s for those in flight",
                    config.shutdown_timeout.as_secs_f64()
                );
                let g = graceful.take().expect("shutdown starts once");
                let timeout = config.shutdown_timeout;
                drained = Some(Box::pin(async move {
                    if tokio::time::timeout(timeout, g.shutdown()).await.is_err() {
                        eprintln!("shutdown timeout: cancelling the requests still running");
                    }
                }));
            }
            _ = async { drained.as_mut().expect("polled only while draining").await }, if drained.is_some() => break,
        }
    }
    drop(listener);
    // Returning drops the runtime's tasks (their request streams cancel), then the engine.
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
