//! Optimizers with PyTorch's update rules (SGD with momentum, Adam, AdamW) and
//! `clip_grad_norm`. Their state saves to and loads from named tensors, so a training run can
//! resume exactly.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn, Zip};

use crate::io::TensorData;
use crate::{Error, Gradients, Param, Result};

/// An optimizer over a fixed list of named parameters.
pub trait Optimizer {
    /// Applies one update from `grads` (parameters without a gradient are left alone).
    fn step(&mut self, grads: &Gradients) -> Result<()>;
    /// The learning rate.
    fn lr(&self) -> f32;
    /// Changes the learning rate (schedules).
    fn set_lr(&mut self, lr: f32);
    /// The state as named tensors (moments per parameter name, the step counter).
    fn state_dict(&self) -> BTreeMap<String, TensorData>;
    /// Restores the state saved by [`Optimizer::state_dict`].
    fn load_state_dict(&mut self, state: &BTreeMap<String, TensorData>) -> Result<()>;
}

fn check_grad(name: &str, p: &Param, g: &ArrayD<f32>) -> Result<()> {
    // A bf16 parameter is for inference: an update smaller than its spacing (2^-8 of the
    // value) would round away, so training one is refused rather than silently stalled.
    if p.dtype() != crate::DType::F32 {
        return Err(Error::invalid(
            "optimizer step",
            format!("parameter `{name}`"),
            p.dtype(),
            "is stored for inference only; convert the model back to float32 with to_dtype (Rust: DType::F32, Python: \"float32\") before training",
        ));
    }
    if g.shape() != p.shape().as_slice() {
        return Err(Error::shape(
            "optimizer step",
            format!(
                "`{name}`: gradient {:?}, parameter {:?}",
                g.shape(),
                p.shape()
            ),
        ));
    }
    Ok(())
}

fn load_moment(
    state: &BTreeMap<String, TensorData>,
    key: &str,
    p: &Param,
) -> Result<Option<ArrayD<f32>>> {
    match state.get(key) {
        None => Ok(None),
        Some(TensorData::F32(a)) if a.shape() == p.shape().as_slice() => Ok(Some(a.clone())),
        Some(other) => Err(Error::StateDict(format!(
            "optimizer state `{key}` has shape {:?}, parameter {:?}",
            other.shape(),
            p.shape()
        ))),
    }
}

fn load_step(state: &BTreeMap<String, TensorData>) -> Result<u64> {
    match state.get("step") {
        Some(TensorData::I64(a)) if a.len() == 1 => {
            Ok(a.iter().next().copied().unwrap_or(0).max(0) as u64)
        }
        Some(_) => Err(Error::StateDict(
            "optimizer `step` must be one int64".into(),
        )),
        None => Err(Error::StateDict("optimizer state has no `step`".into())),
    }
}

fn step_tensor(step: u64) -> TensorData {
    TensorData::I64(ArrayD::from_elem(IxDyn(&[]), step as i64))
}

/// Stochastic gradient descent with PyTorch's momentum (`buf = momentum * buf + (1 -
/// dampening) * g`, the first step `buf = g`), optional Nesterov and L2 weight decay.
pub struct Sgd {
    params: Vec<(String, Param)>,
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor (0 disables it).
    pub momentum: f32,
    /// Dampening of the momentum.
    pub dampening: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
    buffers: Vec<Option<ArrayD<f32>>>,
    /// Momentum buffers of parameters on a device.
    #[cfg(feature = "cuda")]
    device_buffers: Vec<Option<performer_cuda::DeviceBuffer>>,
    step: u64,
}

impl Sgd {
    /// Plain SGD with the given learning rate; set the public fields for the rest.
    pub fn new(params: Vec<(String, Param)>, lr: f32) -> Self {
        let n = params.len();
        Sgd {
            params,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            buffers: vec![None; n],
            #[cfg(feature = "cuda")]
            device_buffers: (0..n).map(|_| None).collect(),
            step: 0,
        }
    }
}

