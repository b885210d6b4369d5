//! Cross-entropy over logits with PyTorch's semantics: classes on axis 1, an optional ignored
//! target value, mean over the targets that are not ignored.

use ndarray::{ArrayD, ArrayViewD, Axis, Zip};

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
        let x = self.view();
        // Per position: log-sum-exp minus the target's logit.
        let mut total = 0.0f64;
        let mut lse = ArrayD::<f32>::zeros(target.raw_dim());
        Zip::from(&mut lse)
            .and(x.lanes(Axis(1)))
            .and(target)
            .for_each(|l, lane, &t| {
                let m = lane.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let s: f32 = lane.iter().map(|&v| (v - m).exp()).sum();
                *l = m + s.ln();
                if !ignored(t) {
                    total += (*l - lane[t as usize]) as f64;
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
                let mut gx = ArrayD::<f32>::zeros(xd.raw_dim());
                Zip::from(gx.lanes_mut(Axis(1)))
                    .and(xd.lanes(Axis(1)))
                    .and(&target)
                    .and(&lse)
                    .for_each(|mut gl, xl, &t, &l| {
                        if ignored(t) {
                            return;
                        }
                        Zip::from(&mut gl)
                            .and(&xl)
                            .for_each(|g, &x| *g = (x - l).exp() * scale);
                        gl[t as usize] -= scale;
                    });
                Ok(vec![Some(gx)])
            },
        ))
    }
}
