//! The feature maps as ops of their own: [`softmax_kernel`] and [`generalized_kernel`], forward
//! and backward, heads in parallel.

use ndarray::{Array2, ArrayD, ArrayView2};
use performer_tensor::{CustomOp, Data, Result, Tensor, apply_custom_op};
use rayon::prelude::*;

use crate::feature::{FeatureMap, FeatureSpec, check_projection};
use crate::heads::{HeadsOut, head, lead_shape};

/// Sums per-head projection gradients.
pub(super) fn sum_heads(parts: Vec<Array2<f32>>, m: usize, d: usize) -> ArrayD<f32> {
    let mut total = Array2::<f32>::zeros((m, d));
    for p in parts {
        total += &p;
    }
    total.into_dyn()
}

struct FeatureMapOp {
    spec: FeatureSpec,
    is_query: bool,
}

impl FeatureMapOp {
    fn shapes(&self, inputs: &[&Data]) -> Result<(Vec<usize>, usize, usize, usize)> {
        let (x, p) = (inputs[0], inputs[1]);
        let lead = lead_shape(self.name(), "data", x.shape())?.to_vec();
        let (n, d) = (x.shape()[x.ndim() - 2], x.shape()[x.ndim() - 1]);
        check_projection(self.name(), p.shape(), d)?;
        Ok((lead, n, d, p.shape()[0]))
    }
}

impl CustomOp for FeatureMapOp {
    type Saved = ();

    fn name(&self) -> &'static str {
        match self.spec.map {
            FeatureMap::Softmax => "softmax_kernel",
            FeatureMap::Generalized(_) => "generalized_kernel",
        }
    }

    fn forward(&self, inputs: &[&Data], _save: bool) -> Result<(Vec<ArrayD<f32>>, ())> {
        let (lead, n, _d, m) = self.shapes(inputs)?;
        let (x, p) = (inputs[0].view(), inputs[1].view());
        let p2: ArrayView2<f32> = p.into_dimensionality().expect("checked 2-D");
        let mut out = HeadsOut::zeros(&lead, n, m);
        out.views()
            .into_par_iter()
            .enumerate()
            .try_for_each(|(i, mut o)| {
                self.spec
                    .features(&head(&x, i)?, &p2, self.is_query, &mut o)
            })?;
        Ok((vec![out.into_array()], ()))
    }

    fn backward(
        &self,
        inputs: &[Data],
        _: &(),
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None, None]);
        };
        let refs: Vec<&Data> = inputs.iter().collect();
        let (lead, n, d, m) = self.shapes(&refs)?;
        let (x, p) = (inputs[0].view(), inputs[1].view());
        let p2: ArrayView2<f32> = p.into_dimensionality().expect("checked 2-D");
        let gv = g.view();
        let mut dx = HeadsOut::zeros(&lead, n, d);
        let parts: Vec<Option<Array2<f32>>> = dx
            .views()
            .into_par_iter()
            .enumerate()
            .map(|(i, mut dxi)| {
                let xi = head(&x, i)?;
                let mut feat = Array2::<f32>::zeros((n, m));
                self.spec
                    .features(&xi, &p2, self.is_query, &mut feat.view_mut())?;
                let mut gi = head(&gv, i)?.to_owned();
                let mut dp = needs[1].then(|| Array2::<f32>::zeros((m, d)));
                self.spec.backward(
                    &xi,
                    &p2,
                    &feat.view(),
                    &mut gi.view_mut(),
                    &mut dxi,
                    dp.as_mut(),
                )?;
                Ok(dp)
            })
            .collect::<Result<_>>()?;
        let dp = needs[1].then(|| sum_heads(parts.into_iter().flatten().collect(), m, d));
        Ok(vec![needs[0].then(|| dx.into_array()), dp])
    }
}

/// performer-pytorch's `softmax_kernel`: positive random features of `data` `(..., n, d)`
/// through `projection` `(m, d)`, giving `(..., n, m)`. Queries are stabilized per row, keys
/// by the max over each head (both treated as constants by the gradient, as the reference
/// detaches them).
pub fn softmax_kernel(
    data: &Tensor,
    projection: &Tensor,
    is_query: bool,
    normalize_data: bool,
    eps: f32,
) -> Result<Tensor> {
    let d = *data.shape().last().unwrap_or(&0);
    let m = projection.shape().first().copied().unwrap_or(0);
    let spec = FeatureSpec::new(FeatureMap::Softmax, d, m, normalize_data, eps);
    Ok(apply_custom_op(FeatureMapOp { spec, is_query }, &[data, projection])?.remove(0))
}

/// performer-pytorch's `generalized_kernel`: `kernel(dn * data P^T) + eps`, or without a
/// projection `kernel(dn * data) + eps`.
pub fn generalized_kernel(
    data: &Tensor,
    projection: Option<&Tensor>,
    kernel: performer_tensor::ops::Activation,
    normalize_data: bool,
    eps: f32,
) -> Result<Tensor> {
    let d = *data.shape().last().unwrap_or(&0);
    let Some(projection) = projection else {
        let dn = if normalize_data {
            (d as f32).powf(-0.25)
        } else {
            1.0
        };
        return Ok(kernel.apply(&data.mul_scalar(dn)).add_scalar(eps));
    };
    let m = projection.shape().first().copied().unwrap_or(0);
    let spec = FeatureSpec::new(FeatureMap::Generalized(kernel), d, m, normalize_data, eps);
    Ok(apply_custom_op(
        FeatureMapOp {
            spec,
            is_query: true,
        },
        &[data, projection],
    )?
    .remove(0))
}
