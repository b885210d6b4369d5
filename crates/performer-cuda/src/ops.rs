//! Device operations, one per kernel family: the FAVOR+ softmax feature map and causal and
//! non-causal linear attention, each with its backward. [`crate::CudaFastAttention`] composes
//! them; they are public so that benchmarks and other crates can time or reuse one stage.
//!
//! All buffers are row-major and contiguous with batch and heads flattened: features
//! `(bh, n, m)`, values and outputs `(bh, n, e)`, projection `(m, d)`.

use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::device::CudaDevice;
use crate::error::{DriverContext, Error, Result};
use crate::launch_config::{THREADS, grid_1d, grid_3d};
use crate::shape::expect_len;

/// Positions per chunk of the causal kernels (CHUNK in the CUDA sources).
pub const CHUNK: usize = 64;
/// Output tile edge of the tiled kernels (TILE in the CUDA sources).
const TILE: usize = 64;
/// Epsilon added to each element of the key cumsum in the causal normalizer (performer-pytorch).
pub const CAUSAL_EPS: f32 = 1e-6;
/// Epsilon added to every softmax feature (performer-pytorch's `softmax_kernel`).
pub const FEATURE_EPS: f32 = 1e-4;

/// Sizes of one linear-attention problem on features: `bh` problems of `n` positions,
/// `m` features and value width `e`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// batch * heads.
    pub bh: usize,
    /// Positions.
    pub n: usize,
    /// Features.
    pub m: usize,
    /// Value (and output) width.
    pub e: usize,
}

impl LinearDims {
    fn chunks(&self) -> usize {
        self.n.div_ceil(CHUNK)
    }
    fn describe(&self) -> String {
        format!("bh={} n={} m={} e={}", self.bh, self.n, self.m, self.e)
    }
    fn check(&self, op: &'static str, bufs: &[(&str, usize, usize)]) -> Result<()> {
        let s = self.describe();
        for &(what, len, expected) in bufs {
            expect_len(op, what, len, expected, &s)?;
        }
        Ok(())
    }
}

/// Arithmetic of the causal chunkwise kernels' inner products.
///
/// Only the causal path has a choice; non-causal attention runs cuBLAS SGEMM in f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// IEEE f32 multiply-adds on the CUDA cores (max relative error about 1e-6 against the f64
    /// reference). The default.
    #[default]
    F32,
    /// TF32 tensor cores (`mma.sync` m16n8k8, sm_80 and newer): the operands of the chunk
    /// products are rounded to a 10-bit mantissa, accumulation stays f32. Faster on the large
    /// products, max relative error a few 1e-4 (kept under 1e-3, see
    /// `tests/tf32_error_model.rs`).
    Tf32,
}

impl Precision {
    /// The kernel for `f32_name` in this precision (the TF32 kernels carry a `_tf32` suffix).
    /// A name without a TF32 variant maps to a name no source defines, so the kernel lookup
    /// fails instead of silently running the f32 kernel.
    fn kernel(self, f32_name: &'static str) -> &'static str {
        match self {
            Precision::F32 => f32_name,
            Precision::Tf32 => TF32_KERNELS
                .iter()
                .find(|(f, _)| *f == f32_name)
                .map_or("(no TF32 variant)", |(_, t)| t),
        }
    }

    /// Fails unless `dev` can run this precision: TF32 `mma.sync` needs compute capability 8.0.
    pub fn check_device(self, op: &'static str, dev: &CudaDevice) -> Result<()> {
        if self == Precision::F32 {
            return Ok(());
        }
        let major = arch_major(dev.arch());
        if major.is_some_and(|m| m >= 8) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op,
                detail: format!(
                    "TF32 tensor cores need sm_80 or newer; the device is {}",
                    dev.arch()
                ),
            })
        }
    }
}