#[cfg(feature = "cuda")]
impl Sgd {
    /// The update of the parameters that live on a device (their gradients are device
    /// tensors, which `get_param` does not return, so the host loop passes them by).
    fn step_on_devices(&mut self, grads: &Gradients) -> Result<()> {
        let on_device: Vec<usize> = (0..self.params.len())
            .filter(|&i| !self.params[i].1.device().is_cpu())
            .collect();
        let mut found = Vec::new();
        for &i in &on_device {
            let (name, p) = &self.params[i];
            if let Some(g) = grads.tensor(p.id()) {
                crate::cuda::optim::check(name, p, &g)?;
                found.push((i, g));
            }
        }
        let cfg = performer_cuda::tensor_ops::SgdConfig {
            lr: self.lr,
            momentum: self.momentum,
            dampening: self.dampening,
            weight_decay: self.weight_decay,
            nesterov: self.nesterov,
        };
        for (i, g) in found {
            if self.device_buffers[i].is_none()
                && let Some(b) = self.buffers[i].take()
            {
                let up = crate::device_memory::upload("Sgd::step", &b, g.device())?;
                self.device_buffers[i] = std::sync::Arc::into_inner(up.buf);
            }
            crate::cuda::optim::sgd(&self.params[i].1, &g, &mut self.device_buffers[i], cfg)?;
        }
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &Gradients) -> Result<()> {
        // Check every gradient first, so a bad one leaves all parameters untouched.
        for (name, p) in &self.params {
            if let Some(g) = grads.get_param(p) {
                check_grad(name, p, g)?;
            }
        }
        #[cfg(feature = "cuda")]
        self.step_on_devices(grads)?;
        for ((_, p), buf) in self.params.iter().zip(self.buffers.iter_mut()) {
            let Some(g) = grads.get_param(p) else {
                continue;
            };
            let mut d = g.clone();
            if self.weight_decay != 0.0 {
                let v = p.value();
                Zip::from(&mut d)
                    .and(&v)
                    .for_each(|d, &w| *d += self.weight_decay * w);
            }
            if self.momentum != 0.0 {
                let b = match buf {
                    Some(b) => {
                        Zip::from(&mut *b)
                            .and(&d)
                            .for_each(|b, &d| *b = self.momentum * *b + (1.0 - self.dampening) * d);
                        b
                    }
                    None => buf.insert(d.clone()),
                };
                if self.nesterov {
                    Zip::from(&mut d)
                        .and(&*b)
                        .for_each(|d, &b| *d += self.momentum * b);
                } else {
                    d.assign(b);
                }
            }
            let lr = self.lr;
            p.update(|w| Zip::from(w).and(&d).for_each(|w, &d| *w -= lr * d));
        }
        self.step += 1;
        Ok(())
    }

    fn lr(&self) -> f32 {
        self.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn state_dict(&self) -> BTreeMap<String, TensorData> {
        let mut out = BTreeMap::new();
        out.insert("step".to_string(), step_tensor(self.step));
        for ((name, _), b) in self.params.iter().zip(&self.buffers) {
            if let Some(b) = b {
                out.insert(
                    format!("{name}.momentum_buffer"),
                    TensorData::F32(b.clone()),
                );
            }
        }
        #[cfg(feature = "cuda")]
        for ((name, p), b) in self.params.iter().zip(&self.device_buffers) {
            if let Some(b) = b
                && self.momentum != 0.0
            {
                let host = crate::cuda::optim::to_host(b, &p.shape())
                    .unwrap_or_else(|e| panic!("Sgd::state_dict: {e}"));
                out.insert(format!("{name}.momentum_buffer"), TensorData::F32(host));
            }
        }
        out
    }

    fn load_state_dict(&mut self, state: &BTreeMap<String, TensorData>) -> Result<()> {
        let step = load_step(state)?;
        let mut buffers = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            buffers.push(load_moment(state, &format!("{name}.momentum_buffer"), p)?);
        }
        self.step = step;
        self.buffers = buffers;
        #[cfg(feature = "cuda")]
        self.device_buffers.iter_mut().for_each(|b| *b = None);
        Ok(())
    }
}

