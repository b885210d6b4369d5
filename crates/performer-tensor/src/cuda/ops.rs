//! Device implementations of the tensor ops, each reached by one early branch at the top of
//! the CPU op (`on_device!`). Each returns `None` when every operand is on the host (the CPU
//! code runs, unchanged), and otherwise the result computed by the kernels of
//! `performer_cuda::tensor_ops` with a device backward, or a typed error: operands on two
//! devices ([`Error::DeviceMismatch`]), out of memory ([`Error::OutOfMemory`]), an op or a form
//! of one with no device kernel ([`Error::Unsupported`]).
//!
//! Ops whose CPU signature cannot fail (`relu`, `exp`, `mul_scalar`, `sum_all`, ...) panic
//! with the typed error's message when the device fails (out of memory): their signatures are
//! the CPU's, kept unchanged.

use performer_cuda::tensor_ops::{self as k, Binary, Reduce, Unary};
use performer_cuda::{DeviceBuffer, Elem};

use super::{
    DeviceStorage, common_device, constant, map_err, record1, storage_of, stored, try_some,
};
use crate::{DType, Device, Error, Result, Tensor};

/// `op`'s device, `None` for host operands, the mismatch error otherwise.
macro_rules! device_or_host_impl {
    ($op:expr, $($t:expr),+) => {
        match $crate::cuda::common_device($op, &[$($t),+]) {
            Ok(None) => return None,
            Ok(Some(d)) => d,
            Err(e) => return Some(Err(e)),
        }
    };
}
pub(super) use device_or_host_impl as device_or_host;

pub(super) fn unsupported(op: &str, device: Device, detail: impl Into<String>) -> Error {
    Error::Unsupported {
        op: op.to_string(),
        device: device.to_string(),
        detail: detail.into(),
    }
}

pub(super) fn infallible(op: &str, r: Result<Tensor>) -> Tensor {
    r.unwrap_or_else(|e| panic!("{op} on a device: {e}"))
}

