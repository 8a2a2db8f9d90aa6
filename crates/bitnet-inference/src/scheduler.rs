//! Continuous batching: many requests share one forward call per step.
//!
//! [`DynamicBatchProcessor`] is the step loop. Requests wait in a bounded queue and are
//! admitted into the running batch between forward steps, whenever a sequence slot is free;
//! each step runs the next token of every decoding request first, then fills the rest of the
//! step's token budget with prompt chunks (chunked prefill), so a long prompt being admitted
//! delays the others' next token by at most one budget's worth of work. A request whose
//! stream is dropped or cancelled leaves at the next step, mid-prefill too.
//!
//! Prefix cache: a KV slot keeps the keys and values of its last sequence after it ends. A new
//! request goes to the free slot holding the longest prefix of its prompt and prefills only
//! the rest; with no shared prefix it takes the least recently used slot (evicting that
//! cache). The slots, and so the cache, are sized by a KV memory budget in bytes.
//!
//! [`StreamingEngine`] runs a processor on its own thread: any thread or async task submits
//! and reads its [`RequestStream`] (an `Iterator` and a `futures_core::Stream` of [`Event`]s).
//!
//! Batch invariance: every row of a forward call is computed by the same arithmetic
//! whatever else is in the call, each request samples from its own seeded generator, and a
//! cached prefix holds the bits a fresh prefill would write; so a request's tokens do not
//! depend on the other requests, on when it was admitted or on prefix-cache hits (tested).

use crate::backend::BackendState;
use crate::backend::BatchEntry;
use crate::engine::LoadedEngineModel;
use crate::generate::sequence::step_sequences;
use crate::generate::{
    FinishReason, GenerationConfig, GenerationStats, SamplingStrategy, Sequence, SharedConstraint,
    TokenLogprobs,
};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most KV slots (running requests and cached prefixes) a processor plans.
pub const MAX_SLOTS: usize = 4096;
/// The most tokens one forward step may take.
pub const MAX_STEP_TOKENS: usize = 65536;

/// The context each sequence of `model` gets for `context_size` (None: the model's, at most
/// 4096) and the bytes of KV cache one such sequence needs: what a KV budget is divided by
/// to know how many requests it holds, each with the whole context.
pub fn kv_bytes_per_sequence(
    model: &LoadedEngineModel,
    context_size: Option<usize>,
) -> crate::Result<(usize, usize)> {
    let context = crate::engine::planned_context(context_size, model.model.config().max_context)?;
    let bytes = context
        .checked_mul(model.model.kv_bytes_per_position())
        .ok_or_else(|| crate::Error::Invalid("the KV cache of one sequence overflows".into()))?;
    Ok((context, bytes))
}

/// How a processor is sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests decoded together at most.
    pub max_running: usize,
    /// Requests waiting for a slot at most; one more is refused with
    /// [`RequestError::QueueFull`].
    pub max_queue: usize,
    /// Tokens per sequence (None: the model's, at most 4096).
    pub context_size: Option<usize>,
    /// Tokens per forward step: every decoding request's next token, then prompt chunks.
    pub step_tokens: usize,
    /// Bytes of KV cache for running requests and cached prefixes together (None: exactly
    /// `max_running` slots). More slots than `max_running` keep more prefixes cached.
    pub kv_cache_bytes: Option<usize>,
    /// Reuse the KV of cached prefixes.
    pub prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_running: 16,
            max_queue: 256,
            context_size: None,
            step_tokens: 64,
            kv_cache_bytes: None,
            prefix_cache: true,
        }
    }
}

/// Why a request did not (fully) run. Sent on its stream, or returned by `submit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the queue is full ({capacity} requests waiting); try again later")]
    QueueFull { capacity: usize },
    #[error("the prompt of {tokens} tokens does not fit the context size {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("beam search is not batched; use TextGenerator for it")]
    Unsupported,
    /// A sampling value out of its range (the message names the field).
    #[error("{0}")]
    InvalidConfig(String),
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    #[error("the model failed: {0}")]
    Model(String),
    /// The request's constraint could not start or failed mid-way (the message says why);
    /// the text streamed before it stands.
    #[error("{0}")]
    Constraint(String),
}

