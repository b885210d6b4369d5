//! Checks of [`PerformerLMConfig`]: the embeddings and position tables, then the stack's.

use performer_tensor::{Error, Result};

use super::fields::PerformerLMConfig;
use super::limits::{MAX_ELEMENTS, check_prob, elements, too_large};

impl PerformerLMConfig {
    /// The axial shape in effect.
    pub fn resolved_axial_shape(&self) -> Vec<usize> {
        self.axial_position_shape
            .clone()
            .unwrap_or_else(|| vec![self.max_seq_len.div_ceil(64), 64])
    }

    /// A lower bound of the scalars in the model's parameters and buffers (embeddings, position
    /// tables, layers), with overflow checked: an error names the size that makes the model
    /// too large to allocate.
    pub fn min_elements(&self) -> Result<u128> {
        let op = "PerformerLM";
        let tokens = elements(&[self.num_tokens, self.dim]).ok_or_else(|| {
            too_large(
                op,
                "num_tokens",
                self.num_tokens,
                format!("num_tokens x dim ({})", self.dim),
            )
        })?;
        let positions = if !self.rotary_position_emb && self.axial_position_emb {
            // One table per axis, (s_i, dim); the forward materializes their sum over
            // prod(shape) x dim, which `validate` checks separately.
            let shape = self.resolved_axial_shape();
            shape.iter().try_fold(0u128, |acc, &s| {
                elements(&[s, self.dim])
                    .map(|e| acc + e)
                    .filter(|&t| t <= MAX_ELEMENTS)
                    .ok_or_else(|| {
                        too_large(
                            op,
                            "axial_position_shape",
                            format!("{shape:?}"),
                            format!("the axial tables, sum of the shape x dim ({})", self.dim),
                        )
                    })
            })?
        } else {
            // Absolute: max_seq_len x dim; rotary: that and max_seq_len x dim_head.
            let rotary = if self.rotary_position_emb {
                self.dim_head
            } else {
                0
            };
            elements(&[self.max_seq_len, self.dim])
                .zip(elements(&[self.max_seq_len, rotary]))
                .map(|(a, b)| a + b)
                .filter(|&t| t <= MAX_ELEMENTS)
                .ok_or_else(|| {
                    too_large(
                        op,
                        "max_seq_len",
                        self.max_seq_len,
                        format!("the position tables, max_seq_len x (dim = {})", self.dim),
                    )
                })?
        };
        let layers = self.performer().min_elements()?;
        let total = tokens + positions + layers;
        if total > MAX_ELEMENTS {
            return Err(too_large(
                op,
                "dim",
                self.dim,
                format!("the model ({total} scalars)"),
            ));
        }
        Ok(total)
    }

    /// Checks every argument; errors name the argument and the limit.
    pub fn validate(&self) -> Result<()> {
        let op = "PerformerLM";
        for (name, v) in [
            ("num_tokens", self.num_tokens),
            ("max_seq_len", self.max_seq_len),
            ("dim_head", self.dim_head),
        ] {
            if v == 0 {
                return Err(Error::invalid(op, name, 0, "must be positive"));
            }
        }
        check_prob(op, "emb_dropout", self.emb_dropout)?;
        if self.rotary_position_emb && !self.dim.is_multiple_of(2) {
            return Err(Error::invalid(
                op,
                "dim",
                self.dim,
                "the sinusoidal table added to the embeddings needs an even dim",
            ));
        }
        if self.rotary_position_emb && !self.dim_head.is_multiple_of(2) {
            return Err(Error::invalid(
                op,
                "dim_head",
                self.dim_head,
                "rotary embeddings need an even dim_head",
            ));
        }
        if !self.rotary_position_emb && self.axial_position_emb {
            let shape = self.resolved_axial_shape();
            // Saturating: a product that overflows covers everything (and is refused as too
            // large by the size check).
            let covered = shape.iter().fold(1usize, |a, &s| a.saturating_mul(s));
            if shape.is_empty() || shape.contains(&0) || covered < self.max_seq_len {
                return Err(Error::invalid(
                    op,
                    "axial_position_shape",
                    format!("{shape:?}"),
                    format!(
                        "must cover max_seq_len = {} positions (covers {covered})",
                        self.max_seq_len
                    ),
                ));
            }
        }
        if !self.rotary_position_emb && self.axial_position_emb {
            // The forward materializes the summed table, prod(shape) x dim.
            let shape = self.resolved_axial_shape();
            let mut factors = shape.clone();
            factors.push(self.dim);
            if elements(&factors).is_none() {
                return Err(too_large(
                    op,
                    "axial_position_shape",
                    format!("{shape:?}"),
                    format!(
                        "the summed axial table, product of the shape x dim ({})",
                        self.dim
                    ),
                ));
            }
        }
        self.performer().validate()?;
        self.min_elements()?;
        Ok(())
    }
}
