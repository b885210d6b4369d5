//! Device forms of the layout ops that move elements between tensors of different shapes:
//! narrow (and so select, split, chunk), pad, cat (and so stack), broadcast_to and contiguous.
//! Each is a strided copy into or out of a row-major buffer (`strided_copy` reads a view,
//! `strided_scatter` writes one), so the backward of each is the other.

use performer_cuda::tensor_ops as k;
use performer_cuda::{DeviceBuffer, Elem};

use super::ops::row_major_strides;
use super::{DeviceStorage, common_device, map_err, record, record1, storage_of, stored, try_some};
use crate::tensor::Storage;
use crate::{DType, Device, Error, Result, Tensor};

/// `len` entries of axis `ax` from `start` (bounds checked by the caller).
pub(crate) fn narrow(x: &Tensor, ax: usize, start: usize, len: usize) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    const OP: &str = "narrow";
    // A bf16 input gives a bf16 output (the copy runs on an f32 temporary).
    let dtype = stored(x).dtype();
    let sx = try_some!(storage_of(x));
    let device = sx.device;
    let err = move |e| map_err(OP, device, e);
    let strides = row_major_strides(&sx.shape);
    let offset = start * strides[ax] as usize;
    let mut out_shape = sx.shape.clone();
    out_shape[ax] = len;
    Some((|| {
        let y = k::strided_copy(&sx.buf, offset, &out_shape, &strides).map_err(err)?;
        let in_shape = sx.shape.clone();
        let out = DeviceStorage::new(y, out_shape.clone(), device).as_dtype(OP, dtype)?;
        let (dev, numel) = (sx.buf.launcher().clone(), sx.numel());
        drop(sx);
        Ok(record1(OP, &[x], out, move |g, _| {
            let gx = k::full(&dev, numel, 0.0).map_err(err)?;
            k::strided_scatter(&g.buf, &gx, offset, &out_shape, &strides).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, in_shape.clone(), device))])
        }))
    })())
}

/// Axis `ax` padded with `before` and `after` entries of `value` (sizes checked by the caller).
pub(crate) fn pad(
    x: &Tensor,
    ax: usize,
    before: usize,
    after: usize,
    value: f32,
) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    const OP: &str = "pad";
    let dtype = stored(x).dtype();
    let sx = try_some!(storage_of(x));
    let device = sx.device;
    let err = move |e| map_err(OP, device, e);
    let mut out_shape = sx.shape.clone();
    out_shape[ax] += before + after;
    let strides = row_major_strides(&out_shape);
    let offset = before * strides[ax] as usize;
    let numel: usize = out_shape.iter().product();
    Some((|| {
        let y = k::full(sx.buf.launcher(), numel, value).map_err(err)?;
        k::strided_scatter(&sx.buf, &y, offset, &sx.shape, &strides).map_err(err)?;
        let in_shape = sx.shape.clone();
        let out = DeviceStorage::new(y, out_shape, device).as_dtype(OP, dtype)?;
        drop(sx);
        Ok(record1(OP, &[x], out, move |g, _| {
            let gx = k::strided_copy(&g.buf, offset, &in_shape, &strides).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, in_shape.clone(), device))])
        }))
    })())
}

/// `tensors` (shapes checked by the caller to agree outside `ax`) joined along `ax`.
pub(crate) fn cat(tensors: &[Tensor], ax: usize) -> Option<Result<Tensor>> {
    const OP: &str = "cat";
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let device = match common_device(OP, &refs) {
        Ok(None) => return None,
        Ok(Some(d)) => d,
        Err(e) => return Some(Err(e)),
    };
    Some(cat_on(&refs, ax, device))
}

fn cat_on(tensors: &[&Tensor], ax: usize, device: Device) -> Result<Tensor> {
    const OP: &str = "cat";
    let err = move |e| map_err(OP, device, e);
    // bf16 pieces give bf16; any f32 piece gives f32.
    let dtype = if tensors.iter().all(|t| t.dtype() == DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    };
    let parts: Vec<DeviceStorage> = tensors
        .iter()
        .map(|t| storage_of(t))
        .collect::<Result<_>>()?;
    let mut out_shape = parts[0].shape.clone();
    out_shape[ax] = parts.iter().map(|p| p.shape[ax]).sum();
    let strides = row_major_strides(&out_shape);
    let numel: usize = out_shape.iter().product();
    // Not filled: the pieces cover every element (on the emulator, a gap would stay NaN).
    let y = DeviceBuffer::alloc(parts[0].buf.launcher(), numel, Elem::F32).map_err(err)?;
    let mut offsets = Vec::with_capacity(parts.len());
    let mut start = 0;
    for p in &parts {
        let offset = start * strides[ax] as usize;
        k::strided_scatter(&p.buf, &y, offset, &p.shape, &strides).map_err(err)?;
        offsets.push(offset);
        start += p.shape[ax];
    }
    let shapes: Vec<Vec<usize>> = parts.iter().map(|p| p.shape.clone()).collect();
    drop(parts);
    let out = Storage::Device(DeviceStorage::new(y, out_shape, device).as_dtype(OP, dtype)?);
    Ok(record(OP, tensors, vec![out], move |grads, needs| {
        let Some(g) = grads.into_iter().next().flatten() else {
            return Ok(vec![None; needs.len()]);
        };
        let g = storage_of(&g)?;
        shapes
            .iter()
            .zip(&offsets)
            .zip(needs)
            .map(|((shape, &offset), &need)| {
                need.then(|| {
                    let gp = k::strided_copy(&g.buf, offset, shape, &strides).map_err(err)?;
                    Ok(super::constant(DeviceStorage::new(
                        gp,
                        shape.clone(),
                        device,
                    )))
                })
                .transpose()
            })
            .collect()
    })
    .pop()
    .expect("one output"))
}

/// `x` repeated along its broadcast axes to `shape` (a copy on the device; the gradient is
/// summed back).
pub(crate) fn broadcast_to(x: &Tensor, shape: &[usize]) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    const OP: &str = "broadcast_to";
    let dtype = stored(x).dtype();
    let sx = try_some!(storage_of(x));
    let device = sx.device;
    let err = move |e| map_err(OP, device, e);
    // Only `x` stretches (NumPy's broadcast_to), so the target keeps every axis of x.
    if k::broadcast_shape(&sx.shape, shape).as_deref() != Some(shape) {
        return Some(Err(Error::shape(
            OP,
            format!("{:?} does not broadcast to {:?}", sx.shape, shape),
        )));
    }
    let own = row_major_strides(&sx.shape);
    let lead = shape.len() - sx.shape.len();
    let strides: Vec<i64> = (0..shape.len())
        .map(|i| {
            if i < lead || sx.shape[i - lead] == 1 {
                0
            } else {
                own[i - lead]
            }
        })
        .collect();
    let out_shape = shape.to_vec();
    Some((|| {
        let y = k::strided_copy(&sx.buf, 0, &out_shape, &strides).map_err(err)?;
        let in_shape = sx.shape.clone();
        let out = DeviceStorage::new(y, out_shape.clone(), device).as_dtype(OP, dtype)?;
        Ok(record1(OP, &[x], out, move |g, _| {
            let gx = k::sum_to(&g.buf, &out_shape, &in_shape).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, in_shape.clone(), device))])
        }))
    })())
}

/// A device tensor is always contiguous and row-major: itself.
pub(crate) fn contiguous(x: &Tensor) -> Option<Tensor> {
    (!x.device().is_cpu()).then(|| x.clone())
}
