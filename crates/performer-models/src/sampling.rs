//! Sampling from logits: temperature, performer-pytorch's top-k and top-p filters, a repetition
//! penalty, and seeded draws that a small change of the logits rarely moves.

use ndarray::{Array1, ArrayView1, ArrayViewMut1};
use performer_tensor::rng::Generator;
use performer_tensor::{Error, Result};

/// Which logits survive before sampling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Filter {
    /// Keep the `int((1 - thres) * vocab)` largest logits (at least one); performer-pytorch's
    /// `top_k`.
    TopK {
        /// Fraction of the vocabulary dropped. f64, as the reference's Python float: the
        /// count `int((1 - thres) * vocab)` computed in f32 differs (thres 0.9 over 20000
        /// tokens keeps 2000 in f32, 1999 in Python).
        thres: f64,
    },
    /// Keep the smallest set of largest logits whose probability exceeds `1 - thres` (the
    /// first logit always stays); performer-pytorch's `top_p`.
    TopP {
        /// As in the reference: tokens are removed once the cumulative probability exceeds
        /// `1 - thres`. f64, as the reference's Python float.
        thres: f64,
    },
    /// Keep everything.
    None,
}

/// Settings of `generate`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Logits are divided by it before the softmax.
    pub temperature: f32,
    /// Top-k (default, thres 0.9) or top-p.
    pub filter: Filter,
    /// A token that ends a sequence; later positions of that sequence hold `pad_value`.
    pub eos_token: Option<i64>,
    /// Above 1, penalizes the tokens among the last `repetition_penalty_ctx` of each sequence.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repetition_penalty_ctx: usize,
    /// Seed of the sampler (see [`sample`]: the same seed gives the same draws).
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            temperature: 1.0,
            filter: Filter::TopK { thres: 0.9 },
            eos_token: None,
            repetition_penalty: 1.0,
            repetition_penalty_ctx: 32,
            seed: 0,
        }
    }
}

