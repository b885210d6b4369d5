//! Safe, length-checked device operations over [`DeviceBuffer`]s: one function per kernel of
//! `kernels/tensor.cu` (forward and backward) and row-major matrix products on
//! [`Launcher::gemm_strided_batched`](crate::Launcher::gemm_strided_batched). They run on any [`Launcher`](crate::Launcher), so the emulator tests
//! exactly what a GPU runs.
//!
//! Every tensor is contiguous and row-major; shapes are passed alongside. Nothing here copies
//! to the host except where a function says so.

use crate::buffer::{DeviceBuffer, Elem, SharedLauncher};
use crate::error::{Error, Result};
use crate::launcher::{GemmStridedBatched, KernelArg, LaunchDims, Transpose};
use crate::strided_index::StridedIndex;

/// Threads per block of every kernel launched here.
const THREADS: u32 = 256;

/// The launcher of `first`, after checking that every other buffer lives on it.
fn device_of(op: &'static str, bufs: &[&DeviceBuffer]) -> Result<SharedLauncher> {
    let first = bufs[0].launcher().clone();
    for (i, b) in bufs.iter().enumerate().skip(1) {
        if !b.same_device(&first) {
            return Err(Error::DeviceMismatch {
                op,
                detail: format!(
                    "operand 0 is on {} and operand {i} on {}",
                    first.describe(),
                    b.launcher().describe()
                ),
            });
        }
    }
    Ok(first)
}

fn expect(op: &'static str, what: &str, b: &DeviceBuffer, len: usize) -> Result<()> {
    if b.elem() != Elem::F32 || b.len() != len {
        return Err(Error::Shape {
            op,
            detail: format!(
                "{what} holds {} {:?} values, expected {len} f32",
                b.len(),
                b.elem()
            ),
        });
    }
    Ok(())
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn row_major_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for a in (0..shape.len()).rev() {
        s[a] = acc;
        acc *= shape[a] as i64;
    }
    s
}

fn f32_buf(dev: &SharedLauncher, len: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(dev, len, Elem::F32)
}

/// A device buffer of `len` copies of `value`.
pub fn full(dev: &SharedLauncher, len: usize, value: f32) -> Result<DeviceBuffer> {
    let b = f32_buf(dev, len)?;
    fill(&b, value)?;
    Ok(b)
}

/// Sets every element of `b` to `value`.
pub fn fill(b: &DeviceBuffer, value: f32) -> Result<()> {
    expect("fill", "buffer", b, b.len())?;
    // SAFETY: fill_f32(float* x, i64 len, float value) writes x[0..len), len is b's own length.
    unsafe {
        b.launcher().launch(
            "fill_f32",
            LaunchDims::cover(b.len(), THREADS),
            &[
                b.arg(),
                KernelArg::I64(b.len() as i64),
                KernelArg::F32(value),
            ],
        )
    }
}

/// Element-wise functions of [`unary`] (codes of `kernels/tensor.cu`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// `-x`.
    Neg,
    /// `exp(x)`.
    Exp,
    /// `ln(x)`.
    Log,
    /// `sqrt(x)`.
    Sqrt,
    /// `max(x, 0)`.
    Relu,
    /// The exact (erf) GELU.
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `|x|`.
    Abs,
    /// `a * x + b`.
    Affine(f32, f32),
    /// `x ^ a`.
    Pow(f32),
    /// `1 / x`.
    Recip,
    /// `x * x`.
    Square,
    /// `x * sigmoid(x)`.
    Silu,
    /// `x` clamped into `[lo, hi]` (an infinite bound clamps nothing); the gradient passes on the
    /// closed interval.
    Clamp(f32, f32),
    /// ELU with alpha 1.
    Elu,
    /// Softplus with beta 1 and threshold 20.
    Softplus,
    /// Leaky ReLU with the given negative slope.
    LeakyRelu(f32),
}

impl Unary {
    fn code(self) -> (i32, f32, f32) {
        match self {
            Unary::Neg => (0, 0.0, 0.0),
            Unary::Exp => (1, 0.0, 0.0),
            Unary::Log => (2, 0.0, 0.0),
            Unary::Sqrt => (3, 0.0, 0.0),
            Unary::Relu => (4, 0.0, 0.0),
            Unary::Gelu => (5, 0.0, 0.0),
            Unary::Tanh => (6, 0.0, 0.0),
            Unary::Sigmoid => (7, 0.0, 0.0),
            Unary::Abs => (8, 0.0, 0.0),
            Unary::Affine(a, b) => (9, a, b),
            Unary::Pow(a) => (10, a, 0.0),
            Unary::Recip => (11, 0.0, 0.0),
            Unary::Square => (12, 0.0, 0.0),
            Unary::Silu => (13, 0.0, 0.0),
            Unary::Clamp(lo, hi) => (14, lo, hi),
            Unary::Elu => (15, 0.0, 0.0),
            Unary::Softplus => (16, 0.0, 0.0),
            Unary::LeakyRelu(a) => (17, a, 0.0),
        }
    }
}

/// `y = f(x)` element-wise.
pub fn unary(x: &DeviceBuffer, f: Unary) -> Result<DeviceBuffer> {
    const OP: &str = "unary";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, x.len())?;
    let y = f32_buf(&dev, x.len())?;
    let (code, a, b) = f.code();
    // SAFETY: unary_f32(x, y, i64 n, int op, float a, float b); x and y hold n floats.
    unsafe {
        dev.launch(
            "unary_f32",
            LaunchDims::cover(x.len(), THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(x.len() as i64),
                KernelArg::I32(code),
                KernelArg::F32(a),
                KernelArg::F32(b),
            ],
        )?;
    }
    Ok(y)
}

/// `gx = gy * f'(x)`, given the forward's input `x` and output `y`.
pub fn unary_backward(
    x: &DeviceBuffer,
    y: &DeviceBuffer,
    gy: &DeviceBuffer,
    f: Unary,
) -> Result<DeviceBuffer> {
    const OP: &str = "unary_backward";
    let dev = device_of(OP, &[x, y, gy])?;
    let n = x.len();
    expect(OP, "x", x, n)?;
    expect(OP, "y", y, n)?;
    expect(OP, "gy", gy, n)?;
    let gx = f32_buf(&dev, n)?;
    let (code, a, b) = f.code();
    // SAFETY: unary_backward_f32(x, y, gy, gx, i64 n, int op, float a, float b); all hold n
    // floats.
    unsafe {
        dev.launch(
            "unary_backward_f32",
            LaunchDims::cover(n, THREADS),
            &[
                x.arg(),
                y.arg(),
                gy.arg(),
                gx.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I32(code),
                KernelArg::F32(a),
                KernelArg::F32(b),
            ],
        )?;
    }
    Ok(gx)
}

/// Binary element-wise ops of [`binary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// `max(a, b)` (ties split the gradient evenly).
    Max,
    /// `min(a, b)` (ties split the gradient evenly).
    Min,
    /// `a ^ b` (no gradient to `b` where `a <= 0`, none to `a` where `b == 0`).
    Pow,
}

/// NumPy broadcasting of two shapes; None when they do not broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// Element strides of `shape` read under the broadcast shape `out` (0 on broadcast axes).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let own = row_major_strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < lead || shape[i - lead] == 1 {
                0
            } else {
                own[i - lead]
            }
        })
        .collect()
}

fn shape_err(op: &'static str, a: &[usize], b: &[usize]) -> Error {
    Error::Shape {
        op,
        detail: format!("shapes {a:?} and {b:?} do not broadcast"),
    }
}

