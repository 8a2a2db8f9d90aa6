//! The continuous-batching scheduler on the shipped bitnet-tiny model: a request's tokens do
//! not depend on what else runs, on when it was admitted or on prefix-cache hits; queue and
//! context limits are refused at once; cancellation frees the slot; many threads and async
//! tasks share one scheduler.

use bitnet_inference::backend::Backend;
use bitnet_inference::engine::{EngineConfig, LoadedEngineModel, TextGenerator};
use bitnet_inference::generate::asynch::{block_on, next};
use bitnet_inference::generate::{FinishReason, GenerationConfig};
use bitnet_inference::scheduler::{
    DynamicBatchProcessor, Event, Request, RequestError, SchedulerConfig, Shutdown, StreamingEngine,
};
use std::path::Path;
use std::sync::{Arc, OnceLock};

const CONTEXT: usize = 256;

fn model() -> Arc<LoadedEngineModel> {
    static MODEL: OnceLock<Arc<LoadedEngineModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
            Arc::new(LoadedEngineModel::load(&dir).unwrap())
        })
        .clone()
}

fn config(max_running: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running,
        context_size: Some(CONTEXT),
        step_tokens: 32,
        ..Default::default()
    }
}

/// 64 requests: four families sharing long prefixes (prefix-cache hits), sampled with their
/// own seeds and temperatures, some greedy, one with a stop string, varied lengths.
fn requests() -> Vec<Request> {
    let m = model();
    let stems = [
        "Once upon a time, in a small village by the sea, there lived",
        "The little dog ran to the park because",
        "Tom and Lily wanted to build a big sandcastle. They",
        "One day, a bird",
    ];
    (0..64)
        .map(|i| {
            let text = format!("{} {}", stems[i % 4], ["", "a", "the", "very"][i / 16]);
            let prompt = m.encode_prompt(text.trim_end()).unwrap();
            let mut c = GenerationConfig::default()
                .with_max_new_tokens(8 + (i * 7) % 20)
                .with_seed(1000 + i as u64)
                .with_temperature(if i % 5 == 0 {
                    0.0
                } else {
                    0.6 + (i % 3) as f32 * 0.2
                });
            if i % 9 == 0 {
                c = c.with_stop_string(".");
            }
            Request::new(prompt, c)
        })
        .collect()
}

/// The same request generated alone, by the single-sequence path of `TextGenerator`.
fn alone(r: &Request) -> (Vec<u32>, String, FinishReason) {
    let mut g = TextGenerator::new(
        model(),
        EngineConfig {
            context_size: Some(CONTEXT),
            ..Default::default()
        },
    )
    .unwrap();
    let out = g.generate_ids(&r.prompt, &r.config).unwrap();
    (out.tokens, out.text, out.finish_reason)
}

#[test]
fn tokens_do_not_depend_on_the_batch_admission_step_or_prefix_cache() {
    let reqs = requests();
    let expected: Vec<_> = reqs.iter().map(alone).collect();

    // All 64 at once, admitted over arbitrary steps (0-3 new requests a step), then all 64
    // again: the second wave finds its prompts in the prefix cache.
    let mut p = DynamicBatchProcessor::new(model(), &config(64)).unwrap();
    let mut rng = 12345u64;
    let mut hits = [0; 2];
    for (wave, hits) in hits.iter_mut().enumerate() {
        let mut streams = Vec::new();
        let mut pending = reqs.iter().enumerate();
        loop {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            for _ in 0..(rng >> 62) {
                if let Some((i, r)) = pending.next() {
                    streams.push((i, p.submit(r.clone()).unwrap()));
                }
            }
            if !p.step() && pending.len() == 0 {
                break;
            }
        }
        p.run_until_idle();
        for (i, s) in streams {
            let got = s.collect_all().unwrap();
            let (tokens, text, reason) = &expected[i];
            assert_eq!(&got.tokens, tokens, "wave {wave}, request {i}: tokens");
            assert_eq!(&got.text, text, "wave {wave}, request {i}: text");
            assert_eq!(got.finish_reason, Some(*reason), "wave {wave}, request {i}");
            assert_eq!(got.usage().completion_tokens, tokens.len());
            *hits += usize::from(got.usage().cached_tokens > 0);
        }
    }
    // The second wave finds most prompts cached (a slot whose prefix another request is
    // using at that moment is not free, so not all of them).
    assert!(hits[1] >= 48, "cache hits by wave: {hits:?}");
    let stats = p.stats();
    assert_eq!(stats.prefix_hits as usize, hits[0] + hits[1]);
    assert_eq!(stats.finished, 128);
}

