//! `nn.LayerNorm` ([`LayerNorm`]) over the last axis, on tensors and on plain rows.

use ndarray::{Array2, ArrayView2};
use performer_tensor::ops::layer_norm_row;
use performer_tensor::{Error, Module, Param, Result, Tensor, Visitor};

use crate::init;

/// Layer normalization over the last axis with learned scale and shift (`nn.LayerNorm`).
pub struct LayerNorm {
    /// Scale, init 1.
    pub weight: Param,
    /// Shift, init 0.
    pub bias: Param,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// `nn.LayerNorm(dim)` (eps 1e-5).
    pub fn new(dim: usize) -> Self {
        LayerNorm {
            weight: Param::new(init::constant(&[dim], 1.0)),
            bias: Param::new(init::constant(&[dim], 0.0)),
            eps: 1e-5,
        }
    }

    /// Normalizes `x` `(..., dim)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(
            Some(&self.weight.tensor()),
            Some(&self.bias.tensor()),
            self.eps,
        )
    }

    /// Normalizes the rows of `x` `(b, dim)` on plain arrays (the decoding step's path), with
    /// the arithmetic of [`Tensor::layer_norm`].
    pub fn forward_rows(&self, x: &ArrayView2<f32>) -> Result<Array2<f32>> {
        let (w, b) = (self.weight.value(), self.bias.value());
        let d = x.ncols();
        if w.len() != d || b.len() != d {
            return Err(Error::shape(
                "LayerNorm",
                format!("input {:?} vs normalized shape {:?}", x.shape(), w.shape()),
            ));
        }
        let (w, b) = (w.as_standard_layout(), b.as_standard_layout());
        let (w, b) = (w.as_slice(), b.as_slice());
        let x = x.as_standard_layout();
        let mut y = Array2::<f32>::zeros(x.raw_dim());
        for (xr, mut yr) in x.rows().into_iter().zip(y.rows_mut()) {
            let (xr, yr) = (xr.as_slice().expect("row"), yr.as_slice_mut().expect("row"));
            layer_norm_row(xr, yr, w, b, self.eps);
        }
        Ok(y)
    }
}

impl Module for LayerNorm {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        v.param("bias", &self.bias);
    }
}
