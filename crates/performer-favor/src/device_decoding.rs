//! Incremental FAVOR+ on a device (feature `cuda`): the running sums of
//! [`CausalState`](crate::CausalState) and [`ContextState`](crate::ContextState) kept as device
//! tensors, updated and read with the device's tensor ops, so a device model decodes without
//! copying its attention state to the host. The arithmetic is the host state's (see
//! `decoding.rs`): with `u_j = dn P k_j` and `a_j = u_j - dn^2 |k_j|^2 / 2`, the state keeps
//! `A = sum_j exp(a_j - R) v_j^T`, `Z = sum_j exp(a_j - R)` under the running max `R` of the
//! key projections (rescaled when it grows), `B = sum_j v_j` and the count, and combines them
//! at read time as `r A + r eps 1 B^T`. The generalized kernel (`f(dn P k) + eps`) and
//! `no_projection` (keys `exp(k)`, queries softmaxed over the head's features; a context's
//! keys softmaxed over its positions) keep the plain sums `A = sum_j k'_j v_j^T` and
//! `Z = sum_j k'_j`, read as `q'^T A / (q'^T Z + eps' sum q')`, as the host state does.

use performer_tensor::{Device, Error, Result, Tensor, no_grad};

use crate::fast_attention::FastAttention;
use crate::feature::SOFTMAX_FEATURE_EPS;
use crate::ops::CAUSAL_EPS;

/// Running sums of a causal FastAttention on a device, per head (`bh` heads).
pub struct DeviceCausalState {
    /// `sum exp(a_j - R) v_j^T` (softmax) or `sum k'_j v_j^T` (the others): (bh, m, e).
    kv: Tensor,
    /// `sum exp(a_j - R)` or `sum k'_j`: (bh, 1, m).
    z: Tensor,
    /// `sum v_j` (softmax only): (bh, 1, e).
    v_sum: Tensor,
    /// The running max `R` of the key projections (softmax only): (bh, 1, 1).
    reference: Tensor,
    count: usize,
}

impl DeviceCausalState {
    /// Positions seen.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no position has been seen.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Where the sums live.
    pub fn device(&self) -> Device {
        self.kv.device()
    }
}

/// The sums of a fixed context on a device: `k'^T v` (bh, m, e) and `k'^T 1` (bh, 1, m).
pub struct DeviceContextState {
    kv: Tensor,
    z: Tensor,
}

/// How the features of a FastAttention are computed on the device.
enum DeviceKind {
    Softmax,
    Generalized(performer_tensor::ops::Activation),
    NoProjection,
}

impl FastAttention {
    fn device_kind(&self) -> DeviceKind {
        let c = self.config();
        if c.no_projection {
            DeviceKind::NoProjection
        } else if c.generalized_attention {
            DeviceKind::Generalized(c.kernel_fn)
        } else {
            DeviceKind::Softmax
        }
    }

    /// Features per head of the state: the head size for `no_projection`, `m` otherwise.
    fn device_features(&self) -> usize {
        match self.device_kind() {
            DeviceKind::NoProjection => self.config().dim_heads,
            _ => self.nb_features(),
        }
    }

    /// The generalized kernel's features of `x` (bh, n, d): (bh, n, m).
    fn device_generalized(
        &self,
        x: &Tensor,
        f: performer_tensor::ops::Activation,
    ) -> Result<Tensor> {
        let p = self.projection_matrix()?.to_device(x.device())?;
        crate::device::generalized_features(x, &p, f)
    }

    /// `dn P x` for `x` (bh, n, d): (bh, n, m), and `dn^2 |x|^2 / 2`: (bh, n, 1).
    fn device_projection(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.config().dim_heads;
        let dn = (d as f32).powf(-0.25);
        let p = self.projection_matrix()?.to_device(x.device())?;
        let u = x.matmul(&p.transpose(0, 1)?)?.mul_scalar(dn);
        let diag = x.square().sum(&[-1], true)?.mul_scalar(0.5 * dn * dn);
        Ok((u, diag))
    }

    /// An empty state of `heads` heads with values of width `value_dim`, on `device`.
    pub fn device_causal_state(
        &self,
        heads: usize,
        value_dim: usize,
        device: Device,
    ) -> Result<DeviceCausalState> {
        let m = self.device_features();
        Ok(DeviceCausalState {
            kv: Tensor::full_on(&[heads, m, value_dim], 0.0, device)?,
            z: Tensor::full_on(&[heads, 1, m], 0.0, device)?,
            v_sum: Tensor::full_on(&[heads, 1, value_dim], 0.0, device)?,
            reference: Tensor::full_on(&[heads, 1, 1], f32::NEG_INFINITY, device)?,
            count: 0,
        })
    }

