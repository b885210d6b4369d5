//! Token shift on the host as one op: [`crate::PreShiftTokens`]'s split into segments, the
//! masking, the moves along the sequence (narrow and pad) and the concatenation, in one pass
//! over `(b, n, dim)` forward and one backward. The composed form cost seven graph nodes and as
//! many copies per block: lm-small-64's profile had `cat`, `pad` and `narrow` at 2.8 ms of a
//! ~70 ms step. The results are the same bits: every output is a copy of an input or a zero.

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};

/// `y[b, t, c] = x[b, t - s, c]` where feature `c` lies in a segment shifted by `s` and
/// `t - s` is a position (and, with a mask, a kept one); zero there otherwise; features past
/// the shifted segments are copied. The backward is the same map with the shifts negated, the
/// mask applied at the source positions.
struct TokenShift {
    /// Features per segment.
    segment: usize,
    /// One shift per segment, from feature 0.
    shifts: Vec<i64>,
    /// Which positions are kept, `(b, n)`, when the input is masked.
    keep: Option<Array2<bool>>,
}

impl TokenShift {
    /// Writes the forward map (`direction` 1) or its adjoint (`direction` -1) of `src`, a
    /// standard-layout `(b, n, dim)` array, into `dst` of the same size, which holds zeros.
    fn apply(
        &self,
        src: &[f32],
        dst: &mut [f32],
        (batch, n, dim): (usize, usize, usize),
        direction: i64,
    ) {
        // Feature runs with their shift: the segments, then the copied remainder.
        let shifted_end = self.segment * self.shifts.len();
        let runs = self
            .shifts
            .iter()
            .enumerate()
            .map(|(i, &s)| (i * self.segment, (i + 1) * self.segment, s))
            .chain((shifted_end < dim).then_some((shifted_end, dim, 0)));
        let runs: Vec<(usize, usize, i64)> = runs.collect();
        for b in 0..batch {
            for t in 0..n {
                let row = (b * n + t) * dim;
                for &(c0, c1, shift) in &runs {
                    let from = t as i64 - direction * shift;
                    if !(0..n as i64).contains(&from) {
                        continue; // zeros enter
                    }
                    // Forward: the source position must be kept. Backward: the gradient flows
                    // only into kept positions (this one, `t`).
                    let masked_position = if direction > 0 { from } else { t as i64 } as usize;
                    let kept =
                        shift == 0 || self.keep.as_ref().is_none_or(|k| k[[b, masked_position]]);
                    if kept {
                        let src_row = (b * n + from as usize) * dim;
                        dst[row + c0..row + c1].copy_from_slice(&src[src_row + c0..src_row + c1]);
                    }
                }
            }
        }
    }
}

/// The forward (`direction` 1) or backward (-1) of `op` on a `(b, n, dim)` array.
fn shifted(op: &TokenShift, x: ndarray::ArrayViewD<f32>, direction: i64) -> Result<ArrayD<f32>> {
    let &[b, n, dim] = x.shape() else {
        return Err(Error::shape(
            "token_shift",
            format!("{:?} is not (b, n, dim)", x.shape()),
        ));
    };
    let contiguous;
    let src = match x.as_slice() {
        Some(s) => s,
        None => {
            contiguous = x.as_standard_layout().into_owned();
            contiguous.as_slice().expect("standard layout")
        }
    };
    let mut out = vec![0.0f32; src.len()];
    op.apply(src, &mut out, (b, n, dim), direction);
    Ok(ArrayD::from_shape_vec(x.raw_dim(), out).expect("the input's length"))
}

impl CustomOp for TokenShift {
    type Saved = ();

    fn name(&self) -> &'static str {
        "token_shift"
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        Ok((vec![shifted(self, inputs[0].view(), 1)?], ()))
    }

    fn backward(
        &self,
        _inputs: &[Data],
        _saved: &(),
        grad_outputs: &[Option<ArrayD<f32>>],
        needs_input_grad: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        match (&grad_outputs[0], needs_input_grad[0]) {
            (Some(g), true) => Ok(vec![Some(shifted(self, g.view(), -1)?)]),
            _ => Ok(vec![None]),
        }
    }
}

/// Token shift of a host tensor `x` `(b, n, dim)`: segment `i` (features `i * segment ..
/// (i + 1) * segment`) moved by `shifts[i]` positions along the sequence, zeros entering;
/// features past the segments copied. With `keep` `(b, n)`, the shifted segments read zeros
/// from positions it marks false. The caller checks the shapes.
pub(crate) fn token_shift(
    x: &Tensor,
    segment: usize,
    shifts: &[i64],
    keep: Option<ndarray::ArrayView2<'_, bool>>,
) -> Result<Tensor> {
    let op = TokenShift {
        segment,
        shifts: shifts.to_vec(),
        keep: keep.map(|k| k.to_owned()),
    };
    Ok(apply_custom_op(op, &[x])?.remove(0))
}

