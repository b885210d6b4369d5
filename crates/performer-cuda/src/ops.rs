//! Device operations, one per kernel family: the FAVOR+ softmax feature map and causal and
//! non-causal linear attention, each with its backward. [`crate::CudaFastAttention`] composes
//! them; they are public so that benchmarks and other crates can time or reuse one stage.
//!
//! All buffers are row-major and contiguous with batch and heads flattened: features
//! `(bh, n, m)`, values and outputs `(bh, n, e)`, projection `(m, d)`.

use crate::buffer::{DeviceBuffer, Elem, SharedLauncher};
use crate::error::{Error, Result};
use crate::launcher::{GemmStridedBatched, KernelArg as A, LaunchDims, Transpose};
use crate::shape::expect_len;

/// Threads per block of every launch here (NTHREADS of the tiled kernels).
const THREADS: u32 = 256;

fn grid_1d(total: usize) -> LaunchDims {
    LaunchDims::cover(total, THREADS)
}

fn grid_3d(x: usize, y: usize, z: usize) -> LaunchDims {
    LaunchDims::grid3(x, y, z, THREADS)
}

/// A buffer of `len` floats for kernels to fill completely (NaN on the emulator and in the
/// poisoned GPU tests, so an element no kernel writes shows up).
fn scratch(dev: &SharedLauncher, len: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(dev, len.max(1), Elem::F32)
}

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

    /// Fails unless `dev` can run this precision: TF32 `mma.sync` needs compute capability 8.0
    /// (the emulated device emulates it).
    pub fn check_device(self, op: &'static str, dev: &SharedLauncher) -> Result<()> {
        if self == Precision::F32 {
            return Ok(());
        }
        let arch = dev.arch();
        let major = arch_major(&arch);
        if major.is_some_and(|m| m >= 8) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op,
                detail: format!("TF32 tensor cores need sm_80 or newer; the device is {arch}"),
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
    dev: &SharedLauncher,
    x: &DeviceBuffer,
    projection: &DeviceBuffer,
    bh: usize,
    n: usize,
    d: usize,
    m: usize,
    kind: FeatureKind,
) -> Result<DeviceBuffer> {
    const OP: &str = "softmax_features";
    let dims = format!("bh={bh} n={n} d={d} m={m}");
    expect_len(OP, "x", x.len(), bh * n * d, &dims)?;
    expect_len(OP, "projection", projection.len(), m * d, &dims)?;
    let per_row: i32 = matches!(kind, FeatureKind::Query) as i32;
    let stab_len = if per_row != 0 { bh * n } else { bh };
    let feat = scratch(dev, bh * n * m)?;
    let diag = scratch(dev, bh * n)?;
    let stab = scratch(dev, stab_len)?;
    let (ni, mi, di) = (n as i32, m as i32, d as i32);
    let dn = (d as f32).powf(-0.25);
    let ratio = (m as f32).powf(-0.5);
    let total = (bh * n * m) as i64;
    // SAFETY: fill_f32(float* x, i64 len, float value) over stab's own length. The atomic max in
    // favor_project starts from -inf, its identity.
    unsafe {
        dev.launch(
            "fill_f32",
            grid_1d(stab.len()),
            &[
                stab.arg(),
                A::I64(stab.len() as i64),
                A::F32(f32::NEG_INFINITY),
            ],
        )?;
    }
    // SAFETY: the arguments are favor_project's `(x, proj, dd, diag, stab, per_row, n, m, d, dn)`
    // and favor_exp's `(feat, diag, stab, per_row, n, m, ratio, eps, total)`, in order and of those
    // types; x and the projection were checked to hold bh*n*d and m*d values, feat, diag and stab
    // were allocated at bh*n*m, bh*n and one stabilizer per row or per head, which is all the
    // kernels index for this grid (tiles past n or m are masked inside); the buffers outlive the
    // launches, which the launcher orders before any later use.
    unsafe {
        dev.launch(
            "favor_project",
            grid_3d(n.div_ceil(TILE), m.div_ceil(TILE), bh),
            &[
                x.arg(),
                projection.arg(),
                feat.arg(),
                diag.arg(),
                stab.arg(),
                A::I32(per_row),
                A::I32(ni),
                A::I32(mi),
                A::I32(di),
                A::F32(dn),
            ],
        )?;
        dev.launch(
            "favor_exp",
            grid_1d(bh * n * m),
            &[
                feat.arg(),
                diag.arg(),
                stab.arg(),
                A::I32(per_row),
                A::I32(ni),
                A::I32(mi),
                A::F32(ratio),
                A::F32(FEATURE_EPS),
                A::I64(total),
            ],
        )?;
    }
    Ok(feat)
}

