//! Routes and handlers: requests in, scheduler requests out, events back as OpenAI JSON or
//! server-sent events.

use crate::api::{self, Sampling};
use crate::error::ApiError;
use crate::metrics::HttpLabels;
use crate::{AppState, Loaded};
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::json::JsonFormat;
use bitnet_inference::generate::{FinishReason, SharedConstraint, TokenLogprobs};
use bitnet_inference::scheduler::{Event, RequestStream};
use futures_util::stream::{self, SelectAll, StreamExt};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tower_http::cors::{AllowOrigin, CorsLayer};

type AppStateRef = State<Arc<AppState>>;

pub(crate) fn router(state: Arc<AppState>) -> anyhow::Result<Router> {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let open = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    let mut app = api
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_http))
        .with_state(state.clone());
    let origins = &state.config.cors_origins;
    if !origins.is_empty() {
        let allow = if origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            let list = origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o)
                        .map_err(|_| anyhow::anyhow!("--cors-origin {o:?} is not a valid origin"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            AllowOrigin::list(list)
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    Ok(app)
}

// ------------------------------------------------------------------------------------------
// Middleware and small routes.

/// `Authorization: Bearer KEY` with one of the configured keys, when there are any.
async fn auth(State(state): AppStateRef, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k)
            if keys
                .iter()
                .any(|key| same_secret(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid")
            .with_code("invalid_api_key")
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an API key is needed: send `Authorization: Bearer KEY`",
        )
        .with_code("missing_api_key")
        .into_response(),
    }
}

/// Compares without stopping at the first difference (the time taken tells nothing about
/// where a guess went wrong).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn count_http(State(state): AppStateRef, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(req).await;
    state
        .metrics
        .http
        .get_or_create(&HttpLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path())).with_code("not_found")
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with_code("method_not_allowed")
}

/// The built-in page: a chat with streaming and a live dashboard of `/metrics`, one file with
/// its script and styles, embedded in the binary (it works offline).
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("web/index.html"))
}

async fn health(State(state): AppStateRef) -> Response {
    let status = if state.draining.load(Ordering::Acquire) {
        "draining"
    } else if state.loaded.get().is_none() {
        "loading"
    } else {
        return Json(json!({"status": "ok"})).into_response();
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": status})),
    )
        .into_response()
}

async fn metrics(State(state): AppStateRef) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

fn model_json(state: &AppState, l: &Loaded) -> Value {
    json!({
        "id": state.config.model_id,
        "object": "model",
        "created": l.created,
        "owned_by": "bitnet-inference",
        "context_length": l.context,
        "vocab_size": l.vocab,
    })
}

async fn models(State(state): AppStateRef) -> Result<Json<Value>, ApiError> {
    let l = state.ready()?;
    Ok(Json(
        json!({"object": "list", "data": [model_json(&state, l)]}),
    ))
}

async fn model_by_id(
    State(state): AppStateRef,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let l = state.ready()?;
    check_model(&state, Some(&id))?;
    Ok(Json(model_json(&state, l)))
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.config.model_id => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    state.config.model_id
                ),
            )
            .with_code("model_not_found")
        }),
        _ => Ok(()),
    }
}

/// The whole body, at most `max_body_bytes` (413) within `request_timeout` (408).
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )
        .with_code("body_too_large")
    };
    let claimed = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if claimed.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(state.config.request_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                state.config.request_timeout.as_secs_f64()
            ),
        )
        .with_code("timeout")),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Runs `work` (rendering or tokenizing text, which takes ~100 bytes of memory a byte) on
/// the blocking pool, at most [`crate::tokenizing_at_once`] at a time: each request's memory
/// is bounded by its body, and this bounds how many bodies' worth is held at once (16
/// concurrent 1 MiB `/tokenize` bodies took 2.1 GB before, issue 18).
async fn tokenizing<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let permit = state
        .tokenizing
        .clone()
        .acquire_owned()
        .await
        .map_err(internal)?;
    // The permit goes with the work: if the client goes away and this future is dropped,
    // the work still holds it until it ends.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(internal)
}

/// A random 64-bit number (ids, and seeds of requests that give none).
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ------------------------------------------------------------------------------------------
// Tokenizer routes.

