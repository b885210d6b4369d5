//! `CudaFastAttention`: performer-pytorch's `FastAttention` (softmax kernel) on a CUDA device,
//! with a device-buffer API and a host convenience API.

use std::sync::Arc;

use crate::buffer::{DeviceBuffer, SharedLauncher};
use crate::error::{Error, Result};
use crate::gpu_launcher::GpuLauncher;
use crate::ops::{self, FeatureKind, LinearDims, NonCausalSaved, Precision};
use crate::shape::{AttentionShape, expect_len};

/// FAVOR+ attention with the softmax feature map on a CUDA device.
///
/// Holds the projection matrix `(nb_features, dim_qk)` on the device (a fixed buffer: it gets
/// no gradient, performer-pytorch redraws it instead, see [`Self::set_projection`]).
/// Layout of every tensor: row-major, contiguous, `(batch, heads, seq_len, dim)`.
pub struct CudaFastAttention {
    device: SharedLauncher,
    projection: DeviceBuffer,
    nb_features: usize,
    dim_qk: usize,
    causal: bool,
    precision: Precision,
}

/// What the backward needs from the forward, per mode.
enum Saved {
    Causal { den: DeviceBuffer },
    NonCausal(NonCausalSaved),
}

/// The result of [`CudaFastAttention::forward`]: the output and the state kept for the backward.
pub struct AttentionForward {
    /// The attention output, `(batch, heads, seq_len, dim_v)`.
    pub out: DeviceBuffer,
    shape: AttentionShape,
    causal: bool,
    query_features: DeviceBuffer,
    key_features: DeviceBuffer,
    saved: Saved,
}

impl AttentionForward {
    /// The shape the forward ran at.
    pub fn shape(&self) -> AttentionShape {
        self.shape
    }
    /// Query features `(batch, heads, seq_len, nb_features)`.
    pub fn query_features(&self) -> &DeviceBuffer {
        &self.query_features
    }
    /// Key features `(batch, heads, seq_len, nb_features)`.
    pub fn key_features(&self) -> &DeviceBuffer {
        &self.key_features
    }
}

/// Gradients of [`CudaFastAttention::backward`], each shaped like its input.
pub struct AttentionGrads {
    /// Gradient of the queries, `(batch, heads, seq_len, dim_qk)`.
    pub dq: DeviceBuffer,
    /// Gradient of the keys, `(batch, heads, seq_len, dim_qk)`.
    pub dk: DeviceBuffer,
    /// Gradient of the values, `(batch, heads, seq_len, dim_v)`.
    pub dv: DeviceBuffer,
}

/// Host copies of the gradients of [`CudaFastAttention::backward_host`].
#[derive(Debug, Clone, PartialEq)]
pub struct HostGrads {
    /// Gradient of the queries, `(batch, heads, seq_len, dim_qk)`.
    pub dq: Vec<f32>,
    /// Gradient of the keys, `(batch, heads, seq_len, dim_qk)`.
    pub dk: Vec<f32>,
    /// Gradient of the values, `(batch, heads, seq_len, dim_v)`.
    pub dv: Vec<f32>,
}

impl CudaFastAttention {
    /// Attention with `projection` `(nb_features, dim_qk)` uploaded to `device` (a GPU's
    /// [`GpuLauncher`] or the [`EmulatedLauncher`](crate::EmulatedLauncher)).
    pub fn new(
        device: &SharedLauncher,
        projection: &[f32],
        nb_features: usize,
        dim_qk: usize,
        causal: bool,
    ) -> Result<Self> {
        const OP: &str = "CudaFastAttention::new";
        Self::check_projection(OP, projection.len(), nb_features, dim_qk)?;
        Ok(Self {
            device: device.clone(),
            projection: DeviceBuffer::from_f32(device, projection)?,
            nb_features,
            dim_qk,
            causal,
            precision: Precision::F32,
        })
    }