/// Backward of [`softmax_features`] for either kind (the stabiliser is a constant, as in the
/// reference's `.detach()`): the gradient with respect to `x`, `(bh, n, d)`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_features_backward(
    dev: &SharedLauncher,
    x: &DeviceBuffer,
    projection: &DeviceBuffer,
    features: &DeviceBuffer,
    grad_features: &DeviceBuffer,
    bh: usize,
    n: usize,
    d: usize,
    m: usize,
) -> Result<DeviceBuffer> {
    const OP: &str = "softmax_features_backward";
    let dims = format!("bh={bh} n={n} d={d} m={m}");
    expect_len(OP, "x", x.len(), bh * n * d, &dims)?;
    expect_len(OP, "projection", projection.len(), m * d, &dims)?;
    expect_len(OP, "features", features.len(), bh * n * m, &dims)?;
    expect_len(OP, "grad_features", grad_features.len(), bh * n * m, &dims)?;
    let gx = scratch(dev, bh * n * d)?;
    let dn = (d as f32).powf(-0.25);
    let ratio_eps = (m as f32).powf(-0.5) * FEATURE_EPS;
    // SAFETY: favor_backward's `(x, proj, feat, gfeat, gx, n, m, d, dn, ratio_eps)`, in order and
    // of those types; the four inputs were checked to hold bh*n*d, m*d, bh*n*m and bh*n*m values
    // and gx was allocated at bh*n*d, the extent the (n/TILE, d/TILE, bh) grid indexes.
    unsafe {
        dev.launch(
            "favor_backward",
            grid_3d(n.div_ceil(TILE), d.div_ceil(TILE), bh),
            &[
                x.arg(),
                projection.arg(),
                features.arg(),
                grad_features.arg(),
                gx.arg(),
                A::I32(n as i32),
                A::I32(m as i32),
                A::I32(d as i32),
                A::F32(dn),
                A::F32(ratio_eps),
            ],
        )?;
    }
    Ok(gx)
}

/// Runs the chunk-state scan: `S` `(bh, nt, m, e)` and `sc` `(bh, nt, m)` hold, for every
/// chunk, the sum of `a_j^T [b_j | col_j]` over the chunks before it (`reverse`: after it).
#[allow(clippy::too_many_arguments)]
fn chunk_states(
    dev: &SharedLauncher,
    a: &DeviceBuffer,
    b: &DeviceBuffer,
    col: Option<&DeviceBuffer>,
    s: &DeviceBuffer,
    sc: &DeviceBuffer,
    dims: LinearDims,
    reverse: bool,
    precision: Precision,
) -> Result<()> {
    let name = precision.kernel(if reverse {
        "chunk_state_rev"
    } else {
        "chunk_state_fwd"
    });
    // SAFETY: chunk_state_fwd/_rev (f32 or TF32) take `(A, B, bcol, S, sc, n, m, e)`, passed in
    // that order and of those types (a null pointer for an absent bcol, which the kernels test);
    // the callers check A, B, bcol against bh*n*m, bh*n*e, bh*n and allocate S, sc at bh*nt*m*e
    // and bh*nt*m, the extent of the (m/32, (e+1)/32, bh) grid.
    unsafe {
        dev.launch(
            name,
            grid_3d(dims.m.div_ceil(32), (dims.e + 1).div_ceil(32), dims.bh),
            &[
                a.arg(),
                b.arg(),
                col.map_or(A::Ptr(0), DeviceBuffer::arg),
                s.arg(),
                sc.arg(),
                A::I32(dims.n as i32),
                A::I32(dims.m as i32),
                A::I32(dims.e as i32),
            ],
        )
    }
}

/// Causal linear attention on features, chunkwise: returns `out` `(bh, n, e)` and the
/// normalizer `den` `(bh, n)` that the backward needs.
///
/// `out_i = sum_{j<=i} (qf_i.kf_j) v_j / (qf_i . (sum_{j<=i} kf_j + 1e-6))`.
/// In f32; [`causal_linear_attention_with`] chooses the precision.
pub fn causal_linear_attention(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    dims: LinearDims,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    causal_linear_attention_with(dev, qf, kf, v, dims, Precision::F32)
}

