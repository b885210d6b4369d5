//! Layer normalization over the last axis, fused: one pass for the statistics and the output,
//! one for all three gradients.

use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn, Zip};

use crate::{Error, Result, Tensor};

impl Tensor {
    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis (biased variance, as
    /// `torch.nn.LayerNorm`). `weight` and `bias`, when given, have the last axis's size.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let Some(&d) = self.shape().last() else {
            return Err(Error::shape("layer_norm", "needs rank >= 1"));
        };
        for (name, p) in [("weight", weight), ("bias", bias)] {
            if let Some(p) = p
                && p.shape() != [d]
            {
                return Err(Error::shape(
                    "layer_norm",
                    format!("{name} {:?} must be [{d}]", p.shape()),
                ));
            }
        }
        let rows = self.numel() / d.max(1);
        let x2 = self
            .data()
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((rows, d))
            .expect("size");
        let w = weight.map(|t| t.data().clone());
        let b = bias.map(|t| t.data().clone());
        let mut xhat = Array2::<f32>::zeros((rows, d));
        let mut rstd = Array1::<f32>::zeros(rows);
        let mut y = Array2::<f32>::zeros((rows, d));
        let body = |xr: ndarray::ArrayView1<f32>,
                    mut hr: ndarray::ArrayViewMut1<f32>,
                    r: &mut f32,
                    mut yr: ndarray::ArrayViewMut1<f32>| {
            let mean = xr.sum() / d as f32;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            *r = 1.0 / (var + eps).sqrt();
            for j in 0..d {
                let h = (xr[j] - mean) * *r;
                hr[j] = h;
                let wj = w.as_ref().map_or(1.0, |w| w[[j]]);
                let bj = b.as_ref().map_or(0.0, |b| b[[j]]);
                yr[j] = h * wj + bj;
            }
        };
        let z = Zip::from(x2.rows())
            .and(xhat.rows_mut())
            .and(&mut rstd)
            .and(y.rows_mut());
        if self.numel() >= crate::parallel::PAR_THRESHOLD {
            z.par_for_each(body);
        } else {
            z.for_each(body);
        }
        let shape = self.shape().to_vec();
        let y = y.into_shape_with_order(IxDyn(&shape)).expect("size");
        let mut inputs = vec![self];
        let wi = weight.map(|w| {
            inputs.push(w);
            inputs.len() - 1
        });
        let bi = bias.map(|b| {
            inputs.push(b);
            inputs.len() - 1
        });
        let wd = weight.map(|t| t.data().clone());
        Ok(Tensor::from_op(
            y,
            "layer_norm",
            &inputs,
            move |g, needs| {
                let g2 = g
                    .as_standard_layout()
                    .into_owned()
                    .into_shape_with_order((rows, d))
                    .expect("size");
                let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; needs.len()];
                if needs[0] {
                    let mut dx = Array2::<f32>::zeros((rows, d));
                    let body =
                        |gr: ndarray::ArrayView1<f32>,
                         hr: ndarray::ArrayView1<f32>,
                         &r: &f32,
                         mut dr: ndarray::ArrayViewMut1<f32>| {
                            let (mut m1, mut m2) = (0.0f32, 0.0f32);
                            for j in 0..d {
                                let gh = gr[j] * wd.as_ref().map_or(1.0, |w| w[[j]]);
                                m1 += gh;
                                m2 += gh * hr[j];
                            }
                            m1 /= d as f32;
                            m2 /= d as f32;
                            for j in 0..d {
                                let gh = gr[j] * wd.as_ref().map_or(1.0, |w| w[[j]]);
                                dr[j] = r * (gh - m1 - hr[j] * m2);
                            }
                        };
                    let z = Zip::from(g2.rows())
                        .and(xhat.rows())
                        .and(&rstd)
                        .and(dx.rows_mut());
                    if rows * d >= crate::parallel::PAR_THRESHOLD {
                        z.par_for_each(body);
                    } else {
                        z.for_each(body);
                    }
                    grads[0] = Some(dx.into_shape_with_order(IxDyn(&shape)).expect("size"));
                }
                if let Some(i) = wi.filter(|&i| needs[i]) {
                    grads[i] = Some((&g2 * &xhat).sum_axis(Axis(0)).into_dyn());
                }
                if let Some(i) = bi.filter(|&i| needs[i]) {
                    grads[i] = Some(g2.sum_axis(Axis(0)).into_dyn());
                }
                Ok(grads)
            },
        ))
    }
}