impl GenerateOptions {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(
                "generate",
                "temperature",
                self.temperature,
                "must be positive and finite",
            ));
        }
        match self.filter {
            Filter::TopK { thres } | Filter::TopP { thres } if !(0.0..=1.0).contains(&thres) => {
                Err(Error::invalid(
                    "generate",
                    "filter_thres",
                    thres,
                    "must lie in [0, 1]",
                ))
            }
            _ if self.repetition_penalty <= 0.0 || !self.repetition_penalty.is_finite() => {
                Err(Error::invalid(
                    "generate",
                    "repetition_penalty",
                    self.repetition_penalty,
                    "must be positive and finite",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// performer-pytorch's `top_k`: all but the `k = int((1 - thres) * vocab)` largest logits
/// become -inf (ties at the k-th value resolved by position). `k` is at least 1 (the reference
/// would produce no candidate at all below that).
pub fn top_k(logits: &ArrayView1<f32>, thres: f64) -> Array1<f32> {
    let v = logits.len();
    // In f64, as Python computes `int((1 - thres) * num_logits)`.
    let k = (((1.0 - thres) * v as f64) as usize).clamp(1, v.max(1));
    let mut order: Vec<usize> = (0..v).collect();
    let larger_first = |&a: &usize, &b: &usize| {
        logits[b]
            .partial_cmp(&logits[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    };
    if k < v && !logits.iter().any(|x| x.is_nan()) {
        // Without NaN the order is total (ties go to the lower index), so the k first after
        // a selection are the k first after a sort, in linear time (the sort was most of a
        // sampled token's cost).
        order.select_nth_unstable_by(k - 1, larger_first);
    } else {
        order.sort_by(larger_first);
    }
    let mut out = Array1::from_elem(v, f32::NEG_INFINITY);
    for &i in order.iter().take(k) {
        out[i] = logits[i];
    }
    out
}

/// performer-pytorch's `top_p`: sort descending, remove tokens once the cumulative softmax
/// probability exceeds `1 - thres` (shifted by one, so the token that crosses stays, and the
/// first always stays).
pub fn top_p(logits: &ArrayView1<f32>, thres: f64) -> Array1<f32> {
    let v = logits.len();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| {
        logits[b]
            .partial_cmp(&logits[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let probs = softmax(&Array1::from_iter(order.iter().map(|&i| logits[i])).view());
    let mut out = logits.to_owned();
    // torch compares the float32 cumulative sums with the Python float `1 - thres` rounded
    // to float32.
    let limit = (1.0 - thres) as f32;
    let mut cum = 0.0f32;
    let mut remove_next = false;
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && remove_next {
            out[i] = f32::NEG_INFINITY;
        }
        cum += probs[rank];
        remove_next = cum > limit;
    }
    out
}

/// Softmax of a vector (max-shifted; -inf entries get probability 0).
pub fn softmax(x: &ArrayView1<f32>) -> Array1<f32> {
    let m = x.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e = x.mapv(|v| (v - m).exp());
    let s = e.sum();
    e / s
}

/// Penalizes `recent` tokens: positive logits divided by `theta`, negative ones multiplied
/// (the CTRL rule). The reference divides every logit, which raises negative ones, and takes
/// its window along the batch axis instead of each sequence's recent tokens; this follows CTRL
/// and looks at each sequence's own tokens.
pub fn apply_repetition_penalty(logits: &mut ArrayViewMut1<f32>, recent: &[i64], theta: f32) {
    let mut seen = std::collections::BTreeSet::new();
    for &t in recent {
        if t >= 0 && (t as usize) < logits.len() && seen.insert(t) {
            let l = &mut logits[t as usize];
            *l = if *l > 0.0 { *l / theta } else { *l * theta };
        }
    }
}

/// Draws one token from logits after filtering and temperature, each with its softmax
/// probability `p_i`, by an exponential race: every candidate `i` gets its own `E_i ~ Exp(1)`
/// and the smallest `E_i / p_i` wins (the first of independent exponential clocks with rates
/// `p_i`). The `E_i` come from one `u64` of `rng` and the token's index alone, so the same seed
/// gives the same draws, and logits that change slightly (bf16 weights, another device, another
/// summation order) change the token only when the two smallest ratios lie within the change.
/// Inverting the cumulative sum with one uniform (performer-pytorch's `torch.multinomial`, and
/// this function before) moves the token whenever any boundary before it moves across the
/// draw: on a near-uniform top-k a bf16 model diverged from its f32 original after a few
/// tokens, and one swap at the top-k's edge shifted every later boundary at once.
pub fn sample(
    logits: &ArrayView1<f32>,
    opts: &GenerateOptions,
    rng: &mut Generator,
) -> Result<i64> {
    let filtered = match opts.filter {
        Filter::TopK { thres } => top_k(logits, thres),
        Filter::TopP { thres } => top_p(logits, thres),
        Filter::None => logits.to_owned(),
    };
    let probs = softmax(&(filtered / opts.temperature).view());
    if probs.iter().any(|p| !p.is_finite()) {
        return Err(Error::NonFinite(
            "generate: the logits are not finite; cannot sample".into(),
        ));
    }
    let key = rng.next_u64();
    let mut best = (f64::INFINITY, None);
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            let ratio = exponential(key, i as u64) / p as f64;
            if ratio < best.0 || best.1.is_none() {
                best = (ratio, Some(i));
            }
        }
    }
    // The largest logit's probability is 1 / (a finite sum >= 1), so a candidate exists.
    best.1.map(|i| i as i64).ok_or_else(|| {
        Error::NonFinite("generate: no token has a positive probability; cannot sample".into())
    })
}

/// An `Exp(1)` variable determined by a draw's `key` and a token's `index`: the splitmix64
/// finalizer of the pair gives 53 uniform bits `u` in (0, 1), and `-ln u` is exponential.
fn exponential(key: u64, index: u64) -> f64 {
    let mut z = key ^ index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    -u.ln()
}
