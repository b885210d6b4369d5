//! Checks of [`PerformerConfig`]: sizes and combinations of the stack's arguments.

use performer_tensor::{Error, Result};

use super::fields::PerformerConfig;
use super::limits::{MAX_ELEMENTS, check_prob, elements, too_large};

impl PerformerConfig {
    /// A lower bound of the scalars in the stack's parameters and buffers, with overflow
    /// checked: an error names the size that makes the model too large to allocate.
    pub fn min_elements(&self) -> Result<u128> {
        let op = "Performer";
        let dh = self.resolved_dim_head();
        let inner = elements(&[self.heads, dh]).ok_or_else(|| {
            too_large(
                op,
                "heads",
                self.heads,
                format!("heads x dim_head = {}", dh),
            )
        })? as usize;
        let attn = elements(&[4, self.dim, inner]).ok_or_else(|| {
            too_large(
                op,
                "dim",
                self.dim,
                format!("4 x dim x (heads x dim_head = {inner})"),
            )
        })?;
        let ff = elements(&[2, self.dim, self.ff_mult, self.dim]).ok_or_else(|| {
            too_large(
                op,
                "ff_mult",
                self.ff_mult,
                format!("2 x dim ({}) x ff_mult x dim", self.dim),
            )
        })?;
        let m = self
            .nb_features
            .unwrap_or_else(|| performer_favor::default_nb_features(dh));
        let proj = elements(&[m, dh]).ok_or_else(|| {
            too_large(
                op,
                "nb_features",
                m,
                format!("nb_features x dim_head ({dh})"),
            )
        })?;
        let per_layer = (attn + ff + proj) * if self.cross_attend { 2 } else { 1 };
        elements(&[self.depth])
            .and_then(|d| d.checked_mul(per_layer))
            .filter(|&t| t <= MAX_ELEMENTS)
            .ok_or_else(|| {
                too_large(
                    op,
                    "depth",
                    self.depth,
                    format!("depth x {per_layer} per layer"),
                )
            })
    }

    /// Checks every argument and their combinations; errors name the argument and the limit.
    pub fn validate(&self) -> Result<()> {
        let op = "Performer";
        for (name, v) in [
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("ff_mult", self.ff_mult),
            ("ff_chunks", self.ff_chunks),
            ("local_window_size", self.local_window_size),
        ] {
            if v == 0 {
                return Err(Error::invalid(op, name, 0, "must be positive"));
            }
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                op,
                "dim",
                self.dim,
                format!("must be divisible by heads = {}", self.heads),
            ));
        }
        if self.dim_head == Some(0) {
            return Err(Error::invalid(op, "dim_head", 0, "must be positive"));
        }
        if self.nb_features == Some(0) {
            return Err(Error::invalid(op, "nb_features", 0, "must be positive"));
        }
        // Sizes first: a depth too large to allocate must not reach `per_layer`'s vector.
        self.min_elements()?;
        self.local_attn_heads.per_layer(self.depth, self.heads)?;
        check_prob(op, "ff_dropout", self.ff_dropout)?;
        check_prob(op, "attn_dropout", self.attn_dropout)?;
        if self.use_scalenorm && self.use_rezero {
            return Err(Error::invalid(
                op,
                "use_rezero",
                true,
                "use_scalenorm and use_rezero exclude each other",
            ));
        }
        Ok(())
    }

    /// Head size in effect.
    pub fn resolved_dim_head(&self) -> usize {
        self.dim_head.unwrap_or(self.dim / self.heads.max(1))
    }
}
