//! ScaleNorm's normalization `x / max(|x|, eps) * g` over the last axis as one op on the CPU.
//!
//! As four graph ops (norm, clamp, div, mul) its backward broadcast the norms and the scalar
//! `g` over the whole tensor, summed both back with full-size temporaries, and went through the
//! generic element-wise paths: in lm-full-1k (8 ScaleNorms a step, each recomputed by the
//! reversible stack's backward) it cost more than the step's local attention. Here the forward
//! is one pass per row with the same arithmetic as those ops (same bits), and the backward one
//! dot product and one pass per row.

use ndarray::{Array1, Array2, ArrayD, ArrayView1, ArrayViewD, Axis, IxDyn, Zip};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};

thread_local! {
    /// One row's squares in the forward, reused from row to row.
    static SQUARES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows from which the passes run on rayon's threads.
const PAR_ELEMENTS: usize = 1 << 15;

/// `x / max(|x|, eps) * g` with `|x|` the Euclidean norm over the last axis and `g` a tensor
/// of one element; `None` when `g` has more than one element (the caller then broadcasts with
/// tensor ops).
pub(crate) fn scale_norm(x: &Tensor, g: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if g.numel() != 1 || x.rank() == 0 {
        return Ok(None);
    }
    Ok(Some(
        apply_custom_op(ScaleNormOp { eps }, &[x, g])?.remove(0),
    ))
}

struct ScaleNormOp {
    eps: f32,
}

/// The input as `(rows, dim)` (a view when its strides allow one, which they do for the
/// reversible stack's halves).
fn as_rows<'a>(v: &'a ArrayViewD<'a, f32>) -> Result<ndarray::CowArray<'a, f32, ndarray::Ix2>> {
    let dim = v.shape().last().copied().unwrap_or(1);
    let rows = v.len().checked_div(dim).unwrap_or(0);
    v.to_shape((rows, dim))
        .map_err(|e| Error::shape("scale_norm", e.to_string()))
}

fn scalar(g: &Data) -> Result<f32> {
    g.view()
        .iter()
        .copied()
        .next()
        .ok_or_else(|| Error::shape("scale_norm", "g has no element"))
}

impl CustomOp for ScaleNormOp {
    /// Each row's norm before clamping.
    type Saved = Array1<f32>;

    fn name(&self) -> &'static str {
        "scale_norm"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, Array1<f32>)> {
        let xv = inputs[0].view();
        let x = as_rows(&xv)?;
        let g = scalar(inputs[1])?;
        let (rows, dim) = x.dim();
        let eps = self.eps;
        let mut out = Array2::<f32>::zeros((rows, dim));
        let mut norms = Array1::<f32>::zeros(rows);
        // The arithmetic of `x.norm(-1)` (squares, then ndarray's sum of the contiguous lane,
        // then sqrt), `clamp(eps)`, `div` and `mul`, so the output keeps their bits.
        let row = |mut o: ndarray::ArrayViewMut1<f32>, xr: ArrayView1<f32>, n: &mut f32| {
            // The squares go to this thread's buffer (reused row after row) and are summed as
            // ndarray sums a contiguous lane, as `norm` does on its array of squares.
            *n = SQUARES
                .with(|buf| {
                    let mut buf = buf.borrow_mut();
                    buf.clear();
                    buf.extend(xr.iter().map(|&v| v * v));
                    ArrayView1::from(&buf[..]).sum()
                })
                .sqrt();
            let nc = if *n < eps { eps } else { *n };
            Zip::from(&mut o).and(&xr).for_each(|o, &v| *o = v / nc * g);
        };
        let zip = Zip::from(out.rows_mut()).and(x.rows()).and(&mut norms);
        if rows * dim >= PAR_ELEMENTS {
            zip.par_for_each(row);
        } else {
            zip.for_each(row);
        }
        let out = out
            .into_shape_with_order(IxDyn(inputs[0].shape()))
            .map_err(|e| Error::shape("scale_norm", e.to_string()))?;
        Ok((vec![out], norms))
    }

    fn backward(
        &self,
        inputs: &[Data],
        norms: &Array1<f32>,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(dy) = &grads[0] else {
            return Ok(vec![None, None]);
        };
        let xv = inputs[0].view();
        let x = as_rows(&xv)?;
        let g = scalar(&inputs[1])?;
        let (rows, dim) = x.dim();
        let dy = dy
            .to_shape((rows, dim))
            .map_err(|e| Error::shape("scale_norm", e.to_string()))?;
        if norms.len() != rows {
            return Err(Error::shape(
                "scale_norm",
                format!("{} saved norms for {rows} rows", norms.len()),
            ));
        }
        let eps = self.eps;
        // Per row, with n the norm and c = max(n, eps): y = x g / c, so
        // dx = g dy / c + [n >= eps] (-g (dy.x) / c^2) x / n and dg = sum over rows (dy.x) / c.
        // (The clamp passes its gradient where n >= eps, as `clamp` does; a zero norm has none.)
        let mut dx = Array2::<f32>::zeros((rows, dim));
        let mut dg_rows = Array1::<f32>::zeros(rows);
        let row = |mut o: ndarray::ArrayViewMut1<f32>,
                   xr: ArrayView1<f32>,
                   gr: ArrayView1<f32>,
                   &n: &f32,
                   dg: &mut f32| {
            let nc = if n < eps { eps } else { n };
            // ndarray's dot: eight partial sums, so it vectorizes (a single running sum is
            // a chain of dependent adds).
            let dot = xr.dot(&gr);
            *dg = dot / nc;
            let direct = g / nc;
            let through_norm = if n >= eps && n > 0.0 {
                -g * dot / (nc * nc) / n
            } else {
                0.0
            };
            Zip::from(&mut o)
                .and(&xr)
                .and(&gr)
                .for_each(|o, &v, &d| *o = d * direct + through_norm * v);
        };
        let zip = Zip::from(dx.rows_mut())
            .and(x.rows())
            .and(dy.rows())
            .and(norms)
            .and(&mut dg_rows);
        if rows * dim >= PAR_ELEMENTS {
            zip.par_for_each(row);
        } else {
            zip.for_each(row);
        }
        let dx = needs[0]
            .then(|| dx.into_shape_with_order(IxDyn(inputs[0].shape())))
            .transpose()
            .map_err(|e| Error::shape("scale_norm", e.to_string()))?;
        let dg = needs[1].then(|| {
            ArrayD::from_elem(
                IxDyn(inputs[1].shape()),
                dg_rows.sum_axis(Axis(0)).into_scalar(),
            )
        });
        Ok(vec![dx, dg])
    }
}
