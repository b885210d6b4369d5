//! Position information: the fixed sinusoidal table (added to token embeddings, and used as the
//! rotary table of the FAVOR+ heads), learned absolute embeddings, and axial embeddings with
//! the semantics of axial-positional-embedding 0.3.12.

use ndarray::{Array2, ArrayD, IxDyn};
use performer_tensor::fast_math::rotate_pairs;
use performer_tensor::{Buffer, Error, Module, Param, Result, Tensor, Visitor};
use performer_tensor::{CustomOp, Data, apply_custom_op};
use rayon::prelude::*;

use crate::embedding::Embedding;
use crate::init;

/// `[sin(t f) | cos(t f)]` for `t < max_seq_len` and `f = 10000^(-2i/dim)`, stored as the
/// buffer `emb` `(max_seq_len, dim)`.
pub struct FixedPositionalEmbedding {
    /// The table.
    pub emb: Buffer,
    max_seq_len: usize,
}

impl FixedPositionalEmbedding {
    /// The table for `dim` features (even) and `max_seq_len` positions.
    pub fn new(dim: usize, max_seq_len: usize) -> Self {
        let half = dim.div_ceil(2);
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut emb = Array2::<f32>::zeros((max_seq_len, 2 * half));
        for t in 0..max_seq_len {
            for (i, f) in inv_freq.iter().enumerate() {
                let a = t as f32 * f;
                emb[[t, i]] = a.sin();
                emb[[t, half + i]] = a.cos();
            }
        }
        FixedPositionalEmbedding {
            emb: Buffer::new(emb.into_dyn()),
            max_seq_len,
        }
    }

    /// The first `n` rows as `(1, n, dim)`.
    pub fn forward(&self, n: usize) -> Result<Tensor> {
        if n > self.max_seq_len {
            return Err(Error::invalid(
                "FixedPositionalEmbedding",
                "sequence length",
                n,
                format!("must be at most max_seq_len {}", self.max_seq_len),
            ));
        }
        self.emb.tensor()?.narrow(0, 0, n)?.unsqueeze(0)
    }
}

impl Module for FixedPositionalEmbedding {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.buffer("emb", &self.emb);
    }
}

/// Swaps each pair of features `(x0, x1) -> (-x1, x0)` along the last axis.
pub fn rotate_every_two(x: &Tensor) -> Result<Tensor> {
    let Some(&d) = x.shape().last() else {
        return Err(Error::shape(
            "rotate_every_two",
            "needs a tensor with a feature axis, got a scalar (rank 0)",
        ));
    };
    if !d.is_multiple_of(2) {
        return Err(Error::shape(
            "rotate_every_two",
            format!("the last axis of {:?} must be even", x.shape()),
        ));
    }
    let mut pairs: Vec<isize> = x.shape()[..x.rank() - 1]
        .iter()
        .map(|&s| s as isize)
        .collect();
    pairs.extend([(d / 2) as isize, 2]);
    let p = x.reshape(&pairs)?;
    let rotated = Tensor::stack(&[p.select(-1, 1)?.neg(), p.select(-1, 0)?], -1)?;
    let shape: Vec<isize> = x.shape().iter().map(|&s| s as isize).collect();
    rotated.reshape(&shape)
}

/// performer-pytorch's `apply_rotary_pos_emb`: with `sinu_pos` `(1, n, d)` holding
/// `[sin | cos]`, each frequency is repeated for a pair of features and
/// `x -> x cos + rotate_every_two(x) sin` for both `q` and `k` `(..., n, d)`.
pub fn apply_rotary_pos_emb(q: &Tensor, k: &Tensor, sinu_pos: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if !q.device().is_cpu() {
        return Ok((apply_rotary(q, sinu_pos)?, apply_rotary(k, sinu_pos)?));
    }
    let op = rotary_op(sinu_pos, &[q, k])?;
    Ok((
        apply_custom_op(op.clone(), &[q])?.remove(0),
        apply_custom_op(op, &[k])?.remove(0),
    ))
}

