//! RoPE frequencies and their scaling, as transformers' `modeling_rope_utils.py` computes
//! them (`rope_type` `default`, `linear`, `dynamic`, `yarn`, `longrope`, `llama3`), and
//! llama.cpp's `rope_freqs` per-dimension factors.
//!
//! Every type gives, for a head size `d`, `d/2` inverse frequencies `inv[i]` and an attention
//! factor `a`; position `p` is rotated by `cos(p·inv[i])·a`, `sin(p·inv[i])·a` (transformers
//! multiplies both tables by `attention_scaling`). The float steps follow transformers' f32
//! tensor arithmetic, in its order.
//!
//! Two types depend on the sequence length `n` (transformers' `dynamic_rope_update`, where
//! `n` = the largest position of the forward call + 1):
//! - `dynamic`: for `n` above the original context `L` (= `max_position_embeddings`), the base
//!   becomes `θ·(factor·n/L − (factor − 1))^(d/(d−2))`; otherwise the plain frequencies.
//! - `longrope`: `long_factor` for `n > L`, else `short_factor`.
//!
//! transformers keeps one frequency set per model instance, updated at each forward call; keys
//! already in the KV cache keep the rotation they were computed with. This engine does the same
//! per sequence: each forward call computes, for every sequence (slot) in the batch, `n` = its
//! highest position in the call + 1. That equals transformers for a sequence run in increasing
//! positions (a prompt, then decode steps), which is what generation does; a prompt split into
//! chunks is rotated as transformers rotates the same chunks fed one call each.

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f32 },
    /// `dynamic` NTK scaling from `original_context` (see the module docs).
    Dynamic {
        factor: f32,
        original_context: usize,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// YaRN: interpolation ramped between extrapolation by dimension, and an attention factor.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// transformers' `truncate` (default true): the correction range rounded outwards.
        truncate: bool,
    },
    /// LongRoPE (Phi-3): per-dimension divisors, short below `original_context`, long above.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_context: usize,
        attention_factor: f32,
    },
    /// llama.cpp's `rope_freqs` tensor: `inv[i] = plain inv[i] / factors[i]` (how its
    /// converter stores Llama 3's scaling).
    FreqFactors(Vec<f32>),
}