/// The causal kernels that have a TF32 variant in `kernels/causal_tf32.cu`: (f32, TF32) names.
const TF32_KERNELS: &[(&str, &str)] = &[
    ("chunk_state_fwd", "chunk_state_fwd_tf32"),
    ("chunk_state_rev", "chunk_state_rev_tf32"),
    ("chunk_output_fwd", "chunk_output_fwd_tf32"),
    ("chunk_output_rev", "chunk_output_rev_tf32"),
    ("chunk_grad_feat_fwd", "chunk_grad_feat_fwd_tf32"),
    ("chunk_grad_feat_rev", "chunk_grad_feat_rev_tf32"),
];

/// The major compute capability of an arch name like `sm_90` or `sm_100`.
fn arch_major(arch: &str) -> Option<u32> {
    let digits = arch.strip_prefix("sm_")?;
    let digits: String = digits.chars().take_while(char::is_ascii_digit).collect();
    // The last digit is the minor version.
    digits.get(..digits.len().checked_sub(1)?)?.parse().ok()
}

/// Which side of attention a feature map is for: the stabiliser differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Queries: the max is taken per position over the features.
    Query,
    /// Keys: the max is taken over all positions and features of each (batch, head).
    Key,
}

/// The FAVOR+ softmax feature map of `x` `(bh, n, d)` under `projection` `(m, d)`:
/// `m^-0.5 * (exp(dn x.P - dn^2 |x|^2 / 2 - stab) + 1e-4)` with `dn = d^-0.25`, `(bh, n, m)`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_features(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    projection: &CudaSlice<f32>,
    bh: usize,
    n: usize,
    d: usize,
    m: usize,
    kind: FeatureKind,
) -> Result<CudaSlice<f32>> {
    const OP: &str = "softmax_features";
    let dims = format!("bh={bh} n={n} d={d} m={m}");
    expect_len(OP, "x", x.len(), bh * n * d, &dims)?;
    expect_len(OP, "projection", projection.len(), m * d, &dims)?;
    let stream = dev.stream();
    let per_row: i32 = matches!(kind, FeatureKind::Query) as i32;
    let stab_len = if per_row != 0 { bh * n } else { bh };
    let mut feat = dev.scratch(bh * n * m)?;
    let mut diag = dev.scratch(bh * n)?;
    let mut stab = dev.scratch(stab_len)?;
    let (ni, mi, di) = (n as i32, m as i32, d as i32);
    let dn = (d as f32).powf(-0.25);
    let ratio = (m as f32).powf(-0.5);
    let total = (bh * n * m) as i64;
    // The atomic max in favor_project starts from -inf, its identity.
    dev.fill(OP, &mut stab, f32::NEG_INFINITY)?;
    // SAFETY: the arguments are favor_project's `(x, proj, dd, diag, stab, per_row, n, m, d, dn)`
    // and favor_exp's `(feat, diag, stab, per_row, n, m, ratio, eps, total)`, in order and of those
    // types; x and the projection were checked to hold bh*n*d and m*d values, feat, diag and stab
    // were allocated at bh*n*m, bh*n and one stabilizer per row or per head, which is all the
    // kernels index for this grid (tiles past n or m are masked inside); the launch is queued on
    // this device's stream, the borrowed buffers outlive the call and every later use of them is
    // ordered after it on the same stream.
    unsafe {
        stream
            .launch_builder(dev.kernel("favor_project")?)
            .arg(x)
            .arg(projection)
            .arg(&mut feat)
            .arg(&mut diag)
            .arg(&mut stab)
            .arg(&per_row)
            .arg(&ni)
            .arg(&mi)
            .arg(&di)
            .arg(&dn)
            .launch(grid_3d(n.div_ceil(TILE), m.div_ceil(TILE), bh))
            .op(OP)?;
        stream
            .launch_builder(dev.kernel("favor_exp")?)
            .arg(&mut feat)
            .arg(&diag)
            .arg(&stab)
            .arg(&per_row)
            .arg(&ni)
            .arg(&mi)
            .arg(&ratio)
            .arg(&FEATURE_EPS)
            .arg(&total)
            .launch(grid_1d(bh * n * m, THREADS))
            .op(OP)?;
    }
    Ok(feat)
}

