//! The optimizers' updates of parameters that live on a device: the update kernels of
//! `performer_cuda::tensor_ops` on the parameter's buffer, moments kept on the device.

use std::sync::Arc;

use performer_cuda::tensor_ops::{self as k, AdamConfig, SgdConfig};
use performer_cuda::{DeviceBuffer, tensor_ops::Reduce};

use super::{DeviceStorage, map_err, storage_of};
use crate::{Error, Param, Result, Tensor};

/// Optimizer state of one parameter on a device.
pub(crate) type DeviceMoments = Option<(DeviceBuffer, DeviceBuffer)>;

/// The parameter's device value, ready to be updated in place: its own buffer when nothing
/// else holds it, a copy otherwise (a graph that saved the old value keeps it, as on the CPU).
fn writable(op: &str, p: &Param) -> Result<DeviceStorage> {
    let s = p.device_storage().expect("a parameter on a device");
    // One reference in the parameter's slot, one here.
    if Arc::strong_count(&s.buf) <= 2 {
        return Ok(s);
    }
    let copy = s.buf.duplicate().map_err(|e| map_err(op, s.device, e))?;
    Ok(DeviceStorage::new(copy, s.shape.clone(), s.device))
}

/// Checks that `g` is a gradient for `p` (same shape, same device).
pub(crate) fn check(name: &str, p: &Param, g: &Tensor) -> Result<()> {
    if g.shape() != p.shape().as_slice() || g.device() != p.device() {
        return Err(Error::shape(
            "optimizer step",
            format!(
                "`{name}`: gradient {:?} on {}, parameter {:?} on {}",
                g.shape(),
                g.device(),
                p.shape(),
                p.device()
            ),
        ));
    }
    Ok(())
}

/// A zero-filled device buffer like `s`'s.
fn zeros_like(op: &str, s: &DeviceStorage) -> Result<DeviceBuffer> {
    k::full(s.buf.launcher(), s.numel(), 0.0).map_err(|e| map_err(op, s.device, e))
}

/// One Adam/AdamW step of a device parameter; `host_moments` (restored from a checkpoint)
/// are uploaded on the first step after a load.
pub(crate) fn adam(
    p: &Param,
    g: &Tensor,
    moments: &mut DeviceMoments,
    host_moments: Option<(ndarray::ArrayD<f32>, ndarray::ArrayD<f32>)>,
    step: u64,
    cfg: AdamConfig,
) -> Result<()> {
    const OP: &str = "Adam::step";
    let s = writable(OP, p)?;
    let err = |e| map_err(OP, s.device, e);
    if moments.is_none() {
        *moments = Some(match host_moments {
            Some((m, v)) => (
                Arc::try_unwrap(super::upload(OP, &m, s.device)?.buf).expect("fresh"),
                Arc::try_unwrap(super::upload(OP, &v, s.device)?.buf).expect("fresh"),
            ),
            None => (zeros_like(OP, &s)?, zeros_like(OP, &s)?),
        });
    }
    let (m, v) = moments.as_ref().expect("set above");
    k::adam_step(&s.buf, &storage_of(g)?.buf, m, v, step, cfg).map_err(err)?;
    p.set_device_storage(s);
    Ok(())
}

/// One SGD step of a device parameter (`buf` the momentum buffer, allocated on first use).
pub(crate) fn sgd(
    p: &Param,
    g: &Tensor,
    buf: &mut Option<DeviceBuffer>,
    cfg: SgdConfig,
) -> Result<()> {
    const OP: &str = "Sgd::step";
    let s = writable(OP, p)?;
    let err = |e| map_err(OP, s.device, e);
    let first = buf.is_none();
    if first {
        *buf = Some(zeros_like(OP, &s)?);
    }
    k::sgd_step(
        &s.buf,
        &storage_of(g)?.buf,
        buf.as_ref().expect("set above"),
        first,
        cfg,
    )
    .map_err(err)?;
    p.set_device_storage(s);
    Ok(())
}

/// Sum of squares of a device gradient, read back (the one device read of a clipped step).
pub(crate) fn sum_squares(g: &Tensor) -> Result<f64> {
    let s = storage_of(g)?;
    let r = k::reduce_rows(&s.buf, 1, s.numel(), Reduce::SumSquares)
        .map_err(|e| map_err("clip_grad_norm", s.device, e))?;
    let v = r
        .to_f32()
        .map_err(|e| map_err("clip_grad_norm", s.device, e))?;
    Ok(v[0] as f64)
}

/// A device moment as host values (optimizer state dicts).
pub(crate) fn to_host(b: &DeviceBuffer, shape: &[usize]) -> Result<ndarray::ArrayD<f32>> {
    let v = b
        .to_f32()
        .map_err(|e| Error::backend("optimizer state_dict", e))?;
    Ok(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).expect("parameter's shape"))
}