/// `a op b` with broadcasting; returns the output and its shape.
pub fn binary(
    a: &DeviceBuffer,
    a_shape: &[usize],
    b: &DeviceBuffer,
    b_shape: &[usize],
    op: Binary,
) -> Result<(DeviceBuffer, Vec<usize>)> {
    const OP: &str = "binary";
    let dev = device_of(OP, &[a, b])?;
    expect(OP, "a", a, numel(a_shape))?;
    expect(OP, "b", b, numel(b_shape))?;
    let out_shape =
        broadcast_shape(a_shape, b_shape).ok_or_else(|| shape_err(OP, a_shape, b_shape))?;
    let n = numel(&out_shape);
    let out = f32_buf(&dev, n)?;
    let m = StridedIndex::new(
        OP,
        &out_shape,
        &[
            &broadcast_strides(a_shape, &out_shape),
            &broadcast_strides(b_shape, &out_shape),
        ],
    )?;
    // SAFETY: binary_f32(a, b, out, i64 n, int op, StridedIndex meta); meta maps each of the n
    // output indices into a and b within their shapes (broadcast strides), out holds n floats.
    unsafe {
        dev.launch(
            "binary_f32",
            LaunchDims::cover(n, THREADS),
            &[
                a.arg(),
                b.arg(),
                out.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I32(op as i32),
                KernelArg::Index(m),
            ],
        )?;
    }
    Ok((out, out_shape))
}

/// Gradients of [`binary`] with respect to `a` and `b` (each reduced to its operand's shape),
/// where asked for.
#[allow(clippy::too_many_arguments)]
pub fn binary_backward(
    a: &DeviceBuffer,
    a_shape: &[usize],
    b: &DeviceBuffer,
    b_shape: &[usize],
    gout: &DeviceBuffer,
    op: Binary,
    need_a: bool,
    need_b: bool,
) -> Result<(Option<DeviceBuffer>, Option<DeviceBuffer>)> {
    const OP: &str = "binary_backward";
    let dev = device_of(OP, &[a, b, gout])?;
    expect(OP, "a", a, numel(a_shape))?;
    expect(OP, "b", b, numel(b_shape))?;
    let out_shape =
        broadcast_shape(a_shape, b_shape).ok_or_else(|| shape_err(OP, a_shape, b_shape))?;
    let n = numel(&out_shape);
    expect(OP, "gout", gout, n)?;
    let ga = need_a.then(|| f32_buf(&dev, n)).transpose()?;
    let gb = need_b.then(|| f32_buf(&dev, n)).transpose()?;
    let m = StridedIndex::new(
        OP,
        &out_shape,
        &[
            &broadcast_strides(a_shape, &out_shape),
            &broadcast_strides(b_shape, &out_shape),
        ],
    )?;
    let ptr = |o: &Option<DeviceBuffer>| o.as_ref().map_or(KernelArg::Ptr(0), DeviceBuffer::arg);
    // SAFETY: binary_backward_f32(a, b, gout, ga, gb, i64 n, int op, meta); ga and gb are null or
    // hold n floats, meta maps the n indices into a and b within their shapes.
    unsafe {
        dev.launch(
            "binary_backward_f32",
            LaunchDims::cover(n, THREADS),
            &[
                a.arg(),
                b.arg(),
                gout.arg(),
                ptr(&ga),
                ptr(&gb),
                KernelArg::I64(n as i64),
                KernelArg::I32(op as i32),
                KernelArg::Index(m),
            ],
        )?;
    }
    let ga = ga.map(|g| sum_to(&g, &out_shape, a_shape)).transpose()?;
    let gb = gb.map(|g| sum_to(&g, &out_shape, b_shape)).transpose()?;
    Ok((ga, gb))
}

/// Sums `x` (shape `x_shape`) over the axes along which `target` was broadcast to it: the
/// gradient of a broadcast. `target` must broadcast to `x_shape`.
pub fn sum_to(x: &DeviceBuffer, x_shape: &[usize], target: &[usize]) -> Result<DeviceBuffer> {
    const OP: &str = "sum_to";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, numel(x_shape))?;
    if broadcast_shape(target, x_shape).as_deref() != Some(x_shape) {
        return Err(Error::Shape {
            op: OP,
            detail: format!("{target:?} does not broadcast to {x_shape:?}"),
        });
    }
    let xs = row_major_strides(x_shape);
    let lead = x_shape.len() - target.len();
    let (mut kshape, mut kstride, mut rshape, mut rstride) = (vec![], vec![], vec![], vec![]);
    for (i, &d) in x_shape.iter().enumerate() {
        let kept = i >= lead && target[i - lead] == d;
        if kept {
            kshape.push(d);
            kstride.push(xs[i]);
        } else {
            rshape.push(d);
            rstride.push(xs[i]);
        }
    }
    let n_out = numel(target);
    let n_red = numel(&rshape);
    let y = f32_buf(&dev, n_out)?;
    let m1 = StridedIndex::new(OP, &kshape, &[&kstride])?;
    let m2 = StridedIndex::new(OP, &rshape, &[&rstride])?;
    // SAFETY: sum_to_f32(x, y, i64 n_out, meta, meta2, i64 n_red); the kept axes (meta) span the
    // n_out outputs in y's row-major order, the reduced ones (meta2) n_red elements, and every
    // combined offset lies inside x's shape.
    unsafe {
        dev.launch(
            "sum_to_f32",
            LaunchDims::cover(n_out, THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(n_out as i64),
                KernelArg::Index(m1),
                KernelArg::Index(m2),
                KernelArg::I64(n_red as i64),
            ],
        )?;
    }
    Ok(y)
}

/// A contiguous copy of the view of `x` with element offset `offset`, shape `shape` and
/// element strides `strides` (a permutation, slice or broadcast of `x`).
pub fn strided_copy(
    x: &DeviceBuffer,
    offset: usize,
    shape: &[usize],
    strides: &[i64],
) -> Result<DeviceBuffer> {
    const OP: &str = "strided_copy";
    let dev = device_of(OP, &[x])?;
    let n = numel(shape);
    // The view is checked in elements: they must be f32 (a bf16 buffer's would be half as
    // many bytes).
    expect(OP, "x", x, x.len())?;
    check_view(OP, x.len(), offset, shape, strides)?;
    let y = f32_buf(&dev, n)?;
    if n == 0 {
        return Ok(y);
    }
    let m = StridedIndex::new(OP, shape, &[strides])?;
    // SAFETY: strided_copy_f32(x, y, i64 n, meta); every offset of the view lies inside x
    // (checked above), y holds n floats.
    unsafe {
        dev.launch(
            "strided_copy_f32",
            LaunchDims::cover(n, THREADS),
            &[
                x.arg_at(offset),
                y.arg(),
                KernelArg::I64(n as i64),
                KernelArg::Index(m),
            ],
        )?;
    }
    Ok(y)
}

