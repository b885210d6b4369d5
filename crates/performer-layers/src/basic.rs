//! Linear, Embedding, LayerNorm and Dropout, with PyTorch's parameter names and layouts.

use ndarray::ArrayViewD;
use performer_tensor::{Error, Module, Param, Result, Tensor, TrainingFlag, Visitor};

use crate::init;

/// `y = x W^T + b` over the last axis; `weight` is `(out, in)` as in PyTorch.
pub struct Linear {
    /// `(out_features, in_features)`.
    pub weight: Param,
    /// `(out_features)`, when present.
    pub bias: Option<Param>,
}

impl Linear {
    /// A layer with PyTorch's default initialization.
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        Linear {
            weight: Param::new(init::linear_uniform(
                &[out_features, in_features],
                in_features,
            )),
            bias: bias.then(|| Param::new(init::linear_uniform(&[out_features], in_features))),
        }
    }

    /// Input size.
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    /// Output size.
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Applies the layer to `x` `(..., in)`. Leading axes are flattened into one GEMM (a view
    /// when `x` is contiguous), so the weight gradient is one product, not one per batch row.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inf = self.in_features();
        if x.shape().last() != Some(&inf) {
            return Err(Error::shape(
                "Linear",
                format!("input {:?} must end in in_features {inf}", x.shape()),
            ));
        }
        let lead: Vec<isize> = x.shape()[..x.rank() - 1]
            .iter()
            .map(|&d| d as isize)
            .collect();
        let flat = x.reshape(&[-1, inf as isize])?;
        let mut y = flat.matmul(&self.weight.tensor().transpose(0, 1)?)?;
        if let Some(b) = &self.bias {
            y = y.add(&b.tensor())?;
        }
        let mut shape = lead;
        shape.push(self.out_features() as isize);
        y.reshape(&shape)
    }
}

impl Module for Linear {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        if let Some(b) = &self.bias {
            v.param("bias", b);
        }
    }
}

/// A lookup table `(num_embeddings, dim)`, initialized N(0, 1) as `nn.Embedding`.
pub struct Embedding {
    /// The table.
    pub weight: Param,
}

impl Embedding {
    /// A table with PyTorch's default initialization.
    pub fn new(num_embeddings: usize, dim: usize) -> Self {
        Embedding {
            weight: Param::new(init::normal(&[num_embeddings, dim])),
        }
    }

    /// Number of rows.
    pub fn num_embeddings(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Rows for `ids` of any shape: `ids.shape ++ [dim]`; ids outside the table are errors.
    pub fn forward(&self, ids: &ArrayViewD<i64>) -> Result<Tensor> {
        self.weight.tensor().embedding(ids)
    }
}

impl Module for Embedding {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
    }
}

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
}

impl Module for LayerNorm {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
        v.param("bias", &self.bias);
    }
}

/// Dropout that follows its module's train/eval mode.
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f32,
    training: TrainingFlag,
}

impl Dropout {
    /// Dropout with probability `p` (checked when applied).
    pub fn new(p: f32) -> Self {
        Dropout {
            p,
            training: TrainingFlag::default(),
        }
    }

    /// Applies dropout in training mode, the identity in eval mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.dropout(self.p, self.training.get())
    }

    /// Whether it is in training mode.
    pub fn is_training(&self) -> bool {
        self.training.get()
    }
}

impl Module for Dropout {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.training(&self.training);
    }
}
