//! FAVOR+ on device tensors (feature `cuda`): when FastAttention's queries, keys and values
//! live on a device, performer-cuda's kernels run on their buffers directly, with no copy to
//! the host: the softmax feature maps (forward and backward) and causal linear attention
//! (forward and backward) are recorded as device ops; non-causal attention is three batched
//! GEMMs and a normalization on the features, in the device's tensor ops. Generalized attention
//! (features from tensor ops) and `no_projection` (softmaxes as features) reuse both.

use std::sync::Arc;

use performer_cuda::ops::{self, FeatureKind, LinearDims, Precision};
use performer_cuda::{DeviceBuffer, SharedLauncher};
use performer_tensor::device_ops::{self as dops, buffer, from_buffer, record};
use performer_tensor::ops::Activation;
use performer_tensor::{Device, Error, Result, Tensor};

use crate::feature::GENERALIZED_FEATURE_EPS;

const OP: &str = "FastAttention (device)";

/// `t` `(..., n, last)` as (product of the leading axes, n, last).
fn dims3(name: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    let s = t.shape();
    let r = s.len();
    if r < 2 {
        return Err(Error::shape(
            OP,
            format!("`{name}` {s:?} must be (..., n, d)"),
        ));
    }
    Ok((s[..r - 2].iter().product(), s[r - 2], s[r - 1]))
}

fn buf(t: &Tensor) -> Result<Arc<DeviceBuffer>> {
    buffer(t)?.ok_or_else(|| {
        Error::invalid(
            OP,
            "operand",
            "on the host",
            "the device path takes device tensors",
        )
    })
}

/// The softmax-kernel features of `x` `(..., n, d)` under `projection` `(m, d)`:
/// `(..., n, m)`, differentiable in `x` (the projection is a fixed buffer).
fn features(
    dev: &SharedLauncher,
    device: Device,
    x: &Tensor,
    projection: &Arc<DeviceBuffer>,
    m: usize,
    kind: FeatureKind,
) -> Result<Tensor> {
    let err = move |e| dops::error(OP, device, e);
    let (bh, n, d) = dims3("q/k", x)?;
    let xb = buf(x)?;
    let f = Arc::new(ops::softmax_features(dev, &xb, projection, bh, n, d, m, kind).map_err(err)?);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank >= 2") = m;
    let out = from_buffer(OP, f.duplicate().map_err(err)?, &shape, device)?;
    let (dev, projection) = (dev.clone(), projection.clone());
    let in_shape = x.shape().to_vec();
    Ok(record("favor_features", &[x], vec![out], move |grads, _| {
        let Some(g) = grads.into_iter().next().flatten() else {
            return Ok(vec![None]);
        };
        let gx =
            ops::softmax_features_backward(&dev, &xb, &projection, &f, &*buf(&g)?, bh, n, d, m)
                .map_err(err)?;
        Ok(vec![Some(from_buffer(OP, gx, &in_shape, device)?)])
    })
    .remove(0))
}

/// Causal linear attention of features `qf`, `kf` `(..., n, m)` and values `v` `(..., n, e)`.
fn causal(
    dev: &SharedLauncher,
    device: Device,
    qf: &Tensor,
    kf: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let err = move |e| dops::error(OP, device, e);
    let (bh, n, m) = dims3("q", qf)?;
    let e = v.shape()[v.rank() - 1];
    let dims = LinearDims { bh, n, m, e };
    let (qb, kb, vb) = (buf(qf)?, buf(kf)?, buf(v)?);
    let (out, den) =
        ops::causal_linear_attention_with(dev, &qb, &kb, &vb, dims, Precision::F32).map_err(err)?;
    let out = Arc::new(out);
    let mut shape = v.shape().to_vec();
    shape[v.rank() - 2] = n;
    let result = from_buffer(OP, out.duplicate().map_err(err)?, &shape, device)?;
    let dev = dev.clone();
    let (qs, vs) = (qf.shape().to_vec(), v.shape().to_vec());
    Ok(record(
        "causal_linear_attention",
        &[qf, kf, v],
        vec![result],
        move |grads, _| {
            let Some(g) = grads.into_iter().next().flatten() else {
                return Ok(vec![None, None, None]);
            };
            let (dq, dk, dv) = ops::causal_linear_attention_backward_with(
                &dev,
                &qb,
                &kb,
                &vb,
                &out,
                &den,
                &*buf(&g)?,
                dims,
                Precision::F32,
            )
            .map_err(err)?;
            Ok(vec![
                Some(from_buffer(OP, dq, &qs, device)?),
                Some(from_buffer(OP, dk, &qs, device)?),
                Some(from_buffer(OP, dv, &vs, device)?),
            ])
        },
    )
    .remove(0))
}