/// `POST /tokenize`: a text's ids (with their pieces if asked), at most the context's worth.
async fn tokenize(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let l = state.ready()?;
    let bytes = read_body(&state, &headers, body).await?;
    let b = api::tokenize_request(&bytes)?;
    let (model, context) = (l.model.clone(), l.context);
    let add_special = b.add_special.unwrap_or(true);
    let content = b.content;
    let ids = tokenizing(&state, move || {
        api::tokenize_content(&model, &content, add_special, context)
    })
    .await??;
    if b.with_pieces == Some(true) {
        let tokens: Vec<Value> = ids
            .iter()
            .map(|&id| json!({"id": id, "piece": piece_text(&l.model, id)}))
            .collect();
        return Ok(Json(json!({"tokens": tokens})));
    }
    Ok(Json(json!({"tokens": ids})))
}

/// `POST /detokenize`: the text of at most the context's worth of ids.
async fn detokenize(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let l = state.ready()?;
    let bytes = read_body(&state, &headers, body).await?;
    let b = api::detokenize_request(&bytes)?;
    let content = api::detokenize_tokens(&l.model, &b.tokens, l.context)?;
    Ok(Json(json!({"content": content})))
}

fn piece_bytes(model: &LoadedEngineModel, id: u32) -> &[u8] {
    model.pieces.get(id)
}

fn piece_text(model: &LoadedEngineModel, id: u32) -> String {
    String::from_utf8_lossy(piece_bytes(model, id)).into_owned()
}

// ------------------------------------------------------------------------------------------
// Generation.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let l = state.ready()?;
    let bytes = read_body(&state, &headers, body).await?;
    let req = api::chat_request(&bytes, &l.defaults, l.context, l.vocab)?;
    check_model(&state, req.sampling.model.as_deref())?;
    let constraint = compile_format(&state, l, &req.sampling.response_format).await?;
    let (model, context, messages) = (l.model.clone(), l.context, req.messages);
    let ids = tokenizing(&state, move || api::chat_prompt(&model, &messages, context)).await??;
    generate(
        state,
        Kind::Chat,
        vec![ids],
        req.sampling,
        constraint,
        start,
    )
    .await
}

async fn completions(
    State(state): AppStateRef,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let l = state.ready()?;
    let bytes = read_body(&state, &headers, body).await?;
    let req = api::completion_request(&bytes, &l.defaults, l.context, l.vocab)?;
    check_model(&state, req.sampling.model.as_deref())?;
    let constraint = compile_format(&state, l, &req.sampling.response_format).await?;
    let (model, context, prompts) = (l.model.clone(), l.context, req.prompts);
    let ids = tokenizing(&state, move || {
        api::completion_prompts(&model, prompts, context)
    })
    .await??;
    generate(
        state,
        Kind::Completion,
        ids,
        req.sampling,
        constraint,
        start,
    )
    .await
}

/// Compiles `response_format` (None: free text) on a blocking thread, at most
/// `MAX_COMPILES` at once; a schema llguidance refuses, or one past the limits, is a 400
/// naming `response_format.json_schema.schema` with the reason.
async fn compile_format(
    state: &AppState,
    l: &Loaded,
    format: &Option<JsonFormat>,
) -> Result<Option<SharedConstraint>, ApiError> {
    let Some(format) = format.clone() else {
        return Ok(None);
    };
    let grammars = l.json.clone().map_err(|e| {
        ApiError::invalid(
            "response_format",
            format!("response_format is not available for this model: {e}"),
        )
        .with_code("unsupported_parameter")
    })?;
    let _permit = state.compiles.acquire().await.map_err(internal)?;
    let field = match format {
        JsonFormat::Object => "response_format",
        JsonFormat::Schema { .. } => api::SCHEMA_FIELD,
    };
    tokio::task::spawn_blocking(move || grammars.compile(&format))
        .await
        .map_err(internal)?
        .map(Some)
        .map_err(|e| ApiError::invalid(field, format!("{field}: {e}")).with_code("invalid_schema"))
}

/// What every chunk or answer of one request shares.
struct Reply {
    state: Arc<AppState>,
    model: Arc<LoadedEngineModel>,
    kind: Kind,
    id: String,
    created: u64,
    fingerprint: String,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
    start: Instant,
}

type Merged = SelectAll<stream::Map<RequestStream, Box<dyn FnMut(Event) -> (usize, Event) + Send>>>;