#[test]
fn prefix_cache_with_few_slots_evicts_and_stays_exact() {
    // Two running requests and eight KV slots: the cache keeps six idle prefixes, evicting
    // the least recently used; requests alone and through it give the same tokens.
    let reqs = requests();
    let m = model();
    let mut cfg = config(2);
    let per_slot = 2 * 10 * CONTEXT * 256 * 4; // layers · context · kv_dim · f32, K and V
    cfg.kv_cache_bytes = Some(8 * per_slot);
    let mut p = DynamicBatchProcessor::new(m, &cfg).unwrap();
    assert_eq!(p.stats().kv_cache_bytes, 8 * per_slot);
    for r in reqs.iter().step_by(5) {
        let s = p.submit(r.clone()).unwrap();
        p.run_until_idle();
        let got = s.collect_all().unwrap();
        assert_eq!(got.tokens, alone(r).0);
    }
    assert!(p.stats().prefix_hits > 0, "{:?}", p.stats());

    // A budget below the running requests' needs is refused with the figures.
    cfg.kv_cache_bytes = Some(per_slot);
    let err = DynamicBatchProcessor::new(model(), &cfg).err().unwrap();
    assert!(err.to_string().contains("2 running requests need"), "{err}");
}

#[test]
fn limits_are_refused_at_once_with_typed_errors() {
    let m = model();
    let mut cfg = config(1);
    cfg.max_queue = 2;
    let p = DynamicBatchProcessor::new(m.clone(), &cfg).unwrap();
    let short = Request::new(
        m.encode_prompt("Hello").unwrap(),
        GenerationConfig::greedy(4),
    );
    let _a = p.submit(short.clone()).unwrap();
    let _b = p.submit(short.clone()).unwrap();
    assert_eq!(
        p.submit(short.clone()).err(),
        Some(RequestError::QueueFull { capacity: 2 })
    );
    let long = Request::new(vec![5; CONTEXT + 1], GenerationConfig::greedy(4));
    assert_eq!(
        p.submit(long).err(),
        Some(RequestError::PromptTooLong {
            tokens: CONTEXT + 1,
            context: CONTEXT
        })
    );
    let empty = Request::new(vec![], GenerationConfig::greedy(4));
    assert_eq!(p.submit(empty).err(), Some(RequestError::EmptyPrompt));
    let bad = Request::new(vec![0, 4096], GenerationConfig::greedy(4));
    assert_eq!(
        p.submit(bad).err(),
        Some(RequestError::BadToken {
            id: 4096,
            vocab: 4096
        })
    );
    // Sizes a request or a caller merely claims are checked before they cost memory.
    let many = Request::new(vec![0, 5], GenerationConfig::greedy(4)).with_logprobs(usize::MAX);
    assert!(matches!(
        p.submit(many).err(),
        Some(RequestError::InvalidConfig(m)) if m.contains("vocabulary size 4096")
    ));
    let mut huge = config(1);
    huge.step_tokens = usize::MAX;
    let err = DynamicBatchProcessor::new(m.clone(), &huge).err().unwrap();
    assert!(err.to_string().contains("step_tokens"), "{err}");
}

#[test]
fn a_full_context_ends_the_request_by_length_and_others_go_on() {
    let m = model();
    let mut p = DynamicBatchProcessor::new(m.clone(), &config(2)).unwrap();
    let prompt = m.encode_prompt("Once upon a time").unwrap();
    let mut endless = GenerationConfig::greedy(100_000);
    endless.ignore_eos = true;
    let full = p
        .submit(Request::new(prompt.clone(), endless.clone()))
        .unwrap();
    let ok = p
        .submit(Request::new(prompt.clone(), GenerationConfig::greedy(5)))
        .unwrap();
    p.run_until_idle();
    let got = full.collect_all().unwrap();
    assert_eq!(got.finish_reason, Some(FinishReason::Length));
    // Every position of the context holds a token; the last one sampled is not run.
    assert_eq!(got.tokens.len(), CONTEXT - prompt.len() + 1);
    let mut g = TextGenerator::new(
        m,
        EngineConfig {
            context_size: Some(CONTEXT),
            ..Default::default()
        },
    )
    .unwrap();
    let mut until_full = endless;
    until_full.max_new_tokens = got.tokens.len();
    assert_eq!(got.text, g.generate_ids(&prompt, &until_full).unwrap().text);
    assert_eq!(ok.collect_all().unwrap().tokens.len(), 5);
}