/// Writes the contiguous `src` into the view of `dst` with element offset `offset`, shape
/// `shape` and element strides `strides` (the inverse of [`strided_copy`]: a slice of `dst`
/// receives `src`). The view's elements must be distinct (no zero or overlapping strides).
pub fn strided_scatter(
    src: &DeviceBuffer,
    dst: &DeviceBuffer,
    offset: usize,
    shape: &[usize],
    strides: &[i64],
) -> Result<()> {
    const OP: &str = "strided_scatter";
    let dev = device_of(OP, &[src, dst])?;
    let n = numel(shape);
    expect(OP, "src", src, n)?;
    expect(OP, "dst", dst, dst.len())?;
    check_view(OP, dst.len(), offset, shape, strides)?;
    if strides.iter().zip(shape).any(|(&s, &d)| s == 0 && d > 1) {
        return Err(Error::Shape {
            op: OP,
            detail: format!("strides {strides:?} of shape {shape:?} repeat an element"),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let m = StridedIndex::new(OP, shape, &[strides])?;
    // SAFETY: strided_scatter_f32(src, dst, i64 n, meta); src holds n floats, every offset of
    // the view lies inside dst (checked above) and no two coincide for these (row-major
    // sub-view) strides, so each thread writes its own element.
    unsafe {
        dev.launch(
            "strided_scatter_f32",
            LaunchDims::cover(n, THREADS),
            &[
                src.arg(),
                dst.arg_at(offset),
                KernelArg::I64(n as i64),
                KernelArg::Index(m),
            ],
        )
    }
}

/// Checks that the view (offset, shape, strides) lies inside a buffer of `len` elements.
fn check_view(
    op: &'static str,
    len: usize,
    offset: usize,
    shape: &[usize],
    strides: &[i64],
) -> Result<()> {
    if shape.len() != strides.len() {
        return Err(Error::Shape {
            op,
            detail: format!("shape {shape:?} and strides {strides:?} differ in rank"),
        });
    }
    if numel(shape) == 0 {
        return Ok(());
    }
    let (mut lo, mut hi) = (offset as i64, offset as i64);
    for (&d, &s) in shape.iter().zip(strides) {
        let span = (d as i64 - 1) * s;
        if span < 0 { lo += span } else { hi += span }
    }
    if lo < 0 || hi >= len as i64 {
        return Err(Error::Shape {
            op,
            detail: format!(
                "view offset {offset} shape {shape:?} strides {strides:?} reaches outside the \
                 {len} elements of the buffer"
            ),
        });
    }
    Ok(())
}

/// Indices of a [`gather`] on the device, with the strides that read them under the output's
/// shape (an `index_select` reuses one index per position of the gathered axis).
#[derive(Debug)]
pub struct GatherIndex {
    /// The indices (i64).
    pub values: DeviceBuffer,
    /// Element strides of `values` under the output's shape.
    pub strides: Vec<i64>,
}

/// Checks a gather's shapes and indices (on the host, where they are given) and uploads them.
fn gather_index(
    op: &'static str,
    dev: &SharedLauncher,
    x_shape: &[usize],
    axis: usize,
    out_shape: &[usize],
    index: &[i64],
    index_strides: &[i64],
) -> Result<GatherIndex> {
    let fits = axis < x_shape.len()
        && out_shape.len() == x_shape.len()
        && index_strides.len() == x_shape.len()
        && out_shape
            .iter()
            .zip(x_shape)
            .enumerate()
            .all(|(i, (&o, &x))| i == axis || o <= x);
    if !fits {
        return Err(Error::Shape {
            op,
            detail: format!(
                "an output {out_shape:?} gathered along axis {axis} of {x_shape:?} (index \
                 strides {index_strides:?})"
            ),
        });
    }
    check_view(op, index.len(), 0, out_shape, index_strides)?;
    let size = x_shape[axis];
    if let Some(&bad) = index.iter().find(|&&i| i < 0 || i as u64 >= size as u64) {
        return Err(Error::Shape {
            op,
            detail: format!("index {bad} outside 0..{size} along axis {axis}"),
        });
    }
    Ok(GatherIndex {
        values: DeviceBuffer::from_i64(dev, index)?,
        strides: index_strides.to_vec(),
    })
}

/// `out[p] = x[p with p[axis] replaced by index[p]]` for every position `p` of `out_shape`
/// (PyTorch's `gather`; `index_select` when the index strides read one index per position of
/// `axis`). `index` is read with `index_strides` under `out_shape`; every index must lie in
/// `0..x_shape[axis]` and every other axis of the output be no longer than `x`'s. Returns the
/// output and the uploaded index, which [`gather_backward`] reuses.
pub fn gather(
    x: &DeviceBuffer,
    x_shape: &[usize],
    axis: usize,
    out_shape: &[usize],
    index: &[i64],
    index_strides: &[i64],
) -> Result<(DeviceBuffer, GatherIndex)> {
    const OP: &str = "gather";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, numel(x_shape))?;
    let idx = gather_index(OP, &dev, x_shape, axis, out_shape, index, index_strides)?;
    let n = numel(out_shape);
    let out = f32_buf(&dev, n)?;
    if n == 0 {
        return Ok((out, idx));
    }
    let mut xs = row_major_strides(x_shape);
    let step = xs[axis];
    xs[axis] = 0;
    let m = StridedIndex::new(OP, out_shape, &[&xs, &idx.strides])?;
    // SAFETY: gather_f32(x, idx, out, i64 n, i64 step, meta); every non-gathered coordinate of
    // the output is below x's size on that axis and every index below x's size on `axis`
    // (checked by gather_index), so each read lies inside x; the index view lies inside idx.
    unsafe {
        dev.launch(
            "gather_f32",
            LaunchDims::cover(n, THREADS),
            &[
                x.arg(),
                idx.values.arg(),
                out.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I64(step),
                KernelArg::Index(m),
            ],
        )?;
    }
    Ok((out, idx))
}

/// Gradient of [`gather`]: each output gradient added into the element it was read from.
pub fn gather_backward(
    gout: &DeviceBuffer,
    index: &GatherIndex,
    x_shape: &[usize],
    axis: usize,
    out_shape: &[usize],
) -> Result<DeviceBuffer> {
    const OP: &str = "gather_backward";
    let dev = device_of(OP, &[gout, &index.values])?;
    let n = numel(out_shape);
    expect(OP, "gout", gout, n)?;
    if axis >= x_shape.len()
        || out_shape.len() != x_shape.len()
        || index.strides.len() != x_shape.len()
        || out_shape
            .iter()
            .zip(x_shape)
            .enumerate()
            .any(|(i, (&o, &x))| i != axis && o > x)
    {
        return Err(Error::Shape {
            op: OP,
            detail: format!("an output {out_shape:?} gathered along axis {axis} of {x_shape:?}"),
        });
    }
    check_view(OP, index.values.len(), 0, out_shape, &index.strides)?;
    let gx = full(&dev, numel(x_shape), 0.0)?;
    if n == 0 {
        return Ok(gx);
    }
    let mut xs = row_major_strides(x_shape);
    let step = xs[axis];
    xs[axis] = 0;
    let m = StridedIndex::new(OP, out_shape, &[&xs, &index.strides])?;
    // SAFETY: gather_backward_f32(gout, idx, gx, i64 n, i64 step, meta); the same offsets as
    // the forward's reads (indices checked when the GatherIndex was made, shapes above), now
    // written with atomicAdd into gx of x's size.
    unsafe {
        dev.launch(
            "gather_backward_f32",
            LaunchDims::cover(n, THREADS),
            &[
                gout.arg(),
                index.values.arg(),
                gx.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I64(step),
                KernelArg::Index(m),
            ],
        )?;
    }
    Ok(gx)
}

/// `cond ? a : b` element-wise with broadcasting of all three (`cond` nonzero is true); returns
/// the output and its shape.
pub fn where_select(
    cond: &DeviceBuffer,
    c_shape: &[usize],
    a: &DeviceBuffer,
    a_shape: &[usize],
    b: &DeviceBuffer,
    b_shape: &[usize],
) -> Result<(DeviceBuffer, Vec<usize>)> {
    const OP: &str = "where";
    let dev = device_of(OP, &[cond, a, b])?;
    expect(OP, "cond", cond, numel(c_shape))?;
    expect(OP, "a", a, numel(a_shape))?;
    expect(OP, "b", b, numel(b_shape))?;
    let ab = broadcast_shape(a_shape, b_shape).ok_or_else(|| shape_err(OP, a_shape, b_shape))?;
    let out_shape = broadcast_shape(&ab, c_shape).ok_or_else(|| shape_err(OP, &ab, c_shape))?;
    let n = numel(&out_shape);
    let out = f32_buf(&dev, n)?;
    if n == 0 {
        return Ok((out, out_shape));
    }
    let m = StridedIndex::new(
        OP,
        &out_shape,
        &[
            &broadcast_strides(c_shape, &out_shape),
            &broadcast_strides(a_shape, &out_shape),
            &broadcast_strides(b_shape, &out_shape),
        ],
    )?;
    // SAFETY: where_f32(cond, a, b, out, i64 n, meta); meta maps each of the n output indices
    // into cond, a and b within their shapes (broadcast strides), out holds n floats.
    unsafe {
        dev.launch(
            "where_f32",
            LaunchDims::cover(n, THREADS),
            &[
                cond.arg(),
                a.arg(),
                b.arg(),
                out.arg(),
                KernelArg::I64(n as i64),
                KernelArg::Index(m),
            ],
        )?;
    }
    Ok((out, out_shape))
}

/// Gradients of [`where_select`] with respect to `a` and `b` (each reduced to its operand's
/// shape), where asked for.
pub fn where_backward(
    cond: &DeviceBuffer,
    c_shape: &[usize],
    a_shape: &[usize],
    b_shape: &[usize],
    gout: &DeviceBuffer,
    need_a: bool,
    need_b: bool,
) -> Result<(Option<DeviceBuffer>, Option<DeviceBuffer>)> {
    const OP: &str = "where_backward";
    let dev = device_of(OP, &[cond, gout])?;
    expect(OP, "cond", cond, numel(c_shape))?;
    let ab = broadcast_shape(a_shape, b_shape).ok_or_else(|| shape_err(OP, a_shape, b_shape))?;
    let out_shape = broadcast_shape(&ab, c_shape).ok_or_else(|| shape_err(OP, &ab, c_shape))?;
    let n = numel(&out_shape);
    expect(OP, "gout", gout, n)?;
    let ga = need_a.then(|| f32_buf(&dev, n)).transpose()?;
    let gb = need_b.then(|| f32_buf(&dev, n)).transpose()?;
    if n > 0 {
        let m = StridedIndex::new(OP, &out_shape, &[&broadcast_strides(c_shape, &out_shape)])?;
        let ptr =
            |o: &Option<DeviceBuffer>| o.as_ref().map_or(KernelArg::Ptr(0), DeviceBuffer::arg);
        // SAFETY: where_backward_f32(cond, gout, ga, gb, i64 n, meta); ga and gb are null or
        // hold n floats, meta maps the n indices into cond within its shape.
        unsafe {
            dev.launch(
                "where_backward_f32",
                LaunchDims::cover(n, THREADS),
                &[
                    cond.arg(),
                    gout.arg(),
                    ptr(&ga),
                    ptr(&gb),
                    KernelArg::I64(n as i64),
                    KernelArg::Index(m),
                ],
            )?;
        }
    }
    let ga = ga.map(|g| sum_to(&g, &out_shape, a_shape)).transpose()?;
    let gb = gb.map(|g| sum_to(&g, &out_shape, b_shape)).transpose()?;
    Ok((ga, gb))
}

/// Backward of a row reduction of `(rows, cols)` `x` to `y` (one value per row), given the
/// gradient `gy` of `y`: for [`Reduce::Max`] the gradient is shared evenly among the elements
/// equal to their row's maximum (PyTorch's `amax`); for [`Reduce::SumSquares`] `y` must be the
/// row norms (the square roots), and the gradient is `gy * x / y` (0 where the norm is 0).
pub fn reduce_rows_backward(
    x: &DeviceBuffer,
    y: &DeviceBuffer,
    gy: &DeviceBuffer,
    rows: usize,
    cols: usize,
    op: Reduce,
) -> Result<DeviceBuffer> {
    const OP: &str = "reduce_rows_backward";
    let dev = device_of(OP, &[x, y, gy])?;
    expect(OP, "x", x, rows * cols)?;
    expect(OP, "y", y, rows)?;
    expect(OP, "gy", gy, rows)?;
    let gx = f32_buf(&dev, rows * cols)?;
    if rows * cols == 0 {
        return Ok(gx);
    }
    let (kernel, dims) = match op {
        Reduce::Max => ("max_rows_backward_f32", LaunchDims::cover(rows, THREADS)),
        Reduce::SumSquares => (
            "norm_rows_backward_f32",
            LaunchDims::cover(rows * cols, THREADS),
        ),
        Reduce::Sum => {
            return Err(Error::Shape {
                op: OP,
                detail: "a sum's backward is a broadcast (strided_copy with stride 0)".into(),
            });
        }
    };
    // SAFETY: max_rows_backward_f32 / norm_rows_backward_f32(x, y, gy, gx, i64 rows, i64 cols);
    // x and gx hold rows*cols floats, y and gy rows.
    unsafe {
        dev.launch(
            kernel,
            dims,
            &[
                x.arg(),
                y.arg(),
                gy.arg(),
                gx.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
            ],
        )?;
    }
    Ok(gx)
}

/// Reductions of [`reduce_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// Sum.
    Sum,
    /// Maximum.
    Max,
    /// Sum of squares.
    SumSquares,
}

/// One value per row of the `(rows, cols)` matrix `x`.
pub fn reduce_rows(x: &DeviceBuffer, rows: usize, cols: usize, op: Reduce) -> Result<DeviceBuffer> {
    const OP: &str = "reduce_rows";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, rows * cols)?;
    let y = f32_buf(&dev, rows)?;
    // SAFETY: reduce_rows_f32(x, y, i64 rows, i64 cols, int op); x holds rows*cols floats, y rows.
    unsafe {
        dev.launch(
            "reduce_rows_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::I32(op as i32),
            ],
        )?;
    }
    Ok(y)
}