/// Adam (`decoupled = false`, weight decay added to the gradient) and AdamW (`decoupled =
/// true`, weights shrunk by `lr * weight_decay` before the update), with PyTorch's bias
/// corrections.
pub struct Adam {
    params: Vec<(String, Param)>,
    /// Learning rate.
    pub lr: f32,
    /// Decay rates of the first and second moments.
    pub betas: (f32, f32),
    /// Added to the denominator.
    pub eps: f32,
    /// Weight decay (L2 for Adam, decoupled for AdamW).
    pub weight_decay: f32,
    decoupled: bool,
    /// Per parameter: whether weight decay applies (all, unless
    /// [`Adam::exclude_from_weight_decay`] took some out).
    decays: Vec<bool>,
    moments: Vec<Option<(ArrayD<f32>, ArrayD<f32>)>>,
    /// Moments of parameters on a device.
    #[cfg(feature = "cuda")]
    device_moments: Vec<crate::cuda::optim::DeviceMoments>,
    step: u64,
}

/// AdamW is [`Adam`] with decoupled weight decay.
pub type AdamW = Adam;

impl Adam {
    /// Adam with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8; no weight decay).
    pub fn new(params: Vec<(String, Param)>, lr: f32) -> Self {
        let n = params.len();
        Adam {
            params,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            decays: vec![true; n],
            moments: vec![None; n],
            #[cfg(feature = "cuda")]
            device_moments: (0..n).map(|_| None).collect(),
            step: 0,
        }
    }

    /// AdamW with PyTorch's defaults (weight decay 0.01).
    pub fn adamw(params: Vec<(String, Param)>, lr: f32) -> Self {
        Adam {
            weight_decay: 0.01,
            decoupled: true,
            ..Adam::new(params, lr)
        }
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Takes the parameters that `skip` accepts (by name and parameter) out of weight decay, as
    /// a PyTorch parameter group with `weight_decay=0` would: the usual choice decays matrices
    /// only (`|_, p| p.shape().len() < 2`: biases, norm gains, ReZero scales).
    pub fn exclude_from_weight_decay(&mut self, skip: impl Fn(&str, &Param) -> bool) {
        for ((name, p), decays) in self.params.iter().zip(self.decays.iter_mut()) {
            *decays = !skip(name, p);
        }
    }
}

#[cfg(feature = "cuda")]
impl Adam {
    /// The update of the parameters that live on a device (after `self.step` was counted).
    fn step_on_devices(&mut self, grads: &Gradients) -> Result<()> {
        let mut found = Vec::new();
        for (i, (name, p)) in self.params.iter().enumerate() {
            if p.device().is_cpu() {
                continue;
            }
            if let Some(g) = grads.tensor(p.id()) {
                crate::cuda::optim::check(name, p, &g)?;
                found.push((i, g));
            }
        }
        for (i, g) in found {
            let cfg = performer_cuda::tensor_ops::AdamConfig {
                lr: self.lr,
                beta1: self.betas.0,
                beta2: self.betas.1,
                eps: self.eps,
                weight_decay: if self.decays[i] {
                    self.weight_decay
                } else {
                    0.0
                },
                decoupled: self.decoupled,
            };
            let host = if self.device_moments[i].is_none() {
                self.moments[i].take()
            } else {
                None
            };
            crate::cuda::optim::adam(
                &self.params[i].1,
                &g,
                &mut self.device_moments[i],
                host,
                self.step,
                cfg,
            )?;
        }
        Ok(())
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &Gradients) -> Result<()> {
        for (name, p) in &self.params {
            if let Some(g) = grads.get_param(p) {
                check_grad(name, p, g)?;
            }
        }
        self.step += 1;
        // PyTorch keeps hyper-parameters as Python floats (f64) and computes `1 - beta`,
        // the bias corrections and the step size in f64 before they meet the f32 tensors.
        // `1 - 0.999f32` is 1.3e-5 away from `1 - 0.999`, so do the same.
        let t = self.step as i32;
        let (b1, b2) = (as_decimal_f64(self.betas.0), as_decimal_f64(self.betas.1));
        let lr = as_decimal_f64(self.lr);
        let wd = as_decimal_f64(self.weight_decay);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
        let neg_step_size = (-lr / (1.0 - b1.powi(t))) as f32;
        let decay = (1.0 - lr * wd) as f32;
        let (w1, b2f, w2) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32);
        let (wdf, eps, decoupled) = (wd as f32, self.eps, self.decoupled);
        #[cfg(feature = "cuda")]
        self.step_on_devices(grads)?;
        for (((_, p), slot), &decays) in self
            .params
            .iter()
            .zip(self.moments.iter_mut())
            .zip(&self.decays)
        {
            let Some(g) = grads.get_param(p) else {
                continue;
            };
            let wdf = if decays { wdf } else { 0.0 };
            // A Linear's weight gradient arrives transposed (the backward of the weight's
            // transpose view): one row-by-row copy into standard layout lets it take the fused
            // pass below, where the general loop would walk four operands of mixed layouts.
            let standard;
            let g = if g.is_standard_layout() {
                g
            } else {
                standard = crate::ops::to_standard(&g.view());
                &standard
            };
            let (m, v) = slot
                .get_or_insert_with(|| (ArrayD::zeros(g.raw_dim()), ArrayD::zeros(g.raw_dim())));
            let coeffs = AdamCoefficients {
                w1,
                b2: b2f,
                w2,
                bias2_sqrt,
                neg_step_size,
                eps,
                l2: if decoupled { 0.0 } else { wdf },
            };
            p.update(|w| {
                if decoupled && wdf != 0.0 {
                    w.mapv_inplace(|x| x * decay);
                }
                // One fused, vectorized pass over contiguous values (parallel when large);
                // the same arithmetic per element as the general loop below, so the same bits.
                if let (Some(ws), Some(ms), Some(vs), Some(gs)) = (
                    w.as_slice_mut(),
                    m.as_slice_mut(),
                    v.as_slice_mut(),
                    g.as_slice(),
                ) {
                    adam_slices(ws, ms, vs, gs, coeffs);
                    return;
                }
                adam_strided(w, m, v, &g.view(), coeffs);
            });
        }
        Ok(())
    }

