//! The CPU backend owns what it computes with: two backends built with different kernel
//! choices run side by side in one process, concurrently, each giving exactly what it gives
//! alone; `threads` is the backend's own count.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::backend::{Backend, BatchEntry, ModelOptions};
use bitnet_inference::kernels;
use bitnet_inference::model;
use std::path::Path;

fn tiny() -> model::LoadedModel {
    model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny")).unwrap()
}

/// The logits of a 24-token prompt (every position), then 8 decode steps of greedy tokens.
fn run(model: &CpuBackend) -> Vec<Vec<f32>> {
    let mut state = Backend::new_state(model, 1, 64, 32).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 300 + 10).collect();
    let batch: Vec<BatchEntry> = prompt
        .iter()
        .enumerate()
        .map(|(pos, &token)| BatchEntry {
            token,
            pos,
            slot: 0,
            logits: true,
        })
        .collect();
    Backend::forward(model, &batch, state.as_mut()).unwrap();
    let mut out: Vec<Vec<f32>> = (0..batch.len()).map(|i| state.logits(i).to_vec()).collect();
    for pos in batch.len()..batch.len() + 8 {
        let last = out.last().unwrap();
        let token = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        let e = [BatchEntry {
            token,
            pos,
            slot: 0,
            logits: true,
        }];
        Backend::forward(model, &e, state.as_mut()).unwrap();
        out.push(state.logits(0).to_vec());
    }
    out
}

#[test]
fn backends_with_different_kernels_compute_side_by_side() {
    let available = kernels::available_kernels();
    if available.len() < 2 {
        eprintln!("SKIP: this CPU has only the portable kernel");
        return;
    }
    let m = tiny();
    let best = CpuBackend::with_kernel(m.config.clone(), m.weights.clone(), available[0]).unwrap();
    let scalar = CpuBackend::with_kernel(
        m.config.clone(),
        m.weights.clone(),
        &kernels::scalar::ScalarKernel,
    )
    .unwrap();
    assert_eq!(scalar.kernel_name(), "scalar");
    let (alone_best, alone_scalar) = (run(&best), run(&scalar));
    // The float kernels follow the backend's choice: the portable path sums in another order,
    // so logits differ in their last bits (and an activation that lands on a rounding
    // boundary of the int8 quantization moves a little more), while staying the same model.
    assert_ne!(
        alone_best, alone_scalar,
        "the scalar backend ran the vector float kernels"
    );
    let prompt_rows = |v: &Vec<Vec<f32>>| v[..24].concat();
    let worst = prompt_rows(&alone_best)
        .iter()
        .zip(&prompt_rows(&alone_scalar))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "largest prompt logit difference, {} vs scalar: {worst}",
        best.kernel_name()
    );
    assert!(worst < 1e-3, "{worst}");
    // Both at once, from two threads, twice over: each exactly as alone.
    std::thread::scope(|s| {
        let a = s.spawn(|| (run(&best), run(&best)));
        let b = s.spawn(|| (run(&scalar), run(&scalar)));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert!(a.0 == alone_best && a.1 == alone_best);
        assert!(b.0 == alone_scalar && b.1 == alone_scalar);
    });
}

/// Threads of this process whose name starts with `prefix` (Linux; None elsewhere).
fn threads_named(prefix: &str) -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count(),
    )
}

#[test]
fn threads_are_the_backends_own() {
    let m = tiny();
    // Under nextest each test has its own process, so the count is this test's alone; under
    // `cargo test` other tests' backends come and go beside it.
    let alone = std::env::var_os("NEXTEST_RUN_ID").is_some();
    if !alone {
        eprintln!("SKIP: the thread count is checked under nextest (one process a test)");
    }
    if let Some(before) = threads_named("bitnet-compute").filter(|_| alone) {
        let b = CpuBackend::with_options(
            m.config.clone(),
            m.weights.clone(),
            &ModelOptions {
                threads: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
        run(&b);
        // The calling thread computes too: 3 threads are it and 2 workers.
        assert_eq!(threads_named("bitnet-compute"), Some(before + 2));
        drop(b);
        assert_eq!(
            threads_named("bitnet-compute"),
            Some(before),
            "joined on drop"
        );
    }
    for threads in [1, 3] {
        let options = ModelOptions {
            threads: Some(threads),
            ..Default::default()
        };
        let b = CpuBackend::with_options(m.config.clone(), m.weights.clone(), &options).unwrap();
        assert_eq!(b.threads(), threads);
    }
    let zero = ModelOptions {
        threads: Some(0),
        ..Default::default()
    };
    let err = CpuBackend::with_options(m.config.clone(), m.weights.clone(), &zero)
        .err()
        .unwrap();
    assert!(err.to_string().contains("threads"), "{err}");
    // The same logits whatever the thread count.
    let one = CpuBackend::with_options(
        m.config.clone(),
        m.weights.clone(),
        &ModelOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let three = CpuBackend::with_options(
        m.config,
        m.weights,
        &ModelOptions {
            threads: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(run(&one) == run(&three));
}
