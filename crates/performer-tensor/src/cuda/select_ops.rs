//! Device forms of the indexing ops: index_select and gather (scatter-add backward), where and
//! masked_fill. Indices and masks are host arrays at the API edge, as on the CPU: they are
//! checked there and uploaded once (input data, never read back).

use std::sync::Arc;

use ndarray::ArrayViewD;
use performer_cuda::tensor_ops as k;

use super::ops::{device_or_host, row_major_strides};
use super::{DeviceStorage, map_err, record1, storage_of, try_some, upload};
use crate::{Device, Result, Tensor};

/// Entries `indices` (checked by the caller) of axis `ax`.
pub(crate) fn index_select(x: &Tensor, ax: usize, indices: &[i64]) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    let sx = try_some!(storage_of(x));
    let mut out_shape = sx.shape.clone();
    out_shape[ax] = indices.len();
    // One index per position of `ax`, the same for every other coordinate.
    let mut index_strides = vec![0i64; out_shape.len()];
    index_strides[ax] = 1;
    Some(gather_on(
        "index_select",
        x,
        ax,
        out_shape,
        indices,
        &index_strides,
    ))
}

/// PyTorch's gather along `ax` with `index` (checked by the caller).
pub(crate) fn gather(x: &Tensor, ax: usize, index: &ArrayViewD<i64>) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    let out_shape = index.shape().to_vec();
    let values: Vec<i64> = index.iter().copied().collect();
    let strides = row_major_strides(&out_shape);
    Some(gather_on("gather", x, ax, out_shape, &values, &strides))
}

fn gather_on(
    op: &'static str,
    x: &Tensor,
    ax: usize,
    out_shape: Vec<usize>,
    values: &[i64],
    index_strides: &[i64],
) -> Result<Tensor> {
    let sx = storage_of(x)?;
    let device = sx.device;
    let err = move |e| map_err(op, device, e);
    let (y, index) =
        k::gather(&sx.buf, &sx.shape, ax, &out_shape, values, index_strides).map_err(err)?;
    let index = Arc::new(index);
    let out = DeviceStorage::new(y, out_shape.clone(), device);
    Ok(record1(op, &[x], out, move |g, _| {
        let gx = k::gather_backward(&g.buf, &index, &sx.shape, ax, &out_shape).map_err(err)?;
        Ok(vec![Some(DeviceStorage::new(gx, sx.shape.clone(), device))])
    }))
}

/// `a` where `cond`, else `b` (shapes checked by the caller to broadcast together).
pub(crate) fn where_cond(
    cond: &ArrayViewD<bool>,
    a: &Tensor,
    b: &Tensor,
) -> Option<Result<Tensor>> {
    let device = device_or_host!("where", a, b);
    Some(where_on("where", cond, a, b, device))
}

/// `value` where `mask` (checked by the caller to broadcast to `x`'s shape), else `x`.
pub(crate) fn masked_fill(
    x: &Tensor,
    mask: &ArrayViewD<bool>,
    value: f32,
) -> Option<Result<Tensor>> {
    let device = x.device();
    if device.is_cpu() {
        return None;
    }
    Some((|| {
        let fill = super::ops::full_on(&[], value, device)?;
        where_on("masked_fill", mask, &fill, x, device)
    })())
}

fn where_on(
    op: &'static str,
    cond: &ArrayViewD<bool>,
    a: &Tensor,
    b: &Tensor,
    device: Device,
) -> Result<Tensor> {
    let err = move |e| map_err(op, device, e);
    let c = upload(op, &cond.mapv(|c| if c { 1.0 } else { 0.0 }), device)?;
    let (sa, sb) = (storage_of(a)?, storage_of(b)?);
    let (y, shape) =
        k::where_select(&c.buf, &c.shape, &sa.buf, &sa.shape, &sb.buf, &sb.shape).map_err(err)?;
    let out = DeviceStorage::new(y, shape, device);
    Ok(record1(op, &[a, b], out, move |g, needs| {
        let (ga, gb) = k::where_backward(
            &c.buf, &c.shape, &sa.shape, &sb.shape, &g.buf, needs[0], needs[1],
        )
        .map_err(err)?;
        Ok(vec![
            ga.map(|g| DeviceStorage::new(g, sa.shape.clone(), device)),
            gb.map(|g| DeviceStorage::new(g, sb.shape.clone(), device)),
        ])
    }))
}