impl RopeScaling {
    /// transformers' `rope_type` name (llama.cpp's `rope_freqs` shows as `freq_factors`).
    pub fn name(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::FreqFactors(_) => "freq_factors",
        }
    }

    /// One line for display: the type and its values (factor lists by their length).
    pub fn describe(&self) -> String {
        match self {
            RopeScaling::LongRope {
                short_factor,
                original_context,
                attention_factor,
                ..
            } => format!(
                "longrope ({} short/long factors, original context {original_context}, attention factor {attention_factor})",
                short_factor.len()
            ),
            RopeScaling::FreqFactors(f) => {
                format!("llama.cpp rope_freqs ({} per-dimension divisors)", f.len())
            }
            other => format!("{other:?}"),
        }
    }

    /// Whether the frequencies depend on the sequence length of a forward call.
    pub fn depends_on_length(&self) -> bool {
        matches!(
            self,
            RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
        )
    }

    /// The longest context this scaling is meant for, given the file's
    /// `max_position_embeddings`: `original × factor` where that is longer for `dynamic`,
    /// `llama3` and `yarn` (transformers sets no limit; this is the length the scaling was
    /// designed to reach). `linear` and `longrope` configs state their extended length as
    /// `max_position_embeddings` itself.
    pub fn extended_context(&self, max_position: usize) -> usize {
        let times = |original: usize, factor: f32| {
            let n = (original as f64 * factor as f64).floor();
            if n.is_finite() && n > 0.0 {
                (n.min(super::config::MAX_CONTEXT as f64) as usize).max(max_position)
            } else {
                max_position
            }
        };
        match *self {
            RopeScaling::None
            | RopeScaling::FreqFactors(_)
            | RopeScaling::Linear { .. }
            | RopeScaling::LongRope { .. } => max_position,
            RopeScaling::Dynamic {
                factor,
                original_context,
            }
            | RopeScaling::Llama3 {
                factor,
                original_context,
                ..
            }
            | RopeScaling::Yarn {
                factor,
                original_context,
                ..
            } => times(original_context, factor),
        }
    }

    /// Checks every value (finite, in range, lengths equal to `head_dim / 2`); errors name
    /// the field by transformers' key through `bad(key, message)`.
    pub fn validate(
        &self,
        head_dim: usize,
        bad: &dyn Fn(&str, String) -> crate::Error,
    ) -> crate::Result<()> {
        let positive = |key: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("{v} is not a finite number > 0")))
            }
        };
        let at_least_one = |key: &str, v: f32| {
            if v.is_finite() && v >= 1.0 {
                Ok(())
            } else {
                Err(bad(key, format!("{v} is not a finite number ≥ 1")))
            }
        };
        let context = |v: usize| {
            if v == 0 || v > super::config::MAX_CONTEXT {
                Err(bad(
                    "original_max_position_embeddings",
                    format!("{v} is not between 1 and {}", super::config::MAX_CONTEXT),
                ))
            } else {
                Ok(())
            }
        };
        let factors = |key: &str, f: &[f32]| {
            if f.len() != head_dim / 2 {
                return Err(bad(
                    key,
                    format!(
                        "{} values, expected head_dim / 2 = {}",
                        f.len(),
                        head_dim / 2
                    ),
                ));
            }
            match f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                Some(v) => Err(bad(key, format!("{v} is not a finite number > 0"))),
                None => Ok(()),
            }
        };
        match self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => positive("factor", *factor),
            RopeScaling::Dynamic {
                factor,
                original_context,
            } => {
                at_least_one("factor", *factor)?;
                if head_dim <= 2 {
                    return Err(bad(
                        "rope_type",
                        format!("dynamic scaling needs head_dim > 2, found {head_dim}"),
                    ));
                }
                context(*original_context)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(bad(
                        "high_freq_factor",
                        format!("{high_freq_factor} must be greater than low_freq_factor {low_freq_factor}"),
                    ));
                }
                context(*original_context)
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                positive("factor", *factor)?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)?;
                positive("attention_factor", *attention_factor)?;
                context(*original_context)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_context,
                attention_factor,
            } => {
                factors("short_factor", short_factor)?;
                factors("long_factor", long_factor)?;
                positive("attention_factor", *attention_factor)?;
                context(*original_context)
            }
            RopeScaling::FreqFactors(f) => factors("rope_freqs", f),
        }
    }
}

/// YaRN's default attention factor for `factor` (transformers' `yarn_get_mscale`).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