#[test]
fn cancelling_frees_the_slot_during_prefill_and_decode() {
    let m = model();
    let mut cfg = config(1);
    cfg.step_tokens = 8;
    let mut p = DynamicBatchProcessor::new(m.clone(), &cfg).unwrap();
    let long_prompt = m
        .encode_prompt(&"The little dog ran to the park. ".repeat(12))
        .unwrap();
    assert!(long_prompt.len() > 40);
    let reqs = requests();

    // Dropped during its prefill (8 tokens a step): the next request gets the slot.
    let a = p
        .submit(Request::new(long_prompt, GenerationConfig::greedy(50)))
        .unwrap();
    p.step();
    p.step();
    drop(a);
    let b = p.submit(reqs[1].clone()).unwrap();
    p.run_until_idle();
    assert_eq!(b.collect_all().unwrap().tokens, alone(&reqs[1]).0);
    assert_eq!(p.stats().cancelled, 1);

    // Cancelled while decoding: the stream ends with `Cancelled` and the tokens so far.
    let mut endless = reqs[2].config.clone().with_max_new_tokens(1000);
    endless.ignore_eos = true;
    let c = p
        .submit(Request::new(reqs[2].prompt.clone(), endless))
        .unwrap();
    while p.stats().generated_tokens < 5 + 20 {
        p.step();
    }
    c.cancel();
    p.step();
    let got = c.collect_all().unwrap();
    assert_eq!(got.finish_reason, Some(FinishReason::Cancelled));
    assert!(!got.tokens.is_empty());
    assert!(p.is_idle());
}

#[test]
fn decoding_requests_get_a_token_every_step_while_a_long_prompt_is_prefilled() {
    let m = model();
    let mut cfg = config(2);
    cfg.step_tokens = 8;
    let mut p = DynamicBatchProcessor::new(m.clone(), &cfg).unwrap();
    let mut endless = GenerationConfig::greedy(1000);
    endless.ignore_eos = true;
    let a = p
        .submit(Request::new(m.encode_prompt("Once").unwrap(), endless))
        .unwrap();
    p.step(); // a's prompt, first token
    let long_prompt = m
        .encode_prompt(&"Tom and Lily played in the garden. ".repeat(10))
        .unwrap();
    let steps_to_prefill = long_prompt.len().div_ceil(7);
    let b = p
        .submit(Request::new(long_prompt, GenerationConfig::greedy(1)))
        .unwrap();
    let mut a_tokens = 0;
    for _ in 0..steps_to_prefill {
        p.step();
        while let Some(e) = a.try_recv() {
            a_tokens += matches!(e, Event::Token { .. }) as usize;
        }
    }
    // The first step's token came before the loop; every later step gave one more.
    assert!(
        a_tokens >= steps_to_prefill,
        "{a_tokens} tokens in {steps_to_prefill} steps"
    );
    a.cancel();
    p.run_until_idle();
    assert_eq!(b.collect_all().unwrap().tokens.len(), 1);
}

