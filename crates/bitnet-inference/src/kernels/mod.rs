//! Quantized kernels: the packed ternary weight layout, per-token int8 activations, and the
//! integer dot products over them. One file per instruction set behind [`TernaryKernel`];
//! the implementation is picked once at start-up by [`select_kernel`].
//!
//! The arithmetic (BITNET.md): activations of a row are quantized with
//! `s = 127 / max(|x|)`, `q = clamp(round_half_even(x·s), -128, 127)`; a ternary linear then
//! gives `y[r] = (Σ_k t[r][k]·q[k]) / s · multiplier[r]`. The integer sum is exact, so every
//! kernel must return the same integers as [`scalar::ScalarKernel`].

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod amx;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod avxvnni;
mod dense;
pub mod exp;
pub mod group;
pub mod int8;
mod matmul;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod pool;
pub mod q4;
pub mod q6k;
pub mod qblock;
pub mod quant;
pub mod scalar;
mod ternary;
#[cfg(test)]
mod tests;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod tiles;

pub use dense::{DenseData, DenseMatrix};
pub use matmul::{dense_matmul, dense_matmul_with, ternary_matmul, ternary_matmul_rayon};
pub use ternary::{
    GroupScales, GroupScalesRow, QuantizedActivations, TernaryMatrix, BLOCK_WEIGHTS, GROUP_SIZES,
    TILE_ROWS,
};

use std::ops::Range;

/// Integer dot products of packed ternary rows with int8 activation rows.
pub trait TernaryKernel: Send + Sync {
    /// Short name shown by `bitnet inspect`/`bench` and accepted by `BITNET_KERNEL`.
    fn name(&self) -> &'static str;

    /// For every activation row `t` of `acts` and weight row `r` in `rows`, writes
    /// `Σ_k trit[r][k] · q[t][k]` to `out[t * rows.len() + (r - rows.start)]`.
    fn ternary_dot(
        &self,
        weights: &TernaryMatrix,
        rows: Range<usize>,
        acts: &QuantizedActivations,
        out: &mut [i32],
    );

    /// Called once after activations are quantized and before the products over them: a
    /// kernel that wants them in another layout too makes it here, once for all the linears
    /// and threads that share them. Kernels must still be correct without it.
    fn prepare(&self, _acts: &mut QuantizedActivations) {}

    /// Weight rows the kernel works on at once for `n_tok` activation rows: parallel products
    /// split rows in multiples of it, so no task ends in a partly empty step.
    fn row_step(&self, _n_tok: usize) -> usize {
        4
    }
}

/// Vector levels of the float kernels on x86 (activation quantization, attention).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum X86Level {
    Scalar,
    Avx2,
    Avx512,
}

/// The kernels a CPU backend computes with, chosen once when it is built: the ternary
/// kernel, and the level of the float kernels (activation quantization, attention, dense
/// dots) and of the lm_head and block kernels, which follow it.
///
/// `BITNET_KERNEL` names the ternary kernel (for tests and comparisons); forcing one without
/// AVX-512 (`avx2`, `avxvnni`) puts the float kernels at AVX2 and `scalar` puts everything on
/// the portable path, so that a forced run measures what such a CPU would run.
#[derive(Clone, Copy)]
pub struct KernelChoice {
    pub ternary: &'static dyn TernaryKernel,
    #[cfg(target_arch = "x86_64")]
    pub(crate) float: X86Level,
    /// Everything on the portable path (`BITNET_KERNEL=scalar`).
    pub(crate) portable: bool,
}

impl std::fmt::Debug for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelChoice")
            .field("ternary", &self.ternary.name())
            .finish()
    }
}

impl KernelChoice {
    /// The best kernels of this CPU, or those `BITNET_KERNEL` names (an error when it names
    /// one this CPU or build lacks).
    pub fn detect() -> crate::Result<Self> {
        Ok(Self::around(select_kernel()?))
    }

