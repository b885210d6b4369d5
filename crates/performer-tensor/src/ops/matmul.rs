//! Matrix products with broadcast batch dimensions (PyTorch's `matmul`).
//!
//! Operands of any strides go to the GEMM kernel as they are: a transposed weight or a permuted
//! head layout costs no copy. The batch is split over threads when it has enough matrices to
//! feed them; otherwise each product uses every thread itself.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

use super::broadcast::{sum_to, sum_to_view};
use crate::gemm::{MatDims, gemm_raw_threads};
use crate::shape::broadcast_shapes;
use crate::{Error, Result, Tensor};

/// Pointers that may cross threads: each batch entry reads shared operands and writes its own
/// disjoint output matrix.
#[derive(Clone, Copy)]
struct Shared {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
}
// SAFETY: see `Shared`: the operands are only read, output blocks are disjoint per task.
unsafe impl Send for Shared {}
// SAFETY: as for Send: shared access only reads the operands, and each task writes its own
// output matrix.
unsafe impl Sync for Shared {}

/// `a @ b` for arrays of rank >= 2 with broadcast batch dimensions. The result is a new
/// contiguous array of shape `batch ++ [m, n]`.
pub fn batched_matmul(a: &ArrayViewD<f32>, b: &ArrayViewD<f32>) -> Result<ArrayD<f32>> {
    let (ra, rb) = (a.ndim(), b.ndim());
    if ra < 2 || rb < 2 {
        return Err(Error::shape(
            "matmul",
            format!(
                "operands need rank >= 2, got {:?} and {:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(Error::shape(
            "matmul",
            format!("inner sizes differ: {:?} @ {:?}", a.shape(), b.shape()),
        ));
    }
    let batch = broadcast_shapes("matmul", &a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    let with = |rows: usize, cols: usize| {
        let mut s = batch.clone();
        s.extend([rows, cols]);
        s
    };
    let a_b = a
        .broadcast(IxDyn(&with(m, k)))
        .expect("batch shape checked");
    let b_b = b
        .broadcast(IxDyn(&with(k, n)))
        .expect("batch shape checked");
    let count: usize = batch.iter().product();
    if count == 0 || m == 0 || n == 0 || k == 0 {
        return Ok(ArrayD::<f32>::zeros(IxDyn(&with(m, n))));
    }
    // Every element is written by the products below (beta = 0 never reads the output).
    let mut out = crate::alloc::uninit_array(&with(m, n));
    let nb = batch.len();
    let (sa, sb) = (a_b.strides().to_vec(), b_b.strides().to_vec());
    let offset = |strides: &[isize], i: usize| -> isize {
        let (mut rem, mut off) = (i, 0isize);
        for d in (0..nb).rev() {
            off += (rem % batch[d]) as isize * strides[d];
            rem /= batch[d];
        }
        off
    };
    let ptrs = Shared {
        a: a_b.as_ptr(),
        b: b_b.as_ptr(),
        c: out.as_mut_ptr().cast::<f32>(),
    };
    let dims = MatDims { m, n, k };
    let run = |i: usize, threads: usize| {
        let p = ptrs;
        // SAFETY: `offset` maps an in-range batch index through the broadcast views' own
        // strides to the start of a valid (m, k) / (k, n) matrix; output block `i` of the
        // contiguous result is written by this call only.
        unsafe {
            gemm_raw_threads(
                dims,
                (p.c.add(i * m * n), n as isize, 1),
                (p.a.offset(offset(&sa, i)), sa[nb], sa[nb + 1]),
                (p.b.offset(offset(&sb, i)), sb[nb], sb[nb + 1]),
                1.0,
                0.0,
                threads,
            );
        }
    };
    let threads = rayon::current_num_threads();
    let small = m.saturating_mul(n).saturating_mul(k) < 1 << 18;
    if count == 1 {
        run(0, threads);
    } else if small || count >= 2 * threads {
        (0..count).into_par_iter().for_each(|i| run(i, 1));
    } else if count >= threads {
        (0..count).for_each(|i| run(i, threads));
    } else {
        // Fewer products than threads: run them side by side, sharing the threads out.
        (0..count)
            .into_par_iter()
            .for_each(|i| run(i, threads / count));
    }
    // SAFETY: every output matrix was written in full above.
    Ok(unsafe { crate::alloc::assume_init(out) })
}

/// Swaps the last two axes of a view (no copy).
fn t_last2<'a>(x: &'a ArrayViewD<'a, f32>) -> ArrayViewD<'a, f32> {
    let r = x.ndim();
    let mut v = x.view();
    v.swap_axes(r - 2, r - 1);
    v
}

impl Tensor {
    /// Matrix product with PyTorch's rules: rank-1 operands are treated as a row (left) or a
    /// column (right) vector and that axis is removed from the result; batch dimensions
    /// broadcast.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        if self.rank() == 0 || other.rank() == 0 {
            return Err(Error::shape(
                "matmul",
                format!(
                    "operands need rank >= 1, got {:?} and {:?}",
                    self.shape(),
                    other.shape()
                ),
            ));
        }
        let a = if self.rank() == 1 {
            self.unsqueeze(0)?
        } else {
            self.clone()
        };
        let b = if other.rank() == 1 {
            other.unsqueeze(1)?
        } else {
            other.clone()
        };
        let mut out = matmul_nd(&a, &b)?;
        if other.rank() == 1 {
            out = out.squeeze(-1)?;
        }
        if self.rank() == 1 {
            out = out.squeeze(-2)?;
        }
        Ok(out)
    }

    /// `self @ weight + bias`, a linear layer's product and bias (`weight` `(k, n)`, `bias`
    /// `(n)`): [`Tensor::matmul`] then [`Tensor::add`], except on a device inside bf16
    /// autocast, where it is one op whose result is stored as bf16, as PyTorch's `F.linear` is
    /// under autocast (the separate add would promote the bf16 product to f32).
    ///
    /// On the CPU, a 2-D `self` and `weight` with a bias of the product's width are one op
    /// whose bias is added in place into the fresh product (no second array, no second graph
    /// node); the result and every gradient have the bits of the two-op form.
    pub fn matmul_add(&self, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
        on_device!(crate::cuda::ops::matmul_add(self, weight, bias));
        // The fused op reads host arrays; device operands outside autocast (which
        // `on_device!` declined above) take the two device ops.
        let on_host = [self, weight, bias].iter().all(|t| t.device().is_cpu());
        let fusable = on_host
            && self.rank() == 2
            && weight.rank() == 2
            && bias.rank() == 1
            && bias.shape()[0] == weight.shape()[1]
            && self.shape()[1] == weight.shape()[0];
        if !fusable {
            return self.matmul(weight)?.add(bias);
        }
        matmul_bias(self, weight, bias)
    }

    /// PyTorch's `F.linear`: `self @ weight^T + bias`, with `weight` `(out, in)` as a Linear
    /// layer stores it and `bias` `(out)`.
    ///
    /// On the CPU, for a 2-D `self`, it is one op: the product reads a contiguous transpose of
    /// the weight made for the call (the `gemm` crate runs 1024 x 1024 x 256 in 2.35 ms on it
    /// against 3.16 ms on the strided view, and the tiled copy takes 0.12 ms per MB), the
    /// bias is added in place, and the backward computes the weight's gradient in the weight's
    /// own layout (`g^T @ self`), so an optimizer reads it contiguously. The result and every
    /// gradient have the bits of `self.matmul_add(&weight.transpose(0, 1)?, bias)`, which is
    /// what it computes elsewhere (device tensors, other ranks).
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let fits = weight.rank() == 2
            && self.rank() >= 1
            && self.shape().last() == Some(&weight.shape()[1])
            && bias.is_none_or(|b| b.shape() == [weight.shape()[0]]);
        if !fits {
            return Err(Error::shape(
                "linear",
                format!(
                    "input {:?} @ weight {:?}^T + bias {:?}: the weight must be (out, in), the \
                     input end in `in` and the bias be (out)",
                    self.shape(),
                    weight.shape(),
                    bias.map(|b| b.shape())
                ),
            ));
        }
        let on_host = std::iter::once(self)
            .chain([weight])
            .chain(bias)
            .all(|t| t.device().is_cpu());
        if on_host && self.rank() == 2 {
            return linear_host(self, weight, bias);
        }
        let weight_t = weight.transpose(0, 1)?;
        match bias {
            Some(b) => self.matmul_add(&weight_t, b),
            None => self.matmul(&weight_t),
        }
    }
}

