//! Residual-branch wrappers: PreLayerNorm, PreScaleNorm, ReZero and PreShiftTokens, each
//! holding the wrapped block under the name `fn` as performer-pytorch does.

use std::sync::Arc;

use ndarray::{Array2, ArrayD, ArrayView2, IxDyn};
use performer_favor::FastAttention;
use performer_tensor::team::Team;
use performer_tensor::{Error, Module, Param, Result, Tensor, Visitor};

use crate::block::{Block, BlockInputs, check_decode_length};
use crate::layer_norm::LayerNorm;
use crate::state::BlockState;

/// `fn(LayerNorm(x))`.
pub struct PreLayerNorm {
    /// The norm, named `norm`.
    pub norm: LayerNorm,
    /// The wrapped block, named `fn`.
    pub inner: Arc<dyn Block>,
}

impl PreLayerNorm {
    /// Wraps `inner` with a LayerNorm over `dim`.
    pub fn new(dim: usize, inner: Arc<dyn Block>) -> Self {
        PreLayerNorm {
            norm: LayerNorm::new(dim),
            inner,
        }
    }
}

impl Module for PreLayerNorm {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("norm", &self.norm);
        v.child("fn", self.inner.as_ref());
    }
}

impl Block for PreLayerNorm {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        self.inner.forward(&self.norm.forward(x)?, inputs)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.inner.for_each_fast_attention(f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner.decode(&self.norm.forward(x)?, inputs, state)
    }

    fn position_wise(&self) -> bool {
        self.inner.position_wise()
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner
            .decode_last(&self.norm.forward(x)?, inputs, state)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let normed = self.norm.forward_rows(x)?;
        self.inner.decode_rows(&normed.view(), inputs, state, team)
    }
}

/// ScaleNorm ("Transformers without Tears"): `fn(x / max(|x|, eps) * g)`, `g` of shape `[1]`
/// initialized to 1.
pub struct PreScaleNorm {
    /// The learned scale, named `g`.
    pub g: Param,
    /// Floor of the norm.
    pub eps: f32,
    /// The wrapped block.
    pub inner: Arc<dyn Block>,
}

impl PreScaleNorm {
    /// Wraps `inner` (eps 1e-5 as the reference).
    pub fn new(inner: Arc<dyn Block>) -> Self {
        PreScaleNorm {
            g: Param::new(ArrayD::from_elem(IxDyn(&[1]), 1.0)),
            eps: 1e-5,
            inner,
        }
    }

    /// The normalization alone.
    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        // On the CPU: one op, with the forward's bits of the four below.
        if x.device().is_cpu()
            && let Some(y) = crate::scale_norm::scale_norm(x, &self.g.tensor(), self.eps)?
        {
            return Ok(y);
        }
        let n = x.norm(&[-1], true)?.clamp(Some(self.eps), None);
        x.div(&n)?.mul(&self.g.tensor())
    }

    /// The normalization of the rows of `x` `(b, dim)` on plain arrays.
    pub fn normalize_rows(&self, x: &ArrayView2<f32>) -> Array2<f32> {
        let g = self.g.value().iter().copied().next().unwrap_or(1.0);
        let mut y = x.to_owned();
        for mut row in y.rows_mut() {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(self.eps);
            row.mapv_inplace(|v| v / n * g);
        }
        y
    }
}

impl Module for PreScaleNorm {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("g", &self.g);
        v.child("fn", self.inner.as_ref());
    }
}

impl Block for PreScaleNorm {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        self.inner.forward(&self.normalize(x)?, inputs)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.inner.for_each_fast_attention(f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner.decode(&self.normalize(x)?, inputs, state)
    }

    fn position_wise(&self) -> bool {
        self.inner.position_wise()
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner.decode_last(&self.normalize(x)?, inputs, state)
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let normed = self.normalize_rows(x);
        self.inner.decode_rows(&normed.view(), inputs, state, team)
    }
}

