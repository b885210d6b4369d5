//! FastAttention's FAVOR+ on a CUDA device (feature `cuda`): the host tensors are copied to the
//! device, performer-cuda's kernels compute the softmax features and the (causal or non-causal)
//! linear attention, and the results come back, so a model built on the CPU runs its attention
//! on a GPU unchanged. The forward keeps the device-side state for the backward.

use ndarray::{ArrayD, IxDyn};
use std::sync::{Arc, OnceLock};

use performer_cuda::{
    AttentionForward, AttentionShape, CudaFastAttention, EmulatedLauncher, GpuLauncher,
    SharedLauncher,
};
use performer_tensor::{CustomOp, Data, Error, Result, Tensor, apply_custom_op};

// The CUDA kernels add the same constants as the CPU path; a change to one side alone fails to
// compile.
const _: () = assert!(performer_cuda::ops::FEATURE_EPS == crate::feature::SOFTMAX_FEATURE_EPS);
const _: () = assert!(performer_cuda::ops::CAUSAL_EPS == crate::ops::CAUSAL_EPS);

/// performer-cuda's error as the source of an [`Error::Backend`] naming `op`.
fn cuda_error(op: &str, e: performer_cuda::Error) -> Error {
    Error::backend(format!("{op} (CUDA)"), e)
}

/// A selected device: a GPU or the emulated device, behind performer-cuda's launcher.
pub(crate) struct CudaBackend {
    device: SharedLauncher,
}

impl CudaBackend {
    /// Opens device `ordinal` (a clear error where there is no driver or no such device).
    pub fn open(ordinal: usize) -> Result<Self> {
        if !performer_cuda::driver_available() {
            return Err(cuda_error(
                "FastAttention::use_cuda",
                performer_cuda::Error::DriverUnavailable {
                    op: "open CUDA device",
                },
            ));
        }
        let gpu = GpuLauncher::new(ordinal, false)
            .map_err(|e| cuda_error("FastAttention::use_cuda", e))?;
        Ok(CudaBackend {
            device: Arc::new(gpu),
        })
    }

    /// The emulated device, one per process (its kernel library is built on first use).
    pub fn emulated() -> Result<Self> {
        static DEVICE: OnceLock<std::result::Result<SharedLauncher, String>> = OnceLock::new();
        let device = DEVICE
            .get_or_init(|| {
                EmulatedLauncher::new()
                    .map(|l| Arc::new(l) as SharedLauncher)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|detail| {
                Error::backend(
                    "FastAttention::use_device (emulated)",
                    std::io::Error::other(detail),
                )
            })?;
        Ok(CudaBackend { device })
    }

    /// Softmax-kernel FAVOR+ of `q`, `k`, `v` `(b, h, n, d)` with `projection` `(m, d)`.
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        projection: &Tensor,
        causal: bool,
    ) -> Result<Tensor> {
        let op = CudaFavorOp {
            device: self.device.clone(),
            causal,
        };
        Ok(apply_custom_op(op, &[q, k, v, projection])?.remove(0))
    }
}

struct CudaFavorOp {
    device: SharedLauncher,
    causal: bool,
}

/// The device-side state a backward needs.
struct DeviceSaved {
    attention: CudaFastAttention,
    forward: AttentionForward,
}

fn host(x: &Data) -> Vec<f32> {
    x.as_standard_layout().iter().copied().collect()
}

fn shape_of(inputs: &[&Data]) -> Result<AttentionShape> {
    let (q, k, v) = (inputs[0].shape(), inputs[1].shape(), inputs[2].shape());
    match (q, k, v) {
        ([b, h, n, d], [b2, h2, n2, d2], [b3, h3, n3, e])
            if (b, h, n, d) == (b2, h2, n2, d2) && (b, h, n) == (b3, h3, n3) =>
        {
            Ok(AttentionShape {
                batch: *b,
                heads: *h,
                seq_len: *n,
                dim_qk: *d,
                dim_v: *e,
            })
        }
        _ => Err(Error::shape(
            "FastAttention (CUDA)",
            format!("q {q:?}, k {k:?}, v {v:?} must be (b, h, n, d) with one length"),
        )),
    }
}

impl CustomOp for CudaFavorOp {
    type Saved = Option<DeviceSaved>;

    fn name(&self) -> &'static str {
        "favor_attention_cuda"
    }

    fn forward(&self, inputs: &[&Data], save: bool) -> Result<(Vec<ArrayD<f32>>, Self::Saved)> {
        let shape = shape_of(inputs)?;
        let p = inputs[3];
        let attention = CudaFastAttention::new(
            &self.device,
            &host(p),
            p.shape()[0],
            shape.dim_qk,
            self.causal,
        )
        .map_err(|e| cuda_error("FastAttention", e))?;
        let (out, forward) = attention
            .forward_host(&host(inputs[0]), &host(inputs[1]), &host(inputs[2]), shape)
            .map_err(|e| cuda_error("FastAttention", e))?;
        let out = ArrayD::from_shape_vec(
            IxDyn(&[shape.batch, shape.heads, shape.seq_len, shape.dim_v]),
            out,
        )
        .map_err(|e| Error::shape("FastAttention (CUDA)", e.to_string()))?;
        Ok((
            vec![out],
            save.then_some(DeviceSaved { attention, forward }),
        ))
    }

    fn backward(
        &self,
        inputs: &[Data],
        saved: &Self::Saved,
        grads: &[Option<ArrayD<f32>>],
        needs: &[bool],
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let Some(g) = &grads[0] else {
            return Ok(vec![None; 4]);
        };
        if needs[3] {
            return Err(Error::invalid(
                "FastAttention (CUDA)",
                "projection",
                "tracked",
                "the CUDA path gives no gradient to the projection (a fixed buffer in performer-pytorch)",
            ));
        }
        let Some(s) = saved else {
            return Err(Error::Backward(
                "FastAttention (CUDA): the forward kept no state".into(),
            ));
        };
        let refs: Vec<&Data> = inputs.iter().collect();
        let shape = shape_of(&refs)?;
        let hg = s
            .attention
            .backward_host(
                &host(&inputs[0]),
                &host(&inputs[1]),
                &host(&inputs[2]),
                &s.forward,
                &host(&g.clone().into_shared()),
            )
            .map_err(|e| cuda_error("FastAttention backward", e))?;
        let qk = [shape.batch, shape.heads, shape.seq_len, shape.dim_qk];
        let vv = [shape.batch, shape.heads, shape.seq_len, shape.dim_v];
        let arr = |data: Vec<f32>, s: &[usize]| {
            ArrayD::from_shape_vec(IxDyn(s), data)
                .map_err(|e| Error::shape("FastAttention (CUDA)", e.to_string()))
        };
        Ok(vec![
            needs[0].then(|| arr(hg.dq, &qk)).transpose()?,
            needs[1].then(|| arr(hg.dk, &qk)).transpose()?,
            needs[2].then(|| arr(hg.dv, &vv)).transpose()?,
            None,
        ])
    }
}
