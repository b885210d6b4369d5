//! Matrix products on array views through the `gemm` crate's kernels.
//!
//! Operands are handed over with their strides, so transposed or sliced views cost no copy.
//! Fused kernels in other crates (FAVOR+, local attention) call these directly on blocks of
//! their own arrays.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewMut2, Axis};
use rayon::prelude::*;

use crate::{Error, Result};

/// How a product may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// One thread (the caller is already parallel, e.g. over heads).
    Single,
    /// All of rayon's threads.
    All,
}

/// `c = beta * c + alpha * a @ b` on views of any strides.
///
/// Shapes: a (m, k), b (k, n), c (m, n). With `beta == 0` the old contents of `c` are ignored
/// (they may be uninitialized garbage, NaN included).
pub fn gemm_into(
    c: &mut ArrayViewMut2<f32>,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    alpha: f32,
    beta: f32,
    threads: Threads,
) -> Result<()> {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    if k != k2 || c.dim() != (m, n) {
        return Err(Error::shape(
            "gemm",
            format!(
                "a {:?} @ b {:?} into c {:?}",
                a.shape(),
                b.shape(),
                c.shape()
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if beta == 0.0 {
            c.fill(0.0);
        } else {
            c.mapv_inplace(|x| x * beta);
        }
        return Ok(());
    }
    let [a_rs, a_cs] = [a.strides()[0], a.strides()[1]];
    let [b_rs, b_cs] = [b.strides()[0], b.strides()[1]];
    let [c_rs, c_cs] = [c.strides()[0], c.strides()[1]];
    // SAFETY: the dimensions were checked above; the pointers and strides come from live
    // ndarray views of exactly these shapes, and `c` is borrowed mutably, so it aliases
    // neither `a` nor `b`.
    unsafe {
        gemm_raw(
            MatDims { m, n, k },
            (c.as_mut_ptr(), c_rs, c_cs),
            (a.as_ptr(), a_rs, a_cs),
            (b.as_ptr(), b_rs, b_cs),
            alpha,
            beta,
            threads,
        );
    }
    Ok(())
}

/// Sizes of a product: (m, k) @ (k, n).
#[derive(Clone, Copy, Debug)]
pub struct MatDims {
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The contracted size.
    pub k: usize,
}

/// `c = beta * c + alpha * a @ b` on raw strided matrices: each operand is
/// (pointer, row stride, column stride) in elements.
///
/// # Safety
/// Every pointer must address a matrix of the stated size and strides that stays valid for
/// the call; `c` must not overlap `a` or `b`, and no other thread may access `c` meanwhile.
/// With `beta == 0`, `c` may hold uninitialized values.
pub unsafe fn gemm_raw(
    dims: MatDims,
    c: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    threads: Threads,
) {
    let threads = match threads {
        Threads::All => rayon::current_num_threads(),
        Threads::Single => 1,
    };
    // SAFETY: forwarded from the caller's contract.
    unsafe { gemm_raw_threads(dims, c, a, b, alpha, beta, threads) }
}

/// [`gemm_raw`] on up to `threads` of rayon's threads (products under 64^3 use one).
///
/// # Safety
/// As for [`gemm_raw`].
pub(crate) unsafe fn gemm_raw_threads(
    dims: MatDims,
    c: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    // The op timer's GEMM row: counted and timed only while profiling (one relaxed load).
    let run = || {
        // SAFETY: forwarded from the caller's contract.
        unsafe { gemm_unprofiled(dims, c, a, b, alpha, beta, threads) }
    };
    crate::profile::gemm(dims.m, dims.n, dims.k, run)
}

/// [`gemm_raw_threads`] without the op timer.
///
/// # Safety
/// As for [`gemm_raw`].
unsafe fn gemm_unprofiled(
    dims: MatDims,
    c: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    threads: usize,
) {
    let MatDims { m, n, k } = dims;
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    if m <= SMALL_M && unsafe { small_m_product(dims, c, a, b, alpha, beta, threads) } {
        return;
    }
    let parallelism = if threads > 1 && m.saturating_mul(n).saturating_mul(k) >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract. The `gemm` crate computes
    // dst := alpha_g * dst + beta_g * lhs @ rhs, so our (alpha, beta) swap places.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0,
            c.2,
            c.1,
            beta != 0.0,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Row counts up to which products go to [`small_m_product`]: a few rows (one token per
/// sequence while generating) against a weight matrix, where GEMM packing costs more than the
/// product.
const SMALL_M: usize = 8;

/// `c = beta c + alpha a @ b` for a few rows of `a`, as dot products (columns of `b` contiguous)
/// or row updates (rows of `b` contiguous), split over `threads` by output columns when `b` is
/// large (the product is bound by reading `b`, so two cores read it twice as fast). Returns
/// false, doing nothing, for other layouts.
///
/// # Safety
/// As for [`gemm_raw`].
unsafe fn small_m_product(
    dims: MatDims,
    c: (*mut f32, isize, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    alpha: f32,
    beta: f32,
    threads: usize,
) -> bool {
    let MatDims { m, n, k } = dims;
    if a.2 != 1 || c.2 != 1 || !(b.1 == 1 || b.2 == 1) {
        return false;
    }
    /// Raw parts that may cross threads: each task writes its own columns of `c`.
    #[derive(Clone, Copy)]
    struct Parts {
        c: *mut f32,
        a: *const f32,
        b: *const f32,
    }
    // SAFETY: see `Parts`; `a` and `b` are only read.
    unsafe impl Send for Parts {}
    // SAFETY: as for Send: `a` and `b` are only read and each task writes its own columns.
    unsafe impl Sync for Parts {}
    let parts = Parts {
        c: c.0,
        a: a.0,
        b: b.0,
    };
    let columns = |j0: usize, j1: usize| {
        let p = parts;
        for i in 0..m as isize {
            // SAFETY: row i of a (k contiguous values) and columns j0..j1 of row i of c lie
            // inside the matrices the caller vouched for; c overlaps neither a nor b, and no
            // other task touches these columns of c.
            let (ar, cr) = unsafe {
                (
                    std::slice::from_raw_parts(p.a.offset(i * a.1), k),
                    std::slice::from_raw_parts_mut(p.c.offset(i * c.1 + j0 as isize), j1 - j0),
                )
            };
            if beta == 0.0 {
                cr.fill(0.0);
            } else if beta != 1.0 {
                cr.iter_mut().for_each(|x| *x *= beta);
            }
            if b.1 == 1 {
                // column j of b is contiguous: c_j += alpha * dot(a_i, b_:j)
                for (j, cj) in (j0..j1).zip(cr.iter_mut()) {
                    // SAFETY: column j of b holds k contiguous values.
                    let col =
                        unsafe { std::slice::from_raw_parts(p.b.offset(j as isize * b.2), k) };
                    *cj += alpha * crate::fast_math::dot(ar, col);
                }
            } else {
                // row l of b is contiguous: c_i += alpha * a_il * b_l:
                for (l, &al) in ar.iter().enumerate() {
                    // SAFETY: columns j0..j1 of row l of b are contiguous values.
                    let row = unsafe {
                        std::slice::from_raw_parts(
                            p.b.offset(l as isize * b.1 + j0 as isize),
                            j1 - j0,
                        )
                    };
                    crate::fast_math::axpy(cr, alpha * al, row);
                }
            }
        }
    };
    let tasks = if n * k >= 1 << 18 {
        threads.min(n / 64).max(1)
    } else {
        1
    };
    if tasks > 1 {
        let per = n.div_ceil(tasks);
        (0..tasks)
            .into_par_iter()
            .for_each(|t| columns(t * per, ((t + 1) * per).min(n)));
    } else {
        columns(0, n);
    }
    true
}

/// `a @ b` into a new array.
pub fn matmul2(a: &ArrayView2<f32>, b: &ArrayView2<f32>, threads: Threads) -> Result<Array2<f32>> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    if k != k2 {
        return Err(Error::shape(
            "gemm",
            format!("a {:?} @ b {:?}", a.shape(), b.shape()),
        ));
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(Array2::zeros((m, n)));
    }
    let mut c = crate::alloc::uninit_array(&[m, n]);
    // SAFETY: `c` is a fresh contiguous (m, n) buffer, written in full (beta = 0 never reads
    // it); `a` and `b` are live views of the checked sizes.
    unsafe {
        gemm_raw(
            MatDims { m, n, k },
            (c.as_mut_ptr().cast::<f32>(), n as isize, 1),
            (a.as_ptr(), a.strides()[0], a.strides()[1]),
            (b.as_ptr(), b.strides()[0], b.strides()[1]),
            1.0,
            0.0,
            threads,
        );
        let c = crate::alloc::assume_init(c);
        Ok(c.into_dimensionality().expect("rank 2"))
    }
}

/// Batched `a[i] @ b[i]`, parallel over the batch when it is large enough to feed every thread.
pub fn matmul3(a: &ArrayView3<f32>, b: &ArrayView3<f32>) -> Result<Array3<f32>> {
    let (batch, m, k) = a.dim();
    let (batch2, k2, n) = b.dim();
    if batch != batch2 || k != k2 {
        return Err(Error::shape(
            "matmul3",
            format!("a {:?} @ b {:?}", a.shape(), b.shape()),
        ));
    }
    let mut c = Array3::<f32>::zeros((batch, m, n));
    let per_batch_parallel = batch >= rayon::current_num_threads();
    if per_batch_parallel {
        c.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .try_for_each(|(i, mut ci)| {
                gemm_into(
                    &mut ci,
                    &a.index_axis(Axis(0), i),
                    &b.index_axis(Axis(0), i),
                    1.0,
                    0.0,
                    Threads::Single,
                )
            })?;
    } else {
        for (i, mut ci) in c.axis_iter_mut(Axis(0)).enumerate() {
            gemm_into(
                &mut ci,
                &a.index_axis(Axis(0), i),
                &b.index_axis(Axis(0), i),
                1.0,
                0.0,
                Threads::All,
            )?;
        }
    }
    Ok(c)
}
