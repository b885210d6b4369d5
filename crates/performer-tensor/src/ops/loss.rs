//! Cross-entropy over logits with PyTorch's semantics: classes on axis 1, an optional ignored
//! target value, mean over the targets that are not ignored.

use ndarray::{ArrayD, ArrayView1, ArrayViewD, ArrayViewMut1, Axis, IxDyn, Zip};

use crate::fast_math;
use crate::parallel::PAR_THRESHOLD;

use crate::{Error, Result, Tensor};

impl Tensor {
    /// Mean cross-entropy of logits `(N, C)` or `(N, C, d1, ...)` against integer targets
    /// `(N)` or `(N, d1, ...)`. Targets equal to `ignore_index` count neither in the sum nor in
    /// the mean; if every target is ignored the result is NaN, as in PyTorch. A target outside
    /// `0..C` (other than the ignored value) is an error.
    pub fn cross_entropy(
        &self,
        target: &ArrayViewD<i64>,
        ignore_index: Option<i64>,
    ) -> Result<Tensor> {
        let r = self.rank();
        let mut expected = self.shape().to_vec();
        if r >= 2 {
            expected.remove(1);
        }
        if r < 2 || target.shape() != expected.as_slice() {
            return Err(Error::shape(
                "cross_entropy",
                format!(
                    "logits {:?} (N, C, ...) need targets of shape {:?}, got {:?}",
                    self.shape(),
                    expected,
                    target.shape()
                ),
            ));
        }
        let classes = self.shape()[1];
        let ignored = move |t: i64| ignore_index == Some(t);
        let mut count = 0usize;
        for &t in target.iter() {
            if ignored(t) {
                continue;
            }
            if t < 0 || t as usize >= classes {
                return Err(Error::Index {
                    op: "cross_entropy".into(),
                    index: t,
                    size: classes,
                });
            }
            count += 1;
        }
        on_device!(crate::cuda::ops::cross_entropy(self, target, ignore_index));
        let x = self.view();
        let large = x.len() >= PAR_THRESHOLD;
        // Per position: log-sum-exp of the lane, then minus the target's logit.
        let mut lse = ArrayD::<f32>::zeros(target.raw_dim());
        let lane_lse = |l: &mut f32, lane: ArrayView1<f32>| {
            *l = match lane.as_slice() {
                Some(xs) => super::softmax::logsumexp(xs),
                None => {
                    let m = lane.fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                    let s: f32 = lane.iter().map(|&v| fast_math::exp(v - m)).sum();
                    m + s.ln()
                }
            };
        };
        let z = Zip::from(&mut lse).and(x.lanes(Axis(1)));
        if large {
            z.par_for_each(lane_lse);
        } else {
            z.for_each(lane_lse);
        }
        let mut total = 0.0f64;
        Zip::from(&lse)
            .and(x.lanes(Axis(1)))
            .and(target)
            .for_each(|&l, lane, &t| {
                if !ignored(t) {
                    total += (l - lane[t as usize]) as f64;
                }
            });
        let loss = (total / count as f64) as f32;
        let out = ArrayD::from_elem(ndarray::IxDyn(&[]), loss);
        let xd = self.data().clone();
        let target = target.to_owned();
        Ok(Tensor::from_op(
            out,
            "cross_entropy",
            &[self],
            move |g, _| {
                let scale = g.iter().next().copied().unwrap_or(0.0) / count as f32;
                // The gradient takes the logits' memory order, so that its class lanes are
                // as contiguous as theirs (logits are usually a permuted (b, n, c) view).
                let mut gx = zeros_in_layout_of(&xd.view());
                let lane_grad =
                    |mut gl: ArrayViewMut1<f32>, xl: ArrayView1<f32>, &t: &i64, &l: &f32| {
                        if ignored(t) {
                            return;
                        }
                        Zip::from(&mut gl)
                            .and(&xl)
                            .for_each(|g, &x| *g = fast_math::exp(x - l) * scale);
                        gl[t as usize] -= scale;
                    };
                let z = Zip::from(gx.lanes_mut(Axis(1)))
                    .and(xd.lanes(Axis(1)))
                    .and(&target)
                    .and(&lse);
                if large {
                    z.par_for_each(lane_grad);
                } else {
                    z.for_each(lane_grad);
                }
                Ok(vec![Some(gx)])
            },
        ))
    }
}

/// Zeros of `x`'s shape whose axes lie in memory in the same order as `x`'s.
fn zeros_in_layout_of(x: &ArrayViewD<f32>) -> ArrayD<f32> {
    let order = crate::alloc::memory_order(x);
    let shape: Vec<usize> = order.iter().map(|&i| x.shape()[i]).collect();
    ArrayD::zeros(IxDyn(&shape)).permuted_axes(IxDyn(&crate::alloc::inverse(&order)))
}
