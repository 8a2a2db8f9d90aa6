//! `cargo run --release --example scheduler_bench -- [MODEL] [THREADS] [REQUESTS] [TOKENS]`:
//! REQUESTS greedy requests of TOKENS new tokens each (distinct prompts, EOS ignored) through
//! the continuous-batching scheduler, all at once and then one at a time; prints generated
//! tokens per second for both and the scheduler's own share of each step (admission,
//! cancellation and event dispatch, i.e. the step minus forward pass and sampling).
//! MODEL defaults to the shipped models/bitnet-tiny.
use bitnet_inference::backend::Backend;
use bitnet_inference::engine::LoadedEngineModel;
use bitnet_inference::generate::GenerationConfig;
use bitnet_inference::scheduler::{DynamicBatchProcessor, Request, SchedulerConfig};
use std::sync::Arc;
use std::time::Instant;

fn main() -> bitnet_inference::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny").into());
    let arg = |a: Option<String>, d: usize| a.and_then(|s| s.parse().ok()).unwrap_or(d);
    let threads = arg(args.next(), 2);
    let n = arg(args.next(), 16);
    let tokens = arg(args.next(), 64);
    let options = bitnet_inference::engine::ModelOptions {
        threads: Some(threads),
        ..Default::default()
    };
    let m = Arc::new(LoadedEngineModel::load_with(model.as_ref(), &options)?);
    let stems = [
        "Once upon a time",
        "The little dog",
        "In the morning",
        "Tom and Lily",
    ];
    let requests: Vec<Request> = (0..n)
        .map(|i| {
            let text = format!("{} {}", stems[i % 4], i);
            let mut c = GenerationConfig::greedy(tokens);
            c.ignore_eos = true;
            Ok(Request::new(m.encode_prompt(&text)?, c))
        })
        .collect::<bitnet_inference::Result<_>>()?;
    println!("model {model}, {threads} threads, {n} requests of {tokens} tokens");
    for running in [n, 1] {
        let config = SchedulerConfig {
            max_running: running,
            max_queue: n,
            context_size: Some(m.model.config().max_context.min(1024)),
            prefix_cache: false,
            ..Default::default()
        };
        let mut p = DynamicBatchProcessor::new(m.clone(), &config)?;
        let start = Instant::now();
        let streams: Vec<_> = requests
            .iter()
            .map(|r| p.submit(r.clone()).expect("queue sized for all"))
            .collect();
        p.run_until_idle();
        let secs = start.elapsed().as_secs_f64();
        let generated: usize = streams
            .into_iter()
            .map(|s| s.collect_all().map(|c| c.tokens.len()).unwrap_or(0))
            .sum();
        let st = p.stats();
        let overhead = (st.step_time - st.compute_time).as_secs_f64();
        println!(
            "{running:>3} running: {generated} tokens in {secs:.2} s = {:.1} tok/s; {} steps, \
             scheduler overhead {:.1} us a step = {:.2}% of the step",
            generated as f64 / secs,
            st.steps,
            overhead / st.steps as f64 * 1e6,
            100.0 * overhead / st.step_time.as_secs_f64()
        );
    }
    Ok(())
}
