//! Choosing the next token from the logits.
//!
//! The order, modelled on llama.cpp's default sampler chain:
//!
//! 1. **logit bias**: `logit += bias` for each `(token, bias)` (`f32::NEG_INFINITY` bans a token);
//! 2. **penalties** over the last `repeat_last_n` tokens of the sequence (prompt included):
//!    repetition (`logit / r` if positive, `logit * r` if negative), frequency
//!    (`logit -= count * f`) and presence (`logit -= p` once seen);
//! 3. **greedy** when `temperature <= 0`: the largest logit (the lowest id on ties), done;
//! 4. **top-k**: the `k` largest logits;
//! 5. **typical-p**: the tokens whose surprisal is closest to the entropy, up to a mass of `p`;
//! 6. **top-p**: the most likely tokens up to a mass of `p`;
//! 7. **min-p**: tokens with probability at least `min_p` times the largest one;
//! 8. **temperature**: the survivors' logits divided by `T`, then softmax;
//! 9. a draw with the seeded generator.
//!
//! Steps 5-7 measure probabilities as the softmax of the logits at temperature 1 over the
//! tokens still in the running (as llama.cpp does: temperature comes last). Each filter keeps at
//! least one token. Sampling reuses its buffers: nothing is allocated per token.

pub use crate::rng::Rng;

/// How the next token is chosen from the logits; see the [module docs](self) for the order.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub typical_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    /// Window of the penalties, in tokens (0 disables all penalties).
    pub repeat_last_n: usize,
    /// 0 disables; subtracted once from every token seen in the window.
    pub presence_penalty: f32,
    /// 0 disables; subtracted once per occurrence in the window.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before anything else.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0x5EED,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Default::default()
        }
    }
    /// Plain sampling from the softmax at temperature `t`, every filter off.
    pub fn pure(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
            seed,
            ..Default::default()
        }
    }
}

/// One token still in the running: its id, its logit and (after a filter that needs them)
/// its probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
    pub p: f32,
}

/// Chooses tokens; owns its buffers so sampling allocates nothing per token.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<Candidate>,
    window: Vec<u32>,
    order: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self {
            params,
            rng,
            candidates: Vec::new(),
            window: Vec::new(),
            order: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// Picks the next token. `logits` are modified (bias and penalties); `history` is the
    /// sequence so far, prompt included.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_bias_and_penalties(logits, history);
        if self.is_greedy() {
            return argmax(logits);
        }
        self.filter(logits);
        let c = &self.candidates;
        let mut r = self.rng.next_f64();
        for cand in c.iter() {
            let p = cand.p as f64;
            if r < p {
                return cand.id;
            }
            r -= p;
        }
        c[c.len() - 1].id
    }

    /// The distribution the next draw comes from: the surviving candidates with their final
    /// probabilities (summing to 1), most likely first. Greedy gives one candidate with p = 1.
    pub fn distribution(&mut self, logits: &mut [f32], history: &[u32]) -> &[Candidate] {
        self.apply_bias_and_penalties(logits, history);
        if self.is_greedy() {
            let id = argmax(logits);
            self.candidates.clear();
            self.candidates.push(Candidate {
                id,
                logit: logits[id as usize],
                p: 1.0,
            });
        } else {
            self.filter(logits);
        }
        &self.candidates
    }

    /// Steps 1 and 2.
    pub fn apply_bias_and_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let active =
            p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if !active || p.repeat_last_n == 0 {
            return;
        }
        let start = history.len().saturating_sub(p.repeat_last_n);
        self.window.clear();
        self.window.extend_from_slice(&history[start..]);
        self.window.sort_unstable();
        let mut i = 0;
        while i < self.window.len() {
            let id = self.window[i];
            let mut j = i;
            while j < self.window.len() && self.window[j] == id {
                j += 1;
            }
            let count = (j - i) as f32;
            if let Some(l) = logits.get_mut(id as usize) {
                if p.repetition_penalty != 1.0 {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
                *l -= count * p.frequency_penalty + p.presence_penalty;
            }
            i = j;
        }
    }

    /// Steps 4 to 8 on `logits`, leaving the survivors with their final probabilities in
    /// `self.candidates`, most likely first.
    fn filter(&mut self, logits: &[f32]) {
        let p = self.params.clone_filters();
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| Candidate {
            id: i as u32,
            logit: l,
            p: 0.0,
        }));
        let by_logit =
            |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id));
        // Banned tokens (a logit of -inf) never come back.
        if c.iter().any(|x| x.logit > f32::NEG_INFINITY) {
            c.retain(|x| x.logit > f32::NEG_INFINITY);
        }
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        // Typical-p.
        if p.typical_p < 1.0 && c.len() > 1 {
            softmax(c, 1.0);
            let entropy: f32 = c
                .iter()
                .filter(|x| x.p > 0.0)
                .map(|x| -x.p * x.p.ln())
                .sum();
            self.order.clear();
            self.order.extend(
                c.iter()
                    .enumerate()
                    .map(|(i, x)| ((-x.p.ln() - entropy).abs(), i as u32)),
            );
            self.order
                .sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut acc = 0.0f32;
            let mut keep = self.order.len();
            for (n, &(_, i)) in self.order.iter().enumerate() {
                acc += c[i as usize].p;
                if acc >= p.typical_p {
                    keep = n + 1;
                    break;
                }
            }
            // Mark the survivors, then keep them in logit order.
            for &(_, i) in &self.order[keep..] {
                c[i as usize].p = -1.0;
            }
            c.retain(|x| x.p >= 0.0);
        }
        // Top-p.
        if p.top_p < 1.0 && c.len() > 1 {
            softmax(c, 1.0);
            let mut acc = 0.0f32;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.p;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        // Min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p).
        if p.min_p > 0.0 && c.len() > 1 {
            let threshold = c[0].logit + p.min_p.ln();
            let keep = c.iter().take_while(|x| x.logit >= threshold).count();
            c.truncate(keep.max(1));
        }
        softmax(c, p.temperature);
    }
}