pub(super) fn row_major_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for a in (0..shape.len()).rev() {
        s[a] = acc;
        acc *= shape[a] as i64;
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Element-wise

/// `a op b` with broadcasting for the CPU op named `name`.
pub(crate) fn binary(a: &Tensor, b: &Tensor, name: &'static str) -> Option<Result<Tensor>> {
    let device = device_or_host!(name, a, b);
    let op = match name {
        "add" => Binary::Add,
        "sub" => Binary::Sub,
        "mul" => Binary::Mul,
        "div" => Binary::Div,
        "maximum" => Binary::Max,
        "minimum" => Binary::Min,
        "pow" => Binary::Pow,
        _ => {
            return Some(Err(unsupported(
                name,
                device,
                "no device kernel; use to_host()",
            )));
        }
    };
    // Kept as stored for the backward (bf16 activations stay bf16 there); the kernels read
    // f32 copies. bf16 with bf16 gives bf16, anything with f32 gives f32 (PyTorch's promotion).
    let (ra, rb) = (stored(a).clone(), stored(b).clone());
    let out_dtype = if ra.dtype() == DType::BF16 && rb.dtype() == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    Some((|| {
        let (sa, sb) = (ra.as_f32(name)?, rb.as_f32(name)?);
        let (out, shape) = k::binary(&sa.buf, &sa.shape, &sb.buf, &sb.shape, op)
            .map_err(|e| map_err(name, device, e))?;
        let out = DeviceStorage::new(out, shape, device).as_dtype(name, out_dtype)?;
        drop((sa, sb));
        Ok(record1(name, &[a, b], out, move |g, needs| {
            let (sa, sb) = (ra.as_f32(name)?, rb.as_f32(name)?);
            let (ga, gb) = k::binary_backward(
                &sa.buf, &sa.shape, &sb.buf, &sb.shape, &g.buf, op, needs[0], needs[1],
            )
            .map_err(|e| map_err(name, device, e))?;
            Ok(vec![
                ga.map(|g| DeviceStorage::new(g, sa.shape.clone(), device)),
                gb.map(|g| DeviceStorage::new(g, sb.shape.clone(), device)),
            ])
        }))
    })())
}

/// The device function of the CPU's element-wise op `name`, where there is one.
fn unary_of(name: &str) -> Option<Unary> {
    Some(match name {
        "neg" => Unary::Neg,
        "exp" => Unary::Exp,
        "log" => Unary::Log,
        "sqrt" => Unary::Sqrt,
        "relu" => Unary::Relu,
        "gelu" => Unary::Gelu,
        "tanh" => Unary::Tanh,
        "sigmoid" => Unary::Sigmoid,
        "abs" => Unary::Abs,
        "recip" => Unary::Recip,
        "square" => Unary::Square,
        "silu" => Unary::Silu,
        "elu" => Unary::Elu,
        "softplus" => Unary::Softplus,
        _ => return None,
    })
}

/// The CPU's element-wise op `name` (no parameters) on a device.
pub(crate) fn unary(x: &Tensor, name: &'static str) -> Option<Tensor> {
    if x.device().is_cpu() {
        return None;
    }
    let r = match unary_of(name) {
        Some(f) => unary_on(x, name, f),
        None => Err(unsupported(
            name,
            x.device(),
            "no device kernel; use to_host()",
        )),
    };
    Some(infallible(name, r))
}

/// An element-wise op with parameters (`Affine`, `Pow`) on a device.
pub(crate) fn unary_with(x: &Tensor, name: &'static str, f: Unary) -> Option<Tensor> {
    if x.device().is_cpu() {
        return None;
    }
    Some(infallible(name, unary_on(x, name, f)))
}

fn unary_on(x: &Tensor, name: &'static str, f: Unary) -> Result<Tensor> {
    // bf16 in, bf16 out (autocast's activations), and both kept as bf16 for the backward; the
    // kernels run on f32 copies.
    let rx = stored(x).clone();
    let device = rx.device;
    let y = {
        let sx = rx.as_f32(name)?;
        let y = k::unary(&sx.buf, f).map_err(|e| map_err(name, device, e))?;
        DeviceStorage::new(y, sx.shape.clone(), device).as_dtype(name, rx.dtype())?
    };
    let ry = y.clone();
    Ok(record1(name, &[x], y, move |g, _| {
        let (sx, sy) = (rx.as_f32(name)?, ry.as_f32(name)?);
        let gx =
            k::unary_backward(&sx.buf, &sy.buf, &g.buf, f).map_err(|e| map_err(name, device, e))?;
        Ok(vec![Some(DeviceStorage::new(gx, sx.shape.clone(), device))])
    }))
}

// ---------------------------------------------------------------------------------------------
// Layout

/// The same elements under another shape (shares the buffer).
pub(crate) fn reshape(x: &Tensor, shape: &[usize]) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    let sx = stored(x);
    let in_shape = sx.shape.clone();
    Some(Ok(record1(
        "reshape",
        &[x],
        sx.reshaped(shape.to_vec()),
        move |g, _| Ok(vec![Some(g.reshaped(in_shape.clone()))]),
    )))
}

/// A contiguous copy of `s` with its axes in the order `perm`.
pub(super) fn permuted(op: &str, s: &DeviceStorage, perm: &[usize]) -> Result<DeviceStorage> {
    let strides = row_major_strides(&s.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| s.shape[p]).collect();
    let st: Vec<i64> = perm.iter().map(|&p| strides[p]).collect();
    let buf = k::strided_copy(&s.buf, 0, &shape, &st).map_err(|e| map_err(op, s.device, e))?;
    Ok(DeviceStorage::new(buf, shape, s.device))
}

/// Axes reordered (copied into the new order on the device).
pub(crate) fn permute(x: &Tensor, perm: &[usize]) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    let mut inverse = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    // A bf16 input gives a bf16 output (the copy runs on an f32 temporary).
    let dtype = stored(x).dtype();
    let out = storage_of(x)
        .and_then(|s| permuted("permute", &s, perm))
        .and_then(|s| s.as_dtype("permute", dtype));
    Some(out.map(|out| {
        record1("permute", &[x], out, move |g, _| {
            Ok(vec![Some(permuted("permute", g, &inverse)?)])
        })
    }))
}

// ---------------------------------------------------------------------------------------------
// Reductions

/// Sum over `axes` (normalized, any order).
pub(crate) fn sum(x: &Tensor, axes: &[usize], keepdim: bool) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    Some(sum_on(x, axes, keepdim))
}

