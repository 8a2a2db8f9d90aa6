//! Generation on the tiny fixture model through the library API: batching, seeds, stop
//! strings, streaming (sync and async), context limits and beam search.

use bitnet_inference::engine::{
    ContextOverflow, EngineConfig, FinishReason, GenerationConfig, InferenceEngine, ModelOptions,
    ModelRepo, SamplingStrategy,
};
use bitnet_inference::generate::asynch::{block_on, next};

fn engine() -> InferenceEngine {
    let mut e = InferenceEngine::with_config(EngineConfig {
        model: ModelOptions {
            threads: Some(2),
            ..Default::default()
        },
        ..Default::default()
    });
    e.load_model(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bitnet-packed"
    ))
    .unwrap();
    e
}

const PROMPTS: [&str; 5] = ["hello", "the cat sat", "1 2 3 4", "a", "Once upon a time"];

#[test]
fn batched_greedy_equals_each_alone() {
    let mut e = engine();
    let config = GenerationConfig::greedy(20);
    let alone: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| e.generate(p, &config).unwrap().tokens)
        .collect();
    let together = e
        .generator()
        .unwrap()
        .generate_batch(&PROMPTS, &config)
        .unwrap();
    for (a, t) in alone.iter().zip(together) {
        let t = t.unwrap();
        assert_eq!(&t.tokens, a);
        assert_eq!(t.tokens.len(), 20);
    }
}

#[test]
fn batched_sampling_equals_each_alone_too() {
    // Each sequence has its own seeded sampler, so batching changes nothing.
    let mut e = engine();
    let config = GenerationConfig::default()
        .with_temperature(1.0)
        .with_seed(7)
        .with_max_new_tokens(15);
    let alone: Vec<String> = PROMPTS
        .iter()
        .map(|p| e.generate(p, &config).unwrap().text)
        .collect();
    let together = e
        .generator()
        .unwrap()
        .generate_batch(&PROMPTS, &config)
        .unwrap();
    for (a, t) in alone.iter().zip(together) {
        assert_eq!(&t.unwrap().text, a);
    }
}

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let mut e = engine();
    let c = GenerationConfig {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        max_new_tokens: 30,
        ..Default::default()
    };
    let a = e.generate("hello", &c.clone().with_seed(1)).unwrap();
    let b = e.generate("hello", &c.clone().with_seed(1)).unwrap();
    let other = e.generate("hello", &c.clone().with_seed(2)).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, other.tokens);
}

#[test]
fn stop_string_cuts_the_text_and_is_not_emitted() {
    let mut e = engine();
    let free = e.generate("hello", &GenerationConfig::greedy(30)).unwrap();
    assert!(free.text.chars().count() >= 6, "{:?}", free.text);
    // A stop string from the middle of the greedy text; it usually spans tokens.
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[3..6].iter().collect();
    let cut_at = free.text.find(&stop).unwrap();
    let config = GenerationConfig::greedy(30).with_stop_string(stop.clone());
    let g = e.generate("hello", &config).unwrap();
    assert_eq!(g.text, free.text[..cut_at]);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    // Streaming gives the same, and no chunk shows part of the stop string past the cut.
    let streamed: String = e
        .generator()
        .unwrap()
        .generate_stream("hello", &config)
        .unwrap()
        .map(|c| c.unwrap().text)
        .collect();
    assert_eq!(streamed, g.text);
}

#[test]
fn end_tokens_stop_and_ignore_eos_goes_on() {
    let mut e = engine();
    let free = e.generate("hello", &GenerationConfig::greedy(10)).unwrap();
    assert_eq!(free.finish_reason, FinishReason::Length);
    // Make the third greedy token an end token: generation stops at its first occurrence.
    let stop = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == stop).unwrap();
    let mut c = GenerationConfig::greedy(10);
    c.stop_token_ids = vec![stop];
    let g = e.generate("hello", &c).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.tokens, free.tokens[..first]);
    // The model's EOS (318, from generation_config.json) pushed to the top by a logit bias.
    let mut c = GenerationConfig::greedy(10);
    c.logit_bias = vec![(318, 1000.0)];
    let g = e.generate("hello", &c).unwrap();
    assert_eq!((g.tokens.len(), g.finish_reason), (0, FinishReason::Stop));
    c.ignore_eos = true;
    let g = e.generate("hello", &c).unwrap();
    assert_eq!(g.tokens, vec![318; 10]);
}

#[test]
fn stream_iterator_and_async_stream_match_generate() {
    let mut e = engine();
    let c = GenerationConfig::default()
        .with_seed(3)
        .with_max_new_tokens(25);
    let whole = e.generate("the cat sat", &c).unwrap();
    let g = e.generator().unwrap();
    let mut tokens = Vec::new();
    let mut text = String::new();
    for chunk in g.generate_stream("the cat sat", &c).unwrap() {
        let chunk = chunk.unwrap();
        tokens.extend(chunk.token);
        text.push_str(&chunk.text);
    }
    assert_eq!(tokens, whole.tokens);
    assert_eq!(text, whole.text);
    let mut s = g.generate_async("the cat sat", &c).unwrap();
    let async_text = block_on(async {
        let mut t = String::new();
        while let Some(c) = next(&mut s).await {
            t.push_str(&c.unwrap().text);
        }
        t
    });
    assert_eq!(async_text, whole.text);
}