/// [`causal_linear_attention`] with the chunk products in `precision`
/// ([`Precision::Tf32`] fails on devices older than sm_80).
pub fn causal_linear_attention_with(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    dims: LinearDims,
    precision: Precision,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
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
    let h = scratch(dev, bh * nt * m * e)?;
    let z = scratch(dev, bh * nt * m)?;
    chunk_states(dev, kf, v, None, &h, &z, dims, false, precision)?;
    let out = scratch(dev, bh * n * e)?;
    let den = scratch(dev, bh * n)?;
    // SAFETY: chunk_output_fwd's `(qf, kf, v, h, z, out, den, n, m, e, eps)`, in order and of those
    // types; qf, kf, v were checked by `dims.check`, h, z are the chunk states allocated above at
    // bh*nt*m*e and bh*nt*m, out and den are allocated at bh*n*e and bh*n, what the (nt, e/TILE,
    // bh) grid writes.
    unsafe {
        dev.launch(
            precision.kernel("chunk_output_fwd"),
            grid_3d(nt, e.div_ceil(TILE), bh),
            &[
                qf.arg(),
                kf.arg(),
                v.arg(),
                h.arg(),
                z.arg(),
                out.arg(),
                den.arg(),
                A::I32(n as i32),
                A::I32(m as i32),
                A::I32(e as i32),
                A::F32(CAUSAL_EPS),
            ],
        )?;
    }
    Ok((out, den))
}

/// `dnum = g / den` and `dden = -(g . out) / den` per position, written with strides: each of
/// `den`, `dnum`, `dden` is (buffer, first element, stride).
#[allow(clippy::too_many_arguments)]
fn grad_prep(
    dev: &SharedLauncher,
    g: &DeviceBuffer,
    out: &DeviceBuffer,
    den: (&DeviceBuffer, usize, i64),
    dnum: (&DeviceBuffer, usize, i64),
    dden: (&DeviceBuffer, usize, i64),
    rows: usize,
    e: usize,
) -> Result<()> {
    // SAFETY: attention_grad_prep's `(g, out, den, den_stride, dnum, dnum_ld, dden, dden_stride,
    // rows, e)`, in order and of those types; the callers size g, out at rows*e, den, dnum, dden
    // for `rows` rows at the offsets and strides given (dnum and dden may share one augmented
    // buffer: the kernel writes disjoint columns of it, one warp per row).
    unsafe {
        dev.launch(
            "attention_grad_prep",
            // One warp per block: a warp past the last row skips the loop and its shuffles
            // (legal: a warp's collectives need only that warp), and a block is then all in
            // or all out, which the emulator's per-block fast path relies on (with 256-thread
            // blocks a block's first thread could skip while its other warps shuffle).
            LaunchDims::cover(rows * 32, 32),
            &[
                g.arg(),
                out.arg(),
                den.0.arg_at(den.1),
                A::I64(den.2),
                dnum.0.arg_at(dnum.1),
                A::I64(dnum.2),
                dden.0.arg_at(dden.1),
                A::I64(dden.2),
                A::I64(rows as i64),
                A::I32(e as i32),
            ],
        )
    }
}

/// Backward of [`causal_linear_attention`]: gradients of `qf`, `kf` and `v` given the
/// forward's `out` and `den` and the output gradient `grad_out`. In f32;
/// [`causal_linear_attention_backward_with`] chooses the precision.
#[allow(clippy::too_many_arguments)]
pub fn causal_linear_attention_backward(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    out: &DeviceBuffer,
    den: &DeviceBuffer,
    grad_out: &DeviceBuffer,
    dims: LinearDims,
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
    causal_linear_attention_backward_with(dev, qf, kf, v, out, den, grad_out, dims, Precision::F32)
}