/// Token counts of a finished request, as OpenAI's `usage` counts them (read from its
/// [`GenerationStats`] by [`Usage::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn of(stats: &GenerationStats) -> Self {
        Usage {
            prompt_tokens: stats.prompt_tokens,
            cached_tokens: stats.cached_tokens,
            completion_tokens: stats.generated_tokens,
        }
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text that became final with it (whole UTF-8 characters;
    /// empty while a character or a possible stop string is incomplete), with its
    /// log-probabilities when the request asked for them.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The end: the text held back until now, why it ended, counts and timings
    /// ([`Usage::of`] gives the counts as OpenAI names them).
    Finished {
        text: String,
        reason: FinishReason,
        stats: GenerationStats,
    },
    /// The request failed; nothing follows.
    Error(RequestError),
}

/// A generation request: prompt ids (BOS included if wanted) and its own sampling, stop
/// rules, limits and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// Send each token's log-probability and those of this many alternatives.
    pub logprobs: Option<usize>,
    /// Hold the output to this rule (constrained decoding): the request's sequence starts its
    /// own constraint from it when it is admitted.
    pub constraint: Option<SharedConstraint>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, config: GenerationConfig) -> Self {
        Request {
            prompt,
            config,
            logprobs: None,
            constraint: None,
        }
    }

    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    pub fn with_constraint(mut self, constraint: SharedConstraint) -> Self {
        self.constraint = Some(constraint);
        self
    }
}

// ------------------------------------------------------------------------------------------
// A request's stream: the processor pushes, the client pulls (blocking or async).

#[derive(Default)]
struct StreamState {
    events: VecDeque<Event>,
    ended: bool,
    waker: Option<Waker>,
}

struct StreamShared {
    id: u64,
    state: Mutex<StreamState>,
    ready: Condvar,
    cancelled: AtomicBool,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        // A panic while the lock was held cannot leave the queue half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, event: Event) {
        let mut s = self.lock();
        if matches!(event, Event::Finished { .. } | Event::Error(_)) {
            s.ended = true;
        }
        s.events.push_back(event);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        drop(s);
        self.ready.notify_all();
    }
}

/// The events of one request, in order, ending with [`Event::Finished`] or [`Event::Error`].
/// Dropping it cancels the request.
pub struct RequestStream {
    shared: Arc<StreamShared>,
}