/// [`apply_rotary_pos_emb`] of one tensor `x` `(..., n, d)` (a query alone at other positions
/// than the keys, say).
pub fn apply_rotary(x: &Tensor, sinu_pos: &Tensor) -> Result<Tensor> {
    // A device tensor is rotated by the device's kernel (the table moves to its device).
    #[cfg(feature = "cuda")]
    if !x.device().is_cpu() {
        return performer_tensor::device_ops::rotary(x, sinu_pos);
    }
    let op = rotary_op(sinu_pos, &[x])?;
    Ok(apply_custom_op(op, &[x])?.remove(0))
}

/// The rotation of table `sinu_pos` `(1, n, even d)` for tensors ending in `(n, d)`.
fn rotary_op(sinu_pos: &Tensor, xs: &[&Tensor]) -> Result<RotaryOp> {
    let (n, d) = match sinu_pos.shape() {
        [1, n, d] if d % 2 == 0 => (*n, *d),
        other => {
            return Err(Error::shape(
                "apply_rotary_pos_emb",
                format!("sinu_pos must be (1, n, even d), got {other:?}"),
            ));
        }
    };
    for t in xs {
        if t.rank() < 2 || t.shape()[t.rank() - 2] != n || t.shape()[t.rank() - 1] != d {
            return Err(Error::shape(
                "apply_rotary_pos_emb",
                format!("{:?} does not end in (n, d) = ({n}, {d})", t.shape()),
            ));
        }
    }
    let table = sinu_pos
        .data()
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((n, d))
        .map_err(|e| Error::shape("apply_rotary_pos_emb", e.to_string()))?;
    let half = d / 2;
    // Expanded to the rows' width for `fast_math::rotate_pairs`: pair i of every row meets
    // (cos_i, cos_i) and (-sin_i, sin_i).
    let (sin, cos) = (
        table.slice(ndarray::s![.., ..half]),
        table.slice(ndarray::s![.., half..]),
    );
    let (mut sin2, mut cos2) = (Array2::zeros((n, d)), Array2::zeros((n, d)));
    for (((s_row, c_row), mut s2), mut c2) in sin
        .rows()
        .into_iter()
        .zip(cos.rows())
        .zip(sin2.rows_mut())
        .zip(cos2.rows_mut())
    {
        let (s2, c2) = (
            s2.as_slice_mut().expect("fresh rows"),
            c2.as_slice_mut().expect("fresh rows"),
        );
        for (((&s, &c), s2), c2) in s_row
            .iter()
            .zip(&c_row)
            .zip(s2.chunks_exact_mut(2))
            .zip(c2.chunks_exact_mut(2))
        {
            s2.copy_from_slice(&[-s, s]);
            c2.copy_from_slice(&[c, c]);
        }
    }
    Ok(RotaryOp {
        sin: sin2,
        cos: cos2,
    })
}

/// Applies one position's rotary table row `sinu_pos` (`[sin | cos]`, `d` values) to every row
/// of `x` `(rows, d)` in place: [`apply_rotary_pos_emb`] for a single position, on plain
/// arrays (the decoding step's path).
pub fn rotate_rows(x: &mut ndarray::ArrayViewMut2<f32>, sinu_pos: &[f32]) -> Result<()> {
    let d = x.ncols();
    if sinu_pos.len() != d || !d.is_multiple_of(2) {
        return Err(Error::shape(
            "rotate_rows",
            format!("table row of {} values for rows of {d}", sinu_pos.len()),
        ));
    }
    let (sin, cos) = sinu_pos.split_at(d / 2);
    // Each pair `(x0, x1)` becomes `(x0 c - x1 s, x1 c + x0 s)` for its frequency's (sin, cos),
    // in place: both values are read before either is written.
    for mut row in x.rows_mut() {
        for (i, (&s, &c)) in sin.iter().zip(cos).enumerate() {
            let (x0, x1) = (row[2 * i], row[2 * i + 1]);
            row[2 * i] = x0 * c - x1 * s;
            row[2 * i + 1] = x1 * c + x0 * s;
        }
    }
    Ok(())
}