/// `a @ w + bias` for 2-D `a`, `w` and a bias of `w`'s width, as one op: the product, then the
/// bias added into it in place row by row (`p + b`, the add's own order); the backward runs the
/// products of [`matmul_nd`]'s backward and sums the bias gradient as `add`'s backward does.
fn matmul_bias(a: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let mut out = batched_matmul(&a.view(), &w.view())?;
    let b = bias.data().clone();
    add_bias_rows(&mut out, &b);
    let (ad, wd) = (a.data().clone(), w.data().clone());
    Ok(Tensor::from_op(
        out,
        "matmul_add",
        &[a, w, bias],
        move |g, needs| {
            let gv = g.view();
            let gb = needs[2].then(|| sum_to_view(&gv, b.shape()));
            let ga = if needs[0] {
                Some(batched_matmul(&gv, &t_last2(&wd.view()))?)
            } else {
                None
            };
            let gw = if needs[1] {
                Some(batched_matmul(&t_last2(&ad.view()), &gv)?)
            } else {
                None
            };
            Ok(vec![ga, gw, gb])
        },
    ))
}

/// Adds `bias` into each row of the fresh contiguous product `out` in place (`p + b`, the
/// add's own order), in parallel for large products.
fn add_bias_rows(out: &mut ArrayD<f32>, bias: &crate::tensor::Data) {
    let block = bias.as_standard_layout();
    let block = block.as_slice().expect("standard layout");
    let n = block.len();
    // No bias values (n = 0) means an empty product: nothing to add.
    let Some(rows_per_task) = ROWS_TASK_VALUES.checked_div(n) else {
        return;
    };
    let values = out.as_slice_mut().expect("a fresh product is contiguous");
    let add_rows = |rows: &mut [f32]| {
        for row in rows.chunks_mut(n) {
            for (p, &bv) in row.iter_mut().zip(block) {
                *p += bv;
            }
        }
    };
    if values.len() < crate::parallel::PAR_THRESHOLD {
        add_rows(values);
    } else {
        values
            .par_chunks_mut(rows_per_task.max(1) * n)
            .for_each(add_rows);
    }
}