/// Backward of [`softmax_features`] for either kind (the stabiliser is a constant, as in the
/// reference's `.detach()`): the gradient with respect to `x`, `(bh, n, d)`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_features_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    projection: &CudaSlice<f32>,
    features: &CudaSlice<f32>,
    grad_features: &CudaSlice<f32>,
    bh: usize,
    n: usize,
    d: usize,
    m: usize,
) -> Result<CudaSlice<f32>> {
    const OP: &str = "softmax_features_backward";
    let dims = format!("bh={bh} n={n} d={d} m={m}");
    expect_len(OP, "x", x.len(), bh * n * d, &dims)?;
    expect_len(OP, "projection", projection.len(), m * d, &dims)?;
    expect_len(OP, "features", features.len(), bh * n * m, &dims)?;
    expect_len(OP, "grad_features", grad_features.len(), bh * n * m, &dims)?;
    let mut gx = dev.scratch(bh * n * d)?;
    let (ni, mi, di) = (n as i32, m as i32, d as i32);
    let dn = (d as f32).powf(-0.25);
    let ratio_eps = (m as f32).powf(-0.5) * FEATURE_EPS;
    // SAFETY: favor_backward's `(x, proj, feat, gfeat, gx, n, m, d, dn, ratio_eps)`, in order and
    // of those types; the four inputs were checked to hold bh*n*d, m*d, bh*n*m and bh*n*m values
    // and gx was allocated at bh*n*d, the extent the (n/TILE, d/TILE, bh) grid indexes; the launch
    // is queued on this device's stream, the borrowed buffers outlive the call and every later use
    // of them is ordered after it on the same stream.
    unsafe {
        dev.stream()
            .launch_builder(dev.kernel("favor_backward")?)
            .arg(x)
            .arg(projection)
            .arg(features)
            .arg(grad_features)
            .arg(&mut gx)
            .arg(&ni)
            .arg(&mi)
            .arg(&di)
            .arg(&dn)
            .arg(&ratio_eps)
            .launch(grid_3d(n.div_ceil(TILE), d.div_ceil(TILE), bh))
            .op(OP)?;
    }
    Ok(gx)
}

/// Runs the chunk-state scan: `S` `(bh, nt, m, e)` and `sc` `(bh, nt, m)` hold, for every
/// chunk, the sum of `a_j^T [b_j | col_j]` over the chunks before it (`reverse`: after it).
#[allow(clippy::too_many_arguments)]
fn chunk_states(
    dev: &CudaDevice,
    op: &'static str,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    col: Option<&CudaSlice<f32>>,
    s: &mut CudaSlice<f32>,
    sc: &mut CudaSlice<f32>,
    dims: LinearDims,
    reverse: bool,
    precision: Precision,
) -> Result<()> {
    let (ni, mi, ei) = (dims.n as i32, dims.m as i32, dims.e as i32);
    let null: u64 = 0;
    let name = precision.kernel(if reverse {
        "chunk_state_rev"
    } else {
        "chunk_state_fwd"
    });
    let stream = dev.stream();
    let mut builder = stream.launch_builder(dev.kernel(name)?);
    builder.arg(a).arg(b);
    match col {
        Some(c) => builder.arg(c),
        None => builder.arg(&null),
    };
    builder.arg(s).arg(sc).arg(&ni).arg(&mi).arg(&ei);
    let cfg = grid_3d(dims.m.div_ceil(32), (dims.e + 1).div_ceil(32), dims.bh);
    // SAFETY: chunk_state_fwd/_rev (f32 or TF32) take `(A, B, bcol, S, sc, n, m, e)`, pushed above
    // in that order and of those types (a null pointer for an absent bcol, which the kernels test);
    // the callers check A, B, bcol against bh*n*m, bh*n*e, bh*n and allocate S, sc at bh*nt*m*e and
    // bh*nt*m, the extent of the (m/32, (e+1)/32, bh) grid; the launch is queued on this device's
    // stream, the borrowed buffers outlive the call and every later use of them is ordered after it
    // on the same stream.
    unsafe { builder.launch(cfg) }.op(op)?;
    Ok(())
}