/// Column sums of the `(rows, cols)` matrix `x`.
pub fn sum_cols(x: &DeviceBuffer, rows: usize, cols: usize) -> Result<DeviceBuffer> {
    const OP: &str = "sum_cols";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, rows * cols)?;
    let y = f32_buf(&dev, cols)?;
    // SAFETY: sum_cols_f32(x, y, i64 rows, i64 cols); x holds rows*cols floats, y cols.
    unsafe {
        dev.launch(
            "sum_cols_f32",
            LaunchDims::cover(cols, THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
            ],
        )?;
    }
    Ok(y)
}

/// Softmax (or log-softmax) over each row of `(rows, cols)`.
pub fn softmax_rows(x: &DeviceBuffer, rows: usize, cols: usize, log: bool) -> Result<DeviceBuffer> {
    const OP: &str = "softmax_rows";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, rows * cols)?;
    let y = f32_buf(&dev, rows * cols)?;
    // SAFETY: softmax_rows_f32(x, y, i64 rows, i64 cols, int log); both hold rows*cols floats.
    unsafe {
        dev.launch(
            "softmax_rows_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::I32(log as i32),
            ],
        )?;
    }
    Ok(y)
}

/// Backward of [`softmax_rows`] from its output `y`.
pub fn softmax_rows_backward(
    y: &DeviceBuffer,
    gy: &DeviceBuffer,
    rows: usize,
    cols: usize,
    log: bool,
) -> Result<DeviceBuffer> {
    const OP: &str = "softmax_rows_backward";
    let dev = device_of(OP, &[y, gy])?;
    expect(OP, "y", y, rows * cols)?;
    expect(OP, "gy", gy, rows * cols)?;
    let gx = f32_buf(&dev, rows * cols)?;
    // SAFETY: softmax_rows_backward_f32(y, gy, gx, i64 rows, i64 cols, int log); rows*cols each.
    unsafe {
        dev.launch(
            "softmax_rows_backward_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                y.arg(),
                gy.arg(),
                gx.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::I32(log as i32),
            ],
        )?;
    }
    Ok(gx)
}

