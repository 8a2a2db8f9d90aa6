//! The compute-backend seam: the four things generation, evaluation and the scheduler need
//! from a model, whatever computes it.
//!
//! A backend owns its weights and the KV caches it plans ([`Backend::new_state`]); a forward
//! call runs one batch of `(token, position, slot, wants logits)` entries and leaves the
//! logits of the entries that asked for them readable on the host ([`BackendState::logits`]),
//! so a device with its own memory copies out only the rows that are sampled. Everything
//! above this module (`generate`, `eval`, `scheduler`, `engine`) sees only these traits.
//!
//! Backends: [`cpu`] (its forward pass is `cpu/forward.rs`). A new one is a new module
//! here and one line in [`build`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod rope;

use crate::model::{ModelConfig, ModelWeights};
use crate::Result;

/// Where a model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// This machine's CPU cores ([`cpu::CpuBackend`]).
    #[default]
    Cpu,
    /// The NVIDIA GPU of this CUDA ordinal (`cuda::CudaBackend`; builds with the `cuda`
    /// feature).
    Cuda(usize),
    /// The first CUDA GPU where the build has the `cuda` feature, the machine a driver and a
    /// GPU, and the CUDA backend supports the options asked for; else the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    /// The names `--device` takes: `cpu`, `cuda` (GPU 0), `cuda:N`, `auto`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::Auto),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`: expected cpu, cuda, cuda:N (a GPU ordinal) or auto"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => write!(f, "auto"),
        }
    }
}

/// How a loaded model computes: device, threads, and the choices that change what it
/// computes or what memory it takes. The defaults compute the exact function on every core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelOptions {
    pub device: Device,
    /// Compute threads of a CPU backend, in total (None: one per core).
    pub threads: Option<usize>,
    /// The float lm_head as stored (exact) or a copy quantized at load (faster decode).
    pub lm_head: LmHeadQuant,
    /// KV cache elements: f32 (exact) or f16 (half the memory).
    pub kv_type: KvType,
    /// Q4_0/Q4_1/Q8_0 linears with exact f32 activations or llama.cpp's Q8 blocks.
    pub quant_acts: crate::kernels::qblock::QuantActs,
}

/// How the logits of a float lm_head (or tied embedding) are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LmHeadQuant {
    /// Exactly, in f32 against the weights as the file stores them (f16, bf16 or f32).
    #[default]
    None,
    /// Against an int8 copy made at load (per-row f32 scale) and activations quantized per
    /// token to 12 bits: half the memory traffic of f16 in decode, at a small cost in
    /// accuracy. The embedding lookup still reads the file's rows, so it stays exact.
    Int8,
    /// Against a Q6_K copy made at load (ggml's block format, 6.56 bits a weight: 41% of
    /// the bytes of f16) and activations quantized per token to 12 bits.
    Q6K,
    /// Against a 4-bit copy made at load (an f16 scale per 32 weights, 4.5 bits a weight:
    /// 28% of the bytes of f16) and activations quantized per token to 12 bits.
    Q4,
}

impl LmHeadQuant {
    /// The name the command line takes (`f16` for the exact head).
    pub fn name(self) -> &'static str {
        match self {
            LmHeadQuant::None => "f16",
            LmHeadQuant::Int8 => "int8",
            LmHeadQuant::Q6K => "q6k",
            LmHeadQuant::Q4 => "q4",
        }
    }
}

impl std::str::FromStr for LmHeadQuant {
    type Err = String;
    /// The names the command line takes: `f16` (exact), `int8`, `q6k`, `q4`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" | "exact" => Ok(LmHeadQuant::None),
            "int8" => Ok(LmHeadQuant::Int8),
            "q6k" | "q6_k" => Ok(LmHeadQuant::Q6K),
            "q4" => Ok(LmHeadQuant::Q4),
            _ => Err(format!(
                "unknown lm_head type `{s}`: expected f16, int8, q6k or q4"
            )),
        }
    }
}

/// One token of a forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    pub token: u32,
    /// Its position in its sequence (0-based); the KV cache holds positions `0..pos`.
    pub pos: usize,
    /// The KV cache slot of its sequence.
    pub slot: usize,
    /// Whether the caller wants this token's logits.
    pub logits: bool,
}

/// The tokens of one forward call.
pub type Batch = [BatchEntry];

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// Exact: keys and values as the forward pass computed them.
    #[default]
    F32,
    /// Rounded to f16 as they are stored (as llama.cpp's default cache): half the memory,
    /// and half the bytes decode reads per cached position.
    F16,
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            _ => Err(format!("unknown KV cache type `{s}`: expected f32 or f16")),
        }
    }
}