/// [`causal_linear_attention_backward`] with the chunk products in `precision`
/// ([`Precision::Tf32`] fails on devices older than sm_80). `out` and `den` may come from a
/// forward in either precision.
#[allow(clippy::too_many_arguments)]
pub fn causal_linear_attention_backward_with(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    out: &DeviceBuffer,
    den: &DeviceBuffer,
    grad_out: &DeviceBuffer,
    dims: LinearDims,
    precision: Precision,
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
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
    let (ni, mi, ei) = (A::I32(n as i32), A::I32(m as i32), A::I32(e as i32));
    let dnum = scratch(dev, bh * n * e)?;
    let dden = scratch(dev, bh * n)?;
    grad_prep(
        dev,
        grad_out,
        out,
        (den, 0, 1),
        (&dnum, 0, e as i64),
        (&dden, 0, 1),
        bh * n,
        e,
    )?;
    // Forward states again (recomputed rather than kept: they are nt*m*e per head).
    let states = scratch(dev, bh * nt * m * e)?;
    let col = scratch(dev, bh * nt * m)?;
    chunk_states(dev, kf, v, None, &states, &col, dims, false, precision)?;
    let dqf = scratch(dev, bh * n * m)?;
    // SAFETY: chunk_grad_feat_fwd's `(dnum, dden, v, kf, S, sc, eps, dqf, n, m, e)` in order and
    // type; every input was checked by `dims.check` or computed above at its (bh, n or nt, m, e)
    // extent, and dqf is allocated at the extent its grid writes.
    unsafe {
        dev.launch(
            precision.kernel("chunk_grad_feat_fwd"),
            grid_3d(nt, m.div_ceil(TILE), bh),
            &[
                dnum.arg(),
                dden.arg(),
                v.arg(),
                kf.arg(),
                states.arg(),
                col.arg(),
                A::F32(CAUSAL_EPS),
                dqf.arg(),
                ni,
                mi,
                ei,
            ],
        )?;
    }
    // Reverse states U, u into the same buffers.
    chunk_states(
        dev,
        qf,
        &dnum,
        Some(&dden),
        &states,
        &col,
        dims,
        true,
        precision,
    )?;
    let dkf = scratch(dev, bh * n * m)?;
    let dv = scratch(dev, bh * n * e)?;
    // SAFETY: chunk_grad_feat_rev's `(v, dnum, dden, qf, S, sc, dkf, n, m, e)` and
    // chunk_output_rev's `(kf, qf, dnum, S, dv, n, m, e)` in order and type; inputs checked by
    // `dims.check` or computed above at their extents, outputs allocated at the extents their
    // grids write.
    unsafe {
        dev.launch(
            precision.kernel("chunk_grad_feat_rev"),
            grid_3d(nt, m.div_ceil(TILE), bh),
            &[
                v.arg(),
                dnum.arg(),
                dden.arg(),
                qf.arg(),
                states.arg(),
                col.arg(),
                dkf.arg(),
                ni,
                mi,
                ei,
            ],
        )?;
        dev.launch(
            precision.kernel("chunk_output_rev"),
            grid_3d(nt, e.div_ceil(TILE), bh),
            &[
                kf.arg(),
                qf.arg(),
                dnum.arg(),
                states.arg(),
                dv.arg(),
                ni,
                mi,
                ei,
            ],
        )?;
    }
    Ok((dqf, dkf, dv))
}

/// What non-causal attention keeps for its backward: the augmented context
/// `[kf^T v | sum_j kf_j]` `(bh, m, e+1)` and `[num | den]` `(bh, n, e+1)`.
pub struct NonCausalSaved {
    /// `(bh, m, e+1)`.
    pub context: DeviceBuffer,
    /// `(bh, n, e+1)`; the last column is the normalizer.
    pub numerator: DeviceBuffer,
}

/// One row-major operand of [`gemm_rm`]: buffer, leading dimension, batch stride (elements).
type Operand<'a> = (&'a DeviceBuffer, usize, usize);

/// Row-major strided-batched GEMM `C = op(A) op(B)` (`C` is `rows x cols`, inner size `inner`)
/// through column-major cuBLAS: a row-major matrix is its transpose in column-major, so
/// `C^T = op(B)^T op(A)^T` is issued with the operands swapped and the same op flags.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    dev: &SharedLauncher,
    trans_a: bool,
    trans_b: bool,
    rows: usize,
    cols: usize,
    inner: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: Operand<'_>,
    batch: usize,
) -> Result<()> {
    let t = |x: bool| if x { Transpose::Yes } else { Transpose::No };
    let g = GemmStridedBatched {
        transa: t(trans_b),
        transb: t(trans_a),
        m: cols as i32,
        n: rows as i32,
        k: inner as i32,
        alpha: 1.0,
        a: b.0.ptr(),
        lda: b.1 as i32,
        stride_a: b.2 as i64,
        b: a.0.ptr(),
        ldb: a.1 as i32,
        stride_b: a.2 as i64,
        beta: 0.0,
        c: c.0.ptr(),
        ldc: c.1 as i32,
        stride_c: c.2 as i64,
        batch: batch as i32,
    };
    // SAFETY: `g` is the row-major problem restated for column-major cuBLAS (operands swapped,
    // the same op flags); its callers, the non-causal forward and backward, pass `qf`, `kf`, `v`
    // checked by `dims.check` and outputs allocated at bh*m*(e+1) and bh*n*(e+1), which are
    // `batch` = bh matrices of exactly the shapes, leading dimensions and strides given here.
    unsafe { dev.gemm_strided_batched(&g) }
}

