//! `cargo run --example generate -- [MODEL] "prompt"`: one completion with the model's defaults.
//! MODEL defaults to the shipped models/bitnet-tiny.
use bitnet_inference::engine::InferenceEngine;

fn main() -> bitnet_inference::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let prompt = args.next().unwrap_or_else(|| "Once upon a time".into());
    let mut engine = InferenceEngine::new();
    engine.load_model(model.as_str())?;
    let config = engine.default_generation_config().with_max_new_tokens(64);
    let out = engine.generate(&prompt, &config)?;
    println!("{prompt}{}", out.text);
    eprintln!(
        "{:?}\n{:?}",
        engine.performance_profile(),
        engine.memory_stats()
    );
    Ok(())
}