/// Causal linear attention on features, chunkwise: returns `out` `(bh, n, e)` and the
/// normalizer `den` `(bh, n)` that the backward needs.
///
/// `out_i = sum_{j<=i} (qf_i.kf_j) v_j / (qf_i . (sum_{j<=i} kf_j + 1e-6))`.
/// In f32; [`causal_linear_attention_with`] chooses the precision.
pub fn causal_linear_attention(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: LinearDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    causal_linear_attention_with(dev, qf, kf, v, dims, Precision::F32)
}

/// [`causal_linear_attention`] with the chunk products in `precision`
/// ([`Precision::Tf32`] fails on devices older than sm_80).
pub fn causal_linear_attention_with(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: LinearDims,
    precision: Precision,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    const OP: &str = "causal_linear_attention";
    precision.check_device(OP, dev)?;
    let LinearDims { bh, n, m, e } = dims;
    dims.check(
        OP,
        &[
            ("qf", qf.len(), bh * n * m),
            ("kf", kf.len(), bh * n * m),
            ("v", v.len(), bh * n * e),
        ],
    )?;
    let nt = dims.chunks();
    let mut h = dev.scratch(bh * nt * m * e)?;
    let mut z = dev.scratch(bh * nt * m)?;
    chunk_states(dev, OP, kf, v, None, &mut h, &mut z, dims, false, precision)?;
    let mut out = dev.scratch(bh * n * e)?;
    let mut den = dev.scratch(bh * n)?;
    let (ni, mi, ei) = (n as i32, m as i32, e as i32);
    // SAFETY: chunk_output_fwd's `(qf, kf, v, h, z, out, den, n, m, e, eps)`, in order and of those
    // types; qf, kf, v were checked by `dims.check`, h, z are the chunk states allocated above at
    // bh*nt*m*e and bh*nt*m, out and den are allocated at bh*n*e and bh*n, what the (nt, e/TILE,
    // bh) grid writes; the launch is queued on this device's stream, the borrowed buffers outlive
    // the call and every later use of them is ordered after it on the same stream.
    unsafe {
        dev.stream()
            .launch_builder(dev.kernel(precision.kernel("chunk_output_fwd"))?)
            .arg(qf)
            .arg(kf)
            .arg(v)
            .arg(&h)
            .arg(&z)
            .arg(&mut out)
            .arg(&mut den)
            .arg(&ni)
            .arg(&mi)
            .arg(&ei)
            .arg(&CAUSAL_EPS)
            .launch(grid_3d(nt, e.div_ceil(TILE), bh))
            .op(OP)?;
    }
    Ok((out, den))
}

/// `dnum = g / den` and `dden = -(g . out) / den` per position, written with strides.
#[allow(clippy::too_many_arguments)]
fn grad_prep(
    dev: &CudaDevice,
    op: &'static str,
    g: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    den: &cudarc::driver::CudaView<'_, f32>,
    den_stride: i64,
    dnum: &cudarc::driver::CudaView<'_, f32>,
    dnum_ld: i64,
    dden: &cudarc::driver::CudaView<'_, f32>,
    dden_stride: i64,
    rows: usize,
    e: usize,
) -> Result<()> {
    let rows_i = rows as i64;
    let ei = e as i32;
    // One warp per row; the kernel writes through dnum/dden although they are passed as
    // shared views, because in the non-causal path both live in one augmented buffer.
    let cfg = grid_1d(rows * 32, THREADS);
    // SAFETY: attention_grad_prep's `(g, out, den, den_stride, dnum, dnum_ld, dden, dden_stride,
    // rows, e)`, in order and of those types; the callers size g, out at rows*e, den, dnum, dden
    // for `rows` rows at the strides given (dnum and dden may share one augmented buffer: the
    // kernel writes disjoint columns of it, one warp per row); the launch is queued on this
    // device's stream, the borrowed buffers outlive the call and every later use of them is ordered
    // after it on the same stream.
    unsafe {
        dev.stream()
            .launch_builder(dev.kernel("attention_grad_prep")?)
            .arg(g)
            .arg(out)
            .arg(den)
            .arg(&den_stride)
            .arg(dnum)
            .arg(&dnum_ld)
            .arg(dden)
            .arg(&dden_stride)
            .arg(&rows_i)
            .arg(&ei)
            .launch(cfg)
            .op(op)?;
    }
    Ok(())
}