    fn lr(&self) -> f32 {
        self.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn state_dict(&self) -> BTreeMap<String, TensorData> {
        let mut out = BTreeMap::new();
        out.insert("step".to_string(), step_tensor(self.step));
        for ((name, _), mv) in self.params.iter().zip(&self.moments) {
            if let Some((m, v)) = mv {
                out.insert(format!("{name}.exp_avg"), TensorData::F32(m.clone()));
                out.insert(format!("{name}.exp_avg_sq"), TensorData::F32(v.clone()));
            }
        }
        #[cfg(feature = "cuda")]
        for ((name, p), mv) in self.params.iter().zip(&self.device_moments) {
            if let Some((m, v)) = mv {
                let host = |b| {
                    crate::cuda::optim::to_host(b, &p.shape())
                        .unwrap_or_else(|e| panic!("Adam::state_dict: {e}"))
                };
                out.insert(format!("{name}.exp_avg"), TensorData::F32(host(m)));
                out.insert(format!("{name}.exp_avg_sq"), TensorData::F32(host(v)));
            }
        }
        out
    }

    fn load_state_dict(&mut self, state: &BTreeMap<String, TensorData>) -> Result<()> {
        let step = load_step(state)?;
        let mut moments = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let m = load_moment(state, &format!("{name}.exp_avg"), p)?;
            let v = load_moment(state, &format!("{name}.exp_avg_sq"), p)?;
            moments.push(match (m, v) {
                (Some(m), Some(v)) => Some((m, v)),
                (None, None) => None,
                _ => {
                    return Err(Error::StateDict(format!(
                        "optimizer state for `{name}` has only one of its moments"
                    )));
                }
            });
        }
        self.step = step;
        self.moments = moments;
        #[cfg(feature = "cuda")]
        self.device_moments.iter_mut().for_each(|m| *m = None);
        Ok(())
    }
}