/// The filter settings only (a cheap copy for the borrow checker).
struct Filters {
    top_k: usize,
    top_p: f32,
    min_p: f32,
    typical_p: f32,
    temperature: f32,
}

impl SamplingParams {
    fn clone_filters(&self) -> Filters {
        Filters {
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            temperature: self.temperature,
        }
    }
}

/// Sets `p` of sorted candidates to the softmax of `logit / t`.
fn softmax(c: &mut [Candidate], t: f32) {
    let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in c.iter_mut() {
        x.p = if x.logit == f32::NEG_INFINITY {
            0.0
        } else {
            ((x.logit - max) / t).exp()
        };
        sum += x.p;
    }
    if sum > 0.0 {
        for x in c.iter_mut() {
            x.p /= sum;
        }
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` of `logits` into `out` (for beam search).
pub fn log_softmax(logits: &[f32], out: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    out.clear();
    out.extend(logits.iter().map(|&l| l - lse));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(params: SamplingParams, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let mut s = Sampler::new(params);
        s.distribution(&mut logits.to_vec(), history)
            .iter()
            .map(|c| (c.id, c.p))
            .collect()
    }

    fn assert_dist(got: &[(u32, f32)], want: &[(u32, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for ((gi, gp), (wi, wp)) in got.iter().zip(want) {
            assert_eq!(gi, wi, "{got:?} vs {want:?}");
            assert!((*gp as f64 - wp).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    /// Probabilities 0.4, 0.3, 0.2, 0.1 as logits.
    fn four() -> Vec<f32> {
        [0.1f32, 0.4, 0.2, 0.3].iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn plain_softmax_at_temperature() {
        // T = 1: the probabilities themselves.
        assert_dist(
            &dist(SamplingParams::pure(1.0, 0), &four(), &[]),
            &[(1, 0.4), (3, 0.3), (2, 0.2), (0, 0.1)],
        );
        // T = 0.5: p^2 normalised: .16 .09 .04 .01 over .30.
        assert_dist(
            &dist(SamplingParams::pure(0.5, 0), &four(), &[]),
            &[
                (1, 0.16 / 0.3),
                (3, 0.09 / 0.3),
                (2, 0.04 / 0.3),
                (0, 0.01 / 0.3),
            ],
        );
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let p = SamplingParams {
            top_k: 2,
            ..SamplingParams::pure(1.0, 0)
        };
        assert_dist(&dist(p, &four(), &[]), &[(1, 0.4 / 0.7), (3, 0.3 / 0.7)]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // 0.4 + 0.3 = 0.7 < 0.75, + 0.2 = 0.9 >= 0.75: three tokens.
        let p = SamplingParams {
            top_p: 0.75,
            ..SamplingParams::pure(1.0, 0)
        };
        assert_dist(
            &dist(p, &four(), &[]),
            &[(1, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)],
        );
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // 0.45 * 0.4 = 0.18: keeps 0.4, 0.3 and 0.2 (not 0.1).
        let p = SamplingParams {
            min_p: 0.45,
            ..SamplingParams::pure(1.0, 0)
        };
        assert_dist(
            &dist(p, &four(), &[]),
            &[(1, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)],
        );
    }

    #[test]
    fn typical_p_keeps_tokens_closest_to_the_entropy() {
        // H = -Σ p ln p over .4 .3 .2 .1 = 1.27985; surprisals: .916 1.204 1.609 2.303;
        // distances: .364 .076 .330 1.023 -> order 0.3, 0.2, 0.4, 0.1.
        // typical_p = 0.45: 0.3 (0.3) + 0.2 (0.5 >= 0.45): keeps ids 3 and 2.
        let p = SamplingParams {
            typical_p: 0.45,
            ..SamplingParams::pure(1.0, 0)
        };
        assert_dist(&dist(p, &four(), &[]), &[(3, 0.6), (2, 0.4)]);
        // typical_p = 0.6: adds 0.4.
        let p = SamplingParams {
            typical_p: 0.6,
            ..SamplingParams::pure(1.0, 0)
        };
        assert_dist(
            &dist(p, &four(), &[]),
            &[(1, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)],
        );
    }

    #[test]
    fn filters_then_temperature() {
        // top-k 3 on .4 .3 .2, then T = 2: sqrt(p) normalised.
        let p = SamplingParams {
            top_k: 3,
            ..SamplingParams::pure(2.0, 0)
        };
        let s: f64 = 0.4f64.sqrt() + 0.3f64.sqrt() + 0.2f64.sqrt();
        assert_dist(
            &dist(p, &four(), &[]),
            &[
                (1, 0.4f64.sqrt() / s),
                (3, 0.3f64.sqrt() / s),
                (2, 0.2f64.sqrt() / s),
            ],
        );
    }

    #[test]
    fn logit_bias_and_ban() {
        let p = SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY), (0, 4f32.ln())],
            ..SamplingParams::pure(1.0, 0)
        };
        // Token 1 banned; .1 * 4 = .4, then .3, .2, over .9.
        assert_dist(
            &dist(p, &four(), &[]),
            &[(0, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)],
        );
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        let mut logits = [4.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_window() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repeat_last_n: 4,
            ..SamplingParams::greedy()
        });
        // Window = last 4 tokens [1, 1, 1, 2]; token 0 is outside the window.
        let mut logits = [1.0, 1.0, 1.0, 1.0];
        s.apply_bias_and_penalties(&mut logits, &[0, 1, 1, 1, 2]);
        assert_eq!(logits, [1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0]);
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams::pure(1.0, 0x5EED);
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert_ne!(draw(&params), draw(&SamplingParams::pure(1.0, 1)));
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        let p = SamplingParams {
            top_k: 3,
            ..SamplingParams::pure(1.0, 9)
        };
        let mut s = Sampler::new(p);
        let n = 30000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut four(), &[]) as usize] += 1;
        }
        assert_eq!(counts[0], 0, "token 0 is outside the top 3");
        for (id, want) in [(1, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)] {
            let got = counts[id] as f64 / n as f64;
            assert!((got - want).abs() < 0.012, "token {id}: {got} vs {want}");
        }
    }

    #[test]
    fn log_softmax_sums_to_one() {
        let mut out = Vec::new();
        log_softmax(&four(), &mut out);
        for (o, p) in out.iter().zip([0.1f32, 0.4, 0.2, 0.3]) {
            assert!((o - p.ln()).abs() < 1e-6);
        }
    }
}
