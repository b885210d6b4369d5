//! performer-tensor: f32 tensors with define-by-run autograd, the ops a transformer needs,
//! parameters and modules with PyTorch's dotted names, optimizers, safetensors IO and GEMM.
//!
//! This crate owns everything below the model: the FAVOR+, layer and model crates are built on
//! it, and it can be used on its own to compose and train other models.
//!
//! ```
//! use performer_tensor::{Tensor, Param};
//! # fn main() -> performer_tensor::Result<()> {
//! let w = Param::new(Tensor::randn(&[3, 2]).to_array());
//! let x = Tensor::randn(&[4, 3]);
//! let loss = x.matmul(&w.tensor())?.relu().mean_all();
//! let grads = loss.backward()?;
//! assert_eq!(grads.get_param(&w).unwrap().shape(), &[3, 2]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

/// The one early branch of an op that has a device implementation: `$e` is `None` for host
/// operands (the CPU code below it runs, unchanged) and the op's result otherwise. Compiles to
/// nothing without the `cuda` feature.
macro_rules! on_device {
    ($e:expr) => {
        #[cfg(feature = "cuda")]
        if let Some(r) = $e {
            return r;
        }
    };
}

mod alloc;
pub mod autocast;
mod autograd;
pub mod bf16_gemm;
#[cfg(feature = "cuda")]
mod cuda;
mod custom_op;
mod device;
#[cfg(feature = "cuda")]
mod device_memory;
pub mod dtype;
mod error;
pub mod fast_math;
pub mod gemm;
mod gradcheck;
pub mod io;
mod module;
pub mod ops;
pub mod optim;
pub mod parallel;
mod param;
pub mod profile;
pub mod rng;
pub mod schedule;
pub mod shape;
pub mod team;
mod tensor;
pub mod testing;
mod transfer;
pub mod transpose;

pub use autograd::{GradModeGuard, Gradients, LeafHook, enable_grad, is_grad_enabled, no_grad};
/// Device ops for the crates above this one (feature `cuda`): device buffers of tensors, a
/// graph record for fused device kernels, rotary embedding and token shift on a device.
#[cfg(feature = "cuda")]
pub use cuda::model_ops as device_ops;
pub use custom_op::{CustomOp, apply_custom_op};
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use gradcheck::{GradcheckOptions, gradcheck};
pub use module::{Entry, Module, TrainingFlag, Visitor};
pub use param::{Buffer, Param, StateValue, Transposed};
pub use tensor::{BackwardFn, Data, Tensor, TensorId};

/// Re-export of the array crate our tensors are built on.
pub use ndarray;