/// ReZero: `fn(x) * g` with a scalar `g` initialized to 1e-3.
pub struct ReZero {
    /// The gate, a rank-0 parameter named `g`.
    pub g: Param,
    /// The wrapped block.
    pub inner: Arc<dyn Block>,
}

impl ReZero {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Block>) -> Self {
        ReZero {
            g: Param::new(ArrayD::from_elem(IxDyn(&[]), 1e-3)),
            inner,
        }
    }
}

impl Module for ReZero {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.param("g", &self.g);
        v.child("fn", self.inner.as_ref());
    }
}

impl Block for ReZero {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        self.inner.forward(x, inputs)?.mul(&self.g.tensor())
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.inner.for_each_fast_attention(f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner.decode(x, inputs, state)?.mul(&self.g.tensor())
    }

    fn position_wise(&self) -> bool {
        self.inner.position_wise()
    }

    fn decode_last(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        self.inner
            .decode_last(x, inputs, state)?
            .mul(&self.g.tensor())
    }

    fn decode_rows(
        &self,
        x: &ArrayView2<f32>,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
        team: &Team,
    ) -> Result<Array2<f32>> {
        let g = self.g.value().iter().copied().next().unwrap_or(1.0);
        Ok(self.inner.decode_rows(x, inputs, state, team)? * g)
    }
}

/// Token shift: the first `len(shifts)` segments of `dim / len(shifts)` features are moved
/// along the sequence by their shift (+1: each position sees the previous token's features,
/// zeros at the start; -1: the next token's); the remaining features stay. With a mask, padded
/// positions are zeroed before shifting.
pub struct PreShiftTokens {
    /// One shift per segment.
    pub shifts: Vec<i64>,
    /// The wrapped block.
    pub inner: Arc<dyn Block>,
}

impl PreShiftTokens {
    /// Wraps `inner`; performer-pytorch uses `(0, 1)` when causal and `(-1, 0, 1)` otherwise.
    pub fn new(shifts: Vec<i64>, inner: Arc<dyn Block>) -> Self {
        PreShiftTokens { shifts, inner }
    }

    /// The shifted input alone.
    pub fn shift(&self, x: &Tensor, mask: Option<ndarray::ArrayView2<'_, bool>>) -> Result<Tensor> {
        if x.rank() != 3 {
            return Err(Error::shape(
                "PreShiftTokens",
                format!("input must be (b, n, dim), got {:?}", x.shape()),
            ));
        }
        let segments = self.shifts.len();
        let dim = x.shape()[2];
        if segments == 0 || dim < segments {
            return Err(Error::invalid(
                "PreShiftTokens",
                "shifts",
                format!("{:?}", self.shifts),
                format!("need 1..={dim} segments for dim {dim}"),
            ));
        }
        // On a device without a mask: one kernel per shifted segment, no split and concat.
        #[cfg(feature = "cuda")]
        if mask.is_none() && !x.device().is_cpu() {
            let size = dim / segments;
            let mut y = x.clone();
            for (i, &amount) in self.shifts.iter().enumerate() {
                if amount != 0 {
                    let shift = i32::try_from(amount).unwrap_or(i32::MAX);
                    y = performer_tensor::device_ops::token_shift(
                        &y,
                        i * size..(i + 1) * size,
                        shift,
                    )?;
                }
            }
            return Ok(y);
        }
        if let Some(m) = mask
            && m.shape() != &x.shape()[..2]
        {
            return Err(Error::shape(
                "PreShiftTokens",
                format!(
                    "mask {:?} must be (b, n) = {:?}",
                    m.shape(),
                    &x.shape()[..2]
                ),
            ));
        }
        // On the host: one op (the composed form made seven nodes and copies per block).
        if x.device().is_cpu() {
            return crate::token_shift::token_shift(x, dim / segments, &self.shifts, mask);
        }
        crate::token_shift::composed_token_shift(x, dim / segments, &self.shifts, mask)
    }
}