fn augment_ones(dev: &SharedLauncher, v: &DeviceBuffer, dims: LinearDims) -> Result<DeviceBuffer> {
    let rows = dims.bh * dims.n;
    let vaug = scratch(dev, rows * (dims.e + 1))?;
    // SAFETY: augment_ones' `(v, vaug, rows, e)` in order and type; v holds rows*e values
    // (checked by the callers), vaug rows*(e+1).
    unsafe {
        dev.launch(
            "augment_ones",
            grid_1d(rows * (dims.e + 1)),
            &[
                v.arg(),
                vaug.arg(),
                A::I64(rows as i64),
                A::I32(dims.e as i32),
            ],
        )?;
    }
    Ok(vaug)
}

/// Non-causal linear attention on features (performer-pytorch `linear_attention`):
/// `out = D^-1 qf (kf^T v)`, `D_i = qf_i . sum_j kf_j`; two cuBLAS batched GEMMs.
pub fn linear_attention(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    dims: LinearDims,
) -> Result<(DeviceBuffer, NonCausalSaved)> {
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
    let vaug = augment_ones(dev, v, dims)?;
    let context = scratch(dev, bh * m * ea)?;
    gemm_rm(
        dev,
        true,
        false,
        m,
        ea,
        n,
        (kf, m, n * m),
        (&vaug, ea, n * ea),
        (&context, ea, m * ea),
        bh,
    )?;
    let numerator = scratch(dev, bh * n * ea)?;
    gemm_rm(
        dev,
        false,
        false,
        n,
        ea,
        m,
        (qf, m, n * m),
        (&context, ea, m * ea),
        (&numerator, ea, n * ea),
        bh,
    )?;
    let out = scratch(dev, bh * n * e)?;
    // SAFETY: normalize_rows' `(num_aug, out, rows, e)` in order and type; the buffers hold the
    // rows*(e+1) and rows*e values its grid-stride loop stops at.
    unsafe {
        dev.launch(
            "normalize_rows",
            grid_1d(bh * n * e),
            &[
                numerator.arg(),
                out.arg(),
                A::I64((bh * n) as i64),
                A::I32(e as i32),
            ],
        )?;
    }
    Ok((out, NonCausalSaved { context, numerator }))
}

/// Backward of [`linear_attention`]: gradients of `qf`, `kf` and `v`.
#[allow(clippy::too_many_arguments)]
pub fn linear_attention_backward(
    dev: &SharedLauncher,
    qf: &DeviceBuffer,
    kf: &DeviceBuffer,
    v: &DeviceBuffer,
    out: &DeviceBuffer,
    saved: &NonCausalSaved,
    grad_out: &DeviceBuffer,
    dims: LinearDims,
) -> Result<(DeviceBuffer, DeviceBuffer, DeviceBuffer)> {
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
    let gaug = scratch(dev, bh * n * ea)?;
    grad_prep(
        dev,
        grad_out,
        out,
        (&saved.numerator, e, ea as i64),
        (&gaug, 0, ea as i64),
        (&gaug, e, ea as i64),
        bh * n,
        e,
    )?;
    let dqf = scratch(dev, bh * n * m)?;
    gemm_rm(
        dev,
        false,
        true,
        n,
        m,
        ea,
        (&gaug, ea, n * ea),
        (&saved.context, ea, m * ea),
        (&dqf, m, n * m),
        bh,
    )?;
    let dctx = scratch(dev, bh * m * ea)?;
    gemm_rm(
        dev,
        true,
        false,
        m,
        ea,
        n,
        (qf, m, n * m),
        (&gaug, ea, n * ea),
        (&dctx, ea, m * ea),
        bh,
    )?;
    let vaug = augment_ones(dev, v, dims)?;
    let dkf = scratch(dev, bh * n * m)?;
    gemm_rm(
        dev,
        false,
        true,
        n,
        m,
        ea,
        (&vaug, ea, n * ea),
        (&dctx, ea, m * ea),
        (&dkf, m, n * m),
        bh,
    )?;
    let dv = scratch(dev, bh * n * e)?;
    gemm_rm(
        dev,
        false,
        false,
        n,
        e,
        m,
        (kf, m, n * m),
        (&dctx, ea, m * ea),
        (&dv, e, n * e),
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
