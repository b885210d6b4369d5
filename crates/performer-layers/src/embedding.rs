//! `nn.Embedding`'s lookup table ([`Embedding`]).

use ndarray::{ArrayViewD, IxDyn};
use performer_tensor::{DType, Error, Module, Param, Result, Tensor, Visitor};

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
    /// A bf16 table without a graph to record (inference) widens only the rows it looks up.
    pub fn forward(&self, ids: &ArrayViewD<i64>) -> Result<Tensor> {
        if self.weight.dtype() == DType::F32 || performer_tensor::is_grad_enabled() {
            return self.weight.tensor().embedding(ids);
        }
        let num = self.num_embeddings();
        let rows: Vec<usize> = ids
            .iter()
            .map(|&id| match usize::try_from(id) {
                Ok(i) if i < num => Ok(i),
                _ => Err(Error::Index {
                    op: "embedding".into(),
                    index: id,
                    size: num,
                }),
            })
            .collect::<Result<_>>()?;
        let table = self.weight.rows("embedding", &rows)?;
        let mut shape = ids.shape().to_vec();
        shape.push(table.ncols());
        let out = table
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| Error::shape("embedding", e.to_string()))?;
        Ok(Tensor::new(out))
    }
}

impl Module for Embedding {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("weight", &self.weight);
    }
}