/// Backward of [`causal_linear_attention`]: gradients of `qf`, `kf` and `v` given the
/// forward's `out` and `den` and the output gradient `grad_out`. In f32;
/// [`causal_linear_attention_backward_with`] chooses the precision.
#[allow(clippy::too_many_arguments)]
pub fn causal_linear_attention_backward(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    den: &CudaSlice<f32>,
    grad_out: &CudaSlice<f32>,
    dims: LinearDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    causal_linear_attention_backward_with(dev, qf, kf, v, out, den, grad_out, dims, Precision::F32)
}

/// [`causal_linear_attention_backward`] with the chunk products in `precision`
/// ([`Precision::Tf32`] fails on devices older than sm_80). `out` and `den` may come from a
/// forward in either precision.
#[allow(clippy::too_many_arguments)]
pub fn causal_linear_attention_backward_with(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    den: &CudaSlice<f32>,
    grad_out: &CudaSlice<f32>,
    dims: LinearDims,
    precision: Precision,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    const OP: &str = "causal_linear_attention_backward";
    precision.check_device(OP, dev)?;
    let LinearDims { bh, n, m, e } = dims;
    dims.check(
        OP,
        &[
            ("qf", qf.len(), bh * n * m),
            ("kf", kf.len(), bh * n * m),
            ("v", v.len(), bh * n * e),
            ("out", out.len(), bh * n * e),
            ("den", den.len(), bh * n),
            ("grad_out", grad_out.len(), bh * n * e),
        ],
    )?;
    let nt = dims.chunks();
    let (ni, mi, ei) = (n as i32, m as i32, e as i32);
    let dnum = dev.scratch(bh * n * e)?;
    let dden = dev.scratch(bh * n)?;
    grad_prep(
        dev,
        OP,
        grad_out,
        out,
        &den.as_view(),
        1,
        &dnum.as_view(),
        e as i64,
        &dden.as_view(),
        1,
        bh * n,
        e,
    )?;

    // Forward states again (recomputed rather than kept: they are nt*m*e per head).
    let mut states = dev.scratch(bh * nt * m * e)?;
    let mut col = dev.scratch(bh * nt * m)?;
    chunk_states(
        dev,
        OP,
        kf,
        v,
        None,
        &mut states,
        &mut col,
        dims,
        false,
        precision,
    )?;
    let mut dqf = dev.scratch(bh * n * m)?;
    let stream = dev.stream();
    // SAFETY: the arguments follow chunk_output_rev's and chunk_grad_feat_*'s signatures in order
    // and type; every input was checked by `dims.check` or computed above at its (bh, n or nt, m,
    // e) extent, and each output is allocated at the extent its grid writes; the launch is queued
    // on this device's stream, the borrowed buffers outlive the call and every later use of them is
    // ordered after it on the same stream.
    unsafe {
        stream
            .launch_builder(dev.kernel(precision.kernel("chunk_grad_feat_fwd"))?)
            .arg(&dnum)
            .arg(&dden)
            .arg(v)
            .arg(kf)
            .arg(&states)
            .arg(&col)
            .arg(&CAUSAL_EPS)
            .arg(&mut dqf)
            .arg(&ni)
            .arg(&mi)
            .arg(&ei)
            .launch(grid_3d(nt, m.div_ceil(TILE), bh))
            .op(OP)?;
    }

    // Reverse states U, u into the same buffers.
    chunk_states(
        dev,
        OP,
        qf,
        &dnum,
        Some(&dden),
        &mut states,
        &mut col,
        dims,
        true,
        precision,
    )?;
    let mut dkf = dev.scratch(bh * n * m)?;
    let mut dv = dev.scratch(bh * n * e)?;
    // SAFETY: chunk_grad_feat_rev's and chunk_output_rev's arguments in order and type; inputs
    // checked by `dims.check` or computed above at their (bh, n or nt, m, e) extents, outputs
    // allocated at the extents their grids write; the launch is queued on this device's stream, the
    // borrowed buffers outlive the call and every later use of them is ordered after it on the same
    // stream.
    unsafe {
        stream
            .launch_builder(dev.kernel(precision.kernel("chunk_grad_feat_rev"))?)
            .arg(v)
            .arg(&dnum)
            .arg(&dden)
            .arg(qf)
            .arg(&states)
            .arg(&col)
            .arg(&mut dkf)
            .arg(&ni)
            .arg(&mi)
            .arg(&ei)
            .launch(grid_3d(nt, m.div_ceil(TILE), bh))
            .op(OP)?;
        stream
            .launch_builder(dev.kernel(precision.kernel("chunk_output_rev"))?)
            .arg(kf)
            .arg(qf)
            .arg(&dnum)
            .arg(&states)
            .arg(&mut dv)
            .arg(&ni)
            .arg(&mi)
            .arg(&ei)
            .launch(grid_3d(nt, e.div_ceil(TILE), bh))
            .op(OP)?;
    }
    Ok((dqf, dkf, dv))
}

