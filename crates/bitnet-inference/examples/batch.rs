//! `cargo run --example batch -- [MODEL]`: several prompts generated together, checked against
//! one-at-a-time greedy decoding.
//! MODEL defaults to the shipped models/bitnet-tiny.
use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
use std::time::Instant;

fn main() -> bitnet_inference::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "1, 2, 3,",
        "Dogs are",
    ];
    let mut engine = InferenceEngine::new();
    engine.load_model(model.as_str())?;
    let config = GenerationConfig::greedy(32);
    let t = Instant::now();
    let together = engine.generator()?.generate_batch(&prompts, &config)?;
    let batched = t.elapsed();
    let t = Instant::now();
    for (p, g) in prompts.iter().zip(&together) {
        let alone = engine.generate(p, &config)?;
        assert_eq!(
            alone.tokens,
            g.as_ref()
                .map_err(|e| bitnet_inference::Error::Invalid(e.to_string()))?
                .tokens
        );
    }
    let single = t.elapsed();
    for (p, g) in prompts.iter().zip(together) {
        println!("{p}|{}", g?.text);
    }
    println!("together {batched:.2?}, one at a time {single:.2?} (same tokens)");
    Ok(())
}