/// The same map as [`token_shift`] from tensor ops (split, mask, narrow and pad, cat), as
/// performer-pytorch writes it: the path of device tensors with a mask (the device kernel
/// takes none), and the reference the fused op is tested against.
pub(crate) fn composed_token_shift(
    x: &Tensor,
    segment: usize,
    shifts: &[i64],
    keep: Option<ArrayView2<'_, bool>>,
) -> Result<Tensor> {
    let masked_out = keep.map(|k| {
        k.mapv(|kept| !kept)
            .insert_axis(ndarray::Axis(2))
            .into_dyn()
    });
    let mut parts = Vec::new();
    for (i, piece) in x.split(segment, -1)?.into_iter().enumerate() {
        let amount = shifts.get(i).copied().unwrap_or(0);
        parts.push(shift_along_sequence(&piece, amount, masked_out.as_ref())?);
    }
    Tensor::cat(&parts, -1)
}

/// Moves `t` `(b, n, f)` by `amount` positions along the sequence, filling with zeros; with
/// `masked_out`, those positions read as zeros first.
fn shift_along_sequence(
    t: &Tensor,
    amount: i64,
    masked_out: Option<&ArrayD<bool>>,
) -> Result<Tensor> {
    if amount == 0 {
        return Ok(t.clone());
    }
    let t = match masked_out {
        Some(m) => t.masked_fill(&m.view(), 0.0)?,
        None => t.clone(),
    };
    let n = t.shape()[1];
    let k = (amount.unsigned_abs() as usize).min(n);
    if amount > 0 {
        t.narrow(1, 0, n - k)?.pad(1, k, 0, 0.0)
    } else {
        t.narrow(1, k, n - k)?.pad(1, 0, k, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, Array3, ArrayD};
    use performer_tensor::{GradcheckOptions, Result, Tensor, gradcheck, rng};

    use super::{composed_token_shift, token_shift};

    fn bits(a: &ArrayD<f32>) -> Vec<u32> {
        a.iter().map(|v| v.to_bits()).collect()
    }

    /// Forward and input gradient (for a random upstream gradient) of `f`.
    fn run(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &ArrayD<f32>,
        upstream: &ArrayD<f32>,
    ) -> (ArrayD<f32>, ArrayD<f32>) {
        let v = Tensor::var(x.clone());
        let y = f(&v).unwrap();
        let grads = y
            .mul(&Tensor::new(upstream.clone()))
            .unwrap()
            .sum_all()
            .backward()
            .unwrap();
        (y.to_array(), grads.get(&v).unwrap().clone())
    }

    #[test]
    fn matches_the_composed_shift_bit_for_bit() {
        rng::manual_seed(3);
        // (shifts, dim, n): causal and non-causal, a dim the segments do not divide (a copied
        // remainder), a shift as long as the sequence, one position.
        let cases: [(&[i64], usize, usize); 6] = [
            (&[0, 1], 8, 5),
            (&[-1, 0, 1], 9, 6),
            (&[1, -1, 0], 10, 4),
            (&[2, 1], 7, 3),
            (&[-4, 5], 6, 4),
            (&[0, 1], 4, 1),
        ];
        for (shifts, dim, n) in cases {
            let b = 2;
            let x = rng::randn(&[b, n, dim]);
            let upstream = rng::randn(&[b, n, dim]);
            let keep = Array2::from_shape_fn((b, n), |(i, t)| (i + 2 * t) % 3 != 1);
            for mask in [None, Some(&keep)] {
                let (y, gx) = run(
                    |x| token_shift(x, dim / shifts.len(), shifts, mask.map(|k| k.view())),
                    &x,
                    &upstream,
                );
                let (y_ref, gx_ref) = run(
                    |x| composed_token_shift(x, dim / shifts.len(), shifts, mask.map(|k| k.view())),
                    &x,
                    &upstream,
                );
                let what = format!("shifts {shifts:?} dim {dim} n {n} mask {}", mask.is_some());
                assert_eq!(y.shape(), y_ref.shape(), "{what}");
                assert_eq!(bits(&y), bits(&y_ref), "forward, {what}");
                assert_eq!(bits(&gx), bits(&gx_ref), "backward, {what}");
            }
        }
    }

    #[test]
    fn gradcheck_with_and_without_a_mask() {
        rng::manual_seed(5);
        let x = rng::randn(&[2, 5, 9]);
        let keep = Array2::from_shape_fn((2, 5), |(i, t)| (i + t) % 4 != 2);
        for mask in [None, Some(keep.view())] {
            let worst = gradcheck(
                |v| token_shift(&v[0], 3, &[-1, 0, 1], mask),
                std::slice::from_ref(&x),
                GradcheckOptions::default(),
            )
            .unwrap();
            assert!(worst < 2e-3, "{worst}");
        }
    }

    #[test]
    fn known_values() {
        // One sequence of 3 positions, features (a, b) per position; shifts (1, -1) with the
        // middle position masked.
        let x = Array3::from_shape_vec((1, 3, 2), vec![1.0, 10.0, 2.0, 20.0, 3.0, 30.0]).unwrap();
        let keep = Array2::from_shape_vec((1, 3), vec![true, false, true]).unwrap();
        let y = token_shift(&Tensor::new(x.into_dyn()), 1, &[1, -1], Some(keep.view())).unwrap();
        // a moves down (position t reads t-1), b moves up (t reads t+1); masked sources read 0.
        assert_eq!(
            y.to_array().iter().copied().collect::<Vec<_>>(),
            vec![0.0, 0.0, 1.0, 30.0, 0.0, 0.0]
        );
    }
}