/// The forward of [`layer_norm_rows`]: output and the per-row statistics its backward needs.
#[derive(Debug)]
pub struct LayerNormForward {
    /// `(rows, cols)` output.
    pub y: DeviceBuffer,
    /// Per-row mean.
    pub mean: DeviceBuffer,
    /// Per-row `1 / sqrt(var + eps)`.
    pub rstd: DeviceBuffer,
}

/// Layer norm over each row of `(rows, cols)`, with optional `gamma` and `beta` of `cols`.
pub fn layer_norm_rows(
    x: &DeviceBuffer,
    gamma: Option<&DeviceBuffer>,
    beta: Option<&DeviceBuffer>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<LayerNormForward> {
    const OP: &str = "layer_norm_rows";
    let mut all = vec![x];
    all.extend(gamma);
    all.extend(beta);
    let dev = device_of(OP, &all)?;
    expect(OP, "x", x, rows * cols)?;
    if let Some(g) = gamma {
        expect(OP, "gamma", g, cols)?;
    }
    if let Some(b) = beta {
        expect(OP, "beta", b, cols)?;
    }
    let y = f32_buf(&dev, rows * cols)?;
    let mean = f32_buf(&dev, rows)?;
    let rstd = f32_buf(&dev, rows)?;
    let opt = |o: Option<&DeviceBuffer>| o.map_or(KernelArg::Ptr(0), DeviceBuffer::arg);
    // SAFETY: layer_norm_rows_f32(x, gamma, beta, y, mean, rstd, i64 rows, i64 cols, float eps);
    // gamma and beta are null or hold cols floats, the rest the sizes checked or allocated above.
    unsafe {
        dev.launch(
            "layer_norm_rows_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                opt(gamma),
                opt(beta),
                y.arg(),
                mean.arg(),
                rstd.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::F32(eps),
            ],
        )?;
    }
    Ok(LayerNormForward { y, mean, rstd })
}

/// Backward of [`layer_norm_rows`]: `(gx, dgamma, dbeta)`, the last two when `gamma` was given.
pub fn layer_norm_rows_backward(
    x: &DeviceBuffer,
    gamma: Option<&DeviceBuffer>,
    fwd: &LayerNormForward,
    gy: &DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<(DeviceBuffer, Option<DeviceBuffer>, Option<DeviceBuffer>)> {
    const OP: &str = "layer_norm_rows_backward";
    let mut all = vec![x, gy, &fwd.mean, &fwd.rstd];
    all.extend(gamma);
    let dev = device_of(OP, &all)?;
    expect(OP, "x", x, rows * cols)?;
    expect(OP, "gy", gy, rows * cols)?;
    expect(OP, "mean", &fwd.mean, rows)?;
    expect(OP, "rstd", &fwd.rstd, rows)?;
    if let Some(g) = gamma {
        expect(OP, "gamma", g, cols)?;
    }
    let gx = f32_buf(&dev, rows * cols)?;
    let gyx = gamma.map(|_| f32_buf(&dev, rows * cols)).transpose()?;
    // SAFETY: layer_norm_rows_backward_f32(x, gamma, mean, rstd, gy, gx, gy_xhat, i64 rows,
    // i64 cols); gamma and gy_xhat are null or of the sizes checked or allocated above.
    unsafe {
        dev.launch(
            "layer_norm_rows_backward_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                gamma.map_or(KernelArg::Ptr(0), DeviceBuffer::arg),
                fwd.mean.arg(),
                fwd.rstd.arg(),
                gy.arg(),
                gx.arg(),
                gyx.as_ref().map_or(KernelArg::Ptr(0), DeviceBuffer::arg),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
            ],
        )?;
    }
    let dgamma = gyx.map(|b| sum_cols(&b, rows, cols)).transpose()?;
    let dbeta = gamma.map(|_| sum_cols(gy, rows, cols)).transpose()?;
    Ok((gx, dgamma, dbeta))
}

/// Scale norm over each row of `(rows, cols)` (performer-pytorch's `ScaleNorm`):
/// `y = x / max(|x|, eps) * g` with the scalar `g` on the device; returns `y` and the clamped
/// norms its backward needs.
pub fn scale_norm_rows(
    x: &DeviceBuffer,
    g: &DeviceBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    const OP: &str = "scale_norm_rows";
    let dev = device_of(OP, &[x, g])?;
    expect(OP, "x", x, rows * cols)?;
    expect(OP, "g", g, 1)?;
    let y = f32_buf(&dev, rows * cols)?;
    let norm = f32_buf(&dev, rows)?;
    // SAFETY: scale_norm_rows_f32(x, g, y, norm, i64 rows, i64 cols, float eps); x and y hold
    // rows*cols floats, g one, norm rows.
    unsafe {
        dev.launch(
            "scale_norm_rows_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                g.arg(),
                y.arg(),
                norm.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::F32(eps),
            ],
        )?;
    }
    Ok((y, norm))
}

/// Backward of [`scale_norm_rows`]: `(gx, dg)`, `dg` one element.
pub fn scale_norm_rows_backward(
    x: &DeviceBuffer,
    g: &DeviceBuffer,
    norm: &DeviceBuffer,
    gy: &DeviceBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(DeviceBuffer, DeviceBuffer)> {
    const OP: &str = "scale_norm_rows_backward";
    let dev = device_of(OP, &[x, g, norm, gy])?;
    expect(OP, "x", x, rows * cols)?;
    expect(OP, "g", g, 1)?;
    expect(OP, "norm", norm, rows)?;
    expect(OP, "gy", gy, rows * cols)?;
    let gx = f32_buf(&dev, rows * cols)?;
    let dg_rows = f32_buf(&dev, rows)?;
    // SAFETY: scale_norm_rows_backward_f32(x, g, norm, gy, gx, dg_rows, i64 rows, i64 cols,
    // float eps); sizes as checked or allocated above.
    unsafe {
        dev.launch(
            "scale_norm_rows_backward_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                x.arg(),
                g.arg(),
                norm.arg(),
                gy.arg(),
                gx.arg(),
                dg_rows.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::F32(eps),
            ],
        )?;
    }
    let dg = reduce_rows(&dg_rows, 1, rows, Reduce::Sum)?;
    Ok((gx, dg))
}

fn check_ids(
    op: &'static str,
    what: &str,
    ids: &[i64],
    limit: usize,
    allowed: Option<i64>,
) -> Result<()> {
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| Some(id) != allowed && (id < 0 || id as usize >= limit))
    {
        return Err(Error::Shape {
            op,
            detail: format!("{what}[{i}] = {id} is outside [0, {limit})"),
        });
    }
    Ok(())
}

