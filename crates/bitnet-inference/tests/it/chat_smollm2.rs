//! SmolLM2's chat template (from its GGUF) rendered like transformers' apply_chat_template;
//! expected strings recorded by tools/make_tokenizer_fixtures.py with jinja2.

use bitnet_inference::chat::{ChatMessage, ChatTemplate};
use serde_json::Value;
use std::path::Path;

#[test]
fn smollm2_template_matches_jinja2() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer/smollm2_chat.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let t = ChatTemplate::new(
        fx["template"].as_str().unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            t.render(&msgs, agp).unwrap(),
            c["rendered"].as_str().unwrap(),
            "{msgs:?} add_generation_prompt={agp}"
        );
    }
}