/// The offset (in elements, from `x.as_ptr()`) of the first value of every row along the last
/// axis of `x`, in logical order: an odometer over the leading axes and their strides, so a
/// permuted view is walked in place.
fn row_offsets(x: &ndarray::ArrayViewD<f32>) -> Vec<isize> {
    let lead = &x.shape()[..x.ndim().saturating_sub(1)];
    let strides = &x.strides()[..lead.len()];
    let rows: usize = lead.iter().product();
    let mut offsets = Vec::with_capacity(rows);
    let mut index = vec![0usize; lead.len()];
    let mut offset = 0isize;
    for _ in 0..rows {
        offsets.push(offset);
        // Advance the odometer: the last leading axis fastest.
        for axis in (0..lead.len()).rev() {
            index[axis] += 1;
            offset += strides[axis];
            if index[axis] < lead[axis] {
                break;
            }
            offset -= strides[axis] * lead[axis] as isize;
            index[axis] = 0;
        }
    }
    offsets
}

/// The rotary map as one fused op: per pair `(x0, x1)` at position `t` with frequency `i`,
/// `(x0 c - x1 s, x1 c + x0 s)` where `(s, c) = (sin, cos)[t, i]`; its backward is the inverse
/// rotation. (Composing it from `stack`/`select` copied every element several times.)
#[derive(Clone)]
struct RotaryOp {
    /// `(n, d)`: `(-sin, sin)` of each frequency per pair.
    sin: Array2<f32>,
    /// `(n, d)`: each frequency's cosine twice.
    cos: Array2<f32>,
}

impl RotaryOp {
    /// Rotates every `(n, d)` matrix of `x` by `sign * angle`.
    fn apply(&self, x: &ndarray::ArrayViewD<f32>, sign: f32) -> ArrayD<f32> {
        let shape = x.shape().to_vec();
        let (n, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let rows = x.len() / d.max(1);
        if d == 0 {
            return ArrayD::zeros(IxDyn(&shape));
        }
        // Written in full below, so never zeroed first.
        let mut out: Vec<f32> = Vec::with_capacity(x.len());
        // The rows of `x` in logical order, read in place: `x` is usually a permuted view
        // (heads split from the features), whose rows are contiguous though the whole is not;
        // copying it to standard layout first cost more than the rotation.
        let src = row_offsets(x);
        let (sin, cos) = (
            self.sin.as_slice().expect("a fresh table"),
            self.cos.as_slice().expect("a fresh table"),
        );
        let last_stride = x.strides()[shape.len() - 1];
        let rotate_rows =
            |(r, (dst, &offset)): (usize, (&mut [std::mem::MaybeUninit<f32>], &isize))| {
                let t = r % n;
                let (sn, cs) = (&sin[t * d..(t + 1) * d], &cos[t * d..(t + 1) * d]);
                if last_stride == 1 {
                    // SAFETY: `offset` is the offset of a row of `x`, whose d values are contiguous
                    // (unit stride) and live as long as the view `x` borrowed for this call.
                    let row = unsafe { std::slice::from_raw_parts(x.as_ptr().offset(offset), d) };
                    rotate_pairs(dst, row, cs, sn, sign);
                } else {
                    let row: Vec<f32> = (0..d as isize)
                        // SAFETY: as above, element by element along the row's stride.
                        .map(|j| unsafe { *x.as_ptr().offset(offset + j * last_stride) })
                        .collect();
                    rotate_pairs(dst, &row, cs, sn, sign);
                }
            };
        let dst = &mut out.spare_capacity_mut()[..rows * d];
        if x.len() >= performer_tensor::parallel::PAR_THRESHOLD {
            dst.par_chunks_mut(d)
                .zip(src.par_iter())
                .enumerate()
                .for_each(rotate_rows);
        } else {
            dst.chunks_mut(d)
                .zip(src.iter())
                .enumerate()
                .for_each(rotate_rows);
        }
        debug_assert_eq!(src.len(), rows);
        // SAFETY: `rotate_pairs` wrote all `rows * d` (= len) values of the spare capacity.
        unsafe { out.set_len(rows * d) };
        ArrayD::from_shape_vec(IxDyn(&shape), out).expect("same element count")
    }
}

impl CustomOp for RotaryOp {
    type Saved = ();

