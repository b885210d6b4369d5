//! performer-cuda owns the CUDA side of performer-rs: kernels for the FAVOR+ softmax feature
//! map and for causal (chunkwise, after flash-linear-attention) and non-causal linear attention,
//! forward and backward, on [cudarc](https://docs.rs/cudarc) 0.19.
//!
//! * It builds and its CPU tests pass on machines with no CUDA at all: cudarc loads the driver,
//!   NVRTC and cuBLAS at run time, and every entry point returns [`Error`] when they are absent.
//! * Kernels are CUDA C under `kernels/`, embedded with `include_str!` and compiled by NVRTC for
//!   the device's architecture on first use, once per process and device ([`kernel_sources`]).
//! * [`CudaFastAttention`] is the device API (device buffers in and out, forward and backward);
//!   [`CudaFastAttention::forward_host`] / [`CudaFastAttention::backward_host`] take and return
//!   host slices. [`ops`] exposes each stage on its own.
//! * Every device operation can go through one narrow interface, [`Launcher`] (allocate, copy,
//!   launch a kernel by name, cuBLAS's strided-batched GEMM), implemented by [`GpuLauncher`]
//!   (cudarc) and by [`EmulatedLauncher`], which runs the same sources compiled as C++ on the
//!   CPU (see [`emulator`]), so device code is tested on machines without a GPU.
//! * [`reference`](mod@reference) is the f64 CPU implementation of the same math that the GPU tests compare
//!   against.
//!
//! Layout everywhere: row-major and contiguous, `(batch, heads, seq_len, dim)`, the projection
//! matrix `(nb_features, dim_qk)` (see [`AttentionShape`]).

mod attention;
mod buffer;
mod device;
pub mod emulator;
mod error;
mod gpu_launcher;
pub mod kernel_sources;
mod launch_config;
pub mod launcher;
mod libs;
pub mod ops;
pub mod reference;
mod shape;
pub mod strided_index;
pub mod tensor_ops;
pub mod transfers;

pub use attention::{
    AttentionForward, AttentionGrads, CudaFastAttention, HostGrads, fast_attention_host,
};
pub use buffer::{DeviceBuffer, Elem, SharedLauncher};
pub use device::CudaDevice;
pub use emulator::{EmulatedLauncher, emulator_available};
pub use error::{Error, Result};
pub use gpu_launcher::GpuLauncher;
pub use launcher::{
    DevicePtr, GemmStridedBatched, KernelArg, LaunchDims, Launcher, POISON_BITS, Transpose,
};
pub use libs::{driver_available, nvrtc_available, search_dirs};
pub use ops::{FeatureKind, Precision};
pub use shape::{AttentionShape, MAX_BATCH_HEADS};

/// Re-export of the cudarc version this crate is built on, for callers that hold its buffers.
pub use cudarc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_oversized_shapes_are_typed_errors() {
        let s = AttentionShape::new(1, 2, 0, 16);
        let err = s.validate("test", 32).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        assert!(err.to_string().contains("seq_len"), "{err}");

        let s = AttentionShape::new(300, 300, 8, 16);
        let err = s.validate("test", 32).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");

        let s = AttentionShape::new(2, 4, 100, 64);
        s.validate("test", 266).unwrap();
    }

    #[test]
    fn shape_lengths() {
        let s = AttentionShape {
            batch: 2,
            heads: 3,
            seq_len: 5,
            dim_qk: 7,
            dim_v: 11,
        };
        assert_eq!(s.batch_heads(), 6);
        assert_eq!(s.qk_len(), 6 * 5 * 7);
        assert_eq!(s.v_len(), 6 * 5 * 11);
        assert_eq!(s.feature_len(13), 6 * 5 * 13);
    }
}