    /// Chooses the arithmetic of the causal attention products for later forward and backward
    /// calls ([`Precision::F32`] by default). [`Precision::Tf32`] fails with
    /// [`Error::Unsupported`] on devices older than sm_80. Non-causal attention (cuBLAS) and
    /// the feature maps stay f32 either way.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        precision.check_device("CudaFastAttention::set_precision", &self.device)?;
        self.precision = precision;
        Ok(())
    }

    /// The arithmetic of the causal attention products (see [`Self::set_precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn check_projection(
        op: &'static str,
        len: usize,
        nb_features: usize,
        dim_qk: usize,
    ) -> Result<()> {
        if nb_features == 0 || dim_qk == 0 {
            return Err(Error::Shape {
                op,
                detail: format!("projection ({nb_features}, {dim_qk}) has a zero dimension"),
            });
        }
        expect_len(
            op,
            "projection",
            len,
            nb_features.saturating_mul(dim_qk),
            &format!("(nb_features={nb_features}, dim_qk={dim_qk})"),
        )
    }

    /// Replaces the projection matrix (performer-pytorch's `redraw_projection_matrix`).
    pub fn set_projection(&mut self, projection: &[f32]) -> Result<()> {
        const OP: &str = "CudaFastAttention::set_projection";
        Self::check_projection(OP, projection.len(), self.nb_features, self.dim_qk)?;
        self.projection = DeviceBuffer::from_f32(&self.device, projection)?;
        Ok(())
    }

    /// The device this attention runs on.
    pub fn device(&self) -> &SharedLauncher {
        &self.device
    }
    /// Number of random features `m`.
    pub fn nb_features(&self) -> usize {
        self.nb_features
    }
    /// Whether attention is causal (autoregressive).
    pub fn is_causal(&self) -> bool {
        self.causal
    }
    /// The projection matrix on the device, `(nb_features, dim_qk)`.
    pub fn projection(&self) -> &DeviceBuffer {
        &self.projection
    }

    fn check_shape(&self, op: &'static str, shape: &AttentionShape) -> Result<()> {
        shape.validate(op, self.nb_features)?;
        if shape.dim_qk != self.dim_qk {
            return Err(Error::Shape {
                op,
                detail: format!(
                    "dim_qk {} of {shape:?} differs from the projection's ({}, {})",
                    shape.dim_qk, self.nb_features, self.dim_qk
                ),
            });
        }
        Ok(())
    }

    fn check_inputs(
        &self,
        op: &'static str,
        shape: &AttentionShape,
        q: usize,
        k: usize,
        v: usize,
    ) -> Result<()> {
        self.check_shape(op, shape)?;
        let s = format!("{shape:?}");
        expect_len(op, "q", q, shape.qk_len(), &s)?;
        expect_len(op, "k", k, shape.qk_len(), &s)?;
        expect_len(op, "v", v, shape.v_len(), &s)
    }

    fn dims(&self, shape: &AttentionShape) -> LinearDims {
        LinearDims {
            bh: shape.batch_heads(),
            n: shape.seq_len,
            m: self.nb_features,
            e: shape.dim_v,
        }
    }

    /// The softmax feature map of `x` `(batch, heads, seq_len, dim_qk)` for queries or keys,
    /// `(batch, heads, seq_len, nb_features)`.
    pub fn feature_map(
        &self,
        x: &DeviceBuffer,
        shape: AttentionShape,
        kind: FeatureKind,
    ) -> Result<DeviceBuffer> {
        const OP: &str = "CudaFastAttention::feature_map";
        self.check_shape(OP, &shape)?;
        ops::softmax_features(
            &self.device,
            x,
            &self.projection,
            shape.batch_heads(),
            shape.seq_len,
            shape.dim_qk,
            self.nb_features,
            kind,
        )
    }

    /// Forward pass on device buffers; keeps what the backward needs in the result.
    pub fn forward(
        &self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        shape: AttentionShape,
    ) -> Result<AttentionForward> {
        const OP: &str = "CudaFastAttention::forward";
        self.check_inputs(OP, &shape, q.len(), k.len(), v.len())?;
        let qf = self.feature_map(q, shape, FeatureKind::Query)?;
        let kf = self.feature_map(k, shape, FeatureKind::Key)?;
        let dims = self.dims(&shape);
        let (out, saved) = if self.causal {
            let (out, den) =
                ops::causal_linear_attention_with(&self.device, &qf, &kf, v, dims, self.precision)?;
            (out, Saved::Causal { den })
        } else {
            let (out, saved) = ops::linear_attention(&self.device, &qf, &kf, v, dims)?;
            (out, Saved::NonCausal(saved))
        };
        Ok(AttentionForward {
            out,
            shape,
            causal: self.causal,
            query_features: qf,
            key_features: kf,
            saved,
        })
    }

    /// Backward pass: gradients of `q`, `k`, `v` given the forward's result and the gradient
    /// of the output. `q`, `k`, `v` must be the forward's inputs.
    pub fn backward(
        &self,
        q: &DeviceBuffer,
        k: &DeviceBuffer,
        v: &DeviceBuffer,
        fwd: &AttentionForward,
        grad_out: &DeviceBuffer,
    ) -> Result<AttentionGrads> {
        const OP: &str = "CudaFastAttention::backward";
        let shape = fwd.shape;
        self.check_inputs(OP, &shape, q.len(), k.len(), v.len())?;
        expect_len(
            OP,
            "grad_out",
            grad_out.len(),
            shape.v_len(),
            &format!("{shape:?}"),
        )?;
        if fwd.causal != self.causal {
            return Err(Error::Shape {
                op: OP,
                detail: format!(
                    "forward result is {} but this attention is {}",
                    mode(fwd.causal),
                    mode(self.causal)
                ),
            });
        }
        let dims = self.dims(&shape);
        let dev = &self.device;
        let (qf, kf) = (&fwd.query_features, &fwd.key_features);
        let (dqf, dkf, dv) = match &fwd.saved {
            Saved::Causal { den } => ops::causal_linear_attention_backward_with(
                dev,
                qf,
                kf,
                v,
                &fwd.out,
                den,
                grad_out,
                dims,
                self.precision,
            )?,
            Saved::NonCausal(saved) => {
                ops::linear_attention_backward(dev, qf, kf, v, &fwd.out, saved, grad_out, dims)?
            }
        };
        let (bh, n, d, m) = (
            shape.batch_heads(),
            shape.seq_len,
            shape.dim_qk,
            self.nb_features,
        );
        let dq = ops::softmax_features_backward(dev, q, &self.projection, qf, &dqf, bh, n, d, m)?;
        let dk = ops::softmax_features_backward(dev, k, &self.projection, kf, &dkf, bh, n, d, m)?;
        Ok(AttentionGrads { dq, dk, dv })
    }

    /// Host convenience: uploads `q`, `k`, `v` (layout as in [`AttentionShape`]), runs the
    /// forward and returns the output on the host with the device-side state for
    /// [`Self::backward_host`].
    pub fn forward_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttentionShape,
    ) -> Result<(Vec<f32>, AttentionForward)> {
        const OP: &str = "CudaFastAttention::forward_host";
        self.check_inputs(OP, &shape, q.len(), k.len(), v.len())?;
        let dev = &self.device;
        let (qd, kd, vd) = (
            DeviceBuffer::from_f32(dev, q)?,
            DeviceBuffer::from_f32(dev, k)?,
            DeviceBuffer::from_f32(dev, v)?,
        );
        let fwd = self.forward(&qd, &kd, &vd, shape)?;
        let out = fwd.out.to_f32()?;
        Ok((out, fwd))
    }

    /// Host convenience: the gradients of `q`, `k`, `v` on the host. `q`, `k`, `v` are the
    /// forward's inputs (uploaded again: keeping them on the device between the passes would
    /// hold memory the caller may not expect).
    pub fn backward_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        fwd: &AttentionForward,
        grad_out: &[f32],
    ) -> Result<HostGrads> {
        const OP: &str = "CudaFastAttention::backward_host";
        let shape = fwd.shape;
        self.check_inputs(OP, &shape, q.len(), k.len(), v.len())?;
        expect_len(
            OP,
            "grad_out",
            grad_out.len(),
            shape.v_len(),
            &format!("{shape:?}"),
        )?;
        let dev = &self.device;
        let (qd, kd, vd, gd) = (
            DeviceBuffer::from_f32(dev, q)?,
            DeviceBuffer::from_f32(dev, k)?,
            DeviceBuffer::from_f32(dev, v)?,
            DeviceBuffer::from_f32(dev, grad_out)?,
        );
        let g = self.backward(&qd, &kd, &vd, fwd, &gd)?;
        Ok(HostGrads {
            dq: g.dq.to_f32()?,
            dk: g.dk.to_f32()?,
            dv: g.dv.to_f32()?,
        })
    }
}

fn mode(causal: bool) -> &'static str {
    if causal { "causal" } else { "non-causal" }
}

/// One-shot host API: FAVOR+ attention of `q`, `k`, `v` on device `ordinal` with `projection`
/// `(nb_features, dim_qk)` (its length must be a multiple of `shape.dim_qk`); returns the
/// output `(batch, heads, seq_len, dim_v)`.
pub fn fast_attention_host(
    ordinal: usize,
    projection: &[f32],
    causal: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
) -> Result<Vec<f32>> {
    const OP: &str = "fast_attention_host";
    if shape.dim_qk == 0 || projection.is_empty() || !projection.len().is_multiple_of(shape.dim_qk)
    {
        return Err(Error::Shape {
            op: OP,
            detail: format!(
                "projection has {} elements, not a positive multiple of dim_qk {} of {shape:?}",
                projection.len(),
                shape.dim_qk
            ),
        });
    }
    let nb_features = projection.len() / shape.dim_qk;
    let device: SharedLauncher = Arc::new(GpuLauncher::new(ordinal, false)?);
    let attn = CudaFastAttention::new(&device, projection, nb_features, shape.dim_qk, causal)?;
    Ok(attn.forward_host(q, k, v, shape)?.0)
}