/// What non-causal attention keeps for its backward: the augmented context
/// `[kf^T v | sum_j kf_j]` `(bh, m, e+1)` and `[num | den]` `(bh, n, e+1)`.
pub struct NonCausalSaved {
    /// `(bh, m, e+1)`.
    pub context: CudaSlice<f32>,
    /// `(bh, n, e+1)`; the last column is the normalizer.
    pub numerator: CudaSlice<f32>,
}

/// Row-major strided-batched GEMM `C = op(A) op(B)` (`C` is `rows x cols`, inner size `inner`)
/// through column-major cuBLAS: a row-major matrix is its transpose in column-major, so
/// `C^T = op(B)^T op(A)^T` is issued with the operands swapped and the same op flags.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    dev: &CudaDevice,
    op: &'static str,
    trans_a: bool,
    trans_b: bool,
    rows: usize,
    cols: usize,
    inner: usize,
    a: &CudaSlice<f32>,
    lda: usize,
    stride_a: usize,
    b: &CudaSlice<f32>,
    ldb: usize,
    stride_b: usize,
    c: &mut CudaSlice<f32>,
    ldc: usize,
    stride_c: usize,
    batch: usize,
) -> Result<()> {
    let blas = dev.blas(op)?;
    let t = |x: bool| {
        if x {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: t(trans_b),
            transb: t(trans_a),
            m: cols as i32,
            n: rows as i32,
            k: inner as i32,
            alpha: 1.0f32,
            lda: ldb as i32,
            ldb: lda as i32,
            beta: 0.0f32,
            ldc: ldc as i32,
        },
        batch_size: batch as i32,
        stride_a: stride_b as i64,
        stride_b: stride_a as i64,
        stride_c: stride_c as i64,
    };
    // SAFETY: `cfg` is the row-major problem restated for column-major cuBLAS (operands swapped, the
    // same op flags); its two callers, the non-causal forward and backward, pass `qf`, `kf`, `v`
    // checked by `dims.check` and outputs allocated at bh*m*(e+1) and bh*n*(e+1), which are
    // `batch` = bh matrices of exactly the shapes, leading dimensions and strides given here, so
    // cuBLAS stays inside the three buffers; it runs on this device's stream, in order with the
    // work that produced its inputs and the work that reads `c`.
    unsafe { blas.gemm_strided_batched(cfg, b, a, c) }.op(op)
}