impl Module for PreShiftTokens {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.child("fn", self.inner.as_ref());
    }
}

impl Block for PreShiftTokens {
    fn forward(&self, x: &Tensor, inputs: &BlockInputs<'_>) -> Result<Tensor> {
        self.inner.forward(&self.shift(x, inputs.mask)?, inputs)
    }

    fn for_each_fast_attention(&self, f: &mut dyn FnMut(&FastAttention)) {
        self.inner.for_each_fast_attention(f)
    }

    fn decode(
        &self,
        x: &Tensor,
        inputs: &BlockInputs<'_>,
        state: &mut BlockState,
    ) -> Result<Tensor> {
        if self.shifts.iter().any(|&s| s < 0) {
            return Err(Error::invalid(
                "PreShiftTokens::decode",
                "shifts",
                format!("{:?}", self.shifts),
                "shifts from later tokens cannot decode incrementally",
            ));
        }
        if matches!(state, BlockState::Empty) {
            *state = BlockState::Shift(Box::default());
        }
        let BlockState::Shift(st) = state else {
            return Err(Error::Other(
                "PreShiftTokens::decode: the state belongs to another block".into(),
            ));
        };
        let n = x.shape().get(1).copied().unwrap_or(0);
        // On a device the previous position stays there.
        #[cfg(feature = "cuda")]
        if !x.device().is_cpu() {
            check_decode_length("PreShiftTokens::decode", n, st.prev_device.is_none())?;
            let shifted = match &st.prev_device {
                None => self.shift(x, inputs.mask)?,
                Some(prev) => {
                    let both = Tensor::cat(&[prev.clone(), x.clone()], 1)?;
                    self.shift(&both, None)?.narrow(1, 1, 1)?
                }
            };
            // Kept already masked (the reference masks before shifting: a padding token's
            // features are 0), so that the next step uploads nothing.
            let last = x.narrow(1, n - 1, 1)?;
            st.prev_device = Some(match inputs.mask {
                Some(m) if m.shape() != [x.shape()[0], n] => {
                    return Err(Error::shape(
                        "PreShiftTokens::decode",
                        format!(
                            "mask {:?} must cover the new positions ({}, {n})",
                            m.shape(),
                            x.shape()[0]
                        ),
                    ));
                }
                Some(m) => {
                    let keep = ndarray::Array3::from_shape_fn((m.nrows(), 1, 1), |(i, _, _)| {
                        f32::from(u8::from(m[[i, n - 1]]))
                    });
                    last.mul(&Tensor::new(keep.into_dyn()).to_device(x.device())?)?
                }
                None => last,
            });
            return self.inner.decode(&shifted, inputs, &mut st.inner);
        }
        check_decode_length("PreShiftTokens::decode", n, st.prev.is_none())?;
        let shifted = match &st.prev {
            None => self.shift(x, inputs.mask)?,
            Some(prev) => {
                // The previous position, zeroed where it was a padding token (the reference masks
                // before shifting), then shifted in: one step of `shift`.
                let mut prev = prev.clone();
                if let Some(keep) = &st.prev_keep {
                    for (mut row, &k) in prev.rows_mut().into_iter().zip(keep) {
                        if !k {
                            row.fill(0.0);
                        }
                    }
                }
                let both = Tensor::cat(
                    &[
                        Tensor::new(prev.insert_axis(ndarray::Axis(1)).into_dyn()),
                        x.clone(),
                    ],
                    1,
                )?;
                self.shift(&both, None)?.narrow(1, 1, 1)?
            }
        };
        st.prev = Some(
            x.select(1, n - 1)?
                .to_array()
                .into_dimensionality()
                .map_err(|e| Error::shape("PreShiftTokens::decode", e.to_string()))?,
        );
        st.prev_keep = inputs.mask.map(|m| m.column(n - 1).to_vec());
        self.inner.decode(&shifted, inputs, &mut st.inner)
    }
}