impl RequestStream {
    /// The request's id (unique within its processor).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Asks the processor to stop the request at its next step; its stream then ends with
    /// `Finished { reason: Cancelled, .. }`.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
    }

    /// The next event, waiting for it; None after the last.
    pub fn recv(&self) -> Option<Event> {
        let mut s = self.shared.lock();
        loop {
            if let Some(e) = s.events.pop_front() {
                return Some(e);
            }
            if s.ended {
                return None;
            }
            s = self.shared.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next event if one is there.
    pub fn try_recv(&self) -> Option<Event> {
        self.shared.lock().events.pop_front()
    }

    /// Reads the stream to its end: the generated ids and text, or the error.
    pub fn collect_all(self) -> Result<Completion, RequestError> {
        let mut out = Completion::default();
        while let Some(e) = self.recv() {
            match e {
                Event::Token { id, text, logprobs } => {
                    out.tokens.push(id);
                    out.text.push_str(&text);
                    out.logprobs.extend(logprobs);
                }
                Event::Finished {
                    text,
                    reason,
                    stats,
                } => {
                    out.text.push_str(&text);
                    out.finish_reason = Some(reason);
                    out.stats = stats;
                }
                Event::Error(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Iterator for RequestStream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl futures_core::Stream for RequestStream {
    type Item = Event;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let mut s = self.shared.lock();
        if let Some(e) = s.events.pop_front() {
            return Poll::Ready(Some(e));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A whole request's result ([`RequestStream::collect_all`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// One entry a token when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprobs>,
    pub text: String,
    pub finish_reason: Option<FinishReason>,
    pub stats: GenerationStats,
}

impl Completion {
    pub fn usage(&self) -> Usage {
        Usage::of(&self.stats)
    }
}

// ------------------------------------------------------------------------------------------
// The queue, shared by submitters and the processor.

struct Queued {
    request: Request,
    stream: Arc<StreamShared>,
}

#[derive(Default)]
struct InboxState {
    queue: VecDeque<Queued>,
    /// No new requests: set by a shutdown.
    closed: bool,
    /// Cancel everything now (a shutdown that does not wait).
    abort: bool,
}

struct Inbox {
    state: Mutex<InboxState>,
    /// The processor's counters as of its last step, for other threads.
    published: Mutex<SchedulerStats>,
    wake: Condvar,
    next_id: AtomicU64,
    max_queue: usize,
    context: usize,
    vocab: usize,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `request` and queues it; what cannot be served is refused at once.
    fn submit(&self, request: Request) -> Result<RequestStream, RequestError> {
        let n = request.prompt.len();
        if n == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if n > self.context {
            return Err(RequestError::PromptTooLong {
                tokens: n,
                context: self.context,
            });
        }
        if let Some(&id) = request.prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(RequestError::BadToken {
                id,
                vocab: self.vocab,
            });
        }
        if let SamplingStrategy::BeamSearch { .. } = request.config.strategy {
            return Err(RequestError::Unsupported);
        }
        if let Some(n) = request.logprobs.filter(|&n| n > self.vocab) {
            return Err(RequestError::InvalidConfig(format!(
                "logprobs = {n}: expected at most the vocabulary size {}",
                self.vocab
            )));
        }
        request
            .config
            .validate()
            .and_then(|()| request.config.check_token_ids(self.vocab))
            .map_err(RequestError::InvalidConfig)?;
        let mut s = self.lock();
        if s.closed {
            return Err(RequestError::ShuttingDown);
        }
        if s.queue.len() >= self.max_queue {
            return Err(RequestError::QueueFull {
                capacity: self.max_queue,
            });
        }
        let stream = Arc::new(StreamShared {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(StreamState::default()),
            ready: Condvar::new(),
            cancelled: AtomicBool::new(false),
        });
        s.queue.push_back(Queued {
            request,
            stream: stream.clone(),
        });
        drop(s);
        self.wake.notify_all();
        Ok(RequestStream { shared: stream })
    }
}

/// Submits requests to a processor from any thread.
#[derive(Clone)]
pub struct Submitter {
    inbox: Arc<Inbox>,
}

impl Submitter {
    /// Queues `request`, or refuses it at once (queue full, prompt longer than the context,
    /// shutting down, ...).
    pub fn submit(&self, request: Request) -> Result<RequestStream, RequestError> {
        self.inbox.submit(request)
    }
}

// ------------------------------------------------------------------------------------------
// The processor.

/// The client side of the request in a slot (its [`Sequence`] is in the processor's `seqs`).
struct Active {
    stream: Arc<StreamShared>,
    /// Generated tokens already sent.
    sent: usize,
}

/// One KV slot: the request using it, or the prefix its cache still holds.
struct Slot {
    active: Option<Active>,
    /// Tokens whose keys and values the slot holds (valid while no request uses it).
    cached: Vec<u32>,
    last_used: u64,
}

/// Counters since the processor started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchedulerStats {
    pub steps: u64,
    pub admitted: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache instead of prefilled.
    pub cached_prompt_tokens: u64,
    /// Admissions that reused a cached prefix.
    pub prefix_hits: u64,
    pub generated_tokens: u64,
    /// Requests running and waiting now, and how many may run at once.
    pub running: usize,
    pub queued: usize,
    pub max_running: usize,
    /// KV cache bytes in all slots.
    pub kv_cache_bytes: usize,
    /// Bytes of the forward pass's other buffers (activations, logits).
    pub scratch_bytes: usize,
    /// Where the model computes on a GPU: the bytes its weights take there (0 on the CPU)
    /// and the GPU's total memory (0 where unknown). The KV cache and the other buffers
    /// are then on the GPU too.
    pub device_weights_bytes: usize,
    pub device_total_bytes: usize,
    /// KV slots planned (running requests and cached prefixes), tokens each.
    pub kv_slots: usize,
    pub kv_slot_tokens: usize,
    /// Tokens whose keys and values the running requests hold now.
    pub kv_used_tokens: usize,
    /// Free slots that hold a cached prefix now.
    pub kv_cached_slots: usize,
    /// Tokens in all forward calls: `batch_tokens / steps` is the mean batch size.
    pub batch_tokens: u64,
    /// Time in steps that ran a forward call, and the part of it inside the shared step
    /// (forward pass and sampling): the rest is the scheduler's own overhead.
    pub step_time: Duration,
    pub compute_time: Duration,
}

/// The continuous-batching step loop over one model (see the module documentation). Drive
/// it with [`DynamicBatchProcessor::step`], or hand it to a [`StreamingEngine`].
pub struct DynamicBatchProcessor {
    model: Arc<LoadedEngineModel>,
    state: Box<dyn BackendState>,
    inbox: Arc<Inbox>,
    slots: Vec<Slot>,
    /// The sequence of each busy slot.
    seqs: Vec<Option<Sequence>>,
    batch: Vec<BatchEntry>,
    rows: Vec<usize>,
    max_running: usize,
    prefix_cache: bool,
    clock: u64,
    stats: SchedulerStats,
}

impl DynamicBatchProcessor {
    pub fn new(model: Arc<LoadedEngineModel>, config: &SchedulerConfig) -> crate::Result<Self> {
        let c = model.model.config();
        // Keys and values of every layer for one sequence of the whole context.
        let (context, per_slot) = kv_bytes_per_sequence(&model, config.context_size)?;
        let max_running = config.max_running.max(1);
        let step_tokens = config.step_tokens.max(max_running);
        // Sizes a caller gives are checked before anything is planned in proportion to them.
        if max_running > MAX_SLOTS || step_tokens > MAX_STEP_TOKENS {
            return Err(crate::Error::Invalid(format!(
                "max_running {max_running} and step_tokens {step_tokens}: expected at most \
                 {MAX_SLOTS} and {MAX_STEP_TOKENS}"
            )));
        }
        let n_slots = match config.kv_cache_bytes {
            None => max_running,
            Some(budget) => {
                // More slots than MAX_SLOTS would only hold more cached prefixes.
                let fit = (budget / per_slot.max(1)).min(MAX_SLOTS);
                if fit < max_running {
                    return Err(crate::Error::Invalid(format!(
                        "a KV cache budget of {budget} bytes holds {fit} sequences of {context} \
                         tokens ({per_slot} bytes each); {max_running} running requests need {}",
                        per_slot * max_running
                    )));
                }
                fit
            }
        };
        let state = model.model.new_state(n_slots, context, step_tokens)?;
        let device = model.model.device_memory();
        let stats = SchedulerStats {
            kv_cache_bytes: state.kv_bytes(),
            scratch_bytes: state.scratch_bytes(),
            device_weights_bytes: device.as_ref().map_or(0, |d| d.weights_bytes),
            device_total_bytes: device.and_then(|d| d.total_bytes).unwrap_or(0),
            kv_slots: n_slots,
            kv_slot_tokens: context,
            max_running,
            ..Default::default()
        };
        let inbox = Arc::new(Inbox {
            state: Mutex::new(InboxState::default()),
            // The sizes are known before the first step.
            published: Mutex::new(stats),
            wake: Condvar::new(),
            next_id: AtomicU64::new(0),
            max_queue: config.max_queue,
            context,
            vocab: c.vocab_size,
        });
        Ok(DynamicBatchProcessor {
            model,
            state,
            inbox,
            slots: (0..n_slots)
                .map(|_| Slot {
                    active: None,
                    cached: Vec::new(),
                    last_used: 0,
                })
                .collect(),
            seqs: (0..n_slots).map(|_| None).collect(),
            batch: Vec::new(),
            rows: Vec::new(),
            max_running,
            prefix_cache: config.prefix_cache,
            clock: 0,
            stats,
        })
    }

    /// A handle that queues requests from any thread.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            inbox: self.inbox.clone(),
        }
    }

    /// Queues `request` ([`Submitter::submit`]).
    pub fn submit(&self, request: Request) -> Result<RequestStream, RequestError> {
        self.inbox.submit(request)
    }

    pub fn context_size(&self) -> usize {
        self.inbox.context
    }

    pub fn model(&self) -> &Arc<LoadedEngineModel> {
        &self.model
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            running: self.running(),
            queued: self.inbox.lock().queue.len(),
            kv_used_tokens: self
                .seqs
                .iter()
                .flatten()
                .map(|s| s.cached_tokens().len())
                .sum(),
            kv_cached_slots: self
                .slots
                .iter()
                .filter(|s| s.active.is_none() && !s.cached.is_empty())
                .count(),
            ..self.stats
        }
    }

    fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
    }

    /// Whether nothing is running or waiting.
    pub fn is_idle(&self) -> bool {
        self.running() == 0 && self.inbox.lock().queue.is_empty()
    }

    /// One step: drops cancelled requests, admits waiting ones into free slots, runs one
    /// forward call and sends each request its new token. Returns whether anything ran.
    pub fn step(&mut self) -> bool {
        let started = Instant::now();
        self.clock += 1;
        let abort = self.inbox.lock().abort;
        for i in 0..self.slots.len() {
            let cancelled = self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| abort || a.stream.cancelled.load(Ordering::Acquire));
            if cancelled {
                if let Some(seq) = self.seqs[i].as_mut() {
                    seq.cancel();
                }
                self.retire(i);
            }
        }
        self.admit();
        let compute = Instant::now();
        let ran = step_sequences(
            &self.model.model,
            &self.model.pieces,
            &mut self.state,
            &mut self.seqs,
            &mut self.batch,
            &mut self.rows,
        );
        let compute = compute.elapsed();
        let ran = match ran {
            Ok(ran) => ran,
            Err(e) => {
                // The forward pass refused the batch: every request in it fails, loudly.
                for i in 0..self.slots.len() {
                    if let Some(a) = self.slots[i].active.take() {
                        a.stream
                            .push(Event::Error(RequestError::Model(e.to_string())));
                        self.seqs[i] = None;
                        self.slots[i].cached.clear();
                    }
                }
                return true;
            }
        };
        if ran {
            self.stats.steps += 1;
            self.stats.batch_tokens += self.batch.len() as u64;
            self.stats.compute_time += compute;
        }
        for i in 0..self.slots.len() {
            let (Some(a), Some(seq)) = (self.slots[i].active.as_mut(), self.seqs[i].as_mut())
            else {
                continue;
            };
            let generated = seq.generated();
            if generated.len() > a.sent {
                let id = generated[generated.len() - 1];
                a.sent = generated.len();
                let mut text = String::new();
                seq.take_delta(&mut text);
                self.stats.generated_tokens += 1;
                let logprobs = seq.take_logprobs();
                a.stream.push(Event::Token { id, text, logprobs });
            }
            if seq.is_finished() || seq.error().is_some() {
                self.retire(i);
            }
        }
        if ran {
            self.stats.step_time += started.elapsed();
        }
        let now = self.stats();
        *self
            .inbox
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = now;
        ran
    }

    /// Moves waiting requests into free slots while fewer than `max_running` run.
    fn admit(&mut self) {
        let mut running = self.running();
        while running < self.max_running {
            let Some(q) = self.inbox.lock().queue.pop_front() else {
                return;
            };
            if q.stream.cancelled.load(Ordering::Acquire) {
                self.stats.cancelled += 1;
                q.stream.push(Event::Finished {
                    text: String::new(),
                    reason: FinishReason::Cancelled,
                    stats: GenerationStats {
                        prompt_tokens: q.request.prompt.len(),
                        ..Default::default()
                    },
                });
                continue;
            }
            let (slot, cached) = self.pick_slot(&q.request.prompt);
            let stop_ids = q.request.config.stop_ids(&self.model.end_tokens);
            let seq = Sequence::new(
                slot,
                &q.request.prompt,
                cached,
                &q.request.config,
                stop_ids,
                self.inbox.context,
            );
            let constraint = q.request.constraint.as_ref().map(|c| c.start()).transpose();
            let seq = match (seq, constraint) {
                (Ok(seq), Ok(c)) => Ok((seq, c)),
                (Err(e), _) => Err(RequestError::Model(e.to_string())),
                (_, Err(e)) => Err(RequestError::Constraint(e)),
            };
            match seq {
                Ok((mut seq, constraint)) => {
                    if let Some(n) = q.request.logprobs {
                        seq.set_logprobs(n);
                    }
                    if let Some(c) = constraint {
                        seq.set_constraint(c);
                    }
                    let reused = seq.stats().cached_tokens;
                    self.stats.admitted += 1;
                    self.stats.prompt_tokens += q.request.prompt.len() as u64;
                    self.stats.cached_prompt_tokens += reused as u64;
                    self.stats.prefix_hits += u64::from(reused > 0);
                    // The slot's cache is being overwritten from `reused` on.
                    self.slots[slot].cached.truncate(reused);
                    self.seqs[slot] = Some(seq);
                    self.slots[slot].active = Some(Active {
                        stream: q.stream,
                        sent: 0,
                    });
                    running += 1;
                }
                Err(e) => q.stream.push(Event::Error(e)),
            }
        }
    }

    /// The free slot for `prompt`: the one caching its longest prefix, else the least
    /// recently used. Returns the slot and how many prompt tokens its cache holds.
    fn pick_slot(&self, prompt: &[u32]) -> (usize, usize) {
        let free = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none());
        let common = |s: &Slot| {
            s.cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = if self.prefix_cache {
            free.clone()
                .map(|(i, s)| (i, common(s)))
                .filter(|&(_, n)| n > 0)
                .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))
        } else {
            None
        };
        best.unwrap_or_else(|| {
            let lru = free
                .min_by_key(|(i, s)| (s.last_used, *i))
                .map(|(i, _)| i)
                .expect("admit runs only with a free slot");
            (lru, 0)
        })
    }

    /// Ends the request in slot `i`: its last event, and the slot keeps its KV as a prefix.
    fn retire(&mut self, i: usize) {
        let (Some(a), Some(mut seq)) = (self.slots[i].active.take(), self.seqs[i].take()) else {
            return;
        };
        let slot = &mut self.slots[i];
        slot.cached.clear();
        slot.cached.extend_from_slice(seq.cached_tokens());
        slot.last_used = self.clock;
        let stats = seq.stats();
        let mut text = String::new();
        seq.take_delta(&mut text);
        if let Some(e) = seq.constraint_error() {
            // The request fails; text held back (part of a character or of a possible stop
            // string) is not sent.
            self.stats.finished += 1;
            a.stream
                .push(Event::Error(RequestError::Constraint(e.to_string())));
            return;
        }
        // A full context (without a sliding window) ends the request as OpenAI's API does:
        // finish reason `length`, with the text so far.
        let reason = match seq.error() {
            Some(_) => FinishReason::Length,
            None => seq.finish_reason().unwrap_or(FinishReason::Cancelled),
        };
        if reason == FinishReason::Cancelled {
            self.stats.cancelled += 1;
        } else {
            self.stats.finished += 1;
        }
        a.stream.push(Event::Finished {
            text,
            reason,
            stats,
        });
    }

    /// Runs steps until every queued and running request has ended.
    pub fn run_until_idle(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }

    /// The thread loop of a [`StreamingEngine`]: steps while there is work, sleeps while
    /// there is none, and returns once closed and idle.
    fn serve(&mut self) {
        loop {
            if !self.is_idle() {
                self.step();
                continue;
            }
            let inbox = self.inbox.clone();
            let mut s = inbox.lock();
            while s.queue.is_empty() && !s.closed {
                s = inbox.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.queue.is_empty() && s.closed {
                return;
            }
        }
    }
}

