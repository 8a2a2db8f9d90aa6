//! `cargo run --release --features constrained --example constrained_cost -- [MODEL] [REPEATS]`:
//! what constrained decoding costs a token. Generates a greedy JSON answer to a nested schema
//! (one thread), then replays its tokens through fresh constraints REPEATS times, measuring
//! the mask computation (llguidance), taking the token, and applying the mask to the logits;
//! and compares with a decode step without a constraint. Times are the thread's CPU time
//! (Linux), which a busy machine disturbs far less than the wall clock. MODEL defaults to
//! the shipped models/bitnet-tiny.
use bitnet_inference::engine::{LoadedEngineModel, ModelOptions};
use bitnet_inference::generate::json::{JsonFormat, JsonGrammars};
use bitnet_inference::generate::{GenerationConfig, TokenMask};
use bitnet_inference::scheduler::{DynamicBatchProcessor, Request, SchedulerConfig};
use serde_json::json;
use std::sync::Arc;

/// CPU time of this thread, in seconds.
fn cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the duration of the call, and
    // CLOCK_THREAD_CPUTIME_ID is a clock every Linux kernel has.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let repeats: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let options = ModelOptions {
        threads: Some(1),
        ..Default::default()
    };
    let m = Arc::new(LoadedEngineModel::load_with(model.as_ref(), &options)?);
    let t = cpu();
    let grammars = JsonGrammars::for_model(&m)?;
    let index = cpu() - t;
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 1, "maximum": 120},
            "pet": {"enum": ["cat", "dog", "fish"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "home": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "pet", "tags", "home"],
        "additionalProperties": false
    });
    let t = cpu();
    let constraint = grammars.compile(&JsonFormat::Schema {
        name: "person".into(),
        schema,
    })?;
    let compile = cpu() - t;

    let config = SchedulerConfig {
        max_running: 1,
        context_size: Some(512),
        ..Default::default()
    };
    let prompt = m.encode_prompt("Once upon a time, a little girl named Lily")?;
    let run = |r: Request| -> Result<(Vec<u32>, String, f64), Box<dyn std::error::Error>> {
        let mut p = DynamicBatchProcessor::new(m.clone(), &config)?;
        let s = p.submit(r)?;
        let t = cpu();
        p.run_until_idle();
        let secs = cpu() - t;
        let c = s.collect_all()?;
        Ok((c.tokens, c.text, secs))
    };
    let (tokens, text, constrained) =
        run(Request::new(prompt.clone(), GenerationConfig::greedy(300))
            .with_constraint(constraint.clone()))?;
    // Again: the grammar's lexer states, built as the first run needed them, are shared.
    let (_, _, constrained_again) =
        run(Request::new(prompt.clone(), GenerationConfig::greedy(300))
            .with_constraint(constraint.clone()))?;
    let n = tokens.len();
    let mut free = GenerationConfig::greedy(n);
    free.ignore_eos = true;
    let (free_tokens, _, unconstrained) = run(Request::new(prompt.clone(), free))?;
    assert_eq!(free_tokens.len(), n);

    // The constraint's own work, replayed over the same tokens.
    let vocab = m.pieces.len();
    let mut mask = TokenMask::default();
    let mut logits = vec![0.5f32; vocab];
    let (mut t_mask, mut t_accept, mut t_apply) = (0.0, 0.0, 0.0);
    for _ in 0..repeats {
        let mut c = constraint.start()?;
        for &tok in &tokens {
            let a = cpu();
            mask.clear(vocab);
            c.next_allowed(&mut mask)?;
            let b = cpu();
            mask.apply(&mut logits);
            let _ = mask.count();
            let d = cpu();
            c.accept(tok)?;
            t_accept += cpu() - d;
            t_mask += b - a;
            t_apply += d - b;
        }
    }
    let per = |x: f64| x / (repeats * n) as f64 * 1e6;
    println!("model {model}: vocabulary {vocab} tokens, 1 thread, CPU time of this thread");
    println!(
        "index the vocabulary (once per model): {:.1} ms",
        index * 1e3
    );
    println!(
        "compile the schema (once per request): {:.2} ms",
        compile * 1e3
    );
    println!("output ({n} tokens): {text}");
    println!(
        "per token, replayed {repeats} times: mask {:.1} us, take the token {:.1} us, apply the mask to the logits {:.1} us",
        per(t_mask),
        per(t_accept),
        per(t_apply)
    );
    println!(
        "generation per token (prefill included), same {n} tokens: unconstrained {:.3} ms; \
         constrained {:.3} ms ({:+.1}%) the first time, {:.3} ms ({:+.1}%) the second",
        unconstrained / n as f64 * 1e3,
        constrained / n as f64 * 1e3,
        (constrained / unconstrained - 1.0) * 100.0,
        constrained_again / n as f64 * 1e3,
        (constrained_again / unconstrained - 1.0) * 100.0
    );
    Ok(())
}
