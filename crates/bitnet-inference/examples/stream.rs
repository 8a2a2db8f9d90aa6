//! `cargo run --example stream -- [MODEL] "prompt"`: tokens printed as they come, then the same
//! through the async `Stream`.
//! MODEL defaults to the shipped models/bitnet-tiny.
use bitnet_inference::engine::{GenerationConfig, InferenceEngine};
use bitnet_inference::generate::asynch::{block_on, next};
use std::io::Write;

fn main() -> bitnet_inference::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let prompt = args.next().unwrap_or_else(|| "Once upon a time".into());
    let mut engine = InferenceEngine::new();
    engine.load_model(model.as_str())?;
    let config = GenerationConfig::default()
        .with_max_new_tokens(48)
        .with_seed(42);
    let generator = engine.generator()?;
    for chunk in generator.generate_stream(&prompt, &config)? {
        print!("{}", chunk?.text);
        std::io::stdout().flush().ok();
    }
    println!("\n--- async:");
    let mut stream = generator.generate_async(&prompt, &config)?;
    block_on(async {
        while let Some(chunk) = next(&mut stream).await {
            print!("{}", chunk?.text);
        }
        println!();
        Ok(())
    })
}
