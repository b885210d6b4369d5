//! Device forms of the row-wise ops other than sum and softmax: amax and norm over any axes
//! (arranged as rows of a matrix by a permute and a reshape, whose own device backward routes
//! the gradient back), scale norm over the last axis, and dropout from the counter-based
//! device generator.

use performer_cuda::tensor_ops::{self as k, Reduce, Unary};

use super::{DeviceStorage, common_device, map_err, record1, storage_of, stored, try_some};
use crate::{Device, Error, Result, Tensor};

/// `x` reduced over `axes` (normalized) by the maximum (`Reduce::Max`, PyTorch's amax: ties
/// share the gradient) or the Euclidean norm (`Reduce::SumSquares`: the norm, gradient 0 at
/// a zero norm).
pub(crate) fn reduce_axes(
    x: &Tensor,
    axes: &[usize],
    keepdim: bool,
    op: Reduce,
) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    Some(reduce_axes_on(x, axes, keepdim, op))
}

fn reduce_axes_on(x: &Tensor, axes: &[usize], keepdim: bool, op: Reduce) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let kept: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
    let reduced: Vec<usize> = (0..rank).filter(|a| axes.contains(a)).collect();
    let rows: usize = kept.iter().map(|&a| shape[a]).product();
    let cols: usize = reduced.iter().map(|&a| shape[a]).product();
    // Kept axes first, reduced axes last: one row per output element.
    let perm: Vec<isize> = kept.iter().chain(&reduced).map(|&a| a as isize).collect();
    let arranged = if perm.iter().enumerate().all(|(i, &p)| i as isize == p) {
        x.clone()
    } else {
        x.permute(&perm)?
    };
    let matrix = arranged.reshape(&[rows as isize, cols as isize])?;
    let per_row = reduce_rows(&matrix, op)?;
    let out_shape: Vec<isize> = (0..rank)
        .filter_map(|a| {
            if axes.contains(&a) {
                keepdim.then_some(1)
            } else {
                Some(shape[a] as isize)
            }
        })
        .collect();
    per_row.reshape(&out_shape)
}

/// One value per row of the `(rows, cols)` device tensor `x`.
fn reduce_rows(x: &Tensor, op: Reduce) -> Result<Tensor> {
    let name = match op {
        Reduce::Max => "amax",
        Reduce::SumSquares => "norm",
        Reduce::Sum => "sum",
    };
    let sx = storage_of(x)?;
    let device = sx.device;
    let err = move |e| map_err(name, device, e);
    let (rows, cols) = (sx.shape[0], sx.shape[1]);
    let mut y = k::reduce_rows(&sx.buf, rows, cols, op).map_err(err)?;
    if op == Reduce::SumSquares {
        y = k::unary(&y, Unary::Sqrt).map_err(err)?;
    }
    let y = DeviceStorage::new(y, vec![rows], device);
    let sy = y.clone();
    Ok(record1(name, &[x], y, move |g, _| {
        let gx = k::reduce_rows_backward(&sx.buf, &sy.buf, &g.buf, rows, cols, op).map_err(err)?;
        Ok(vec![Some(DeviceStorage::new(gx, sx.shape.clone(), device))])
    }))
}

/// performer-pytorch's ScaleNorm over the last axis, `x / max(|x|, eps) * g` with the
/// one-element `g` (shapes checked by the caller), in one kernel each way.
pub(crate) fn scale_norm(x: &Tensor, g: &Tensor, eps: f32) -> Option<Result<Tensor>> {
    let device = match common_device("scale_norm", &[x, g]) {
        Ok(None) => return None,
        Ok(Some(d)) => d,
        Err(e) => return Some(Err(e)),
    };
    Some(scale_norm_on(x, g, eps, device))
}

fn scale_norm_on(x: &Tensor, g: &Tensor, eps: f32, device: Device) -> Result<Tensor> {
    const OP: &str = "scale_norm";
    let err = move |e| map_err(OP, device, e);
    let (sx, sg) = (storage_of(x)?, storage_of(g)?);
    let cols = *sx.shape.last().expect("rank checked by the caller");
    let rows = sx.numel() / cols.max(1);
    let (y, norms) = k::scale_norm_rows(&sx.buf, &sg.buf, rows, cols, eps).map_err(err)?;
    let out = DeviceStorage::new(y, sx.shape.clone(), device);
    Ok(record1(OP, &[x, g], out, move |gy, needs| {
        let (gx, dg) =
            k::scale_norm_rows_backward(&sx.buf, &sg.buf, &norms, &gy.buf, rows, cols, eps)
                .map_err(err)?;
        Ok(vec![
            needs[0].then(|| DeviceStorage::new(gx, sx.shape.clone(), device)),
            needs[1].then(|| DeviceStorage::new(dg, sg.shape.clone(), device)),
        ])
    }))
}

/// Dropout with probability `p` in `(0, 1]` (checked by the caller) on a device: the mask comes
/// from the counter-based device generator keyed by one 64-bit seed drawn from the global
/// generator ([`crate::rng`]), so restoring the global generator's state replays the mask
/// (the reversible stack's backward), and the backward recomputes it instead of storing it.
pub(crate) fn dropout(x: &Tensor, p: f32) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    const OP: &str = "dropout";
    if p >= 1.0 {
        // Everything dropped: the CPU's mask is all zeros, its scale 0.
        return Some(Ok(x.mul_scalar(0.0)));
    }
    if !(0.0..1.0).contains(&p) {
        return Some(Err(Error::invalid(OP, "p", p, "must lie in [0, 1]")));
    }
    let seed = crate::rng::with_rng(|g| g.next_u64());
    // bf16 in, bf16 out (autocast's activations); the kernel runs on an f32 copy.
    let dtype = stored(x).dtype();
    let sx = try_some!(storage_of(x));
    let device = sx.device;
    let err = move |e| map_err(OP, device, e);
    Some((|| {
        let y = k::dropout(&sx.buf, p, seed, 0).map_err(err)?;
        let out = DeviceStorage::new(y, sx.shape.clone(), device).as_dtype(OP, dtype)?;
        drop(sx);
        Ok(record1(OP, &[x], out, move |g, _| {
            let gx = k::dropout(&g.buf, p, seed, 0).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, g.shape.clone(), device))])
        }))
    })())
}