    fn name(&self) -> &'static str {
        "apply_rotary_pos_emb"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        Ok((vec![self.apply(&inputs[0].view(), 1.0)], ()))
    }

    fn backward(
        &self,
        _inputs: &[Data],
        _: &(),
        grads: &[Option<ArrayD<f32>>],
        _needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        Ok(vec![grads[0].as_ref().map(|g| self.apply(&g.view(), -1.0))])
    }
}

/// A learned table `emb` `(max_seq_len, dim)`; `forward(n)` gives its first `n` rows.
pub struct AbsolutePositionalEmbedding {
    /// The table, named `emb`.
    pub emb: Embedding,
}

impl AbsolutePositionalEmbedding {
    /// A table of `max_seq_len` positions.
    pub fn new(dim: usize, max_seq_len: usize) -> Self {
        AbsolutePositionalEmbedding {
            emb: Embedding::new(max_seq_len, dim),
        }
    }

    /// Rows `0..n` as `(n, dim)`.
    pub fn forward(&self, n: usize) -> Result<Tensor> {
        let ids = ndarray::Array1::from_iter(0..n as i64).into_dyn();
        self.emb.forward(&ids.view()).map_err(|_| {
            Error::invalid(
                "AbsolutePositionalEmbedding",
                "sequence length",
                n,
                format!("must be at most max_seq_len {}", self.emb.num_embeddings()),
            )
        })
    }
}

impl Module for AbsolutePositionalEmbedding {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("emb", &self.emb);
    }
}

/// Axial position embedding (summed variant): one parameter per axis of `axial_shape`,
/// `weights.i` of shape `(1, 1.., s_i, ..1, dim)`, broadcast over the other axes, summed, and
/// flattened in row-major order to `prod(axial_shape)` positions.
pub struct AxialPositionalEmbedding {
    /// One table per axis.
    pub weights: Vec<Param>,
    shape: Vec<usize>,
    dim: usize,
}

impl AxialPositionalEmbedding {
    /// Tables for positions laid out as `axial_shape` (initialized N(0, 1)).
    pub fn new(dim: usize, axial_shape: &[usize]) -> Result<Self> {
        if axial_shape.is_empty() || axial_shape.contains(&0) {
            return Err(Error::invalid(
                "AxialPositionalEmbedding",
                "axial_position_shape",
                format!("{axial_shape:?}"),
                "needs at least one axis, none of size 0",
            ));
        }
        let weights = (0..axial_shape.len())
            .map(|i| {
                let mut s = vec![1usize; axial_shape.len() + 2];
                s[i + 1] = axial_shape[i];
                s[axial_shape.len() + 1] = dim;
                Param::new(init::normal(&s))
            })
            .collect();
        Ok(AxialPositionalEmbedding {
            weights,
            shape: axial_shape.to_vec(),
            dim,
        })
    }

    /// Number of positions covered.
    pub fn max_seq_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Embeddings of positions `0..n` as `(1, n, dim)`.
    pub fn forward(&self, n: usize) -> Result<Tensor> {
        let max = self.max_seq_len();
        if n > max {
            return Err(Error::invalid(
                "AxialPositionalEmbedding",
                "sequence length",
                n,
                format!(
                    "must be at most the axial shape's {max} positions {:?}",
                    self.shape
                ),
            ));
        }
        let mut full = self.shape.clone();
        full.insert(0, 1);
        full.push(self.dim);
        let mut sum: Option<Tensor> = None;
        for w in &self.weights {
            let e = w.tensor().broadcast_to(&full)?;
            sum = Some(match sum {
                Some(s) => s.add(&e)?,
                None => e,
            });
        }
        let sum = sum.expect("at least one axis");
        sum.reshape(&[1, max as isize, self.dim as isize])?
            .narrow(1, 0, n)
    }
}

impl Module for AxialPositionalEmbedding {
    fn visit(&self, v: &mut Visitor<'_>) {
        for (i, w) in self.weights.iter().enumerate() {
            v.param(&format!("weights.{i}"), w);
        }
    }
}