/// The f64 nearest to the shortest decimal that round-trips to `x`: `0.999f32` becomes
/// `0.999f64`, the value a PyTorch user typed, not `0.99900001287...`.
fn as_decimal_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// `a + w (b - a)` as ATen's CPU `lerp` computes it (from the far end when `w >= 0.5`).
/// The f32 constants of one Adam step (see [`Adam::step`]); `l2` is the coupled weight decay
/// (0 for AdamW, whose decay is applied to the weights before).
#[derive(Clone, Copy)]
struct AdamCoefficients {
    w1: f32,
    b2: f32,
    w2: f32,
    bias2_sqrt: f32,
    neg_step_size: f32,
    eps: f32,
    l2: f32,
}

/// Values per task of the parallel update.
const ADAM_CHUNK: usize = 1 << 14;

/// Adam's update of arrays of any layouts (the same shape): the general loop, which the fused
/// [`adam_slices`] matches element for element.
fn adam_strided(
    w: &mut ArrayD<f32>,
    m: &mut ArrayD<f32>,
    v: &mut ArrayD<f32>,
    g: &ndarray::ArrayViewD<f32>,
    c: AdamCoefficients,
) {
    Zip::from(w).and(m).and(v).and(g).for_each(|w, m, v, &g| {
        let g = if c.l2 != 0.0 { g + c.l2 * *w } else { g };
        *m = lerp(*m, g, c.w1);
        *v = *v * c.b2 + c.w2 * g * g;
        let denom = v.sqrt() / c.bias2_sqrt + c.eps;
        *w += c.neg_step_size * (*m / denom);
    });
}

/// [`adam_update`] over whole parameters, split over rayon's threads when large.
fn adam_slices(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamCoefficients) {
    use rayon::prelude::*;
    if w.len() < crate::parallel::PAR_THRESHOLD {
        adam_update(w, m, v, g, c);
        return;
    }
    w.par_chunks_mut(ADAM_CHUNK)
        .zip(m.par_chunks_mut(ADAM_CHUNK))
        .zip(v.par_chunks_mut(ADAM_CHUNK))
        .zip(g.par_chunks(ADAM_CHUNK))
        .for_each(|(((w, m), v), g)| adam_update(w, m, v, g, c));
}

crate::fast_math::multiversion! {
    /// Adam's update of one contiguous stretch of values, compiled for the machine's vector
    /// units: the expressions of the general loop in [`Adam::step`], element for element.
    fn adam_update(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamCoefficients) {
        for (((w, m), v), &g) in w.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = if c.l2 != 0.0 { g + c.l2 * *w } else { g };
            *m = lerp(*m, g, c.w1);
            *v = *v * c.b2 + c.w2 * g * g;
            let denom = v.sqrt() / c.bias2_sqrt + c.eps;
            *w += c.neg_step_size * (*m / denom);
        }
    }
}