/// Rows `ids` of the `(vocab, dim)` table, `(ids.len(), dim)`. The ids are checked on the
/// host, then uploaded (a copy to the device, no wait for it).
pub fn embedding(
    table: &DeviceBuffer,
    vocab: usize,
    dim: usize,
    ids: &[i64],
) -> Result<DeviceBuffer> {
    const OP: &str = "embedding";
    let dev = device_of(OP, &[table])?;
    expect(OP, "table", table, vocab * dim)?;
    check_ids(OP, "ids", ids, vocab, None)?;
    let ids_dev = DeviceBuffer::from_i64(&dev, ids)?;
    embedding_device_ids(table, vocab, dim, &ids_dev)
}

/// [`embedding`] with ids already on the device (checked there: an id out of range is
/// reported when the error flag is read, which waits for the device).
pub fn embedding_device_ids(
    table: &DeviceBuffer,
    vocab: usize,
    dim: usize,
    ids: &DeviceBuffer,
) -> Result<DeviceBuffer> {
    const OP: &str = "embedding";
    let dev = device_of(OP, &[table, ids])?;
    expect(OP, "table", table, vocab * dim)?;
    let n = ids.len();
    let out = f32_buf(&dev, n * dim)?;
    let err = DeviceBuffer::alloc(&dev, 1, Elem::F32)?;
    fill(&err, 0.0)?;
    // SAFETY: embedding_f32(table, ids, out, i64 n_ids, int dim, i64 vocab, int* err); ids
    // holds n i64s (checked elem type below by construction: from_i64), out n*dim floats, and
    // the kernel reads table only at rows in [0, vocab).
    unsafe {
        dev.launch(
            "embedding_f32",
            LaunchDims::cover(n * dim, THREADS),
            &[
                table.arg(),
                ids.arg(),
                out.arg(),
                KernelArg::I64(n as i64),
                KernelArg::I32(dim as i32),
                KernelArg::I64(vocab as i64),
                err.arg(),
            ],
        )?;
    }
    Ok(out)
}

/// Gradient of the table of [`embedding`]: `(vocab, dim)`, rows scatter-added.
pub fn embedding_backward(
    gout: &DeviceBuffer,
    ids: &[i64],
    vocab: usize,
    dim: usize,
) -> Result<DeviceBuffer> {
    const OP: &str = "embedding_backward";
    let dev = device_of(OP, &[gout])?;
    expect(OP, "gout", gout, ids.len() * dim)?;
    check_ids(OP, "ids", ids, vocab, None)?;
    let ids_dev = DeviceBuffer::from_i64(&dev, ids)?;
    let g = full(&dev, vocab * dim, 0.0)?;
    // SAFETY: embedding_backward_f32(gout, ids, gtable, i64 n_ids, int dim, i64 vocab); gout
    // holds n*dim floats, ids n i64s, gtable vocab*dim floats, ids checked in [0, vocab).
    unsafe {
        dev.launch(
            "embedding_backward_f32",
            LaunchDims::cover(ids.len() * dim, THREADS),
            &[
                gout.arg(),
                ids_dev.arg(),
                g.arg(),
                KernelArg::I64(ids.len() as i64),
                KernelArg::I32(dim as i32),
                KernelArg::I64(vocab as i64),
            ],
        )?;
    }
    Ok(g)
}

/// What [`cross_entropy`] keeps for its backward.
#[derive(Debug)]
pub struct CrossEntropyForward {
    /// The mean loss over rows whose target is not ignored, one element.
    pub loss: DeviceBuffer,
    /// Per-row log-sum-exp.
    pub lse: DeviceBuffer,
    /// Number of rows counted, one element.
    pub count: DeviceBuffer,
    /// The targets on the device.
    pub targets: DeviceBuffer,
}

/// Mean cross-entropy of `(rows, cols)` logits against `targets` (rows ignored where the target
/// is `ignore_index`), computed on the device.
pub fn cross_entropy(
    logits: &DeviceBuffer,
    rows: usize,
    cols: usize,
    targets: &[i64],
    ignore_index: i64,
) -> Result<CrossEntropyForward> {
    const OP: &str = "cross_entropy";
    let dev = device_of(OP, &[logits])?;
    expect(OP, "logits", logits, rows * cols)?;
    if targets.len() != rows {
        return Err(Error::Shape {
            op: OP,
            detail: format!("{} targets for {rows} rows", targets.len()),
        });
    }
    check_ids(OP, "targets", targets, cols, Some(ignore_index))?;
    let t = DeviceBuffer::from_i64(&dev, targets)?;
    let loss_rows = f32_buf(&dev, rows)?;
    let valid = f32_buf(&dev, rows)?;
    let lse = f32_buf(&dev, rows)?;
    let err = full(&dev, 1, 0.0)?;
    // SAFETY: cross_entropy_f32(logits, targets, loss, valid, lse, i64 rows, i64 cols, i64
    // ignore, int* err); logits rows*cols floats, targets rows i64s, the outputs rows floats.
    unsafe {
        dev.launch(
            "cross_entropy_f32",
            LaunchDims::grid3(rows.clamp(1, 65535), 1, 1, THREADS),
            &[
                logits.arg(),
                t.arg(),
                loss_rows.arg(),
                valid.arg(),
                lse.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::I64(ignore_index),
                err.arg(),
            ],
        )?;
    }
    let total = reduce_rows(&loss_rows, 1, rows, Reduce::Sum)?;
    let count = reduce_rows(&valid, 1, rows, Reduce::Sum)?;
    let loss = f32_buf(&dev, 1)?;
    // SAFETY: ratio_f32(num, den, out), one float each.
    unsafe {
        dev.launch(
            "ratio_f32",
            LaunchDims::cover(1, 32),
            &[total.arg(), count.arg(), loss.arg()],
        )?;
    }
    Ok(CrossEntropyForward {
        loss,
        lse,
        count,
        targets: t,
    })
}

/// Gradient of [`cross_entropy`]'s mean loss with respect to the logits, given the loss's
/// gradient `gloss` (one element, on the device).
pub fn cross_entropy_backward(
    logits: &DeviceBuffer,
    fwd: &CrossEntropyForward,
    gloss: &DeviceBuffer,
    rows: usize,
    cols: usize,
    ignore_index: i64,
) -> Result<DeviceBuffer> {
    const OP: &str = "cross_entropy_backward";
    let dev = device_of(OP, &[logits, gloss, &fwd.lse, &fwd.count, &fwd.targets])?;
    expect(OP, "logits", logits, rows * cols)?;
    expect(OP, "gloss", gloss, 1)?;
    expect(OP, "lse", &fwd.lse, rows)?;
    let g = f32_buf(&dev, rows * cols)?;
    // SAFETY: cross_entropy_backward_f32(logits, targets, lse, gloss, count, glogits, i64 rows,
    // i64 cols, i64 ignore); sizes as checked above (targets: rows i64s from the forward).
    unsafe {
        dev.launch(
            "cross_entropy_backward_f32",
            LaunchDims::cover(rows * cols, THREADS),
            &[
                logits.arg(),
                fwd.targets.arg(),
                fwd.lse.arg(),
                gloss.arg(),
                fwd.count.arg(),
                g.arg(),
                KernelArg::I64(rows as i64),
                KernelArg::I64(cols as i64),
                KernelArg::I64(ignore_index),
            ],
        )?;
    }
    Ok(g)
}