/// A model ready to compute on some device.
pub trait Backend: Send + Sync {
    /// The model's hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Plans every buffer for `slots` sequences of up to `context` tokens each, run
    /// `max_batch` tokens at a time.
    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>>;
    /// Runs `batch`, writing each entry's keys and values into its slot of `state` and the
    /// logits of the entries that ask for them into `state`. `state` must come from this
    /// backend's `new_state`.
    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()>;
    /// The kernel or device that computes, for display (`avx512vnni`, `neon`, ...).
    fn kernel_name(&self) -> &str;
    /// Bytes of KV cache one position of one sequence takes (for memory budgets).
    fn kv_bytes_per_position(&self) -> usize;
    /// The weights as loaded (sizes and parameter counts for display).
    fn weights(&self) -> &ModelWeights;
    /// The memory of the device that computes, where it is not the host's (a GPU): `None`
    /// for the CPU. The KV caches and scratch of this backend's states live there too.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
}

/// Memory of a GPU a backend computes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub device: String,
    /// Bytes of device memory the weights take, in the layouts the kernels read.
    pub weights_bytes: usize,
    /// Free and total bytes of device memory now, where the device tells.
    pub free_bytes: Option<usize>,
    pub total_bytes: Option<usize>,
}

/// The buffers of one backend: KV caches for its slots, activations, logits.
pub trait BackendState: Send {
    /// Logits of the `i`-th entry that asked for them in the last forward call.
    fn logits(&self, i: usize) -> &[f32];
    fn n_slots(&self) -> usize;
    fn context(&self) -> usize;
    fn max_batch(&self) -> usize;
    fn kv_bytes(&self) -> usize;
    /// Bytes of activations, logits and other scratch.
    fn scratch_bytes(&self) -> usize;
    /// For the backend that made it, to reach its own state type.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// The backend for a loaded model, as `options` say: the one place where backends are
/// chosen.
pub fn build(
    config: ModelConfig,
    weights: ModelWeights,
    options: &ModelOptions,
) -> Result<Box<dyn Backend>> {
    let cpu = |config, weights| -> Result<Box<dyn Backend>> {
        Ok(Box::new(cpu::CpuBackend::with_options(
            config, weights, options,
        )?))
    };
    match options.device {
        Device::Cpu => cpu(config, weights),
        Device::Cuda(ordinal) => build_cuda(config, weights, options, ordinal),
        Device::Auto => {
            #[cfg(feature = "cuda")]
            if cuda::device_count() > 0 {
                return build_cuda(config, weights, options, 0);
            }
            cpu(config, weights)
        }
    }
}

#[cfg(feature = "cuda")]
fn build_cuda(
    config: ModelConfig,
    weights: ModelWeights,
    options: &ModelOptions,
    ordinal: usize,
) -> Result<Box<dyn Backend>> {
    let mut backend = cuda::CudaBackend::new(config, weights, ordinal)?;
    backend.set_kv_type(options.kv_type);
    backend.set_lm_head_quant(options.lm_head)?;
    backend.set_quant_acts(options.quant_acts)?;
    Ok(Box::new(backend))
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(
    _: ModelConfig,
    _: ModelWeights,
    _: &ModelOptions,
    ordinal: usize,
) -> Result<Box<dyn Backend>> {
    Err(crate::Error::Invalid(format!(
        "device cuda:{ordinal}: this build has no CUDA backend (build with the `cuda` feature)"
    )))
}

/// A boxed backend is a backend (so `&Box<dyn Backend>` passes where `&dyn Backend` goes).
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn new_state(
        &self,
        slots: usize,
        context: usize,
        max_batch: usize,
    ) -> Result<Box<dyn BackendState>> {
        (**self).new_state(slots, context, max_batch)
    }
    fn forward(&self, batch: &Batch, state: &mut dyn BackendState) -> Result<()> {
        (**self).forward(batch, state)
    }
    fn kernel_name(&self) -> &str {
        (**self).kernel_name()
    }
    fn kv_bytes_per_position(&self) -> usize {
        (**self).kv_bytes_per_position()
    }
    fn weights(&self) -> &ModelWeights {
        (**self).weights()
    }
    fn device_memory(&self) -> Option<DeviceMemory> {
        (**self).device_memory()
    }
}

/// A boxed state is a state; `as_any_mut` reaches the state inside, so its backend finds it.
impl<S: BackendState + ?Sized> BackendState for Box<S> {
    fn logits(&self, i: usize) -> &[f32] {
        (**self).logits(i)
    }
    fn n_slots(&self) -> usize {
        (**self).n_slots()
    }
    fn context(&self) -> usize {
        (**self).context()
    }
    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
    fn kv_bytes(&self) -> usize {
        (**self).kv_bytes()
    }
    fn scratch_bytes(&self) -> usize {
        (**self).scratch_bytes()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        (**self).as_any_mut()
    }
}
