//! `FastAttention` (performer-pytorch's module of the same name) and the `ProjectionUpdater`
//! that redraws random features on the reference's schedule.

use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use performer_tensor::ops::Activation;
use performer_tensor::rng::Generator;
use performer_tensor::{Buffer, Error, Module, Result, StateValue, Tensor, TrainingFlag, Visitor};

use crate::feature::FeatureMap;
use crate::ops::{
    CAUSAL_EPS, DEFAULT_CHUNK, causal_linear_attention, favor_attention, linear_attention_chunked,
};
use crate::projection::{
    OrthoScaling, gaussian_orthogonal_random_matrix, gaussian_orthogonal_random_matrix_with,
};

/// Settings of [`FastAttention`], with performer-pytorch's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct FastAttentionConfig {
    /// Size of each head (`d`).
    pub dim_heads: usize,
    /// Number of random features `m`; `None` gives `int(d ln d)`.
    pub nb_features: Option<usize>,
    /// Row scaling of the projection.
    pub ortho_scaling: OrthoScaling,
    /// Position i attends only to positions <= i.
    pub causal: bool,
    /// Use `kernel_fn(u) + 1e-3` features instead of the softmax kernel.
    pub generalized_attention: bool,
    /// The kernel of generalized attention (ReLU by default).
    pub kernel_fn: Activation,
    /// No random features: queries softmaxed over features, keys over positions (or `exp`
    /// when causal), as in "Efficient Attention".
    pub no_projection: bool,
}

impl FastAttentionConfig {
    /// The defaults for heads of size `dim_heads`.
    pub fn new(dim_heads: usize) -> Self {
        FastAttentionConfig {
            dim_heads,
            nb_features: None,
            ortho_scaling: OrthoScaling::Gaussian,
            causal: false,
            generalized_attention: false,
            kernel_fn: Activation::Relu,
            no_projection: false,
        }
    }

    /// The number of features this config gives.
    pub fn resolved_nb_features(&self) -> usize {
        self.nb_features
            .unwrap_or_else(|| default_nb_features(self.dim_heads))
    }
}

/// performer-pytorch's default feature count, `int(d * ln d)`.
pub fn default_nb_features(dim_heads: usize) -> usize {
    (dim_heads as f64 * (dim_heads as f64).ln()) as usize
}

/// Where [`FastAttention::use_device`] runs the attention (feature `cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionDevice {
    /// CUDA device `ordinal`, through performer-cuda's `GpuLauncher`.
    Cuda(usize),
    /// performer-cuda's emulated device: the same kernels compiled as C++ and run on the CPU
    /// (slow; for tests without a GPU). Needs a C++20 compiler at run time.
    Emulated,
}

/// FAVOR+ attention over queries, keys and values already split into heads `(b, h, n, d)`.
pub struct FastAttention {
    config: FastAttentionConfig,
    nb_features: usize,
    projection_matrix: Buffer,
    chunk: usize,
    /// The CUDA device selected with [`FastAttention::use_cuda`], if any.
    #[cfg(feature = "cuda")]
    cuda: std::sync::Mutex<Option<std::sync::Arc<crate::cuda::CudaBackend>>>,
}