fn sum_on(x: &Tensor, axes: &[usize], keepdim: bool) -> Result<Tensor> {
    let sx = storage_of(x)?;
    let device = sx.device;
    let rank = sx.shape.len();
    let kept: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
    let reduced: Vec<usize> = (0..rank).filter(|a| axes.contains(a)).collect();
    let rows: usize = kept.iter().map(|&a| sx.shape[a]).product();
    let cols: usize = reduced.iter().map(|&a| sx.shape[a]).product();
    // Kept axes first, summed axes last: one row per output element.
    let perm: Vec<usize> = kept.iter().chain(&reduced).copied().collect();
    let arranged = if perm.iter().enumerate().all(|(i, &p)| i == p) {
        sx.clone()
    } else {
        permuted("sum", &sx, &perm)?
    };
    let out = k::reduce_rows(&arranged.buf, rows, cols, Reduce::Sum)
        .map_err(|e| map_err("sum", device, e))?;
    let out_shape: Vec<usize> = (0..rank)
        .filter_map(|a| {
            if axes.contains(&a) {
                keepdim.then_some(1)
            } else {
                Some(sx.shape[a])
            }
        })
        .collect();
    let in_shape = sx.shape.clone();
    // The gradient reads the output gradient (one value per kept index) with stride 0 along
    // the summed axes.
    let mut back_strides = vec![0i64; rank];
    let kept_shape: Vec<usize> = kept.iter().map(|&a| sx.shape[a]).collect();
    let kept_strides = row_major_strides(&kept_shape);
    for (i, &a) in kept.iter().enumerate() {
        back_strides[a] = kept_strides[i];
    }
    Ok(record1(
        "sum",
        &[x],
        DeviceStorage::new(out, out_shape, device),
        move |g, _| {
            let gx = k::strided_copy(&g.buf, 0, &in_shape, &back_strides)
                .map_err(|e| map_err("sum", device, e))?;
            Ok(vec![Some(DeviceStorage::new(gx, in_shape.clone(), device))])
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Matrix products

/// The matrix product of operands of rank >= 2: `(..., m, k) @ (k, n)` (a weight shared by every
/// batch) or `(..., m, k) @ (..., k, n)` with equal batch axes, as cuBLAS GEMMs.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Option<Result<Tensor>> {
    let device = device_or_host!("matmul", a, b);
    Some(matmul_on(a, b, device))
}

/// One row-major product of [`matmul_on`]: in f32, or under autocast on bf16 copies of the
/// operands (the ones already bf16 are read as they are) with f32 accumulation, the result
/// stored as `out`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    autocast: bool,
    x: &DeviceStorage,
    tx: bool,
    y: &DeviceStorage,
    ty: bool,
    dims: [usize; 4],
    out: DType,
) -> Result<DeviceBuffer> {
    const OP: &str = "matmul";
    let [batch, m, kk, n] = dims;
    let err = |e| map_err(OP, x.device, e);
    if autocast {
        let (x, y) = (x.as_dtype(OP, DType::BF16)?, y.as_dtype(OP, DType::BF16)?);
        let out = match out {
            DType::BF16 => Elem::Bf16,
            DType::F32 => Elem::F32,
        };
        k::matmul_bf16_storage(&x.buf, tx, &y.buf, ty, batch, m, kk, n, out).map_err(err)
    } else {
        let (x, y) = (x.as_f32(OP)?, y.as_f32(OP)?);
        k::matmul(&x.buf, tx, &y.buf, ty, batch, m, kk, n).map_err(err)
    }
}

fn matmul_on(a: &Tensor, b: &Tensor, device: Device) -> Result<Tensor> {
    // Inside autocast the product reads bf16 operands (f32 ones cast to temporaries) and is
    // stored as bf16, and the backward's products read bf16 operands and write f32 gradients.
    // The operands are kept as they are stored: the graph holds them anyway, so a kept bf16
    // cast of an f32 operand would only add memory; the backward casts again. Outside
    // autocast everything is f32.
    let autocast = crate::autocast::is_autocast_bf16();
    let (sa, sb) = (stored(a).clone(), stored(b).clone());
    let out_dtype = if autocast { DType::BF16 } else { DType::F32 };
    let (ra, rb) = (sa.shape.len(), sb.shape.len());
    if ra < 2 || rb < 2 {
        return Err(unsupported(
            "matmul",
            device,
            format!(
                "operands of rank >= 2 only on a device, got {:?} and {:?}",
                sa.shape, sb.shape
            ),
        ));
    }
    let (m, kk) = (sa.shape[ra - 2], sa.shape[ra - 1]);
    let (kb, n) = (sb.shape[rb - 2], sb.shape[rb - 1]);
    if kk != kb {
        return Err(Error::shape(
            "matmul",
            format!("{:?} @ {:?}: inner sizes differ", sa.shape, sb.shape),
        ));
    }
    let a_batch: usize = sa.shape[..ra - 2].iter().product();
    let mut out_shape = sa.shape[..ra - 2].to_vec();
    out_shape.extend([m, n]);
    // The backward's products follow the forward's choice, whenever they run.
    let f32_ = DType::F32;
    if rb == 2 {
        // One weight: (batch * m, k) @ (k, n).
        let rows = a_batch * m;
        let c = gemm(
            autocast,
            &sa,
            false,
            &sb,
            false,
            [1, rows, kk, n],
            out_dtype,
        )?;
        let out = DeviceStorage::new(c, out_shape, device);
        return Ok(record1("matmul", &[a, b], out, move |g, needs| {
            let ga = needs[0]
                .then(|| gemm(autocast, g, false, &sb, true, [1, rows, n, kk], f32_))
                .transpose()?;
            let gb = needs[1]
                .then(|| gemm(autocast, &sa, true, g, false, [1, kk, rows, n], f32_))
                .transpose()?;
            Ok(vec![
                ga.map(|g| DeviceStorage::new(g, sa.shape.clone(), device)),
                gb.map(|g| DeviceStorage::new(g, sb.shape.clone(), device)),
            ])
        }));
    }
    if sa.shape[..ra - 2] != sb.shape[..rb - 2] {
        // Batch axes that broadcast: both operands repeated to the common batch shape (device
        // copies whose backward sums back), then one batched product.
        let batch =
            k::broadcast_shape(&sa.shape[..ra - 2], &sb.shape[..rb - 2]).ok_or_else(|| {
                Error::shape(
                    "matmul",
                    format!(
                        "{:?} @ {:?}: batch axes do not broadcast",
                        sa.shape, sb.shape
                    ),
                )
            })?;
        let full = |t: &Tensor, rows: usize, cols: usize| {
            let mut shape = batch.clone();
            shape.extend([rows, cols]);
            t.broadcast_to(&shape)
        };
        return matmul_on(&full(a, m, kk)?, &full(b, kb, n)?, device);
    }
    let batch = a_batch;
    let c = gemm(
        autocast,
        &sa,
        false,
        &sb,
        false,
        [batch, m, kk, n],
        out_dtype,
    )?;
    let out = DeviceStorage::new(c, out_shape, device);
    Ok(record1("matmul", &[a, b], out, move |g, needs| {
        let ga = needs[0]
            .then(|| gemm(autocast, g, false, &sb, true, [batch, m, n, kk], f32_))
            .transpose()?;
        let gb = needs[1]
            .then(|| gemm(autocast, &sa, true, g, false, [batch, kk, m, n], f32_))
            .transpose()?;
        Ok(vec![
            ga.map(|g| DeviceStorage::new(g, sa.shape.clone(), device)),
            gb.map(|g| DeviceStorage::new(g, sb.shape.clone(), device)),
        ])
    }))
}

/// `x @ w + bias` under autocast on a device as one op stored as bf16 (`Tensor::matmul_add`);
/// `None` (the separate ops) on the host, outside autocast, or for shapes other than
/// `(..., k) @ (k, n) + (n)`.
pub(crate) fn matmul_add(x: &Tensor, w: &Tensor, bias: &Tensor) -> Option<Result<Tensor>> {
    const OP: &str = "matmul_add";
    let device = device_or_host!(OP, x, w, bias);
    let (sx, sw) = (stored(x).clone(), stored(w).clone());
    let n = *sw.shape.last()?;
    if !crate::autocast::is_autocast_bf16()
        || sx.shape.len() < 2
        || sw.shape.len() != 2
        || bias.shape() != [n]
        || sx.shape.last() != sw.shape.first()
    {
        return None;
    }
    let kk = sw.shape[0];
    let rows = sx.numel() / kk.max(1);
    let mut out_shape = sx.shape.clone();
    *out_shape.last_mut().expect("rank >= 2") = n;
    let err = move |e| map_err(OP, device, e);
    Some((|| {
        // The product in f32 from bf16 operands, the bias added in f32, one rounding to bf16.
        let sbias = storage_of(bias)?;
        let c = gemm(true, &sx, false, &sw, false, [1, rows, kk, n], DType::F32)?;
        let (y, _) = k::binary(&c, &[rows, n], &sbias.buf, &[n], Binary::Add).map_err(err)?;
        let out = DeviceStorage::new(y, out_shape, device).as_dtype(OP, DType::BF16)?;
        drop((c, sbias));
        let f32_ = DType::F32;
        Ok(record1(OP, &[x, w, bias], out, move |g, needs| {
            let gx = needs[0]
                .then(|| gemm(true, g, false, &sw, true, [1, rows, n, kk], f32_))
                .transpose()?;
            let gw = needs[1]
                .then(|| gemm(true, &sx, true, g, false, [1, kk, rows, n], f32_))
                .transpose()?;
            let gb = needs[2]
                .then(|| k::sum_cols(&g.buf, rows, n))
                .transpose()
                .map_err(err)?;
            Ok(vec![
                gx.map(|b| DeviceStorage::new(b, sx.shape.clone(), device)),
                gw.map(|b| DeviceStorage::new(b, sw.shape.clone(), device)),
                gb.map(|b| DeviceStorage::new(b, vec![n], device)),
            ])
        }))
    })())
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax or log-softmax along axis `ax`: rows of the last axis in one kernel; another axis
/// is swapped to the last place and back around it (each swap a device copy with its own
/// backward).
pub(crate) fn softmax(x: &Tensor, ax: usize, log: bool) -> Option<Result<Tensor>> {
    if x.device().is_cpu() {
        return None;
    }
    let name = if log { "log_softmax" } else { "softmax" };
    let sx = try_some!(storage_of(x));
    let device = sx.device;
    let last = sx.shape.len() - 1;
    if ax != last {
        let (a, l) = (ax as isize, last as isize);
        let inner = |t: Tensor| {
            if log { t.log_softmax(l) } else { t.softmax(l) }
        };
        return Some(
            x.transpose(a, l)
                .and_then(inner)
                .and_then(|t| t.transpose(a, l)),
        );
    }
    let cols = sx.shape[ax];
    let rows = sx.numel() / cols.max(1);
    Some((|| {
        let y = k::softmax_rows(&sx.buf, rows, cols, log).map_err(|e| map_err(name, device, e))?;
        let y = DeviceStorage::new(y, sx.shape.clone(), device);
        let sy = y.clone();
        Ok(record1(name, &[x], y, move |g, _| {
            let gx = k::softmax_rows_backward(&sy.buf, &g.buf, rows, cols, log)
                .map_err(|e| map_err(name, device, e))?;
            Ok(vec![Some(DeviceStorage::new(gx, sy.shape.clone(), device))])
        }))
    })())
}

/// A device tensor of `shape` filled with `value` (a constant).
pub(crate) fn full_on(shape: &[usize], value: f32, device: Device) -> Result<Tensor> {
    Ok(constant(super::full(shape, value, device)?))
}

// ---------------------------------------------------------------------------------------------
// Normalization, embedding, loss

/// Layer norm over the last axis with optional `weight` and `bias` (shapes checked by the
/// caller).
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> Option<Result<Tensor>> {
    let mut all = vec![x];
    all.extend(weight);
    all.extend(bias);
    let device = match common_device("layer_norm", &all) {
        Ok(None) => return None,
        Ok(Some(d)) => d,
        Err(e) => return Some(Err(e)),
    };
    Some(layer_norm_on(x, weight, bias, eps, device))
}

fn layer_norm_on(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    device: Device,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let err = move |e| map_err(OP, device, e);
    let sx = storage_of(x)?;
    let cols = *sx.shape.last().expect("rank checked");
    let rows = sx.numel() / cols.max(1);
    let sw = weight.map(storage_of).transpose()?;
    let sb = bias.map(storage_of).transpose()?;
    let fwd = k::layer_norm_rows(
        &sx.buf,
        sw.as_ref().map(|s| &*s.buf),
        sb.as_ref().map(|s| &*s.buf),
        rows,
        cols,
        eps,
    )
    .map_err(err)?;
    let y = fwd.y.duplicate().map_err(err)?;
    let fwd = std::sync::Arc::new(fwd);
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    let has_bias = sb.is_some();
    let out = DeviceStorage::new(y, sx.shape.clone(), device);
    Ok(record1(OP, &inputs, out, move |g, needs| {
        let (gx, dw, db) = k::layer_norm_rows_backward(
            &sx.buf,
            sw.as_ref().map(|s| &*s.buf),
            &fwd,
            &g.buf,
            rows,
            cols,
        )
        .map_err(err)?;
        // Without a weight the kernel gives no bias gradient: the column sums of `g`.
        let db = match (db, has_bias) {
            (Some(db), true) => Some(db),
            (None, true) => Some(k::sum_cols(&g.buf, rows, cols).map_err(err)?),
            _ => None,
        };
        let mut out = vec![needs[0].then(|| DeviceStorage::new(gx, sx.shape.clone(), device))];
        if sw.is_some() {
            out.push(dw.map(|d| DeviceStorage::new(d, vec![cols], device)));
        }
        if has_bias {
            out.push(db.map(|d| DeviceStorage::new(d, vec![cols], device)));
        }
        Ok(out)
    }))
}

/// Rows `ids` of a device table (ids checked by the caller), shape `ids.shape ++ [dim]`.
pub(crate) fn embedding(table: &Tensor, ids: &ndarray::ArrayViewD<i64>) -> Option<Result<Tensor>> {
    if table.device().is_cpu() {
        return None;
    }
    const OP: &str = "embedding";
    let st = try_some!(storage_of(table));
    let device = st.device;
    let err = move |e| map_err(OP, device, e);
    let (vocab, dim) = (st.shape[0], st.shape[1]);
    let flat: Vec<i64> = ids.iter().copied().collect();
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    Some((|| {
        let rows = k::embedding(&st.buf, vocab, dim, &flat).map_err(err)?;
        let out = DeviceStorage::new(rows, shape, device);
        Ok(record1(OP, &[table], out, move |g, _| {
            let gt = k::embedding_backward(&g.buf, &flat, vocab, dim).map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gt, vec![vocab, dim], device))])
        }))
    })())
}