fn augment_ones(
    dev: &CudaDevice,
    op: &'static str,
    v: &CudaSlice<f32>,
    dims: LinearDims,
) -> Result<CudaSlice<f32>> {
    let rows = dims.bh * dims.n;
    let mut vaug = dev.scratch(rows * (dims.e + 1))?;
    let rows_i = rows as i64;
    let ei = dims.e as i32;
    // SAFETY: augment_ones' `(v, vaug, rows, e)` or normalize_rows' `(num_aug, out, rows, e)` in
    // order and type; v holds rows*e values (checked), vaug/num_aug rows*(e+1), out rows*e, the
    // totals the grid-stride loops stop at; the launch is queued on this device's stream, the
    // borrowed buffers outlive the call and every later use of them is ordered after it on the same
    // stream.
    unsafe {
        dev.stream()
            .launch_builder(dev.kernel("augment_ones")?)
            .arg(v)
            .arg(&mut vaug)
            .arg(&rows_i)
            .arg(&ei)
            .launch(grid_1d(rows * (dims.e + 1), THREADS))
            .op(op)?;
    }
    Ok(vaug)
}

/// Non-causal linear attention on features (performer-pytorch `linear_attention`):
/// `out = D^-1 qf (kf^T v)`, `D_i = qf_i . sum_j kf_j`; two cuBLAS batched GEMMs.
pub fn linear_attention(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    dims: LinearDims,
) -> Result<(CudaSlice<f32>, NonCausalSaved)> {
    const OP: &str = "linear_attention";
    let LinearDims { bh, n, m, e } = dims;
    dims.check(
        OP,
        &[
            ("qf", qf.len(), bh * n * m),
            ("kf", kf.len(), bh * n * m),
            ("v", v.len(), bh * n * e),
        ],
    )?;
    let ea = e + 1;
    let vaug = augment_ones(dev, OP, v, dims)?;
    let mut context = dev.scratch(bh * m * ea)?;
    gemm_rm(
        dev,
        OP,
        true,
        false,
        m,
        ea,
        n,
        kf,
        m,
        n * m,
        &vaug,
        ea,
        n * ea,
        &mut context,
        ea,
        m * ea,
        bh,
    )?;
    let mut numerator = dev.scratch(bh * n * ea)?;
    gemm_rm(
        dev,
        OP,
        false,
        false,
        n,
        ea,
        m,
        qf,
        m,
        n * m,
        &context,
        ea,
        m * ea,
        &mut numerator,
        ea,
        n * ea,
        bh,
    )?;
    let mut out = dev.scratch(bh * n * e)?;
    let rows_i = (bh * n) as i64;
    let ei = e as i32;
    // SAFETY: the kernel's arguments in its signature's order and types; the buffers hold the
    // rows*e and rows*(e+1) values its grid-stride loop stops at (checked or allocated above); the
    // launch is queued on this device's stream, the borrowed buffers outlive the call and every
    // later use of them is ordered after it on the same stream.
    unsafe {
        dev.stream()
            .launch_builder(dev.kernel("normalize_rows")?)
            .arg(&numerator)
            .arg(&mut out)
            .arg(&rows_i)
            .arg(&ei)
            .launch(grid_1d(bh * n * e, THREADS))
            .op(OP)?;
    }
    Ok((out, NonCausalSaved { context, numerator }))
}