#[test]
fn streaming_engine_serves_threads_and_async_tasks() {
    let reqs = requests();
    let engine = StreamingEngine::start(model(), &config(8)).unwrap();
    std::thread::scope(|scope| {
        for chunk in reqs.chunks(16).take(3) {
            let submitter = engine.submitter();
            scope.spawn(move || {
                let streams: Vec<_> = chunk
                    .iter()
                    .map(|r| submitter.submit(r.clone()).unwrap())
                    .collect();
                for (r, s) in chunk.iter().zip(streams) {
                    assert_eq!(s.collect_all().unwrap().tokens, alone(r).0);
                }
            });
        }
        // An async client on this thread meanwhile.
        let r = &reqs[50];
        let mut s = engine.submit(r.clone()).unwrap();
        let text = block_on(async {
            let mut text = String::new();
            while let Some(e) = next(&mut s).await {
                match e {
                    Event::Token { text: t, .. } => text.push_str(&t),
                    Event::Finished { text: t, .. } => text.push_str(&t),
                    Event::Error(e) => panic!("{e}"),
                }
            }
            text
        });
        assert_eq!(text, alone(r).1);
    });

    // A text prompt, then a shutdown that finishes what is queued.
    let s = engine
        .submit_text("Once upon a time", GenerationConfig::greedy(6))
        .unwrap();
    let submitter = engine.submitter();
    engine.shutdown(Shutdown::Finish);
    assert_eq!(s.collect_all().unwrap().tokens.len(), 6);
    assert_eq!(
        submitter.submit(reqs[0].clone()).err(),
        Some(RequestError::ShuttingDown)
    );
}