    /// Appends keys `k` (bh, n, d) and values `v` (bh, n, e), in order, to `state`.
    pub fn extend_device_state(
        &self,
        state: &mut DeviceCausalState,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        const OP: &str = "FastAttention::extend_device_state";
        let (ks, vs, kv) = (k.shape(), v.shape(), state.kv.shape());
        if ks.len() != 3 || vs.len() != 3 || ks[0] != kv[0] || vs[0] != kv[0] || ks[1] != vs[1] {
            return Err(Error::shape(
                OP,
                format!("k {ks:?} and v {vs:?} for a state of sums {kv:?}"),
            ));
        }
        no_grad(|| -> Result<()> {
            let kf = match self.device_kind() {
                DeviceKind::Softmax => {
                    let (u, diag) = self.device_projection(k)?;
                    let new_max = u.amax(&[-2, -1], true)?.maximum(&state.reference)?;
                    let scale = state.reference.sub(&new_max)?.exp();
                    let w = u.sub(&diag)?.sub(&new_max)?.exp();
                    state.kv = state.kv.mul(&scale)?.add(&w.transpose(1, 2)?.matmul(v)?)?;
                    state.z = state.z.mul(&scale)?.add(&w.sum(&[1], true)?)?;
                    state.v_sum = state.v_sum.add(&v.sum(&[1], true)?)?;
                    state.reference = new_max;
                    return Ok(());
                }
                DeviceKind::Generalized(f) => self.device_generalized(k, f)?,
                DeviceKind::NoProjection => k.exp(),
            };
            state.kv = state.kv.add(&kf.transpose(1, 2)?.matmul(v)?)?;
            state.z = state.z.add(&kf.sum(&[1], true)?)?;
            Ok(())
        })?;
        state.count += k.shape()[1];
        Ok(())
    }

    /// The features of queries `q` (bh, n, d), each row with its own stabilizer: (bh, n, m).
    fn device_query_features(&self, q: &Tensor) -> Result<Tensor> {
        let ratio = (self.nb_features() as f32).powf(-0.5);
        let (u, diag) = self.device_projection(q)?;
        let s = u.amax(&[-1], true)?;
        Ok(u.sub(&diag)?
            .sub(&s)?
            .exp()
            .add_scalar(SOFTMAX_FEATURE_EPS)
            .mul_scalar(ratio))
    }

    /// The features of queries `q` (bh, n, d) under any kind: (bh, n, m).
    fn device_query_features_any(&self, q: &Tensor) -> Result<Tensor> {
        match self.device_kind() {
            DeviceKind::Softmax => self.device_query_features(q),
            DeviceKind::Generalized(f) => self.device_generalized(q, f),
            DeviceKind::NoProjection => q.softmax(-1),
        }
    }

    /// Attention of queries `q` (bh, 1, d) over every key in `state`: (bh, 1, e).
    pub fn query_device_state(&self, state: &DeviceCausalState, q: &Tensor) -> Result<Tensor> {
        if state.count == 0 {
            return Err(Error::invalid(
                "FastAttention::query_device_state",
                "state",
                "empty",
                "extend it with the current position's key first",
            ));
        }
        let ratio = (self.nb_features() as f32).powf(-0.5);
        let eps = SOFTMAX_FEATURE_EPS;
        no_grad(|| {
            let qf = self.device_query_features_any(q)?;
            let qsum = qf.sum(&[-1], true)?;
            let qz = qf.mul(&state.z)?.sum(&[-1], true)?;
            if !matches!(self.device_kind(), DeviceKind::Softmax) {
                // The plain sums: q'^T A / (q'^T Z + eps' sum q').
                let den = qz.add(&qsum.mul_scalar(CAUSAL_EPS))?;
                return qf.matmul(&state.kv)?.div(&den);
            }
            let num = qf
                .matmul(&state.kv)?
                .mul_scalar(ratio)
                .add(&state.v_sum.mul(&qsum.mul_scalar(ratio * eps))?)?;
            let den = qz
                .mul_scalar(ratio)
                .add(&qsum.mul_scalar(ratio * eps * state.count as f32 + CAUSAL_EPS))?;
            num.div(&den)
        })
    }

    /// The sums of a fixed context `k` (bh, nc, d), `v` (bh, nc, e) on their device.
    pub fn device_context_state(&self, k: &Tensor, v: &Tensor) -> Result<DeviceContextState> {
        let ratio = (self.nb_features() as f32).powf(-0.5);
        no_grad(|| {
            let kf = match self.device_kind() {
                DeviceKind::Softmax => {
                    let (u, diag) = self.device_projection(k)?;
                    let s = u.amax(&[-2, -1], true)?;
                    u.sub(&diag)?
                        .sub(&s)?
                        .exp()
                        .add_scalar(SOFTMAX_FEATURE_EPS)
                        .mul_scalar(ratio)
                }
                DeviceKind::Generalized(f) => self.device_generalized(k, f)?,
                // Softmax over the context's positions, per feature.
                DeviceKind::NoProjection => k.softmax(1)?,
            };
            Ok(DeviceContextState {
                kv: kf.transpose(1, 2)?.matmul(v)?,
                z: kf.sum(&[1], true)?,
            })
        })
    }

    /// Attention of queries `q` (bh, n, d) over a fixed context: (bh, n, e).
    pub fn query_device_context(&self, state: &DeviceContextState, q: &Tensor) -> Result<Tensor> {
        no_grad(|| {
            let qf = self.device_query_features_any(q)?;
            let num = qf.matmul(&state.kv)?;
            let den = qf.matmul(&state.z.transpose(1, 2)?)?;
            num.div(&den)
        })
    }
}