#[test]
fn full_context_is_an_error_unless_the_window_slides() {
    let mut e = InferenceEngine::with_config(EngineConfig {
        context_size: Some(32),
        ..Default::default()
    });
    e.load_model(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bitnet-packed"
    ))
    .unwrap();
    let mut c = GenerationConfig::greedy(100);
    c.ignore_eos = true;
    let err = e.generate("hello", &c).unwrap_err().to_string();
    assert!(err.contains("context of 32 tokens is full"), "{err}");
    c.context_overflow = ContextOverflow::Slide { keep: 1 };
    let g = e.generate("hello", &c).unwrap();
    assert_eq!(g.tokens.len(), 100);
    assert!(g.stats.context_shifts >= 1);
    let long = "word ".repeat(100);
    let err = e.generate(&long, &c).unwrap_err().to_string();
    assert!(err.contains("does not fit the context"), "{err}");
}

#[test]
fn beam_search_with_one_beam_is_greedy_and_more_beams_score_no_worse() {
    let mut e = engine();
    let greedy = e.generate("hello", &GenerationConfig::greedy(8)).unwrap();
    let beam = |n| {
        GenerationConfig::greedy(8).with_strategy(SamplingStrategy::BeamSearch {
            beams: n,
            length_penalty: 1.0,
            early_stopping: false,
        })
    };
    let one = e.generate("hello", &beam(1)).unwrap();
    assert_eq!(one.tokens, greedy.tokens);
    let four = e.generate("hello", &beam(4)).unwrap();
    assert!(!four.tokens.is_empty() && four.tokens.len() <= 8);
    assert_eq!(
        four.text,
        e.generator()
            .unwrap()
            .tokenizer()
            .decode(&four.tokens)
            .unwrap()
    );
}

#[test]
fn memory_and_profile_are_reported() {
    let mut e = engine();
    e.generate("hello", &GenerationConfig::greedy(5)).unwrap();
    let m = e.memory_stats().unwrap();
    assert!(m.weights_bytes > 0 && m.kv_cache_bytes > 0 && m.scratch_bytes > 0);
    assert!(m.process_rss_bytes.unwrap() > m.weights_bytes as u64);
    let p = e.performance_profile().unwrap();
    assert!(p.load_time.as_nanos() > 0 && p.generated_tokens == 5);
    assert!(p.decode_tokens_per_second > 0.0);
}

#[test]
fn model_repo_is_a_value_and_fails_clearly_when_not_obtainable() {
    let r: ModelRepo = "microsoft/bitnet-b1.58-2B-4T".parse().unwrap();
    assert_eq!(r.revision, "main");
    assert_eq!(r.to_string(), "microsoft/bitnet-b1.58-2B-4T@main");
    // Without the `hub` feature: "not available"; with it, offline and an empty cache: an
    // error naming what is missing. Either way the repo is named and nothing is fetched.
    let cache = std::env::temp_dir().join(format!("bitnet-empty-hub-{}", std::process::id()));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", &cache);
    let err = InferenceEngine::new()
        .load_model(r)
        .unwrap_err()
        .to_string();
    assert!(err.contains("microsoft/bitnet-b1.58-2B-4T"), "{err}");
    let err = InferenceEngine::new()
        .generate("x", &GenerationConfig::default())
        .unwrap_err();
    assert!(err.to_string().contains("no model is loaded"));
}

/// What the CLI's `--kv-type` and `--lm-head` do is engine configuration for a library user.
#[test]
fn model_options_are_engine_configuration() {
    use bitnet_inference::backend::{KvType, LmHeadQuant};
    use bitnet_inference::engine::{LoadedEngineModel, ModelOptions};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitnet-packed");
    let run = |model: ModelOptions| {
        let mut e = InferenceEngine::with_config(EngineConfig {
            model,
            context_size: Some(64),
            ..Default::default()
        });
        e.load_model(path).unwrap();
        let out = e.generate("hello", &GenerationConfig::greedy(4)).unwrap();
        let m = e.model().unwrap();
        (
            out,
            m.options.kv_type,
            m.options.lm_head,
            e.memory_stats().unwrap(),
        )
    };
    let (exact, kv, head, mem) = run(ModelOptions::default());
    assert_eq!((kv, head), (KvType::F32, LmHeadQuant::None));
    let options = ModelOptions {
        kv_type: KvType::F16,
        lm_head: LmHeadQuant::Int8,
        ..Default::default()
    };
    let (quick, kv, head, mem16) = run(options);
    assert_eq!((kv, head), (KvType::F16, LmHeadQuant::Int8));
    assert_eq!(mem16.kv_cache_bytes * 2, mem.kv_cache_bytes);
    // The int8 lm_head computes different (close) logits than the exact one.
    let logits = |options: ModelOptions| {
        let m = LoadedEngineModel::load_with(path.as_ref(), &options).unwrap();
        bitnet_inference::eval::sequence_logits(&m.model, &[1, 2, 3]).unwrap()
    };
    let (a, b) = (logits(ModelOptions::default()), logits(options));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 0.0 && diff < 0.5, "int8 lm_head vs exact: {diff}");
    assert_eq!(quick.tokens.len(), exact.tokens.len());
}
