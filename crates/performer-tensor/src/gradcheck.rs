//! Central finite differences against the analytic backward, for testing ops and layers.
//!
//! The function's output is reduced to a scalar with a fixed random probe
//! (`sum(out * probe)`), so every output element contributes with its own weight; the scalar
//! is accumulated in f64 to keep the rounding of the differences small.

use ndarray::{ArrayD, IxDyn};

use crate::{Error, Result, Tensor};

/// Settings of [`gradcheck`].
#[derive(Clone, Copy, Debug)]
pub struct GradcheckOptions {
    /// Step of the central difference.
    pub eps: f32,
    /// Allowed `max |analytic - numeric|` relative to `max(1, max |numeric|)` per input.
    pub tolerance: f32,
    /// Seed of the probe.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions {
            eps: 1e-2,
            tolerance: 2e-3,
            seed: 7,
        }
    }
}

fn probe_dot(out: &Tensor, probe: &ArrayD<f32>) -> f64 {
    out.view()
        .iter()
        .zip(probe.iter())
        .map(|(&o, &p)| o as f64 * p as f64)
        .sum()
}

/// Checks the gradients of `f` with respect to every input. Inputs keep their layout
/// (pass permuted or sliced arrays to check non-contiguous operands). Returns the worst
/// relative error, or an error naming the input and element that disagree.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[ArrayD<f32>],
    opts: GradcheckOptions,
) -> Result<f32> {
    let vars: Vec<Tensor> = inputs.iter().map(|a| Tensor::var(a.clone())).collect();
    let out = f(&vars)?;
    let mut g = crate::rng::Generator::seeded(opts.seed);
    let probe = ArrayD::from_shape_simple_fn(IxDyn(out.shape()), || g.normal());
    let loss = out.mul(&Tensor::new(probe.clone()))?.sum_all();
    let grads = loss.backward()?;
    let mut worst = 0.0f32;
    for (i, x) in inputs.iter().enumerate() {
        let analytic = grads
            .get(&vars[i])
            .cloned()
            .unwrap_or_else(|| ArrayD::zeros(x.raw_dim()));
        let mut numeric = ArrayD::<f32>::zeros(x.raw_dim());
        for (pos, _) in x.indexed_iter() {
            let eval = |delta: f32| -> Result<f64> {
                let mut xs: Vec<Tensor> = inputs.iter().map(|a| Tensor::new(a.clone())).collect();
                let mut xp = x.clone();
                xp[&pos] += delta;
                xs[i] = Tensor::new(xp);
                Ok(probe_dot(&crate::no_grad(|| f(&xs))?, &probe))
            };
            numeric[&pos] = ((eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps as f64)) as f32;
        }
        let scale = numeric.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for ((pos, &n), &a) in numeric.indexed_iter().zip(analytic.iter()) {
            let err = (a - n).abs() / scale;
            if !err.is_finite() || err > opts.tolerance {
                return Err(Error::Other(format!(
                    "gradcheck: input {i} element {:?}: analytic {a}, numeric {n} (relative error {err}, tolerance {})",
                    pos, opts.tolerance
                )));
            }
            worst = worst.max(err);
        }
    }
    Ok(worst)
}
