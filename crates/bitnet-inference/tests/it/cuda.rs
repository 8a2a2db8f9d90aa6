//! The CUDA backend on a real GPU (`scripts/test-cuda` runs these on a GPU machine). Where
//! no NVIDIA driver or GPU is present (CI), each GPU test prints one `SKIP:` line and passes,
//! and `no_driver_is_a_clear_error` checks the error a user gets instead.
//!
//! The CUDA kernels reproduce the CPU backend's portable path (`ScalarKernel`: int8
//! activations with the same rounding, exact ternary sums, RMSNorm, attention and dense dots
//! in its order, no FMA), so the logits are compared bit for bit.

use bitnet_inference::backend::cpu::CpuBackend;
use bitnet_inference::backend::{self, Backend, BatchEntry, Device, ModelOptions};
use bitnet_inference::kernels::scalar::ScalarKernel;
use bitnet_inference::model::{self, ModelConfig, ModelWeights};
use std::path::Path;

/// Whether a GPU can be used here; prints the one skip line when not.
fn gpu(test: &str) -> bool {
    if backend::cuda::device_count() > 0 {
        return true;
    }
    let why = if backend::cuda::driver_present() {
        "the NVIDIA driver sees no GPU"
    } else {
        "no NVIDIA driver (libcuda.so)"
    };
    eprintln!("SKIP: {test}: {why}");
    false
}

/// bitnet-tiny: beside this crate, or (test executables carried to another machine by
/// `scripts/test-cuda`) under the current directory.
fn tiny_dir() -> std::path::PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bitnet-tiny");
    if built.exists() {
        built
    } else {
        "models/bitnet-tiny".into()
    }
}

fn cuda(config: &ModelConfig, weights: &ModelWeights) -> Box<dyn Backend> {
    cuda_with(config, weights, &ModelOptions::default())
}

fn cuda_with(
    config: &ModelConfig,
    weights: &ModelWeights,
    options: &ModelOptions,
) -> Box<dyn Backend> {
    let options = ModelOptions {
        device: Device::Cuda(0),
        ..*options
    };
    backend::build(config.clone(), weights.clone(), &options).unwrap()
}

fn entries(tokens: &[u32], slot: usize, start: usize) -> Vec<BatchEntry> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, &token)| BatchEntry {
            token,
            pos: start + i,
            slot,
            logits: true,
        })
        .collect()
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

/// Prefills `prompt` then decodes `steps` greedy tokens on both backends; asserts every
/// logits row equal bit for bit and returns the GPU's tokens.
fn greedy_on_both(cpu: &dyn Backend, gpu: &dyn Backend, prompt: &[u32], steps: usize) -> Vec<u32> {
    let ctx = prompt.len() + steps;
    let mut cs = cpu.new_state(1, ctx, prompt.len()).unwrap();
    let mut gs = gpu.new_state(1, ctx, prompt.len()).unwrap();
    let same = |c: &[f32], g: &[f32], what: &str| {
        let worst = c.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let bits = c.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            bits,
            "{what}: logits differ from the CPU's, by up to {worst}"
        );
    };
    let batch = entries(prompt, 0, 0);
    cpu.forward(&batch, cs.as_mut()).unwrap();
    gpu.forward(&batch, gs.as_mut()).unwrap();
    for i in 0..prompt.len() {
        same(cs.logits(i), gs.logits(i), &format!("prompt position {i}"));
    }
    let mut tok = argmax(gs.logits(prompt.len() - 1));
    let mut out = vec![tok];
    for step in 1..steps {
        let e = entries(&[tok], 0, prompt.len() + step - 1);
        cpu.forward(&e, cs.as_mut()).unwrap();
        gpu.forward(&e, gs.as_mut()).unwrap();
        same(cs.logits(0), gs.logits(0), &format!("decode step {step}"));
        tok = argmax(gs.logits(0));
        out.push(tok);
    }
    out
}

#[test]
fn bitnet_tiny_on_the_gpu_equals_the_cpu_for_64_greedy_tokens() {
    if !gpu("bitnet_tiny_on_the_gpu_equals_the_cpu_for_64_greedy_tokens") {
        return;
    }
    let m = model::load(&tiny_dir()).unwrap();
    let cpu = CpuBackend::with_kernel(m.config.clone(), m.weights.clone(), &ScalarKernel).unwrap();
    let gpu = cuda(&m.config, &m.weights);
    eprintln!("device: {}", gpu.kernel_name());
    let prompt = m
        .tokenizer
        .encode("Once upon a time, there was a little fox who", true)
        .unwrap();
    let tokens = greedy_on_both(&cpu, gpu.as_ref(), &prompt, 64);
    eprintln!("{}", m.tokenizer.decode(&tokens).unwrap_or_default());
}

/// A prompt of over 256 positions (attention folds two chunks; the ternary products of the
/// prefill on the tensor cores, in several tiles) with f16 KV caches and each quantized
/// lm_head on both backends.
#[test]
fn bitnet_tiny_long_prompt_f16_kv_quantized_heads_equal_the_cpu() {
    if !gpu("bitnet_tiny_long_prompt_f16_kv_quantized_heads_equal_the_cpu") {
        return;
    }
    let m = model::load(&tiny_dir()).unwrap();
    let text =
        "The fox ran over the hill and down to the river, where the water was cold. ".repeat(20);
    let prompt = m.tokenizer.encode(&text, true).unwrap();
    assert!(prompt.len() > 256, "{} tokens", prompt.len());
    let prompt = &prompt[..prompt.len().min(m.config.max_context - 16)];
    for head in [
        backend::LmHeadQuant::Int8,
        backend::LmHeadQuant::Q6K,
        backend::LmHeadQuant::Q4,
    ] {
        let options = ModelOptions {
            kv_type: backend::KvType::F16,
            lm_head: head,
            ..Default::default()
        };
        let mut cpu =
            CpuBackend::with_kernel(m.config.clone(), m.weights.clone(), &ScalarKernel).unwrap();
        cpu.set_kv_type(backend::KvType::F16);
        cpu.set_lm_head_quant(head).unwrap();
        let gpu = cuda_with(&m.config, &m.weights, &options);
        eprintln!("lm_head {head:?}");
        greedy_on_both(&cpu, gpu.as_ref(), prompt, 8);
    }
}