/// Submits one scheduler request per choice and answers, streamed or not.
async fn generate(
    state: Arc<AppState>,
    kind: Kind,
    prompts: Vec<Vec<u32>>,
    s: Sampling,
    constraint: Option<SharedConstraint>,
    start: Instant,
) -> Result<Response, ApiError> {
    let l = state.ready()?;
    let field = match kind {
        Kind::Chat => "messages",
        Kind::Completion => "prompt",
    };
    let context = l.context;
    let seed = s.seed.unwrap_or_else(random_u64);
    let requests = api::scheduler_requests(&prompts, &s, context, field, seed)?;
    let mut streams = Vec::with_capacity(requests.len());
    for mut r in requests {
        // Each choice starts its own matcher from the one compiled grammar.
        if let Some(c) = &constraint {
            r = r.with_constraint(c.clone());
        }
        // On an error the streams submitted so far are dropped, which cancels them.
        streams.push(
            l.engine
                .submit(r)
                .map_err(|e| ApiError::from_request_error(&e, field))?,
        );
    }
    let n_choices = streams.len();
    let merged: Merged = stream::select_all(streams.into_iter().enumerate().map(|(i, st)| {
        let tag: Box<dyn FnMut(Event) -> (usize, Event) + Send> = Box::new(move |e| (i, e));
        StreamExt::map(st, tag)
    }));
    let id_prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let reply = Reply {
        model: l.model.clone(),
        kind,
        id: format!(
            "{id_prefix}-{:016x}{:08x}",
            random_u64(),
            random_u64() as u32
        ),
        created: crate::unix_now(),
        fingerprint: l.fingerprint.clone(),
        logprobs: s.logprobs.is_some(),
        include_usage: s.include_usage,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        start,
        state: state.clone(),
    };
    if s.stream {
        let streamer = Streamer::new(reply, merged, n_choices);
        let events = stream::unfold(streamer, |mut st| async move {
            let data = st.next_data().await?;
            Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st))
        });
        let keep_alive = KeepAlive::new()
            .interval(state.config.keep_alive)
            .text("keep-alive");
        Ok(Sse::new(events).keep_alive(keep_alive).into_response())
    } else {
        whole(reply, merged, n_choices).await
    }
}

/// One choice as it is generated.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    logprobs: Vec<TokenLogprobs>,
    /// Logprobs not yet sent (a streamed token whose text is still held back).
    pending: Vec<TokenLogprobs>,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    last_token: Option<Instant>,
    /// Characters of text so far (completions' `text_offset`).
    offset: usize,
}

impl Reply {
    /// Latency histograms for a token of `c`.
    fn observe_token(&self, c: &mut ChoiceAcc) {
        let now = Instant::now();
        let m = &self.state.metrics;
        match c.last_token {
            None => m.ttft.observe((now - self.start).as_secs_f64()),
            Some(t) => m.itl.observe((now - t).as_secs_f64()),
        }
        c.last_token = Some(now);
        c.completion_tokens += 1;
    }