/// `x @ weight^T (+ bias)` for a 2-D host `x` and a `(out, in)` weight, as one op (see
/// [`Tensor::linear`]).
fn linear_host(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (xd, wd) = (x.data().clone(), weight.data().clone());
    let w = wd
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| Error::shape("linear", e.to_string()))?;
    let (n, k) = w.dim();
    // The weight's transpose `(in, out)`, contiguous, for this product only (a weight in
    // training changes every step, so there is nothing to keep).
    let wt = match w.as_slice() {
        Some(values) => crate::transpose::transposed(values, n, k),
        None => w.t().iter().copied().collect(),
    };
    let wt = ndarray::ArrayView2::from_shape((k, n), &wt)
        .map_err(|e| Error::shape("linear", e.to_string()))?;
    let mut out = batched_matmul(&x.view(), &wt.into_dyn())?;
    let b = bias.map(|b| b.data().clone());
    if let Some(b) = &b {
        add_bias_rows(&mut out, b);
    }
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    Ok(Tensor::from_op(out, "linear", &inputs, move |g, needs| {
        let gv = g.view();
        let gx = if needs[0] {
            Some(batched_matmul(&gv, &wd.view())?)
        } else {
            None
        };
        // `g^T @ x` is the weight's gradient in the weight's own `(out, in)` layout, with the
        // bits of `(x^T @ g)^T`, the transposed-view form's.
        let gw = if needs[1] {
            Some(batched_matmul(&t_last2(&gv), &xd.view())?)
        } else {
            None
        };
        let mut grads = vec![gx, gw];
        if let Some(b) = &b {
            grads.push(needs[2].then(|| sum_to_view(&gv, b.shape())));
        }
        Ok(grads)
    }))
}

/// Values per parallel task of the in-place bias add (whole rows each).
const ROWS_TASK_VALUES: usize = 1 << 14;

fn matmul_nd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    on_device!(crate::cuda::ops::matmul(a, b));
    let out = batched_matmul(&a.view(), &b.view())?;
    let (ad, bd) = (a.data().clone(), b.data().clone());
    Ok(Tensor::from_op(out, "matmul", &[a, b], move |g, needs| {
        let gv = g.view();
        let ga = if needs[0] {
            let bv = bd.view();
            Some(sum_to(batched_matmul(&gv, &t_last2(&bv))?, ad.shape()))
        } else {
            None
        };
        let gb = if needs[1] {
            let av = ad.view();
            Some(sum_to(batched_matmul(&t_last2(&av), &gv)?, bd.shape()))
        } else {
            None
        };
        Ok(vec![ga, gb])
    }))
}