    /// The choice around a given ternary kernel.
    pub fn around(ternary: &'static dyn TernaryKernel) -> Self {
        let portable = ternary.name() == "scalar";
        #[cfg(target_arch = "x86_64")]
        let float = {
            let avx512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            match ternary.name() {
                "scalar" => X86Level::Scalar,
                "avx2" | "avxvnni" if avx2 => X86Level::Avx2,
                _ if avx512 => X86Level::Avx512,
                _ if avx2 => X86Level::Avx2,
                _ => X86Level::Scalar,
            }
        };
        KernelChoice {
            ternary,
            #[cfg(target_arch = "x86_64")]
            float,
            portable,
        }
    }

    /// What kernels use outside a backend's pool (kernel tests, load-time work):
    /// [`KernelChoice::detect`] once, or the machine's best where `BITNET_KERNEL` is invalid.
    pub fn machine() -> Self {
        static MACHINE: std::sync::OnceLock<KernelChoice> = std::sync::OnceLock::new();
        *MACHINE.get_or_init(|| Self::detect().unwrap_or_else(|_| Self::around(best_kernel())))
    }

    /// The choice of the backend whose pool this thread computes for ([`pool::kernels`]).
    pub(crate) fn current() -> Self {
        pool::kernels()
    }
}

/// The float kernels' level for the backend this thread computes for.
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_level() -> X86Level {
    KernelChoice::current().float
}

/// The last (best) of `available`, or `scalar` where the current choice is the portable
/// path: how the lm_head and block kernels pick their instruction set.
pub(crate) fn best_path<P: Copy>(available: &[P], scalar: P) -> P {
    if KernelChoice::current().portable {
        return scalar;
    }
    available.last().copied().unwrap_or(scalar)
}

/// The kernel for this machine, or the one named by `BITNET_KERNEL` (for tests and
/// comparisons). Unknown or unsupported names are an error rather than a silent fallback.
pub fn select_kernel() -> crate::Result<&'static dyn TernaryKernel> {
    match std::env::var("BITNET_KERNEL") {
        Ok(name) if !name.is_empty() => kernel_by_name(&name),
        _ => Ok(best_kernel()),
    }
}

/// Every kernel this build has that this CPU can run, best first.
pub fn available_kernels() -> Vec<&'static dyn TernaryKernel> {
    static KERNELS: std::sync::OnceLock<Vec<&'static dyn TernaryKernel>> =
        std::sync::OnceLock::new();
    KERNELS.get_or_init(detect_kernels).clone()
}

#[allow(unused_mut)]
fn detect_kernels() -> Vec<&'static dyn TernaryKernel> {
    let mut found: Vec<&'static dyn TernaryKernel> = Vec::new();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if let Some(k) = amx::AmxKernel::detect() {
        found.push(Box::leak(Box::new(k)));
    }
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(k) = avx512::Avx512VnniKernel::detect() {
            found.push(Box::leak(Box::new(k)));
        }
        if let Some(k) = avxvnni::AvxVnniKernel::detect() {
            found.push(Box::leak(Box::new(k)));
        }
        if let Some(k) = avx2::Avx2Kernel::detect() {
            found.push(Box::leak(Box::new(k)));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if let Some(k) = neon::NeonDotKernel::detect() {
            found.push(Box::leak(Box::new(k)));
        }
        if let Some(k) = neon::NeonKernel::detect() {
            found.push(Box::leak(Box::new(k)));
        }
    }
    found.push(&scalar::ScalarKernel);
    found
}

fn best_kernel() -> &'static dyn TernaryKernel {
    available_kernels()[0]
}

pub fn kernel_by_name(name: &str) -> crate::Result<&'static dyn TernaryKernel> {
    available_kernels()
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<_> = available_kernels().iter().map(|k| k.name()).collect();
            crate::Error::Invalid(format!(
                "BITNET_KERNEL={name}: not available on this CPU/build; available: {}",
                names.join(", ")
            ))
        })
}