impl FastAttention {
    /// Builds the module and draws its projection from the global generator.
    pub fn new(config: FastAttentionConfig) -> Result<Self> {
        if config.dim_heads == 0 {
            return Err(Error::invalid(
                "FastAttention",
                "dim_heads",
                0,
                "must be positive",
            ));
        }
        let nb_features = config.resolved_nb_features();
        if nb_features == 0 {
            return Err(Error::invalid(
                "FastAttention",
                "nb_features",
                0,
                format!(
                    "must be positive (dim_heads {} gives int(d ln d) = 0; set nb_features)",
                    config.dim_heads
                ),
            ));
        }
        let proj =
            gaussian_orthogonal_random_matrix(nb_features, config.dim_heads, config.ortho_scaling)?;
        Ok(FastAttention {
            config,
            nb_features,
            projection_matrix: Buffer::new(proj.into_dyn()),
            chunk: DEFAULT_CHUNK,
            #[cfg(feature = "cuda")]
            cuda: std::sync::Mutex::new(None),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FastAttentionConfig {
        &self.config
    }

    /// Number of random features `m`.
    pub fn nb_features(&self) -> usize {
        self.nb_features
    }

    /// Rows per chunk of the attention kernels (64 by default; results do not depend on it
    /// beyond rounding).
    pub fn set_chunk_size(&mut self, chunk: usize) -> Result<()> {
        if chunk == 0 {
            return Err(Error::invalid(
                "FastAttention::set_chunk_size",
                "chunk",
                0,
                "must be positive",
            ));
        }
        self.chunk = chunk;
        Ok(())
    }

    /// Rows per chunk of the attention kernels.
    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// The current projection `(nb_features, dim_heads)`.
    pub fn projection_matrix(&self) -> Result<Tensor> {
        self.projection_matrix.tensor()
    }

    /// Draws a new projection from the global generator.
    pub fn redraw_projection_matrix(&self) -> Result<()> {
        let proj = gaussian_orthogonal_random_matrix(
            self.nb_features,
            self.config.dim_heads,
            self.config.ortho_scaling,
        )?;
        self.projection_matrix
            .set(StateValue::F32(proj.into_dyn().into_shared()))
    }

    /// Draws a new projection from `rng` instead of the global generator (data-parallel
    /// training draws every rank's projections from one shared seed this way).
    pub fn redraw_projection_matrix_with(&self, rng: &mut Generator) -> Result<()> {
        let proj = gaussian_orthogonal_random_matrix_with(
            self.nb_features,
            self.config.dim_heads,
            self.config.ortho_scaling,
            rng,
        )?;
        self.projection_matrix
            .set(StateValue::F32(proj.into_dyn().into_shared()))
    }

    /// Runs this attention on CUDA device `ordinal` from now on (feature `cuda`): host tensors
    /// are copied to the device and back around performer-cuda's kernels. The softmax kernel
    /// with queries and keys of one length (self-attention) runs there; generalized attention,
    /// `no_projection` and cross-attention keep the CPU path. An error where the crate was built
    /// without the feature or there is no usable device.
    pub fn use_cuda(&self, ordinal: usize) -> Result<()> {
        self.use_device(AttentionDevice::Cuda(ordinal))
    }

    /// [`FastAttention::use_cuda`] on a GPU or on performer-cuda's emulated device.
    pub fn use_device(&self, device: AttentionDevice) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let backend = match device {
                AttentionDevice::Cuda(ordinal) => crate::cuda::CudaBackend::open(ordinal)?,
                AttentionDevice::Emulated => crate::cuda::CudaBackend::emulated()?,
            };
            *self.cuda.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::sync::Arc::new(backend));
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::invalid(
                "FastAttention::use_cuda",
                "device",
                format!("{device:?}"),
                "performer-favor was built without the `cuda` feature",
            ))
        }
    }

    /// Back to the CPU path.
    pub fn use_cpu(&self) {
        #[cfg(feature = "cuda")]
        {
            *self.cuda.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Whether a CUDA device is selected.
    pub fn uses_cuda(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.cuda
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Attention of `q` `(b, h, n, d)` over `k`, `v` `(b, h, nk, d)`; causal attention needs
    /// `nk == n`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let d = self.config.dim_heads;
        for (name, t) in [("q", q), ("k", k)] {
            if t.rank() < 2 || t.shape().last() != Some(&d) {
                return Err(Error::shape(
                    "FastAttention",
                    format!("`{name}` {:?} must be (..., n, dim_heads = {d})", t.shape()),
                ));
            }
        }
        if v.rank() < 2 {
            return Err(Error::shape(
                "FastAttention",
                format!("`v` {:?} must be (..., n, e)", v.shape()),
            ));
        }
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            // No position to attend from or to: the reference divides 0 by 0 (NaN).
            if t.shape().contains(&0) {
                return Err(Error::invalid(
                    "FastAttention",
                    name,
                    format!("shape {:?}", t.shape()),
                    "needs at least one head of one position",
                ));
            }
        }
        if self.config.no_projection {
            let qs = q.softmax(-1)?;
            let ks = if self.config.causal {
                k.exp()
            } else {
                k.softmax(-2)?
            };
            #[cfg(feature = "cuda")]
            if !q.device().is_cpu() {
                return crate::device::attention_on_features(&qs, &ks, v, self.config.causal);
            }
            return if self.config.causal {
                causal_linear_attention(&qs, &ks, v, CAUSAL_EPS, self.chunk)
            } else {
                linear_attention_chunked(&qs, &ks, v, self.chunk)
            };
        }
        let map = if self.config.generalized_attention {
            FeatureMap::Generalized(self.config.kernel_fn)
        } else {
            FeatureMap::Softmax
        };
        // Device tensors: the kernels run on their buffers (no host copy); generalized
        // features come from device tensor ops, then the same attention kernels.
        #[cfg(feature = "cuda")]
        if !q.device().is_cpu() {
            let projection = self.projection_matrix()?;
            return match map {
                FeatureMap::Softmax => {
                    crate::device::favor_attention(q, k, v, &projection, self.config.causal)
                }
                FeatureMap::Generalized(f) => crate::device::attention_on_features(
                    &crate::device::generalized_features(q, &projection, f)?,
                    &crate::device::generalized_features(k, &projection, f)?,
                    v,
                    self.config.causal,
                ),
            };
        }
        #[cfg(feature = "cuda")]
        if let Some(backend) = self.cuda.lock().unwrap_or_else(|e| e.into_inner()).clone()
            && map == FeatureMap::Softmax
            && q.rank() == 4
            && k.shape() == q.shape()
        {
            return backend.attention(q, k, v, &self.projection_matrix()?, self.config.causal);
        }
        favor_attention(
            q,
            k,
            v,
            &self.projection_matrix()?,
            map,
            self.config.causal,
            self.chunk,
        )
    }
}

