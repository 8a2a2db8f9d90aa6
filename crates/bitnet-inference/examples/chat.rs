//! `cargo run --example chat -- [MODEL]`: a two-turn conversation with the model's chat template.
//! MODEL defaults to the shipped models/bitnet-tiny.
use bitnet_inference::chat::ChatMessage;
use bitnet_inference::engine::{GenerationConfig, InferenceEngine};

fn main() -> bitnet_inference::Result<()> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let mut engine = InferenceEngine::new();
    engine.load_model(model.as_str())?;
    let config = GenerationConfig::greedy(16);
    let mut messages = vec![ChatMessage::new("system", "You are brief.")];
    for question in ["What is the capital of France?", "And of Germany?"] {
        messages.push(ChatMessage::new("user", question));
        let answer = engine.generator()?.generate_chat(&messages, &config)?;
        println!("> {question}\n{}", answer.text.trim());
        messages.push(ChatMessage::new("assistant", answer.text));
    }
    Ok(())
}