/// How [`StreamingEngine::shutdown`] treats requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Refuse new requests, finish every running and queued one.
    Finish,
    /// Refuse new requests, cancel every running and queued one at the next step.
    Cancel,
}

/// A [`DynamicBatchProcessor`] on its own thread: the one scheduler of a loaded model, which
/// any number of threads and async tasks submit to. Dropping it cancels what is in flight.
pub struct StreamingEngine {
    submitter: Submitter,
    model: Arc<LoadedEngineModel>,
    context: usize,
    worker: Option<JoinHandle<()>>,
}

impl StreamingEngine {
    /// Plans the KV cache and starts the scheduler thread.
    pub fn start(model: Arc<LoadedEngineModel>, config: &SchedulerConfig) -> crate::Result<Self> {
        let mut processor = DynamicBatchProcessor::new(model.clone(), config)?;
        let submitter = processor.submitter();
        let context = processor.context_size();
        let worker = std::thread::Builder::new()
            .name("bitnet-scheduler".into())
            .spawn(move || processor.serve())
            .map_err(|e| {
                crate::Error::Invalid(format!("cannot start the scheduler thread: {e}"))
            })?;
        Ok(StreamingEngine {
            submitter,
            model,
            context,
            worker: Some(worker),
        })
    }

    /// Queues `request`, or refuses it at once.
    pub fn submit(&self, request: Request) -> Result<RequestStream, RequestError> {
        self.submitter.submit(request)
    }