/// The issue-20 fixtures (RoPE scalings, Qwen3 float and ternary, group-scaled Q2_0) on the
/// GPU: prefill and 4 greedy steps, every logit the CPU's.
#[test]
fn issue20_models_on_the_gpu_equal_the_cpu() {
    if !gpu("issue20_models_on_the_gpu_equal_the_cpu") {
        return;
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-models");
    let dir = if built.exists() {
        built
    } else {
        "crates/bitnet-inference/tests/fixtures-models".into()
    };
    for (path, ids_dir) in [
        ("rope-dynamic", "rope-dynamic"),
        ("rope-llama3", "rope-llama3"),
        ("rope-yarn", "rope-yarn"),
        ("rope-longrope", "rope-longrope"),
        ("qwen3-bitnet", "qwen3-bitnet"),
        ("qwen3-q2_0-g64/model-q2_0.gguf", "qwen3-q2_0-g64"),
        ("qwen3-q2_0-g128/model-q2_0.gguf", "qwen3-q2_0-g128"),
    ] {
        let m = model::load(&dir.join(path)).unwrap();
        let ids: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(ids_dir).join("ids.json")).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = ids["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let cpu =
            CpuBackend::with_kernel(m.config.clone(), m.weights.clone(), &ScalarKernel).unwrap();
        let gpu = cuda(&m.config, &m.weights);
        eprintln!("{path}");
        greedy_on_both(&cpu, gpu.as_ref(), &ids[..ids.len() - 4], 4);
    }
}

/// The 2B-4T shape (hidden 2560, FFN 6912, 20/5 heads of 128, vocab 128256) with two of its
/// 30 layers of random weights: the kernels at the real model's sizes.
#[test]
fn the_2b_4t_shape_on_the_gpu_equals_the_cpu() {
    if !gpu("the_2b_4t_shape_on_the_gpu_equals_the_cpu") {
        return;
    }
    let config = ModelConfig {
        n_layers: 2,
        ..model::dummy::bitnet_2b_4t()
    };
    let weights = model::dummy::random_weights(&config, 5).unwrap();
    let cpu = CpuBackend::with_kernel(config.clone(), weights.clone(), &ScalarKernel).unwrap();
    let gpu = cuda(&config, &weights);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7919 + 11) % 128256).collect();
    greedy_on_both(&cpu, gpu.as_ref(), &prompt, 4);
}

/// Several sequences in one batch, at different positions, some rows without logits: each
/// row's logits are the bits that row gets alone (batch invariance on the GPU).
#[test]
fn gpu_rows_do_not_depend_on_the_batch() {
    if !gpu("gpu_rows_do_not_depend_on_the_batch") {
        return;
    }
    let m = model::load(&tiny_dir()).unwrap();
    let gpu = cuda(&m.config, &m.weights);
    let seqs: Vec<Vec<u32>> = (0..5u32)
        .map(|s| {
            (0..(10 + 3 * s))
                .map(|i| (i * 31 + s * 97) % 4096)
                .collect()
        })
        .collect();
    let alone: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| {
            let mut st = gpu.new_state(1, 64, s.len()).unwrap();
            gpu.forward(&entries(s, 0, 0), st.as_mut()).unwrap();
            st.logits(s.len() - 1).to_vec()
        })
        .collect();
    let mut st = gpu.new_state(5, 64, 128).unwrap();
    let mut batch = Vec::new();
    for (slot, s) in seqs.iter().enumerate() {
        let mut e = entries(s, slot, 0);
        for x in e.iter_mut().take(s.len() - 1) {
            x.logits = false;
        }
        batch.extend(e);
    }
    gpu.forward(&batch, st.as_mut()).unwrap();
    for (i, want) in alone.iter().enumerate() {
        let got = st.logits(i);
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "sequence {i}"
        );
    }
}

/// Without a driver (CI), asking for the GPU is an error that says what is missing, and
/// `auto` falls back to the CPU.
#[test]
fn no_driver_is_a_clear_error() {
    if backend::cuda::driver_present() {
        eprintln!("SKIP: no_driver_is_a_clear_error: this machine has an NVIDIA driver");
        return;
    }
    let m = model::load(&tiny_dir()).unwrap();
    let options = ModelOptions {
        device: Device::Cuda(0),
        ..Default::default()
    };
    let err = backend::build(m.config.clone(), m.weights.clone(), &options)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains("no NVIDIA driver"), "{err}");
    let auto = ModelOptions {
        device: Device::Auto,
        ..Default::default()
    };
    let b = backend::build(m.config, m.weights, &auto).unwrap();
    assert!(!b.kernel_name().starts_with("cuda"), "{}", b.kernel_name());
}

#[test]
fn devices_parse() {
    assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
    assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
    assert_eq!("auto".parse(), Ok(Device::Auto));
    assert_eq!("cpu".parse(), Ok(Device::Cpu));
    let err = "gpu".parse::<Device>().unwrap_err();
    assert!(err.contains("expected cpu, cuda, cuda:N"), "{err}");
    assert!("cuda:x".parse::<Device>().is_err());
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
}