#[test]
fn dropping_the_engine_cancels_requests_in_flight() {
    let engine = StreamingEngine::start(model(), &config(1)).unwrap();
    let mut endless = GenerationConfig::greedy(1_000_000);
    endless.ignore_eos = true;
    endless.context_overflow = bitnet_inference::generate::ContextOverflow::Slide { keep: 0 };
    let prompt = model().encode_prompt("Once").unwrap();
    let running = engine
        .submit(Request::new(prompt.clone(), endless))
        .unwrap();
    let queued = engine
        .submit(Request::new(prompt, GenerationConfig::greedy(5)))
        .unwrap();
    assert!(matches!(running.recv(), Some(Event::Token { .. })));
    drop(engine);
    let last = running.last();
    assert!(
        matches!(
            last,
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{last:?}"
    );
    assert_eq!(queued.collect_all().err(), Some(RequestError::ShuttingDown));
}

#[test]
fn logprobs_are_the_model_distribution_of_each_token() {
    let m = model();
    let mut p = DynamicBatchProcessor::new(m.clone(), &config(2)).unwrap();
    let prompt = m.encode_prompt("Once upon a time").unwrap();
    let greedy = p
        .submit(Request::new(prompt.clone(), GenerationConfig::greedy(6)).with_logprobs(3))
        .unwrap();
    let sampled = GenerationConfig::default()
        .with_max_new_tokens(6)
        .with_temperature(1.5)
        .with_seed(7);
    let sampled = p
        .submit(Request::new(prompt, sampled).with_logprobs(0))
        .unwrap();
    p.run_until_idle();
    let g = greedy.collect_all().unwrap();
    assert_eq!(g.logprobs.len(), g.tokens.len());
    for (lp, &id) in g.logprobs.iter().zip(&g.tokens) {
        assert_eq!(lp.token, id);
        assert_eq!(lp.top.len(), 3);
        // Greedy picks the most likely token; the alternatives come most likely first and
        // are probabilities of one distribution.
        assert_eq!(lp.top[0], (id, lp.logprob));
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
        let mass: f32 = lp.top.iter().map(|&(_, l)| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-5 && lp.logprob < 0.0, "{lp:?}");
    }
    let s = sampled.collect_all().unwrap();
    assert_eq!(s.logprobs.len(), s.tokens.len());
    assert!(s
        .logprobs
        .iter()
        .all(|lp| lp.top.is_empty() && lp.logprob <= 0.0));
}

#[test]
fn sampling_values_out_of_range_are_refused_by_name() {
    let m = model();
    let p = DynamicBatchProcessor::new(m.clone(), &config(1)).unwrap();
    let prompt = m.encode_prompt("Hello").unwrap();
    let with = |f: &dyn Fn(&mut GenerationConfig)| {
        let mut c = GenerationConfig::default();
        f(&mut c);
        p.submit(Request::new(prompt.clone(), c)).err()
    };
    for (field, bad) in [
        ("temperature", with(&|c| c.temperature = f32::NAN)),
        ("temperature", with(&|c| c.temperature = -0.5)),
        ("top_p", with(&|c| c.top_p = 0.0)),
        ("top_p", with(&|c| c.top_p = 1.5)),
        ("min_p", with(&|c| c.min_p = -0.1)),
        ("typical_p", with(&|c| c.typical_p = f32::INFINITY)),
        ("repetition_penalty", with(&|c| c.repetition_penalty = 0.0)),
        ("presence_penalty", with(&|c| c.presence_penalty = f32::NAN)),
        (
            "frequency_penalty",
            with(&|c| c.frequency_penalty = f32::NEG_INFINITY),
        ),
        ("logit_bias", with(&|c| c.logit_bias = vec![(3, f32::NAN)])),
        // Token ids past the vocabulary (4096): silently ignored before.
        ("logit_bias", with(&|c| c.logit_bias = vec![(4096, 1.0)])),
        (
            "stop_token_ids",
            with(&|c| c.stop_token_ids = vec![7, u32::MAX]),
        ),
        // An empty stop string: silently ignored before.
        (
            "stop[1] is empty",
            with(&|c| c.stop_strings = vec!["x".into(), String::new()]),
        ),
    ] {
        match bad {
            Some(RequestError::InvalidConfig(msg)) => assert!(msg.starts_with(field), "{msg}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    // The edges of each range are fine, and a banned token (-inf bias) too.
    assert!(with(&|c| {
        c.temperature = 0.0;
        c.top_p = 1.0;
        c.min_p = 1.0;
        c.logit_bias = vec![(3, f32::NEG_INFINITY), (4095, 1.0)];
        c.stop_token_ids = vec![4095];
    })
    .is_none());
    // The single-request path of the library checks the same ids.
    let mut g = TextGenerator::new(m.clone(), EngineConfig::default()).unwrap();
    let mut c = GenerationConfig::greedy(2);
    c.logit_bias = vec![(4096, -1.0)];
    let err = g.generate_ids(&prompt, &c).unwrap_err().to_string();
    assert!(
        err.contains("logit_bias names token 4096") && err.contains("vocabulary size 4096"),
        "{err}"
    );
}

#[test]
fn a_context_larger_than_the_model_is_an_error_not_a_silent_clamp() {
    let max = model().model.config().max_context;
    for bad in [0, max + 1] {
        let config = SchedulerConfig {
            context_size: Some(bad),
            ..config(2)
        };
        let err = DynamicBatchProcessor::new(model(), &config).err().unwrap();
        assert!(err.to_string().contains("context size"), "{err}");
        let engine = EngineConfig {
            context_size: Some(bad),
            ..Default::default()
        };
        let err = TextGenerator::new(model(), engine).err().unwrap();
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
    }
    let config = SchedulerConfig {
        context_size: Some(max),
        ..config(2)
    };
    assert_eq!(
        DynamicBatchProcessor::new(model(), &config)
            .unwrap()
            .context_size(),
        max
    );
}

#[test]
fn stats_count_batch_tokens_and_kv_use() {
    let m = model();
    let mut p = DynamicBatchProcessor::new(m.clone(), &config(2)).unwrap();
    let s = p.stats();
    assert_eq!(
        (s.kv_slots, s.kv_slot_tokens, s.kv_used_tokens),
        (2, CONTEXT, 0)
    );
    let prompt = m.encode_prompt("Once upon a time").unwrap();
    let a = p
        .submit(Request::new(prompt.clone(), GenerationConfig::greedy(6)))
        .unwrap();
    let b = p
        .submit(Request::new(
            m.encode_prompt("The little fish").unwrap(),
            GenerationConfig::greedy(4),
        ))
        .unwrap();
    assert_eq!(p.stats().queued, 2);
    p.step();
    let s = p.stats();
    assert_eq!((s.running, s.queued), (2, 0));
    assert!(s.kv_used_tokens > 0 && s.kv_used_tokens <= 2 * CONTEXT);
    p.run_until_idle();
    let (ca, cb) = (a.collect_all().unwrap(), b.collect_all().unwrap());
    let s = p.stats();
    // Every prompt token and every generated token but the last went through a forward step.
    let prompts = (ca.usage().prompt_tokens + cb.usage().prompt_tokens) as u64;
    let generated = (ca.tokens.len() + cb.tokens.len()) as u64;
    assert_eq!(s.batch_tokens, prompts + generated - 2);
    assert!(s.steps > 0 && s.batch_tokens > s.steps);
    // Nothing runs; both slots keep their prefixes cached.
    assert_eq!((s.running, s.kv_used_tokens, s.kv_cached_slots), (0, 0, 2));
}