    /// Tokenizes `prompt` (BOS as the model asks) on the caller's thread and queues it.
    pub fn submit_text(
        &self,
        prompt: &str,
        config: GenerationConfig,
    ) -> Result<RequestStream, RequestError> {
        let ids = self
            .model
            .encode_prompt(prompt)
            .map_err(|e| RequestError::Model(e.to_string()))?;
        self.submit(Request::new(ids, config))
    }

    /// A handle for other threads.
    pub fn submitter(&self) -> Submitter {
        self.submitter.clone()
    }

    /// The scheduler's counters as of its last step; `queued` is counted now.
    pub fn stats(&self) -> SchedulerStats {
        let inbox = &self.submitter.inbox;
        let published = *inbox.published.lock().unwrap_or_else(|e| e.into_inner());
        SchedulerStats {
            queued: inbox.lock().queue.len(),
            ..published
        }
    }

    pub fn model(&self) -> &Arc<LoadedEngineModel> {
        &self.model
    }

    pub fn context_size(&self) -> usize {
        self.context
    }

    /// Stops taking requests, finishes or cancels those in flight, and waits for the thread.
    pub fn shutdown(mut self, mode: Shutdown) {
        self.stop(mode);
    }

    fn stop(&mut self, mode: Shutdown) {
        let inbox = &self.submitter.inbox;
        {
            let mut s = inbox.lock();
            s.closed = true;
            if mode == Shutdown::Cancel {
                s.abort = true;
                for q in s.queue.drain(..) {
                    q.stream.push(Event::Error(RequestError::ShuttingDown));
                }
            }
        }
        inbox.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for StreamingEngine {
    fn drop(&mut self) {
        self.stop(Shutdown::Cancel);
    }
}