/// Dropout with keep probability `1 - p` from the counter-based generator: the same
/// `(seed, offset)` gives the same mask, so the backward is this function applied to the
/// output gradient.
pub fn dropout(x: &DeviceBuffer, p: f32, seed: u64, offset: u64) -> Result<DeviceBuffer> {
    const OP: &str = "dropout";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, x.len())?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Shape {
            op: OP,
            detail: format!("p = {p} is outside [0, 1)"),
        });
    }
    let y = f32_buf(&dev, x.len())?;
    // SAFETY: dropout_f32(x, y, i64 n, float p, u64 seed, u64 offset); both hold n floats.
    unsafe {
        dev.launch(
            "dropout_f32",
            LaunchDims::cover(x.len(), THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(x.len() as i64),
                KernelArg::F32(p),
                KernelArg::U64(seed),
                KernelArg::U64(offset),
            ],
        )?;
    }
    Ok(y)
}

/// Rotary embedding of `x` `(groups, n, d)` with `sin`, `cos` `(n, d)`; `transpose` applies the
/// adjoint (the backward). `d` must be even.
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    x: &DeviceBuffer,
    sin: &DeviceBuffer,
    cos: &DeviceBuffer,
    groups: usize,
    n: usize,
    d: usize,
    transpose: bool,
) -> Result<DeviceBuffer> {
    const OP: &str = "rotary";
    let dev = device_of(OP, &[x, sin, cos])?;
    if !d.is_multiple_of(2) {
        return Err(Error::Shape {
            op: OP,
            detail: format!("the rotated width {d} is odd"),
        });
    }
    expect(OP, "x", x, groups * n * d)?;
    expect(OP, "sin", sin, n * d)?;
    expect(OP, "cos", cos, n * d)?;
    let y = f32_buf(&dev, groups * n * d)?;
    // SAFETY: rotary_f32(x, sin, cos, y, i64 groups, int n, int d, int transpose); sizes checked
    // above, d even so every pair partner is inside its row.
    unsafe {
        dev.launch(
            "rotary_f32",
            LaunchDims::cover(groups * n * d, THREADS),
            &[
                x.arg(),
                sin.arg(),
                cos.arg(),
                y.arg(),
                KernelArg::I64(groups as i64),
                KernelArg::I32(n as i32),
                KernelArg::I32(d as i32),
                KernelArg::I32(transpose as i32),
            ],
        )?;
    }
    Ok(y)
}

/// Token shift of `x` `(batch, n, d)`: columns `cols` move `shift` positions along `n` (zeros
/// enter), the others are copied. The backward is the same call with `-shift`.
pub fn token_shift(
    x: &DeviceBuffer,
    batch: usize,
    n: usize,
    d: usize,
    cols: std::ops::Range<usize>,
    shift: i32,
) -> Result<DeviceBuffer> {
    const OP: &str = "token_shift";
    let dev = device_of(OP, &[x])?;
    expect(OP, "x", x, batch * n * d)?;
    if cols.start > cols.end || cols.end > d {
        return Err(Error::Shape {
            op: OP,
            detail: format!("columns {cols:?} of a width of {d}"),
        });
    }
    let y = f32_buf(&dev, batch * n * d)?;
    // SAFETY: token_shift_f32(x, y, i64 batch, int n, int d, int col0, int col1, int shift);
    // both hold batch*n*d floats; sources outside the sequence are not read.
    unsafe {
        dev.launch(
            "token_shift_f32",
            LaunchDims::cover(batch * n * d, THREADS),
            &[
                x.arg(),
                y.arg(),
                KernelArg::I64(batch as i64),
                KernelArg::I32(n as i32),
                KernelArg::I32(d as i32),
                KernelArg::I32(cols.start as i32),
                KernelArg::I32(cols.end as i32),
                KernelArg::I32(shift),
            ],
        )?;
    }
    Ok(y)
}

/// Hyper-parameters of [`adam_step`] (PyTorch's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// AdamW's decoupled decay instead of Adam's L2 term.
    pub decoupled: bool,
}