impl Module for FastAttention {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.buffer("projection_matrix", &self.projection_matrix);
    }
}

/// Counts forward calls in training mode and redraws the projections of a model's
/// FastAttention modules every `feature_redraw_interval` calls, exactly as performer-pytorch's
/// `ProjectionUpdater`: on a call with `calls >= interval` it redraws and resets the count,
/// otherwise it adds one (also when the interval is `None`, i.e. the projections are fixed).
pub struct ProjectionUpdater {
    interval: Mutex<Option<usize>>,
    calls: Buffer,
    training: TrainingFlag,
}

impl ProjectionUpdater {
    /// An updater redrawing every `interval` calls (`None`: never).
    pub fn new(interval: Option<usize>) -> Self {
        ProjectionUpdater {
            interval: Mutex::new(interval),
            calls: Buffer::new_i64(ArrayD::from_elem(IxDyn(&[]), 0)),
            training: TrainingFlag::default(),
        }
    }

    /// The redraw interval (`None` once fixed).
    pub fn interval(&self) -> Option<usize> {
        *self.interval.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops redrawing (performer-pytorch's `fix_projections_`).
    pub fn fix_projections(&self) {
        *self.interval.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Calls since the last redraw.
    pub fn calls_since_last_redraw(&self) -> i64 {
        match self.calls.get() {
            StateValue::I64(a) => a.iter().next().copied().unwrap_or(0),
            StateValue::F32(_) => 0,
        }
    }

    fn set_calls(&self, calls: i64) -> Result<()> {
        self.calls
            .set(StateValue::I64(ArrayD::from_elem(IxDyn(&[]), calls)))
    }

    /// One forward call's worth of bookkeeping; calls `redraw` (which should redraw every
    /// FastAttention of the model) when due.
    pub fn redraw_projections(&self, redraw: impl FnOnce() -> Result<()>) -> Result<()> {
        if !self.training.get() {
            return Ok(());
        }
        let calls = self.calls_since_last_redraw();
        if let Some(interval) = self.interval()
            && calls >= interval as i64
        {
            redraw()?;
            return self.set_calls(0);
        }
        self.set_calls(calls + 1)
    }
}

impl Module for ProjectionUpdater {
    fn visit(&self, v: &mut Visitor<'_>) {
        v.buffer("calls_since_last_redraw", &self.calls);
        v.training(&self.training);
    }
}
