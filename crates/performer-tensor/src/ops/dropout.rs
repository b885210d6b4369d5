//! Dropout with a mask drawn from the global seeded generator ([`crate::rng`]), so a run can
//! be replayed exactly (reversible layers restore the generator's state to recompute a block).

use ndarray::ArrayD;

use super::arrays::zip_map;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)` when
    /// `training`; the identity otherwise (or when `p == 0`).
    pub fn dropout(&self, p: f32, training: bool) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid("dropout", "p", p, "must lie in [0, 1]"));
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        on_device!(crate::cuda::row_ops::dropout(self, p));
        let scale = if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 };
        let mask: ArrayD<f32> = crate::rng::with_rng(|g| {
            ArrayD::from_shape_simple_fn(self.data().raw_dim(), || {
                if g.next_f32() < p { 0.0 } else { scale }
            })
        });
        let out = zip_map(&self.view(), &mask.view(), |x, m| x * m);
        Ok(Tensor::from_op(out, "dropout", &[self], move |g, _| {
            Ok(vec![Some(zip_map(&g.view(), &mask.view(), |g, m| g * m))])
        }))
    }
}