/// Writes the `head_dim / 2` inverse frequencies for a forward call whose sequence reaches
/// length `seq_len` into `inv`, and returns the attention factor both tables are multiplied
/// by. `inv.len()` is `head_dim / 2`.
pub fn inv_freq(
    theta: f32,
    head_dim: usize,
    scaling: &RopeScaling,
    seq_len: usize,
    inv: &mut [f32],
) -> f32 {
    let d = head_dim as f32;
    // transformers: `1 / base ** (arange(0, d, 2).float() / d)`, in f32.
    let plain = |base: f32, i: usize| 1.0 / base.powf((2 * i) as f32 / d);
    for (i, v) in inv.iter_mut().enumerate() {
        *v = plain(theta, i);
    }
    match scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => {
            inv.iter_mut().for_each(|v| *v /= factor);
            1.0
        }
        RopeScaling::Dynamic {
            factor,
            original_context,
        } => {
            if seq_len > *original_context {
                let n = seq_len as f32;
                let grown = factor * n / *original_context as f32 - (factor - 1.0);
                let base = theta * grown.powf(d / (d - 2.0));
                for (i, v) in inv.iter_mut().enumerate() {
                    *v = plain(base, i);
                }
            }
            1.0
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let old = *original_context as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for v in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *v;
                if wavelen > low_wavelen {
                    *v /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *v = (1.0 - smooth) * *v / factor + smooth * *v;
                }
            }
            1.0
        }
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        } => {
            // The correction range in f64, as transformers' Python math computes it.
            let (dim, base) = (head_dim as f64, theta as f64);
            let correction = |rotations: f64| {
                dim * (*original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let (mut low, mut high) =
                (correction(*beta_fast as f64), correction(*beta_slow as f64));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
            if low == high {
                high += 0.001;
            }
            for (i, v) in inv.iter_mut().enumerate() {
                let pos_freq = theta.powf((2 * i) as f32 / d);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (factor * pos_freq);
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                *v = interpolation * (1.0 - extrapolation_factor)
                    + extrapolation * extrapolation_factor;
            }
            *attention_factor
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_context,
            attention_factor,
        } => {
            let ext = if seq_len > *original_context {
                long_factor
            } else {
                short_factor
            };
            for (i, v) in inv.iter_mut().enumerate() {
                *v = 1.0 / (ext[i] * theta.powf((2 * i) as f32 / d));
            }
            *attention_factor
        }
        RopeScaling::FreqFactors(f) => {
            for (v, f) in inv.iter_mut().zip(f) {
                *v /= f;
            }
            1.0
        }
    }
}

/// `cos`/`sin` of one position for the frequencies `inv` and attention factor `a`.
pub fn angles(pos: usize, inv: &[f32], a: f32, cos: &mut [f32], sin: &mut [f32]) {
    for ((&f, c), s) in inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
        let angle = pos as f32 * f;
        *c = angle.cos() * a;
        *s = angle.sin() * a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalings_reduce_to_plain_rope_where_they_should() {
        let (theta, d) = (10000.0f32, 64);
        let mut plain = vec![0.0; d / 2];
        let mut got = vec![0.0; d / 2];
        inv_freq(theta, d, &RopeScaling::None, 1, &mut plain);
        // dynamic within the original context, linear by 1, freq factors of 1
        for s in [
            RopeScaling::Dynamic {
                factor: 4.0,
                original_context: 16,
            },
            RopeScaling::Linear { factor: 1.0 },
            RopeScaling::FreqFactors(vec![1.0; d / 2]),
        ] {
            assert_eq!(inv_freq(theta, d, &s, 16, &mut got), 1.0);
            assert_eq!(got, plain, "{s:?}");
        }
        // dynamic beyond it: every frequency lower (a larger base)
        let dynamic = RopeScaling::Dynamic {
            factor: 4.0,
            original_context: 16,
        };
        inv_freq(theta, d, &dynamic, 17, &mut got);
        assert_eq!(got[0], 1.0);
        assert!(got[1..].iter().zip(&plain[1..]).all(|(g, p)| g < p));
        // llama3: the highest frequencies unchanged, the lowest divided by the factor
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 64,
        };
        inv_freq(theta, d, &llama3, 1, &mut got);
        assert_eq!(got[0], plain[0]);
        assert_eq!(got[d / 2 - 1], plain[d / 2 - 1] / 8.0);
    }

    #[test]
    fn hostile_values_are_refused() {
        let bad = |k: &str, m: String| crate::Error::Invalid(format!("{k}: {m}"));
        for s in [
            RopeScaling::Linear { factor: f32::NAN },
            RopeScaling::Linear { factor: 0.0 },
            RopeScaling::Dynamic {
                factor: 0.5,
                original_context: 16,
            },
            RopeScaling::Yarn {
                factor: 4.0,
                original_context: 0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 1.0,
                truncate: true,
            },
            RopeScaling::FreqFactors(vec![1.0; 3]),
            RopeScaling::FreqFactors(vec![0.0; 32]),
        ] {
            assert!(s.validate(64, &bad).is_err(), "{s:?}");
        }
    }
}
