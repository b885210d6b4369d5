//! `nn.Embedding`'s lookup table ([`Embedding`]).

use ndarray::ArrayViewD;
use performer_tensor::{Module, Param, Result, Tensor, Visitor};

use crate::init;

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