    fn usage(&self, choices: &[ChoiceAcc], cached: usize) -> Value {
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    fn token_entry(&self, id: u32, logprob: f32) -> Value {
        json!({
            "token": piece_text(&self.model, id),
            "logprob": logprob,
            "bytes": piece_bytes(&self.model, id),
        })
    }

    /// `logprobs` of a choice (or of a chunk) for these tokens; `offset`: characters of
    /// text before the first (completions).
    fn logprobs_json(&self, lps: &[TokenLogprobs], offset: &mut usize) -> Value {
        match self.kind {
            Kind::Chat => {
                let content: Vec<Value> = lps
                    .iter()
                    .map(|t| {
                        let mut e = self.token_entry(t.token, t.logprob);
                        e["top_logprobs"] = t
                            .top
                            .iter()
                            .map(|&(id, lp)| self.token_entry(id, lp))
                            .collect();
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let mut tokens = Vec::new();
                let mut token_logprobs = Vec::new();
                let mut top = Vec::new();
                let mut offsets = Vec::new();
                for t in lps {
                    let text = piece_text(&self.model, t.token);
                    offsets.push(*offset);
                    *offset += text.chars().count();
                    tokens.push(text);
                    token_logprobs.push(t.logprob);
                    let alts: serde_json::Map<String, Value> = t
                        .top
                        .iter()
                        .map(|&(id, lp)| (piece_text(&self.model, id), json!(lp)))
                        .collect();
                    top.push(Value::Object(alts));
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    fn error_field(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

/// A non-streamed answer: every choice read to its end.
async fn whole(reply: Reply, mut merged: Merged, n: usize) -> Result<Response, ApiError> {
    let mut choices: Vec<ChoiceAcc> = (0..n).map(|_| ChoiceAcc::default()).collect();
    let mut cached = 0;
    while let Some((i, event)) = merged.next().await {
        let c = &mut choices[i];
        match event {
            Event::Token { text, logprobs, .. } => {
                reply.observe_token(c);
                c.text.push_str(&text);
                c.logprobs.extend(logprobs);
            }
            Event::Finished {
                text,
                reason,
                stats,
            } => {
                c.text.push_str(&text);
                c.finish = Some(reason);
                cached += stats.cached_tokens;
            }
            // Dropping `merged` cancels the other choices.
            Event::Error(e) => return Err(ApiError::from_request_error(&e, reply.error_field())),
        }
    }
    reply
        .state
        .metrics
        .request_duration
        .observe(reply.start.elapsed().as_secs_f64());
    let usage = reply.usage(&choices, cached);
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = if reply.logprobs {
                reply.logprobs_json(&c.logprobs, &mut 0)
            } else {
                Value::Null
            };
            let finish = c.finish.map(FinishReason::as_str);
            match reply.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }),
            }
        })
        .collect();
    let object = match reply.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    Ok(Json(json!({
        "id": reply.id,
        "object": object,
        "created": reply.created,
        "model": reply.state.config.model_id,
        "system_fingerprint": reply.fingerprint,
        "choices": out,
        "usage": usage,
    }))
    .into_response())
}

/// A streamed answer: chunks in OpenAI's format, then the usage chunk if asked, then
/// `[DONE]`. Dropping it (the client went away) drops the request streams, which cancels
/// them at the scheduler's next step.
struct Streamer {
    reply: Reply,
    merged: Merged,
    choices: Vec<ChoiceAcc>,
    cached: usize,
    out: VecDeque<String>,
    ended: bool,
    /// An error event was sent (the stream then ends with `[DONE]` as OpenAI's do).
    failed: bool,
}

impl Streamer {
    fn new(reply: Reply, merged: Merged, n: usize) -> Self {
        let mut s = Streamer {
            reply,
            merged,
            choices: (0..n).map(|_| ChoiceAcc::default()).collect(),
            cached: 0,
            out: VecDeque::new(),
            ended: false,
            failed: false,
        };
        if s.reply.kind == Kind::Chat {
            // OpenAI opens each choice with the assistant's role.
            for i in 0..n {
                let c = s.chunk(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                );
                s.out.push_back(c);
            }
        }
        s
    }

    fn chunk(&self, i: usize, content: Value, logprobs: Value, finish: Option<&str>) -> String {
        let r = &self.reply;
        let choice = match r.kind {
            Kind::Chat => json!({
                "index": i,
                "delta": content,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": i,
                "text": content,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        let object = match r.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": r.id,
            "object": object,
            "created": r.created,
            "model": r.state.config.model_id,
            "system_fingerprint": r.fingerprint,
            "choices": [choice],
        });
        if r.include_usage {
            v["usage"] = Value::Null;
        }
        v.to_string()
    }

    /// A chunk carrying `text` (and the logprobs waiting for it) for choice `i`.
    fn text_chunk(&mut self, i: usize, text: String) -> String {
        let pending = std::mem::take(&mut self.choices[i].pending);
        let logprobs = if self.reply.logprobs {
            let mut offset = self.choices[i].offset;
            let v = self.reply.logprobs_json(&pending, &mut offset);
            self.choices[i].offset = offset;
            v
        } else {
            Value::Null
        };
        let content = match self.reply.kind {
            Kind::Chat => json!({"content": text}),
            Kind::Completion => json!(text),
        };
        self.chunk(i, content, logprobs, None)
    }

    fn on_event(&mut self, i: usize, event: Event) {
        match event {
            Event::Token { text, logprobs, .. } => {
                self.reply.observe_token(&mut self.choices[i]);
                self.choices[i].pending.extend(logprobs);
                // Text still held back (part of a character or of a possible stop string)
                // waits, with its logprobs, for the token that completes it.
                if !text.is_empty() {
                    let c = self.text_chunk(i, text);
                    self.out.push_back(c);
                }
            }
            Event::Finished {
                text,
                reason,
                stats,
            } => {
                self.cached += stats.cached_tokens;
                if !text.is_empty() || !self.choices[i].pending.is_empty() {
                    let c = self.text_chunk(i, text);
                    self.out.push_back(c);
                }
                self.choices[i].finish = Some(reason);
                let empty = match self.reply.kind {
                    Kind::Chat => json!({}),
                    Kind::Completion => json!(""),
                };
                let c = self.chunk(i, empty, Value::Null, Some(reason.as_str()));
                self.out.push_back(c);
            }
            Event::Error(e) => {
                let err = ApiError::from_request_error(&e, self.reply.error_field());
                self.out.push_back(err.body().to_string());
                self.failed = true;
            }
        }
    }

    /// The next `data:` payload, None after `[DONE]`.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(d) = self.out.pop_front() {
                return Some(d);
            }
            if self.ended {
                return None;
            }
            match self.merged.next().await {
                Some((i, event)) => self.on_event(i, event),
                None => {
                    self.ended = true;
                    if !self.failed && self.choices.iter().any(|c| c.finish.is_none()) {
                        // The engine went away with a choice unfinished (the server is
                        // shutting down): an error, and no `[DONE]`, which would tell the
                        // client its answer was complete.
                        let err = ApiError::unavailable(
                            "the server stopped before this request finished",
                            "shutting_down",
                        );
                        self.out.push_back(err.body().to_string());
                        continue;
                    }
                    let r = &self.reply;
                    r.state
                        .metrics
                        .request_duration
                        .observe(r.start.elapsed().as_secs_f64());
                    if r.include_usage {
                        let mut v = json!({
                            "id": r.id,
                            "object": match r.kind {
                                Kind::Chat => "chat.completion.chunk",
                                Kind::Completion => "text_completion",
                            },
                            "created": r.created,
                            "model": r.state.config.model_id,
                            "system_fingerprint": r.fingerprint,
                            "choices": [],
                        });
                        v["usage"] = r.usage(&self.choices, self.cached);
                        self.out.push_back(v.to_string());
                    }
                    self.out.push_back("[DONE]".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::ServerConfig;
    use std::sync::atomic::AtomicBool;
    use std::sync::OnceLock;
    use tower::ServiceExt;

    fn app(config: ServerConfig) -> (Arc<AppState>, Router) {
        let state = Arc::new(AppState {
            config,
            loaded: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics: Metrics::new(Arc::new(OnceLock::new())),
            tokenizing: Arc::new(tokio::sync::Semaphore::new(1)),
            compiles: tokio::sync::Semaphore::new(1),
        });
        let r = router(state.clone()).unwrap();
        (state, r)
    }

    async fn call(r: &Router, method: &str, uri: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = r
            .clone()
            .oneshot(req.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn loading_and_draining_answer_503() {
        let (state, r) = app(ServerConfig::default());
        let (s, v) = call(&r, "GET", "/health", None).await;
        assert_eq!(
            (s, v["status"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("loading"))
        );
        for (m, uri) in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/tokenize"),
        ] {
            let (s, v) = call(&r, m, uri, None).await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert_eq!(v["error"]["code"], "model_loading", "{uri}");
            assert_eq!(v["error"]["type"], "unavailable_error", "{uri}");
        }
        state.draining.store(true, Ordering::Release);
        let (s, v) = call(&r, "GET", "/health", None).await;
        assert_eq!(
            (s, v["status"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("draining"))
        );
        let (s, v) = call(&r, "POST", "/v1/completions", None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
        );
    }

    #[tokio::test]
    async fn keys_routes_and_methods() {
        let (_, r) = app(ServerConfig {
            api_keys: vec!["sesame".into()],
            ..Default::default()
        });
        let (s, v) = call(&r, "GET", "/v1/models", None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("missing_api_key"))
        );
        let (s, v) = call(&r, "GET", "/v1/models", Some("sesam")).await;
        assert_eq!(
            (s, v["error"]["type"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("authentication_error"))
        );
        // The right key gets through (to the 503 of a model still loading).
        let (s, _) = call(&r, "GET", "/v1/models", Some("sesame")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        // Health needs no key.
        assert_eq!(
            call(&r, "GET", "/health", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (s, v) = call(&r, "GET", "/v2/nothing", None).await;
        assert_eq!(
            (s, v["error"]["type"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found_error"))
        );
        let (s, v) = call(&r, "GET", "/v1/chat/completions", Some("sesame")).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
        );
        assert!(
            same_secret(b"abc", b"abc")
                && !same_secret(b"abc", b"abd")
                && !same_secret(b"abc", b"abcd")
        );
    }
}
