//! Shapes of the attention inputs and their checks.

use crate::error::{Error, Result};

/// Shape of one attention call. Layout (every buffer, host or device): row-major and
/// contiguous, `q` and `k` as `(batch, heads, seq_len, dim_qk)`, `v` and the output as
/// `(batch, heads, seq_len, dim_v)`; the projection matrix as `(nb_features, dim_qk)`;
/// feature maps as `(batch, heads, seq_len, nb_features)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Number of heads.
    pub heads: usize,
    /// Sequence length (positions).
    pub seq_len: usize,
    /// Head dimension of queries and keys.
    pub dim_qk: usize,
    /// Head dimension of values (and of the output).
    pub dim_v: usize,
}

/// Largest batch * heads: the kernels put it on the grid's z axis.
pub const MAX_BATCH_HEADS: usize = 65_535;

impl AttentionShape {
    /// A shape with `dim_v == dim_qk`, as in performer-pytorch's attention.
    pub fn new(batch: usize, heads: usize, seq_len: usize, dim_head: usize) -> Self {
        Self {
            batch,
            heads,
            seq_len,
            dim_qk: dim_head,
            dim_v: dim_head,
        }
    }

    /// `batch * heads`, the number of independent attention problems.
    pub fn batch_heads(&self) -> usize {
        self.batch.saturating_mul(self.heads)
    }

    /// Elements of `q` (and `k`).
    pub fn qk_len(&self) -> usize {
        self.batch_heads()
            .saturating_mul(self.seq_len)
            .saturating_mul(self.dim_qk)
    }

    /// Elements of `v` (and of the output).
    pub fn v_len(&self) -> usize {
        self.batch_heads()
            .saturating_mul(self.seq_len)
            .saturating_mul(self.dim_v)
    }

    /// Elements of a feature map with `nb_features` features.
    pub fn feature_len(&self, nb_features: usize) -> usize {
        self.batch_heads()
            .saturating_mul(self.seq_len)
            .saturating_mul(nb_features)
    }

    /// Checks the sizes are non-zero and within what the kernels index.
    pub(crate) fn validate(&self, op: &'static str, nb_features: usize) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("seq_len", self.seq_len),
            ("dim_qk", self.dim_qk),
            ("dim_v", self.dim_v),
            ("nb_features", nb_features),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Shape {
                op,
                detail: format!(
                    "{name} is 0 in {self:?} with nb_features {nb_features}; every size must be at least 1"
                ),
            });
        }
        if let Some((name, v)) = dims.iter().find(|(_, v)| *v > i32::MAX as usize) {
            return Err(Error::TooLarge {
                op,
                detail: format!("{name} = {v} exceeds {}", i32::MAX),
            });
        }
        if self.batch_heads() > MAX_BATCH_HEADS {
            return Err(Error::TooLarge {
                op,
                detail: format!(
                    "batch * heads = {} exceeds {MAX_BATCH_HEADS} in {self:?}",
                    self.batch_heads()
                ),
            });
        }
        // Total element counts must fit i64 offsets and host allocations.
        let widest = self.dim_qk.max(self.dim_v + 1).max(nb_features);
        let total = self
            .batch_heads()
            .checked_mul(self.seq_len + 64)
            .and_then(|x| x.checked_mul(widest))
            .and_then(|x| x.checked_mul(std::mem::size_of::<f32>()));
        if total.is_none_or(|t| t > isize::MAX as usize) {
            return Err(Error::TooLarge {
                op,
                detail: format!(
                    "{self:?} with nb_features {nb_features} overflows the address space"
                ),
            });
        }
        Ok(())
    }
}

/// Checks that a buffer has the length its shape implies.
pub(crate) fn expect_len(
    op: &'static str,
    what: &str,
    len: usize,
    expected: usize,
    shape: &str,
) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            detail: format!("{what} has {len} elements, expected {expected} for {shape}"),
        })
    }
}