/// Backward of [`linear_attention`]: gradients of `qf`, `kf` and `v`.
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_backward(
    dev: &CudaDevice,
    qf: &CudaSlice<f32>,
    kf: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    saved: &NonCausalSaved,
    grad_out: &CudaSlice<f32>,
    dims: LinearDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    const OP: &str = "linear_attention_backward";
    let LinearDims { bh, n, m, e } = dims;
    let ea = e + 1;
    dims.check(
        OP,
        &[
            ("qf", qf.len(), bh * n * m),
            ("kf", kf.len(), bh * n * m),
            ("v", v.len(), bh * n * e),
            ("out", out.len(), bh * n * e),
            ("context", saved.context.len(), bh * m * ea),
            ("numerator", saved.numerator.len(), bh * n * ea),
            ("grad_out", grad_out.len(), bh * n * e),
        ],
    )?;
    // [dnum | dden] in one (e+1)-column buffer, so each gradient is a single GEMM.
    let gaug = dev.scratch(bh * n * ea)?;
    grad_prep(
        dev,
        OP,
        grad_out,
        out,
        &saved.numerator.slice(e..),
        ea as i64,
        &gaug.as_view(),
        ea as i64,
        &gaug.slice(e..),
        ea as i64,
        bh * n,
        e,
    )?;
    let mut dqf = dev.scratch(bh * n * m)?;
    gemm_rm(
        dev,
        OP,
        false,
        true,
        n,
        m,
        ea,
        &gaug,
        ea,
        n * ea,
        &saved.context,
        ea,
        m * ea,
        &mut dqf,
        m,
        n * m,
        bh,
    )?;
    let mut dctx = dev.scratch(bh * m * ea)?;
    gemm_rm(
        dev,
        OP,
        true,
        false,
        m,
        ea,
        n,
        qf,
        m,
        n * m,
        &gaug,
        ea,
        n * ea,
        &mut dctx,
        ea,
        m * ea,
        bh,
    )?;
    let vaug = augment_ones(dev, OP, v, dims)?;
    let mut dkf = dev.scratch(bh * n * m)?;
    gemm_rm(
        dev,
        OP,
        false,
        true,
        n,
        m,
        ea,
        &vaug,
        ea,
        n * ea,
        &dctx,
        ea,
        m * ea,
        &mut dkf,
        m,
        n * m,
        bh,
    )?;
    let mut dv = dev.scratch(bh * n * e)?;
    gemm_rm(
        dev,
        OP,
        false,
        false,
        n,
        e,
        m,
        kf,
        m,
        n * m,
        &dctx,
        ea,
        m * ea,
        &mut dv,
        e,
        n * e,
        bh,
    )?;
    Ok((dqf, dkf, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_sources;

    #[test]
    fn arch_major_reads_two_and_three_digit_arches() {
        assert_eq!(arch_major("sm_75"), Some(7));
        assert_eq!(arch_major("sm_80"), Some(8));
        assert_eq!(arch_major("sm_90"), Some(9));
        assert_eq!(arch_major("sm_100"), Some(10));
        assert_eq!(arch_major("sm_120a"), Some(12));
        assert_eq!(arch_major("sm_9"), None);
        assert_eq!(arch_major("compute_90"), None);
    }

    #[test]
    fn every_tf32_kernel_is_defined_and_every_f32_one_has_a_variant() {
        for (f32_name, tf32_name) in TF32_KERNELS {
            assert!(
                kernel_sources::CAUSAL.functions.contains(f32_name),
                "{f32_name}"
            );
            assert!(
                kernel_sources::CAUSAL_TF32.functions.contains(tf32_name),
                "{tf32_name}"
            );
            assert_eq!(Precision::Tf32.kernel(f32_name), *tf32_name);
            assert_eq!(Precision::F32.kernel(f32_name), *f32_name);
        }
        assert_eq!(
            TF32_KERNELS.len(),
            kernel_sources::CAUSAL_TF32.functions.len(),
            "a TF32 kernel no precision selects"
        );
        assert_eq!(Precision::default(), Precision::F32);
        assert_eq!(
            Precision::Tf32.kernel("attention_grad_prep"),
            "(no TF32 variant)"
        );
    }
}