/// Non-causal linear attention on features: `(qf (kf^T v)) / (qf . sum_n kf)`, as the
/// reference's einsums, in the device's batched GEMMs (keys may be of another length).
fn non_causal(qf: &Tensor, kf: &Tensor, v: &Tensor) -> Result<Tensor> {
    let r = kf.rank() as isize;
    let k_sum = kf.sum(&[r - 2], true)?;
    let denom = qf.matmul(&k_sum.transpose(r - 2, r - 1)?)?;
    let context = kf.transpose(r - 2, r - 1)?.matmul(v)?;
    qf.matmul(&context)?.div(&denom)
}

/// Softmax-kernel FAVOR+ of `q` `(..., n, d)` over `k` `(..., nk, d)` and `v` `(..., nk, e)`
/// with `projection` `(m, d)`, all on one device (causal needs `nk == n`).
pub(crate) fn favor_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    projection: &Tensor,
    causal_mask: bool,
) -> Result<Tensor> {
    let Some(device) = dops::device_of(OP, &[q, k, v, projection])? else {
        return Err(Error::invalid(
            OP,
            "q",
            "on the host",
            "the device path takes device tensors",
        ));
    };
    let (_, n, _) = dims3("q", q)?;
    let (_, nk, _) = dims3("k", k)?;
    let (lead_q, lead_k, lead_v) = (
        &q.shape()[..q.rank() - 2],
        &k.shape()[..k.rank() - 2],
        &v.shape()[..v.rank().saturating_sub(2)],
    );
    if lead_q != lead_k || lead_k != lead_v || v.shape()[v.rank() - 2] != nk {
        return Err(Error::shape(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?}: one batch and head layout, keys and values of one length",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    if causal_mask && nk != n {
        return Err(Error::shape(
            OP,
            format!("causal attention needs as many keys as queries, got {nk} and {n}"),
        ));
    }
    let m = projection.shape()[0];
    let dev = dops::launcher(device)?;
    let proj = buf(projection)?;
    let qf = features(&dev, device, q, &proj, m, FeatureKind::Query)?;
    let kf = features(&dev, device, k, &proj, m, FeatureKind::Key)?;
    if causal_mask {
        causal(&dev, device, &qf, &kf, v)
    } else {
        non_causal(&qf, &kf, v)
    }
}

/// performer-pytorch's generalized-kernel features `f(d^-1/4 x P^T) + 1e-3` of device rows `x`
/// `(..., n, d)` with `projection` `(m, d)`, in device tensor ops (their backward is autograd's).
pub(crate) fn generalized_features(
    x: &Tensor,
    projection: &Tensor,
    f: Activation,
) -> Result<Tensor> {
    let d = x.shape()[x.rank() - 1];
    let u = x
        .mul_scalar((d as f32).powf(-0.25))
        .matmul(&projection.transpose(0, 1)?)?;
    Ok(f.apply(&u).add_scalar(GENERALIZED_FEATURE_EPS))
}

/// Linear attention of device features `qf` `(..., n, m)` over `kf` `(..., nk, m)` and `v`
/// `(..., nk, e)` (generalized attention and `no_projection`): the softmax path's causal
/// kernel or non-causal GEMMs, so these maps never leave the device either.
pub(crate) fn attention_on_features(
    qf: &Tensor,
    kf: &Tensor,
    v: &Tensor,
    causal_mask: bool,
) -> Result<Tensor> {
    let Some(device) = dops::device_of(OP, &[qf, kf, v])? else {
        return Err(Error::invalid(
            OP,
            "q",
            "on the host",
            "the device path takes device tensors",
        ));
    };
    if !causal_mask {
        return non_causal(qf, kf, v);
    }
    if kf.shape() != qf.shape() || v.shape()[..v.rank() - 1] != qf.shape()[..qf.rank() - 1] {
        return Err(Error::shape(
            OP,
            format!(
                "causal attention on features: q {:?}, k {:?}, v {:?} need one layout and length",
                qf.shape(),
                kf.shape(),
                v.shape()
            ),
        ));
    }
    causal(&dops::launcher(device)?, device, qf, kf, v)
}