#[inline(always)]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// Scales the gradients of `params` so that their joint L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, applied only when below
/// 1). Returns the norm before clipping, which may be infinite or NaN.
pub fn clip_grad_norm(grads: &mut Gradients, params: &[Param], max_norm: f32) -> f32 {
    #[allow(unused_mut)]
    let mut total: f64 = params
        .iter()
        .filter_map(|p| grads.get_param(p))
        .map(|g| match g.as_slice_memory_order() {
            Some(values) => crate::fast_math::sum_of_squares(values),
            None => g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>(),
        })
        .sum();
    // Gradients on a device: their squares summed there, the sum read back (the step's one
    // device read), the scaling done there.
    #[cfg(feature = "cuda")]
    let on_device: Vec<crate::Tensor> = params
        .iter()
        .filter(|p| !p.device().is_cpu())
        .filter_map(|p| grads.tensor(p.id()))
        .collect();
    #[cfg(feature = "cuda")]
    for g in &on_device {
        total += crate::cuda::optim::sum_squares(g).unwrap_or(f64::NAN);
    }
    let norm = total.sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for p in params {
            if let Some(g) = grads.get_mut(p.id()) {
                g.mapv_inplace(|x| x * coef);
            }
        }
        #[cfg(feature = "cuda")]
        for p in params.iter().filter(|p| !p.device().is_cpu()) {
            if let Some(g) = grads.tensor(p.id()) {
                grads.insert_tensor(p.id(), crate::no_grad(|| g.mul_scalar(coef)));
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The fused pass and the general loop give the same bits on the same values, whatever
    /// the gradient's layout, with and without coupled weight decay, serial and parallel.
    #[test]
    fn fused_pass_matches_the_general_loop_bit_for_bit() {
        for (len, l2) in [(60000, 0.0), (60000, 0.05), (1000, 0.05)] {
            let c = AdamCoefficients {
                w1: 0.1,
                b2: 0.999,
                w2: 1.0 - 0.999,
                bias2_sqrt: 0.05,
                neg_step_size: -1e-2,
                eps: 1e-8,
                l2,
            };
            let (rows, cols) = (len / 200, 200);
            let w0 = crate::rng::randn(&[rows, cols]);
            let m0 = crate::rng::randn(&[rows, cols]).mapv(|x| 0.1 * x);
            let v0 = crate::rng::randn(&[rows, cols]).mapv(|x| x * x);
            let g = crate::rng::randn(&[rows, cols]);
            let g2: Array2<f32> = g.clone().into_dimensionality().unwrap();
            let transposed = g2.t().as_standard_layout().into_owned().reversed_axes();
            let (mut w1, mut m1, mut v1) = (w0.clone(), m0.clone(), v0.clone());
            adam_slices(
                w1.as_slice_mut().unwrap(),
                m1.as_slice_mut().unwrap(),
                v1.as_slice_mut().unwrap(),
                g.as_slice().unwrap(),
                c,
            );
            let (mut w2, mut m2, mut v2) = (w0.clone(), m0, v0);
            adam_strided(&mut w2, &mut m2, &mut v2, &transposed.view().into_dyn(), c);
            for (what, a, b) in [("w", &w1, &w2), ("m", &m1, &m2), ("v", &v1, &v2)] {
                assert_eq!(a.shape(), b.shape());
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{len} values, l2 {l2}: {what} differs"
                );
            }
            assert!(w1.iter().zip(&w0).any(|(x, y)| x != y), "nothing moved");
        }
    }

    /// A gradient stored transposed (a Linear weight's) updates the weights to the bits of the
    /// same gradient stored contiguously, for Adam with coupled weight decay and for AdamW.
    #[test]
    fn transposed_gradient_updates_like_a_contiguous_one() {
        let (rows, cols) = (300, 200); // 60000 values: the parallel path
        for decoupled in [false, true] {
            let init = crate::rng::randn(&[rows, cols]);
            let [fused, general] = [(); 2].map(|_| Param::new(init.clone()));
            let mut opts = [&fused, &general].map(|p| {
                let mut opt = if decoupled {
                    Adam::adamw(vec![("w".into(), p.clone())], 1e-2)
                } else {
                    Adam::new(vec![("w".into(), p.clone())], 1e-2)
                };
                opt.weight_decay = 0.05;
                opt
            });
            for _ in 0..3 {
                let g = crate::rng::randn(&[rows, cols]);
                let g2: Array2<f32> = g.clone().into_dimensionality().unwrap();
                // the same values, in column-major memory order
                let transposed = g2.t().as_standard_layout().into_owned().reversed_axes();
                assert!(!transposed.is_standard_layout());
                assert_eq!(transposed, g2);
                let mut contiguous = Gradients::new();
                contiguous.accumulate(fused.id(), g).unwrap();
                let mut strided = Gradients::new();
                strided
                    .accumulate(general.id(), transposed.into_dyn())
                    .unwrap();
                opts[0].step(&contiguous).unwrap();
                opts[1].step(&strided).unwrap();
            }
            let (a, b) = (fused.value(), general.value());
            assert_eq!(a.shape(), b.shape());
            assert!(
                a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "decoupled {decoupled}: the transposed gradient updated other bits"
            );
            assert!(
                a.iter().zip(init.iter()).any(|(x, y)| x != y),
                "nothing moved"
            );
        }
    }
}