/// Mean cross-entropy of `(N, C)` device logits against host targets (checked by the caller),
/// computed on the device: the loss stays there until read.
pub(crate) fn cross_entropy(
    logits: &Tensor,
    target: &ndarray::ArrayViewD<i64>,
    ignore_index: Option<i64>,
) -> Option<Result<Tensor>> {
    if logits.device().is_cpu() {
        return None;
    }
    const OP: &str = "cross_entropy";
    let sx = try_some!(storage_of(logits));
    let device = sx.device;
    if sx.shape.len() > 2 {
        // (N, C, d1, ...): the class axis moved last and the rest flattened into rows, in the
        // row-major order of the targets (N, d1, ...).
        let rank = sx.shape.len() as isize;
        let mut perm: Vec<isize> = vec![0];
        perm.extend(2..rank);
        perm.push(1);
        let flat_targets: Vec<i64> = target.iter().copied().collect();
        let flat_targets =
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[flat_targets.len()]), flat_targets)
                .expect("one axis");
        return Some(
            logits
                .permute(&perm)
                .and_then(|t| t.reshape(&[-1, sx.shape[1] as isize]))
                .and_then(|t| t.cross_entropy(&flat_targets.view(), ignore_index)),
        );
    }
    let err = move |e| map_err(OP, device, e);
    let (rows, cols) = (sx.shape[0], sx.shape[1]);
    // Targets were checked to lie in 0..C, so a negative value never matches one.
    let ignore = ignore_index.unwrap_or(i64::MIN);
    let targets: Vec<i64> = target.iter().copied().collect();
    Some((|| {
        let fwd = k::cross_entropy(&sx.buf, rows, cols, &targets, ignore).map_err(err)?;
        let loss = fwd.loss.duplicate().map_err(err)?;
        let fwd = std::sync::Arc::new(fwd);
        let out = DeviceStorage::new(loss, Vec::new(), device);
        Ok(record1(OP, &[logits], out, move |g, _| {
            let gx = k::cross_entropy_backward(&sx.buf, &fwd, &g.buf, rows, cols, ignore)
                .map_err(err)?;
            Ok(vec![Some(DeviceStorage::new(gx, sx.shape.clone(), device))])
        }))
    })())
}