/// One Adam/AdamW update of `p` in place (`m`, `v` the moment buffers, `step` counting from 1).
pub fn adam_step(
    p: &DeviceBuffer,
    g: &DeviceBuffer,
    m: &DeviceBuffer,
    v: &DeviceBuffer,
    step: u64,
    cfg: AdamConfig,
) -> Result<()> {
    const OP: &str = "adam_step";
    let dev = device_of(OP, &[p, g, m, v])?;
    let n = p.len();
    for (what, b) in [("g", g), ("m", m), ("v", v)] {
        expect(OP, what, b, n)?;
    }
    let bc1 = 1.0 - (cfg.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (cfg.beta2 as f64).powi(step as i32);
    // SAFETY: adam_f32(p, g, m, v, i64 n, lr, beta1, beta2, eps, wd, bc1, bc2, int decoupled);
    // the four buffers hold n floats.
    unsafe {
        dev.launch(
            "adam_f32",
            LaunchDims::cover(n, THREADS),
            &[
                p.arg(),
                g.arg(),
                m.arg(),
                v.arg(),
                KernelArg::I64(n as i64),
                KernelArg::F32(cfg.lr),
                KernelArg::F32(cfg.beta1),
                KernelArg::F32(cfg.beta2),
                KernelArg::F32(cfg.eps),
                KernelArg::F32(cfg.weight_decay),
                KernelArg::F32(bc1 as f32),
                KernelArg::F32(bc2 as f32),
                KernelArg::I32(cfg.decoupled as i32),
            ],
        )
    }
}

/// Hyper-parameters of [`sgd_step`] (PyTorch's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0: none, `buf` unused).
    pub momentum: f32,
    /// Dampening of the momentum.
    pub dampening: f32,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// One SGD update of `p` in place; `first` marks the first step (the buffer starts as the
/// gradient).
pub fn sgd_step(
    p: &DeviceBuffer,
    g: &DeviceBuffer,
    buf: &DeviceBuffer,
    first: bool,
    cfg: SgdConfig,
) -> Result<()> {
    const OP: &str = "sgd_step";
    let dev = device_of(OP, &[p, g, buf])?;
    let n = p.len();
    expect(OP, "g", g, n)?;
    expect(OP, "buf", buf, n)?;
    // SAFETY: sgd_f32(p, g, buf, i64 n, lr, momentum, dampening, wd, int nesterov, int first);
    // the three buffers hold n floats.
    unsafe {
        dev.launch(
            "sgd_f32",
            LaunchDims::cover(n, THREADS),
            &[
                p.arg(),
                g.arg(),
                buf.arg(),
                KernelArg::I64(n as i64),
                KernelArg::F32(cfg.lr),
                KernelArg::F32(cfg.momentum),
                KernelArg::F32(cfg.dampening),
                KernelArg::F32(cfg.weight_decay),
                KernelArg::I32(cfg.nesterov as i32),
                KernelArg::I32(first as i32),
            ],
        )
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping as a one-element device buffer (read it
/// only when needed: reading waits for the device).
pub fn clip_grad_norm(grads: &[&DeviceBuffer], max_norm: f32) -> Result<DeviceBuffer> {
    const OP: &str = "clip_grad_norm";
    if grads.is_empty() {
        return Err(Error::Shape {
            op: OP,
            detail: "no gradients".into(),
        });
    }
    let dev = device_of(OP, grads)?;
    let partial = f32_buf(&dev, grads.len())?;
    for (i, g) in grads.iter().enumerate() {
        let s = reduce_rows(g, 1, g.len(), Reduce::SumSquares)?;
        dev.copy_d2d(partial.ptr_at(i), s.ptr(), 4)?;
    }
    let sumsq = reduce_rows(&partial, 1, grads.len(), Reduce::Sum)?;
    for g in grads {
        // SAFETY: clip_scale_f32(x, i64 n, const float* sumsq, float max_norm); g holds n
        // floats, sumsq one.
        unsafe {
            dev.launch(
                "clip_scale_f32",
                LaunchDims::cover(g.len(), THREADS),
                &[
                    g.arg(),
                    KernelArg::I64(g.len() as i64),
                    sumsq.arg(),
                    KernelArg::F32(max_norm),
                ],
            )?;
        }
    }
    unary(&sumsq, Unary::Sqrt)
}

/// `C = op(A) op(B)` for `batch` row-major matrices: `op(A)` `(m, k)`, `op(B)` `(k, n)`, `C`
/// `(m, n)`, where `ta`/`tb` mean the stored matrix is the transpose (`(k, m)` / `(n, k)`).
/// Runs as one cuBLAS strided-batched GEMM computing `C^T = op(B)^T op(A)^T` in column-major
/// terms, which is how a row-major product is handed to cuBLAS without copies.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &DeviceBuffer,
    ta: bool,
    b: &DeviceBuffer,
    tb: bool,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Result<DeviceBuffer> {
    gemm("matmul", a, ta, b, tb, batch, m, k, n)
}

/// [`matmul`] on bf16 buffers (autocast with bf16 activations,
/// [`Launcher::gemm_strided_batched_bf16_storage`](crate::Launcher::gemm_strided_batched_bf16_storage)):
/// `a` and `b` must hold bf16; products accumulate in f32; `C` is `out` ([`Elem::F32`], or
/// [`Elem::Bf16`] rounded to nearest even).
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_storage(
    a: &DeviceBuffer,
    ta: bool,
    b: &DeviceBuffer,
    tb: bool,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    out: Elem,
) -> Result<DeviceBuffer> {
    const OP: &str = "matmul_bf16_storage";
    let dev = device_of(OP, &[a, b])?;
    expect_elem(OP, "a", a, batch * m * k, Elem::Bf16)?;
    expect_elem(OP, "b", b, batch * k * n, Elem::Bf16)?;
    if out == Elem::I64 {
        return Err(Error::Shape {
            op: OP,
            detail: "the product is written as f32 or bf16, not i64".into(),
        });
    }
    check_gemm_sizes(OP, batch, m, k, n)?;
    let c = DeviceBuffer::alloc(&dev, batch * m * n, out)?;
    if batch * m * n == 0 {
        return Ok(c);
    }
    if k == 0 {
        // +0.0 is all-zero bits in both f32 and bf16.
        let zeros = vec![0u8; c.len() * out.size()];
        dev.copy_h2d(c.ptr(), &zeros)?;
        return Ok(c);
    }
    let g = row_major_gemm(a, ta, b, tb, batch, m, k, n, &c);
    // SAFETY: every matrix of every batch lies in a, b, c, whose lengths and element types
    // were checked above against batch * (m*k, k*n, m*n) with the leading dimensions of their
    // row-major storage, counted in their own (2- or 4-byte) elements.
    unsafe { dev.gemm_strided_batched_bf16_storage(&g, out == Elem::Bf16) }?;
    Ok(c)
}

/// Fails unless `b` holds `len` values of `elem`.
fn expect_elem(
    op: &'static str,
    what: &str,
    b: &DeviceBuffer,
    len: usize,
    elem: Elem,
) -> Result<()> {
    if b.elem() != elem || b.len() != len {
        return Err(Error::Shape {
            op,
            detail: format!(
                "{what} holds {} {:?} values, expected {len} {elem:?}",
                b.len(),
                b.elem()
            ),
        });
    }
    Ok(())
}

fn check_gemm_sizes(op: &'static str, batch: usize, m: usize, k: usize, n: usize) -> Result<()> {
    for (what, v) in [("m", m), ("n", n), ("k", k), ("batch", batch)] {
        if v > i32::MAX as usize {
            return Err(Error::TooLarge {
                op,
                detail: format!("{what} = {v} exceeds cuBLAS's int"),
            });
        }
    }
    Ok(())
}

/// The column-major GEMM that computes the row-major `C = op(A) op(B)`: `C^T (n x m, ld n) =
/// B' (n x k) * A' (k x m)`. Row-major B stored `(k, n)` is column-major `(n x k)` with ld n:
/// no transpose; stored `(n, k)` (`tb`) is its transpose with ld k. Likewise A.
#[allow(clippy::too_many_arguments)]
fn row_major_gemm(
    a: &DeviceBuffer,
    ta: bool,
    b: &DeviceBuffer,
    tb: bool,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    c: &DeviceBuffer,
) -> GemmStridedBatched {
    GemmStridedBatched {
        transa: if tb { Transpose::Yes } else { Transpose::No },
        transb: if ta { Transpose::Yes } else { Transpose::No },
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: 1.0,
        a: b.ptr(),
        lda: if tb { k as i32 } else { n as i32 },
        stride_a: (k * n) as i64,
        b: a.ptr(),
        ldb: if ta { m as i32 } else { k as i32 },
        stride_b: (m * k) as i64,
        beta: 0.0,
        c: c.ptr(),
        ldc: n as i32,
        stride_c: (m * n) as i64,
        batch: batch as i32,
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    op: &'static str,
    a: &DeviceBuffer,
    ta: bool,
    b: &DeviceBuffer,
    tb: bool,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Result<DeviceBuffer> {
    let dev = device_of(op, &[a, b])?;
    expect(op, "a", a, batch * m * k)?;
    expect(op, "b", b, batch * k * n)?;
    check_gemm_sizes(op, batch, m, k, n)?;
    let c = f32_buf(&dev, batch * m * n)?;
    if batch * m * n == 0 {
        return Ok(c);
    }
    if k == 0 {
        fill(&c, 0.0)?;
        return Ok(c);
    }
    let g = row_major_gemm(a, ta, b, tb, batch, m, k, n, &c);
    // SAFETY: every matrix of every batch lies in a, b, c, whose lengths were checked above
    // against batch * (m*k, k*n, m*n) with the leading dimensions of their row-major storage.
    unsafe { dev.gemm_strided_batched(&g) }?;
    Ok(c)
}

/// `x` (f32) rounded to bf16 storage: round to nearest, ties to even; NaN stays NaN, values
/// past bf16's largest finite become infinities (the hardware conversion's rule).
pub fn to_bf16(x: &DeviceBuffer) -> Result<DeviceBuffer> {
    convert(x, Elem::F32, Elem::Bf16, "f32_to_bf16")
}

/// `x` (bf16) widened to f32 (exact).
pub fn to_f32(x: &DeviceBuffer) -> Result<DeviceBuffer> {
    convert(x, Elem::Bf16, Elem::F32, "bf16_to_f32")
}

fn convert(x: &DeviceBuffer, from: Elem, to: Elem, kernel: &'static str) -> Result<DeviceBuffer> {
    expect_elem(kernel, "x", x, x.len(), from)?;
    let dev = x.launcher().clone();
    let y = DeviceBuffer::alloc(&dev, x.len(), to)?;
    if x.is_empty() {
        return Ok(y);
    }
    // SAFETY: f32_to_bf16(const float* x, unsigned short* y, i64 n) and bf16_to_f32 (the same
    // with the types swapped): x holds n values of `from` and y n of `to` (checked above and
    // allocated so).
    unsafe {
        dev.launch(
            kernel,
            LaunchDims::cover(x.len(), THREADS),
            &[x.arg(), y.arg(), KernelArg::I64(x.len() as i64)],
        )?;
    }
    Ok(y)
}
